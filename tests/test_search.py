"""The search driver end to end on the demo zoo: outputs, replay, resume after a kill, failed trials, dask, MO front."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import yaml

from auto_merge.output_dirs import OutputDirError
from auto_merge.search.driver import hyperband_round, run_search, trials_for_total_budget
from auto_merge.search.outputs import read_trials

REPO = Path(__file__).resolve().parents[1]


def write_config(folder: Path, *, strategy: str = "lfs", n_trials: int = 6, n_workers: int = 1,
                 merging_method: dict | None = None, optimizer: str = "hyperband", name: str = "exp.yaml",
                 baselines: bool = False, stratify: str = "none", queued_per_worker: int | str = "auto") -> Path:
    block = {
        "base_model": "zoo:base",
        "models": ["zoo:num", "zoo:wrd", "zoo:col"],
        "layer_granularity": 4,
        "filters": ["mlp"],
        "merging_method": merging_method or {
            "task_arithmetic": {"scaling_coefficient": {"min": 0.3, "max": 1.2}},
            "linear": {"weights": {"min": 0.0, "max": 1.0}},
        },
        "min_budget": 10, "max_budget": 30, "eta": 3,
        "n_trials": n_trials, "n_workers": n_workers, "optimizer": optimizer, "queued_per_worker": queued_per_worker,
    }
    config = {
        "strategy": strategy,
        "global_params": {
            "random_seed": 0,
            "baselines": baselines,  # 5 more full evaluations per run: on where a test looks at them
            "output_path": str(folder / "runs"),
            "evaluation": {
                "batch_size": 64, "device": "cpu", "include_path": str(REPO / "custom_tasks"), "stratify": stratify,
                "tasks": [{"task": t, "metric": "exact_match,none"} for t in ("zoo_num", "zoo_wrd", "zoo_col")],
            },
        },
        "strategies": {strategy: block},
    }
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_model_min_results_picks_the_budget_the_model_learns_from(tmp_path):
    """With 2 results at the top budget and 14 at the lowest: BOHB's rule (a 12-dimensional space needs 13 results)
    and a minimum of 3 learn from the lowest budget; SMAC's default (1) from the top budget's 2."""
    from types import SimpleNamespace

    from ConfigSpace import ConfigurationSpace, Float
    from smac import MultiFidelityFacade, Scenario
    from smac.runhistory import RunHistory
    from smac.runhistory.encoder import RunHistoryEncoder

    from auto_merge.search.driver import _config_selector

    space = ConfigurationSpace(seed=0)
    space.add([Float(f"x{i}", (0, 1)) for i in range(12)])
    scenario = Scenario(space, n_trials=90, deterministic=True, output_directory=tmp_path, min_budget=1, max_budget=9)
    history = RunHistory()
    for i, config in enumerate(space.sample_configuration(14)):
        history.add(config, cost=0.5 + i / 100, budget=1.0)
        if i < 2:
            history.add(config, cost=0.4, budget=9.0)
    considered = {}
    for minimum in ("bohb", 3, 1, 2):
        block = SimpleNamespace(optimizer="successive_halving", model_min_results=minimum)
        selector = _config_selector(block, scenario, space) or MultiFidelityFacade.get_config_selector(scenario)
        encoder = RunHistoryEncoder(scenario)
        encoder.runhistory = history
        selector._runhistory, selector._runhistory_encoder = history, encoder
        X, _, _ = selector._collect_data()
        considered[minimum] = (X.shape[0], selector._considered_budgets)
    assert considered == {"bohb": (14, [1.0]), 3: (14, [1.0]), 1: (2, [9.0]), 2: (2, [9.0])}
    assert _config_selector(SimpleNamespace(optimizer="bo", model_min_results="bohb"), scenario, space) is None


def test_the_surrogate_bound_changes_no_prediction(tmp_path):
    """The driver's random forest (its leaf bound cut to 2 n_trials + 16) predicts exactly what SMAC's default
    (2**20 leaves, ~30x slower to fit) predicts, on as many rows as the run has trials."""
    import numpy as np
    from ConfigSpace import Categorical, ConfigurationSpace, Float
    from smac import MultiFidelityFacade, Scenario

    from auto_merge.search.driver import _surrogate

    space = ConfigurationSpace(seed=0)
    space.add([Float(f"x{i}", (0, 1)) for i in range(12)] + [Categorical("method", ["a", "b", "c"])])
    scenario = Scenario(space, n_trials=90, deterministic=True, output_directory=tmp_path, min_budget=1, max_budget=9)
    bounded, default = _surrogate(MultiFidelityFacade, scenario, 90), MultiFidelityFacade.get_model(scenario)
    assert bounded._rf_opts["max_leaf_nodes"] == 196 and default._rf_opts["max_leaf_nodes"] == 2 ** 20
    rows = np.array([c.get_array() for c in space.sample_configuration(90)])
    targets = np.random.default_rng(0).random(90)
    queries = np.array([c.get_array() for c in space.sample_configuration(2000)])
    predictions = []
    for model in (bounded, default):
        model.train(rows, targets)
        predictions.append(model.predict_marginalized(queries))
    assert all(np.array_equal(a, b) for a, b in zip(*predictions))


def test_local_workers_take_the_gpus_in_turn(monkeypatch):
    """On a machine with several GPUs each local worker process sees one (CUDA_VISIBLE_DEVICES, set before it
    starts), so each worker's live model and evaluation engine (a vLLM engine too) sit on a GPU of their own."""
    import torch

    from auto_merge.search.driver import _cluster_over_gpus, worker_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_gpus(None) == worker_gpus("cuda") == ["0", "1", "2"]
    assert worker_gpus("cuda:1") == worker_gpus("cpu") == []  # the user pinned a device, or there is no GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")
    assert worker_gpus("auto") == ["4", "6", "7"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert worker_gpus("auto") == []

    from dask.distributed import Client

    with _cluster_over_gpus(3, ["4", "6"]) as cluster, Client(cluster) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    assert sorted(seen.values()) == ["4", "4", "6"]


def test_hyperband_round_matches_smacs_brackets():
    # min 100, max 1000, eta 3 (the reference's schedule): 9@111, 3@333, 1@1000 | 5@333, 1@1000 | 3@1000.
    stages = [(n, round(b, 1)) for n, b in hyperband_round(100, 1000, 3)]
    assert stages == [(9, 111.1), (3, 333.3), (1, 1000.0), (5, 333.3), (1, 1000.0), (3, 1000.0)]
    # A promotion pays only for the examples it adds (nested subsets, cached results): 9x111 + 3x222 + 1x667 |
    # 5x333 + 1x667 | 3x1000 = 7667 budget units for the round's 22 trials.
    assert trials_for_total_budget(7667, 100, 1000, 3, "hyperband") == 22
    assert trials_for_total_budget(7667 * 2, 100, 1000, 3, "hyperband") == 44
    assert trials_for_total_budget(7600, 100, 1000, 3, "hyperband") == 21
    assert trials_for_total_budget(3000, 100, 1000, 3, "random") == 3


def test_search_end_to_end_writes_every_output_and_replays(tmp_path):
    from transformers import AutoModelForCausalLM

    config = write_config(tmp_path, n_trials=8, baselines=True)
    result = run_search(config, show_progress=False)
    run_dir = result.run_dir
    trials = read_trials(run_dir / "trials.jsonl")
    assert len(trials) == 8
    assert {t["budget"] for t in trials} >= {10.0, 30.0}
    for trial in trials:
        assert trial["status"] == "success" and set(trial["scores"]) == {"zoo_num", "zoo_wrd", "zoo_col"}
        assert trial["recipe"]["slices"] and trial["merge_seconds"] is not None
        # the wall time between results covers the trial itself and what happens around it
        assert trial["since_previous_seconds"] >= trial["seconds"] * 0.99 > 0
    assert [t["finished_unix"] for t in trials] == sorted(t["finished_unix"] for t in trials)
    # Promotion reuses the examples already scored at the lower budget.
    assert any(t["cached_examples"] for t in trials if t["budget"] == 30.0)
    # The initial design's experts come first: the first one is expert num alone, at the smallest budget.
    assert trials[0]["configuration"]["g0:method"] == "linear"

    best = json.loads((run_dir / "search_config" / "best.json").read_text())
    assert best["format"] == "auto-merge/search-config/1" and best["strategy"]["models"][0] == "zoo:num"
    final = json.loads((run_dir / "final_scores.json").read_text())
    assert set(final["experts"]) == {"zoo:num", "zoo:wrd", "zoo:col"}
    assert final["experts"]["zoo:col"]["scores"]["zoo_col"] == 1.0  # an expert on its own skill
    # The baselines, scored on every example like the winner: on the shipped zoo uniform task arithmetic is best at
    # λ 0.7 (0.693) and TIES at density 0.5, λ 1 scores 0.983 (`auto-merge zoo report`, docs/zoo.md).
    baselines = final["baselines"]
    assert set(baselines["uniform_task_arithmetic"]["grid"]) == {"0.3", "0.5", "0.7", "1.0"}
    assert baselines["uniform_task_arithmetic"]["lambda"] == 0.7
    assert baselines["uniform_task_arithmetic"]["mean_score"] == pytest.approx(0.693, abs=0.01)
    assert baselines["ties"]["mean_score"] == pytest.approx(0.983, abs=0.01)
    assert final["compute"]["trials"] == 8
    assert final["compute"]["examples_evaluated"] == sum(t["evaluated_examples"] for t in trials) > 0
    assert final["compute"]["full_evaluation_examples"] == 3 * 256
    card = (result.best_model / "README.md").read_text()
    assert "## Search results" in card and "vs uniform task arithmetic (λ 0.7" in card and "vs TIES" in card
    report = (run_dir / "report.html").read_text()  # self-contained: the plots are embedded
    assert report.count("data:image/png;base64,") == len(result.plots) >= 2 and "<script" not in report
    assert "Full-budget scores" in report and "best merge vs TIES" in report and "Winner's recipe" in report
    assert "merge_method" in report and report.count("<tr class=") == 8 + len(final["experts"]) + 4  # trials + rows
    status = subprocess.run([sys.executable, "-m", "auto_merge.cli", "status", str(run_dir)], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert status.returncode == 0, status.stderr[-2000:]
    assert f"{run_dir}: lfs, finished" in status.stdout and "trials: 8 (8 success)" in status.stdout
    assert "best merge vs TIES" in status.stdout and "uniform TA λ=0.7" in status.stdout
    for plot in result.plots:
        assert plot.stat().st_size > 5000
    model = AutoModelForCausalLM.from_pretrained(result.best_model)
    assert model.config.num_hidden_layers == 8

    # Replaying the exported configuration gives the same weights as the search's winning model.
    import torch
    from safetensors.torch import load_file

    replay = subprocess.run([sys.executable, "-m", "auto_merge.cli", "replay", str(run_dir / "search_config" /
                             "best.json"), str(tmp_path / "replayed"), "--eval"],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert replay.returncode == 0, replay.stderr[-2000:]
    replayed = load_file(tmp_path / "replayed" / "model.safetensors")
    written = load_file(result.best_model / "model.safetensors")
    assert replayed.keys() == written.keys()
    assert all(torch.equal(replayed[k], written[k]) for k in written)
    winner = final["winners"][0]["scores"]
    for task, score in winner.items():
        assert f"{task}: {score:.4f}" in replay.stdout


def test_rerun_resumes_and_a_changed_config_is_refused(tmp_path):
    config = write_config(tmp_path, n_trials=4)
    run_search(config, show_progress=False, write_model=False)
    first = read_trials(tmp_path / "runs" / "lfs" / "trials.jsonl")
    again = run_search(config, show_progress=False, write_model=False)  # finished: nothing re-run
    assert read_trials(again.run_dir / "trials.jsonl") == first
    final = json.loads((again.run_dir / "final_scores.json").read_text())
    assert "baselines" not in final and final["compute"]["trials"] == 4  # `baselines: false` skips them

    changed = write_config(tmp_path, n_trials=5)
    with pytest.raises(OutputDirError, match="different config.*--overwrite"):
        run_search(changed, show_progress=False)
    assert read_trials(tmp_path / "runs" / "lfs" / "trials.jsonl") == first  # nothing lost


def kill_and_resume(tmp_path: Path, config: Path, *, kill_after: int, n_trials: int) -> tuple[list, list]:
    """Runs `auto-merge search` on `config`, kills it (SIGKILL) once `kill_after` trials are logged, reruns it to the
    end; checks nothing finished was lost or run again, and returns (trials logged before the kill, all trials)."""
    log = tmp_path / "runs" / "lfs" / "trials.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "auto_merge.cli", "search", "--config", str(config), "--no-model"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(read_trials(log)) < kill_after:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = read_trials(log)
    assert kill_after <= len(done_before) < n_trials

    finished = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert finished.returncode == 0, finished.stderr[-2000:]
    trials = read_trials(log)
    assert trials[: len(done_before)] == done_before
    keys = [(json.dumps(t["configuration"], sort_keys=True), t["budget"]) for t in trials]
    assert len(set(keys)) == len(keys), "a completed trial was run again"
    return done_before, trials


def test_a_killed_search_resumes_without_losing_or_repeating_trials(tmp_path):
    _, trials = kill_and_resume(tmp_path, write_config(tmp_path, n_trials=9), kill_after=3, n_trials=9)
    assert len(trials) >= 9 - 1  # SMAC may drop the one trial that was running when the process was killed


def test_smac_state_files_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """SMAC rewrites its state after every trial; a kill during that write (simulated: the JSON writer fails halfway)
    must leave the last complete file, not a truncated one the resumed run cannot read."""
    import smac.runhistory.runhistory as runhistory_module
    from smac.runhistory.runhistory import RunHistory

    from auto_merge.search.smac_state import PARTIAL_SUFFIX, atomic_state_writes

    history, path = RunHistory(), tmp_path / "runhistory.json"
    history.save(path)
    complete = path.read_text()
    json.loads(complete)

    def dies_halfway(payload, fp, **kwargs):
        fp.write('{"stats": ')
        raise OSError("killed while writing")

    monkeypatch.setattr(runhistory_module.json, "dump", dies_halfway)
    with atomic_state_writes(), pytest.raises(OSError):
        history.save(path)
    assert path.read_text() == complete
    assert not list(tmp_path.glob(f"*{PARTIAL_SUFFIX}"))
    assert "open" not in vars(runhistory_module)  # SMAC's own open is back after the block
    with pytest.raises(OSError):  # what happened before: the file is left truncated
        history.save(path)
    assert path.read_text() == '{"stats": '


def test_failing_trials_are_recorded_and_the_search_goes_on(tmp_path):
    # A linear merge whose weights are all zero cannot be normalised: every linear trial fails.
    config = write_config(tmp_path, n_trials=6, merging_method={
        "linear": {"weights": {"min": 0.0, "max": 0.0}},
        "task_arithmetic": {"scaling_coefficient": {"min": 0.3, "max": 1.2}},
    })
    result = run_search(config, show_progress=False, write_model=False)
    trials = read_trials(result.run_dir / "trials.jsonl")
    failed = [t for t in trials if t["status"] != "success"]
    assert failed and all("weight" in t["error"] for t in failed)
    assert all(t["cost"] == 1.0 for t in failed)
    assert any(t["status"] == "success" for t in trials)
    assert result.final_scores["winners"][0]["recipe"]["slices"][0]["merge_method"] == "task_arithmetic"


def test_two_dask_workers_are_kept_fed_and_a_killed_parallel_search_resumes(tmp_path):
    """The asynchronous loop (search/parallel.py): both workers run trials, each asked trial is logged once with when
    it ran, and a run killed mid-way resumes to its full count without repeating a finished trial."""
    from auto_merge.search.parallel import worker_busy

    # One queued trial per worker, so that 14 trials reach the second rung whatever the timing (`auto` may queue more).
    config = write_config(tmp_path, n_trials=14, n_workers=2, optimizer="successive_halving", queued_per_worker=1)
    log = tmp_path / "runs" / "lfs" / "trials.jsonl"
    done_before, trials = kill_and_resume(tmp_path, config, kill_after=5, n_trials=14)
    # In flight when killed: at most one running and one queued trial per worker are lost.
    assert len(trials) >= 14 - 4 and all(t["status"] == "success" for t in trials)
    new = trials[len(done_before):]
    assert {t["budget"] for t in trials} >= {10.0, 30.0}  # the rungs still promote
    workers = {t["worker_pid"] for t in new}
    assert len(workers) == 2 and os.getpid() not in workers
    assert all(t["ended_unix"] >= t["started_unix"] > 0 for t in new)
    busy = worker_busy(new)
    assert len(busy) == 2 and all(0 < share <= 1 for share in busy.values())
    from auto_merge.search.status import run_status

    assert "workers: 2, each busy" in run_status(log.parent)


def test_stratified_low_budgets_score_the_sources_first_and_count_it_as_compute(tmp_path):
    config = write_config(tmp_path, n_trials=4, stratify="sources")
    result = run_search(config, show_progress=False, write_model=False)
    record = json.loads((result.run_dir / "stratify.json").read_text())
    full = 3 * 256
    assert record["examples_evaluated"] == 4 * full  # base + 3 experts, every document, from an empty cache
    # zoo_num: the facts every source knows, and the new ones only the num expert knows (docs/zoo.md).
    assert record["strata_per_task"]["zoo_num"] == 2
    compute = result.final_scores["compute"]
    trials = read_trials(result.run_dir / "trials.jsonl")
    assert compute["stratify_examples"] == 4 * full
    assert compute["examples_evaluated"] == 4 * full + sum(t["evaluated_examples"] for t in trials)
    assert result.final_scores["experts"]["zoo:num"]["mean_score"] > 0.6  # scored from the cached results
    again = run_search(config, show_progress=False, write_model=False)  # a rerun does not reset what it cost
    assert json.loads((again.run_dir / "stratify.json").read_text()) == record


def test_multi_objective_search_exports_a_pareto_front(tmp_path):
    config = write_config(tmp_path, strategy="lfs_multiobj", n_trials=8)
    result = run_search(config, show_progress=False, write_model=False)
    front = sorted((result.run_dir / "search_config").glob("front_*.json"))
    assert front and len(front) == len(result.final_scores["winners"])
    trials = read_trials(result.run_dir / "trials.jsonl")
    tasks = ("zoo_num", "zoo_wrd", "zoo_col")
    points = []
    for path in front:  # each front member's scores at the highest budget, where SMAC compared them
        configuration = json.loads(path.read_text())["configuration"]
        at_top = [t for t in trials if t["configuration"] == configuration and t["budget"] == 30.0]
        assert at_top, "a front member was not evaluated at max_budget"
        points.append(at_top[-1]["scores"])
    for a in points:
        for b in points:
            assert not (all(a[t] >= b[t] for t in tasks) and any(a[t] > b[t] for t in tasks)), (a, b)
    assert (result.run_dir / "plots" / "front.png").stat().st_size > 5000


def test_shortlist_ranks_each_configuration_by_its_highest_budget_score():
    from auto_merge.search.outputs import shortlist

    def record(name, budget, score):
        return {"configuration": {"x": name}, "budget": budget, "score": score}

    records = [record("a", 10, 0.9), record("a", 30, 0.5),  # a's promotion disappointed: 0.5 counts
               record("b", 10, 0.7), record("c", 30, 0.6), record("d", 10, 0.2)]
    assert shortlist(records, 2) == [{"x": "b"}, {"x": "c"}]
    assert shortlist(records, 10) == [{"x": "b"}, {"x": "c"}, {"x": "a"}, {"x": "d"}]


def test_total_budget_pays_for_the_sources_scoring_first(tmp_path):
    """With evaluation.stratify: sources, total_budget includes the upfront scoring of the base and the experts
    (4 full evaluations here): the trials get the rest, and a total_budget that leaves nothing is refused by key
    before any model is loaded."""
    from auto_merge.config import ConfigError, load_experiment
    from auto_merge.search.driver import _trial_budget

    def config_with(total_budget: float, stratify: str):
        path = write_config(tmp_path, n_trials=0, stratify=stratify, name=f"{stratify}-{total_budget}.yaml")
        data = yaml.safe_load(path.read_text())
        data["strategies"]["lfs"]["total_budget"] = total_budget
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    # max_budget 30, base + 3 experts: 120 budget units before the first trial.
    assert _trial_budget(load_experiment(config_with(300, "sources"), check_models=False)) == 180
    assert _trial_budget(load_experiment(config_with(300, "none"), check_models=False)) == 300
    with pytest.raises(ConfigError) as caught:
        load_experiment(config_with(120, "sources"), check_models=False)
    message = str(caught.value)
    assert "sources-120.yaml" in message and "total_budget" in message
    assert "total_budget > 120" in message and "stratify: none" in message


def test_shortlist_keeps_the_best_full_budget_trials_among_perfect_low_budget_scores():
    """Near the ceiling, a perfect score at the lowest rung beats 767 of 768 at the full budget by score alone; the
    shortlist still holds the best configurations that reached the full budget."""
    from auto_merge.search.outputs import shortlist

    def record(name, budget, score):
        return {"configuration": {"x": name}, "budget": budget, "score": score}

    records = [record(f"low{i}", 28, 1.0) for i in range(6)] + [
        record("full_a", 28, 1.0), record("full_a", 256, 767 / 768),
        record("full_b", 28, 1.0), record("full_b", 256, 760 / 768),
        record("full_c", 28, 1.0), record("full_c", 256, 700 / 768)]
    chosen = shortlist(records, 4)
    assert len(chosen) == 4
    assert chosen[2:] == [{"x": "full_a"}, {"x": "full_b"}]
    assert all(c["x"].startswith("low") for c in chosen[:2])
    assert shortlist(records, 1) == [{"x": "full_a"}]


def test_random_search_and_full_fidelity_bo_run(tmp_path):
    for optimizer in ("random", "bo"):
        config = write_config(tmp_path, n_trials=4, optimizer=optimizer, name=f"{optimizer}.yaml")
        result = run_search(config, show_progress=False, write_model=False, run_name=optimizer)
        trials = read_trials(result.run_dir / "trials.jsonl")
        assert len(trials) == 4 and all(t["budget"] is None for t in trials), optimizer


def test_cmaes_searches_the_weights_on_every_example_and_resumes_as_if_never_stopped(tmp_path):
    """optimizer: cmaes: each group's method stays the first listed, the weights move, every trial scores every
    example; a run killed after 3 trials resumes to exactly the trials of an uninterrupted run."""
    config = write_config(tmp_path, n_trials=6, optimizer="cmaes")
    whole = run_search(config, show_progress=False, write_model=False, run_name="whole")
    trials = read_trials(whole.run_dir / "trials.jsonl")
    assert len(trials) == 6 and all(t["status"] == "success" and t["budget"] is None for t in trials)
    assert all(t["config_origin"] == "CMA-ES" and t["examples"] == {"zoo_num": 256, "zoo_wrd": 256, "zoo_col": 256}
               for t in trials)
    assert {t["configuration"]["g0:method"] for t in trials} == {"task_arithmetic"}
    assert len({json.dumps(t["configuration"], sort_keys=True) for t in trials}) == 6
    final = json.loads((whole.run_dir / "final_scores.json").read_text())
    assert final["winners"][0]["mean_score"] >= max(t["score"] for t in trials) - 1e-9

    script = textwrap.dedent(f"""
        import os
        import auto_merge.search.cmaes_search as cmaes_search
        run, done = cmaes_search.CMAESSearch._run, []
        def run_or_die(self, configuration):
            cost = run(self, configuration)
            done.append(cost)
            if len(done) == 3:
                os._exit(9)
            return cost
        cmaes_search.CMAESSearch._run = run_or_die
        from auto_merge.search.driver import run_search
        run_search({str(config)!r}, show_progress=False, write_model=False, run_name="killed")
        """)
    died = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert died.returncode == 9, died.stderr[-2000:]
    log = tmp_path / "runs" / "killed" / "trials.jsonl"
    assert len(read_trials(log)) == 3
    from auto_merge.search.status import run_status

    stopped = run_status(log.parent)
    assert "stopped before the end" in stopped and "trials: 3 (3 success)" in stopped and "best " in stopped
    run_search(config, show_progress=False, write_model=False, run_name="killed")
    resumed = read_trials(log)
    assert [(t["configuration"], t["scores"]) for t in resumed] == [(t["configuration"], t["scores"]) for t in trials]


def test_the_progress_shows_the_best_at_the_highest_budget_reached_not_a_low_budget_estimate():
    from auto_merge.search.progress import best_so_far, best_text

    def trial(budget, score):
        return {"budget": budget, "score": score}

    records = [trial(10, 0.9), trial(30, 0.5), trial(10, 0.95), trial(30, 0.6), trial(10, None)]
    assert best_so_far(records[:1]) == (10, 0.9, None)
    assert best_so_far(records) == (30, 0.6, 0.95)
    assert best_text(best_so_far(records)) == "best 0.600 @ 30, 0.950 @ a lower budget"
    assert best_text(best_so_far(records[:1])) == "best 0.900 @ 10"
    assert best_so_far([trial(None, 0.7), trial(30, 0.9)]) == (None, 0.7, 0.9)  # None: every example
    assert best_text(best_so_far([trial(None, 0.7)])) == "best 0.700 @ all"
    assert best_so_far([trial(10, None)]) is None


def test_status_says_running_while_a_process_holds_the_run_folder(tmp_path):
    import fcntl

    from auto_merge.search.status import run_status

    run_dir = tmp_path / "runs" / "lfs"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"strategy": {"strategy": "lfs"}, "config_file": "exp.yaml",
                                                  "started": "2026-12-03 10:00:00"}))
    assert "lfs, stopped before the end" in run_status(run_dir) and "trials: 0" in run_status(run_dir)
    with open(tmp_path / "runs" / ".lfs.lock", "a") as lock:  # what a running search holds (output_dirs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert f"{run_dir}: lfs, running" in run_status(run_dir)
    assert f"{run_dir}: lfs, stopped before the end" in run_status(run_dir)  # the lock was released


def test_cmaes_maps_each_parameter_range_to_the_unit_interval():
    from ConfigSpace import ConfigurationSpace, UniformFloatHyperparameter, UniformIntegerHyperparameter

    from auto_merge.search.cmaes_search import from_unit, split_space, to_unit

    space = ConfigurationSpace()
    weight = UniformFloatHyperparameter("w", 0.0, 2.0, default_value=1.5)
    rate = UniformFloatHyperparameter("lr", 1e-4, 1e-2, log=True, default_value=1e-3)
    count = UniformIntegerHyperparameter("k", 1, 9, default_value=3)
    space.add([weight, rate, count])
    fixed, searched = split_space(space)
    assert fixed == {} and [hp.name for hp in searched] == ["k", "lr", "w"]
    assert to_unit(weight, 1.5) == 0.75 and from_unit(weight, 0.75) == 1.5
    assert to_unit(rate, 1e-3) == pytest.approx(0.5) and from_unit(rate, 0.5) == pytest.approx(1e-3)
    assert from_unit(count, 0.5) == 5 and isinstance(from_unit(count, 0.5), int)
    assert from_unit(weight, -0.3) == 0.0 and from_unit(weight, 1.7) == 2.0  # clipped to the range


def test_successive_halving_starts_every_configuration_at_the_smallest_budget(tmp_path):
    # One successive-halving round for min 100, max 1000, eta 3: 9@111, 3@333, 1@1000 = 13 trials; with the
    # promotions paying only for their new examples, 9x111 + 3x222 + 1x667 = 2333 examples.
    assert trials_for_total_budget(2334, 100, 1000, 3, "successive_halving") == 13
    config = write_config(tmp_path, n_trials=13, optimizer="successive_halving", name="sh.yaml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_search(config, show_progress=False, write_model=False)
    # SMAC's local search takes np.mean of no timings here; that numpy noise stays off the user's terminal.
    assert not [w for w in caught if "Mean of empty slice" in str(w.message)]
    trials = read_trials(result.run_dir / "trials.jsonl")
    # min 10, max 30: each round is 3 new configurations at 10 and the best promoted to 30, or all those tied for
    # the best (Hyperband would also run brackets that start new configurations at 30).
    first_budgets = {}
    for trial in trials:
        first_budgets.setdefault(json.dumps(trial["configuration"], sort_keys=True), trial["budget"])
    assert set(first_budgets.values()) == {10.0}
    rounds = "".join("n" if t["budget"] == 10.0 else "P" for t in trials)
    assert len(trials) == 13 and re.fullmatch(r"(nnnP{1,3})+n*", rounds), rounds


def test_the_same_config_gives_the_same_trials_whatever_the_hash_seed(tmp_path):
    """SMAC's suggestions follow set iteration order; `python merge.py` fixes the hash seed by re-executing itself,
    so two runs started with random hash seeds make the same trials (model-based ones included)."""
    config = write_config(tmp_path, n_trials=14, optimizer="successive_halving")
    runs = []
    for attempt in range(2):
        done = subprocess.run([sys.executable, str(REPO / "merge.py"), "--config", str(config), "--overwrite",
                               "--no-model"], cwd=tmp_path, capture_output=True, text=True, timeout=400,
                              env={**os.environ, "PYTHONHASHSEED": "random", "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr[-2000:]
        trials = read_trials(tmp_path / "runs" / "lfs" / "trials.jsonl")
        runs.append([(t["configuration"], t["budget"], t["scores"]) for t in trials])
    assert len(runs[0]) == 14 and runs[0] == runs[1]
    assert any(t["config_origin"] and "Local Search" in t["config_origin"] for t in trials)


# Where a kill can fall after trial 3 is logged: before SMAC saves anything, or between its runhistory and
# intensifier files (each is replaced whole, but not the two together).
DIES_AFTER_TRIAL_3 = {
    "before_smac_saves": ("""
        import smac.main.smbo as smbo
        save = smbo.SMBO.save
        def save_or_die(self):
            if self._runhistory.finished >= 3:
                os._exit(9)
            save(self)
        smbo.SMBO.save = save_or_die
        """, 2),
    "between_runhistory_and_intensifier": ("""
        replace = os.replace
        def replace_or_die(source, target):
            if str(target).endswith("intensifier.json"):
                with open(str(target).replace("intensifier.json", "runhistory.json")) as saved:
                    if len(json.load(saved)["data"]) >= 3:
                        os._exit(9)
            replace(source, target)
        os.replace = replace_or_die
        """, 3),
}


@pytest.mark.parametrize("moment", sorted(DIES_AFTER_TRIAL_3))
def test_a_search_killed_while_saving_a_trial_resumes_without_logging_it_twice(tmp_path, moment):
    """trials.jsonl already holds trial 3 and SMAC's state holds it partly or not at all. The resumed SMAC may run that
    trial again (its examples come from the cache); the search finishes and no trial is logged twice."""
    config = write_config(tmp_path, n_trials=6)
    log = tmp_path / "runs" / "lfs" / "trials.jsonl"
    patch, saved_trials = DIES_AFTER_TRIAL_3[moment]
    script = "import json, os\n" + textwrap.dedent(patch) + textwrap.dedent(f"""
        from auto_merge.search.driver import run_search
        run_search({str(config)!r}, show_progress=False, write_model=False)
        """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    died = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=400)
    assert died.returncode == 9, died.stderr[-2000:]
    done_before = read_trials(log)
    assert len(done_before) == 3
    saved = json.loads((tmp_path / "runs" / "lfs" / "smac" / "0" / "runhistory.json").read_text())
    assert len(saved["data"]) == saved_trials

    run_search(config, show_progress=False, write_model=False)
    trials = read_trials(log)
    assert trials[:3] == done_before
    keys = [(json.dumps(t["configuration"], sort_keys=True), t["budget"], t["seed"]) for t in trials]
    assert len(set(keys)) == len(keys), "a trial was logged twice"
    assert [t["trial"] for t in trials] == list(range(len(trials))) and len(trials) >= 6


def test_the_auto_queue_covers_the_slowest_recent_turn_with_headroom():
    from auto_merge.search.parallel import MAX_QUEUED, START_QUEUED, QueueDepth, worker_busy

    assert QueueDepth(3).value == 3 and QueueDepth(0).value == 0
    depth = QueueDepth("auto")
    assert depth.value == START_QUEUED  # nothing timed yet
    depth.turns.extend([0.05, 2.0, 0.1])
    depth.trials.extend([0.2, 0.25, 0.3])
    assert depth.value == 12  # ceil(1.5 * 2.0 / 0.25)
    depth.trials.extend([60.0] * 5)  # trials of a minute: one queued trial is plenty
    assert depth.value == 1
    depth.trials.clear()
    depth.trials.extend([0.01] * 3)
    assert depth.value == MAX_QUEUED
    # Busy share: worker a runs 0-4 and 6-10 of the span 0-10, worker b 1-10; an earlier start's trials are left out.
    records = [{"worker_pid": 9, "started_unix": -50.0, "ended_unix": -40.0, "driver_pid": 1},
               {"worker_pid": "a", "started_unix": 0.0, "ended_unix": 4.0, "driver_pid": 2},
               {"worker_pid": "b", "started_unix": 1.0, "ended_unix": 10.0, "driver_pid": 2},
               {"worker_pid": "a", "started_unix": 6.0, "ended_unix": 10.0, "driver_pid": 2}]
    assert worker_busy(records) == {"a": 0.8, "b": 0.9}
