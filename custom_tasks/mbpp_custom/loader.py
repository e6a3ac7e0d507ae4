"""Loads this task's local data for lm-eval: JSON Lines (or JSON / Parquet) files relative to this folder.

Data never comes from a hub: put the files where the task's YAML says (see custom_tasks/README.md), or point the
task at them with a `dataset_kwargs: {data_files: {<split>: <path>}}` override in the experiment config.
"""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_local(data_files, **_metadata):
    """{split: path} → a DatasetDict with those splits; relative paths are taken against this folder."""
    splits = {}
    for split, name in data_files.items():
        path = HERE / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: this task reads its {split!r} split from a local file; see "
                f"{HERE.parent / 'README.md'} for where to get it and where to put it")
        builder = _BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use .jsonl, .json or .parquet")
        splits[split] = datasets.load_dataset(builder, data_files=str(path), split="train")
    return datasets.DatasetDict(splits)
