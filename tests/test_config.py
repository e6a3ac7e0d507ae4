"""Experiment-config loading and validation: YAML + !include, the typed schema, model cross-checks from headers only,
model references, and the ConfigError format (file, line, key path, allowed values)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from auto_merge.config import ConfigError, load_experiment
from auto_merge.config.errors import format_key_path
from auto_merge.models import (
    ModelInspectionError,
    ModelResolutionError,
    list_tensor_names,
    read_model_config,
    resolve_model_ref,
)
from auto_merge.strategies.dis import DisBlock
from auto_merge.strategies.lfs import LfsBlock
from auto_merge.strategies.oneshot import NormalModelsBlock, NormalSlicesBlock
from auto_merge.strategies.prune import PruneBlock

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]
BAD_CONFIGS = DATA / "bad_configs"
GOOD_CONFIGS = DATA / "good_configs"
# Verbatim copies of the reference's exp_config/*.yaml (/work/shared/reference/exp_config).
REFERENCE_CONFIGS = DATA / "reference" / "exp_config"
PROJECT_CONFIGS = Path(__file__).parent.parent / "exp_config"
BAD_EXPECTATIONS: dict[str, dict] = yaml.safe_load((BAD_CONFIGS / "expected.yaml").read_text())
REFERENCE_HUB_IDS = ("meta-llama/Llama-2-13b-hf", "WizardLMTeam/WizardLM-13B-V1.2", "vanillaOVO/WizardMath-13B-V1.0",
                     "layoric/llama-2-13b-code-alpaca")
STRATEGY_BLOCK_TYPES = {"lfs": LfsBlock, "lfs_multiobj": LfsBlock, "dis": DisBlock, "prune": PruneBlock,
                        "normal_models": NormalModelsBlock, "normal_slices": NormalSlicesBlock}


# ---------------------------------------------------------------------------------------------------------------
# fixtures: tiny random checkpoints (safetensors) built once per session


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """4-layer Llama base + 2 experts, a 4-layer Qwen2, a pickle (.bin) Llama, and 40-layer stand-ins for the
    reference's four Llama-2-13B hub models (its granularity 10 and num_hidden_layers 40 need 40 layers)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("tiny_models")
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4)
    paths: dict[str, Path] = {}
    for seed, name in enumerate(["tiny-llama", "tiny-llama-a", "tiny-llama-b"]):
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, **small)).save_pretrained(root / name)
        paths[name] = root / name
    Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=4, **small)).save_pretrained(root / "tiny-qwen2")
    paths["tiny-qwen2"] = root / "tiny-qwen2"

    pickled = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, **small))
    pickled.config.architectures = ["LlamaForCausalLM"]
    pickled.config.save_pretrained(root / "tiny-llama-pickle")
    torch.save(pickled.state_dict(), root / "tiny-llama-pickle" / "pytorch_model.bin")
    paths["tiny-llama-pickle"] = root / "tiny-llama-pickle"

    deep = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2)
    for seed, hub_id in enumerate(REFERENCE_HUB_IDS):
        folder = root / hub_id.replace("/", "--")
        torch.manual_seed(100 + seed)
        LlamaForCausalLM(LlamaConfig(num_hidden_layers=40, **deep)).save_pretrained(folder)
        paths[hub_id] = folder
    return paths


@pytest.fixture(scope="session")
def tiny_aliases(tiny_models) -> dict[str, str]:
    """The names the test configs use → tiny model folders."""
    return {name: str(path) for name, path in tiny_models.items() if name.startswith("tiny-")}


@pytest.fixture(scope="session")
def reference_aliases(tiny_models) -> dict[str, str]:
    return {hub_id: str(tiny_models[hub_id]) for hub_id in REFERENCE_HUB_IDS}


def _good_config_for(strategy: str, folder: Path) -> Path:
    """A copy of good_configs/ in `folder` whose tiny_all_strategies.yaml selects `strategy`."""
    shutil.copytree(GOOD_CONFIGS, folder, dirs_exist_ok=True)
    config = folder / "tiny_all_strategies.yaml"
    lines = config.read_text().splitlines(keepends=True)
    assert lines[2] == "strategy: lfs\n"
    lines[2] = f"strategy: {strategy}\n"
    config.write_text("".join(lines))
    return config


# ---------------------------------------------------------------------------------------------------------------
# the malformed-config corpus


def test_bad_config_corpus_is_complete():
    configs = {path.name for path in BAD_CONFIGS.glob("*.yaml")} - {"expected.yaml"}
    fragments = {name for name in configs if name.startswith("frag_")}
    assert configs - fragments == set(BAD_EXPECTATIONS), "every bad config needs an entry in expected.yaml"
    assert len(BAD_EXPECTATIONS) >= 25
    included = "".join(path.read_text() for path in BAD_CONFIGS.glob("*.yaml"))
    assert all(f"!include {name}" in included for name in fragments), "unused fragment"


@pytest.mark.parametrize("config_name", sorted(BAD_EXPECTATIONS))
def test_bad_config_error_names_file_line_key_and_allowed(config_name, tiny_aliases):
    expected = BAD_EXPECTATIONS[config_name]
    with pytest.raises(ConfigError) as caught:
        load_experiment(BAD_CONFIGS / config_name, extra_aliases=tiny_aliases, build_zoo=False)
    error = caught.value
    expected_key = expected.get("key")
    matching = [problem for problem in error.problems
                if problem.location.file.name == expected["file"]
                and (format_key_path(problem.key_path) if problem.key_path is not None else None) == expected_key]
    assert matching, f"no problem at {expected['file']} / {expected_key} in:\n{error}"
    problem = matching[0]
    assert problem.location.line == expected["line"], str(error)
    assert expected["allowed"] in (problem.allowed or ""), str(error)
    # The same facts are in the message text, on the problem's own line.
    line = next(text for text in str(error).splitlines() if str(problem) in text)
    assert f"{expected['file']}:{expected['line']}: " in line
    assert expected_key is None or f": {expected_key}: " in line
    assert "; allowed: " in line and expected["allowed"] in line.split("; allowed: ", 1)[1]


# ---------------------------------------------------------------------------------------------------------------
# configs that must validate


@pytest.mark.parametrize("config_name", ["config_lfs.yaml", "config_lfs_mo.yaml", "config_dis.yaml",
                                         "config_prune.yaml"])
def test_reference_configs_validate_without_models(config_name):
    config = load_experiment(REFERENCE_CONFIGS / config_name, check_models=False)
    assert isinstance(config.selected, STRATEGY_BLOCK_TYPES[config.strategy])
    assert config.selected.models == list(REFERENCE_HUB_IDS[1:])  # order matters (block ids, candidate ids)
    # Every block present is typed, including the shipped normal_models (passthrough over 3 models: not runnable,
    # but it is not selected).
    assert isinstance(config.strategies.normal_models, NormalModelsBlock)
    assert config.strategies.normal_slices.slices[1].sources[0].layer_range == [16, 30]
    assert config.model_paths == {}


def test_reference_config_values_are_typed():
    lfs = load_experiment(REFERENCE_CONFIGS / "config_lfs.yaml", check_models=False)
    assert lfs.selected.layer_granularity == 10 and lfs.selected.filters == ["self_attn", "mlp"]
    assert lfs.selected.merging_method["ties"]["param_value_mask_rate"].max == 0.99
    assert lfs.global_params.cache_dir is None  # "" = default cache (the reference crashed on it)
    mo = load_experiment(REFERENCE_CONFIGS / "config_lfs_mo.yaml", check_models=False)
    assert [task.task for task in mo.global_params.evaluation.tasks] == ["mbpp", "mmlu", "gsm_plus_mini_custom"]
    assert mo.global_params.evaluation.tasks[0].overrides == {"test_split": "validation"}
    assert mo.global_params.evaluation.tasks[2].overrides == {}
    dis = load_experiment(REFERENCE_CONFIGS / "config_dis.yaml", check_models=False).selected
    assert (dis.remain_base, dis.layers, dis.merging_method, dis.num_hidden_layers) == (True, 50, "passthrough", 40)
    prune = load_experiment(REFERENCE_CONFIGS / "config_prune.yaml", check_models=False).selected
    assert (prune.num_hidden_layers, prune.layers, prune.n_workers) == (40, 30, 2)


@pytest.mark.parametrize("config_name", ["config_lfs_mo.yaml", "config_dis.yaml", "config_prune.yaml"])
def test_reference_configs_validate_with_models_via_extra_aliases(config_name, reference_aliases):
    config = load_experiment(REFERENCE_CONFIGS / config_name, extra_aliases=reference_aliases, build_zoo=False)
    assert set(config.model_paths) == set(REFERENCE_HUB_IDS)


def test_reference_lfs_config_validates_with_model_aliases_in_the_file(tmp_path, reference_aliases):
    shutil.copytree(REFERENCE_CONFIGS, tmp_path, dirs_exist_ok=True)
    config_file = tmp_path / "config_lfs.yaml"
    aliases = "".join(f'    "{hub_id}": "{path}"\n' for hub_id, path in reference_aliases.items())
    config_file.write_text(config_file.read_text().replace("global_params:\n", "global_params:\n  model_aliases:\n"
                                                                               + aliases, 1))
    config = load_experiment(config_file, build_zoo=False)
    assert config.model_paths["meta-llama/Llama-2-13b-hf"] == Path(reference_aliases["meta-llama/Llama-2-13b-hf"])


@pytest.mark.parametrize("config_name,found,depth", [
    ("config_dis.yaml", "dis/single-obj/lm-dis0.json", 47),
    ("config_prune.yaml", "prune/13b/1.json", 30),
])
def test_reference_depth_configurations_replay_to_checkpoints(tmp_path, reference_aliases, config_name, found, depth):
    """The reference's published DIS and prune configurations, given its experiment config (models mapped to tiny
    40-layer stand-ins), replay into checkpoints of the depth their layer lists give."""
    from transformers import AutoConfig

    from auto_merge.search.replay import replay

    shutil.copytree(REFERENCE_CONFIGS, tmp_path / "exp", dirs_exist_ok=True)
    config_file = tmp_path / "exp" / config_name
    aliases = "".join(f'    "{hub_id}": "{path}"\n' for hub_id, path in reference_aliases.items())
    config_file.write_text(config_file.read_text().replace("global_params:\n", "global_params:\n  model_aliases:\n"
                                                                               + aliases, 1))
    replay(DATA / "reference" / "search_config" / found, tmp_path / "out", config_path=config_file)
    assert AutoConfig.from_pretrained(tmp_path / "out").num_hidden_layers == depth


def test_a_reference_prune_replay_states_its_departures_and_as_reference_reproduces_the_exported_model(
        tmp_path, reference_aliases):
    """The reference searched prune output scales but never applied them (issue 16): a replay applies them and says
    so (printed, returned, in the model card); --as-reference leaves them out, as the reference's model had none."""
    import torch
    from safetensors.torch import load_file

    from auto_merge.search.replay import load_found_configuration, replay

    shutil.copytree(REFERENCE_CONFIGS, tmp_path / "exp", dirs_exist_ok=True)
    config_file = tmp_path / "exp" / "config_prune.yaml"
    aliases = "".join(f'    "{hub_id}": "{path}"\n' for hub_id, path in reference_aliases.items())
    config_file.write_text(config_file.read_text().replace("global_params:\n", "global_params:\n  model_aliases:\n"
                                                                               + aliases, 1))
    found = DATA / "reference" / "search_config" / "prune" / "13b" / "1.json"
    strategy, values, paths, _ = load_found_configuration(found, config_file)
    plan = strategy.layer_plan(values)
    scaled = [(position, chosen, layer, scale) for position, (chosen, layer, _, scale) in enumerate(plan)
              if scale != 1.0 and len(chosen) <= 1]
    assert scaled, "the published file has output scales that are not 1"

    ours = replay(found, tmp_path / "ours", config_path=config_file)
    theirs = replay(found, tmp_path / "theirs", config_path=config_file, as_reference=True)
    assert any("output_scale" in note for note in ours["departures"])
    assert not any("output_scale" in note for note in theirs["departures"])
    card = (tmp_path / "ours" / "README.md").read_text()
    assert "## Departures from the reference's model" in card and "never applied them" in card

    position, chosen, layer, scale = scaled[0]
    source = load_file(Path(paths[chosen[0] if chosen else strategy.base_model]) / "model.safetensors")
    name = "model.layers.{}.mlp.down_proj.weight"
    ours_weights, theirs_weights = (load_file(tmp_path / folder / "model.safetensors") for folder in ("ours", "theirs"))
    assert torch.equal(theirs_weights[name.format(position)], source[name.format(layer)])
    assert torch.allclose(ours_weights[name.format(position)], scale * source[name.format(layer)])

    # The saved recipe re-runs as it is, without the config's aliases: hub ids only the aliases resolved are written
    # as the folders they resolved to (issue 14).
    from auto_merge.cli import main

    saved = (tmp_path / "ours" / "auto_merge_recipe.yml").read_text()
    assert "WizardLMTeam/WizardLM-13B-V1.2" not in saved and str(paths[strategy.base_model]) in saved
    assert main(["merge", str(tmp_path / "ours" / "auto_merge_recipe.yml"), str(tmp_path / "rerun"),
                 "--no-progress"]) == 0
    rerun = load_file(tmp_path / "rerun" / "model.safetensors")
    assert rerun.keys() == ours_weights.keys() and all(torch.equal(rerun[k], ours_weights[k]) for k in rerun)


def test_as_reference_is_refused_for_this_projects_own_found_configurations(tmp_path):
    from auto_merge.search.replay import ReplayError, replay

    with pytest.raises(ReplayError, match="--as-reference applies to the reference"):
        replay(REPO / "search_config" / "lfs" / "best.json", tmp_path / "out", as_reference=True)
    assert not (tmp_path / "out").exists()


def test_reference_lfs_config_without_aliases_says_model_is_not_available_offline():
    with pytest.raises(ConfigError) as caught:
        load_experiment(REFERENCE_CONFIGS / "config_lfs.yaml", build_zoo=False)
    message = str(caught.value)
    assert "lfs.yaml:" in message  # the models are written in the included lfs.yaml
    assert "'meta-llama/Llama-2-13b-hf' is not available offline" in message
    assert "strategies.lfs.base_model" in message and "global_params.model_aliases" in message
    assert len(caught.value.problems) == 4  # base + 3 experts, all reported at once


# Top-level configs in the project's exp_config/ (fragments meant for !include have no `strategy:` line).
PROJECT_CONFIG_FILES = sorted(path for path in PROJECT_CONFIGS.glob("*.yaml")
                              if re.search(r"^strategy:", path.read_text(), flags=re.MULTILINE))


@pytest.mark.parametrize("config_file", PROJECT_CONFIG_FILES, ids=lambda path: path.name)
def test_project_exp_configs_validate_without_models(config_file):
    load_experiment(config_file, check_models=False)


@pytest.mark.parametrize("strategy", ["lfs", "lfs_multiobj", "dis", "prune", "normal_models", "normal_slices"])
def test_good_config_validates_for_every_strategy(strategy, tmp_path, tiny_aliases, tiny_models):
    config = load_experiment(_good_config_for(strategy, tmp_path), extra_aliases=tiny_aliases, build_zoo=False)
    assert isinstance(config.selected, STRATEGY_BLOCK_TYPES[strategy])
    assert config.model_paths == {name: tiny_models[name] for name in ("tiny-llama", "tiny-llama-a", "tiny-llama-b")}


def test_good_config_typed_values_and_new_keys(tmp_path, tiny_aliases):
    config = load_experiment(_good_config_for("normal_models", tmp_path), check_models=False)
    params = config.global_params
    assert (params.random_seed, params.cache_dir, params.load_run_history, params.zoo_seed) == (1, None, None, 0)
    assert (params.allow_pickle, params.trust_remote_code, params.model_aliases) == (False, False, {})
    evaluation = params.evaluation
    assert evaluation.include_paths == ["custom_tasks", "more_tasks"] and evaluation.aggregate == "weighted_mean"
    assert [(task.weight, task.higher_is_better) for task in evaluation.tasks] == [(2.0, True), (1.0, True)]
    assert evaluation.tasks[1].overrides == {"generation_kwargs": {"until": ["\n"], "max_gen_toks": 8}}
    block = config.selected
    # Scalar shorthand `density: 0.5` means one unfiltered entry.
    assert [(entry.filter, entry.value) for entry in block.merging_method["ties"]["density"]] == [(None, 0.5)]
    assert [(entry.filter, entry.value) for entry in block.models[1].parameters["weight"]] == [("mlp", 0.2),
                                                                                              (None, 0.3)]
    slices = config.strategies.normal_slices.slices
    assert slices[0].target.layer_range == [0, 2] and slices[1].merging_method == {
        "passthrough": {"scale": [slices[1].merging_method["passthrough"]["scale"][0]]}}
    assert config.strategies.lfs_multiobj == config.strategies.lfs  # one included file, two blocks
    assert config.source_file == (tmp_path / "tiny_all_strategies.yaml").resolve()


def test_models_of_unselected_strategies_are_not_resolved(tmp_path, tiny_aliases):
    config_file = _good_config_for("lfs", tmp_path)
    config_file.write_text(config_file.read_text().replace(
        "  dis:\n    base_model: tiny-llama\n", "  dis:\n    base_model: nobody/unavailable-model\n"))
    config = load_experiment(config_file, extra_aliases=tiny_aliases, build_zoo=False)
    assert "nobody/unavailable-model" not in config.model_paths
    config_file.write_text(config_file.read_text().replace("strategy: lfs\n", "strategy: dis\n", 1))
    with pytest.raises(ConfigError, match=r"strategies\.dis\.base_model: model 'nobody/unavailable-model'"):
        load_experiment(config_file, extra_aliases=tiny_aliases, build_zoo=False)


def test_pickle_checkpoint_accepted_with_allow_pickle(tmp_path, tiny_aliases):
    config_file = tmp_path / "pickle.yaml"
    config_file.write_text((BAD_CONFIGS / "pickle_checkpoint_refused.yaml").read_text().replace(
        "global_params:\n", "global_params:\n  allow_pickle: true\n"))
    config = load_experiment(config_file, extra_aliases=tiny_aliases, build_zoo=False)
    assert "tiny-llama-pickle" in config.model_paths


def test_zoo_references_use_zoo_seed_and_never_build_in_tests(tmp_path, monkeypatch, tiny_models):
    import auto_merge.zoo

    calls = []

    def fake_zoo_model_path(name, seed=0, cache_dir=None, build=True):
        calls.append((name, seed, build))
        return tiny_models[{"base": "tiny-llama", "num": "tiny-llama-a", "wrd": "tiny-llama-b"}[name]]

    monkeypatch.setattr(auto_merge.zoo, "zoo_model_path", fake_zoo_model_path)
    config_file = _good_config_for("lfs", tmp_path)
    text = (config_file.parent / "tiny_lfs_block.yaml").read_text()
    for name, zoo_name in [("tiny-llama-a", "zoo:num"), ("tiny-llama-b", "zoo:wrd"), ("tiny-llama", "zoo:base")]:
        text = text.replace(name, zoo_name)
    (config_file.parent / "tiny_lfs_block.yaml").write_text(text)
    config_file.write_text(config_file.read_text().replace("zoo_seed: 0", "zoo_seed: 3"))
    config = load_experiment(config_file, build_zoo=False)
    assert sorted(calls) == [("base", 3, False), ("num", 3, False), ("wrd", 3, False)]
    assert config.model_paths["zoo:base"] == tiny_models["tiny-llama"]


# ---------------------------------------------------------------------------------------------------------------
# error behaviour


def test_validation_fails_before_any_weights_are_loaded(monkeypatch, tmp_path, tiny_aliases):
    import safetensors.torch
    import torch
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("validation must not load weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ConfigError, match="does not divide the base model's 4 layers"):
        load_experiment(BAD_CONFIGS / "granularity_not_dividing_depth.yaml", extra_aliases=tiny_aliases)
    with pytest.raises(ConfigError, match="matches no tensor name"):
        load_experiment(BAD_CONFIGS / "filter_matches_no_tensor.yaml", extra_aliases=tiny_aliases)
    config = load_experiment(_good_config_for("lfs", tmp_path), extra_aliases=tiny_aliases)
    assert isinstance(config.selected, LfsBlock)


def test_error_for_a_key_in_an_included_file_names_that_file(tmp_path):
    (tmp_path / "blocks").mkdir()
    (tmp_path / "blocks" / "search.yaml").write_text(
        "n_trials: 10\nbase_model: a\nmodels: [b]\nlayer_granularity: 1\n"
        "merging_method: !include methods/ranges.yaml\n")
    (tmp_path / "blocks" / "methods").mkdir()
    (tmp_path / "blocks" / "methods" / "ranges.yaml").write_text(
        "linear:\n  weights: {min: 0.0, max: 1.0}\nties:\n  param_value_mask_rate:\n    min: 0.0\n    max: 1.5\n")
    (tmp_path / "top.yaml").write_text(
        "strategy: lfs\nglobal_params:\n  evaluation:\n    tasks: [{task: t, metric: 'acc,none'}]\n"
        "strategies:\n  lfs: !include blocks/search.yaml\n")
    with pytest.raises(ConfigError) as caught:
        load_experiment(tmp_path / "top.yaml", check_models=False)
    (problem,) = caught.value.problems
    assert problem.location.file == tmp_path / "blocks" / "methods" / "ranges.yaml"
    assert problem.location.line == 6
    assert str(caught.value).startswith(str(problem.location))
    assert "ranges.yaml:6: strategies.lfs.merging_method.ties.param_value_mask_rate.max: 1.5 is out of range" \
        in str(caught.value)
    assert "top.yaml" not in str(caught.value)


def test_all_problems_are_reported_in_one_error_one_per_line(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "strategy: prune\nglobal_params:\n  evaluation:\n    batch_size: 0\n    device: gpu\n    tasks: []\n"
        "strategies:\n  prune:\n    base_model: a\n    models: [b, b]\n    num_hidden_layers: 4\n    layers: 3\n"
        "    merging_method: {ties: {param_value_mask_rate: {min: 0.0, max: 1.0}}}\n    n_trials: 5\n")
    with pytest.raises(ConfigError) as caught:
        load_experiment(tmp_path / "config.yaml", check_models=False)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith(f"{len(caught.value.problems)} problems in experiment config")
    assert len(lines) == 1 + len(caught.value.problems) >= 4
    text = str(caught.value)
    assert "config.yaml:4: global_params.evaluation.batch_size: 0 is out of range; allowed: a value >= 1" in text
    assert "config.yaml:10: strategies.prune.models[1]: model 'b' is listed twice" in text
    assert "param_value_mask_rate.max: 1 is out of range" in text and "allowed: 0 <= value < 1" in text


def test_missing_config_file_and_non_mapping_document(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_experiment(tmp_path / "nope.yaml", check_models=False)
    (tmp_path / "list.yaml").write_text("- strategy: lfs\n")
    with pytest.raises(ConfigError, match=r"list\.yaml:1: \(top level\): wrong type: got a list; allowed: a mapping"):
        load_experiment(tmp_path / "list.yaml", check_models=False)
    assert issubclass(ConfigError, ValueError)


def test_string_none_and_integer_strictness(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "strategy: normal_slices\nglobal_params:\n  load_run_history: None\n  evaluation:\n    num_fewshot: None\n"
        "    limit: 10\n    tasks: [{task: t, metric: 'acc,none', num_fewshot: 2}]\n"
        "strategies:\n  normal_slices:\n    base_model: a\n    slices:\n"
        "      - sources: [{model: a, layer_range: [0, 2.0]}]\n        merging_method: {passthrough: null}\n")
    with pytest.raises(ConfigError, match=r"layer_range\[1\]: wrong type: got 2\.0; allowed: an integer"):
        load_experiment(tmp_path / "config.yaml", check_models=False)
    (tmp_path / "config.yaml").write_text((tmp_path / "config.yaml").read_text().replace("2.0]", "2]"))
    config = load_experiment(tmp_path / "config.yaml", check_models=False)
    assert config.global_params.load_run_history is None and config.global_params.evaluation.num_fewshot is None
    assert config.global_params.evaluation.limit == 10 and config.selected.slices[0].merging_method == {
        "passthrough": {}}


def test_config_package_does_not_import_torch_or_transformers():
    code = ("import sys, auto_merge.config, auto_merge.models; "
            "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------
# model references


def test_alias_chains_and_local_folders(tmp_path, tiny_models):
    aliases = {"org/model": "my-local", "my-local": str(tiny_models["tiny-llama"])}
    assert resolve_model_ref("org/model", aliases=aliases) == tiny_models["tiny-llama"].resolve()
    (tmp_path / "models" / "m").mkdir(parents=True)
    assert resolve_model_ref("models/m", search_dirs=[tmp_path]) == (tmp_path / "models" / "m").resolve()
    with pytest.raises(ModelResolutionError, match="alias cycle: a -> b -> a"):
        resolve_model_ref("a", aliases={"a": "b", "b": "a"})


def test_hub_ids_come_from_the_local_cache_only(tmp_path):
    snapshot = tmp_path / "hub" / "models--some-org--some-model" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--some-org--some-model" / "refs").mkdir()
    (tmp_path / "hub" / "models--some-org--some-model" / "refs" / "main").write_text("0123abcd")
    assert resolve_model_ref("some-org/some-model", cache_dir=tmp_path) == snapshot
    with pytest.raises(ModelResolutionError, match="not available offline.*global_params.model_aliases"):
        resolve_model_ref("some-org/missing-model", cache_dir=tmp_path)


def test_zoo_references(monkeypatch, tmp_path):
    import auto_merge.zoo

    monkeypatch.setattr(auto_merge.zoo, "zoo_model_path",
                        lambda name, seed=0, cache_dir=None, build=True: tmp_path / f"seed{seed}" / name)
    with pytest.raises(ModelResolutionError, match="unknown zoo model 'llama'; zoo models: base, num, col, wrd"):
        resolve_model_ref("zoo:llama", build_zoo=False)
    with pytest.raises(ModelResolutionError, match="is not built.*auto-merge zoo build --seed 2"):
        resolve_model_ref("zoo:num", zoo_seed=2, build_zoo=False)
    (tmp_path / "seed2" / "num").mkdir(parents=True)
    assert resolve_model_ref("alias", aliases={"alias": "zoo:num"}, zoo_seed=2) == tmp_path / "seed2" / "num"


# ---------------------------------------------------------------------------------------------------------------
# model metadata from headers


def test_tensor_names_from_safetensors_header_match_safe_open(tiny_models):
    from safetensors import safe_open

    folder = tiny_models["tiny-llama"]
    with safe_open(folder / "model.safetensors", framework="np") as handle:
        expected = sorted(handle.keys())
    assert list_tensor_names(folder) == expected
    assert "model.layers.3.self_attn.q_proj.weight" in expected
    assert read_model_config(folder)["num_hidden_layers"] == 4


def test_tensor_names_from_sharded_index(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"a.weight": np.zeros(2, dtype=np.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": np.zeros(2, dtype=np.float32)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"b.weight": "model-00002-of-00002.safetensors",
                                            "a.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert list_tensor_names(tmp_path) == ["a.weight", "b.weight"]
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelInspectionError, match="shards that are missing: model-00002-of-00002.safetensors"):
        list_tensor_names(tmp_path)


def test_pickle_checkpoints_need_allow_pickle(tiny_models):
    folder = tiny_models["tiny-llama-pickle"]
    with pytest.raises(ModelInspectionError, match="refused because unpickling can run code"):
        list_tensor_names(folder)
    assert "lm_head.weight" in list_tensor_names(folder, allow_pickle=True)


def test_broken_model_folders(tmp_path):
    with pytest.raises(ModelInspectionError, match="no config.json"):
        read_model_config(tmp_path)
    with pytest.raises(ModelInspectionError, match="no checkpoint in"):
        list_tensor_names(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelInspectionError, match="truncated or corrupt: its header length"):
        list_tensor_names(tmp_path)
