"""Loading a config is bounded and never runs or reads anything it should not (issue 12: D11-D14, D17 in part)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from auto_merge.config import ConfigError
from auto_merge.config.loader import load_yaml_with_includes


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_an_alias_bomb_is_refused_quickly(tmp_path):
    """D12: 10 anchors x 10 aliases hung validation with growing memory."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    path = _write(tmp_path, "bomb.yaml", "\n".join(lines) + "\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than .* values"):
        load_yaml_with_includes(path)
    assert time.perf_counter() - started < 10


def test_ordinary_aliases_and_merge_keys_still_work(tmp_path):
    path = _write(tmp_path, "ok.yaml", "common: &c {a: 1, b: [1, 2]}\nx: *c\ny:\n  <<: *c\n  b: 3\nday: 2024-01-02\n")
    data = load_yaml_with_includes(path).data
    assert data["x"] == {"a": 1, "b": [1, 2]} and data["y"] == {"a": 1, "b": 3}
    assert data["day"] == "2024-01-02"  # an unquoted date stays text


@pytest.mark.parametrize("value", [
    "!!python/object/apply:os.system [echo pwned]",  # D13: on a list, used to be dropped silently
    "!!python/object/apply:os.system {cmd: echo}",  # on a mapping
    "!!python/name:os.system",  # D11: tracebacks on scalars
    "!!python/module:os",
    "!!python/tuple [1, 2]",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!function utils.process",
])
def test_tags_that_are_not_plain_data_are_refused_with_the_key(tmp_path, value):
    path = _write(tmp_path, "tagged.yaml", f"strategy: lfs\nglobal_params:\n  thing: {value}\n")
    with pytest.raises(ConfigError, match=r"tagged\.yaml:3: global_params\.thing: .*(not allowed|not supported)"):
        load_yaml_with_includes(path)


@pytest.mark.parametrize("target, message", [
    ("../../../etc/passwd", "outside the config's folder"),  # D14
    ("/etc/passwd", "absolute paths are not allowed"),
    ("~/notes.yaml", "absolute paths are not allowed"),
    ("secrets.txt", "not a YAML file name"),
    ("sub", "not a YAML file name"),
])
def test_include_is_confined_to_the_configs_folder_and_echoes_nothing(tmp_path, target, message):
    outside = _write(tmp_path, "outside.yaml", "secret: the first line of a private file\n")
    _write(tmp_path / "cfg", "secrets.txt", "password: hunter2\n")
    (tmp_path / "cfg" / "sub").mkdir()
    path = _write(tmp_path / "cfg", "main.yaml", f"strategy: lfs\nstrategies:\n  lfs: !include {target}\n")
    with pytest.raises(ConfigError, match=message) as error:
        load_yaml_with_includes(path)
    assert "hunter2" not in str(error.value) and "private" not in str(error.value)
    assert outside.exists()


def test_include_of_a_sibling_or_a_subfolder_works(tmp_path):
    _write(tmp_path, "parts/lfs.yaml", "n_trials: 3\n")
    _write(tmp_path, "parts/more.yml", "eta: 3\n")
    path = _write(tmp_path, "main.yaml", "a: !include parts/lfs.yaml\nb: !include parts/more.yml\n")
    assert load_yaml_with_includes(path).data == {"a": {"n_trials": 3}, "b": {"eta": 3}}


@pytest.mark.parametrize("make, message", [
    (lambda d: _write(d, "c.yaml", "strategy: \x01lfs\n"), r"character U\+0001 is not allowed"),  # D11: control byte
    (lambda d: (d / "c.yaml").mkdir() or d / "c.yaml", "is a folder, not a file"),  # D17
    (lambda d: _write(d, "c.yaml", "x: " + "y" * (2 * 1024 * 1024) + "\n"), "more than a config can be"),
])
def test_unreadable_configs_are_one_clear_error(tmp_path, make, message):
    with pytest.raises(ConfigError, match=message):
        load_yaml_with_includes(make(tmp_path))


def test_a_device_file_is_not_read():
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_yaml_with_includes("/dev/zero")


def _lfs_config_with(tmp_path: Path, old: str, new: str) -> Path:
    import shutil

    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "exp_config", tmp_path / "exp_config")
    lfs = tmp_path / "exp_config" / "lfs.yaml"
    assert old in lfs.read_text()
    lfs.write_text(lfs.read_text().replace(old, new))
    return tmp_path / "exp_config" / "config_lfs.yaml"


def test_a_misspelt_key_is_one_problem_with_a_suggestion_even_when_included_twice(tmp_path):
    """D17: lfs.yaml is included by two strategies; a typo gave 4 lines and no suggestion."""
    from auto_merge.config import load_experiment

    config = _lfs_config_with(tmp_path, "n_trials: 90", "n_trails: 90")
    with pytest.raises(ConfigError) as error:
        load_experiment(config, check_models=False)
    assert len(error.value.problems) == 1
    text = str(error.value)
    assert "lfs.yaml:" in text and "unknown key 'n_trails'; did you mean 'n_trials'?" in text
    assert "also under strategies lfs_multiobj" in text and "required key is missing" not in text


def test_a_look_alike_unicode_key_is_shown_escaped(tmp_path):
    from auto_merge.config import load_experiment

    config = _lfs_config_with(tmp_path, "n_trials: 90", "n_tri\u0430ls: 90")  # Cyrillic a
    with pytest.raises(ConfigError) as error:
        load_experiment(config, check_models=False)
    assert "unknown key 'n_tri\\u0430ls' (it contains non-ASCII characters); did you mean 'n_trials'?" in \
        str(error.value)
