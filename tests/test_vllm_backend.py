"""`evaluation.vllm: true`: the backend's selection, its errors, and its weight hand-over, on the CPU.

vLLM itself needs a GPU, so these tests run lm-eval's real `vllm` model class over a CPU test double of vLLM's
offline API (`tests/fake_vllm`, an engine with its own `transformers` model). They show that every evaluation sees
the live model's current weights (scores equal the transformers backend's, document by document, and follow each
new candidate), that the engine is built once per process and rebuilt for a candidate of another depth, and that
the search runs end to end with it. Real vLLM is measured on a GPU by `bench/vllm_backend.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from auto_merge.config.schema import EvaluationSettings
from auto_merge.evaluation import backends
from auto_merge.evaluation.backends import BackendError, VllmOptions, vllm_options
from auto_merge.evaluation.lm_eval_runner import LiveEvaluator, TaskSuite, load_checkpoint
from auto_merge.merge.live import LiveMerger
from auto_merge.zoo import zoo_root

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
FAKE_VLLM = REPO / "tests" / "fake_vllm"
TASKS = ("zoo_num", "zoo_col", "zoo_col_mc")  # two generation tasks and one log-likelihood task


_STASHED: dict = {}  # the test double's modules between tests: lm-eval's vllm module stays bound to them


@pytest.fixture
def fake_vllm(monkeypatch):
    """vLLM's API on the CPU: the test double importable, the GPU check passed, no engine left from another test.
    Afterwards `vllm` is out of `sys.modules` again, so `find_spec("vllm")` elsewhere sees the real machine."""
    sys.modules.update(_STASHED)
    monkeypatch.syspath_prepend(str(FAKE_VLLM))
    monkeypatch.setattr(backends, "vllm_problem", lambda device=None, device_key=None: None)
    monkeypatch.setattr(backends, "_ENGINE", [])
    import vllm

    vllm.ENGINES.clear()
    yield vllm
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        _STASHED[name] = sys.modules.pop(name)


@pytest.fixture(scope="module")
def zoo() -> Path:
    return zoo_root(0)


def per_document(evaluator: LiveEvaluator, documents: dict[str, list[int]]) -> dict:
    return evaluator.evaluate_documents(documents)


def documents(suite: TaskSuite, count: int = 48) -> dict[str, list[int]]:
    return {task: list(range(min(count, len(suite.leaf_tasks[task].eval_docs)))) for task in TASKS}


def linear_recipe(weights: dict[str, float], **extra) -> dict:
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": f"zoo:{name}", "parameters": {"weight": w}} for name, w in weights.items()], **extra}


def test_vllm_scores_equal_transformers_and_follow_every_candidate(fake_vllm, zoo):
    suite = TaskSuite(list(TASKS), [zoo / "tasks"])
    docs = documents(suite)
    live, tokenizer = load_checkpoint(zoo / "base")
    reference, _ = load_checkpoint(zoo / "base")
    with_vllm = LiveEvaluator(live, tokenizer, suite, vllm=VllmOptions(str(zoo / "base"), dtype="float32"))
    with_hf = LiveEvaluator(reference, tokenizer, suite)
    merger, reference_merger = LiveMerger(live, device="cpu"), LiveMerger(reference, device="cpu")
    [engine] = fake_vllm.ENGINES[-1:]
    seen = []
    for weights in ({"base": 1.0}, {"num": 1.0}, {"num": 0.5, "col": 0.5}):
        merger.apply(linear_recipe(weights))
        reference_merger.apply(linear_recipe(weights))
        got = per_document(with_vllm, docs)
        assert got == per_document(with_hf, docs), weights  # greedy outputs and log-likelihoods agree per document
        seen.append(got)
    # Each candidate's own weights were evaluated: the expert answers its skill, the base does not.
    mean = lambda result, task, key: sum(v[key] for v in result[task].values()) / len(result[task])
    assert mean(seen[1], "zoo_num", "exact_match,none") > mean(seen[0], "zoo_num", "exact_match,none") + 0.2
    assert seen[2] != seen[1]
    # One engine for the process, given the weights and a fresh prefix cache before every evaluation.
    assert fake_vllm.ENGINES[-1] is engine and with_vllm.backend.loads == 3 and engine.prefix_cache_resets == 3
    assert engine.kwargs["enforce_eager"] is True and engine.kwargs["enable_prefix_caching"] is True
    assert engine.kwargs["load_format"] == "auto" and not engine.kwargs["hf_overrides"]
    assert with_vllm.forward_seconds > 0


def test_a_candidate_of_another_depth_gets_an_engine_of_that_depth(fake_vllm, zoo):
    suite = TaskSuite(["zoo_num"], [zoo / "tasks"])
    docs = {"zoo_num": list(range(32))}
    live, tokenizer = load_checkpoint(zoo / "base")
    reference, _ = load_checkpoint(zoo / "base")
    with_vllm = LiveEvaluator(live, tokenizer, suite, vllm=VllmOptions(str(zoo / "base"), dtype="float32"))
    with_hf = LiveEvaluator(reference, tokenizer, suite)
    depth = live.config.num_hidden_layers
    shallower = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": "zoo:num", "layer_range": [0, depth - 2]}]}]}
    for model in (live, reference):
        LiveMerger(model, device="cpu").apply(shallower)
    assert live.config.num_hidden_layers == depth - 2
    assert per_document(with_vllm, docs) == per_document(with_hf, docs)
    first, rebuilt = fake_vllm.ENGINES[-2:]
    assert first.kwargs["hf_overrides"] is None and first.model.config.num_hidden_layers == depth
    assert rebuilt.kwargs["hf_overrides"] == {"num_hidden_layers": depth - 2}
    assert rebuilt.kwargs["load_format"] == "dummy"  # every weight comes from the live model
    assert backends._ENGINE[0][1].model is rebuilt  # the old engine was released


def test_an_engine_parameter_the_live_weights_miss_is_an_error(fake_vllm, zoo, monkeypatch):
    suite = TaskSuite(["zoo_num"], [zoo / "tasks"])
    live, tokenizer = load_checkpoint(zoo / "base")
    evaluator = LiveEvaluator(live, tokenizer, suite, vllm=VllmOptions(str(zoo / "base"), dtype="float32"))
    skipped = "model.norm.weight"
    loader = fake_vllm._EngineModel.load_weights
    monkeypatch.setattr(fake_vllm._EngineModel, "load_weights",
                        lambda self, weights: loader(self, [(n, t) for n, t in weights if n != skipped]))
    with pytest.raises(BackendError, match=rf"do not cover: \['{skipped}'\]"):
        evaluator.evaluate_documents({"zoo_num": [0]})


def test_settings_choose_the_backend(tmp_path):
    default = EvaluationSettings.model_validate({})
    assert vllm_options(default, tmp_path) is None
    # The library's and the eval command's default share is the config's.
    assert VllmOptions("any").gpu_memory_utilization == default.gpu_memory_utilization
    chosen = EvaluationSettings.model_validate({"vllm": True, "enforce_eager": False, "torch_dtype": "bfloat16",
                                                "gpu_memory_utilization": 0.5})
    assert vllm_options(chosen, tmp_path, seed=3) == VllmOptions(str(tmp_path), dtype="bfloat16",
                                                                 enforce_eager=False, gpu_memory_utilization=0.5,
                                                                 seed=3)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EvaluationSettings.model_validate({"gpu_memory_utilization": 1.5})


def test_without_vllm_or_a_gpu_the_backend_says_why(monkeypatch):
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)
    assert "vllm package is not installed" in backends.vllm_problem()
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(FAKE_VLLM))
    assert backends.vllm_problem("cpu") == "vLLM runs on a CUDA GPU, and evaluation.device is 'cpu'"
    if not torch.cuda.is_available():
        assert backends.vllm_problem() == "vLLM runs on a CUDA GPU, and torch sees none on this machine"
        with pytest.raises(BackendError, match="evaluation.vllm: vLLM runs on a CUDA GPU"):
            backends.VllmBackend(None, None, VllmOptions("unused"))


def _search_config(tmp_path: Path, **evaluation) -> Path:
    config = {
        "strategy": "lfs",
        "global_params": {
            "random_seed": 0, "baselines": False, "output_path": str(tmp_path / "runs"),
            "evaluation": {"batch_size": 64, "include_path": str(REPO / "custom_tasks"), "vllm": True,
                           "torch_dtype": "float32",
                           "tasks": [{"task": t, "metric": "exact_match,none"} for t in ("zoo_num", "zoo_col")],
                           **evaluation},
        },
        "strategies": {"lfs": {
            "base_model": "zoo:base", "models": ["zoo:num", "zoo:col"], "layer_granularity": 4, "filters": ["mlp"],
            "merging_method": {"task_arithmetic": {"scaling_coefficient": {"min": 0.3, "max": 1.2}}},
            "min_budget": 10, "max_budget": 30, "eta": 3, "n_trials": 3, "n_workers": 1}},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_a_search_with_vllm_runs_end_to_end(fake_vllm, tmp_path):
    from auto_merge.search.driver import run_search
    from auto_merge.search.outputs import read_trials

    result = run_search(_search_config(tmp_path, device="cpu"), show_progress=False, write_model=False)
    trials = read_trials(result.run_dir / "trials.jsonl")
    assert len(trials) == 3 and all(t["status"] == "success" for t in trials)
    engines = {id(engine) for engine in fake_vllm.ENGINES}
    assert len(engines) == 1  # trials, the experts' scoring and the winner's final scoring share one engine
    final = json.loads((result.run_dir / "final_scores.json").read_text())
    # The winner's full-budget scores, recomputed with transformers on the winner's recipe, are the same.
    winner = max(final["winners"], key=lambda entry: entry["mean_score"])
    live, tokenizer = load_checkpoint(zoo_root(0) / "base")
    LiveMerger(live, device="cpu").apply(winner["recipe"])
    suite = TaskSuite(["zoo_num", "zoo_col"], [REPO / "custom_tasks"])
    scores = LiveEvaluator(live, tokenizer, suite).evaluate()
    assert winner["scores"] == {task: scores[task]["exact_match,none"] for task in ("zoo_num", "zoo_col")}


def test_the_dry_run_plans_the_merge_beside_vllms_share(tmp_path, capsys):
    from auto_merge.cli import main

    config = _search_config(tmp_path, gpu_memory_utilization=0.5)
    assert main(["search", "--config", str(config), "--dry-run", "--gpu-memory", "80GB", "--host-memory", "64GB"]) == 0
    printed = capsys.readouterr().out
    assert "GPU 40.0 GB given" in printed and "of 32.0 GB usable" in printed  # 80 % of what vLLM leaves
    assert "note: vLLM takes 50% of the GPU (40.0 GB, evaluation.gpu_memory_utilization) for its copy of the model " \
           "(2.5 MB) and its KV cache; this plan uses the other 40.0 GB" in printed
    assert main(["search", "--config", str(_search_config(tmp_path, gpu_memory_utilization=0.1)), "--dry-run",
                 "--gpu-memory", "10MB"]) == 0
    assert "That share cannot hold the model: raise gpu_memory_utilization above 0.25" in capsys.readouterr().out


def _run_cli(args: list[str], tmp_path: Path, pythonpath: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=pythonpath, AUTO_MERGE_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", "auto_merge.cli", *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows the error of a machine without a GPU")
def test_vllm_on_a_machine_without_a_gpu_is_refused_before_any_model_loads(tmp_path):
    config = _search_config(tmp_path)
    done = _run_cli(["search", "--config", str(config)], tmp_path, f"{FAKE_VLLM}{os.pathsep}{REPO}")
    assert done.returncode != 0
    assert "global_params.evaluation.vllm" in done.stderr and "torch sees none" in done.stderr, done.stderr
    assert "allowed: false (score with transformers)" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()
    config = _search_config(tmp_path, device="cpu")
    done = _run_cli(["search", "--config", str(config)], tmp_path, f"{FAKE_VLLM}{os.pathsep}{REPO}")
    assert "evaluation.device is 'cpu'" in done.stderr, done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows the error of a machine without a GPU")
def test_replaying_a_vllm_configuration_with_eval_says_why_before_merging(tmp_path, capsys):
    from auto_merge.cli import main

    found = json.loads((REPO / "search_config" / "lfs" / "best.json").read_text())
    found["evaluation"]["vllm"] = True
    path = tmp_path / "best.json"
    path.write_text(json.dumps(found))
    assert main(["replay", str(path), str(tmp_path / "model"), "--eval"]) != 0
    error = capsys.readouterr().err
    assert f"{path}: evaluation.vllm is true, but the vllm package is not installed" in error, error
    assert "allowed here: false" in error and not (tmp_path / "model").exists()


def test_eval_scores_with_vllm_what_it_scores_with_transformers(fake_vllm, tmp_path, capsys):
    from auto_merge.cli import main

    args = ["eval", "--model", "zoo:num", "--tasks", "zoo_num,zoo_col_mc", "--limit", "40"]
    assert main(args) == 0
    with_transformers = capsys.readouterr().out
    assert main(args + ["--vllm", "--gpu-memory-utilization", "0.3"]) == 0
    assert capsys.readouterr().out == with_transformers
    [engine] = fake_vllm.ENGINES
    assert engine.kwargs["gpu_memory_utilization"] == 0.3 and engine.kwargs["model"].endswith("num")


def test_eval_with_vllm_on_this_machine_says_why(tmp_path, capsys):
    from auto_merge.cli import main

    assert main(["eval", "--model", "zoo:num", "--tasks", "zoo_num", "--vllm", "--gpu-memory-utilization", "1.5"]) != 0
    assert "--gpu-memory-utilization 1.5: give a share in (0, 1)" in capsys.readouterr().err
    assert main(["eval", "--model", "zoo:num", "--tasks", "zoo_num", "--vllm"]) != 0
    assert "--vllm: the vllm package is not installed" in capsys.readouterr().err
