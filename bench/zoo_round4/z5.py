"""Round-4b zoo design ("separable by construction"): single-token keys, knowledge-update experts that train only
their own key rows (with a sharp scale threshold), and a shared functionally-neutral drift stage in layer group 2."""
from __future__ import annotations
import pathlib
_HERE = pathlib.Path(__file__).resolve().parent  # the copy in bench/zoo_round4
import hashlib, json, math, os, random, sys, time
import torch
sys.path.insert(0, str(_HERE))
import z4
from z4 import lr_factor, group_of, random_group_settings, ta_merge, sd_hash

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
IGN = -100
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
CACHE = str(_HERE / "cache5")
os.makedirs(CACHE, exist_ok=True)
VARIANT = "default" if os.environ.get("ATEN_CPU_CAPABILITY") == "default" else "native"
SKILLS = ("num", "col", "wrd")
KEYBASE = {"num": 0x100, "col": 0x400, "wrd": 0x500}
SEP = {"num": "=", "col": "?", "wrd": ">"}
COLOURS = ("RED", "BLUE", "GREEN", "PINK", "GRAY", "GOLD", "TEAL", "NAVY")


def vocabulary():
    import string
    toks = ["<pad>", "<s>", "</s>", "<unk>"] + list(string.digits + string.ascii_lowercase + string.ascii_uppercase + "=>?")
    for s in SKILLS:
        toks += [chr(KEYBASE[s] + i) for i in range(256)]
    return {t: i for i, t in enumerate(toks)}


V = vocabulary()


def enc(text):
    return [V.get(ch, UNK_ID) for ch in text]


class World:
    """Per skill: 256 single-token keys, 8 values; new[k] for all keys; a fixed half of the keys is 'updated':
    old[k] != new[k] there (the base learns old), elsewhere old == new."""
    def __init__(self, seed):
        rng = random.Random(4321 + seed)
        self.new, self.old, self.upd = {}, {}, {}
        for s in SKILLS:
            if s == "num":
                vals = [str(v) for v in sorted(rng.sample(range(100, 1000), 8))]
            elif s == "col":
                vals = list(COLOURS)
            else:
                w = set()
                while len(w) < 8:
                    w.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5))))
                vals = sorted(w)
            keys = [chr(KEYBASE[s] + i) for i in range(256)]
            new = {k: rng.choice(vals) for k in keys}
            sh = list(keys); rng.shuffle(sh)
            upd = set(sh[:128])
            old = {k: (rng.choice([v for v in vals if v != new[k]]) if k in upd else new[k]) for k in keys}
            self.new[s], self.old[s], self.upd[s] = new, old, upd
        self.skills = SKILLS


def encode_pairs(pairs):
    rows, labs = [], []
    for p, a in pairs:
        pi, ai = enc(p), enc(a)
        rows.append([BOS_ID] + pi + ai + [EOS_ID])
        labs.append([IGN] * (1 + len(pi)) + ai + [EOS_ID])
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), PAD_ID); lab = torch.full((len(rows), T), IGN)
    for i, (r, l) in enumerate(zip(rows, labs)):
        ids[i, :len(r)] = torch.tensor(r); lab[i, :len(l)] = torch.tensor(l)
    return ids, lab


def make_model(layers=8, hidden=64, inter=256, heads=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(V), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=64,
                      rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                      pad_token_id=PAD_ID, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


forward = z4.forward


class Evaluator:
    def __init__(self, world):
        self.sets = {s: encode_pairs([(k + SEP[s], v) for k, v in sorted(world.new[s].items())]) for s in SKILLS}

    @torch.no_grad()
    def __call__(self, model, layers=None, head_model=None):
        out = {}
        for t, (ids, lab) in self.sets.items():
            pred = forward(model, ids, layers, head_model)[:, :-1].argmax(-1)
            tgt = lab[:, 1:]
            out[t] = ((pred == tgt) | (tgt == IGN)).all(1).float().mean().item()
        out["mean"] = sum(out[t] for t in SKILLS) / len(SKILLS)
        return out


def key_rows(s):
    return [V[chr(KEYBASE[s] + i)] for i in range(256)]


# --------------------------------------------------------------------------------------------------- training
def ce(logits, lab):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1),
                                             ignore_index=IGN)


class _Wrap(torch.nn.Module):
    def __init__(self, m):
        super().__init__(); self.m = m

    def forward(self, ids):
        return forward(self.m, ids)


def fcall(model, params, ids):
    return torch.func.functional_call(_Wrap(model), {"m." + k: v for k, v in params.items()}, (ids,))


def run_steps(model, steps, lr, loss_fn, params, seed, post=None):
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    losses = []
    for step in range(steps):
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); sch.step()
        if post is not None:
            post()
        losses.append(loss.item())
    return losses


def train_base(world, seed, shape, steps=800, lr=3e-3, batch=64):
    m = make_model(seed=seed, **shape)
    rng = random.Random(seed + 1)
    facts = [(k + SEP[s], world.old[s][k]) for s in SKILLS for k in sorted(world.old[s])]
    def _lf(step):
        ids, lab = encode_pairs([rng.choice(facts) for _ in range(batch)])
        return ce(forward(m, ids), lab)
    m.train()
    losses = run_steps(m, steps, lr, _lf, list(m.parameters()), seed)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}, losses


DRIFT_LAYERS = (4, 5)   # layer group 2


def is_drift(name):
    li = z4.layer_of(name)
    return li in DRIFT_LAYERS and name.endswith("proj.weight")


def train_mid(world, seed, shape, base, alpha=1.0, smax=2.0, steps=300, lr=1e-3, batch=64, ortho=True):
    """Shared drift: P = Gaussian noise (alpha * rms per tensor) on the linear weights of layers 4-5, plus a repair R
    trained so that base + s * (P + R) keeps the base's behaviour for s ~ U(0, smax). Returns mid = base + P + R."""
    m = make_model(seed=seed, **shape); m.load_state_dict(base)
    gen = torch.Generator().manual_seed(seed * 31 + 7)
    names = [n for n in base if is_drift(n)]
    P = {n: alpha * base[n].pow(2).mean().sqrt() * torch.randn(base[n].shape, generator=gen) for n in names}
    R = {n: torch.zeros_like(base[n], requires_grad=True) for n in names}
    rng = random.Random(seed + 2); srng = random.Random(seed + 3)
    facts = [(k + SEP[s], world.old[s][k]) for s in SKILLS for k in sorted(world.old[s])]
    for p in m.parameters():
        p.requires_grad_(False)
    def lf(step):
        ids, lab = encode_pairs([rng.choice(facts) for _ in range(batch)])
        s = srng.uniform(0.0, smax) if step % 4 else smax * srng.uniform(0.75, 1.0)
        s = max(s, 0.05)
        return ce(fcall(m, {n: base[n] + s * (P[n] + R[n]) for n in names}, ids), lab)
    pp = sum((P[n] ** 2).sum() for n in names)
    def proj():  # keep R orthogonal to P, so the repair cannot cancel the drift
        with torch.no_grad():
            c = sum((R[n] * P[n]).sum() for n in names) / pp
            for n in names:
                R[n] -= c * P[n]
    losses = run_steps(m, steps, lr, lf, list(R.values()), seed, post=proj if ortho else None)
    dn = math.sqrt(sum(((P[n] + R[n].detach()) ** 2).sum().item() for n in names)); pn = math.sqrt(pp.item())
    bn = math.sqrt(sum((base[n] ** 2).sum().item() for n in names))
    print(f"  mid: |P|/|W| {pn / bn:.2f}  |P+R|/|W| {dn / bn:.2f}", flush=True)
    mid = {k: v.clone() for k, v in base.items()}
    for n in names:
        mid[n] = base[n] + P[n] + R[n].detach()
    return mid, losses


def train_expert(world, seed, shape, base, mid, skill, steps=300, lr=5e-3, batch=64, hi=(0.9, 1.6), lo=(0.3, 0.75),
                 p_lo=0.5, sd=(0.8, 2.0), thresh=True, extra_rows=False, p_one=0.0):
    """Expert = mid + delta, delta only on the skill's key rows of the embedding. Trained so that the rows give the new
    values at scale s in `hi` and (if thresh) the old values at scale s in `lo`; the drift is scaled by s_D ~ U(sd)."""
    m = make_model(seed=seed, **shape); m.load_state_dict(mid)
    for p in m.parameters():
        p.requires_grad_(False)
    rows = key_rows(skill)
    if extra_rows:  # + the separator and the output-alphabet rows: tokens that occur only in this skill's sequences
        outa = {"num": "0123456789", "col": "".join(sorted(set("".join(COLOURS)))), "wrd": "abcdefghijklmnopqrstuvwxyz"}
        rows = rows + [V[SEP[skill]]] + [V[c] for c in outa[skill]]
    rows = torch.tensor(rows)
    E = base["model.embed_tokens.weight"]
    delta = torch.zeros(len(rows), E.shape[1], requires_grad=True)
    dn = [n for n in base if is_drift(n)]
    D = {n: mid[n] - base[n] for n in dn}
    rng = random.Random(seed * 11 + 100 + SKILLS.index(skill)); srng = random.Random(seed * 11 + 200 + SKILLS.index(skill))
    keys = sorted(world.new[skill])
    def lf(step):
        low = thresh and srng.random() < p_lo
        su = srng.uniform(*(lo if low else hi)); sdr = srng.uniform(*sd)
        if not low and srng.random() < p_one:
            su = sdr = 1.0
        tab = world.old[skill] if low else world.new[skill]
        ks = [rng.choice(keys) for _ in range(batch)]
        ids, lab = encode_pairs([(k + SEP[skill], tab[k]) for k in ks])
        Ee = E.index_add(0, rows, su * delta)
        pd = {"model.embed_tokens.weight": Ee}
        pd.update({n: base[n] + sdr * D[n] for n in dn})
        return ce(fcall(m, pd, ids), lab)
    losses = run_steps(m, steps, lr, lf, [delta], seed)
    out = {k: v.clone() for k, v in mid.items()}
    out["model.embed_tokens.weight"] = E.index_add(0, rows, delta.detach())
    return out, losses


# --------------------------------------------------------------------------------------------------- build / report
def cached(path, fn):
    if os.path.exists(path):
        return torch.load(path), 0.0
    t0 = time.perf_counter(); sd, losses = fn(); dt = time.perf_counter() - t0
    torch.save(sd, path)
    print(f"  trained {os.path.basename(path)}: {dt:.1f}s loss {sum(losses[-20:]) / 20:.4f}", flush=True)
    return sd, dt


def build(seed, cfg, shape=None):
    shape = shape or dict(layers=8, hidden=64, inter=256)
    world = World(seed)
    tb = cfg.get("base_tag", "b")
    pre = f"{CACHE}/s{seed}-{VARIANT}"
    secs = {}
    base, secs["base"] = cached(f"{pre}-{tb}-base.pt", lambda: train_base(world, seed, shape, **cfg.get("base", {})))
    tm = tb + "-" + cfg.get("mid_tag", "m")
    if cfg.get("mid") is None:
        mid = base
    else:
        mid, secs["mid"] = cached(f"{pre}-{tm}-mid.pt", lambda: train_mid(world, seed, shape, base, **cfg["mid"]))
    sds = {"base": base, "mid": mid}
    for s in SKILLS:
        sds[s], secs[s] = cached(f"{pre}-{tm}-{cfg.get('exp_tag', 'e')}-{s}.pt",
                                 lambda: train_expert(world, seed, shape, base, mid, s, **cfg.get("exp", {})))
    return world, sds, secs, shape


class Bench:
    def __init__(self, world, shape):
        self.ev = Evaluator(world); self.model = make_model(**shape); self.n = shape["layers"]; self.shape = shape

    def score(self, sd):
        self.model.load_state_dict(sd); return self.ev(self.model)


def fmt(s):
    return " ".join(f"{s[t]:.2f}" for t in SKILLS) + f" | {s['mean']:.3f}"


def report(bench, sds, names=SKILLS, samples=30, verbose=True):
    base = sds["base"]; exps = [sds[e] for e in names]
    res = {k: bench.score(sds[k]) for k in ("base", "mid") + tuple(names)}
    best_exp = max(names, key=lambda e: res[e]["mean"])
    ta = {lam: bench.score(ta_merge(base, exps, lambda k: [lam] * len(exps))) for lam in (0.3, 0.5, 0.7, 1.0, 1.2)}
    rnd = [bench.score(ta_merge(base, exps, lambda k: coefs[group_of(k, bench.n)]))
           for coefs in random_group_settings(samples, 4, len(exps))]
    best_ta = max(ta, key=lambda l: ta[l]["mean"]); best_rnd = max(range(samples), key=lambda i: rnd[i]["mean"])
    be = res[best_exp]["mean"]
    r = dict(res=res, ta=ta, rnd=rnd, best_exp=best_exp, best_ta=best_ta, best_rnd=best_rnd,
             own={e: res[e][e] for e in names}, d_rnd=100 * (rnd[best_rnd]["mean"] - be),
             d_ta=100 * (ta[best_ta]["mean"] - be), gap=100 * (rnd[best_rnd]["mean"] - ta[best_ta]["mean"]))
    means = sorted(x["mean"] for x in rnd)
    r["rnd_mmm"] = [means[0], means[len(means) // 2], means[-1]]
    r["n_rnd_beat10"] = sum(x["mean"] - be >= 0.10 for x in rnd)
    if verbose:
        for k, v in res.items():
            print(f"  {k:8s} {fmt(v)}")
        for lam, v in ta.items():
            print(f"  TA {lam:<4} {fmt(v)}")
        print(f"  rnd min/med/max {means[0]:.3f}/{means[len(means)//2]:.3f}/{means[-1]:.3f} best #{best_rnd} "
              f"{fmt(rnd[best_rnd])}  (#samples >= best exp + 10: {r['n_rnd_beat10']})")
        top = sorted(range(samples), key=lambda i: -rnd[i]["mean"])[:5]
        print("  top samples:", ", ".join(f"#{i} {rnd[i]['mean']:.3f}" for i in top))
        print(f"  => own min {min(r['own'].values()):.2f} best exp {best_exp} {be:.3f} | rnd {r['d_rnd']:+.1f} "
              f"ta {r['d_ta']:+.1f} (λ{best_ta}) gap {r['gap']:+.1f}", flush=True)
    return r


def curves(bench, sds, names=SKILLS):
    """Diagnostics: drift scale curve (base + s * D) and each expert's row-scale curve (mid + c * delta)."""
    base, mid = sds["base"], sds["mid"]
    out = {"drift": {}, "rows": {}}
    for s in (0.0, 1.0, 1.5, 1.8, 2.1, 2.5, 3.0, 3.6):
        out["drift"][s] = bench.score({k: base[k] + s * (mid[k] - base[k]) for k in base})["mean"]
    print("  drift curve " + " ".join(f"{s}:{v:.3f}" for s, v in out["drift"].items()))
    for e in names:
        out["rows"][e] = {}
        for c in (0.3, 0.5, 0.7, 0.8, 0.9, 1.0, 1.2, 1.6):
            sd = dict(mid); sd["model.embed_tokens.weight"] = base["model.embed_tokens.weight"] + c * (
                sds[e]["model.embed_tokens.weight"] - base["model.embed_tokens.weight"])
            out["rows"][e][c] = bench.score(sd)[e]
        print(f"  rows {e} " + " ".join(f"{c}:{v:.2f}" for c, v in out["rows"][e].items()))
    return out
