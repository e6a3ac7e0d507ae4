"""Loads this folder's JSONL files for lm-eval (tests with a real pretrained model)."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_jsonl(data_file, **_metadata):
    # Relative to this folder, not the working directory, so the tasks run from anywhere.
    path = HERE / data_file
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(path), split="train")})
