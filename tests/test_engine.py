"""The streaming merge engine: mergekit's example kinds on the demo zoo, closed-form spot checks, other architecture
families (Qwen2, GPT-2), tokenizer alignment, sharding, atomic output, lazy reads and the `auto-merge merge` command."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from auto_merge.cli import main
from auto_merge.merge.fused import combination, combine_into, linear_coefficients
from auto_merge.merge.engine import MERGEKIT_FILE, RECIPE_FILE, merge_to_disk, prepare_plan, run_recipe
from auto_merge.merge.io import CheckpointReader, parse_size
from auto_merge.merge.methods import merge_tensor
from auto_merge.formats.recipe_files import load_recipe
from auto_merge.merge.param_values import interpolate
from auto_merge.merge.recipe import RecipeError, parse_recipe
from auto_merge.output_dirs import OutputDirError
from auto_merge.zoo.tokenizer import vocabulary

torch.set_num_threads(1)

RECIPES = Path(__file__).parent / "data" / "recipes"
V = len(vocabulary())  # rows of the zoo's embeddings
EXPECTED = {  # kind → (output layers, output dtype)
    "linear": (8, torch.float16),
    "gradient_slerp": (8, torch.bfloat16),
    "ties": (8, torch.float16),
    "dare_ties": (8, torch.bfloat16),
    "passthrough": (10, torch.float32),
}


@pytest.fixture(scope="module", autouse=True)
def zoo(diverse_zoo) -> Path:
    """The zoo with experts that differ in every tensor (conftest.py), as `zoo:NAME` for the whole module."""
    return diverse_zoo


@pytest.fixture(scope="module")
def zoo_state(zoo):
    return {name: load_file(zoo / name / "model.safetensors") for name in ("base", "num", "wrd", "col")}


@pytest.fixture(scope="module")
def merged(zoo, tmp_path_factory) -> dict[str, Path]:
    """Every mergekit example kind, merged once for the module."""
    root = tmp_path_factory.mktemp("merged")
    return {kind: run_recipe(RECIPES / f"{kind}.yml", root / kind).out_dir for kind in EXPECTED}


def output_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an output, read with the safetensors library (independent of this project's reader)."""
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def fused_reference(method, tensors, base, global_params, per_model_params):
    """What the engine computes for a fixed linear combination (auto_merge.merge.fused), from the tensors alone."""
    form = linear_coefficients(method, global_params, per_model_params, has_base=base is not None)
    out = torch.empty(tensors[0].shape)
    return combine_into(out, combination(form, (base, None) if base is not None else None,
                                         [(tensor, None) for tensor in tensors]))


def within_fp32_rounding(actual, expected, *operands, ulps=8):
    """|actual - expected| <= ulps ulp of the largest of |expected| and the operands' magnitudes there."""
    magnitude = expected.abs()
    for operand in operands:
        magnitude = torch.maximum(magnitude, operand.abs())
    return bool(((actual.float() - expected).abs() <= ulps * 2.0 ** -23 * magnitude).all())


def load_and_generate(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = torch.tensor([[1, 5, 6, 7]])
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                               pad_token_id=0)
    assert generated.shape[0] == 1 and generated.shape[1] > prompt.shape[1]
    return model


# --------------------------------------------------------------------------------------- mergekit's examples
@pytest.mark.parametrize("kind", list(EXPECTED))
def test_each_mergekit_example_kind_merges_loads_and_generates(kind, merged):
    folder = merged[kind]
    layers, dtype = EXPECTED[kind]
    model = load_and_generate(folder)
    assert model.config.num_hidden_layers == layers
    assert model.dtype == dtype
    files = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
            RECIPE_FILE, MERGEKIT_FILE} <= files
    assert not list(folder.parent.glob(f"{kind}.tmp-*"))


def test_linear_merge_equals_the_closed_form(merged, zoo_state):
    name = "model.layers.3.mlp.up_proj.weight"
    out = output_tensors(merged["linear"])[name]
    num, wrd, col = (zoo_state[m][name] for m in ("num", "wrd", "col"))
    closed_form = (1.0 * num + 0.3 * wrd + 0.5 * col) / 1.8
    torch.testing.assert_close(out.float(), closed_form, atol=2e-3, rtol=2e-3)  # fp16 output
    per_model = [{"weight": 1.0}, {"weight": 0.3}, {"weight": 0.5}]
    assert torch.equal(out, fused_reference("linear", [num, wrd, col], None, {}, per_model).half())
    registry = merge_tensor("linear", [num, wrd, col], None, {}, per_model)  # the method's own order of operations
    assert within_fp32_rounding(fused_reference("linear", [num, wrd, col], None, {}, per_model), registry, num, wrd,
                                col)


def test_gradient_slerp_uses_the_filtered_gradient_at_each_layer(merged, zoo_state):
    out = output_tensors(merged["gradient_slerp"])
    position = 3 / 7  # layer 3 of 8
    for name, gradient in [("model.layers.3.self_attn.q_proj.weight", (0, 0.5, 0.3, 0.7, 1)),
                           ("model.layers.3.mlp.down_proj.weight", (1, 0.5, 0.7, 0.3, 0)),
                           ("model.layers.3.input_layernorm.weight", (0.5,))]:
        t = interpolate(gradient, position)
        expected = merge_tensor("slerp", [zoo_state["num"][name]], zoo_state["base"][name], {"t": t})
        assert torch.equal(out[name], expected.to(torch.bfloat16)), name
    # The slerp base is the base model: t = 0 on layer 0's attention reproduces it.
    name = "model.layers.0.self_attn.v_proj.weight"
    assert torch.equal(out[name], zoo_state["base"][name].to(torch.bfloat16))


def test_ties_gradients_and_filtered_weights_reach_each_tensor(merged, zoo_state):
    plan = prepare_plan(RECIPES / "ties.yml")
    last_mlp = plan.task("model.layers.7.mlp.up_proj.weight").per_model_dicts()
    first_attn = plan.task("model.layers.0.self_attn.k_proj.weight").per_model_dicts()
    assert [m["density"] for m in last_mlp] == [pytest.approx(0.1), 0.5, 0.33]
    assert [m["weight"] for m in last_mlp] == [1.0, 1.0, 0.5]
    assert [m["density"] for m in first_attn] == [1.0, 0.5, 0.33]
    assert [m["weight"] for m in first_attn] == [1.0, 0.0, 0.0]
    name = "model.layers.7.mlp.up_proj.weight"
    expected = merge_tensor("ties", [zoo_state[m][name] for m in ("num", "wrd", "col")], zoo_state["base"][name],
                            {"normalize": True}, last_mlp)
    assert torch.equal(output_tensors(merged["ties"])[name], expected.half())


def test_frankenmerge_stacks_the_right_source_layers(merged, zoo_state):
    out = output_tensors(merged["passthrough"])
    assert json.loads((merged["passthrough"] / "config.json").read_text())["num_hidden_layers"] == 10
    assert len({name for name in out if ".layers." in name}) == 10 * 9
    for layer in range(10):
        model, source = ("num", layer) if layer < 6 else ("wrd", layer - 6 + 4)
        for suffix in ("self_attn.o_proj.weight", "mlp.gate_proj.weight", "post_attention_layernorm.weight"):
            assert torch.equal(out[f"model.layers.{layer}.{suffix}"],
                               zoo_state[model][f"model.layers.{source}.{suffix}"]), (layer, suffix)
    assert torch.equal(out["model.embed_tokens.weight"], zoo_state["num"]["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], zoo_state["wrd"]["model.norm.weight"])
    assert torch.equal(out["lm_head.weight"], zoo_state["wrd"]["lm_head.weight"])


def test_gradients_give_embeddings_norm_and_head_their_first_value(zoo_state, tmp_path):
    """mergekit 0.1.5 plans the tensors outside the layers at t = 0: the embeddings with the first slice's first
    gradient values, the final norm and the LM head with the last slice's first values."""
    out = output_tensors(run_recipe(RECIPES / "gradient_task_arithmetic.yml", tmp_path / "out").out_dir)

    def closed_form(name, layer_of, weights):
        base = zoo_state["base"][name.format(layer_of["base"])]
        terms = [(zoo_state[m][name.format(layer_of[m])] - base) * w for m, w in weights.items()]
        return base + sum(terms)

    same = {"base": 0, "num": 0, "wrd": 0, "col": 0}
    cases = [("model.embed_tokens.weight", {"num": 0.2, "wrd": 0.6}),
             ("model.norm.weight", {"num": 0.3, "col": 0.5}),
             ("lm_head.weight", {"num": 0.3, "col": 0.5})]
    for name, weights in cases:
        expected = closed_form(name, same, weights)
        torch.testing.assert_close(out[name], expected, atol=1e-6, rtol=1e-6)
        base = zoo_state["base"][name]
        per_model = [{"weight": w} for w in weights.values()]
        assert torch.equal(out[name], fused_reference("task_arithmetic", [zoo_state[m][name] for m in weights], base,
                                                      {"lambda": 1.0}, per_model)), name
    # The layers still follow the gradient: the last layer of each slice takes the last values.
    name = "model.layers.{}.mlp.up_proj.weight"
    torch.testing.assert_close(out[name.format(3)], closed_form(name, {m: 3 for m in same}, {"num": 1.0, "wrd": 0.1}),
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[name.format(7)], closed_form(name, {m: 7 for m in same}, {"num": 0.9, "col": 0.0}),
                               atol=1e-6, rtol=1e-6)


def test_reference_slices_take_task_vectors_against_the_target_layers(zoo, zoo_state, tmp_path):
    out = output_tensors(run_recipe(RECIPES / "reference_slices.yml", tmp_path / "out").out_dir)
    name = "model.layers.5.self_attn.q_proj.weight"  # second slice, offset 1: wrd 5, col 3, base (target) 5
    source = lambda model, layer: zoo_state[model][f"model.layers.{layer}.self_attn.q_proj.weight"]
    args = ("task_arithmetic", [source("wrd", 5), source("col", 3)], source("base", 5), {"lambda": 0.8},
            [{"weight": 1.0}, {"weight": 1.0}])
    assert torch.equal(out[name], fused_reference(*args))
    assert within_fp32_rounding(out[name], merge_tensor(*args), source("base", 5))


def test_model_card_records_the_recipe_and_the_mergekit_export(merged):
    card = (merged["ties"] / "README.md").read_text()
    assert "auto-merge merge auto_merge_recipe.yml OUT_DIR" in card
    assert "density: [1, 0.7, 0.1]" in card and "mergekit_config.yml" in card
    assert load_recipe(merged["ties"] / RECIPE_FILE) == load_recipe(RECIPES / "ties.yml")
    exported = yaml.safe_load((merged["ties"] / MERGEKIT_FILE).read_text())
    assert exported["merge_method"] == "ties" and Path(exported["base_model"]).name == "base"
    assert parse_recipe(exported).models[2].parameters == load_recipe(RECIPES / "ties.yml").models[2].parameters


# ------------------------------------------------------------------------------ randomness and sharding
def test_random_methods_depend_on_seed_not_on_sharding(merged, tmp_path):
    sharded = run_recipe(RECIPES / "dare_ties.yml", tmp_path / "sharded", out_shard_size="300KB").out_dir
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    whole, parts = output_tensors(merged["dare_ties"]), output_tensors(sharded)
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[name], parts[name]) for name in whole)
    other_seed = output_tensors(run_recipe(RECIPES / "dare_ties.yml", tmp_path / "seed1", seed=1).out_dir)
    assert not torch.equal(whole["model.layers.2.mlp.up_proj.weight"], other_seed["model.layers.2.mlp.up_proj.weight"])
    load_and_generate(sharded)


def test_reader_reads_what_safetensors_reads(zoo, zoo_state, tmp_path):
    with CheckpointReader(zoo / "num") as reader:
        assert reader.names == sorted(zoo_state["num"])
        assert all(torch.equal(reader.get_tensor(name), zoo_state["num"][name]) for name in reader.names)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(zoo / "num", dtype=torch.bfloat16).save_pretrained(
        tmp_path / "sharded", max_shard_size="200KB")
    expected = output_tensors(tmp_path / "sharded")
    with CheckpointReader(tmp_path / "sharded") as reader:
        assert len(set(reader.files.values())) > 1
        assert all(torch.equal(reader.get_tensor(name), expected[name]) for name in expected)


def test_sizes_parse_with_units():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("300KB") == 300_000
    assert parse_size("1GiB") == 2**30
    with pytest.raises(ValueError, match="cannot read the size"):
        parse_size("lots")


# ---------------------------------------------------------------------------- memory, atomicity, pickles
class CountingReader(CheckpointReader):
    """Counts tensors handed out that are still alive, to prove the engine streams."""

    alive = 0
    peak = 0

    def get_tensor(self, name):
        tensor = super().get_tensor(name)
        CountingReader.alive += 1
        CountingReader.peak = max(CountingReader.peak, CountingReader.alive)
        weakref.finalize(tensor, CountingReader._release)
        return tensor

    @staticmethod
    def _release():
        CountingReader.alive -= 1


def test_reads_are_lazy_and_only_one_tasks_inputs_are_resident(zoo, tmp_path):
    plan = prepare_plan(RECIPES / "ties.yml")
    CountingReader.alive = CountingReader.peak = 0
    result = merge_to_disk(plan, tmp_path / "out", reader_factory=CountingReader)
    assert result.reads == sum(len(task.reads()) for task in plan.tasks)  # each input read exactly once
    assert CountingReader.peak == 4  # three experts and the base of one tensor, never more
    assert CountingReader.alive == 0


def test_output_is_atomic_and_never_overwritten_without_permission(zoo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputDirError, match="--overwrite"):
        run_recipe(RECIPES / "linear.yml", out)
    # A folder auto-merge did not write is never replaced, even with overwrite.
    with pytest.raises(OutputDirError, match="not written by auto-merge"):
        run_recipe(RECIPES / "linear.yml", out, overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"

    class FailingReader(CheckpointReader):
        def get_tensor(self, name):
            if self.reads >= 20:
                raise OSError("disk vanished")
            return super().get_tensor(name)

    plan = prepare_plan(RECIPES / "linear.yml")
    earlier = tmp_path / "earlier"
    merge_to_disk(plan, earlier)
    first = (earlier / "model.safetensors").read_bytes()
    with pytest.raises(OSError, match="disk vanished"):
        merge_to_disk(plan, earlier, overwrite=True, reader_factory=FailingReader)
    assert (earlier / "model.safetensors").read_bytes() == first  # the earlier output is intact
    assert sorted(path.name for path in tmp_path.iterdir()) == ["earlier", "out"]  # no temporary left
    merge_to_disk(plan, earlier, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["earlier", "out"]


def test_pickle_checkpoints_need_an_explicit_opt_in(zoo, zoo_state, tmp_path):
    pickled = tmp_path / "num_bin"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(zoo / "num" / name, pickled / name)
    torch.save(zoo_state["num"], pickled / "pytorch_model.bin")
    recipe = {"models": [{"model": str(pickled), "parameters": {"weight": 1.0}},
                         {"model": "zoo:col", "parameters": {"weight": 1.0}}], "merge_method": "linear"}
    with pytest.raises(RecipeError, match="pickle"):
        prepare_plan(parse_recipe(recipe))
    plan = prepare_plan(parse_recipe(recipe), allow_pickle=True)
    out = output_tensors(merge_to_disk(plan, tmp_path / "out").out_dir)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(out[name], (zoo_state["num"][name] + zoo_state["col"][name]) / 2)


# -------------------------------------------------------------------------------- other architectures
def save_tiny(folder: Path, model, zoo: Path) -> Path:
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(zoo / "base" / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def families(zoo, tmp_path_factory) -> dict[str, Path]:
    """Two random Qwen2 models (tied embeddings, bias, layer_types) and two GPT-2 models (transformer.h.N, n_layer)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("families")
    folders = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            tie_word_embeddings=True, pad_token_id=0))
        folders[f"qwen{seed}"] = save_tiny(root / f"qwen{seed}", qwen, zoo)
        gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=0))
        folders[f"gpt2{seed}"] = save_tiny(root / f"gpt2{seed}", gpt2, zoo)
    return folders


@pytest.mark.parametrize("family, depth", [("qwen", 4), ("gpt2", 3)])
def test_other_families_merge_and_frankenmerge(families, family, depth, tmp_path):
    first, second = str(families[f"{family}0"]), str(families[f"{family}1"])
    linear = {"models": [{"model": first, "parameters": {"weight": 0.6}},
                         {"model": second, "parameters": {"weight": 0.4}}], "merge_method": "linear"}
    out = merge_to_disk(prepare_plan(parse_recipe(linear)), tmp_path / "linear").out_dir
    model = load_and_generate(out)
    a, b, merged_state = load_file(Path(first) / "model.safetensors"), load_file(Path(second) / "model.safetensors"), \
        output_tensors(out)
    assert merged_state.keys() == a.keys()  # tied models: no head tensor is invented
    for name in merged_state:
        torch.testing.assert_close(merged_state[name], 0.6 * a[name] + 0.4 * b[name], atol=1e-6, rtol=1e-6)

    franken = {"slices": [{"sources": [{"model": first, "layer_range": [0, depth]}]},
                          {"sources": [{"model": second, "layer_range": [1, depth]}]}],
               "merge_method": "passthrough"}
    out = merge_to_disk(prepare_plan(parse_recipe(franken)), tmp_path / "franken").out_dir
    model = load_and_generate(out)
    total = 2 * depth - 1
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers" if family == "qwen" else "n_layer"] == total
    if family == "qwen":
        assert len(config["layer_types"]) == total
    state = output_tensors(out)
    layer_prefix = "model.layers" if family == "qwen" else "transformer.h"
    last = f"{layer_prefix}.{total - 1}."
    source_last = f"{layer_prefix}.{depth - 1}."
    for name in [n for n in state if n.startswith(last)]:
        assert torch.equal(state[name], b[name.replace(last, source_last)])
    assert sum(1 for p in model.parameters()) > 0


# ------------------------------------------------------------------------------------------------ tokenizers
@pytest.fixture(scope="module")
def num_with_extra_token(zoo, zoo_state, tmp_path_factory) -> Path:
    """The num expert with one added token and its embedding/head rows."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("num_extra")
    tokenizer = AutoTokenizer.from_pretrained(zoo / "num")
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(folder)
    state = dict(zoo_state["num"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = torch.cat([state[name], torch.full((1, state[name].shape[1]), 0.5)])
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((zoo / "num" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": V + 1}))
    return folder


def test_union_tokenizer_adds_tokens_and_rebuilds_rows_by_token(zoo_state, num_with_extra_token, tmp_path):
    from transformers import AutoTokenizer

    recipe = {"models": [{"model": "zoo:base", "parameters": {"weight": 1.0}},
                         {"model": str(num_with_extra_token), "parameters": {"weight": 1.0}}],
              "merge_method": "linear", "base_model": "zoo:base", "tokenizer_source": "union"}
    out = merge_to_disk(prepare_plan(parse_recipe(recipe)), tmp_path / "union").out_dir
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == V + 1 and tokenizer.convert_tokens_to_ids("<extra>") == V
    assert json.loads((out / "config.json").read_text())["vocab_size"] == V + 1
    state = output_tensors(out)
    base = zoo_state["base"]["model.embed_tokens.weight"]
    embeddings = state["model.embed_tokens.weight"]
    torch.testing.assert_close(embeddings[:V], (base + zoo_state["num"]["model.embed_tokens.weight"]) / 2)
    # The base lacks <extra>: mergekit's default for it, the row of the only model that has it (for both models).
    assert torch.equal(embeddings[V], torch.full((64,), 0.5))
    load_and_generate(out)

    # The expert's own tokenizer as the output's: its V + 1 rows, the base's missing row the expert's (mergekit's rule).
    recipe["tokenizer_source"] = str(num_with_extra_token)
    out = merge_to_disk(prepare_plan(parse_recipe(recipe)), tmp_path / "expert_tokenizer").out_dir
    assert len(AutoTokenizer.from_pretrained(out)) == V + 1
    head = output_tensors(out)["lm_head.weight"]
    assert torch.equal(head[V], torch.full((64,), 0.5))


def test_same_tokenizer_everywhere_copies_files_without_loading_a_tokenizer(merged, zoo):
    assert (merged["linear"] / "tokenizer.json").read_bytes() == (zoo / "base" / "tokenizer.json").read_bytes()


# ------------------------------------------------------------------------------------------------------- CLI
def test_cli_merges_dry_runs_and_reports_errors_with_the_recipe_key(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["merge", str(RECIPES / "passthrough.yml"), str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "output: 10 layers" in printed and "memory estimate" in printed
    assert not out.exists()

    assert main(["merge", str(RECIPES / "passthrough.yml"), str(out), "--no-progress"]) == 0
    assert (out / "model.safetensors").is_file()
    assert main(["merge", str(RECIPES / "passthrough.yml"), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", str(RECIPES / "passthrough.yml"), str(out), "--overwrite", "--no-progress",
                 "--out-shard-size", "500KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file()

    bad = tmp_path / "bad.yml"
    bad.write_text("slices:\n  - sources:\n      - model: zoo:num\n        layer_range: [0, 12]\n"
                   "merge_method: passthrough\n")
    assert main(["merge", str(bad), str(tmp_path / "never")]) == 2
    error = capsys.readouterr().err
    assert "bad.yml: slices[0].sources[0].layer_range: zoo:num has 8 layers" in error
    assert not (tmp_path / "never").exists()


def test_the_merge_command_exits_without_teardown_after_a_complete_output(zoo, tmp_path):
    """As a process (`python -m auto_merge.cli`, like the console script), `merge` ends with os._exit once the
    output is in place: its report is still printed, the checkpoint is whole, and failures keep their exit code."""
    import subprocess
    import sys

    out = tmp_path / "out"
    command = [sys.executable, "-m", "auto_merge.cli", "merge", str(RECIPES / "passthrough.yml"), str(out),
               "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reported = int(done.stdout.split(f"{out}: ", 1)[1].split(" tensors", 1)[0])
    assert len(load_file(out / "model.safetensors")) == reported > 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 10
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_reader_views_survive_release_and_a_truncated_file_is_an_error(zoo, zoo_state, tmp_path):
    """Tensors are zero-copy views of the mapped file; release() drops their pages from the process, not their
    contents; a file cut short raises instead of crashing on a mapped page past its end; an unaligned tensor is
    read into a fresh buffer."""
    import struct

    from auto_merge.models.inspect import ModelInspectionError

    name = "model.layers.1.mlp.up_proj.weight"
    with CheckpointReader(zoo / "num") as reader:
        view = reader.get_tensor(name)
        reader.release()
        assert torch.equal(view, zoo_state["num"][name])
    assert torch.equal(view, zoo_state["num"][name])  # still valid after the reader closed

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    shutil.copy(zoo / "num" / "config.json", truncated / "config.json")
    data = (zoo / "num" / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 1000])
    # Found from the header when the file is opened, before any tensor is read.
    with pytest.raises(ModelInspectionError, match="truncated or corrupt.*lies at bytes"):
        CheckpointReader(truncated)

    # Shift the data by 2 bytes (header padded with a space): fp32 tensors are no longer 4-byte aligned.
    (header_length,) = struct.unpack("<Q", data[:8])
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    shutil.copy(zoo / "num" / "config.json", shifted / "config.json")
    header = data[8:8 + header_length] + b"  "
    (shifted / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data[8 + header_length:])
    with CheckpointReader(shifted) as reader:
        assert all(torch.equal(reader.get_tensor(n), zoo_state["num"][n]) for n in reader.names)


def _offsets(file: Path) -> dict[str, int]:
    from auto_merge.models.inspect import read_safetensors_header

    return {name: entry["data_offsets"][1] for name, entry in read_safetensors_header(file).items()}
