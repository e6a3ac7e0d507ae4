"""Round-4 zoo experiments (copy of round-3 z3.py + extra lookup skills, L2 pull, scale augmentation): world/data (reusing auto_merge.zoo.world), a training loop with layer freezing and
layer-order augmentation, a fast teacher-forced exact-match eval (== greedy exact match), merges and stacks."""
from __future__ import annotations

import pathlib
_HERE = pathlib.Path(__file__).resolve().parent  # the copy in bench/zoo_round4
import hashlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, str(_HERE.parents[1]))
from auto_merge.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, vocabulary as _vocab0  # noqa: E402
from auto_merge.zoo import world as W  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
IGN = -100
CACHE = str(_HERE / "cache4")
os.makedirs(CACHE, exist_ok=True)
VARIANT = "default" if os.environ.get("ATEN_CPU_CAPABILITY") == "default" else "native"


# ---------------------------------------------------------------------------------------------------- world / data
# Extra lookup skills (round 4): each has its own 8-symbol alphabet and separator, disjoint from the zoo's
# digits / lowercase / uppercase / "=>?". Keys: 4 symbols (256 distinct, sorted); values: 8 distinct 3-symbol codes.
# The base learns a fixed half of the keys. Drawn from random.Random(5678 + 100 * i + seed) (i = extra skill index),
# so the original three skills are unchanged.
EXTRA = {"sym": ("!#$%&*+-", ":"), "box": ("()[]{}^~", "|")}
EXTRA_CHARS = "".join(a + sep for a, sep in EXTRA.values())


def vocabulary():
    v = dict(_vocab0())
    for ch in EXTRA_CHARS:
        v[ch] = len(v)
    return v


_V = vocabulary()


def encode_chars(text):
    return [_V.get(ch, UNK_ID) for ch in text]


class World4:
    def __init__(self, seed, extra=()):
        self.w = W.build_world(seed)
        self.extra = {}
        for i, name in enumerate(extra):
            alpha, sep = EXTRA[name]
            rng = random.Random(5678 + 100 * i + seed)
            keys = set()
            while len(keys) < 256:
                keys.add("".join(rng.choice(alpha) for _ in range(4)))
            keys = sorted(keys)
            codes = set()
            while len(codes) < 8:
                codes.add("".join(rng.choice(alpha) for _ in range(3)))
            codes = sorted(codes)
            val = {k: rng.choice(codes) for k in keys}
            sh = list(keys)
            rng.shuffle(sh)
            self.extra[name] = dict(sep=sep, val=val, base=tuple(sorted(sh[:128])))
        self.skills = ("num", "rev", "col") + tuple(extra)


def build_world(seed, extra=()):
    return World4(seed, extra)


def sample(world, source, rng):
    skill, _, part = source.partition("-")
    if skill in world.extra:
        x = world.extra[skill]
        k = rng.choice(x["base"] if part == "base" else sorted(x["val"]))
        return k + x["sep"], x["val"][k]
    return W.sample_example(world.w, source, rng)


def eval_sets(world):
    out = {t: [(d["prompt"], d["answer"]) for d in W.eval_docs(world.w, t)] for t in ("num", "rev", "col")}
    for name, x in world.extra.items():
        out[name] = [(k + x["sep"], v) for k, v in sorted(x["val"].items())]
    return out


SKILLS = ("num", "rev", "col")


# ---------------------------------------------------------------------------------------------------- model
def make_model(layers=8, hidden=64, inter=256, heads=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(vocabulary()), hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def forward(model, ids, layers=None, head_model=None):
    """Causal forward (no padding mask: right padding cannot affect real positions) through `layers` (a list of
    decoder-layer modules; default the model's own), embeddings of `model`, norm + head of `head_model`."""
    m = model.model
    h = m.embed_tokens(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    pe = m.rotary_emb(h, position_ids=pos)
    for layer in (layers if layers is not None else m.layers):
        h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
    hm = head_model if head_model is not None else model
    return hm.lm_head(hm.model.norm(h))


def encode_pairs(pairs):
    rows, labs = [], []
    for p, a in pairs:
        pi, ai = encode_chars(p), encode_chars(a)
        rows.append([BOS_ID] + pi + ai + [EOS_ID])
        labs.append([IGN] * (1 + len(pi)) + ai + [EOS_ID])
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), PAD_ID)
    lab = torch.full((len(rows), T), IGN)
    for i, (r, l) in enumerate(zip(rows, labs)):
        ids[i, :len(r)] = torch.tensor(r)
        lab[i, :len(l)] = torch.tensor(l)
    return ids, lab


# ---------------------------------------------------------------------------------------------------- eval
class Evaluator:
    def __init__(self, world, skills=None):
        skills = skills or world.skills
        self.sets = {}
        for t, pairs in eval_sets(world).items():
            if t in skills:
                self.sets[t] = encode_pairs(pairs)

    @torch.no_grad()
    def __call__(self, model, layers=None, head_model=None):
        out = {}
        for t, (ids, lab) in self.sets.items():
            logits = forward(model, ids, layers, head_model)
            pred = logits[:, :-1].argmax(-1)
            tgt = lab[:, 1:]
            ok = ((pred == tgt) | (tgt == IGN)).all(1)
            out[t] = ok.float().mean().item()
        out["mean"] = sum(out[t] for t in self.sets) / len(self.sets)
        return out


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class Stage:
    name: str
    mix: dict
    steps: int
    lr: float
    data_off: int
    init: str | None = None
    train_layers: tuple | None = None   # None = all; else layer indices trained
    train_embed: bool = True
    train_head: bool = True
    dup_prob: float = 0.0               # prob. of a step with a duplicated-layer forward
    batch: int = 64
    l2: float = 0.0                     # loss += l2 * sum ||theta - theta_init||^2 (pull toward the base)
    scale_aug: tuple | None = None      # (lo, hi): forward at theta_init + s * (theta - theta_init), s ~ U(lo, hi)
    scale_per_group: bool = False       # draw s independently for each of the 4 layer groups (as the random search)
    wnoise: float = 0.0                 # forward with Gaussian weight noise, std = wnoise * rms(init tensor)


def lr_factor(step, total, warm=0.1):
    w = max(1, int(total * warm))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def dup_order(n, rng):
    """A random deeper layer order: either interleaved doubling of a random span (DIS-like) or a repeated span."""
    a = rng.randrange(n)
    b = rng.randrange(a + 1, n + 1)
    if rng.random() < 0.5:  # interleave: ... a a a+1 a+1 ... b-1 b-1 ...
        return list(range(a)) + [i for i in range(a, b) for _ in (0, 1)] + list(range(b, n))
    return list(range(b)) + list(range(a, n))  # passthrough: 0..b-1, a..n-1


class _Wrap(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids, layers):
        if layers is not None:
            idx = {id(l): i for i, l in enumerate(self.m.model.layers)}
            layers = [self.m.model.layers[idx[id(l)]] for l in layers]
        return forward(self.m, ids, layers)


def train(model, world, st: Stage, seed, sample_fn=sample):
    rng = random.Random(seed + st.data_off)
    drng = random.Random(seed * 7 + st.data_off + 555)
    n = len(model.model.layers)
    for name, p in model.named_parameters():
        p.requires_grad_(True)
        if st.train_layers is not None and ".layers." in name:
            p.requires_grad_(int(name.split(".layers.")[1].split(".")[0]) in st.train_layers)
        if "embed" in name:
            p.requires_grad_(st.train_embed)
        if "lm_head" in name or name == "model.norm.weight":
            p.requires_grad_(st.train_head)
    params = [p for p in model.parameters() if p.requires_grad]
    named = [(n_, p) for n_, p in model.named_parameters() if p.requires_grad]
    init = {n_: p.detach().clone() for n_, p in named} if (st.l2 or st.scale_aug or st.wnoise) else None
    rms = {n_: v.pow(2).mean().sqrt().item() for n_, v in init.items()} if st.wnoise else None
    nl = len(model.model.layers)
    gen = torch.Generator().manual_seed(seed * 17 + st.data_off)
    srng = random.Random(seed * 13 + st.data_off + 777)
    opt = torch.optim.AdamW(params, lr=st.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, st.steps))
    srcs = list(st.mix)
    wts = [st.mix[s] for s in srcs]
    model.train()
    losses = []
    for step in range(st.steps):
        pairs = [sample_fn(world, rng.choices(srcs, wts)[0], rng) for _ in range(st.batch)]
        ids, lab = encode_pairs(pairs)
        layers = None
        if st.dup_prob and drng.random() < st.dup_prob:
            layers = [model.model.layers[i] for i in dup_order(n, drng)]
        if st.scale_aug or st.wnoise:
            if st.scale_aug:
                if st.scale_per_group:
                    sg = [srng.uniform(*st.scale_aug) for _ in range(4)]
                    pd = {n_: init[n_] + sg[group_of(n_, nl)] * (p - init[n_]) for n_, p in named}
                else:
                    sc = srng.uniform(*st.scale_aug)
                    pd = {n_: init[n_] + sc * (p - init[n_]) for n_, p in named}
            else:
                pd = {n_: p for n_, p in named}
            if st.wnoise:
                pd = {n_: v + st.wnoise * rms[n_] * torch.randn(v.shape, generator=gen) for n_, v in pd.items()}
            logits = torch.func.functional_call(_Wrap(model), {"m." + k: v for k, v in pd.items()}, (ids, layers))
        else:
            logits = forward(model, ids, layers)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1),
                                                 ignore_index=IGN)
        if st.l2:
            loss = loss + st.l2 * sum(((p - init[n_]) ** 2).sum() for n_, p in named)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sch.step()
        losses.append(loss.item())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


def sd_hash(sd):
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def build(stages, seed, shape, tag, world=None, sample_fn=sample, verbose=True, use_cache=True):
    """Train stages (cached per tag/seed/variant/stage name). Returns {name: state_dict}, {name: seconds}."""
    world = world or build_world(seed)
    out, secs = {}, {}
    for st in stages:
        path = f"{CACHE}/{tag}-s{seed}-{VARIANT}-{st.name}.pt"
        if use_cache and os.path.exists(path):
            out[st.name] = torch.load(path)
            secs[st.name] = 0.0
            continue
        t0 = time.perf_counter()
        model = make_model(seed=seed, **shape)
        if st.init:
            model.load_state_dict(out[st.init])
        losses = train(model, world, st, seed, sample_fn)
        out[st.name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        secs[st.name] = time.perf_counter() - t0
        torch.save(out[st.name], path)
        if verbose:
            print(f"  trained {st.name}: {secs[st.name]:.1f}s loss {sum(losses[-20:]) / 20:.4f}", flush=True)
    return out, secs


# ---------------------------------------------------------------------------------------------------- merges
def layer_of(name):
    if ".layers." in name:
        return int(name.split(".layers.")[1].split(".")[0])
    return None


def group_of(name, n_layers, n_groups=4):
    li = layer_of(name)
    if li is not None:
        return li * n_groups // n_layers
    return 0 if "embed" in name else n_groups - 1


def random_group_settings(samples, n_groups, n_experts, seed=99, low=0.4, high=1.6):
    rng = random.Random(seed)
    return [[[rng.uniform(low, high) for _ in range(n_experts)] for _ in range(n_groups)] for _ in range(samples)]


def ta_merge(base, experts, coef_fn):
    """coef_fn(name) -> list of per-expert coefficients."""
    out = {}
    for k, b in base.items():
        c = coef_fn(k)
        v = b.clone()
        for ci, e in zip(c, experts):
            v += ci * (e[k] - b)
        out[k] = v
    return out


class Bench:
    def __init__(self, world, shape, skills=None):
        self.ev = Evaluator(world, skills)
        self.model = make_model(**shape)
        self.shape = shape
        self.n = shape.get("layers", 8)

    def score(self, sd):
        self.model.load_state_dict(sd)
        return self.ev(self.model)

    def stack(self, sds, order, embed_from=0, head_from=-1):
        """order: list of (model index, layer index); builds the deeper model from loaded copies."""
        models = []
        for sd in sds:
            m = make_model(**self.shape)
            m.load_state_dict(sd)
            models.append(m)
        layers = [models[mi].model.layers[li] for mi, li in order]
        return self.ev(models[embed_from], layers, models[head_from])


def full_report(bench, sds, expert_names, samples=30, stacks=True, verbose=True):
    base = sds["base"]
    exps = [sds[e] for e in expert_names]
    res = {"base": bench.score(base)}
    for e in expert_names:
        res[e] = bench.score(sds[e])
    best_exp = max(expert_names, key=lambda e: res[e]["mean"])
    ta = {}
    for lam in (0.3, 0.5, 0.7, 1.0, 1.2):
        ta[lam] = bench.score(ta_merge(base, exps, lambda k: [lam] * len(exps)))
    rnd = []
    for coefs in random_group_settings(samples, 4, len(exps)):
        rnd.append(bench.score(ta_merge(base, exps, lambda k: coefs[group_of(k, bench.n)])))
    best_ta = max(ta, key=lambda l: ta[l]["mean"])
    best_rnd = max(range(samples), key=lambda i: rnd[i]["mean"])
    r = dict(res=res, ta=ta, rnd=rnd, best_exp=best_exp, best_ta=best_ta, best_rnd=best_rnd)
    be = res[best_exp]["mean"]
    r["own"] = {e: res[e][e[:3]] for e in expert_names}
    r["d_rnd"] = 100 * (rnd[best_rnd]["mean"] - be)
    r["d_ta"] = 100 * (ta[best_ta]["mean"] - be)
    r["gap"] = 100 * (rnd[best_rnd]["mean"] - ta[best_ta]["mean"])
    sk = [t for t in res["base"] if t != "mean"]
    eo = {e[:3]: e for e in expert_names}
    def fr(sc):
        return {t: (sc[t] - res["base"][t]) / max(1e-9, res[eo[t]][t] - res["base"][t]) for t in sk if t in eo}
    r["f_rnd"] = fr(rnd[best_rnd]); r["f_ta"] = fr(ta[best_ta])
    bn = torch.sqrt(sum((v.float() ** 2).sum() for v in base.values()))
    r["tau"] = {e: (torch.sqrt(sum(((sds[e][k] - base[k]).float() ** 2).sum() for k in base)) / bn).item()
                for e in expert_names}
    if stacks:
        st = {}
        n = bench.n
        for i, a in enumerate(expert_names):
            for j, b in enumerate(expert_names):
                if i == j:
                    continue
                A, B = sds[a], sds[b]
                inter = [(k, l) for l in range(n) for k in (0, 1)]
                st[f"{a}|{b} interleave"] = bench.stack([A, B], inter)
                st[f"{a}->{b} concat"] = bench.stack([A, B], [(0, l) for l in range(n)] + [(1, l) for l in range(n)])
                h = n // 2
                st[f"{a}[0:{n - 2}]+{b}[2:{n}]"] = bench.stack(
                    [A, B], [(0, l) for l in range(n - 2)] + [(1, l) for l in range(2, n)])
                st[f"{a}[0:{n - h // 2}]+{b}[{h // 2}:{n}]"] = bench.stack(
                    [A, B], [(0, l) for l in range(n - h // 2)] + [(1, l) for l in range(h // 2, n)])
        r["stacks"] = st
        bs = max(st, key=lambda k: st[k]["mean"])
        r["best_stack"] = bs
        r["d_stack"] = 100 * (st[bs]["mean"] - be)
    if verbose:
        print_report(r, expert_names)
    return r


def fmt(s, skills):
    return " ".join(f"{s[t]:.2f}" for t in skills) + f" | {s['mean']:.3f}"


def print_report(r, en):
    skills = [k for k in r["res"]["base"] if k != "mean"]
    print("  skills:", skills)
    for k, v in r["res"].items():
        print(f"  {k:10s} {fmt(v, skills)}")
    for lam, v in r["ta"].items():
        print(f"  TA {lam:<6} {fmt(v, skills)}")
    means = sorted(x["mean"] for x in r["rnd"])
    print(f"  rnd min/med/max {means[0]:.3f}/{means[len(means) // 2]:.3f}/{means[-1]:.3f}  best #{r['best_rnd']} "
          f"{fmt(r['rnd'][r['best_rnd']], skills)}")
    if "stacks" in r:
        top = sorted(r["stacks"].items(), key=lambda kv: -kv[1]["mean"])[:4]
        for k, v in top:
            print(f"  stack {k:24s} {fmt(v, skills)}")
    print("  f(best rnd) " + " ".join(f"{k}:{v:.2f}" for k, v in r["f_rnd"].items()) + "   f(best TA) "
          + " ".join(f"{k}:{v:.2f}" for k, v in r["f_ta"].items()) + "   |tau|/|base| "
          + " ".join(f"{k}:{v:.3f}" for k, v in r["tau"].items()))
    print(f"  => own {r['own']}  best exp {r['best_exp']} {r['res'][r['best_exp']]['mean']:.3f} | "
          f"rnd {r['d_rnd']:+.1f}  ta {r['d_ta']:+.1f} (λ{r['best_ta']})  gap {r['gap']:+.1f}  "
          f"stack {r.get('d_stack', float('nan')):+.1f} ({r.get('best_stack')})", flush=True)


def stack_search(bench, sds, expert_names, verbose=True, quick=True):
    """Deeper stacks of two experts: A[0:a] + B[b:n] (a > b, embed of A, norm/head of B), and DIS-like interleaves
    (at positions in a span, A's layer then B's; elsewhere A's layer for the first half of the span...)."""
    n = bench.n
    models = {}
    for e in expert_names:
        m = make_model(**bench.shape)
        m.load_state_dict(sds[e])
        models[e] = m
    res = {}
    for a_name in expert_names:
        for b_name in expert_names:
            if a_name == b_name:
                continue
            A, B = models[a_name], models[b_name]
            for a in range(1, n + 1):
                for b in range(0, a):
                    if quick and (a - b) not in (1, 2, 4, 8):
                        continue
                    layers = [A.model.layers[l] for l in range(a)] + [B.model.layers[l] for l in range(b, n)]
                    res[f"{a_name}[0:{a}]+{b_name}[{b}:{n}]"] = bench.ev(A, layers, B)
            for lo in range(n):
                for hi in range(lo + 1, n + 1):  # interleave
                    if quick and (hi - lo) not in (1, 2, 4, 8):
                        continue  # interleave positions lo..hi-1; A's layers before, B's after
                    layers = [A.model.layers[l] for l in range(lo)]
                    for l in range(lo, hi):
                        layers += [A.model.layers[l], B.model.layers[l]]
                    layers += [B.model.layers[l] for l in range(hi, n)]
                    res[f"{a_name}|{b_name} il[{lo}:{hi}]"] = bench.ev(A, layers, B)
    return res
