"""Benchmark: mergekit's own example recipes, run by mergekit 0.1.5 and by `auto-merge merge` (parity, not speed).

    .venv/bin/python bench/mergekit_examples.py [--mergekit-repo /work/.mirror/arcee-ai+mergekit/repo]
        [--mergekit-venv ~/.cache/auto-merge/mergekit-venv] [--work-dir /tmp/mk_examples] [--threads 1]
        [--only NAME ...] [--json bench/results/mergekit_examples.json]

The recipes are read from a git checkout (bare is fine) of mergekit's repository, at `--rev` (default HEAD):
`examples/*.yml` and every ```yaml block of `docs/*.md` and `README.md` (21 in the snapshot this was written
against). Each is one row of the table. Recipes that need what small local Llama models cannot give (MoE
assembly, mergekit-evolve genomes, blocks elided with `...`, fragments that are one key of a recipe, a method
that exists only as the doc's example code) are listed as "n/a" with the reason; the others are run.

Substitutions (nothing else in a recipe is changed, comments included):
- Hugging Face ids become local folders of the same role (table SUBSTITUTIONS below, per recipe). Recipes written
  for Llama-2-13B (40 layers: examples linear, ties, gradient-slerp, orcamini-platy-44layer) use a 40-layer
  synthetic family built with `bench/make_models.py` (config "mk40": hidden 64, MLP 256, 4 heads, vocab 69,
  fp32; base + 3 experts = base + seeded noise with |delta|/|theta| = 0.05) so that their layer ranges
  ([0, 40], [0, 24] + [20, 40]) and gradients stay as written; the demo zoo's tokenizer (vocab 69) is copied into
  those folders. The others (Mistral-7B family, placeholders model_a/model_b) use the demo zoo
  (`auto-merge zoo path`: base/num/col/wrd, 8 layers, hidden 64, fp32); they have no layer ranges to remap.
- `dtype:` becomes `float32` (added to every document that has none).

Both tools run as subprocesses with OMP_NUM_THREADS=--threads: `mergekit-yaml RECIPE OUT --random-seed 0` (or
`mergekit-multi RECIPE -I DIR --out-path OUT --random-seed 0` for a file of several documents) and
`auto-merge merge RECIPE OUT --overwrite --no-progress --seed 0`. Then, per recipe: every tensor is compared (same
names and shapes; max abs difference; a deterministic tensor counts as equal when max |ours - mergekit| <= 1e-6 x
max |value| of the tensor, i.e. fp32 rounding of a different summation order; the count of elements differing by
more than 8 ulp of their own value is printed too), the tokenizer's vocabulary size (tokenizer.json, added tokens
included) and config.json's num_hidden_layers. For a multi-stage file the intermediate stages are compared as well
(mergekit's -I folder against the folders auto-merge prints). Random methods (dare_*, della*, breadcrumbs*) cannot
match element by element with different generators: for them the table gives statistics instead, per side the
fraction of entries that differ from the base model and the norm of (merged - base) relative to the base.

auto-merge status: "ran", "error: <last line>" (a clean error message, exit code != 0), or "CRASH" (a Python
traceback). mergekit status: "ran" or "error: <last line>".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_models  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VENV = Path(os.environ.get("AUTO_MERGE_MERGEKIT_VENV", "~/.cache/auto-merge/mergekit-venv")).expanduser()
DEFAULT_MK_REPO = Path("/work/.mirror/arcee-ai+mergekit/repo")
DEFAULT_WORK = Path("/tmp/mk_examples")
# Deterministic tensors count as equal when max |ours - mergekit| <= RTOL * max |value| of that tensor (fp32
# rounding of a different summation order; elementwise differences of a few ulp of the summands are expected).
RTOL = 1e-6
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties")

# 40 layers like Llama-2-13B, so that the 13B examples keep their layer ranges; vocab 69 = the zoo's tokenizer.
MK40 = dict(vocab_size=69, hidden_size=64, intermediate_size=256, num_hidden_layers=40, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64)

# Role of each Hugging Face id, per recipe. "zoo:X" = the demo zoo's model X, "mk40:X" = the 40-layer family.
LLAMA2_13B = {
    "TheBloke/Llama-2-13B-fp16": "mk40:base",
    "psmathur/orca_mini_v3_13b": "mk40:expert1",
    "garage-bAInd/Platypus2-13B": "mk40:expert2",
    "WizardLM/WizardLM-13B-V1.2": "mk40:expert3",
    "WizardLM/WizardMath-13B-V1.0": "mk40:expert3",
}
MISTRAL = {
    "mistralai/Mistral-7B-v0.1": "zoo:base",
    "mistralai/Mistral-7B-Instruct-v0.2": "zoo:num",
    "NousResearch/Hermes-2-Pro-Mistral-7B": "zoo:num",
    "BioMistral/BioMistral-7B": "zoo:wrd",
    "teknium/OpenHermes-2.5-Mistral-7B": "zoo:col",
}
SUBSTITUTIONS = {
    "examples/arcee_fusion.yml": {"model_a": "zoo:base", "model_b": "zoo:num"},
    "examples/bio-merge.yml": MISTRAL,
    "examples/gradient-slerp.yml": LLAMA2_13B,
    "examples/linear.yml": LLAMA2_13B,
    "examples/orcamini-platy-44layer.yml": LLAMA2_13B,
    "examples/ties.yml": LLAMA2_13B,
    "docs/multimerge.md#1": MISTRAL,
    "docs/create_a_merge_method.md#1": {"model1": "zoo:num", "model2": "zoo:wrd"},
}
# Why the others are not run.
NOT_APPLICABLE = {
    "docs/moe.md": "MoE assembly (mergekit-moe), not a merge recipe",
    "docs/evolve.md": "mergekit-evolve genome/tasks config (evolutionary search with lm-eval), not a merge recipe",
    "docs/multimerge.md#2": "outline with elided stages (`...`), not a complete recipe",
    "README.md": "fragment (one key of a recipe: tokenizer / tokenizer_source / chat_template), not a recipe",
}


@dataclass
class Recipe:
    name: str
    source: str        # file, "#N" for the N-th yaml block of a markdown file
    text: str
    applicable: bool
    reason: str = ""


@dataclass
class Row:
    name: str
    source: str
    mergekit: str = "n/a"
    ours: str = "n/a"
    max_diff: float | None = None
    note: str = ""
    details: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- recipes
def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def yaml_blocks(markdown: str) -> list[str]:
    blocks, current = [], None
    for line in markdown.splitlines():
        if current is None and re.match(r"^\s*```ya?ml\s*$", line):
            current = []
        elif current is not None and re.match(r"^\s*```\s*$", line):
            blocks.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def collect(repo: Path, rev: str) -> list[Recipe]:
    files = git(repo, "ls-tree", "-r", "--name-only", rev).splitlines()
    recipes = []
    for path in sorted(f for f in files if re.fullmatch(r"examples/[^/]+\.ya?ml", f)):
        name = Path(path).stem
        recipes.append(Recipe(name, path, git(repo, "show", f"{rev}:{path}"), path in SUBSTITUTIONS))
    for path in sorted(f for f in files if re.fullmatch(r"docs/[^/]+\.md", f)) + ["README.md"]:
        if path not in files:
            continue
        blocks = yaml_blocks(git(repo, "show", f"{rev}:{path}"))
        for index, text in enumerate(blocks, 1):
            source = f"{path}#{index}"
            name = f"{Path(path).stem}-{index}" if len(blocks) > 1 else Path(path).stem
            reason = NOT_APPLICABLE.get(source) or NOT_APPLICABLE.get(path, "")
            applicable = source in SUBSTITUTIONS
            if not applicable and not reason:
                reason = "no substitution table for this block (new in this mergekit revision?)"
            recipes.append(Recipe(name, source, text, applicable, reason))
    for recipe in recipes:
        if not recipe.applicable and not recipe.reason:
            recipe.reason = NOT_APPLICABLE.get(recipe.source, "no substitution table for this recipe")
    return recipes


def build_models(work: Path) -> dict[str, Path]:
    zoo = Path(subprocess.run([str(REPO / ".venv/bin/auto-merge"), "zoo", "path"], check=True, capture_output=True,
                              text=True).stdout.strip())
    make_models.CONFIGS["mk40"] = MK40
    mk40 = make_models.ensure_models("mk40", 0, work / "models", verbose=True)
    for sub in ("base",) + make_models.EXPERTS:
        for tok in ("tokenizer.json", "tokenizer_config.json"):
            if not (mk40 / sub / tok).exists():
                shutil.copy(zoo / "base" / tok, mk40 / sub / tok)
    roles = {f"zoo:{m}": zoo / m for m in ("base", "num", "col", "wrd")}
    roles.update({f"mk40:{m}": mk40 / m for m in ("base",) + make_models.EXPERTS})
    return roles


def substitute(recipe: Recipe, roles: dict[str, Path]) -> tuple[str, list[str]]:
    """The recipe's text with its model ids replaced by local folders and dtype float32; the substitutions made."""
    table = SUBSTITUTIONS[recipe.source]
    text, notes = recipe.text, []
    for hf_id in sorted(table, key=len, reverse=True):
        pattern = re.compile(r"(?<![\w/.-])" + re.escape(hf_id) + r"(?![\w/.-])")
        if pattern.search(text):
            text = pattern.sub(str(roles[table[hf_id]]), text)
            notes.append(f"{hf_id} -> {table[hf_id]}")
    documents = re.split(r"(?m)^---\s*$", text)
    out = []
    for doc in documents:
        if re.search(r"(?m)^dtype:", doc):
            doc = re.sub(r"(?m)^dtype:.*$", "dtype: float32", doc)
        elif doc.strip():
            doc = doc.rstrip("\n") + "\ndtype: float32\n"
        out.append(doc)
    return "---".join(out), notes


# ----------------------------------------------------------------------------------------------- running
def run(cmd: list[str], threads: int, log: Path) -> tuple[int, str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(["nice", "-n", "19", *cmd], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    log.write_text(" ".join(cmd) + "\n\n" + output)
    return proc.returncode, output, seconds


def last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1].removeprefix("error: ")[:300] if lines else "(no output)"


def status(rc: int, output: str, ours: bool) -> str:
    if rc == 0:
        return "ran"
    if ours and "Traceback (most recent call last)" in output:
        return "CRASH: " + last_line(output)
    return "error: " + last_line(output)


# ----------------------------------------------------------------------------------------------- comparing
def load(folder: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


def vocab_size(folder: Path):
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


def n_layers(folder: Path):
    path = folder / "config.json"
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    return config.get("num_hidden_layers", config.get("text_config", {}).get("num_hidden_layers"))


def compare(ours: Path, theirs: Path, base: Path | None, random: bool) -> dict:
    """Tensor-by-tensor comparison of two output folders (and metadata)."""
    import torch

    a, b = load(ours), load(theirs)
    result = {"tensors_ours": len(a), "tensors_mergekit": len(b),
              "only_ours": sorted(set(a) - set(b)), "only_mergekit": sorted(set(b) - set(a)),
              "vocab_ours": vocab_size(ours), "vocab_mergekit": vocab_size(theirs),
              "layers_ours": n_layers(ours), "layers_mergekit": n_layers(theirs),
              "shape_mismatch": [], "differing": [], "max_abs_diff": 0.0, "worst": None}
    ref = load(base) if (random and base is not None) else {}
    stats = {"changed_ours": 0, "changed_mergekit": 0, "elements": 0, "dn_ours": 0.0, "dn_mergekit": 0.0,
             "n_base": 0.0}
    for name in sorted(set(a) & set(b)):
        x, y = a[name].float(), b[name].float()
        if x.shape != y.shape:
            result["shape_mismatch"].append(f"{name}: {tuple(x.shape)} vs {tuple(y.shape)}")
            continue
        diff = (x - y).abs()
        worst = float(diff.max()) if diff.numel() else 0.0
        scale = float(torch.maximum(x.abs(), y.abs()).max()) if diff.numel() else 0.0
        beyond = int((diff > RTOL * scale).sum())
        ulp = torch.maximum(x.abs(), y.abs()).clamp_min(torch.finfo(torch.float32).tiny) * 2.0 ** -23
        result["elements_beyond_8ulp"] = result.get("elements_beyond_8ulp", 0) + int((diff > 8 * ulp).sum())
        result["elements"] = result.get("elements", 0) + diff.numel()
        if worst > result["max_abs_diff"]:
            result["max_abs_diff"] = worst
            result["worst"] = name
        if beyond:
            where = int(diff.flatten().argmax())
            result["differing"].append({"tensor": name, "max_abs_diff": worst, "elements": beyond,
                                        "numel": diff.numel(), "max_abs_value": scale, "at": where,
                                        "ours": float(x.flatten()[where]), "mergekit": float(y.flatten()[where])})
        if name in ref and ref[name].shape == x.shape:
            r = ref[name].float()
            stats["changed_ours"] += int((x != r).sum())
            stats["changed_mergekit"] += int((y != r).sum())
            stats["elements"] += x.numel()
            stats["dn_ours"] += float(((x - r) ** 2).sum())
            stats["dn_mergekit"] += float(((y - r) ** 2).sum())
            stats["n_base"] += float((r ** 2).sum())
    if random and stats["elements"]:
        result["random"] = {
            "changed_frac_ours": stats["changed_ours"] / stats["elements"],
            "changed_frac_mergekit": stats["changed_mergekit"] / stats["elements"],
            "rel_delta_norm_ours": math.sqrt(stats["dn_ours"] / stats["n_base"]),
            "rel_delta_norm_mergekit": math.sqrt(stats["dn_mergekit"] / stats["n_base"]),
        }
    return result


def magnitude_ties(document: dict, base: Path, tensor: str, index: int) -> list[str]:
    """For a TIES difference: each model's |delta| at that element and how many entries of the tensor share that
    exact magnitude (> 1: a tie in the top-k ranking, where which entries survive the trim is a tie-break)."""
    from safetensors.torch import load_file

    def read(folder: Path):
        for shard in sorted(folder.glob("*.safetensors")):
            part = load_file(str(shard))
            if tensor in part:
                return part[tensor].float()
        return None

    theta = read(base)
    hints = []
    for entry in document.get("models", []):
        folder = Path(entry["model"])
        if folder == base or not folder.is_absolute():
            continue
        other = read(folder)
        if other is None or theta is None:
            continue
        delta = (other - theta).abs().flatten()
        value = delta[index]
        rank = int((delta > value).sum())
        shared = int((delta == value).sum())
        hints.append(f"{folder.name}: |delta| {float(value):.9g}, {rank} entries larger, {shared} entries with "
                     f"exactly this magnitude" + (" (TIE)" if shared > 1 else ""))
    return hints


def summarise(cmp: dict, random: bool) -> tuple[bool, str]:
    problems = []
    if cmp["only_ours"] or cmp["only_mergekit"]:
        problems.append(f"tensor sets differ (only ours {len(cmp['only_ours'])}, only mergekit "
                        f"{len(cmp['only_mergekit'])})")
    if cmp["shape_mismatch"]:
        problems.append(f"{len(cmp['shape_mismatch'])} shape mismatches")
    if cmp["vocab_ours"] != cmp["vocab_mergekit"]:
        problems.append(f"vocab {cmp['vocab_ours']} vs {cmp['vocab_mergekit']}")
    if cmp["layers_ours"] != cmp["layers_mergekit"]:
        problems.append(f"num_hidden_layers {cmp['layers_ours']} vs {cmp['layers_mergekit']}")
    if not random and cmp["differing"]:
        n = sum(d["elements"] for d in cmp["differing"])
        problems.append(f"{len(cmp['differing'])} tensors / {n} elements differ by more than {RTOL:g} x max|value|")
    meta = f"vocab {cmp['vocab_ours']}/{cmp['vocab_mergekit']}, layers {cmp['layers_ours']}/{cmp['layers_mergekit']}"
    return (not problems), ("; ".join(problems) + "; " if problems else "") + meta


def stage_folders(output: str) -> dict[str, Path]:
    """Stage name -> output folder, from auto-merge's per-stage lines `LABEL: FOLDER: N tensors in ...`."""
    found = {}
    for line in output.splitlines():
        match = re.match(r"^(.+?): (/.+?): \d+ tensors in ", line)
        if match:
            found[match.group(1).removeprefix("stage ").strip("'\"")] = Path(match.group(2))
    return found


def run_recipe(recipe: Recipe, roles: dict[str, Path], args) -> Row:
    import yaml

    row = Row(recipe.name, recipe.source)
    if not recipe.applicable:
        row.note = "not applicable: " + recipe.reason
        return row
    work = args.work_dir / "runs" / recipe.name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    text, subs = substitute(recipe, roles)
    path = work / "recipe.yml"
    path.write_text(text)
    documents = [d for d in yaml.safe_load_all(text) if d]
    multi = len(documents) > 1
    methods = {d.get("merge_method") for d in documents}
    final = documents[-1] if multi else documents[0]
    for d in documents:
        if "name" not in d:
            final = d
    random = final.get("merge_method") in RANDOM_METHODS
    base = final.get("base_model")
    base_path = Path(base) if isinstance(base, str) and base.startswith("/") else None
    row.details.append("substitutions: " + ", ".join(subs) + "; dtype float32")
    row.data.update(recipe=str(path), substitutions=subs, methods=sorted(m for m in methods if m))

    ours_out, mk_out, mk_inter = work / "auto-merge", work / "mergekit", work / "mergekit-intermediate"
    mk_bin = args.mergekit_venv / "bin"
    if multi:
        mk_cmd = [str(mk_bin / "mergekit-multi"), str(path), "-I", str(mk_inter), "--out-path", str(mk_out)]
    else:
        mk_cmd = [str(mk_bin / "mergekit-yaml"), str(path), str(mk_out)]
    mk_cmd += ["--random-seed", "0", "--quiet"]
    rc, out, seconds = run(mk_cmd, args.threads, work / "mergekit.log")
    row.mergekit = status(rc, out, ours=False)
    row.data["mergekit_seconds"] = round(seconds, 1)
    ours_cmd = [str(REPO / ".venv/bin/auto-merge"), "merge", str(path), str(ours_out), "--overwrite", "--no-progress",
                "--seed", "0"]
    rc2, out2, seconds2 = run(ours_cmd, args.threads, work / "auto-merge.log")
    row.ours = status(rc2, out2, ours=True)
    row.data["auto_merge_seconds"] = round(seconds2, 1)
    if rc2 != 0 and "Traceback" in out2:
        tb = out2[out2.index("Traceback"):].strip().splitlines()
        row.details.append("auto-merge traceback (last lines):\n      " + "\n      ".join(tb[-8:]))
    if rc != 0 or rc2 != 0:
        row.note = ("both refuse it" if rc and rc2 else "only mergekit ran" if rc2 else "only auto-merge ran")
        if rc:
            row.details.append("mergekit: " + last_line(out))
        if rc2:
            row.details.append("auto-merge: " + last_line(out2))
        return row

    pairs = [("final", ours_out, mk_out, random, base_path)]
    if multi:
        folders = stage_folders(out2)
        for d in documents:
            name = d.get("name")
            if not name:
                continue
            d_random = d.get("merge_method") in RANDOM_METHODS
            d_base = d.get("base_model")
            d_base = Path(d_base) if isinstance(d_base, str) and d_base.startswith("/") else None
            if name in folders and (mk_inter / name).exists():
                pairs.insert(len(pairs) - 1, (f"stage {name}", folders[name], mk_inter / name, d_random, d_base))
            else:
                row.details.append(f"stage {name}: intermediate folder not found (ours {folders.get(name)}, "
                                   f"mergekit {mk_inter / name})")
    ok_all, notes, worst, ties_seen = True, [], 0.0, False
    for label, ours_dir, mk_dir, is_random, base_dir in pairs:
        cmp = compare(ours_dir, mk_dir, base_dir, is_random)
        ok, summary = summarise(cmp, is_random)
        row.data[label] = cmp
        method = next((d.get("merge_method") for d in documents
                       if (label == "final" and d is final) or label == f"stage {d.get('name')}"), "?")
        line = f"{label} ({method}{', random' if is_random else ''}): " + ("equal, " if ok and not is_random else "")
        line += f"max abs diff {cmp['max_abs_diff']:.3g}" + (f" (at {cmp['worst']})" if cmp["worst"] else "")
        if cmp.get("elements"):
            line += f", {cmp['elements_beyond_8ulp']}/{cmp['elements']} elements differ by > 8 ulp"
        line += f"; {summary}"
        if is_random and "random" in cmp:
            r = cmp["random"]
            line += (f"; entries != base: ours {r['changed_frac_ours']:.4f}, mergekit {r['changed_frac_mergekit']:.4f};"
                     f" |merged-base|/|base|: ours {r['rel_delta_norm_ours']:.4g}, mergekit "
                     f"{r['rel_delta_norm_mergekit']:.4g}")
        row.details.append(line)
        for d in cmp["differing"][:6] if not is_random else []:
            row.details.append(f"    {d['tensor']}: max abs diff {d['max_abs_diff']:.3g} at flat index {d['at']} "
                               f"(ours {d['ours']:.9g}, mergekit {d['mergekit']:.9g}; |value| up to "
                               f"{d['max_abs_value']:.3g}), {d['elements']}/{d['numel']} elements beyond tolerance")
            if method == "ties" and label == "final" and base_dir is not None:
                hints = magnitude_ties(final, base_dir, d["tensor"], d["at"])
                row.details += ["      " + h for h in hints]
                ties_seen |= any(h.endswith("(TIE)") for h in hints)
        if not is_random:
            worst = max(worst, cmp["max_abs_diff"])
            ok_all &= ok
            if not ok:
                n = sum(d["elements"] for d in cmp["differing"])
                notes.append(f"{label}: DIFFERS ({n} element{'s' * (n != 1)}"
                             + (", tied |delta| at the top-k cut-off)" if ties_seen else ")"))
        else:
            ok_all &= ok  # metadata/shape checks still apply
            notes.append(f"{label}: random ({method}), stats only" + ("" if ok else ", metadata DIFFERS"))
    row.max_diff = worst
    row.data["equal"] = ok_all
    row.note = ("equal" if ok_all and not notes else "; ".join(notes) if notes else "DIFFERS")
    if multi and ok_all:
        row.note = "deterministic stages equal; " + row.note
    return row


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-repo", type=Path, default=DEFAULT_MK_REPO)
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--mergekit-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="recipe names to run (the others are listed, not run)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work_dir = args.work_dir.resolve()

    rev = git(args.mergekit_repo, "rev-parse", args.rev).strip()
    mk_version = subprocess.run([str(args.mergekit_venv / "bin/python"), "-c",
                                 "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip()
    recipes = collect(args.mergekit_repo, rev)
    roles = build_models(args.work_dir)
    rows = []
    for recipe in recipes:
        if args.only and recipe.name not in args.only and recipe.applicable:
            continue
        print(f"... {recipe.name}", file=sys.stderr, flush=True)
        rows.append(run_recipe(recipe, roles, args))

    ran = [r for r in rows if r.mergekit == "ran" and r.ours == "ran"]
    applicable = [r for r in rows if not r.note.startswith("not applicable")]
    equal = [r for r in ran if r.data.get("equal")]
    crashes = [r for r in rows if r.ours.startswith("CRASH")]
    print(f"mergekit example recipes: {args.mergekit_repo} @ {rev[:12]}; mergekit {mk_version} "
          f"(mergekit-yaml / mergekit-multi) vs auto-merge merge; fp32, OMP_NUM_THREADS={args.threads}")
    print(f"models: demo zoo {roles['zoo:base'].parent} (8 layers); 40-layer family "
          f"{roles['mk40:base'].parent} (bench/make_models.py config mk40)\n")
    header = ("recipe", "source", "mergekit", "auto-merge", "max abs diff", "note")
    table = [header] + [(r.name, r.source, r.mergekit, r.ours,
                         "-" if r.max_diff is None else f"{r.max_diff:.3g}", r.note) for r in rows]
    widths = [min(max(len(str(t[i])) for t in table), 44) for i in range(5)]
    for t in table:
        print("  ".join((str(c) if len(str(c)) <= w else str(c)[:w - 3] + "...").ljust(w)
                        for c, w in zip(t[:5], widths)) + "  " + t[5])
    print(f"\n{len(ran)} of {len(applicable)} runnable recipes ran in both tools ({len(rows)} listed, "
          f"{len(rows) - len(applicable)} not applicable); {len(equal)} of {len(ran)} equal (deterministic tensors "
          f"within fp32 rounding, random stages by statistics, tokenizer vocab and num_hidden_layers equal); "
          f"{len(crashes)} auto-merge crash(es).")
    print("\nDetails")
    for r in rows:
        if r.details:
            print(f"- {r.name} ({r.source}): mergekit {r.data.get('mergekit_seconds', '-')} s, auto-merge "
                  f"{r.data.get('auto_merge_seconds', '-')} s")
            for line in r.details:
                print("    " + line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"mergekit_repo_rev": rev, "mergekit_version": mk_version, "rows": [
            {"name": r.name, "source": r.source, "mergekit": r.mergekit, "auto_merge": r.ours,
             "max_abs_diff": r.max_diff, "note": r.note, "details": r.details, "data": r.data} for r in rows]},
            indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
