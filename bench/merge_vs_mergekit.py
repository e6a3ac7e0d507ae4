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
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
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
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
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
    print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs); wall = min over {args.repeats} runs, CPU and RSS of that run")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": args.config, "threads": args.threads, "repeats": args.repeats,
                                         "startup_s": startup, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
