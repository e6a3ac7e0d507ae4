"""One-shot strategies normal_models / normal_slices: block → recipe, and merge + save + score on the demo zoo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from auto_merge.config import ConfigError, load_experiment
from auto_merge.merge.recipe import parse_recipe
from auto_merge.output_dirs import OutputDirError
from auto_merge.strategies.oneshot import NormalModelsBlock, NormalSlicesBlock
from auto_merge.search.driver import run_search
from auto_merge.strategies.oneshot import OneShotError, OneShotMerge, block_to_recipe, input_models

REPO = Path(__file__).resolve().parents[1]
REFERENCE_CONFIGS = REPO / "tests" / "data" / "reference" / "exp_config"
TASKS = ("zoo_num", "zoo_wrd", "zoo_col")


# ------------------------------------------------------------------------------------------ block → recipe (pure)


def test_normal_models_keeps_per_model_parameters_and_translates_reference_names():
    block = NormalModelsBlock.model_validate({
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.3}]}},
            {"model": "b"},
            {"model": "c", "parameters": {"density": 0.9}},
        ],
        "merging_method": {"ties": {
            "param_value_mask_rate": [{"filter": "self_attn", "value": 0.25}, {"value": 0.5}],
            "scaling_coefficient": 1.2,
            "weight": [{"value": [0.4, 0.6, 0.8]}],  # one value per model, in order
        }},
    })
    recipe = block_to_recipe("normal_models", block)
    assert recipe["base_model"] == "base" and recipe["merge_method"] == "ties"
    models = recipe["models"]
    assert [m["model"] for m in models] == ["a", "b", "c"]
    # A model's own value wins over the method-level list.
    assert models[0]["parameters"] == {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.3}]}
    assert models[1]["parameters"] == {"weight": 0.6}
    assert models[2]["parameters"] == {"density": 0.9, "weight": 0.8}
    # The TIES trim rate r is density 1 - r (filters kept); λ is scaling_coefficient.
    assert recipe["parameters"] == {"density": [{"filter": "self_attn", "value": 0.75}, {"value": 0.5}],
                                    "lambda": 1.2}
    parsed = parse_recipe(recipe)  # the engine accepts it as is
    assert parsed.models[0].parameters["weight"][0].filter == "mlp"


def test_normal_models_linear_weights_list_is_split_and_slerp_starts_at_the_first_model():
    linear = NormalModelsBlock.model_validate({
        "base_model": "base", "models": [{"model": "a"}, {"model": "b", "parameters": {"weights": 0.9}}],
        "merging_method": {"linear": {"weights": [{"value": [0.25, 0.75]}]}}})
    recipe = block_to_recipe("normal_models", linear)
    assert [m["parameters"] for m in recipe["models"]] == [{"weight": 0.25}, {"weight": 0.9}]
    assert "parameters" not in recipe

    slerp = NormalModelsBlock.model_validate({
        "base_model": "base", "models": [{"model": "a"}, {"model": "b"}],
        "merging_method": {"slerp": {"slerp_t": 0.3}}})
    recipe = block_to_recipe("normal_models", slerp)
    assert recipe["base_model"] == "a" and recipe["parameters"] == {"t": 0.3}  # t = 0 is a, t = 1 is b

    slerp_slice = NormalSlicesBlock.model_validate({"base_model": "base", "slices": [{
        "sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [2, 4]}],
        "merging_method": {"slerp": {"t": 0.5}}}]})
    piece, = block_to_recipe("normal_slices", slerp_slice)["slices"]
    assert (piece["base_model"], piece["base_layer_range"]) == ("a", [0, 2])
    with_target = NormalSlicesBlock.model_validate({"base_model": "base", "slices": [{
        "sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [2, 4]}],
        "target": {"model": "base", "layer_range": [0, 2]}, "merging_method": {"slerp": {"t": 0.5}}}]})
    with pytest.raises(OneShotError, match="takes no task-vector base"):
        block_to_recipe("normal_slices", with_target)


def test_two_spellings_of_one_parameter_are_refused():
    block = NormalModelsBlock.model_validate({
        "base_model": "base", "models": [{"model": "a"}],
        "merging_method": {"task_arithmetic": {"scaling_coefficient": 0.5, "lambda": 0.7}}})
    with pytest.raises(OneShotError) as caught:
        block_to_recipe("normal_models", block)
    assert caught.value.key_path == ("merging_method", "task_arithmetic", "lambda")
    assert "scaling_coefficient" in caught.value.allowed


def test_normal_slices_target_is_the_base_layer_range_and_depth_is_the_sum_of_slices():
    block = NormalSlicesBlock.model_validate({
        "base_model": "base",
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 4], "parameters": {"weight": 0.5}},
                         {"model": "b", "layer_range": [0, 4]}],
             "target": {"model": "base", "layer_range": [4, 8]},
             "merging_method": {"task_arithmetic": {"scaling_coefficient": [{"value": 0.8}]}}},
            {"sources": [{"model": "c", "layer_range": [2, 8]}], "merging_method": {"passthrough": None}},
        ]})
    recipe = block_to_recipe("normal_slices", block)
    first, second = recipe["slices"]
    assert first["base_model"] == "base" and first["base_layer_range"] == [4, 8]
    assert first["sources"][0] == {"model": "a", "layer_range": [0, 4], "parameters": {"weight": 0.5}}
    assert first["parameters"] == {"lambda": 0.8, "weight": 1.0}
    assert second == {"merge_method": "passthrough", "sources": [{"model": "c", "layer_range": [2, 8]}]}
    assert [piece["sources"][0]["layer_range"] for piece in recipe["slices"]] == [[0, 4], [2, 8]]  # 10 layers
    assert input_models(block) == ["base", "a", "b", "c"]
    assert parse_recipe(recipe).slices[0].base_layer_range == (4, 8)


def test_reference_normal_slices_shape_converts():
    data = yaml.safe_load((REFERENCE_CONFIGS / "normal_slices.yaml").read_text())
    block = NormalSlicesBlock.model_validate(data)
    merge = OneShotMerge.from_block("normal_slices", block)
    depth = sum(end - start for start, end in (p["sources"][0]["layer_range"] for p in merge.recipe["slices"]))
    assert depth == 22  # WizardMath [0,8) + WizardLM [8,16), then [16,30) + [0,14)
    assert merge.models == ("vanillaOVO/WizardMath-13B-V1.0", "WizardLMTeam/WizardLM-13B-V1.2")
    for piece in merge.recipe["slices"]:
        assert piece["merge_method"] == "task_arithmetic" and piece["parameters"] == {"lambda": 1.0, "weight": 1.0}
        assert "base_layer_range" not in piece  # no target: the engine reads the base at the sources' index
    parse_recipe(merge.recipe)


def test_reference_normal_models_yaml_cannot_run_and_says_why(tmp_path, capsys):
    from auto_merge.cli import main

    shutil.copy(REFERENCE_CONFIGS / "normal_models.yaml", tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text("strategy: normal_models\nstrategies:\n  normal_models: !include normal_models.yaml\n")
    with pytest.raises(ConfigError) as caught:
        load_experiment(config, build_zoo=False)
    message = str(caught.value)
    assert "normal_models.yaml:1: strategies.normal_models.models: passthrough merges exactly 1 model, got 3" in message
    assert "allowed: exactly 1 model for passthrough" in message
    assert main(["search", "--config", str(config)]) == 2
    assert "passthrough merges exactly 1 model" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ end to end on the zoo


def shipped_config(tmp_path: Path, name: str, *, limit: int = 30, block: str | None = None) -> Path:
    """A copy of exp_config/NAME writing under tmp_path and scoring `limit` examples; `block` replaces the
    strategy's included block file."""
    folder = tmp_path / "exp_config"
    if not folder.exists():
        shutil.copytree(REPO / "exp_config", folder)
    text = (REPO / "exp_config" / name).read_text()
    text = text.replace("output_path: runs", f"output_path: {tmp_path / 'runs'}")
    text = text.replace("include_path: ../custom_tasks", f"include_path: {REPO / 'custom_tasks'}\n    limit: {limit}")
    assert f"limit: {limit}" in text
    path = folder / name
    path.write_text(text)
    if block is not None:
        strategy = yaml.safe_load(text.split("strategies:")[0])["strategy"]
        (folder / f"{strategy}.yaml").write_text(block)
    return path


def test_normal_models_runs_saves_scores_and_refuses_a_changed_config(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    config = shipped_config(tmp_path, "config_normal_models.yaml")
    result = run_search(config, show_progress=False)
    run_dir = tmp_path / "runs" / "normal_models"
    assert result.run_dir == run_dir and result.model == run_dir / "model" and not result.reused
    model = AutoModelForCausalLM.from_pretrained(result.model)
    assert model.config.num_hidden_layers == 8
    card = (result.model / "README.md").read_text()
    assert "task_arithmetic" in card and "weight: 1.5" in card  # the per-model parameter was applied
    assert parse_recipe(yaml.safe_load((run_dir / "recipe.yml").read_text())).models[1].parameters

    final = json.loads((run_dir / "final_scores.json").read_text())
    assert final["budget"] == 30 and final["layers"] == 8
    for entry in [final["merge"], final["base"], *final["experts"].values()]:
        assert set(entry["scores"]) == set(TASKS) and all(0 <= s <= 1 for s in entry["scores"].values())
        assert entry["examples"]["zoo_wrd"] == 30  # the largest task runs `limit` examples
    assert list(final["experts"]) == ["zoo:num", "zoo:wrd", "zoo:col"]
    assert final["experts"]["zoo:col"]["scores"]["zoo_col"] == 1.0  # an expert on its own skill
    printed = capsys.readouterr().out
    assert "merge vs best input model" in printed and f"merged model: {run_dir / 'model'}" in printed

    # The same config again: the run is complete, nothing is redone.
    written = (result.model / "model.safetensors").stat().st_mtime_ns
    again = run_search(config, show_progress=False)
    assert again.reused and again.final_scores == final
    assert (result.model / "model.safetensors").stat().st_mtime_ns == written
    # Interrupted before the scores were written: the model is kept, the scores come from the result cache.
    (run_dir / "final_scores.json").unlink()
    resumed = run_search(config, show_progress=False)
    assert not resumed.reused and resumed.final_scores["merge"]["cached_examples"] > 0
    assert resumed.final_scores["merge"]["scores"] == final["merge"]["scores"]
    assert (result.model / "model.safetensors").stat().st_mtime_ns == written

    # Another config in the same folder is refused (nothing lost), unless --overwrite.
    changed = shipped_config(tmp_path, "config_normal_models.yaml", limit=20)
    with pytest.raises(OutputDirError, match="different config.*--overwrite"):
        run_search(changed, show_progress=False)
    assert json.loads((run_dir / "final_scores.json").read_text()) == resumed.final_scores
    redone = run_search(changed, show_progress=False, overwrite=True)
    assert redone.final_scores["budget"] == 20 and not redone.reused


def test_normal_slices_cli_run_changes_depth_and_reads_the_base_at_the_target(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from auto_merge.cli import main

    block = """base_model: zoo:base
slices:
  - sources:
      - model: zoo:num
        layer_range: [0, 4]
        parameters:
          weight: 0.5
      - model: zoo:col
        layer_range: [0, 4]
    target:
      model: zoo:base
      layer_range: [4, 8]
    merging_method:
      task_arithmetic:
        scaling_coefficient:
          - value: 0.8
  - sources:
      - model: zoo:wrd
        layer_range: [2, 8]
    merging_method:
      passthrough:
"""
    config = shipped_config(tmp_path, "config_normal_slices.yaml", limit=15, block=block)
    assert main(["search", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "normal_slices"
    assert f"run folder: {run_dir}" in out and "10 layers" in out
    model_dir = run_dir / "model"
    assert AutoModelForCausalLM.from_pretrained(model_dir).config.num_hidden_layers == 10
    final = json.loads((run_dir / "final_scores.json").read_text())
    assert set(final["merge"]["scores"]) == set(TASKS) and set(final["experts"]) == {"zoo:num", "zoo:col", "zoo:wrd"}

    # Output layer k < 4 = base[4 + k] + 0.8 * (0.5 * (num[k] - base[4 + k]) + (col[k] - base[4 + k]));
    # output layers 4..9 are wrd's layers 2..7.
    config_data = load_experiment(config, build_zoo=False)
    weights = {ref: load_file(Path(path) / "model.safetensors") for ref, path in config_data.model_paths.items()}
    merged = load_file(model_dir / "model.safetensors")
    name = "model.layers.{}.mlp.down_proj.weight"
    base = weights["zoo:base"][name.format(5)]
    num, col = weights["zoo:num"][name.format(1)], weights["zoo:col"][name.format(1)]
    assert torch.allclose(merged[name.format(1)], base + 0.8 * (0.5 * (num - base) + (col - base)), atol=1e-6)
    assert torch.equal(merged[name.format(7)], weights["zoo:wrd"][name.format(5)])


def test_slices_with_different_starts_and_no_target_fail_before_any_weight_is_read(tmp_path):
    block = """base_model: zoo:base
slices:
  - sources:
      - model: zoo:num
        layer_range: [0, 4]
      - model: zoo:col
        layer_range: [4, 8]
    merging_method:
      task_arithmetic:
        scaling_coefficient: 0.8
"""
    config = shipped_config(tmp_path, "config_normal_slices.yaml", block=block)
    with pytest.raises(ConfigError) as caught:
        run_search(config, show_progress=False)
    message = str(caught.value)
    assert "normal_slices.yaml" in message and "strategies.normal_slices.slices[0]" in message
    assert "allowed: a target {model, layer_range} on this slice" in message
    assert not (tmp_path / "runs").exists()
