"""Models are checked from their headers and config before any weight is read, and the user's opt-ins reach every
place that opens a model (issue 12: D5, D6 in part, D11 in part)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from auto_merge.config import ConfigError, load_experiment
from auto_merge.models.inspect import ModelInspectionError, read_safetensors_header
from auto_merge.zoo import zoo_root

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def work(tmp_path) -> Path:
    for name in ("base", "num", "col"):
        shutil.copytree(zoo_root(0) / name, tmp_path / name)
    return tmp_path


def _config(folder: Path, *, n_trials: int = 2, **global_params) -> Path:
    config = {
        "strategy": "lfs",
        "global_params": {"output_path": str(folder / "runs"), "baselines": False, **global_params, "evaluation": {
            "include_path": str(REPO / "custom_tasks"), "tasks": [{"task": "zoo_num", "metric": "exact_match,none"}]}},
        "strategies": {"lfs": {
            "base_model": "base", "models": ["num", "col"], "layer_granularity": 4,
            "merging_method": {"task_arithmetic": {"scaling_coefficient": {"min": 0.3, "max": 1.2}}},
            "min_budget": 10, "max_budget": 30, "n_trials": n_trials, "n_workers": 1}},
    }
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "auto_merge.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def _truncate(file: Path, keep_bytes: int) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:keep_bytes])


def test_a_truncated_safetensors_is_found_from_its_header(work):
    file = work / "col" / "model.safetensors"
    _truncate(file, file.stat().st_size - 4096)
    with pytest.raises(ModelInspectionError, match="truncated or corrupt.*interrupted download"):
        read_safetensors_header(file)
    with pytest.raises(ConfigError, match=r"strategies\.lfs\.models\[1\].*truncated or corrupt"):
        load_experiment(_config(work))


def test_a_missing_or_reshaped_tensor_behind_an_identical_config_is_found_before_loading(work):
    from safetensors.torch import load_file, save_file

    weights = load_file(work / "col" / "model.safetensors")
    del weights["model.layers.5.mlp.up_proj.weight"]
    weights["model.layers.2.self_attn.q_proj.weight"] = weights["model.layers.2.self_attn.q_proj.weight"][:32]
    save_file(weights, work / "col" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError) as error:
        load_experiment(_config(work))
    message = str(error.value)
    assert "models[1]" in message and "missing 1 tensor(s) of the base, e.g. model.layers.5.mlp.up_proj.weight" in \
        message
    assert "model.layers.2.self_attn.q_proj.weight [32, 64] (base: [64, 64])" in message


def test_custom_code_models_need_trust_remote_code(work):
    config = json.loads((work / "num" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MineForCausalLM"}
    (work / "num" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"models\[0\].*needs custom code.*trust_remote_code: true"):
        load_experiment(_config(work))
    load_experiment(_config(work, trust_remote_code=True))  # opted in: accepted


def test_merge_output_keeps_auto_map_only_with_its_code(work):
    from auto_merge.merge.engine import run_recipe

    config = json.loads((work / "base" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MineForCausalLM"}
    (work / "base" / "config.json").write_text(json.dumps(config))
    recipe = {"merge_method": "task_arithmetic", "base_model": str(work / "base"),
              "models": [{"model": str(work / "num"), "parameters": {"weight": 1.0}}]}
    (work / "r.yml").write_text(yaml.safe_dump(recipe))
    run_recipe(work / "r.yml", work / "no_code")
    assert "auto_map" not in json.loads((work / "no_code" / "config.json").read_text())
    (work / "base" / "modeling_mine.py").write_text("# the model's code\n")
    run_recipe(work / "r.yml", work / "with_code")
    assert json.loads((work / "with_code" / "config.json").read_text())["auto_map"]
    assert (work / "with_code" / "modeling_mine.py").read_text() == "# the model's code\n"


def _pickle_only(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def test_allow_pickle_reaches_the_search_trials(work):
    """D5: with a pickle-only expert, every trial crashed asking for the opt-in that was set."""
    from auto_merge.search.driver import run_search
    from auto_merge.search.outputs import read_trials

    _pickle_only(work / "num")
    with pytest.raises(ConfigError, match="pickle"):
        load_experiment(_config(work))
    result = run_search(_config(work, allow_pickle=True), show_progress=False, write_model=True)
    trials = read_trials(result.run_dir / "trials.jsonl")
    assert trials and all(t["status"] == "success" for t in trials), [t.get("error") for t in trials]
    assert (result.best_model / "model.safetensors").is_file()


def test_eval_refuses_bad_input_in_one_line_and_takes_the_opt_ins(work):
    _pickle_only(work / "num")
    refused = _cli("eval", "--model", "num", "--tasks", "zoo_num", "--limit", "8", cwd=work)
    assert refused.returncode == 2 and "pass --allow-pickle" in refused.stderr and "Traceback" not in refused.stderr
    allowed = _cli("eval", "--model", "num", "--tasks", "zoo_num", "--limit", "8", "--allow-pickle",
                   "--include-path", str(REPO / "custom_tasks"), cwd=work)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "1.000" in allowed.stdout
    negative = _cli("eval", "--model", "col", "--tasks", "zoo_num", "--limit", "-3", cwd=work)
    assert negative.returncode == 2 and "--limit -3" in negative.stderr and "Traceback" not in negative.stderr
    _truncate(work / "col" / "model.safetensors", 1000)
    truncated = _cli("eval", "--model", "col", "--tasks", "zoo_num", cwd=work)
    assert truncated.returncode == 2 and "truncated or corrupt" in truncated.stderr
    assert "Traceback" not in truncated.stderr
