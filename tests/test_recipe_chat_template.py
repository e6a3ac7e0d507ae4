"""`chat_template` in recipes (mergekit 0.1.5's key): a template name, `auto` or a literal Jinja template, written
into the output's tokenizer; bad values are refused with the key path before any model is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from auto_merge.formats.mergekit import MergekitExportError, to_mergekit
from auto_merge.merge.engine import MERGEKIT_FILE, RECIPE_FILE, prepare_plan, run_recipe
from auto_merge.formats.recipe_files import load_recipe
from auto_merge.merge.recipe import RecipeError, parse_recipe
from auto_merge.merge.tokenizer import CHAT_TEMPLATE_FILE, CHAT_TEMPLATES, model_chat_template
from auto_merge.zoo import zoo_root

LITERAL = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
TEMPLATE_A = "{% for m in messages %}A:{{ m['content'] }}{% endfor %}"
TEMPLATE_B = "{% for m in messages %}B:{{ m['content'] }}{% endfor %}"


def linear(models, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
            **extra}


@pytest.fixture
def zoo_copy(tmp_path) -> Path:
    for name in ("base", "num", "wrd", "col"):
        shutil.copytree(zoo_root(0) / name, tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("value", ["auto", "chatml", "llama3", LITERAL])
def test_names_auto_and_literal_templates_are_accepted_and_round_trip(value):
    parsed = parse_recipe(linear(["a", "b"], chat_template=value))
    assert parsed.chat_template == value
    assert parse_recipe(yaml.safe_load(parsed.to_yaml())) == parsed
    (document,) = to_mergekit(parsed)
    assert document["chat_template"] == value


@pytest.mark.parametrize("value, fragment", [
    ("chatmlx", "neither a template name nor a Jinja template"),
    ("{{ short }}", "at least 20 characters"),
    ("a long text without any braces in it at all", "neither a template name"),
    (3, "valid string"),
])
def test_bad_chat_templates_are_refused_with_the_key(value, fragment):
    with pytest.raises(RecipeError) as caught:
        parse_recipe(linear(["a", "b"], chat_template=value), source="r.yml")
    assert caught.value.key == "chat_template"
    assert fragment in str(caught.value) and str(caught.value).startswith("r.yml: chat_template:")


def test_a_named_template_is_written_into_the_output_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    zoo = zoo_root(0)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(linear([zoo / "num", zoo / "wrd"], chat_template="chatml")))
    out = run_recipe(recipe, tmp_path / "out").out_dir
    assert (out / CHAT_TEMPLATE_FILE).read_text() == CHAT_TEMPLATES["chatml"]
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATES["chatml"]
    assert (out / "tokenizer.json").read_bytes() == (zoo / "num" / "tokenizer.json").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "2+2"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n"
    assert load_recipe(out / RECIPE_FILE).chat_template == "chatml"
    assert yaml.safe_load((out / MERGEKIT_FILE).read_text())["chat_template"] == "chatml"
    assert "chat template: chatml (mergekit's)" in (out / "README.md").read_text()


def test_auto_takes_the_most_common_template_and_a_literal_is_written_as_is(zoo_copy, tmp_path):
    (zoo_copy / "num" / CHAT_TEMPLATE_FILE).write_text(TEMPLATE_B)
    for name in ("wrd", "col"):  # the older spelling: a key of tokenizer_config.json
        config = json.loads((zoo_copy / name / "tokenizer_config.json").read_text())
        config["chat_template"] = TEMPLATE_A + "\n"
        (zoo_copy / name / "tokenizer_config.json").write_text(json.dumps(config))
    assert model_chat_template(zoo_copy / "wrd") == TEMPLATE_A + "\n"
    models = [zoo_copy / name for name in ("num", "wrd", "col")]
    out = run_recipe(parse_recipe(linear(models, chat_template="auto")), tmp_path / "auto").out_dir
    assert (out / CHAT_TEMPLATE_FILE).read_text() == TEMPLATE_A  # 2 of 3 (stripped, as mergekit compares them)
    assert model_chat_template(out) == TEMPLATE_A

    # A tie goes to the first model in recipe order (the base first).
    plan = prepare_plan(parse_recipe({**linear(models[1:2] + models[:1], chat_template="auto")}))
    assert plan.chat_template == TEMPLATE_A
    plan = prepare_plan(parse_recipe({**linear(models[:2], chat_template="auto")}))
    assert plan.chat_template == TEMPLATE_B

    # No model has a template: the copied tokenizer is left as it is.
    plain = [zoo_root(0) / name for name in ("num", "wrd")]
    out = run_recipe(parse_recipe(linear(plain, chat_template="auto")), tmp_path / "none").out_dir
    assert not (out / CHAT_TEMPLATE_FILE).exists()
    assert (out / "tokenizer_config.json").read_bytes() == (plain[0] / "tokenizer_config.json").read_bytes()

    out = run_recipe(parse_recipe(linear(plain, chat_template=LITERAL)), tmp_path / "literal").out_dir
    assert model_chat_template(out) == LITERAL


def test_a_tokenizer_source_without_tokenizer_files_is_refused(zoo_copy):
    for model in ("num", "col"):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (zoo_copy / model / name).unlink()
    recipe = linear([zoo_copy / "num", zoo_copy / "col"], chat_template="chatml")
    with pytest.raises(RecipeError, match="no tokenizer files to carry a chat template") as caught:
        prepare_plan(parse_recipe(recipe))
    assert caught.value.key == "chat_template"


def test_a_stagewise_export_gives_the_last_stage_what_auto_chose():
    recipe = parse_recipe({
        "base_model": "b", "chat_template": "auto",
        "slices": [{"merge_method": "ties", "sources": [{"model": "a", "layer_range": [0, 2],
                                                           "parameters": {"weight": 1, "density": 0.5}}]},
                   {"merge_method": "task_arithmetic", "sources": [{"model": "a", "layer_range": [2, 4],
                                                                      "parameters": {"weight": 1}}]}]})
    with pytest.raises(MergekitExportError, match="chat_template"):
        to_mergekit(recipe)
    documents = to_mergekit(recipe, chat_template=TEMPLATE_A)
    assert [d.get("chat_template") for d in documents] == [None, None, TEMPLATE_A]
    assert "chat_template" not in to_mergekit(recipe, chat_template=None)[-1]
    named = to_mergekit(parse_recipe({**recipe.to_dict(), "chat_template": "chatml"}))
    assert [d.get("chat_template") for d in named] == [None, None, "chatml"]


NAMED_RENDERINGS = {  # system "S", user "Hi", assistant "Hello", user "2+2?", then the generation prompt
    "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
              "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>\n<|start_header_id|>user<|end_header_id|>"
              "\n\nHi<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>\n"
              "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s> [INST] S\n\nHi [/INST] Hello</s> [INST] 2+2? [/INST]",
    # as mergekit's alpaca renders it: the generation prompt follows the last turn without a line break
    "alpaca": "S\n\n### Instruction:\nHi\n\n### Response:\nHello\n\n### Instruction:\n2+2?### Response:\n",
    "exaone": "[|system|]S[|endofturn|]\n[|user|]Hi\n[|assistant|]Hello[|endofturn|]\n[|user|]2+2?\n[|assistant|]",
}


@pytest.mark.parametrize("name", sorted(NAMED_RENDERINGS))
def test_each_named_template_renders_its_chat_format(name):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from auto_merge.merge.tokenizer import CHAT_TEMPLATES

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]
    rendered = environment.from_string(CHAT_TEMPLATES[name]).render(
        messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert rendered == NAMED_RENDERINGS[name]
