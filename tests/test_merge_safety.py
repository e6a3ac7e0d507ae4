"""`auto-merge merge` never writes a broken checkpoint silently (issue 12 D15): NaN/inf results are refused, and
models whose config.json says another architecture are refused before any weight is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from auto_merge.cli import main
from auto_merge.merge.engine import NonFiniteOutputError, run_recipe
from auto_merge.merge.recipe import RecipeError
from auto_merge.zoo import zoo_root


@pytest.fixture
def work(tmp_path) -> Path:
    for name in ("base", "num", "col"):
        shutil.copytree(zoo_root(0) / name, tmp_path / name)
    return tmp_path


def _recipe(folder: Path) -> Path:
    path = folder / "recipe.yml"
    path.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(folder / "base"),
        "models": [{"model": str(folder / n), "parameters": {"weight": 0.7}} for n in ("num", "col")]}))
    return path


def test_a_nan_in_a_source_is_refused_and_nothing_is_written(work, capsys):
    from safetensors.torch import load_file, save_file

    weights = load_file(work / "col" / "model.safetensors")
    weights["model.layers.3.self_attn.q_proj.weight"][2, 5] = float("inf")
    save_file(weights, work / "col" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteOutputError, match=r"model\.layers\.3\.self_attn\.q_proj\.weight has 1 NaN"):
        run_recipe(_recipe(work), work / "out")
    assert not (work / "out").exists()
    assert sorted(p.name for p in work.iterdir()) == ["base", "col", "num", "recipe.yml"]  # no temporary left
    assert main(["merge", str(_recipe(work)), str(work / "out"), "--no-progress"]) == 2
    assert "NaN or infinite" in capsys.readouterr().err


def test_a_base_whose_config_says_another_architecture_is_refused(work):
    config = json.loads((work / "base" / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (work / "base" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RecipeError, match=r"does not share the architecture.*model_type 'llama' \(base: 'gpt2'\)"):
        run_recipe(_recipe(work), work / "out")
    assert not (work / "out").exists()


def test_a_clean_merge_still_writes(work):
    result = run_recipe(_recipe(work), work / "out")
    assert (result.out_dir / "model.safetensors").is_file()
