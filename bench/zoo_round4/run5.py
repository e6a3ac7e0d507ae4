"""usage: run5.py CFG SEED  -> results5/CFG-sSEED-VARIANT.json"""
import pathlib
_HERE = pathlib.Path(__file__).resolve().parent  # the copy in bench/zoo_round4
import sys, json, time
from z5 import *
import cfg5
name = sys.argv[1]; seed = int(sys.argv[2])
cfg = cfg5.CFG[name]
t0 = time.time()
world, sds, secs, shape = build(seed, cfg)
bs = time.time() - t0
b = Bench(world, shape)
r = report(b, sds)
r["curves"] = curves(b, sds)
r.update(build_s=bs, stage_s=secs, hash={k: sd_hash(v) for k, v in sds.items()}, variant=VARIANT, seed=seed, cfg=name)
os.makedirs(f"{_HERE}/results5", exist_ok=True)
json.dump(r, open(f"{_HERE}/results5/{name}-s{seed}-{VARIANT}.json", "w"), indent=1, default=str)
ok1 = min(r["own"].values()) >= 0.95; ok2 = r["d_rnd"] >= 10; ok3 = r["gap"] >= 5
print(f"RESULT {name} s{seed} {VARIANT}: own {min(r['own'].values()):.2f} base {r['res']['base']['mean']:.3f} "
      f"bestexp {r['best_exp']} {r['res'][r['best_exp']]['mean']:.3f} rnd {r['d_rnd']:+.1f} (#{r['best_rnd']}) "
      f"ta {r['d_ta']:+.1f} (λ{r['best_ta']}) gap {r['gap']:+.1f} T1 {ok1} T2 {ok2} T3 {ok3} build {bs:.0f}s", flush=True)
