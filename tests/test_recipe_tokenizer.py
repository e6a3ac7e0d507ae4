"""mergekit's embedding rules when vocabularies differ: the default row of a token a model lacks (the only model that
has it, else the base's, else the mean of those that have it; zeros when none has it), and the `tokenizer:` block
(`source`, per-token `tokens` with `force`, `pad_to_multiple_of`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from auto_merge.formats.mergekit import to_mergekit
from auto_merge.merge.engine import prepare_plan, run_recipe
from auto_merge.merge.recipe import RecipeError, parse_recipe
from auto_merge.merge.tokenizer import MISSING, PAD_MEAN, PADDING, RowMap, TokenRule, TokenRules, align_rows
from auto_merge.zoo import zoo_root
from auto_merge.zoo.tokenizer import vocabulary

torch.set_num_threads(1)
V = len(vocabulary())  # rows of the zoo's embeddings


def test_a_missing_token_gets_mergekits_default_row():
    a = torch.tensor([[1.0], [2.0], [3.0]])
    b = torch.tensor([[10.0], [20.0], [30.0]])
    c = torch.tensor([[100.0], [200.0], [300.0]])
    # Output rows: 0 all have it; 1 only a has it; 2 a and c have it; 3 nobody has it; 4 padding b lacks.
    maps = [RowMap((0, 1, 2, MISSING, 0)), RowMap((0, MISSING, MISSING, MISSING, PADDING)),
            RowMap((0, MISSING, 2, MISSING, 1))]
    out = align_rows([a, b, c], maps)
    assert [row.item() for row in out[1][:, 0]] == [10.0, 2.0, 151.5, 0.0, 20.0]  # donor, mean of a and c, zero, mean
    assert [row.item() for row in out[0][:, 0]] == [1.0, 2.0, 3.0, 0.0, 1.0]
    # With c as the base, a row the base has is the base's.
    out = align_rows([a, b, c], maps, base=2)
    assert out[1][2].item() == 300.0 and out[1][1].item() == 2.0
    # A model whose rows are the output's already needs no map.
    out = align_rows([a[:2], b[:1]], [None, RowMap((0, MISSING))])
    assert torch.equal(out[1], torch.tensor([[10.0], [2.0]])) and torch.equal(out[0], a[:2])


def test_token_rules_and_padding_rows():
    a = torch.tensor([[1.0], [2.0], [3.0]])
    b = torch.tensor([[10.0], [20.0]])
    rules = TokenRules((TokenRule(0, True, "model", "b"), TokenRule(1, False, "zero"),
                        TokenRule(2, False, "model_token", "a", 0)))
    maps = [RowMap((0, 1, MISSING, PAD_MEAN), rules=rules), RowMap((0, MISSING, MISSING, PAD_MEAN), rules=rules)]
    out = align_rows([a, b], maps, models=["a", "b"])
    assert [row.item() for row in out[0][:, 0]] == [10.0, 2.0, 1.0, pytest.approx(13 / 3)]  # forced; own; token
    assert [row.item() for row in out[1][:, 0]] == [10.0, 0.0, 1.0, pytest.approx(11 / 3)]  # zero where it lacks it
    assert RowMap((0, 1), rules=rules) != RowMap((0, 1))  # the rules are part of a map's identity


@pytest.fixture(scope="module")
def numx(tmp_path_factory) -> Path:
    """The num expert with one added token `<extra>` whose rows are 0.5."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    zoo = zoo_root(0)
    folder = tmp_path_factory.mktemp("numx")
    tokenizer = AutoTokenizer.from_pretrained(zoo / "num")
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(folder)
    state = dict(load_file(zoo / "num" / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = torch.cat([state[name], torch.full((1, state[name].shape[1]), 0.5)])
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((zoo / "num" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": V + 1}))
    return folder


def block_recipe(numx: Path, **tokenizer) -> dict:
    zoo = zoo_root(0)
    return {"models": [{"model": str(zoo / "base"), "parameters": {"weight": 1.0}},
                       {"model": str(numx), "parameters": {"weight": 1.0}},
                       {"model": str(zoo / "wrd"), "parameters": {"weight": 0.5}}],
            "merge_method": "linear", "base_model": str(zoo / "base"), "dtype": "float32",
            "tokenizer": {"source": "union", **tokenizer}}


def test_the_tokenizer_block_adds_tokens_sets_their_rows_and_pads(numx, tmp_path):
    """The same recipe made by mergekit 0.1.5 gave bit-identical embeddings and head (see the session report)."""
    from transformers import AutoTokenizer

    zoo = zoo_root(0)
    tokens = {"<extra>": {"source": {"kind": "zero"}},
              "<new>": {"source": {"kind": "model_token", "model": str(numx), "token": "<s>"}},
              "<s>": {"source": str(zoo / "wrd"), "force": True}}
    recipe = parse_recipe(block_recipe(numx, tokens=tokens, pad_to_multiple_of=8))
    out = run_recipe(recipe, tmp_path / "out").out_dir
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == V + 2 and tokenizer.convert_tokens_to_ids(["<extra>", "<new>"]) == [V, V + 1]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == V + 3
    state = load_file(out / "model.safetensors")
    s = tokenizer.convert_tokens_to_ids("<s>")
    models = {name: load_file(path / "model.safetensors")
              for name, path in [("base", zoo / "base"), ("numx", numx), ("wrd", zoo / "wrd")]}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        merged = state[name]
        assert merged.shape[0] == V + 3
        # <extra>: numx keeps its row 0.5; zeros for the models that lack it (base and wrd).
        torch.testing.assert_close(merged[V], torch.full((64,), (0.0 + 0.5 + 0.0) / 2.5))
        # <new>: numx's row of <s> for every model; <s> forced: wrd's row in every model (merged: the same row).
        torch.testing.assert_close(merged[V + 1], models["numx"][name][s], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(merged[s], models["wrd"][name][s], atol=1e-7, rtol=1e-6)
        # Padding rows: each model's mean over its V + 2 aligned rows, then merged.
        rows = {key: state_[name][:V].clone() for key, state_ in models.items()}
        for key in rows:
            rows[key][s] = models["wrd"][name][s]
            rows[key] = torch.cat([rows[key], torch.zeros(1, 64), models["numx"][name][s][None]])
        rows["numx"][V] = 0.5
        means = {key: value.mean(dim=0) for key, value in rows.items()}
        expected = (means["base"] + means["numx"] + 0.5 * means["wrd"]) / 2.5
        torch.testing.assert_close(merged[V + 2], expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(merged[:V][torch.arange(V) != s],
                                   ((models["base"][name][:V] + models["numx"][name][:V]
                                     + 0.5 * models["wrd"][name][:V]) / 2.5)[torch.arange(V) != s])
    (document,) = to_mergekit(recipe)
    assert document["tokenizer"]["pad_to_multiple_of"] == 8 and "tokenizer_source" not in document
    assert document["tokenizer"]["tokens"]["<s>"] == {"source": str(zoo / "wrd"), "force": True}


BAD_BLOCKS = [
    ({"tokens": {"<x>": {"source": {"kind": "model_token", "model": "m"}}}}, "tokenizer.tokens.<x>.source",
     "exactly one of token and token_id"),
    ({"tokens": {"<x>": {"source": {"kind": "nope"}}}}, "tokenizer.tokens.<x>.source", "not a token source"),
    ({"tokens": {"<x>": {"force": True}}}, "tokenizer.tokens.<x>.source", "Field required"),
    ({"tokens": {"<x>": {"source": "m", "forse": True}}}, "tokenizer.tokens.<x>.forse", "allowed: source, force"),
    ({"pad_to_multiple_of": 0}, "tokenizer.pad_to_multiple_of", "greater than or equal to 1"),
    ({"sorce": "base"}, "tokenizer.sorce", "allowed: source, tokens, pad_to_multiple_of"),
]


@pytest.mark.parametrize("block, key, fragment", BAD_BLOCKS)
def test_bad_tokenizer_blocks_name_the_key(block, key, fragment):
    data = {"models": [{"model": "a", "parameters": {"weight": 1}}], "merge_method": "linear", "tokenizer": block}
    with pytest.raises(RecipeError) as caught:
        parse_recipe(data, source="r.yml")
    assert caught.value.key == key and fragment in str(caught.value)
    with pytest.raises(RecipeError, match="not both") as caught:
        parse_recipe({**data, "tokenizer": {}, "tokenizer_source": "union"})
    assert caught.value.key == "tokenizer"


def test_token_sources_must_feed_the_tensor_and_have_the_token(numx):
    zoo = zoo_root(0)
    elsewhere = block_recipe(numx, tokens={"<extra>": {"source": str(zoo / "col")}})
    with pytest.raises(RecipeError, match="does not feed") as caught:
        prepare_plan(parse_recipe(elsewhere))
    assert caught.value.key.startswith("tokenizer")
    lacking = block_recipe(numx, tokens={"<extra>": {"source": str(zoo / "wrd")}})
    with pytest.raises(RecipeError, match="has no token '<extra>'") as caught:
        prepare_plan(parse_recipe(lacking))
    assert caught.value.key == "tokenizer"
    plan = prepare_plan(parse_recipe(yaml.safe_load(yaml.safe_dump(block_recipe(numx)))))
    assert plan.vocabulary.rows == V + 1 and plan.vocabulary.added_tokens == ("<extra>",)
