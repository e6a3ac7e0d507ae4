"""A corpus of malformed inputs (tests/data/bad_inputs/cases.yaml) run through the command line: each must end in one
clear error (exit code 2, a message naming what is wrong), never a traceback and never a hang (issue 12).

A case writes its files into a scratch folder and runs one `auto-merge` command in this process. Its inputs are:
- `config`: changes to a valid LFS config over the shipped zoo (`dotted.key: value`; the value `__delete__` removes
  the key), written to `{tmp}/exp.yaml`;
- `files`: more files, name → text;
- `models`: damaged copies of zoo models, name → `{from: ZOO_MODEL, damage: KIND}` (see `_DAMAGE`), at `{tmp}/NAME`.
`{tmp}`, `{repo}` and `{zoo}` in argv, files and config values are replaced by the scratch folder, the repository and
the shipped zoo's folder. `expect` lists substrings the error message must contain; `untouched` lists paths that must
still exist afterwards, and an output folder `{tmp}/out` that did not exist before must not exist after.
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import struct
from pathlib import Path

import pytest
import yaml

from auto_merge.cli import main
from auto_merge.zoo import zoo_root

REPO = Path(__file__).resolve().parents[1]
CASES_FILE = REPO / "tests" / "data" / "bad_inputs" / "cases.yaml"
CASES = yaml.safe_load(CASES_FILE.read_text())
CASE_SECONDS = 90  # far above any case's time: only a hang gets there

VALID_CONFIG = {
    "strategy": "lfs",
    "global_params": {
        "random_seed": 0, "output_path": "{tmp}/runs",
        "evaluation": {"batch_size": 64, "device": "cpu", "include_path": "{repo}/custom_tasks", "limit": 20,
                       "tasks": [{"task": "zoo_num", "metric": "exact_match,none"},
                                 {"task": "zoo_col", "metric": "exact_match,none"}]}},
    "strategies": {"lfs": {
        "base_model": "zoo:base", "models": ["zoo:num", "zoo:col"], "layer_granularity": 4,
        "merging_method": {"task_arithmetic": {"scaling_coefficient": {"min": 0.3, "max": 1.2}}},
        "min_budget": 10, "max_budget": 30, "eta": 3, "n_trials": 2, "n_workers": 1,
        "optimizer": "successive_halving"}},
}


def _fill(value, places: dict[str, str]):
    if isinstance(value, str):
        for name, text in places.items():
            value = value.replace("{" + name + "}", text)
        return value
    if isinstance(value, list):
        return [_fill(item, places) for item in value]
    if isinstance(value, dict):
        return {key: _fill(item, places) for key, item in value.items()}
    return value


def _patched_config(changes: dict) -> dict:
    config = copy.deepcopy(VALID_CONFIG)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = config
        for name in parents:
            node = node.setdefault(name, {})
        if value == "__delete__":
            node.pop(last, None)
        else:
            node[last] = value
    return config


# ------------------------------------------------------------------------------------------ damaged models


def _safetensors(folder: Path) -> Path:
    return folder / "model.safetensors"


def _rewrite(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(_safetensors(folder))
    change(tensors)
    save_file(tensors, _safetensors(folder), metadata={"format": "pt"})


def _edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def _truncate(folder: Path) -> None:
    path = _safetensors(folder)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage_header(folder: Path) -> None:
    path = _safetensors(folder)
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 60) + data[8:])


def _pickle_only(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(_safetensors(folder)), folder / "pytorch_model.bin")
    _safetensors(folder).unlink()


def _nan(tensors) -> None:
    name = next(n for n in sorted(tensors) if "mlp.down_proj" in n)
    tensors[name][0, 0] = float("nan")


def _reshape(tensors) -> None:
    name = next(n for n in sorted(tensors) if "mlp.down_proj" in n)
    tensors[name] = tensors[name][:, :-1].contiguous()


def _drop(tensors) -> None:
    del tensors[next(n for n in sorted(tensors) if "mlp.down_proj" in n)]


_DAMAGE = {
    "truncated": _truncate,
    "garbage_header": _garbage_header,
    "pickle_only": _pickle_only,
    "nan_weight": lambda folder: _rewrite(folder, _nan),
    "reshaped_tensor": lambda folder: _rewrite(folder, _reshape),
    "missing_tensor": lambda folder: _rewrite(folder, _drop),
    "auto_map": lambda folder: _edit_config(folder, lambda c: c.update(auto_map={"AutoModelForCausalLM": "x.Y"})),
    "gpt2_config": lambda folder: _edit_config(folder, lambda c: c.update(model_type="gpt2",
                                                                             architectures=["GPT2LMHeadModel"])),
    "no_config": lambda folder: (folder / "config.json").unlink(),
    "config_not_json": lambda folder: (folder / "config.json").write_text("{ not json"),
    "no_weights": lambda folder: _safetensors(folder).unlink(),
    "empty": lambda folder: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in folder.iterdir()],
}


def _damaged_model(source: str, damage: str, target: Path) -> None:
    shutil.copytree(zoo_root() / source, target)
    _DAMAGE[damage](target)


# ------------------------------------------------------------------------------------------ the corpus


def test_the_corpus_is_large_and_every_case_is_distinct():
    names = [case["name"] for case in CASES]
    assert len(names) >= 60 and len(set(names)) == len(names)
    contents = [json.dumps({key: value for key, value in case.items() if key != "name"}, sort_keys=True)
                for case in CASES]
    assert len(set(contents)) == len(contents), "two cases test the same input"


class _Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Hang(f"still running after {CASE_SECONDS} s")


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_a_malformed_input_gets_one_clear_error(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    places = {"tmp": str(tmp_path), "repo": str(REPO), "zoo": str(zoo_root())}
    for name, spec in (case.get("models") or {}).items():
        _damaged_model(spec["from"], spec["damage"], tmp_path / name)
    if "config" in case:
        config = _fill(_patched_config(case["config"] or {}), places)
        (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for name, text in (case.get("files") or {}).items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, dict) and "bytes_hex" in text:
            path.write_bytes(bytes.fromhex(text["bytes_hex"]) * text.get("repeat", 1))
        else:
            path.write_text(_fill(text, places))
    argv = [_fill(str(arg), places) for arg in case["argv"]]

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(CASE_SECONDS)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capsys.readouterr()
    assert code == 2, f"exit code {code}; stdout: {out[-2000:]}; stderr: {err[-2000:]}"
    assert "Traceback" not in out + err
    # The message is the last thing written; a progress bar may come before it.
    starts = [err.rfind(head) for head in ("\nerror:", "\nusage:")] + [0 if err.startswith(("error:", "usage:")) else -1]
    assert max(starts) >= 0, f"no error message in stderr: {err[-2000:]!r}"
    message = err[max(starts):].strip()
    assert message.count("\nerror:") == 0, f"more than one error: {message!r}"
    for text in case.get("expect") or []:
        assert _fill(text, places) in message, f"{text!r} not in {message!r}"
    for path in case.get("untouched") or []:
        assert Path(_fill(path, places)).exists(), f"{path} was removed"
    if "{tmp}/out" in case["argv"] and not any(name.startswith("out/") for name in case.get("files") or {}):
        assert not (tmp_path / "out").exists(), "a failed command left an output folder"
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporaries left behind"
