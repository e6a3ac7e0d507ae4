"""The found configurations shipped in search_config/ replay on the demo zoo, on any machine, to their recorded scores.

They were found by the shipped exp_config/ searches and carry no machine-specific paths: models resolve from their
references (zoo:NAME), tasks from the project's custom_tasks/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from auto_merge.search.outputs import SEARCH_CONFIG_FORMAT
from auto_merge.search.replay import ReplayError, replay
from auto_merge.zoo import zoo_root

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "search_config").glob("*/*.json"))


@pytest.fixture(scope="module", autouse=True)
def zoo():
    return zoo_root(0)


def test_every_shipped_strategy_has_a_found_configuration():
    assert {path.parent.name for path in SHIPPED} == {"lfs", "lfs_multiobj", "dis", "prune"}
    for path in SHIPPED:
        data = json.loads(path.read_text())
        assert data["format"] == SEARCH_CONFIG_FORMAT and data["model_paths"] == {}
        assert "include_paths_resolved" not in data["evaluation"] and "run" not in data
        assert data["strategy"]["strategy"] == path.parent.name


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_configuration_replays_into_a_loadable_checkpoint(path, tmp_path):
    from transformers import AutoModelForCausalLM

    report = replay(path, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    layers = [s["sources"][0]["layer_range"] for s in report["recipe"]["slices"]]
    assert model.config.num_hidden_layers == sum(end - start for start, end in layers)


# One per strategy (the scoring is the slow part): the replayed model scores what the search recorded.
SCORED = ["lfs/best.json", "lfs_multiobj/front_0.json", "dis/best.json", "prune/front_1.json"]


@pytest.mark.parametrize("name", SCORED)
def test_shipped_configuration_reproduces_its_recorded_scores(name, tmp_path):
    path = REPO / "search_config" / name
    recorded = json.loads(path.read_text())["scores"]
    report = replay(path, tmp_path / "out", evaluate=True)
    # The zoo's files ship with the project, so this is equal in practice; the slack (one example in a hundred)
    # covers another CPU's float kernels flipping a near-tie in greedy decoding, and is far below what a wrong recipe
    # or wrong evaluation settings change (tens of points).
    assert report["scores"] == pytest.approx(recorded, abs=0.01)


def test_the_shipped_dis_winner_holds_two_skills_which_no_expert_does():
    """The DIS demo's winner stacks zoo:col's first layers (its embeddings carry the colours) under zoo:cap's late
    layers (they carry the codes): both skills, where each expert has one (col 1.0 / cap 0.0 and col 0.5 / cap 1.0,
    `auto-merge zoo report`), so its mean beats the best expert's 0.625 by more than 10 points."""
    data = json.loads((REPO / "search_config" / "dis" / "best.json").read_text())
    assert data["strategy"]["models"] == ["zoo:col", "zoo:cap"]
    scores = data["scores"]
    assert scores["zoo_col"] >= 0.95 and scores["zoo_cap"] >= 0.95
    assert sum(scores.values()) / len(scores) >= 0.625 + 0.10
    from auto_merge.strategies import strategy_from_description

    plan = strategy_from_description(data["strategy"]).layer_plan(data["configuration"])
    assert plan[0][0] == "zoo:col" and len(plan) > 8  # col's embeddings; deeper than the experts
    assert {("zoo:cap", 6), ("zoo:cap", 7)} <= {(model, layer) for model, layer, _ in plan}


def test_recorded_scores_hold_under_torchs_portable_kernels(tmp_path):
    """Another machine picks other float kernels; ATEN_CPU_CAPABILITY=default stands in for it. The shipped zoo's
    files are the same there, so the replayed merge scores what was recorded (within one example in a hundred)."""
    import os
    import subprocess
    import sys

    path = REPO / "search_config" / "lfs" / "best.json"
    recorded = json.loads(path.read_text())["scores"]
    result = subprocess.run(
        [sys.executable, "-m", "auto_merge.cli", "replay", str(path), str(tmp_path / "out"), "--eval"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "ATEN_CPU_CAPABILITY": "default"})
    assert result.returncode == 0, result.stderr[-2000:]
    scores = dict(line.split(": ") for line in result.stdout.splitlines() if line.startswith("zoo_"))
    assert {task: float(value) for task, value in scores.items()} == pytest.approx(recorded, abs=0.01)


def test_replay_evaluation_errors_name_the_file_and_the_fix(tmp_path):
    path = REPO / "search_config" / "lfs" / "best.json"
    (tmp_path / "tasks").mkdir()
    with pytest.raises(ReplayError, match=r"best\.json: evaluation\.tasks: unknown task.*--include-path"):
        replay(path, tmp_path / "out", evaluate=True, include_paths=[tmp_path / "tasks"])
    assert not (tmp_path / "out").exists()  # refused before anything was merged

    moved = json.loads(path.read_text())
    moved["evaluation"]["tasks"] = []
    (tmp_path / "untasked.json").write_text(json.dumps(moved))
    with pytest.raises(ReplayError, match=r"untasked\.json: evaluation\.tasks is empty"):
        replay(tmp_path / "untasked.json", tmp_path / "out", evaluate=True)
