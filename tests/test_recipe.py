"""Recipes: mergekit YAML and the reference's slice format, parameter filters and gradients, errors with key paths,
compilation into per-tensor plans (on header-only synthetic models) and the mergekit export."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from auto_merge.formats.mergekit import MergekitExportError, to_mergekit, to_mergekit_yaml
from auto_merge.formats.recipe_files import load_recipe
from auto_merge.formats.reference_recipe import read_recipe
from auto_merge.merge.io import TensorInfo
from auto_merge.merge.plan import ModelCatalog, SourceModel, compile_plan
from auto_merge.models.layers import layer_index, layer_key
from auto_merge.merge.param_values import ParamEntry, evaluate_setting, interpolate
from auto_merge.merge.recipe import RecipeError, parse_recipe

RECIPES = Path(__file__).parent / "data" / "recipes"
MERGEKIT_KINDS = ["linear", "gradient_slerp", "ties", "dare_ties", "passthrough"]


def recipe(text: str, source: str = "recipe.yml"):
    """A recipe as read from a user's file (the reference's format is translated on reading)."""
    return read_recipe(yaml.safe_load(text), source=source)


def entries(*pairs) -> tuple[ParamEntry, ...]:
    return tuple(ParamEntry(filter=f, value=v) for f, v in pairs)


# ------------------------------------------------------------------------------------------------- values
def test_gradients_interpolate_piecewise_linearly_across_the_slice():
    gradient = (0, 0.5, 0.3, 0.7, 1)
    assert interpolate(gradient, 0.0) == 0
    assert interpolate(gradient, 1.0) == 1
    assert interpolate(gradient, 0.25) == 0.5  # exactly on the second knot
    # Layer 3 of 8 sits at 3/7: 12/7 knots in, 5/7 of the way from 0.5 to 0.3.
    assert interpolate(gradient, 3 / 7) == pytest.approx(0.5 + (0.3 - 0.5) * 5 / 7)
    assert interpolate((2.0,), 0.4) == 2.0
    assert interpolate((True, False), 0.4) is True  # non-numbers are steps
    assert interpolate((True, False), 1.0) is False


def test_first_matching_filter_wins_and_the_unfiltered_entry_is_the_fallback_wherever_written():
    setting = entries((None, 0.5), ("self_attn", 0.1), ("attn", 0.2))
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0) == 0.1
    assert evaluate_setting(setting, "model.layers.0.cross_attn.q_proj.weight", 0) == 0.2
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", 0) == 0.5
    assert evaluate_setting(entries(("mlp", 1.0)), "model.norm.weight", 0) is None
    assert evaluate_setting(entries(("*", 3.0)), "anything", 0) == 3.0


def test_layer_numbers_are_found_in_the_usual_naming_schemes():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("model.decoder.layers.7.fc1.weight") == 7
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_key("transformer.h.3.ln_1.bias") == ("transformer.h.", ".ln_1.bias")


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("kind", MERGEKIT_KINDS + ["reference_slices"])
def test_shipped_recipes_parse_and_round_trip_through_yaml(kind):
    parsed = load_recipe(RECIPES / f"{kind}.yml")
    assert parse_recipe(yaml.safe_load(parsed.to_yaml())) == parsed


def test_mergekit_spellings_normalise_to_filter_value_entries():
    parsed = load_recipe(RECIPES / "ties.yml")
    assert parsed.models[0].parameters["density"] == entries((None, (1, 0.7, 0.1)))
    assert parsed.models[2].parameters["weight"] == entries(("mlp", 0.5), (None, 0))
    assert parsed.parameters["int8_mask"] == entries((None, True))
    single = recipe("models: [{model: a, parameters: {weight: {filter: mlp, value: 2}}}]\nmerge_method: linear")
    assert single.models[0].parameters["weight"] == entries(("mlp", 2))


def test_reference_slices_translate_to_registry_parameters():
    parsed = load_recipe(RECIPES / "reference_slices.yml")
    first, second = parsed.slices
    assert first.merge_method == "ties"
    density = first.parameters["density"]  # param_value_mask_rate r → density 1 - r
    assert [(e.filter, e.value) for e in density] == [("mlp", pytest.approx(0.7)), (None, 0.5)]
    assert first.parameters["lambda"] == entries((None, 0.9))
    assert first.parameters["weight"] == entries((None, 1.0))
    assert second.merge_method == "task_arithmetic"
    assert (second.base_model, second.base_layer_range) == ("zoo:base", (4, 8))


def test_reference_linear_weights_are_split_over_sources_and_slerp_starts_at_the_first_source():
    parsed = recipe("""
slices:
  - sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 2]}]
    merging_method: {linear: {weights: [{filter: mlp, value: [0.2, 0.8]}, {value: [0.5, 0.5]}]}}
  - sources: [{model: b, layer_range: [2, 4]}, {model: a, layer_range: [2, 4]}]
    merging_method: {slerp: {slerp_t: [{value: 0.3}]}}
""")
    linear, slerp = parsed.slices
    assert linear.sources[0].parameters["weight"] == entries(("mlp", 0.2), (None, 0.5))
    assert linear.sources[1].parameters["weight"] == entries(("mlp", 0.8), (None, 0.5))
    assert (slerp.base_model, slerp.base_layer_range) == ("b", (2, 4))
    assert slerp.parameters["t"] == entries((None, 0.3))


def test_reference_normal_models_format_is_accepted():
    parsed = recipe("""
base_model: zoo:base
models: [{model: zoo:num}, {model: zoo:wrd}]
merging_method: {task_arithmetic: {scaling_coefficient: [{value: 0.7}]}}
""")
    assert parsed.merge_method == "task_arithmetic"
    assert parsed.parameters["lambda"] == entries((None, 0.7))


BAD_RECIPES = [
    ("models: [{model: a, parameters: {weight: 1}}]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]\n"
     "merge_method: linear", "models", "exactly one of"),
    ("slices: [{sources: [{model: a, layer_range: [0, 4]}, {model: b, layer_range: [0, 3]}]}]\n"
     "merge_method: linear", "slices[0].sources[1].layer_range", "equal length"),
    ("slices: [{sources: [{model: a, layer_range: [4, 2]}]}]\nmerge_method: passthrough",
     "slices[0].sources[0].layer_range", "0 <= start < end"),
    ("slices: [{sources: [{model: a, layer_range: [0, 4, 8]}]}]\nmerge_method: passthrough",
     "slices[0].sources[0].layer_range", "at most 2 items"),
    ("models: [{model: a, parameters: {weight: 1}}]\nmerge_method: lerp", "merge_method", "task_arithmetic"),
    ("models: [{model: a, parameters: {weight: 1}}]\nmerge_method: ties", "base_model", "needs a base model"),
    ("models: [{model: a, parameters: {wieght: 1}}]\nmerge_method: linear", "models[0].parameters.wieght",
     "allowed: weight"),
    ("models: [{model: a, parameters: {normalize: false}}]\nmerge_method: linear",
     "models[0].parameters.normalize", "global parameter"),
    ("models: [{model: a, layer_range: [0, 2]}]\nmerge_method: linear", "models[0].layer_range",
     "allowed: model, parameters"),
    ("models: [{model: a}]\nmerge_method: linear\ndtype: float8", "dtype", "bfloat16"),
    ("models: [{model: a}]\nmerge_method: linear\nchat_template: chatmlx", "chat_template", "allowed: auto, alpaca"),
    ("models: [{model: a}]\nmerge_method: linear\nmodules: {}", "modules", "not supported"),
    ("slices: [{sources: [{model: a, layer_range: [0, 2]}], merging_method: {ties: {}, linear: {}}}]",
     "slices[0].merging_method", "exactly one method"),
    ("models: [{model: a, parameters: {weight: [1, 'x']}}]\nmerge_method: linear",
     "models[0].parameters.weight[0].value", "mixes value types"),
]


@pytest.mark.parametrize("text, key, fragment", BAD_RECIPES)
def test_invalid_recipes_name_the_file_and_key(text, key, fragment):
    with pytest.raises(RecipeError) as caught:
        recipe(text, source="bad.yml")
    assert caught.value.key == key
    assert fragment in str(caught.value)
    assert str(caught.value).startswith(f"bad.yml: {key}: ")


def test_multi_document_and_broken_yaml_files_are_refused(tmp_path):
    multi = tmp_path / "multi.yml"
    multi.write_text("models: [{model: a}]\nmerge_method: linear\n---\nmodels: [{model: b}]\nmerge_method: linear\n")
    with pytest.raises(RecipeError, match="multi.yml: expected one YAML document, found 2 .*auto-merge merge"):
        load_recipe(multi)
    broken = tmp_path / "broken.yml"
    broken.write_text("models: [\n")
    with pytest.raises(RecipeError, match="broken.yml: not valid YAML"):
        load_recipe(broken)


# ---------------------------------------------------------------------------- plans on synthetic models
def synthetic_model(ref: str, depth: int, tmp_path: Path, *, vocab: int = 10, hidden: int = 4,
                    tied: bool = False) -> SourceModel:
    """A Llama-like model known only by its headers (no tensor data, no tokenizer)."""
    tensors = {"model.embed_tokens.weight": TensorInfo((vocab, hidden), "float32"),
               "model.norm.weight": TensorInfo((hidden,), "float32")}
    if not tied:
        tensors["lm_head.weight"] = TensorInfo((vocab, hidden), "float32")
    for layer in range(depth):
        tensors[f"model.layers.{layer}.self_attn.q_proj.weight"] = TensorInfo((hidden, hidden), "float32")
        tensors[f"model.layers.{layer}.mlp.up_proj.weight"] = TensorInfo((2 * hidden, hidden), "float32")
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = TensorInfo((hidden,), "float32")
    folder = tmp_path / ref
    folder.mkdir(exist_ok=True)
    config = {"model_type": "llama", "num_hidden_layers": depth, "vocab_size": vocab, "dtype": "bfloat16"}
    return SourceModel(ref=ref, path=folder, config=config, tensors=tensors)


@pytest.fixture
def catalog(tmp_path) -> ModelCatalog:
    catalog = ModelCatalog(build_zoo=False)
    for ref, depth in [("base", 8), ("a", 8), ("b", 8), ("c", 8), ("deep", 12)]:
        catalog.add(synthetic_model(ref, depth, tmp_path))
    catalog.add(synthetic_model("tied", 8, tmp_path, tied=True))
    return catalog


def test_parameters_resolve_per_tensor_with_source_over_slice_over_recipe(catalog):
    parsed = recipe("""
base_model: base
merge_method: ties
parameters: {weight: 0.25, density: 0.9, lambda: [1.0, 2.0]}
slices:
  - sources:
      - {model: a, layer_range: [0, 4], parameters: {weight: [{filter: mlp, value: 0.75}]}}
      - {model: b, layer_range: [4, 8]}
    base_layer_range: [0, 4]
    parameters: {density: [0.2, 0.8]}
""")
    plan = compile_plan(parsed, catalog)
    up = plan.task("model.layers.3.mlp.up_proj.weight")
    q = plan.task("model.layers.3.self_attn.q_proj.weight")
    assert [i.name for i in up.inputs] == ["model.layers.3.mlp.up_proj.weight", "model.layers.7.mlp.up_proj.weight"]
    assert up.base.model == "base" and up.base.name == "model.layers.3.mlp.up_proj.weight"
    up_models, q_models = up.per_model_dicts(), q.per_model_dicts()
    assert [m["weight"] for m in up_models] == [0.75, 0.25]  # source filter, then the recipe-wide value
    assert [m["weight"] for m in q_models] == [0.25, 0.25]  # the source's filter does not match: next level
    assert [m["density"] for m in up_models] == [pytest.approx(0.8)] * 2  # slice gradient at its last layer
    assert up.global_dict()["lambda"] == pytest.approx(2.0)
    assert up.global_dict()["normalize"] is True  # the registry's default, filled in
    assert plan.task("model.layers.0.mlp.up_proj.weight").global_dict()["lambda"] == pytest.approx(1.0)
    # Embeddings come from the first slice, norm and head from the last, all at position 0 (mergekit's t = 0).
    assert plan.task("model.embed_tokens.weight").per_model_dicts()[0]["density"] == pytest.approx(0.2)
    assert plan.task("lm_head.weight").global_dict()["lambda"] == pytest.approx(1.0)
    assert plan.task("model.norm.weight").per_model_dicts()[0]["density"] == pytest.approx(0.2)


def test_gradients_give_the_embeddings_norm_and_head_their_first_value_as_mergekit_does(catalog):
    parsed = recipe("""
base_model: base
merge_method: task_arithmetic
parameters: {lambda: [0.5, 1.5]}
slices:
  - sources: [{model: a, layer_range: [0, 4], parameters: {weight: [0.1, 0.4]}}]
  - sources: [{model: b, layer_range: [4, 8], parameters: {weight: [0.7, 0.2]}}]
    parameters: {lambda: [{filter: norm, value: [3.0, 4.0]}]}
""")
    plan = compile_plan(parsed, catalog)
    weight = lambda name: plan.task(name).per_model_dicts()[0]["weight"]
    assert weight("model.embed_tokens.weight") == pytest.approx(0.1)  # first slice, first value
    assert weight("model.layers.3.mlp.up_proj.weight") == pytest.approx(0.4)  # first slice's last layer
    assert weight("model.layers.7.mlp.up_proj.weight") == pytest.approx(0.2)  # last slice's last layer
    for name in ("model.norm.weight", "lm_head.weight"):  # last slice's sources, at t = 0: first value
        assert plan.task(name).inputs[0].model == "b"
        assert weight(name) == pytest.approx(0.7)
    assert plan.task("lm_head.weight").global_dict()["lambda"] == pytest.approx(0.5)
    assert plan.task("model.norm.weight").global_dict()["lambda"] == pytest.approx(3.0)  # the slice's filter
    assert plan.task("model.embed_tokens.weight").global_dict()["lambda"] == pytest.approx(0.5)


def test_slices_are_stacked_with_consecutive_output_layers(catalog):
    parsed = recipe("""
merge_method: passthrough
slices:
  - sources: [{model: a, layer_range: [0, 6]}]
  - sources: [{model: deep, layer_range: [2, 12]}]
""")
    plan = compile_plan(parsed, catalog)
    assert plan.num_layers == 16
    assert plan.output_config["num_hidden_layers"] == 16
    assert plan.task("model.layers.5.mlp.up_proj.weight").inputs[0].name == "model.layers.5.mlp.up_proj.weight"
    assert plan.task("model.layers.6.mlp.up_proj.weight").inputs[0] .name == "model.layers.2.mlp.up_proj.weight"
    assert plan.task("model.layers.15.mlp.up_proj.weight").inputs[0].model == "deep"
    assert plan.task("model.embed_tokens.weight").inputs[0].model == "a"
    assert plan.task("lm_head.weight").inputs[0].model == "deep"
    assert plan.layer_origins[6] == [("deep", 2)]
    assert plan.out_dtype == "bfloat16"  # no dtype in the recipe: the template's


def test_a_tied_model_supplies_its_embedding_for_the_head(catalog):
    plan = compile_plan(recipe("models: [{model: a, parameters: {weight: 1}}, {model: tied, parameters: "
                               "{weight: 1}}]\nmerge_method: linear"), catalog)
    head = plan.task("lm_head.weight")
    assert [(i.model, i.name) for i in head.inputs] == [("a", "lm_head.weight"), ("tied", "model.embed_tokens.weight")]
    tied_only = compile_plan(recipe("models: [{model: tied, parameters: {weight: 1}}]\nmerge_method: linear"),
                             catalog)
    assert "lm_head.weight" not in {task.name for task in tied_only.tasks}


PLAN_ERRORS = [
    ("models: [{model: a, parameters: {weight: 1}}, {model: deep, parameters: {weight: 1}}]\nmerge_method: linear",
     "models[1].model", "12 layers"),
    ("slices: [{sources: [{model: a, layer_range: [0, 9]}]}]\nmerge_method: passthrough",
     "slices[0].sources[0].layer_range", "within [0, 8]"),
    ("base_model: base\nmerge_method: ties\nslices: [{sources: [{model: a, layer_range: [0, 4]}, "
     "{model: b, layer_range: [2, 6]}], parameters: {weight: 1}}]", "slices[0].base_layer_range",
     "which base layers"),
    ("base_model: base\nmerge_method: ties\nmodels: [{model: a, parameters: {weight: 1, density: 1.5}}]",
     "models[0].parameters.density", "'density' is out of range"),
    ("base_model: base\nmerge_method: ties\nparameters: {density: 0}\nmodels: [{model: a, parameters: {weight: 1}}]",
     "parameters.density", "'density' is out of range"),
    ("base_model: base\nmerge_method: slerp\nslices: [{sources: [{model: a, layer_range: [0, 2]}], parameters: "
     "{t: [{filter: mlp, value: 0.3}, {value: true}]}}]", "slices[0].parameters.t", "must be a number"),
    ("merge_method: passthrough\nmodels: [{model: a}, {model: b}]", "models", "exactly 1 non-base model"),
    ("merge_method: linear\nmodels: [{model: a}]", "models[0].parameters.weight", "missing required parameter 'weight'"),
    ("merge_method: linear\nmodels: [{model: nowhere, parameters: {weight: 1}}]", "models[0].model",
     "not available offline"),
]


@pytest.mark.parametrize("text, key, fragment", PLAN_ERRORS)
def test_plan_errors_name_the_recipe_key_before_any_tensor_is_read(catalog, text, key, fragment):
    with pytest.raises(RecipeError) as caught:
        compile_plan(recipe(text), catalog, source="bad.yml")
    assert caught.value.key == key
    assert fragment in str(caught.value)


# ------------------------------------------------------------------------------------------ mergekit export
@pytest.mark.parametrize("kind", MERGEKIT_KINDS)
def test_mergekit_examples_export_to_equivalent_mergekit_yaml(kind, catalog):
    original = load_recipe(RECIPES / f"{kind}.yml")
    (document,) = to_mergekit(original)
    source = yaml.safe_load((RECIPES / f"{kind}.yml").read_text())
    for key in ("merge_method", "base_model", "models", "slices", "parameters"):
        if key in source and key != "models":
            assert document[key] == source[key], key
    if "models" in source:
        assert [m["model"] for m in document["models"]] == [m["model"] for m in source["models"]]
        assert [m.get("parameters") for m in document["models"]] == [m.get("parameters") for m in source["models"]]
    assert document["dtype"] == "float32"  # this engine's maths; the recipe's dtype is the output's
    assert document.get("out_dtype", "float32") == source["dtype"]
    reread = parse_recipe(document)
    assert reread.models == original.models and reread.slices == original.slices


def test_export_adds_the_base_as_a_source_and_renames_models():
    parsed = recipe("base_model: zoo:base\nmerge_method: task_arithmetic\nslices: [{sources: [{model: zoo:num, "
                    "layer_range: [2, 4]}], parameters: {weight: 1}}]")
    text = to_mergekit_yaml(parsed, model_names={"zoo:base": "/m/base", "zoo:num": "/m/num"})
    (document,) = yaml.safe_load_all(text)
    assert document["base_model"] == "/m/base"
    assert document["slices"][0]["sources"] == [{"model": "/m/num", "layer_range": [2, 4]},
                                                {"model": "/m/base", "layer_range": [2, 4]}]


def test_per_slice_methods_export_as_mergekit_multi_stages():
    documents = list(yaml.safe_load_all(to_mergekit_yaml(load_recipe(RECIPES / "reference_slices.yml"))))
    assert [d.get("name") for d in documents] == ["slice-0", "slice-1", None]
    assert [d["merge_method"] for d in documents] == ["ties", "task_arithmetic", "passthrough"]
    assert documents[1]["slices"][0]["sources"][-1] == {"model": "zoo:base", "layer_range": [4, 8]}
    assert documents[2]["slices"] == [{"sources": [{"model": "slice-0", "layer_range": [0, 4]}]},
                                      {"sources": [{"model": "slice-1", "layer_range": [0, 4]}]}]


def test_export_refuses_what_mergekit_cannot_do():
    with pytest.raises(MergekitExportError, match="no method 'fourier'"):
        to_mergekit(recipe("base_model: b\nmerge_method: fourier\nmodels: [{model: a, parameters: {weight: 1}}]"))
    with pytest.raises(MergekitExportError, match="rescale_mode"):
        to_mergekit(recipe("base_model: b\nmerge_method: dare_ties\nparameters: {rescale_mode: inverse_p}\n"
                           "models: [{model: a, parameters: {weight: 1}}]"))
    exported = to_mergekit(recipe("base_model: b\nmerge_method: dare_ties\nparameters: {rescale_mode: none}\n"
                                  "models: [{model: a, parameters: {weight: 1}}]"))
    assert exported[0]["parameters"] == {"rescale": False}
