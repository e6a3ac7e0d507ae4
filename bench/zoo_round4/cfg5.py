CFG = {
    "A": dict(mid=dict(alpha=1.0, smax=2.0)),
    "B": dict(mid=dict(alpha=3.0, smax=2.0), mid_tag="m3", exp=dict(steps=600, lr=1e-2), exp_tag="e6"),
}
CFG["C"] = dict(mid=dict(alpha=3.0, smax=2.0), mid_tag="m3",
                exp=dict(steps=800, lr=1e-2, lo=(0.3, 0.6), hi=(0.85, 1.6)), exp_tag="e8w")
CFG["D"] = dict(mid=dict(alpha=3.0, smax=2.0), mid_tag="m3",
                exp=dict(steps=800, lr=1e-2, lo=(0.3, 0.6), hi=(0.85, 1.6), sd=(0.5, 2.0), p_one=0.3, extra_rows=True),
                exp_tag="e8x")
