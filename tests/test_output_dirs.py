"""Output folders: nothing a user owns is ever deleted (run names, --overwrite, sources), one writer per run folder,
and temporaries of killed writers are cleaned up (issue 12: D1, D2, D3, D16)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from auto_merge.output_dirs import (
    OWNER_MARKER,
    OutputDirError,
    atomic_folder,
    check_folder_name,
    claim_run_folder,
    clean_stale_temporaries,
)
from auto_merge.search.driver import run_search
from auto_merge.zoo import zoo_root

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "auto_merge.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def _search_config(folder: Path, **block) -> Path:
    config = {
        "strategy": "lfs",
        "global_params": {"output_path": "runs", "baselines": False, "evaluation": {
            "include_path": str(REPO / "custom_tasks"), "tasks": [{"task": "zoo_num", "metric": "exact_match,none"}]}},
        "strategies": {"lfs": {"base_model": "zoo:base", "models": ["zoo:num", "zoo:col"], "layer_granularity": 4,
                               "merging_method": {"task_arithmetic": {"scaling_coefficient": {"min": 0.3, "max": 1.2}}},
                               "min_budget": 10, "max_budget": 30, "n_trials": 2, **block}},
    }
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "/abs", ".hidden", "", "x" * 200, "a\nb"])
def test_run_names_that_leave_the_output_folder_are_refused(name):
    with pytest.raises(OutputDirError, match="--run-name.*not a plain folder name"):
        check_folder_name(name, "--run-name")


def test_run_name_dotdot_with_overwrite_deletes_nothing(tmp_path):
    """D1: `--run-name .. --overwrite` used to rmtree the working directory."""
    (tmp_path / "precious.txt").write_text("mine")
    config = _search_config(tmp_path)
    result = _cli("search", "--config", str(config), "--run-name", "..", "--overwrite", cwd=tmp_path)
    assert result.returncode == 2 and "not a plain folder name" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "mine"


def test_run_name_in_the_config_must_stay_inside_output_path(tmp_path):
    from auto_merge.config import ConfigError, load_experiment

    config = _search_config(tmp_path, run_name="../../x")
    with pytest.raises(ConfigError, match=r"strategies\.lfs\.run_name"):
        load_experiment(config)


def test_overwrite_never_replaces_a_folder_that_is_not_an_auto_merge_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "lfs").mkdir(parents=True)
    (tmp_path / "runs" / "lfs" / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not an auto-merge run folder.*even with --overwrite"):
        run_search(_search_config(tmp_path), overwrite=True, show_progress=False)
    assert (tmp_path / "runs" / "lfs" / "notes.txt").read_text() == "mine"


def _recipe(folder: Path, sources: Path) -> Path:
    path = folder / "recipe.yml"
    path.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(sources / "base"),
                                    "models": [{"model": str(sources / "num"), "parameters": {"weight": 1.0}}]}))
    return path


@pytest.fixture
def sources(tmp_path) -> Path:
    import shutil

    work = tmp_path / "work"
    for name in ("base", "num"):
        shutil.copytree(zoo_root(0) / name, work / name)
    return work


@pytest.mark.parametrize("target, message", [
    ("work/num", "is the source model folder"),
    ("work", "holds the source model folder"),
    ("work/num/out", "lies inside the source model folder"),
])
def test_merge_never_writes_over_or_around_its_sources(tmp_path, sources, target, message):
    """D2: `merge recipe.yml work/num --overwrite` used to replace the source expert."""
    recipe = _recipe(tmp_path, sources)
    before = (sources / "num" / "model.safetensors").read_bytes()
    result = _cli("merge", str(recipe), target, "--overwrite", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert (sources / "num" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in sources.iterdir()) == ["base", "num"]


def test_merge_overwrite_replaces_only_its_own_earlier_output(tmp_path, sources):
    recipe = _recipe(tmp_path, sources)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    refused = _cli("merge", str(recipe), "mine", "--overwrite", cwd=tmp_path)
    assert refused.returncode == 2 and "not written by auto-merge" in refused.stderr
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"

    assert _cli("merge", str(recipe), "out", cwd=tmp_path).returncode == 0
    assert (tmp_path / "out" / OWNER_MARKER).is_file()
    again = _cli("merge", str(recipe), "out", "--overwrite", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert _cli("merge", str(recipe), ".", "--overwrite", cwd=tmp_path).returncode == 2  # never the working folder


def test_a_run_folder_has_one_writer_at_a_time(tmp_path, monkeypatch):
    """D3: two searches on one run folder both ran and duplicated trials."""
    monkeypatch.chdir(tmp_path)
    config = _search_config(tmp_path)
    with claim_run_folder(tmp_path / "runs", "lfs", name_key="run_name", fingerprint="other", manifest={},
                          overwrite=False):
        with pytest.raises(OutputDirError, match="in use by another auto-merge"):
            run_search(config, show_progress=False)
        result = _cli("search", "--config", str(config), cwd=tmp_path)  # another process: refused at once
        assert result.returncode == 2 and "in use by another auto-merge" in result.stderr
        assert f"process {os.getpid()}" in result.stderr
    assert not (tmp_path / "runs" / "lfs" / "trials.jsonl").exists()


def test_temporaries_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    """D16: a killed write left `<OUT>.tmp-<pid>` folders forever."""
    out = tmp_path / "out"
    dead = tmp_path / ".out.tmp-999999-dead"  # its writer's lock file exists but nobody holds it
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".out.tmp-999999-dead.lock").write_text("999999")
    legacy = tmp_path / "out.tmp-999998"  # an older version's name: no lock file, the pid is gone
    legacy.mkdir()
    live = tmp_path / ".out.tmp-1-live"  # a writer that is still running holds its lock
    live.mkdir()
    with open(tmp_path / ".out.tmp-1-live.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with atomic_folder(out) as staging:
            (staging / "x.txt").write_text("new")
        assert not dead.exists() and not legacy.exists() and live.exists()
    assert (out / "x.txt").read_text() == "new"
    assert clean_stale_temporaries(out) == [live]  # its writer is gone now


def test_a_failed_write_leaves_neither_a_temporary_nor_a_change(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out) as staging:
        (staging / "v.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_folder(out, overwrite=True) as staging:
            (staging / "v.txt").write_text("2")
            raise RuntimeError("crash")
    assert (out / "v.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
