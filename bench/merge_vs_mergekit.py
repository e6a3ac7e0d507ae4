"""Benchmark: `auto-merge merge` against mergekit 0.1.5 on the same recipes and models (printed figures, no test).

    .venv/bin/python bench/merge_vs_mergekit.py [--threads 2] [--repeats 2] [--methods linear task_arithmetic ties
        dare_ties] [--mergekit-venv ~/.cache/auto-merge/mergekit-venv] [--json bench/results/merge_vs_mergekit.json]

Builds (once, cached) a ~170M-parameter Llama base + 3 experts (`bench/make_models.py`), writes one mergekit YAML per
method (base + 3 experts, fp32 out), runs both engines on it as subprocesses, alternately, `--repeats` times each,
and prints per method: the minimum wall time (`time.perf_counter` around the subprocess, interpreter start and
imports included), the CPU time of that run, the peak RSS of the child (`os.wait4` rusage, ru_maxrss; children
are started by a small helper process, since Linux carries the forking process's peak RSS across execve), the machine
load (`os.getloadavg`) before each run, the max abs difference between the two outputs (tensor by tensor) and how
many elements differ beyond fp32 rounding (more than 8 ulp of the largest of the two values and the base's value).
dare_ties is random, so only statistics are compared there (fraction of entries left at the base value, norm of the
task vector per tensor).

mergekit 0.1.5's selective methods (`--methods nearswap ram ramplus_tl arcee_fusion`, see SELECTIVE_RECIPES for the
parameters: nearswap and arcee_fusion merge expert1 into the base, ram and ramplus_tl all 3 experts) are compared
tensor by tensor as well, with a second table per method: per tensor kind (the layer index replaced by `*`), the
max abs difference over those tensors and how many tensors / elements differ. arcee_fusion is exact for tensors of
at most 10^6 elements; above that both tools take its quartiles from 10^6 entries drawn at random (different
generators), so there it prints the share of entries whose keep/reset decision differs, the shares kept on each
side, and the max abs difference over the entries both keep or both reset. `--config tiny` (0.2M params, every
tensor under 10^6 elements) runs all four in under a minute.

mergekit runs in its own venv (`--mergekit-venv`, or $AUTO_MERGE_MERGEKIT_VENV, default
~/.cache/auto-merge/mergekit-venv), created when missing with `python3 -m venv` and
`pip install torch==2.13.0 mergekit==0.1.5` (torch pinned in the same command, else pip pulls a CUDA build).
Both sides get the same thread count: OMP_NUM_THREADS/MKL_NUM_THREADS for both, and `-j` for mergekit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_models  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VENV = Path(os.environ.get("AUTO_MERGE_MERGEKIT_VENV", "~/.cache/auto-merge/mergekit-venv")).expanduser()
DEFAULT_WORK = Path("~/.cache/auto-merge/bench-work").expanduser()
MERGEKIT_PINS = ["torch==2.13.0", "mergekit==0.1.5"]
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "nearswap", "ram", "ramplus_tl", "arcee_fusion")
DEFAULT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
# mergekit 0.1.5's selective methods: (experts merged into the base, shared `parameters:` as mergekit names them).
# Expert deltas are ~N(0, 1e-3^2) on the matrices (|delta| / |theta| = 0.05) and ~5e-2 on the norm weights, so
# nearswap's t = 1e-3 takes some entries whole and pulls others towards the base, epsilon = 1e-3 lets about a
# third of each expert's matrix entries count in ram / ramplus_tl (a mix of unique and shared entries), and
# ramplus_tl's alpha = 2 sits above most tensors' rho (~1.2) so the clamp is not always what decides.
SELECTIVE_RECIPES = {
    "nearswap": (1, "{t: 0.001}"),
    "ram": (3, "{epsilon: 0.001}"),
    "ramplus_tl": (3, "{r: 0.5, alpha: 2.0, epsilon: 0.001}"),
    "arcee_fusion": (1, None),
}
FUSION_SAMPLED_ABOVE = 1_000_000  # arcee_fusion samples its quartiles (randomly) for tensors above this size
GOALS = {"linear": 3.0, "task_arithmetic": 3.0, "ties": 8.0}  # speed-up over mergekit the issue asks for
ULP_FACTOR = 8 * 2.0 ** -23  # "beyond fp32 rounding": more than 8 ulp of the operands' magnitude


# ---------------------------------------------------------------------------------------------------- setup

def ensure_mergekit_venv(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(f"creating the mergekit venv in {venv} ...", flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", *MERGEKIT_PINS], check=True)
    return exe


def recipe_text(method: str, models: Path) -> str:
    base, experts = models / "base", [models / name for name in make_models.EXPERTS]
    lines = []
    if method == "linear":
        lines.append("models:")
        for path, weight in zip(experts, (0.5, 0.3, 0.2)):
            lines += [f"  - model: {path}", f"    parameters: {{weight: {weight}}}"]
        lines += ["merge_method: linear", "parameters: {normalize: true}"]
    elif method in SELECTIVE_RECIPES:
        n_experts, shared = SELECTIVE_RECIPES[method]
        lines.append("models:")
        for path in experts[:n_experts]:
            lines.append(f"  - model: {path}")
        lines += [f"merge_method: {method}", f"base_model: {base}"]
        if shared is not None:
            lines.append(f"parameters: {shared}")
    else:
        per_model = {"task_arithmetic": "{weight: 1.0}",
                     "ties": "{weight: 1.0, density: 0.5}",
                     "dare_ties": "{weight: 1.0, density: 0.5}"}[method]
        shared = {"task_arithmetic": "{lambda: 0.5}",
                  "ties": "{normalize: true}",
                  "dare_ties": "{normalize: true}"}[method]
        lines.append("models:")
        for path in experts:
            lines += [f"  - model: {path}", f"    parameters: {per_model}"]
        lines += [f"merge_method: {method}", f"base_model: {base}", f"parameters: {shared}"]
    lines.append("dtype: float32")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- running

# A small helper process that starts the timed children. Linux carries a process's peak RSS across execve (the
# child of a fork inherits the parent's high-water mark), so children forked by this script, which holds the
# outputs it compares, would report this script's peak RSS instead of their own. Children forked by a fresh,
# small helper report their own.
SPAWNER = r"""
import json, os, subprocess, sys, time
for line in sys.stdin:
    job = json.loads(line)
    with open(job["log"], "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(job["cmd"], stdout=out, stderr=subprocess.STDOUT, env=job["env"], cwd=job["cwd"])
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024,
                      "returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""
_spawner: subprocess.Popen | None = None


def run_timed(cmd: list[str], env: dict, log: Path) -> dict:
    """Wall time, CPU time and peak RSS (bytes) of one child process (and the children it waited for)."""
    global _spawner
    if _spawner is None:
        _spawner = subprocess.Popen([sys.executable, "-c", SPAWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True)
    load = os.getloadavg()[0]
    _spawner.stdin.write(json.dumps({"cmd": cmd, "env": env, "log": str(log), "cwd": str(REPO)}) + "\n")
    _spawner.stdin.flush()
    result = json.loads(_spawner.stdout.readline())
    if result.pop("returncode") != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed; log {log}:\n{tail}")
    return {**result, "load_before": load, "load_after": os.getloadavg()[0]}


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def mergekit_cmd(exe: Path, recipe: Path, out: Path, threads: int, seed: int) -> list[str]:
    return [str(exe), str(recipe), str(out), "--no-copy-tokenizer", "--lazy-unpickle", "--quiet",
            "-j", str(threads), "--random-seed", str(seed)]


def ours_cmd(recipe: Path, out: Path, seed: int) -> list[str]:
    return [str(REPO / ".venv" / "bin" / "auto-merge"), "merge", str(recipe), str(out), "--overwrite",
            "--no-progress", "--seed", str(seed)]


# ---------------------------------------------------------------------------------------------------- comparing

class Checkpoint:
    """Tensors of a safetensors folder (single file or shards), read one at a time."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.handles = [safe_open(str(f), framework="pt") for f in sorted(Path(folder).glob("*.safetensors"))]
        if not self.handles:
            raise FileNotFoundError(f"no safetensors in {folder}")
        self.where = {name: h for h in self.handles for name in h.keys()}

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str):
        return self.where[name].get_tensor(name)


def compare_exact(a_dir: Path, b_dir: Path, base_dir: Path) -> dict:
    import torch

    a, b, base = Checkpoint(a_dir), Checkpoint(b_dir), Checkpoint(base_dir)
    if a.names() != b.names():
        raise AssertionError(f"different tensor names: {sorted(a.names() ^ b.names())[:5]}")
    max_abs, worst, n_diff, total, differing_tensors, dtypes = 0.0, "", 0, 0, 0, set()
    for name in sorted(a.names()):
        x, y = a.get(name), b.get(name)
        dtypes.add((str(x.dtype), str(y.dtype)))
        if x.shape != y.shape:
            raise AssertionError(f"{name}: shapes {tuple(x.shape)} vs {tuple(y.shape)}")
        x, y = x.float(), y.float()
        scale = torch.maximum(x.abs(), y.abs()).maximum(base.get(name).float().abs())
        diff = (x - y).abs()
        count = int((diff > ULP_FACTOR * scale).sum())
        n_diff += count
        differing_tensors += count > 0
        total += x.numel()
        m = float(diff.max())
        if m > max_abs:
            max_abs, worst = m, name
    return {"max_abs_diff": max_abs, "worst_tensor": worst, "n_differing": n_diff, "n_elements": total,
            "tensors_differing": differing_tensors, "dtypes": sorted(dtypes)}


def tensor_kind(name: str) -> str:
    parts = name.split(".")
    return ".".join("*" if part.isdigit() else part for part in parts)


def compare_per_tensor(a_dir: Path, b_dir: Path, base_dir: Path, sampled_above: int | None = None) -> dict:
    """Tensor by tensor: max abs difference and elements beyond fp32 rounding, the max over the model, and the
    same grouped by tensor kind. Tensors above `sampled_above` elements (arcee_fusion's randomly sampled quartiles)
    are compared by their keep/reset decisions instead (kept = differs from the base)."""
    import torch

    a, b, base = Checkpoint(a_dir), Checkpoint(b_dir), Checkpoint(base_dir)
    if a.names() != b.names():
        raise AssertionError(f"different tensor names: {sorted(a.names() ^ b.names())[:5]}")
    tensors = {}
    for name in sorted(a.names()):
        x, y, theta = a.get(name), b.get(name), base.get(name)
        if x.shape != y.shape:
            raise AssertionError(f"{name}: shapes {tuple(x.shape)} vs {tuple(y.shape)}")
        x, y, theta = x.float(), y.float(), theta.float()
        diff = (x - y).abs()
        row = {"numel": x.numel(), "max_abs_diff": float(diff.max()) if x.numel() else 0.0,
               "changed_mergekit": int((x != theta).sum()), "changed_ours": int((y != theta).sum())}
        if sampled_above is not None and x.numel() > sampled_above:
            kept_a, kept_b = x != theta, y != theta
            same = kept_a == kept_b
            row.update(sampled=True, decisions_differing=int((~same).sum()), kept_mergekit=int(kept_a.sum()),
                       kept_ours=int(kept_b.sum()),
                       max_abs_diff_same_decision=float(diff[same].max()) if bool(same.any()) else 0.0)
        else:
            scale = torch.maximum(x.abs(), y.abs()).maximum(theta.abs())
            row.update(sampled=False, n_differing=int((diff > ULP_FACTOR * scale).sum()),
                       n_not_identical=int((x != y).sum()))
        tensors[name] = row
    exact = {k: v for k, v in tensors.items() if not v["sampled"]}
    sampled = {k: v for k, v in tensors.items() if v["sampled"]}
    kinds: dict[str, dict] = {}
    for name, row in tensors.items():
        k = kinds.setdefault(tensor_kind(name), {"tensors": 0, "numel": row["numel"], "max_abs_diff": 0.0,
                                                 "tensors_not_identical": 0, "n_differing": 0,
                                                 "n_not_identical": 0, "sampled": row["sampled"],
                                                 "decisions_differing": 0, "kept_mergekit": 0, "kept_ours": 0,
                                                 "max_abs_diff_same_decision": 0.0, "elements": 0})
        k["tensors"] += 1
        k["elements"] += row["numel"]
        k["max_abs_diff"] = max(k["max_abs_diff"], row["max_abs_diff"])
        if row["sampled"]:
            for key in ("decisions_differing", "kept_mergekit", "kept_ours"):
                k[key] += row[key]
            k["max_abs_diff_same_decision"] = max(k["max_abs_diff_same_decision"], row["max_abs_diff_same_decision"])
        else:
            k["n_differing"] += row["n_differing"]
            k["n_not_identical"] += row["n_not_identical"]
            k["tensors_not_identical"] += row["n_not_identical"] > 0
    worst = max(exact, key=lambda n: exact[n]["max_abs_diff"]) if exact else ""
    return {
        "max_abs_diff": exact[worst]["max_abs_diff"] if exact else 0.0, "worst_tensor": worst,
        "n_differing": sum(r["n_differing"] for r in exact.values()),
        "n_not_identical": sum(r["n_not_identical"] for r in exact.values()),
        "n_elements": sum(r["numel"] for r in exact.values()),
        "tensors_exact": len(exact), "tensors_not_identical": sum(r["n_not_identical"] > 0 for r in exact.values()),
        "tensors_sampled": len(sampled), "n_elements_sampled": sum(r["numel"] for r in sampled.values()),
        "decisions_differing": sum(r["decisions_differing"] for r in sampled.values()),
        "kept_mergekit": sum(r["kept_mergekit"] for r in sampled.values()),
        "kept_ours": sum(r["kept_ours"] for r in sampled.values()),
        "max_abs_diff_same_decision": max((r["max_abs_diff_same_decision"] for r in sampled.values()), default=0.0),
        "changed_mergekit": sum(r["changed_mergekit"] for r in tensors.values()),
        "changed_ours": sum(r["changed_ours"] for r in tensors.values()),
        "kinds": kinds, "tensors": tensors,
    }


def print_kinds(method: str, comparison: dict) -> None:
    total = sum(r["numel"] for r in comparison["tensors"].values())
    print(f"\n{method}: max abs diff {comparison['max_abs_diff']:.3g} over {comparison['tensors_exact']} tensors "
          f"compared exactly ({comparison['n_not_identical']} of {comparison['n_elements']} elements not "
          f"bit-identical); elements changed from the base: mergekit {comparison['changed_mergekit'] / total:.4f}, "
          f"ours {comparison['changed_ours'] / total:.4f}")
    print("per tensor kind (max abs diff = max over the kind's tensors; 'not identical' = any bit differs)")
    rows = []
    for kind, k in comparison["kinds"].items():
        if k["sampled"]:
            n = k["elements"]
            detail = (f"(sampled quartiles) decisions differ {k['decisions_differing']} / {n} "
                      f"({k['decisions_differing'] / n:.2e}); kept {k['kept_mergekit'] / n:.4f} vs "
                      f"{k['kept_ours'] / n:.4f}; max diff where same decision {k['max_abs_diff_same_decision']:.3g}")
            rows.append([kind, k["tensors"], k["numel"], f"{k['max_abs_diff']:.3g}", "-", "-", detail])
        else:
            rows.append([kind, k["tensors"], k["numel"], f"{k['max_abs_diff']:.3g}",
                         f"{k['tensors_not_identical']} / {k['tensors']}",
                         f"{k['n_not_identical']} / {k['elements']}", f"beyond 8 ulp: {k['n_differing']}"])
    print_table(rows, ["tensor kind", "tensors", "elements each", "max abs diff", "tensors not identical",
                       "elements not identical", "note"])


def compare_statistics(a_dir: Path, b_dir: Path, base_dir: Path) -> dict:
    """For random methods: per tensor, the share of entries equal to the base and the task vector's norm."""
    a, b, base = Checkpoint(a_dir), Checkpoint(b_dir), Checkpoint(base_dir)
    if a.names() != b.names():
        raise AssertionError(f"different tensor names: {sorted(a.names() ^ b.names())[:5]}")
    kept_a = kept_b = total = 0
    worst_kept, worst_norm, sq_a, sq_b = 0.0, 0.0, 0.0, 0.0
    for name in sorted(a.names()):
        theta = base.get(name).float()
        da, db = a.get(name).float() - theta, b.get(name).float() - theta
        ka, kb = int((da != 0).sum()), int((db != 0).sum())
        kept_a, kept_b, total = kept_a + ka, kept_b + kb, total + theta.numel()
        worst_kept = max(worst_kept, abs(ka - kb) / theta.numel())
        na, nb = float(da.norm()), float(db.norm())
        sq_a, sq_b = sq_a + na * na, sq_b + nb * nb
        if na > 0 and nb > 0:
            worst_norm = max(worst_norm, abs(math.log(na / nb)))
    return {"changed_share_mergekit": kept_a / total, "changed_share_ours": kept_b / total,
            "max_changed_share_gap": worst_kept, "max_task_vector_norm_ratio": math.exp(worst_norm),
            "task_vector_norm_ratio": math.sqrt(sq_b / sq_a) if sq_a else float("nan"),
            "n_elements": total}


# ---------------------------------------------------------------------------------------------------- report

def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("170m", "tiny"), default="170m",
                        help="model shape (7b is in-memory only: 4 fp32 checkpoints would take 108 GB)")
    parser.add_argument("--seed", type=int, default=0, help="models' seed and the random methods' seed")
    parser.add_argument("--models-root", type=Path, default=make_models.DEFAULT_ROOT)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="recipes, outputs and logs")
    parser.add_argument("--mergekit-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side and method (the minimum is shown)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS),
                        help=f"default: {' '.join(DEFAULT_METHODS)}")
    parser.add_argument("--skip-mergekit", action="store_true", help="run our side only (no comparison)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    models = make_models.ensure_models(args.config, args.seed, args.models_root)
    exe = None if args.skip_mergekit else ensure_mergekit_venv(args.mergekit_venv.expanduser())
    work = args.work_dir.expanduser()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = thread_env(args.threads)

    # Interpreter start + imports alone, for context (both are inside every wall time below).
    startup = {"ours": run_timed([str(REPO / ".venv/bin/auto-merge"), "merge", "--help"], env,
                                 work / "logs" / "ours-help.log")["wall_s"]}
    if exe is not None:
        startup["mergekit"] = run_timed([str(exe), "--help"], env, work / "logs" / "mergekit-help.log")["wall_s"]

    print(f"models: {models} ({make_models.n_params(args.config) / 1e6:.1f}M params each, fp32, base + 3 experts)")
    for method in args.methods:
        if method in SELECTIVE_RECIPES:
            n_experts, shared = SELECTIVE_RECIPES[method]
            print(f"  {method}: base + {', '.join(make_models.EXPERTS[:n_experts])}, parameters {shared or '{}'}")
    print(f"threads: {args.threads} (of {os.cpu_count()} CPUs); repeats: {args.repeats}; "
          f"start-up only: " + ", ".join(f"{k} {v:.1f} s" for k, v in startup.items()), flush=True)

    results = {}
    for method in args.methods:
        recipe = work / f"{method}.yml"
        recipe.write_text(recipe_text(method, models))
        outs = {"mergekit": work / "out" / f"{method}-mergekit", "ours": work / "out" / f"{method}-ours"}
        runs: dict[str, list[dict]] = {"mergekit": [], "ours": []}
        for rep in range(args.repeats):
            order = ("mergekit", "ours") if rep % 2 == 0 else ("ours", "mergekit")
            for side in order:
                if side == "mergekit" and exe is None:
                    continue
                out = outs[side]
                if out.exists():
                    shutil.rmtree(out)
                out.parent.mkdir(parents=True, exist_ok=True)
                cmd = (mergekit_cmd(exe, recipe, out, args.threads, args.seed) if side == "mergekit"
                       else ours_cmd(recipe, out, args.seed))
                run = run_timed(cmd, env, work / "logs" / f"{method}-{side}-{rep}.log")
                runs[side].append(run)
                print(f"  {method:16s} {side:8s} run {rep}: {run['wall_s']:7.2f} s wall, {run['cpu_s']:7.2f} s CPU, "
                      f"peak RSS {fmt_bytes(run['peak_rss'])}, load {run['load_before']:.2f}->"
                      f"{run['load_after']:.2f}", flush=True)
        result = {"runs": runs}
        if exe is not None:
            if method == "dare_ties":
                result["statistics"] = compare_statistics(outs["mergekit"], outs["ours"], models / "base")
            elif method in SELECTIVE_RECIPES:
                result["comparison"] = compare_per_tensor(
                    outs["mergekit"], outs["ours"], models / "base",
                    FUSION_SAMPLED_ABOVE if method == "arcee_fusion" else None)
            else:
                result["comparison"] = compare_exact(outs["mergekit"], outs["ours"], models / "base")
        results[method] = result

    header = ["method", "mergekit s", "ours s", "speed-up", "mergekit CPU s", "ours CPU s", "mergekit peak RSS",
              "ours peak RSS", "max abs diff", "#elements differing", "load (1 min)", "goal"]
    rows = []
    for method, result in results.items():
        ours = min(result["runs"]["ours"], key=lambda r: r["wall_s"])
        loads = [r["load_before"] for side in result["runs"].values() for r in side]
        row = [method]
        if exe is not None:
            mk = min(result["runs"]["mergekit"], key=lambda r: r["wall_s"])
            speedup = mk["wall_s"] / ours["wall_s"]
            row += [f"{mk['wall_s']:.2f}", f"{ours['wall_s']:.2f}", f"{speedup:.1f}x", f"{mk['cpu_s']:.1f}",
                    f"{ours['cpu_s']:.1f}", fmt_bytes(mk["peak_rss"]), fmt_bytes(ours["peak_rss"])]
            if "comparison" in result:
                c = result["comparison"]
                row += [f"{c['max_abs_diff']:.3g}", f"{c['n_differing']} / {c['n_elements']}"]
                if c.get("tensors_sampled"):
                    row[-2] += f" ({c['tensors_exact']} tensors <= 1e6 el.)"
                    row[-1] += (f"; sampled {c['tensors_sampled']} tensors: decisions differ "
                                f"{c['decisions_differing']} / {c['n_elements_sampled']}")
            else:
                s = result["statistics"]
                row += [f"(random) changed {s['changed_share_mergekit']:.4f} vs {s['changed_share_ours']:.4f}",
                        f"|tv| ours/mergekit {s['task_vector_norm_ratio']:.4f} "
                        f"(per tensor within {s['max_task_vector_norm_ratio']:.3f}x)"]
            goal = GOALS.get(method)
            row += [f"{min(loads):.1f}-{max(loads):.1f}",
                    "-" if goal is None else (f">= {goal:g}x: " + ("met" if speedup >= goal else "MISSED"))]
        else:
            row += ["-", f"{ours['wall_s']:.2f}", "-", "-", f"{ours['cpu_s']:.1f}", "-", fmt_bytes(ours["peak_rss"]),
                    "-", "-", f"{min(loads):.1f}-{max(loads):.1f}", "-"]
        rows.append(row)
    print()
    print_table(rows, header)
    for method, result in results.items():
        if "kinds" in result.get("comparison", {}):
            print_kinds(method, result["comparison"])
    print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs); wall = min over {args.repeats} runs, CPU and RSS of that run")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": args.config, "threads": args.threads, "repeats": args.repeats,
                                         "startup_s": startup, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
