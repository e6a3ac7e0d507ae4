"""Evaluation problems a config makes knowable are one ConfigError before any model loads, for the search and the
one-shot runs alike (issue 12 D6): unknown tasks and metrics, missing task folders, a CUDA device without CUDA,
code-executing tasks without the opt-in, tasks whose loader or prompt function fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from auto_merge.config import ConfigError, load_experiment
from auto_merge.search.driver import run_search

REPO = Path(__file__).resolve().parents[1]


def _config(folder: Path, tasks: list[dict], include: list[str], **evaluation) -> Path:
    config = {
        "strategy": "lfs",
        "global_params": {"output_path": str(folder / "runs"), "evaluation": {
            "include_path": include, "tasks": tasks, **evaluation}},
        "strategies": {"lfs": {
            "base_model": "zoo:base", "models": ["zoo:num", "zoo:col"], "layer_granularity": 4,
            "merging_method": {"task_arithmetic": {"scaling_coefficient": {"min": 0.3, "max": 1.2}}},
            "min_budget": 10, "max_budget": 30, "n_trials": 2, "n_workers": 1}},
    }
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _refused(config: Path, pattern: str, monkeypatch) -> None:
    """The search stops with one ConfigError matching ``pattern``, before any model is loaded or folder written."""
    import auto_merge.search.trial as trial

    monkeypatch.setattr(trial, "TrialRunner", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match=pattern):
        run_search(load_experiment(config).source_file, show_progress=False)
    assert not (config.parent / "runs").exists()


ZOO_TASKS = str(REPO / "custom_tasks")


def test_an_unknown_task(tmp_path, monkeypatch):
    config = _config(tmp_path, [{"task": "zoo_nope", "metric": "exact_match,none"}], [ZOO_TASKS])
    _refused(config, r"evaluation\.tasks: unknown task\(s\) zoo_nope", monkeypatch)


def test_an_unknown_metric_names_the_ones_the_task_has(tmp_path, monkeypatch):
    config = _config(tmp_path, [{"task": "zoo_num", "metric": "acc,none"}], [ZOO_TASKS])
    _refused(config, r"tasks\[0\]\.metric: task 'zoo_num' does not produce metric 'acc,none'; allowed: "
                     r"exact_match,none", monkeypatch)


def test_a_missing_include_path_folder(tmp_path, monkeypatch):
    config = _config(tmp_path, [{"task": "zoo_num", "metric": "exact_match,none"}], [str(tmp_path / "gone")])
    with pytest.raises(ConfigError, match="gone"):
        run_search(config, show_progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_cuda_device_without_cuda(tmp_path, monkeypatch):
    config = _config(tmp_path, [{"task": "zoo_num", "metric": "exact_match,none"}], [ZOO_TASKS], device="cuda")
    _refused(config, r"evaluation\.device: device 'cuda', but torch sees no CUDA device", monkeypatch)


def test_a_code_executing_task_needs_the_opt_in(tmp_path, monkeypatch):
    data = {"dataset_kwargs": {"data_files": {"validation": str(REPO / "tests" / "data" / "task_data" / "mbpp.jsonl")}}}
    config = _config(tmp_path, [{"task": "mbpp_custom", "metric": "pass_at_1,none", **data}], [ZOO_TASKS])
    _refused(config, "mbpp_custom.*allow_code_execution", monkeypatch)


def _zoo_task_copy(folder: Path, **changes) -> Path:
    tasks = folder / "tasks"
    shutil.copytree(REPO / "custom_tasks" / "zoo", tasks)
    text = (tasks / "zoo_num.yaml").read_text()
    for old, new in changes.items():
        text = text.replace(old, new)
    (tasks / "zoo_num.yaml").write_text(text)
    return tasks


def test_a_task_whose_prompt_function_fails_on_some_documents(tmp_path, monkeypatch):
    """D4/D6: a doc_to_text raising on 4 of 256 documents killed the end of the run; it is known from the start."""
    tasks = _zoo_task_copy(tmp_path, **{'doc_to_text: "{{prompt}}"': "doc_to_text: !function utils.text"})
    (tasks / "utils.py").write_text(
        "def text(doc):\n"
        "    if ord(doc['prompt'][0]) >= 0x4EFC:  # the last 4 keys: lm-eval itself tries the first one only\n"
        "        raise ValueError('cannot phrase key ' + str(ord(doc['prompt'][0])))\n"
        "    return doc['prompt']\n")
    config = _config(tmp_path, [{"task": "zoo_num", "metric": "exact_match,none"}], [str(tasks)])
    _refused(config,
             r"tasks\[0\]\.task: task 'zoo_num' cannot render document \d+: ValueError: cannot phrase key 2022\d",
             monkeypatch)


def test_a_task_whose_loader_fails(tmp_path, monkeypatch):
    tasks = _zoo_task_copy(tmp_path, **{"data/num.jsonl": "data/missing.jsonl"})
    config = _config(tmp_path, [{"task": "zoo_num", "metric": "exact_match,none"}], [str(tasks)])
    _refused(config, r"evaluation\.tasks: task 'zoo_num' could not be loaded: .*missing\.jsonl", monkeypatch)
