"""mergekit-multi files: several recipe documents, each with a `name`, a later stage merging an earlier one's output
by naming it; `auto-merge merge FILE OUT_DIR` runs them in order, the final merge in OUT_DIR, the other stages in
OUT_DIR.stages/NAME, each written atomically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from auto_merge.cli import main
from auto_merge.formats.mergekit import to_mergekit_yaml
from auto_merge.merge.engine import RECIPE_FILE, run_recipe, run_stages, stage_folders
from auto_merge.formats.recipe_files import load_recipe, load_stages
from auto_merge.merge.recipe import RecipeError
from auto_merge.output_dirs import OutputDirError

torch.set_num_threads(1)
RECIPES = Path(__file__).parent / "data" / "recipes"

# The final merge comes first in the file and `mix` uses `ta`, defined after it: stages run in dependency order.
MULTI = """\
merge_method: slerp
base_model: zoo:base
slices:
  - sources: [{model: zoo:base, layer_range: [0, 8]}, {model: mix, layer_range: [0, 8]}]
parameters: {t: 0.5}
dtype: float32
---
name: mix
merge_method: linear
models:
  - {model: ta, parameters: {weight: 3.0}}
  - {model: zoo:col, parameters: {weight: 1.0}}
dtype: float32
---
name: ta
merge_method: task_arithmetic
base_model: zoo:base
models:
  - {model: zoo:num, parameters: {weight: 0.5}}
  - {model: zoo:wrd, parameters: {weight: 0.25}}
dtype: float32
"""


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


@pytest.fixture(scope="module")
def zoo_state(diverse_zoo):
    """`zoo:NAME` in this module is the zoo whose experts differ in every tensor (conftest.py)."""
    return {name: load_file(diverse_zoo / name / "model.safetensors") for name in ("base", "num", "wrd", "col")}


def write(tmp_path: Path, text: str, name: str = "multi.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_stages_are_ordered_by_use_with_the_unnamed_final_merge_last(tmp_path):
    stages = load_stages(write(tmp_path, MULTI))
    assert [stage.name for stage in stages] == ["ta", "mix", None]
    assert [stage.uses for stage in stages] == [(), ("ta",), ("mix",)]
    assert [stage.final for stage in stages] == [False, False, True]
    folders = stage_folders(stages, tmp_path / "out")
    assert folders[None] == (tmp_path / "out").absolute()
    assert folders["ta"] == (tmp_path / "out.stages" / "ta").absolute()
    # Without an unnamed document the final merge is the last document no other stage uses.
    named = load_stages(write(tmp_path, MULTI.replace("merge_method: slerp", "name: last\nmerge_method: slerp")))
    assert [(stage.name, stage.final) for stage in named] == [("ta", False), ("mix", False), ("last", True)]
    spare = MULTI.replace("merge_method: slerp", "name: last\nmerge_method: slerp") + "---\nname: other\n" + \
        MULTI.split("---\n")[2].split("\n", 1)[1]
    stages = load_stages(write(tmp_path, spare))
    assert [(stage.name, stage.final) for stage in stages] == [("ta", False), ("mix", False), ("last", False),
                                                               ("other", True)]
    single = write(tmp_path, "name: one\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n", "s.yml")
    assert [stage.name for stage in load_stages(single)] == ["one"]
    assert load_recipe(single).models[0].model == "a"
    with pytest.raises(RecipeError, match="found 3 .*mergekit-multi"):
        load_recipe(write(tmp_path, MULTI))


LINEAR = "merge_method: linear\nmodels: [{model: MODEL, parameters: {weight: 1}}]\n"
BAD_FILES = [
    (f"name: a\n{LINEAR}---\nname: a\n{LINEAR}", "(document 2)", "name", "defined twice"),
    (f"{LINEAR}---\n{LINEAR}", "(document 2)", "name", "only the final merge may be unnamed"),
    (f"name: a/b\n{LINEAR}---\n{LINEAR}", "(document 1)", "name", "not a stage name"),
    (f"name: a\n{LINEAR.replace('MODEL', 'a')}---\n{LINEAR}", "(document 1)", "name", "its own output"),
    (f"name: a\n{LINEAR.replace('MODEL', 'b')}---\nname: b\n{LINEAR.replace('MODEL', 'a')}---\n{LINEAR}", "multi.yml",
     None, "in a cycle"),
    (f"name: a\n{LINEAR}---\nname: b\nmerge_method: linear\nmodels: [{{model: a, parameters: {{wieght: 1}}}}]\n",
     "(document 2)", "models[0].parameters.wieght", "unknown parameter"),
]


@pytest.mark.parametrize("text, where, key, fragment", BAD_FILES)
def test_bad_multi_stage_files_name_the_document_and_key(tmp_path, text, where, key, fragment):
    with pytest.raises(RecipeError) as caught:
        load_stages(write(tmp_path, text))
    assert caught.value.key == key
    assert where in str(caught.value) and fragment in str(caught.value)


def test_stages_run_in_order_and_later_stages_merge_earlier_outputs(tmp_path, zoo_state):
    path = write(tmp_path, MULTI)
    outcomes = run_stages(path, tmp_path / "out")
    assert [outcome.out_dir for outcome in outcomes] == [(tmp_path / "out.stages" / "ta").absolute(),
                                                         (tmp_path / "out.stages" / "mix").absolute(),
                                                         (tmp_path / "out").absolute()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yml", "out", "out.stages"]  # no temporaries left
    name = "model.layers.2.mlp.down_proj.weight"
    z = {model: state[name] for model, state in zoo_state.items()}
    ta = z["base"] + 0.5 * (z["num"] - z["base"]) + 0.25 * (z["wrd"] - z["base"])
    torch.testing.assert_close(tensors(tmp_path / "out.stages" / "ta")[name], ta, atol=1e-6, rtol=1e-6)
    mix = (3.0 * ta + z["col"]) / 4.0
    torch.testing.assert_close(tensors(tmp_path / "out.stages" / "mix")[name], mix, atol=1e-6, rtol=1e-6)
    final = tensors(tmp_path / "out")
    from auto_merge.merge.methods import merge_tensor

    torch.testing.assert_close(final[name], merge_tensor("slerp", [mix], z["base"], {"t": 0.5}), atol=1e-6,
                               rtol=1e-6)
    # Each stage's own recipe names the earlier stages' folders, so it remakes that stage alone.
    recorded = load_recipe(tmp_path / "out" / RECIPE_FILE)
    assert recorded.slices[0].sources[1].model == str((tmp_path / "out.stages" / "mix").absolute())
    card = (tmp_path / "out" / "README.md").read_text()
    assert "the final merge (document 1) of the multi-stage recipe multi.yml" in card

    # Nothing is overwritten without --overwrite, and that is found before any stage is merged.
    (tmp_path / "out").rename(tmp_path / "kept")
    before = (tmp_path / "out.stages" / "ta" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(OutputDirError, match="out.stages/ta already exists"):
        run_stages(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    outcomes = run_stages(path, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out.stages" / "ta" / "model.safetensors").stat().st_mtime_ns != before
    assert torch.equal(tensors(tmp_path / "out")[name], final[name])


def test_a_stagewise_mergekit_export_remakes_the_direct_merge(tmp_path):
    """Slices with their own methods export as mergekit-multi stages; running that file gives the direct merge."""
    recipe = load_recipe(RECIPES / "reference_slices.yml")
    exported = write(tmp_path, to_mergekit_yaml(recipe), "exported.yml")
    direct = tensors(run_recipe(parse_float32(recipe), tmp_path / "direct").out_dir)
    assert main(["merge", str(exported), str(tmp_path / "staged"), "--no-progress"]) == 0
    staged = tensors(tmp_path / "staged")
    assert staged.keys() == direct.keys()
    assert all(torch.equal(staged[name], direct[name]) for name in direct)
    assert sorted(p.name for p in (tmp_path / "staged.stages").iterdir()) == ["slice-0", "slice-1"]


def parse_float32(recipe):
    from auto_merge.merge.recipe import parse_recipe

    return parse_recipe({**recipe.to_dict(), "dtype": "float32"})


def test_the_merge_command_dry_runs_a_multi_stage_file_and_reports_errors(tmp_path, capsys):
    path = write(tmp_path, MULTI)
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "== stage 'ta' (document 3)" in printed and "layers 0-7: task_arithmetic" in printed
    assert "== the final merge (document 1)" in printed and "merges the output(s) of 'mix'" in printed
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.stages").exists()
    # Each plannable stage is planned for the machine the flags describe, as a single recipe is.
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run", "--gpu-memory", "24GiB",
                 "--host-memory", "8GiB"]) == 0
    printed = capsys.readouterr().out
    stage = printed[printed.index("== stage 'ta'"):]
    assert "GPU 25.8 GB given" in stage and "host 8.6 GB given" in stage, stage
    missing = write(tmp_path, MULTI.replace("zoo:col", str(tmp_path / "nowhere")), "missing.yml")
    assert main(["merge", str(missing), str(tmp_path / "out")]) != 0
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "out.stages").exists()  # nothing merged: the missing model stopped the run first


def test_stage_names_are_replaced_wherever_a_recipe_names_a_model():
    from auto_merge.merge.recipe import parse_recipe, rename_models

    recipe = parse_recipe({
        "base_model": "st", "merge_method": "task_arithmetic",
        "slices": [{"sources": [{"model": "st", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}],
                    "parameters": {"weight": 1}}],
        "tokenizer": {"source": "st", "tokens": {"<x>": {"source": {"kind": "model_token", "model": "st",
                                                                     "token_id": 3}}}}})
    renamed = rename_models(recipe, {"st": "/abs/st"})
    assert renamed.base_model == "/abs/st" and renamed.slices[0].sources[0].model == "/abs/st"
    assert renamed.tokenizer_source == "/abs/st" and renamed.tokenizer.source == "/abs/st"
    assert renamed.tokenizer.tokens["<x>"].source.model == "/abs/st"
    assert "st" not in renamed.model_refs() and rename_models(recipe, {"zz": "/x"}) is recipe
