"""`auto-merge replay`: a found configuration -> a merged checkpoint (and optionally its scores).

Two inputs:
- this project's search_config JSON (format `auto-merge/search-config/1`): self-describing, replays on its own;
- the reference implementation's flat LFS JSON: needs the experiment config it was found with (`--config`), whose
  models (mapped to local folders through `global_params.model_aliases` when they are hub ids) rebuild the space.
"""

from __future__ import annotations

import json
from pathlib import Path

from auto_merge.search.outputs import SEARCH_CONFIG_FORMAT


class ReplayError(ValueError):
    pass


def load_found_configuration(path: Path, config_path: Path | None = None):
    """(strategy, configuration values, model paths, evaluation settings or None) from a found-configuration file."""
    from auto_merge.strategies import build_strategy, strategy_from_description

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReplayError(f"{path}: cannot read a search configuration ({err})") from None
    if isinstance(data, dict) and data.get("format") == SEARCH_CONFIG_FORMAT:
        strategy = strategy_from_description(data["strategy"])
        return strategy, data["configuration"], data.get("model_paths") or {}, data.get("evaluation")
    if config_path is None:
        raise ReplayError(f"{path} is not in this project's format ({SEARCH_CONFIG_FORMAT}); a reference "
                          "configuration needs the experiment config it was found with: pass --config EXP.yaml")
    from auto_merge.config import load_experiment

    config = load_experiment(config_path)
    strategy = build_strategy(config)
    values = strategy.import_reference(data)
    from auto_merge.search.outputs import evaluation_record

    paths = {ref: str(p) for ref, p in config.model_paths.items()}
    return strategy, values, paths, evaluation_record(config.global_params.evaluation, Path(config.source_file).parent)


def replay(path: Path, out_dir: Path, *, config_path: Path | None = None, overwrite: bool = False,
           evaluate: bool = False, seed: int | None = None) -> dict:
    from ConfigSpace import Configuration

    from auto_merge.merge.engine import run_recipe
    from auto_merge.merge.io import check_output_dir
    from auto_merge.merge.plan import ModelCatalog, SourceModel
    from auto_merge.merge.recipe import parse_recipe

    check_output_dir(out_dir, overwrite=overwrite)  # before any model is read
    strategy, values, model_paths, evaluation = load_found_configuration(path, config_path)
    data = json.loads(Path(path).read_text())
    seed = seed if seed is not None else int(data.get("seed", 0)) if isinstance(data.get("seed"), int) else 0
    try:  # the values must fit the space they claim to come from (ranges, conditions)
        Configuration(strategy.build_space(), values=values)
    except (ValueError, KeyError) as err:
        raise ReplayError(f"{path}: the configuration does not fit the {strategy.name} space: {err}") from None
    recipe = strategy.decode(values)
    catalog = ModelCatalog()
    for ref, folder in model_paths.items():
        if Path(folder, "config.json").is_file():
            catalog.add(SourceModel.from_folder(ref, folder))
    result = run_recipe(parse_recipe(recipe, source=str(path)), out_dir, seed=seed, overwrite=overwrite,
                        catalog=catalog, progress=True)
    report = {"out_dir": str(result.out_dir), "recipe": recipe}
    if evaluate:
        if not evaluation:
            raise ReplayError(f"{path} names no evaluation tasks to score the model on")
        from auto_merge.evaluation.lm_eval_runner import evaluate_checkpoint

        tasks = [t["task"] for t in evaluation["tasks"]]
        include = [Path(p) for p in evaluation.get("include_paths_resolved", [])] or None
        results = evaluate_checkpoint(out_dir, tasks, include_paths=include)
        report["scores"] = {t["task"]: results[t["task"]][t["metric"]] for t in evaluation["tasks"]}
    return report
