"""The run folder both the search and the one-shot path write into: `<output_path>/<run name>`, claimed through
output_dirs (safe name, exclusive lock, atomic replace), and identified by a fingerprint of what its results depend
on, so a rerun of the same config resumes and a changed config or a changed source model starts over."""

from __future__ import annotations

import hashlib
import json
import time


def run_fingerprint(config, strategy, sources: dict[str, str]) -> str:
    """What must match for a rerun to resume rather than start over: the space, the objective, the schedule and the
    source models' files (`sources`, from source_identities)."""
    block = config.selected
    search = block.model_dump(exclude={"n_workers", "dask_scheduler", "queued_per_worker", "run_name"})
    evaluation = config.global_params.evaluation.model_dump(exclude={"batch_size", "device"})
    payload = {
        "strategy": strategy.describe(),
        "search": search,
        "evaluation": evaluation,
        "seed": config.global_params.random_seed,
        "zoo_seed": config.global_params.zoo_seed,
        # Scores are only valid for the files they were measured on: a source replaced in place is another run.
        "sources": sources,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def source_identities(config) -> dict[str, str]:
    from auto_merge.models.inspect import model_identity

    return {ref: model_identity(path) for ref, path in sorted(config.model_paths.items())}


def run_manifest(config, strategy, sources: dict[str, str]) -> dict:
    """What run.json records besides the fingerprint."""
    return {
        "sources": sources,
        "config_file": str(config.source_file),
        "strategy": strategy.describe(),
        "models": {ref: str(path) for ref, path in config.model_paths.items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def claim_run(config, strategy, *, overwrite: bool, run_name: str | None):
    """Context manager holding the run folder `<output_path>/<run_name or strategy>` (see output_dirs)."""
    from auto_merge.output_dirs import claim_run_folder

    block = config.selected
    name = run_name or getattr(block, "run_name", None) or config.strategy
    key = "--run-name" if run_name else (f"strategies.{config.strategy}.run_name"
                                         if getattr(block, "run_name", None) else "strategy")
    sources = source_identities(config)
    return claim_run_folder(config.global_params.output_path or "runs", name, name_key=key,
                            output_key="global_params.output_path",
                            fingerprint=run_fingerprint(config, strategy, sources),
                            manifest=run_manifest(config, strategy, sources), overwrite=overwrite)
