"""Post-hoc: how much do T2/T3 depend on the report's fixed sample seed 99? Best of 30 for other sample seeds.
usage: alt5.py CFG SEED [nseeds]"""
import pathlib
_HERE = pathlib.Path(__file__).resolve().parent  # the copy in bench/zoo_round4
import sys, json
from z5 import *
import cfg5
name, seed = sys.argv[1], int(sys.argv[2]); ns = int(sys.argv[3]) if len(sys.argv) > 3 else 10
world, sds, secs, shape = build(seed, cfg5.CFG[name])
b = Bench(world, shape)
r = json.load(open(f"{_HERE}/results5/{name}-s{seed}-{VARIANT}.json"))
be = r["res"][r["best_exp"]]["mean"]; ta = max(v["mean"] for v in r["ta"].values())
base = sds["base"]; exps = [sds[e] for e in SKILLS]
out = []
for rs in range(ns):
    best = max(b.score(ta_merge(base, exps, lambda k: c[group_of(k, 8)]))["mean"]
               for c in random_group_settings(30, 4, 3, seed=rs))
    out.append((rs, 100 * (best - be), 100 * (best - ta)))
    print(f"  sample seed {rs}: best rnd {best:.3f}  T2 {100 * (best - be):+.1f}  T3 gap {100 * (best - ta):+.1f}", flush=True)
print(f"ALT {name} s{seed} {VARIANT}: T2 met {sum(d >= 10 for _, d, _ in out)}/{ns}, T3 met {sum(g >= 5 for _, _, g in out)}/{ns}, "
      f"both {sum(d >= 10 and g >= 5 for _, d, g in out)}/{ns}; T2 min {min(d for _, d, _ in out):+.1f} T3 min {min(g for _, _, g in out):+.1f}")
