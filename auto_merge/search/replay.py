"""`auto-merge replay`: a found configuration -> a merged checkpoint (and optionally its scores).

Two inputs:
- this project's search_config JSON (format `auto-merge/search-config/1`): self-describing, replays on its own;
- the reference implementation's flat LFS JSON: needs the experiment config it was found with (`--config`), whose
  models (mapped to local folders through `global_params.model_aliases` when they are hub ids) rebuild the space.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from auto_merge.errors import AutoMergeError
from auto_merge.search.outputs import SEARCH_CONFIG_FORMAT


class ReplayError(AutoMergeError, ValueError):
    pass


def is_reference_configuration(data) -> bool:
    """The reference implementation's flat SMAC JSON rather than this project's format."""
    return not (isinstance(data, dict) and data.get("format") == SEARCH_CONFIG_FORMAT)


def load_found_configuration(path: Path, config_path: Path | None = None):
    """(strategy, configuration values, model paths, evaluation settings or None) from a found-configuration file."""
    from auto_merge.strategies import StrategyError, build_strategy, strategy_from_description

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReplayError(f"{path}: cannot read a search configuration ({err})") from None
    if isinstance(data, dict) and data.get("format") == SEARCH_CONFIG_FORMAT:
        for key, kind in (("strategy", dict), ("configuration", dict)):
            if not isinstance(data.get(key), kind):
                raise ReplayError(f"{path}: key {key!r} is missing or not a mapping; allowed: a file written by "
                                  f"auto-merge search (search_config/*.json)")
        try:
            strategy = strategy_from_description(data["strategy"])
        except StrategyError as err:
            raise ReplayError(f"{path}: key 'strategy': {err}") from None
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


def evaluation_suite(path: Path, evaluation: dict | None, include_paths: list[Path] | None = None, *,
                     allow_code_execution: bool = False):
    """(settings, TaskSuite) to score a replayed model as the search scored it; fails before any model is read.

    Task folders: `include_paths` when given, else the ones the file records, else (when those do not exist here,
    e.g. a configuration found on another machine) the project's own `custom_tasks/`. Tasks that run model-written
    code need `allow_code_execution`, whatever the file says.
    """
    from auto_merge.config.schema import EvaluationSettings
    from auto_merge.evaluation.lm_eval_runner import (CodeExecutionNotAllowedError, TaskConfigError, TaskSuite,
                                                      default_include_paths)

    if not evaluation or not evaluation.get("tasks"):
        raise ReplayError(f"{path}: evaluation.tasks is empty: the file names no tasks to score the model on")
    try:
        settings = EvaluationSettings.model_validate(
            {key: value for key, value in evaluation.items() if key in EvaluationSettings.model_fields})
    except ValueError as err:
        raise ReplayError(f"{path}: evaluation: {err}") from None
    if settings.vllm:
        from auto_merge.evaluation.backends import vllm_problem

        problem = vllm_problem(settings.device)
        if problem is not None:
            raise ReplayError(f"{path}: evaluation.vllm is true, but {problem}; allowed here: false (set it in the "
                              "file to score with transformers)")
    if include_paths is None:
        recorded = [Path(p) for p in evaluation.get("include_paths_resolved") or []]
        include_paths = recorded if recorded and all(p.is_dir() for p in recorded) else None
        if recorded and include_paths is None:
            missing = ", ".join(str(p) for p in recorded if not p.is_dir())
            print(f"note: {path}: evaluation.include_paths_resolved: {missing} does not exist here; looking for the "
                  f"tasks in {', '.join(map(str, default_include_paths())) or 'lm-eval'} (--include-path to choose)",
                  file=sys.stderr)
    try:
        suite = TaskSuite([t.task for t in settings.tasks], include_paths,
                          overrides={t.task: t.overrides for t in settings.tasks if t.overrides},
                          num_fewshot=settings.num_fewshot, allow_code_execution=allow_code_execution)
    except (TaskConfigError, FileNotFoundError) as err:
        hint = "; pass --allow-code-execution to run them" if isinstance(err, CodeExecutionNotAllowedError) else \
            "; pass --include-path FOLDER with the folder of these tasks"
        raise ReplayError(f"{path}: evaluation.tasks: {err}{hint}") from None
    return settings, suite


def replay(path: Path, out_dir: Path, *, config_path: Path | None = None, overwrite: bool = False,
           evaluate: bool = False, seed: int | None = None, include_paths: list[Path] | None = None,
           allow_code_execution: bool = False, as_reference: bool = False) -> dict:
    """Decode a found configuration into a model in ``out_dir`` (and score it with ``evaluate``).

    A reference configuration (its flat JSON) decodes with this project's semantics; where that model departs from
    the one the reference exported, the departures are printed, returned (``report["departures"]``) and written to
    the model card. ``as_reference`` decodes as the reference did instead, as far as it can be reproduced."""
    from ConfigSpace import Configuration

    from auto_merge.merge.engine import run_recipe
    from auto_merge.output_dirs import check_replaceable
    from auto_merge.merge.plan import ModelCatalog, SourceModel
    from auto_merge.merge.recipe import parse_recipe

    check_replaceable(out_dir, overwrite=overwrite)  # before any model is read
    strategy, values, model_paths, evaluation = load_found_configuration(path, config_path)
    data = json.loads(Path(path).read_text())
    reference = is_reference_configuration(data)
    if as_reference and not reference:
        raise ReplayError(f"{path}: --as-reference applies to the reference implementation's flat configurations; "
                          f"this file was written by auto-merge and replays as found")
    seed = seed if seed is not None else int(data.get("seed", 0)) if isinstance(data.get("seed"), int) else 0
    try:  # the values must fit the space they claim to come from (ranges, conditions)
        Configuration(strategy.build_space(), values=values)
    except (ValueError, KeyError) as err:
        raise ReplayError(f"{path}: the configuration does not fit the {strategy.name} space: {err}") from None
    recipe = strategy.decode(values, as_reference=as_reference)
    departures = strategy.reference_departures(values, as_reference=as_reference) if reference else []
    if reference:
        departures.append("the reference computed every merge in fp16; this replay computes in fp32 and writes "
                          f"{recipe.get('dtype', 'float32')}")
    for note in departures:
        print(f"note: departs from the reference's model: {note}", file=sys.stderr)
    if evaluate:
        settings, suite = evaluation_suite(path, evaluation, include_paths, allow_code_execution=allow_code_execution)
    catalog = ModelCatalog()
    for ref, folder in model_paths.items():
        if Path(folder, "config.json").is_file():
            catalog.add(SourceModel.from_folder(ref, folder))
    result = run_recipe(parse_recipe(recipe, source=str(path)), out_dir, seed=seed, overwrite=overwrite,
                        catalog=catalog, progress=True, source=str(path),
                        notes=[("Departures from the reference's model" + (" (decoded --as-reference)" if as_reference
                                                                            else ""), departures)] if reference else ())
    report = {"out_dir": str(result.out_dir), "recipe": recipe, "departures": departures}
    if evaluate:
        from auto_merge.evaluation.backends import vllm_options
        from auto_merge.evaluation.lm_eval_runner import ChatFormat, LiveEvaluator, load_checkpoint, resolve_device

        dtype = settings.torch_dtype if settings.torch_dtype != "auto" else "float32"  # as the search's trials
        model, tokenizer = load_checkpoint(out_dir, dtype=dtype, device=resolve_device(settings.device))
        results = LiveEvaluator(model, tokenizer, suite, batch_size=settings.batch_size,
                                chat=ChatFormat.from_settings(settings),
                                vllm=vllm_options(settings, out_dir, seed=seed)).evaluate(limit=None)
        report["scores"] = {t.task: results[t.task][t.metric] for t in settings.tasks}
    return report
