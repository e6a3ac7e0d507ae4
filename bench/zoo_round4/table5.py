import json, glob, sys
cfg = sys.argv[1] if len(sys.argv) > 1 else "D"
print("| seed | variant | T1 own num / col / wrd | best expert | best uniform TA (λ) Δ | T2 best random (#) Δ | T3 gap | #random ≥ +10 | TA λ1.0 mean | drift curve at 2.1 / 3.0 | build | base hash |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for s in range(5):
    for v in ("native", "default"):
        try:
            r = json.load(open(f"results5/{cfg}-s{s}-{v}.json"))
        except FileNotFoundError:
            print(f"| {s} | {v} | not run | | | | | | | | | |"); continue
        o = r["own"]; be = r["res"][r["best_exp"]]["mean"]
        t1 = "✓" if min(o.values()) >= 0.95 else "✗"; t2 = "✓" if r["d_rnd"] >= 10 else "✗"; t3 = "✓" if r["gap"] >= 5 else "✗"
        ta = r["ta"][str(r["best_ta"])] if str(r["best_ta"]) in r["ta"] else r["ta"][r["best_ta"]]
        dc = r["curves"]["drift"]
        print(f"| {s} | {v} | {o['num']:.3f} / {o['col']:.3f} / {o['wrd']:.3f} {t1} | {r['best_exp']} {be:.3f} | "
              f"{ta['mean']:.3f} (λ{r['best_ta']}) {r['d_ta']:+.1f} | {r['rnd'][r['best_rnd']]['mean']:.3f} (#{r['best_rnd']}) **{r['d_rnd']:+.1f}** {t2} | "
              f"**{r['gap']:+.1f}** {t3} | {r['n_rnd_beat10']}/30 | {r['ta']['1.0']['mean']:.3f} | {dc['2.1']:.3f} / {dc['3.0']:.3f} | {r['build_s']:.0f} s | {r['hash']['base'][:8]} |")
