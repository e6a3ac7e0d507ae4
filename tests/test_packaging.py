"""Packaging: pyproject and environment.yml agree, CI runs the README's commands, the CLI starts fast."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _requirement_name(spec: str) -> str:
    name = re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0]
    return name.lower().replace("_", "-")


def _normalise(spec: str) -> str:
    return spec.replace(" ", "").lower()


def test_environment_yml_matches_pyproject_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d)
    pip_requirements = [r for r in pip_section if not r.startswith("-e")]
    assert "-e ." in pip_section, "environment.yml must install the project itself"

    by_name = {_requirement_name(r): _normalise(r) for r in pip_requirements}
    declared_by_name = {_requirement_name(r): _normalise(r) for r in declared}
    assert set(by_name) == set(declared_by_name)
    for name, spec in declared_by_name.items():
        if name == "torch":
            # environment.yml pins the exact CPU build that the README's install command pins.
            assert by_name[name] == "torch==2.13.0"
        else:
            assert by_name[name] == spec, name


def _readme_block(heading: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {heading}", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_install_and_test_commands():
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    install = _readme_block("Install")
    tests = _readme_block("Tests")
    assert install and tests
    for command in install + tests:
        assert command in ci_lines, f"{command!r} from the README is not what .ci/run runs"
    assert "torch==2.13.0" in " ".join(install), "the install command must pin the CPU torch wheel"


def test_cli_help_is_instant_and_imports_no_heavy_library():
    code = (
        "import sys, auto_merge.cli as c\n"
        "heavy = [m for m in ('torch', 'transformers', 'lm_eval', 'smac', 'ConfigSpace', 'dask') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "", f"importing the CLI pulled in {result.stdout.strip()}"
    help_run = subprocess.run([sys.executable, "-m", "auto_merge.cli", "--help"], capture_output=True, text=True,
                              cwd=REPO)
    assert help_run.returncode == 0 and "zoo" in help_run.stdout and "eval" in help_run.stdout
    assert time.perf_counter() - started < 10


def test_search_rejects_a_bad_config_before_loading_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategy: lfs\nglobal_params: {random_seed: zero}\nstrategies: {}\n")
    result = subprocess.run([sys.executable, str(REPO / "merge.py"), "--config", str(bad)], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 2
    assert "bad.yaml" in result.stderr and "global_params.random_seed" in result.stderr
    assert "Traceback" not in result.stderr
