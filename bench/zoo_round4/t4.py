"""T4 attempt on the D design (seed 0): the wrd expert keeps its update in layers 6-7 (group 3), trained stack-aware
(both in the normal order mid[0:6]+W[6:8] and in the deeper order mid[0:8]+W[6:8]); num/col experts as D (rows).
usage: t4.py TAG stack_prob replay steps lr"""
import sys, copy, json
from z5 import *
import cfg5
tag = sys.argv[1]; sp = float(sys.argv[2]); rep = float(sys.argv[3]); steps = int(sys.argv[4]); lr = float(sys.argv[5])
seed = int(sys.argv[6]) if len(sys.argv) > 6 else 0
saug = tuple(float(x) for x in sys.argv[7].split(",")) if len(sys.argv) > 7 else None   # layer-delta scale aug lo,hi


class Scaled(torch.nn.Module):
    """A decoder layer run at p0 + s * (p - p0) (s set per step), so the expert's layer delta works over a scale range."""
    def __init__(self, layer):
        super().__init__()
        self.layer = layer; self.s = 1.0
        self.p0 = {n: p.detach().clone() for n, p in layer.named_parameters()}

    def forward(self, h, **kw):
        pd = {n: self.p0[n] + self.s * (p - self.p0[n]) for n, p in self.layer.named_parameters()}
        return torch.func.functional_call(self.layer, pd, (h,), kw)
world, sds, secs, shape = build(seed, cfg5.CFG["D"])
mid = sds["mid"]


def train_layer_expert():
    M = make_model(seed=seed, **shape); M.load_state_dict(mid)
    for p in M.parameters():
        p.requires_grad_(False)
    L = [copy.deepcopy(M.model.layers[i]) for i in (6, 7)]
    params = [p for l in L for p in l.parameters()]
    for p in params:
        p.requires_grad_(True)
    rng = random.Random(seed * 11 + 300); srng = random.Random(seed * 11 + 301)
    SL = [Scaled(l) for l in L]
    src = [("wrd", world.new["wrd"], 1.0)] + [(s, world.old[s], rep) for s in ("num", "col")]
    def lf(step):
        pairs = []
        for _ in range(64):
            s, tab, _w = rng.choices(src, [w for *_, w in src])[0]
            k = rng.choice(sorted(tab)); pairs.append((k + SEP[s], tab[k]))
        ids, lab = encode_pairs(pairs)
        order = list(M.model.layers[:8]) if srng.random() < sp else list(M.model.layers[:6])
        sc = 1.0 if (saug is None or srng.random() < 0.3) else srng.uniform(*saug)
        for x in SL:
            x.s = sc
        return ce(forward(M, ids, order + SL), lab)
    losses = run_steps(M, steps, lr, lf, params, seed)
    out = {k: v.clone() for k, v in mid.items()}
    for j, i in enumerate((6, 7)):
        for k, v in L[j].state_dict().items():
            out[f"model.layers.{i}.{k}"] = v.detach().clone()
    return out, losses


sds["wrd"], _ = cached(f"{CACHE}/s{seed}-{VARIANT}-b-m3-t4{tag}-wrd.pt", train_layer_expert)
b = Bench(world, shape)
r = report(b, sds)
models = {}
for e in SKILLS:
    m = make_model(**shape); m.load_state_dict(sds[e]); models[e] = m
st = {}
for a in SKILLS:
    for c in SKILLS:
        if a == c:
            continue
        A, B = models[a], models[c]
        for hi in range(1, 9):
            for lo in range(0, hi):
                if hi - lo in (1, 2, 4, 8):
                    st[f"{a}[0:{hi}]+{c}[{lo}:8]"] = b.ev(A, list(A.model.layers[:hi]) + list(B.model.layers[lo:]), B)
        for lo in range(8):
            for hi in range(lo + 1, 9):
                if hi - lo in (1, 2, 4, 8):
                    ls = list(A.model.layers[:lo]) + [x for l in range(lo, hi) for x in (A.model.layers[l], B.model.layers[l])] + list(B.model.layers[hi:])
                    st[f"{a}|{c} il[{lo}:{hi}]"] = b.ev(A, ls, B)
be = r["res"][r["best_exp"]]["mean"]
top = sorted(st.items(), key=lambda kv: -kv[1]["mean"])[:6]
for k, v in top:
    print(f"  stack {k:22s} {fmt(v)}  {100 * (v['mean'] - be):+.1f}")
print(f"RESULT-T4 {tag} s{seed} {VARIANT}: own {min(r['own'].values()):.2f} rnd {r['d_rnd']:+.1f} gap {r['gap']:+.1f} "
      f"stack {100 * (top[0][1]['mean'] - be):+.1f} ({top[0][0]})", flush=True)
