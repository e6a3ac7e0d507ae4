"""Building the zoo: train base + experts, save them as Hugging Face checkpoints, cached by recipe.

A built zoo is a folder with one subfolder per model (`base`, `num`, `col`, `wrd`, `cap`, each loadable with
`AutoModelForCausalLM.from_pretrained`), `tasks/` (the lm-eval task folder for this zoo's world) and `zoo.json`
(recipe, fingerprint, timings). It is written to a temporary folder and renamed into place, so a crash never
leaves a half-built zoo that looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from auto_merge.output_dirs import clean_stale_temporaries
from auto_merge.zoo.paths import ZOO_MODEL_NAMES, cache_root, shipped_zoo_dir
from auto_merge.zoo.train import (
    DEFAULT_RECIPE,
    Recipe,
    check_recipe,
    llama_config,
    train_base,
    train_drift,
    train_expert,
    train_layer_expert,
)
from auto_merge.zoo.world import build_world

MANIFEST = "zoo.json"
_FINGERPRINTED_SOURCES = ("world.py", "train.py", "tokenizer.py", "tasks.py")


def recipe_fingerprint(recipe: Recipe = DEFAULT_RECIPE, seed: int = 0) -> str:
    """Changes whenever the recipe, the seed or the code that defines the data and training changes."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"recipe": recipe.to_dict(), "seed": seed}, sort_keys=True).encode())
    here = Path(__file__).parent
    for name in _FINGERPRINTED_SOURCES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


def default_zoo_dir(seed: int = 0, cache_dir=None, recipe: Recipe = DEFAULT_RECIPE) -> Path:
    return cache_root(cache_dir) / "zoo" / f"seed{seed}-{recipe_fingerprint(recipe, seed)[:12]}"


def is_complete(root: Path, fingerprint: str) -> bool:
    manifest = root / MANIFEST
    if not manifest.is_file():
        return False
    return json.loads(manifest.read_text()).get("fingerprint") == fingerprint


def ensure_zoo(seed: int = 0, cache_dir=None, build: bool = True, out: Path | None = None,
               recipe: Recipe = DEFAULT_RECIPE, overwrite: bool = False, show_progress: bool = True) -> Path:
    """Return a built zoo folder, building it when missing or when its recipe changed."""
    check_recipe(recipe)
    fingerprint = recipe_fingerprint(recipe, seed)
    root = Path(out) if out is not None else default_zoo_dir(seed, cache_dir, recipe)
    if is_complete(root, fingerprint):
        return root
    if not build:
        raise FileNotFoundError(f"the demo zoo (seed {seed}) is not built at {root}; run `auto-merge zoo build`")
    if root.exists() and any(root.iterdir()) and not overwrite:
        if not (root / MANIFEST).is_file():
            raise FileExistsError(f"{root} exists and is not a zoo; choose another --out or pass --overwrite")
        if out is not None:
            raise FileExistsError(
                f"{root} holds a zoo built from another recipe or seed; pass --overwrite to rebuild it"
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):
        if is_complete(root, fingerprint):  # another process built it while we waited
            return root
        clean_stale_temporaries(root)  # what a killed build left
        tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _build_into(tmp, seed, recipe, fingerprint, show_progress)
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


@contextlib.contextmanager
def _build_lock(root: Path):
    lock_path = root.with_name(f".{root.name}.lock")
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_into(folder: Path, seed: int, recipe: Recipe, fingerprint: str, show_progress: bool) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from auto_merge.zoo.tasks import write_task_folder
    from auto_merge.zoo.world import LAYER_SKILL, SKILLS

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # one build bar is enough; no per-save shard bars
    world = build_world(seed)
    folder.mkdir(parents=True)
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    # One thread: float reductions in one fixed order, whatever the machine's core count.
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    report = {"stages": {}}
    started = time.perf_counter()
    try:
        with tqdm(total=recipe.total_steps, desc="zoo build", unit="step", disable=not show_progress,
                  dynamic_ncols=True) as bar:

            def run(name, train, *args):
                bar.set_description(f"zoo build: {name}")
                stage_start = time.perf_counter()

                def tick(n, loss):
                    bar.update(n)
                    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

                state, losses = train(world, recipe, seed, *args, progress=tick)
                report["stages"][name] = {
                    "seconds": round(time.perf_counter() - stage_start, 2),
                    "final_loss": round(sum(losses[-20:]) / min(20, len(losses)), 5),
                }
                return state

            base = run("base", train_base)
            _save(folder / "base", base, recipe)
            drifted = run("drift", train_drift, base)  # the experts' shared starting point; not shipped
            for skill in SKILLS:
                _save(folder / skill, run(skill, train_expert, base, drifted, skill), recipe)
            _save(folder / LAYER_SKILL, run(LAYER_SKILL, train_layer_expert, base, drifted), recipe)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)
    missing = [name for name in ZOO_MODEL_NAMES if not (folder / name / "model.safetensors").is_file()]
    if missing:
        raise RuntimeError(f"zoo recipe did not produce models {missing}")
    write_task_folder(folder / "tasks", world)
    report.update(
        fingerprint=fingerprint,
        seed=seed,
        recipe=recipe.to_dict(),
        build_seconds=round(time.perf_counter() - started, 2),
        models=list(ZOO_MODEL_NAMES),
        torch_threads=1,
        built_with=build_environment(),
    )
    (folder / MANIFEST).write_text(json.dumps(report, indent=2) + "\n")


def _save(folder: Path, state: dict, recipe: Recipe) -> None:
    """One model as an ordinary Hugging Face checkpoint, with the zoo's tokenizer and greedy generation settings."""
    from transformers import GenerationConfig, LlamaForCausalLM

    from auto_merge.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer

    model = LlamaForCausalLM(llama_config(recipe.shape))
    model.load_state_dict(state)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False, max_new_tokens=10
    )
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)


def build_environment() -> dict:
    """What training results depend on besides the recipe: library versions and the CPU kernels torch picked."""
    import platform

    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
    }


# Files whose bytes define a zoo (the manifest records timings and is left out).
_DEFINING_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def compare_with_shipped(root: Path, seed: int = 0) -> list[str] | None:
    """The files of the zoo at ``root`` that differ from the shipped zoo of ``seed`` (empty: identical), or None
    when no zoo is shipped for that seed."""
    shipped = shipped_zoo_dir(seed)
    if shipped is None:
        return None
    relative = [f"{model}/{name}" for model in ZOO_MODEL_NAMES for name in _DEFINING_FILES]
    relative += sorted(p.relative_to(shipped).as_posix() for p in (shipped / "tasks").rglob("*") if p.is_file())
    differing = []
    for name in relative:
        mine, theirs = Path(root) / name, shipped / name
        if not (mine.is_file() and theirs.is_file()) or mine.read_bytes() != theirs.read_bytes():
            differing.append(name)
    return differing
