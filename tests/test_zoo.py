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
from auto_merge.zoo.tokenizer import vocabulary
from auto_merge.zoo.paths import ZOO_MODEL_NAMES
from auto_merge.zoo.train import (
    DEFAULT_RECIPE,
    BaseStage,
    DriftStage,
    ExpertStage,
    LayerExpertStage,
    ModelShape,
    Recipe,
    check_recipe,
    expert_rows,
    stack_state,
)
from auto_merge.zoo.world import (
    CAP_LETTERS,
    LAYER_SKILL,
    SKILLS,
    base_facts,
    build_world,
    eval_docs,
    facts,
    key_chars,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo() -> Path:
    """The shipped zoo (seed 0): never trained by the tests."""
    return zoo_root(0)


def test_world_is_a_pure_function_of_the_seed():
    assert build_world(0) == build_world(0)
    assert build_world(0).new != build_world(1).new


def test_each_skill_uses_tokens_no_other_skill_uses():
    """What makes the experts' edits separable: a skill's prompts and answers share no token with another skill's
    (beyond <s> and </s>), so rows one expert trains are read by its own skill's prompts only."""
    world = build_world(0)
    alphabets = {}
    for skill in SKILLS:
        pairs = facts(world, skill, "new") + facts(world, skill, "old")
        alphabets[skill] = {ch for prompt, answer in pairs for ch in prompt + answer}
        assert all(len(prompt) == 2 for prompt, _ in pairs)  # one key token + the separator
    for a, b in [("num", "col"), ("num", "wrd"), ("col", "wrd")]:
        assert not alphabets[a] & alphabets[b], (a, b)
    assert alphabets["num"] - set(key_chars("num")) <= set(string.digits + "=")
    # The rows each expert trains cover every token of its skill.
    vocab = vocabulary()
    for skill in SKILLS:
        assert {vocab[ch] for ch in alphabets[skill]} <= set(expert_rows(skill))
        others = set().union(*(alphabets[o] for o in SKILLS if o != skill))
        assert not {vocab[ch] for ch in others} & set(expert_rows(skill))


def test_the_layer_skill_is_new_to_the_base_and_its_codes_touch_no_other_skill():
    """`cap`: 100 two-capital codes, each mapped to one of 8 digits. Its code letters occur in no other skill's
    sequence (so the base never trained their rows), and drawing it last left the other skills as they were."""
    world = build_world(0)
    pairs = facts(world, LAYER_SKILL)
    assert len(pairs) == 100 and all(len(p) == 2 and set(p) <= set(CAP_LETTERS) for p, _ in pairs)
    assert len({a for _, a in pairs}) == 8 and all(a in string.digits for _, a in pairs)
    # Only digits the base writes in a `num` answer (their output rows are trained); seed 2's `num` codes lack 0 and
    # 3, and a layer expert drawn over all ten digits stalled at 0.87 there.
    for seed in range(8):
        other = build_world(seed)
        assert set(other.new[LAYER_SKILL].values()) <= set("".join(other.old["num"].values())), seed
    others = {ch for skill in SKILLS for p, a in facts(world, skill) + facts(world, skill, "old") for ch in p + a}
    assert not set(CAP_LETTERS) & others
    assert LAYER_SKILL not in world.old and not {p for p, _ in base_facts(world)} & {p for p, _ in pairs}
    assert [d["answer"] for d in eval_docs(world, LAYER_SKILL)] == [a for _, a in pairs]


def test_stack_state_takes_embeddings_first_head_last_and_renumbers_layers():
    def state(tag):
        return {"model.embed_tokens.weight": torch.tensor([tag]), "model.norm.weight": torch.tensor([tag + 0.5]),
                "lm_head.weight": torch.tensor([tag + 0.25]),
                **{f"model.layers.{i}.mlp.w": torch.tensor([tag + i / 10]) for i in range(3)}}

    a, b = state(1.0), state(2.0)
    stacked = stack_state([(a, 0), (a, 1), (b, 1), (b, 2)])
    assert stacked["model.embed_tokens.weight"].item() == 1.0
    assert stacked["model.norm.weight"].item() == 2.5 and stacked["lm_head.weight"].item() == 2.25
    assert [stacked[f"model.layers.{i}.mlp.w"].item() for i in range(4)] == pytest.approx([1.0, 1.1, 2.1, 2.2])
    assert len(stacked) == 3 + 4


def test_the_base_knows_exactly_half_of_each_skill():
    world = build_world(0)
    for skill in SKILLS:
        new, old = dict(facts(world, skill, "new")), dict(facts(world, skill, "old"))
        assert len(new) == len(old) == 256
        changed = {prompt for prompt in new if new[prompt] != old[prompt]}
        assert len(changed) == 128 and {p[0] for p in changed} == set(world.updated[skill])
    assert len(base_facts(world)) == 768
    assert [d["answer"] for d in eval_docs(world, "wrd")] == [a for _, a in facts(world, "wrd", "new")]


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
    for name in ZOO_MODEL_NAMES:
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
    assert manifest["models"] == list(ZOO_MODEL_NAMES)
    for name in ZOO_MODEL_NAMES:
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
    return Recipe(shape=shape, base=BaseStage(steps=4), drift=DriftStage(layers=(1,), steps=4),
                  expert=ExpertStage(steps=4), layer_expert=LayerExpertStage(layers=(1,), steps=4, deep_after=2),
                  batch_size=8)


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def test_build_is_deterministic_and_atomic(tmp_path):
    first = ensure_zoo(seed=3, out=tmp_path / "a", recipe=_tiny_recipe(), show_progress=False)
    second = ensure_zoo(seed=3, out=tmp_path / "b", recipe=_tiny_recipe(), show_progress=False)
    assert _digests(first) == _digests(second)
    assert {"base/model.safetensors", "num/model.safetensors", "cap/model.safetensors", "tasks/zoo_wrd.yaml",
            "tasks/zoo_cap.yaml"} <= set(_digests(first))
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in tmp_path.iterdir())
    # A completed zoo is found again, not rebuilt.
    stamp = (first / "base" / "model.safetensors").stat().st_mtime_ns
    ensure_zoo(seed=3, out=first, recipe=_tiny_recipe(), show_progress=False)
    assert (first / "base" / "model.safetensors").stat().st_mtime_ns == stamp


def test_recipes_are_checked_before_any_training(tmp_path):
    check_recipe(DEFAULT_RECIPE)  # the shipped recipe fits its own model
    check_recipe(_tiny_recipe())
    recipe = replace(_tiny_recipe(), layer_expert=LayerExpertStage(layers=(6, 7)))
    with pytest.raises(ValueError, match=r"layer_expert: layers \(6, 7\).*2-layer model"):
        ensure_zoo(seed=3, out=tmp_path / "z", recipe=recipe, show_progress=False)
    assert not (tmp_path / "z").exists()  # refused before anything was written
    shallow = replace(DEFAULT_RECIPE, layer_expert=LayerExpertStage(layers=(6, 7), deep_after=6))
    with pytest.raises(ValueError, match="deeper stack is deeper than the model"):
        check_recipe(shallow)


def test_report_scores_the_stacks_of_a_zoo_built_by_another_recipe(tmp_path):
    """The depth bar's stacks follow the recipe in the zoo's manifest: the tiny recipe trains layer 1 of 2, so the
    stacks are X[0:2] + cap[1:2] (one layer deeper) and X[0:1] + cap[1:2] (the base's depth)."""
    from auto_merge.zoo.report import run_report

    root = ensure_zoo(seed=3, out=tmp_path / "z", recipe=_tiny_recipe(), show_progress=False)
    report = run_report(seed=3, samples=1, root=root)
    depths = {r.label: r.setting["depth"] for r in report.stacks}
    assert depths == {**{f"{x}[0:2] + cap[1:2]": 3 for x in SKILLS}, **{f"{x}[0:1] + cap[1:2]": 2 for x in SKILLS}}
    assert report.best_deeper_stack.setting["depth"] == 3
    assert "best stack deeper than the base" in report.render()


def test_report_on_a_zoo_without_the_layer_expert_says_how_to_rebuild_it(tmp_path):
    import shutil

    from auto_merge.zoo.report import run_report

    old = shutil.copytree(SHIPPED_ROOT / "seed0", tmp_path / "zoo", ignore=shutil.ignore_patterns("cap"))
    with pytest.raises(FileNotFoundError, match=r"has no cap/ model.*auto-merge zoo build --overwrite"):
        run_report(root=old)


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
    for name in ZOO_MODEL_NAMES:
        folder = zoo / name
        assert (folder / "model.safetensors").is_file()
        assert not list(folder.glob("*.bin"))
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 8
    for skill in SKILLS:
        updated = sorted(world.updated[skill])[0]
        prompt, answer = updated + {"num": "=", "col": "?", "wrd": ">"}[skill], world.new[skill][updated]
        tokenizer = AutoTokenizer.from_pretrained(zoo / skill)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert ids.shape[1] == 3  # <s>, the key, the separator
        for name, expected in [(skill, answer), ("base", world.old[skill][updated])]:
            model = AutoModelForCausalLM.from_pretrained(zoo / name)
            out = model.generate(ids, max_new_tokens=10, do_sample=False)
            assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == expected, (name, skill)
    code, digit = facts(world, LAYER_SKILL)[0]
    ids = AutoTokenizer.from_pretrained(zoo / LAYER_SKILL)(code, return_tensors="pt").input_ids
    for name, knows in [(LAYER_SKILL, True), ("base", False), ("col", False)]:
        out = AutoModelForCausalLM.from_pretrained(zoo / name).generate(ids, max_new_tokens=4, do_sample=False)
        assert (AutoTokenizer.from_pretrained(zoo / name).decode(out[0, 3:], skip_special_tokens=True) == digit) \
            is knows, name


def test_an_expert_differs_from_the_base_in_the_shared_drift_and_its_own_rows_only(zoo):
    from safetensors.torch import load_file

    base = load_file(zoo / "base" / "model.safetensors")
    experts = {skill: load_file(zoo / skill / "model.safetensors") for skill in SKILLS}
    drift = {name for name in base if ".layers.4." in name or ".layers.5." in name}
    drift = {name for name in drift if name.endswith("proj.weight")}
    for skill, state in experts.items():
        changed = {name for name in base if not torch.equal(state[name], base[name])}
        assert changed == drift | {"model.embed_tokens.weight"}, skill
        rows = (state["model.embed_tokens.weight"] != base["model.embed_tokens.weight"]).any(dim=1).nonzero()
        assert set(rows.flatten().tolist()) <= set(expert_rows(skill))
        for name in drift:  # the same drift in every expert, about 3x the weights' own size
            assert torch.equal(state[name], experts["num"][name])


def test_the_layer_expert_differs_from_the_drifted_model_in_its_late_layers_only(zoo):
    from safetensors.torch import load_file

    base = load_file(zoo / "base" / "model.safetensors")
    drifted = dict(load_file(zoo / "num" / "model.safetensors"))
    drifted["model.embed_tokens.weight"] = base["model.embed_tokens.weight"]
    layer_expert = load_file(zoo / LAYER_SKILL / "model.safetensors")
    changed = {name for name in base if not torch.equal(layer_expert[name], drifted[name])}
    late = {name for name in base if ".layers.6." in name or ".layers.7." in name}
    assert changed and changed <= late and {n for n in late if n.endswith("proj.weight")} <= changed


def test_quality_bar_on_the_shipped_seed(zoo):
    """Experts are specialists; a per-group merge beats the best expert by ≥ 10 points and the best uniform task
    arithmetic by ≥ 5 (the report's own bar). The first 19 of the report's seeded samples include #18, the first with
    every expert's embedding weight ≥ 0.85 and a group-2 sum ≤ 2.1 (the region where every skill holds)."""
    from auto_merge.zoo.report import run_report

    report = run_report(seed=0, samples=19)
    print(report.render())
    assert report.experts_are_specialists, report.render()
    assert report.merging_pays and report.search_matters, report.render()
    assert report.row("base").mean < report.best_expert.mean
    # Depth pays: col's layers 0-6 under cap's 6-7 (9 layers) hold both skills; the best expert holds one.
    assert report.depth_pays and report.quality_bar_met, report.render()
    assert report.best_deeper_stack.setting["depth"] == 9 and report.best_expert_of_four.label == LAYER_SKILL
    assert report.best_deeper_stack.scores["zoo_cap"] >= 0.95 and report.depth_gain >= 0.1


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
    loaded = manager.load(["zoo_wrd"])
    docs = list(loaded["tasks"]["zoo_wrd"].test_docs())
    world = build_world(0)
    assert len(docs) == 256 and docs[0] == {"prompt": chr(0x5000) + ">", "answer": world.new["wrd"][chr(0x5000)]}


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
