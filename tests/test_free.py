"""FREE-Merging (`auto-merge free`): expert selection in closed form, the recipe's validation, the folder it writes,
materialised task models, and per-task scores on the demo zoo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from auto_merge.cli import main
from auto_merge.config.errors import ConfigError
from auto_merge.merge.free import (
    ExpertParams,
    apply_expert,
    auto_scale,
    build_expert,
    load_free_recipe,
    read_expert,
    select_expert,
)
from auto_merge.merge.free_folder import FreeFolder
from auto_merge.merge.methods.fourier import fourier_high_pass
from auto_merge.zoo import zoo_root

torch.set_num_threads(1)

TASKS = {"zoo_num": "zoo:num", "zoo_wrd": "zoo:wrd", "zoo_col": "zoo:col"}
# The zoo's matrices are 64 wide, so the default density 0.01 keeps nothing per row (⌊0.64⌋ = 0); these are the
# settings measured in the README (backbone weight 0.35; per row, the top half, scale 1, added to the backbone).
EXPERT = {"density": 0.5, "axis": "row", "scale": 1.0, "combine": "add"}
BACKBONE = {"weight": 0.35, "lambda": 1.0}
LIMIT = 64


# --------------------------------------------------------------------------------------- selection, closed form
def test_per_row_selection_keeps_the_top_entries_of_each_row_after_removing_the_largest():
    delta = torch.tensor([[0.1, -5.0, 0.3, 2.0, -0.2],
                          [4.0, 0.0, -0.5, 0.6, 3.0]])
    # n = 5 per row: density 0.4 keeps 2, remove 0.2 drops the largest 1 first.
    assert select_expert(delta, 0.4, 0.0, "row").tolist() == [1, 3, 5, 9]
    assert select_expert(delta, 0.4, 0.2, "row").tolist() == [2, 3, 8, 9]
    # ⌊0.1 · 5⌋ = 0 per row: nothing; the whole tensor (n = 10) keeps 1.
    assert select_expert(delta, 0.1, 0.0, "row").numel() == 0
    assert select_expert(delta, 0.1, 0.0, "tensor").tolist() == [1]


def test_per_tensor_selection_ranks_the_flattened_tensor_and_floors_the_counts():
    delta = torch.tensor([[0.1, -5.0, 0.3, 2.0, -0.2],
                          [4.0, 0.0, -0.5, 0.6, 3.0]])
    assert select_expert(delta, 0.3, 0.0, "tensor").tolist() == [1, 5, 9]  # |−5|, 4, 3
    assert select_expert(delta, 0.3, 0.2, "tensor").tolist() == [3, 8, 9]  # drops −5 and 4, keeps 3, 2, 0.6
    assert select_expert(delta, 0.29, 0.0, "tensor").tolist() == [1, 5]  # ⌊2.9⌋ = 2
    assert select_expert(delta, 0.7, 0.0, "tensor").tolist() == [1, 2, 3, 5, 7, 8, 9]
    # 0.29 · 100 is 28.999999999999996 in floating point: the count is still 29.
    assert select_expert(torch.arange(100.0), 0.29, 0.0, "tensor").tolist() == list(range(71, 100))
    # A 1-D tensor is one row; density 1 keeps everything.
    vector = torch.tensor([3.0, -1.0, 2.0])
    assert select_expert(vector, 1.0, 0.0, "row").tolist() == [0, 1, 2]
    assert select_expert(vector, 0.34, 0.34, "row").tolist() == [2]


def test_auto_scale_is_the_formula_of_the_design_note_averaged_over_tensors():
    assert auto_scale([0.2, 0.4], [1.0, 2.0], 0.01) == pytest.approx(2.0 * (0.3 / 0.01) / 1.5)
    assert auto_scale([0.0], [0.0], 0.1) == 0.0

    class Reader:
        def __init__(self, tensors):
            self.tensors = tensors

        def get_tensor(self, name):
            return self.tensors[name]

    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 8, generator=generator), "norm": torch.randn(8, generator=generator)}
    delta = {"w": torch.randn(6, 8, generator=generator), "norm": torch.randn(8, generator=generator)}
    expert = {name: base[name] + delta[name] for name in base}
    params = ExpertParams(density=0.25, remove=0.0, axis="row", scale="auto", combine="add")
    built = build_expert(Reader(base), Reader(expert), ["norm", "w"], params, 0.5, "reference")
    # By hand: mean|E| per tensor over all its entries (zeros included), F_r on the 2-D tensor only.
    means_e, means_s = [], []
    for name in ("norm", "w"):
        tau = (expert[name] - base[name]).float()
        chosen = select_expert(tau, 0.25, 0.0, "row")
        means_e.append(float(tau.reshape(-1)[chosen].abs().sum()) / tau.numel())
        filtered = fourier_high_pass(tau, 0.5, "reference") if tau.dim() == 2 else tau
        means_s.append(float(filtered.abs().mean()))
    expected = math.log10(4) * (sum(means_e) / 2 / 0.25) / (sum(means_s) / 2)
    assert built.scale == pytest.approx(expected, rel=1e-5)
    assert not torch.equal(fourier_high_pass(delta["w"], 0.5), delta["w"])  # the filter does act at this ratio
    for name in ("norm", "w"):
        tau = (expert[name] - base[name]).reshape(-1)
        assert torch.allclose(built.values[name], expected * tau[built.indices[name]], rtol=1e-5)
    replace = build_expert(Reader(base), Reader(expert), ["w"], ExpertParams(0.25, 0.0, "tensor", 2.0, "replace"),
                           0.9, "reference")
    chosen = replace.indices["w"]
    assert torch.allclose(replace.values["w"], (base["w"] + 2.0 * delta["w"]).reshape(-1)[chosen])
    # apply_expert: add on the support, or set there.
    tensor = torch.zeros(2, 3)
    added = apply_expert(tensor + 1, torch.tensor([1, 5]), torch.tensor([2.0, -1.0]), "add")
    assert added.tolist() == [[1, 3, 1], [1, 1, 0]]
    assert apply_expert(tensor + 1, torch.tensor([4]), torch.tensor([7.0]), "replace").tolist() == [[1, 1, 1],
                                                                                                   [1, 7, 1]]


# ------------------------------------------------------------------------------------------------ the recipe
def write_recipe(folder: Path, data: dict, name: str = "free.yml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_recipe_problems_are_reported_one_per_line_before_any_model_is_read(tmp_path, capsys):
    bad = write_recipe(tmp_path, {
        "base_model": "zoo:base",
        "tasks": {"zoo_num": "zoo:num", "bad/name": "zoo:wrd", "zoo_col": "zoo:nowhere"},
        "backbone": {"lambda": "big", "fr_ratio": 0, "density": 0.5, "weight": {"zoo_num": 1.0, "zoo_x": 2.0}},
        "expert": {"density": 0, "axis": "column", "scale": "sometimes", "combine": "mix", "keep": 1},
        "extra": 1,
    })
    with pytest.raises(ConfigError) as caught:
        load_free_recipe(bad)
    text = str(caught.value)
    for expected in ("free.yml:", "extra: unknown key", "tasks.bad/name: task name", "backbone.lambda: got 'big'",
                     "backbone.fr_ratio: got 0", "backbone.density: not a parameter of the fourier method",
                     "backbone.weight.zoo_x: 'zoo_x' is not one of the tasks", "expert.density: got 0; allowed: a "
                     "number in (0, 1]", "expert.axis: got 'column'; allowed: row", "expert.scale: got 'sometimes'",
                     "expert.combine: got 'mix'; allowed: add", "expert.keep: unknown key"):
        assert expected in text, (expected, text)
    assert len(caught.value.problems) == 11
    # The defaults: the LLM reading of the paper's code (top 1 % per tensor, unscaled, added), weight 1 per expert.
    minimal = load_free_recipe(write_recipe(tmp_path, {"base_model": "zoo:base", "tasks": TASKS}, "minimal.yml"))
    assert minimal.expert == ExpertParams(density=0.01, remove=0.0, axis="tensor", scale=1.0, combine="add")
    assert minimal.backbone_recipe() == {"merge_method": "fourier", "base_model": "zoo:base",
                                         "models": [{"model": ref, "parameters": {"weight": 1.0}}
                                                    for ref in TASKS.values()]}
    # A model problem (an unknown reference) is named by its key, and nothing is written.
    missing = write_recipe(tmp_path, {"base_model": "zoo:base", "tasks": {"zoo_col": "zoo:nowhere"}}, "missing.yml")
    assert main(["free", str(missing), str(tmp_path / "out")]) == 2
    assert "tasks.zoo_col" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["free", "materialise", str(tmp_path)]) == 2
    assert "usage: auto-merge free materialise" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- end to end, zoo
@pytest.fixture(scope="module")
def free_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("free")
    recipe = write_recipe(root, {"base_model": "zoo:base", "tasks": TASKS, "backbone": BACKBONE, "expert": EXPERT})
    assert main(["free", str(recipe), str(root / "out"), "--no-progress"]) == 0
    return root / "out"


def test_free_writes_backbone_experts_and_manifest(free_dir):
    manifest = json.loads((free_dir / "free.json").read_text())
    assert manifest["format"] == "auto-merge-free" and manifest["version"] == 1
    assert {task: entry["model"] for task, entry in manifest["tasks"].items()} == TASKS
    assert manifest["expert"] == {**EXPERT, "remove": 0.0}
    assert manifest["backbone"]["method"] == "fourier" and manifest["backbone"]["parameters"] == {"lambda": 1.0}
    assert (free_dir / ".auto-merge-output.json").is_file()  # written through atomic_folder
    # The backbone is exactly the engine's fourier merge of the three experts.
    recipe = yaml.safe_load((free_dir / "backbone" / "auto_merge_recipe.yml").read_text())
    assert recipe["merge_method"] == "fourier" and [m["model"] for m in recipe["models"]] == list(TASKS.values())
    zoo = zoo_root(0)
    base = load_file(zoo / "base" / "model.safetensors")
    for task, ref in TASKS.items():
        expert, metadata = read_expert(free_dir / "experts" / f"{task}.safetensors")
        assert metadata["task"] == task and metadata["combine"] == "add"
        tuned = load_file(zoo / ref.split(":")[1] / "model.safetensors")
        name = "model.layers.4.mlp.down_proj.weight"  # a layer where the zoo's experts differ from the base
        indices, values = expert[name]
        assert indices.dtype == torch.int64 and values.dtype == torch.float32
        tau = (tuned[name] - base[name]).float()
        assert indices.numel() == tau.shape[0] * int(EXPERT["density"] * tau.shape[1])
        assert torch.equal(indices, select_expert(tau, EXPERT["density"], 0.0, "row"))
        assert torch.allclose(values, tau.reshape(-1)[indices])
        assert manifest["tasks"][task]["scale"] == 1.0


def test_an_existing_output_needs_overwrite_and_sources_are_never_replaced(free_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path, {"base_model": "zoo:base", "tasks": {"zoo_num": "zoo:num"}})
    assert main(["free", str(recipe), str(free_dir)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["free", str(recipe), str(zoo_root(0) / "num")]) == 2
    assert "source model folder" in capsys.readouterr().err
    assert (free_dir / "free.json").is_file() and (zoo_root(0) / "num" / "model.safetensors").is_file()


def test_materialised_task_model_loads_and_equals_backbone_plus_expert(free_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "num_model"
    assert main(["free", "materialise", str(free_dir), "zoo_num", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = torch.tensor([[1, 5, 6, 7]])
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False,
                               pad_token_id=0)
    assert generated.shape[1] > prompt.shape[1]
    backbone = load_file(free_dir / "backbone" / "model.safetensors")
    written = load_file(out / "model.safetensors")
    expert, _ = read_expert(free_dir / "experts" / "zoo_num.safetensors")
    assert set(written) == set(backbone)
    changed = 0
    for name, tensor in backbone.items():
        expected = tensor.clone()
        if name in expert:
            indices, values = expert[name]
            expected.view(-1)[indices] += values
            changed += 1
        assert torch.equal(written[name], expected), name
        assert torch.equal(model.state_dict()[name], expected), name
    assert changed == len(expert) > 0
    # Unknown task, existing output: one message each.
    assert main(["free", "materialise", str(free_dir), "zoo_xyz", str(tmp_path / "other")]) == 2
    assert "no expert for task 'zoo_xyz'" in capsys.readouterr().err
    assert main(["free", "materialise", str(free_dir), "zoo_num", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_each_task_model_scores_at_least_the_backbone_on_its_own_task(free_dir):
    from auto_merge.evaluation.lm_eval_runner import evaluate_checkpoint

    tasks = list(TASKS)
    backbone = evaluate_checkpoint(free_dir / "backbone", tasks, limit=LIMIT)
    routed = FreeFolder.open(free_dir).evaluate(tasks, limit=LIMIT)
    for task in tasks:
        alone, own = backbone[task]["exact_match,none"], routed[task]["exact_match,none"]
        print(f"{task}: backbone {alone:.3f}, task model {own:.3f}")
        assert own >= alone, (task, alone, own)



def test_in_place_routing_scores_the_materialised_model_and_restores_the_backbone(free_dir, tmp_path):
    from auto_merge.evaluation.lm_eval_runner import evaluate_checkpoint

    # zoo_wrd's expert is applied first, then removed again before zoo_col_mc runs on the backbone alone.
    routed = FreeFolder.open(free_dir).evaluate(["zoo_wrd", "zoo_col_mc"], limit=32)
    FreeFolder.open(free_dir).materialise("zoo_wrd", tmp_path / "wrd")
    assert routed["zoo_wrd"] == evaluate_checkpoint(tmp_path / "wrd", ["zoo_wrd"], limit=32)["zoo_wrd"]
    assert routed["zoo_col_mc"] == evaluate_checkpoint(free_dir / "backbone", ["zoo_col_mc"], limit=32)["zoo_col_mc"]


def test_eval_command_routes_tasks_to_their_experts_and_others_to_the_backbone(free_dir, capsys):
    assert main(["eval", "--model", str(free_dir), "--tasks", "zoo_num,zoo_col_mc", "--limit", "8"]) == 0
    out = capsys.readouterr().out
    assert "zoo_num: backbone + expert zoo_num" in out and "zoo_col_mc: backbone alone" in out
    assert "exact_match" in out and "acc" in out
