"""Extension points (docs/extending.md): every registered method is usable in configs and LFS from its spec alone, and
a method in a file outside the package, registered through the `auto_merge.methods` entry point, works in a recipe
and in an LFS config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from auto_merge.config.errors import SourceMap
from auto_merge.config.schema import validate_experiment_data
from auto_merge.merge.methods import get_method, list_methods
from auto_merge.merge.plan import ModelCatalog, compile_plan
from auto_merge.merge.recipe import parse_recipe
from auto_merge.strategies.lfs import LFSStrategy
from auto_merge.strategies.oneshot import block_to_recipe

REPO = Path(__file__).resolve().parents[1]
EXPERTS = ("zoo:num", "zoo:col", "zoo:wrd")
EVALUATION = {"tasks": [{"task": "zoo_num", "metric": "exact_match,none"}]}


def _valid_value(param):
    """A value inside the parameter's range (its default when it has one)."""
    if param.default is not None:
        return param.default
    if param.value_type is bool:
        return True
    if param.value_type is str:
        return param.choices[0]
    low = param.low if param.low is not None else (param.high - 1.0 if param.high is not None else 0.0)
    high = param.high if param.high is not None else low + 1.0
    return (low + high) / 2


def _one_shot_block(method: str) -> dict:
    """A normal_models block for `method`: as many experts as its spec takes (at most 3), every required parameter
    set, per-model ones in each model's own parameters."""
    spec = get_method(method)
    low, high = spec.config_model_count()
    count = max(low, min(3, high if high is not None else 3))
    models = [{"model": EXPERTS[i]} for i in range(count)]
    shared = {}
    for param in spec.params:
        if not param.required:
            continue
        if param.scope == "per_model":
            for entry in models:
                entry.setdefault("parameters", {})[param.name] = [{"value": _valid_value(param)}]
        else:
            shared[param.name] = [{"value": _valid_value(param)}]
    return {"base_model": "zoo:base", "models": models, "merging_method": {method: shared}}


@pytest.mark.parametrize("method", list_methods())
def test_every_registered_method_is_accepted_by_config_validation_and_merges_on_the_zoo(method):
    block = _one_shot_block(method)
    data = {"strategy": "normal_models", "global_params": {"evaluation": EVALUATION},
            "strategies": {"normal_models": block}}
    config = validate_experiment_data(data, SourceMap(root_file=Path("inline.yaml")))
    recipe = block_to_recipe("normal_models", config.selected)
    plan = compile_plan(parse_recipe(recipe), ModelCatalog())
    assert any(task.method == method for task in plan.tasks)


@pytest.mark.parametrize("method", [m for m in list_methods() if get_method(m).searchable])
def test_every_searchable_method_gives_lfs_a_space_whose_samples_compile(method):
    spec = get_method(method)
    low, high = spec.config_model_count()
    experts = EXPERTS[:1] if high == 1 else EXPERTS  # nearswap, arcee_fusion: one expert merged into the base
    strategy = LFSStrategy(base_model="zoo:base", models=experts, num_layers=8, layer_granularity=4,
                           filters=("mlp",), method_ranges={method: {}})
    space = strategy.build_space(seed=0)
    searched = [p.name for p in spec.params if p.searched is not None]
    assert all(any(f":{method}:{name}" in key for key in space) for name in searched), list(space)
    catalog = ModelCatalog()
    for configuration in space.sample_configuration(3):
        recipe = strategy.decode(configuration)
        assert [piece["merge_method"] for piece in recipe["slices"]] == [method, method]
        plan = compile_plan(parse_recipe(recipe), catalog)  # validates every tensor's parameters against the spec
        assert any(task.method == method for task in plan.tasks)


def test_lfs_config_rejects_methods_the_spec_says_are_not_searchable():
    data = {"strategy": "lfs", "global_params": {"evaluation": EVALUATION},
            "strategies": {"lfs": {"base_model": "zoo:base", "models": list(EXPERTS), "layer_granularity": 4,
                                   "n_trials": 3, "merging_method": {"passthrough": None}}}}
    from auto_merge.config.errors import ConfigError

    with pytest.raises(ConfigError, match=r"merging_method\.passthrough: method 'passthrough' cannot be searched here"):
        validate_experiment_data(data, SourceMap(root_file=Path("inline.yaml")))


TOY_METHOD = '''
"""A merge method outside the package: base + strength * the mean task vector."""

from auto_merge.merge.methods import ParamSpec, Searched, register_method


@register_method(
    "toy_mix",
    params=(ParamSpec("strength", "global", float, default=1.0, low=0.0, high=2.0,
                      searched=Searched(default=(0.0, 1.0))),),
    base_model="required",
    min_models=1,
    max_models=None,
)
def toy_mix(inputs):
    deltas = [tensor - inputs.base for tensor in inputs.tensors]
    return inputs.base + inputs.param("strength") * sum(deltas) / len(deltas)
'''

TOY_CHECK = '''
import json, sys
from pathlib import Path

import torch, yaml
from safetensors.torch import load_file

from auto_merge.cli import main
from auto_merge.config import ConfigError, load_experiment
from auto_merge.merge.plan import ModelCatalog, compile_plan
from auto_merge.merge.recipe import parse_recipe
from auto_merge.strategies import build_strategy

work, zoo = Path(sys.argv[1]), Path(sys.argv[2])
report = {}

# 1. a recipe: merge_method toy_mix, written to disk by the merge command
recipe = {"merge_method": "toy_mix", "base_model": str(zoo / "base"), "dtype": "float32",
          "models": [{"model": str(zoo / "num")}, {"model": str(zoo / "col")}], "parameters": {"strength": 0.5}}
(work / "recipe.yml").write_text(yaml.safe_dump(recipe))
assert main(["merge", str(work / "recipe.yml"), str(work / "out"), "--no-progress"]) == 0
out = load_file(work / "out" / "model.safetensors")
base, num, col = (load_file(zoo / name / "model.safetensors") for name in ("base", "num", "col"))
report["max_error"] = max(float((out[k] - (base[k] + 0.5 * ((num[k] - base[k]) + (col[k] - base[k])) / 2)).abs().max())
                          for k in out)
report["tensors"] = len(out)

# 2. an LFS config that searches it: validated against the plugin's spec, searched over its range, decoded
config_text = (work / "lfs.yaml").read_text()
config = load_experiment(work / "lfs.yaml")
strategy = build_strategy(config)
space = strategy.build_space(seed=0)
strengths = []
for configuration in space.sample_configuration(8):
    recipe = strategy.decode(configuration)
    for piece in recipe["slices"]:
        if piece["merge_method"] == "toy_mix":
            strengths += [entry["value"] for entry in piece["parameters"]["strength"]]
    compile_plan(parse_recipe(recipe), ModelCatalog())
report["strengths"] = strengths
(work / "bad.yaml").write_text(config_text.replace("max: 0.8", "max: 3.0"))
try:
    load_experiment(work / "bad.yaml", check_models=False)
except ConfigError as error:
    report["bad_range_error"] = str(error)
print(json.dumps(report))
'''


def _install_plugin(site: Path) -> None:
    """A one-file plugin with its entry point, as `pip install` of a package declaring it would leave it."""
    (site / "toy_method.py").write_text(TOY_METHOD)
    info = site / "toy_method-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-method\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[auto_merge.methods]\ntoy_mix = toy_method\n")


def test_a_method_from_an_installed_plugin_works_in_a_recipe_and_in_an_lfs_config(tmp_path, diverse_zoo):
    site = tmp_path / "site"
    site.mkdir()
    _install_plugin(site)
    lfs = {"strategy": "lfs",
           "global_params": {"evaluation": {**EVALUATION, "include_path": str(REPO / "custom_tasks")}},
           "strategies": {"lfs": {"base_model": str(diverse_zoo / "base"),
                                  "models": [str(diverse_zoo / name) for name in ("num", "col", "wrd")],
                                  "layer_granularity": 4, "n_trials": 3, "filters": ["mlp"],
                                  "merging_method": {"toy_mix": {"strength": {"min": 0.2, "max": 0.8}},
                                                     "linear": None}}}}
    (tmp_path / "lfs.yaml").write_text(yaml.safe_dump(lfs))
    env = {"PYTHONPATH": f"{site}:{REPO}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", TOY_CHECK, str(tmp_path), str(diverse_zoo)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tensors"] > 0 and report["max_error"] < 1e-6
    assert report["strengths"] and all(0.2 <= value <= 0.8 for value in report["strengths"])
    assert len(set(report["strengths"])) > 1  # searched, not fixed
    assert "toy_mix.strength.max: 3 is out of range" in report["bad_range_error"]
    assert "0 <= value <= 2" in report["bad_range_error"]


def test_a_broken_plugin_fails_with_one_error_naming_its_entry_point(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    info = site / "broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[auto_merge.methods]\nbroken = no_such_module_here\n")
    env = {"PYTHONPATH": f"{site}:{REPO}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", "import auto_merge.merge.methods"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode != 0
    assert "entry point 'broken' = 'no_such_module_here' of group auto_merge.methods (package broken) failed to load" \
        in result.stderr


def test_reading_the_method_specs_imports_no_torch():
    code = ("import sys, auto_merge.merge.methods as m, auto_merge.config.schema; "
            "m.get_method('ties').param('density'); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "False"


TOY_STRATEGY = '''
"""A search strategy outside the package: uniform task arithmetic with one searched lambda."""

from pydantic import Field

from auto_merge.config.blocks import MODEL_REFERENCE, SearchSettings
from auto_merge.strategies import Strategy, register_strategy


class UniformBlock(SearchSettings):
    base_model: str = Field(min_length=1, description=MODEL_REFERENCE)
    models: list[str] = Field(min_length=1, description="experts")
    lambda_max: float = Field(1.5, gt=0, le=3, description="upper end of the searched lambda")


class UniformStrategy(Strategy):
    name = "uniform_ta"

    def __init__(self, base_model, models, lambda_max):
        self.base_model, self.models, self.lambda_max = base_model, tuple(models), lambda_max

    def build_space(self, seed=0):
        from ConfigSpace import ConfigurationSpace, Float

        space = ConfigurationSpace(seed=seed)
        space.add(Float("lambda", (0.0, self.lambda_max), default=0.5))
        return space

    def initial_configurations(self, space):
        return []

    def decode(self, configuration, *, as_reference=False):
        return {"merge_method": "task_arithmetic", "base_model": self.base_model, "dtype": "float32",
                "models": [{"model": model} for model in self.models],
                "parameters": {"weight": 1.0, "lambda": float(configuration["lambda"])}}

    def describe(self):
        return {"strategy": self.name, "base_model": self.base_model, "models": list(self.models),
                "lambda_max": self.lambda_max}

    @classmethod
    def from_description(cls, data):
        return cls(data["base_model"], data["models"], data["lambda_max"])


register_strategy("uniform_ta", block=UniformBlock,
                  build=lambda config, block: UniformStrategy(block.base_model, block.models, block.lambda_max),
                  from_description=UniformStrategy.from_description)
'''


def test_a_strategy_from_an_installed_plugin_runs_a_search_and_replays(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "toy_strategy.py").write_text(TOY_STRATEGY)
    info = site / "toy_strategy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-strategy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[auto_merge.strategies]\nuniform_ta = toy_strategy\n")
    block = {"base_model": "zoo:base", "models": list(EXPERTS), "lambda_max": 1.2, "n_trials": 3,
             "min_budget": 10, "max_budget": 10, "n_workers": 1, "optimizer": "random"}
    config = {"strategy": "uniform_ta",
              "global_params": {"random_seed": 0, "baselines": False, "output_path": str(tmp_path / "runs"),
                                "evaluation": {"device": "cpu", "include_path": str(REPO / "custom_tasks"),
                                               "tasks": [{"task": "zoo_num", "metric": "exact_match,none"}]}},
              "strategies": {"uniform_ta": block}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config))
    env = {"PYTHONPATH": f"{site}:{REPO}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
           "AUTO_MERGE_CACHE": str(tmp_path / "cache")}
    cli = [sys.executable, "-m", "auto_merge.cli"]
    search = subprocess.run([*cli, "search", "--config", str(tmp_path / "exp.yaml"), "--no-model"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert search.returncode == 0, search.stderr[-3000:]
    run = tmp_path / "runs" / "uniform_ta"
    trials = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 3 and all(0.0 <= t["configuration"]["lambda"] <= 1.2 for t in trials)
    assert all(t.get("score") is not None for t in trials)
    (found,) = sorted((run / "search_config").glob("*.json"))[:1]
    assert json.loads(found.read_text())["strategy"]["strategy"] == "uniform_ta"
    replay = subprocess.run([*cli, "replay", str(found), str(tmp_path / "replayed")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stderr[-3000:]
    assert (tmp_path / "replayed" / "config.json").is_file()

    bad = {**config, "strategies": {"uniform_ta": {**block, "lambda_max": 5}}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    refused = subprocess.run([*cli, "search", "--config", str(tmp_path / "bad.yaml"), "--dry-run"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "strategies.uniform_ta.lambda_max: 5 is out of range" in refused.stderr
