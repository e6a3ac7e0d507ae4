"""The demo zoo: its world, its determinism, its checkpoints, its lm-eval tasks and its quality bar."""

from __future__ import annotations

import hashlib
import json
import os
import string
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from auto_merge.zoo import zoo_root
from auto_merge.zoo.build import MANIFEST, compare_with_shipped, ensure_zoo, recipe_fingerprint
from auto_merge.zoo.paths import SHIPPED_ROOT
from auto_merge.zoo.tasks import TASKS, task_files
from auto_merge.zoo.train import DEFAULT_RECIPE, ModelShape, Recipe
from auto_merge.zoo.world import SKILLS, build_world, eval_docs, sample_example

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo() -> Path:
    """The shipped zoo (seed 0): never trained by the tests."""
    return zoo_root(0)


def test_world_is_a_pure_function_of_the_seed():
    assert build_world(0) == build_world(0)
    assert build_world(0).colour_of != build_world(1).colour_of


def test_skills_use_disjoint_alphabets():
    import random

    world = build_world(0)
    rng = random.Random(0)
    alphabets = {}
    for skill in SKILLS:
        chars = set()
        for _ in range(300):
            prompt, answer = sample_example(world, skill, rng)
            chars |= set(prompt + answer)
        alphabets[skill] = chars
    assert alphabets["num"] <= set(string.digits + "=")
    assert alphabets["rev"] <= set(string.ascii_lowercase + ">")
    assert alphabets["col"] <= set(string.ascii_uppercase + "?")
    assert not (alphabets["num"] & alphabets["rev"] or alphabets["num"] & alphabets["col"]
                or alphabets["rev"] & alphabets["col"])


def test_reversal_eval_strings_are_never_trained_on():
    import random

    world = build_world(0)
    rng = random.Random(5)
    held_out = world.rev_test_set
    for source in ("rev", "rev-base"):
        trained = {sample_example(world, source, rng)[0][:-1] for _ in range(5000)}
        assert not trained & held_out
    assert len(held_out) == len(eval_docs(world, "rev")) == 300


def test_base_is_trained_on_half_of_the_facts():
    import random

    world = build_world(0)
    rng = random.Random(1)
    seen_names = {sample_example(world, "col-base", rng)[0][:-1] for _ in range(4000)}
    seen_keys = {sample_example(world, "num-base", rng)[0][:-1] for _ in range(4000)}
    assert seen_names == set(world.base_names) and len(seen_names) == 128
    assert seen_keys == set(world.base_keys) and len(seen_keys) == 128


def test_shipped_task_folder_is_the_generator_output_for_seed_0():
    folder = REPO / "custom_tasks" / "zoo"
    expected = task_files(build_world(0))
    for relative, content in expected.items():
        assert (folder / relative).read_text() == content, relative
    assert {p.name for p in folder.glob("*.yaml")} == {f"{name}.yaml" for name in TASKS}


def test_zoo_references_resolve_to_the_shipped_files_without_training(tmp_path, monkeypatch):
    import auto_merge.zoo.build as build
    from auto_merge.models.resolve import resolve_model_ref

    monkeypatch.setenv("AUTO_MERGE_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "ensure_zoo", lambda *a, **k: pytest.fail("a zoo was trained"))
    for name in ("base", "num", "rev", "col"):
        assert resolve_model_ref(f"zoo:{name}") == SHIPPED_ROOT / "seed0" / name
    assert zoo_root(0) == SHIPPED_ROOT / "seed0"
    assert not any(tmp_path.iterdir())


def test_shipped_zoo_is_the_recipe_and_world_of_seed_0():
    shipped = SHIPPED_ROOT / "seed0"
    manifest = json.loads((shipped / MANIFEST).read_text())
    assert manifest["seed"] == 0
    assert manifest["recipe"] == json.loads(json.dumps(DEFAULT_RECIPE.to_dict()))
    assert {"torch", "transformers", "cpu_capability"} <= set(manifest["built_with"])
    for relative, content in task_files(build_world(0)).items():
        assert (shipped / "tasks" / relative).read_text() == content, relative
    for name in ("base", "num", "rev", "col"):
        assert json.loads((shipped / name / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_a_rebuild_is_compared_file_for_file_with_the_shipped_zoo(tmp_path, monkeypatch, capsys):
    import shutil

    import auto_merge.zoo.build as build
    from auto_merge.cli import main

    copy = shutil.copytree(SHIPPED_ROOT / "seed0", tmp_path / "zoo")
    assert compare_with_shipped(copy, 0) == []
    assert compare_with_shipped(copy, 7) is None  # nothing shipped for seed 7
    monkeypatch.setattr(build, "ensure_zoo", lambda **kwargs: copy)
    assert main(["zoo", "build"]) == 0
    assert "equals the shipped zoo of seed 0" in capsys.readouterr().out

    weights = bytearray((copy / "num" / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # one bit of one weight, as another CPU's training would give
    (copy / "num" / "model.safetensors").write_bytes(bytes(weights))
    assert compare_with_shipped(copy, 0) == ["num/model.safetensors"]
    assert main(["zoo", "build"]) == 0
    out = capsys.readouterr().out
    assert "differs from the shipped zoo of seed 0 in 1 file(s): num/model.safetensors" in out
    assert "keeps using the shipped files" in out


def test_fingerprint_tracks_recipe_and_seed():
    tweaked = replace(DEFAULT_RECIPE, batch_size=32)
    assert recipe_fingerprint(DEFAULT_RECIPE, 0) == recipe_fingerprint(DEFAULT_RECIPE, 0)
    assert recipe_fingerprint(DEFAULT_RECIPE, 0) != recipe_fingerprint(DEFAULT_RECIPE, 1)
    assert recipe_fingerprint(DEFAULT_RECIPE, 0) != recipe_fingerprint(tweaked, 0)


def _tiny_recipe() -> Recipe:
    shape = ModelShape(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2)
    stages = tuple(replace(stage, steps=4) for stage in DEFAULT_RECIPE.stages)
    return Recipe(shape=shape, stages=stages, batch_size=8)


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def test_build_is_deterministic_and_atomic(tmp_path):
    first = ensure_zoo(seed=3, out=tmp_path / "a", recipe=_tiny_recipe(), show_progress=False)
    second = ensure_zoo(seed=3, out=tmp_path / "b", recipe=_tiny_recipe(), show_progress=False)
    assert _digests(first) == _digests(second)
    assert {"base/model.safetensors", "num/model.safetensors", "tasks/zoo_rev.yaml"} <= set(_digests(first))
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in tmp_path.iterdir())
    # A completed zoo is found again, not rebuilt.
    stamp = (first / "base" / "model.safetensors").stat().st_mtime_ns
    ensure_zoo(seed=3, out=first, recipe=_tiny_recipe(), show_progress=False)
    assert (first / "base" / "model.safetensors").stat().st_mtime_ns == stamp


def test_build_never_overwrites_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a zoo"):
        ensure_zoo(seed=3, out=tmp_path, recipe=_tiny_recipe(), show_progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_build_refuses_a_zoo_of_another_recipe_without_overwrite(tmp_path):
    root = ensure_zoo(seed=3, out=tmp_path / "z", recipe=_tiny_recipe(), show_progress=False)
    other = replace(_tiny_recipe(), batch_size=4)
    with pytest.raises(FileExistsError, match="--overwrite"):
        ensure_zoo(seed=3, out=root, recipe=other, show_progress=False)
    rebuilt = ensure_zoo(seed=3, out=root, recipe=other, overwrite=True, show_progress=False)
    assert json.loads((rebuilt / MANIFEST).read_text())["fingerprint"] == recipe_fingerprint(other, 3)


def test_zoo_models_are_plain_llama_checkpoints_that_generate(zoo, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    world = build_world(0)
    examples = {
        "num": next(iter(world.code_of.items())),
        "col": next(iter(world.colour_of.items())),
        "rev": (world.rev_test[0], world.rev_test[0][::-1]),
    }
    separators = {"num": "=", "col": "?", "rev": ">"}
    for name in ("base", "num", "rev", "col"):
        folder = zoo / name
        assert (folder / "model.safetensors").is_file()
        assert not list(folder.glob("*.bin"))
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 8
    for skill, (prompt, answer) in examples.items():
        model = AutoModelForCausalLM.from_pretrained(zoo / skill)
        tokenizer = AutoTokenizer.from_pretrained(zoo / skill)
        ids = tokenizer(prompt + separators[skill], return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
        assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == answer


def test_quality_bar_on_the_shipped_seed(zoo):
    """Each expert is a specialist, and some merge beats every single expert on the mean task score."""
    from auto_merge.zoo.report import EXPERT_MARGIN, run_report

    report = run_report(seed=0, samples=4)
    print(report.render())
    margins = report.expert_margins()
    assert all(m >= EXPERT_MARGIN for m in margins.values()), margins
    assert report.best_merge.mean > report.best_expert.mean, report.render()
    assert report.row("base").mean < report.best_expert.mean


def test_eval_command_scores_a_zoo_model_from_any_directory(zoo, tmp_path):
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "auto_merge.cli", "eval", "--model", "zoo:col", "--tasks", "zoo_col,zoo_col_mc",
         "--limit", "16", "--include-path", str(zoo / "tasks")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exact_match,none" in result.stdout and "acc,none" in result.stdout
    # The colour expert knows every colour: both tasks score 1.0 on the 16 examples.
    assert result.stdout.count("1.000") == 2, result.stdout
    assert time.perf_counter() - started < 300


def test_eval_command_rejects_an_unknown_task(zoo, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "auto_merge.cli", "eval", "--model", "zoo:base", "--tasks", "zoo_nope",
         "--include-path", str(zoo / "tasks")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2
    assert "unknown task(s) zoo_nope" in result.stderr


def test_zoo_tasks_are_registered_through_lm_evals_own_include_path(zoo):
    """A plain lm-eval TaskManager (no auto-merge code) finds and loads the tasks, data resolved from the folder."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(REPO / "custom_tasks" / "zoo"), include_defaults=False)
    loaded = manager.load(["zoo_rev"])
    docs = list(loaded["tasks"]["zoo_rev"].test_docs())
    assert len(docs) == 300 and docs[0]["answer"] == docs[0]["prompt"][:-1][::-1]


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
