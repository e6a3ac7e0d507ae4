"""The demo LFS experiment (exp_config/config_lfs.yaml) as a plain dict, for benchmarks that write variants of it."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def demo_lfs_config(output_path: Path) -> tuple[dict, dict]:
    """(config, LFS block): config_lfs.yaml with its `!include`s left out (the caller puts its block under
    `strategies`), runs written under `output_path`, and the custom tasks found from any working directory."""
    config = yaml.safe_load((REPO / "exp_config" / "config_lfs.yaml").read_text().replace("!include", ""))
    config["global_params"]["output_path"] = str(output_path)
    config["global_params"]["evaluation"]["include_path"] = str(REPO / "custom_tasks")
    block = yaml.safe_load((REPO / "exp_config" / "lfs.yaml").read_text())
    return config, block
