"""One-shot runs (`normal_models`, `normal_slices`): the config's merge, made once, saved and scored.

`run_oneshot(config)` (what `auto-merge search` / `python merge.py` run for these strategies):
1. turns the validated block into a recipe (`auto_merge.strategies.oneshot`), checks it and compiles its plan from
   config.json and safetensors headers only, and checks that the evaluation tasks load: bad input fails here, before
   any weight is read, with a ConfigError naming the file, the key and what is allowed;
2. takes the run folder `<output_path>/<run_name or strategy>` exactly as a search does (`prepare_run_dir`): a
   folder holding a different config is refused unless `overwrite`; the same config reuses what is already there;
3. writes the merged checkpoint (`model/`, atomically, with its model card) through the streaming engine;
4. scores the saved checkpoint, the base and every other input model on the configured tasks (all examples, or
   `evaluation.limit`), each loaded from its own folder, with per-example results cached in `eval_cache.sqlite`;
5. writes `final_scores.json` atomically and prints a table and where everything is.

Run folder:
    run.json            the run's fingerprint, config file, strategy (with its recipe) and model folders
    recipe.yml          the merge recipe in the engine's schema (`auto-merge merge recipe.yml OUT` remakes the model)
    model/              the merged checkpoint: safetensors, config.json, tokenizer, model card, recipe, mergekit export
    final_scores.json   per-task scores of the merge, the base and each input model, the examples each task ran
    eval_cache.sqlite   per-example results (a rerun after an interruption only runs what is missing)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from auto_merge.search.preflight import check_evaluation, config_error

MODEL_DIR = "model"
RECIPE_FILE = "recipe.yml"
SCORES_FILE = "final_scores.json"
CACHE_FILE = "eval_cache.sqlite"


@dataclass
class OneShotResult:
    run_dir: Path
    model: Path | None  # None with write_model=False
    recipe: Path
    final_scores: dict | None  # None when the config lists no evaluation task
    num_layers: int
    reused: bool  # the run folder already held this run, complete: nothing was redone


def run_oneshot(config, *, overwrite: bool = False, run_name: str | None = None, show_progress: bool = True,
                write_model: bool = True) -> OneShotResult:
    """Merge, save and score the one-shot merge of a validated config (models resolved; see the module docstring)."""
    from auto_merge.search.run_folder import claim_run

    started = time.perf_counter()
    say = _Progress(show_progress)
    merge, plan = plan_oneshot(config)
    check_evaluation(config)  # device, tasks, metrics, documents
    with claim_run(config, merge, overwrite=overwrite, run_name=run_name) as run:
        return _oneshot_in(run.path, run.resumed, config, merge, plan, started, say, write_model=write_model)


def plan_oneshot(config):
    """(the one-shot merge, its compiled plan) of a validated config; a block that cannot become one recipe is a
    ConfigError naming its key."""
    from auto_merge.strategies.oneshot import OneShotError, OneShotMerge

    try:
        merge = OneShotMerge.from_block(config.strategy, config.selected)
    except OneShotError as error:
        raise config_error(config, ("strategies", config.strategy) + error.key_path, error.message,
                           error.allowed) from None
    return merge, compile_merge(config, merge)


def _oneshot_in(run_dir: Path, resumed: bool, config, merge, plan, started: float, say, *, write_model: bool):
    """Merge, save and score, in a run folder this process holds."""
    from auto_merge.output_dirs import write_json_atomic, write_text_atomic

    tasks = config.global_params.evaluation.tasks
    model_dir = run_dir / MODEL_DIR
    recipe_path = run_dir / RECIPE_FILE
    scores_path = run_dir / SCORES_FILE
    has_model = (model_dir / "config.json").is_file()
    # Scores with a failed entry are not reused: the rerun tries what failed again (the cache keeps the rest).
    complete_scores = scores_path.is_file() and not json.loads(scores_path.read_text()).get("failed")
    if resumed and (has_model or not write_model) and (complete_scores or not tasks):
        final = json.loads(scores_path.read_text()) if tasks else None
        say(f"{run_dir} already holds this run (same config): nothing to redo (--overwrite makes it again)")
        print(render_summary(merge, plan.num_layers, final, run_dir, model_dir if has_model else None))
        return OneShotResult(run_dir, model_dir if has_model else None, recipe_path, final, plan.num_layers, True)

    say(f"run folder: {run_dir}" + (" (resuming)" if resumed else ""))
    write_text_atomic(recipe_path, plan.recipe.to_yaml())
    scratch = None
    if write_model and has_model:
        say(f"merged model already written: {model_dir}")
    else:
        target = model_dir if write_model else Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=run_dir)) / MODEL_DIR
        scratch = None if write_model else target.parent
        say(f"merging {len(plan.tasks)} tensors into {target} ({plan.num_layers} layers)")
        _merge(plan, target, config, progress=say.enabled)
        model_dir = target
    final = None
    try:
        if tasks:
            final = score_run(config, merge, plan, model_dir, run_dir, say)
            write_json_atomic(scores_path, final)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    saved = model_dir if write_model else None
    say(f"done in {time.perf_counter() - started:.1f} s")
    print(render_summary(merge, plan.num_layers, final, run_dir, saved))
    return OneShotResult(run_dir, saved, recipe_path, final, plan.num_layers, False)


# ------------------------------------------------------------------------------------------ checks, no weights


def compile_merge(config, merge):
    """The merge plan of `merge.recipe` over the config's resolved models (headers only); a recipe the engine
    refuses is a ConfigError at the config key it comes from."""
    from auto_merge.merge.plan import ModelCatalog, SourceModel, compile_plan
    from auto_merge.merge.recipe import RecipeError, parse_recipe

    allow_pickle = config.global_params.allow_pickle
    try:
        recipe = parse_recipe(merge.recipe)
        catalog = ModelCatalog(allow_pickle=allow_pickle, zoo_seed=config.global_params.zoo_seed)
        for ref, path in config.model_paths.items():
            catalog.add(SourceModel.from_folder(ref, path, allow_pickle=allow_pickle))
        return compile_plan(recipe, catalog)
    except RecipeError as error:
        allowed = error.allowed.replace("base_layer_range", "target.layer_range") if error.allowed else None
        if error.key_path[-1:] == ("base_layer_range",):
            allowed = ("a target {model, layer_range} on this slice naming the base layers its task vectors are "
                       "taken against, or sources that all start at the same layer")
        raise config_error(config, config_key(config.strategy, error.key_path),
                            f"the merge cannot be made: {error.detail}", allowed) from None


def config_key(strategy: str, recipe_key_path: tuple) -> tuple:
    """A recipe key path (`slices, 1, base_layer_range`) → the config key it comes from
    (`strategies, normal_slices, slices, 1, target`); cut at the first name the two spell differently."""
    path: list = ["strategies", strategy]
    for part in recipe_key_path:
        if isinstance(part, int) or part in ("models", "slices", "sources", "model", "layer_range", "base_model"):
            path.append(part)
        elif part == "base_layer_range":
            path.append("target")
            break
        elif part == "parameters" and path[-2] in ("sources", "models"):
            path.append("parameters")
            break
        else:  # merge_method, slice or recipe-wide parameters: written under merging_method in the config
            path.append("merging_method")
            break
    return tuple(path)


# ------------------------------------------------------------------------------------------ merge and scores


def _merge(plan, out_dir: Path, config, *, progress: bool) -> None:
    from auto_merge.evaluation.lm_eval_runner import resolve_device
    from auto_merge.merge.engine import merge_to_disk

    device = "cuda" if resolve_device(config.global_params.evaluation.device).startswith("cuda") else "cpu"
    merge_to_disk(plan, out_dir, seed=config.global_params.random_seed, device=device, overwrite=True,
                  progress=progress, recipe_source=str(config.source_file) if config.source_file else None)


def score_run(config, merge, plan, model_dir: Path, run_dir: Path, say) -> dict:
    """Scores of the saved merge, the base and every other input model, each loaded from its folder."""
    from auto_merge.search.final_scoring import FinalScoring
    from auto_merge.search.trial import recipe_fingerprint

    scoring = FinalScoring()  # one model that cannot be scored does not cost the others' scores
    limit = config.global_params.evaluation.limit
    cache = run_dir / CACHE_FILE
    seed = config.global_params.random_seed
    final = {
        "strategy": config.strategy,
        "budget": limit,  # None: every example of every task
        "layers": plan.num_layers,
        "recipe": plan.recipe.to_dict(),
        "merge": None,
        "base": None,
        "experts": {},
        "failed": scoring.failed,
    }
    refs = [merge.base_model, *merge.models]
    total = 1 + len(refs)
    say(f"[1/{total}] scoring the merge")
    final["merge"] = scoring.score("the merge", lambda: score_folder(
        config, model_dir, recipe_fingerprint(plan.recipe.to_dict(), seed), cache, say))
    for step, ref in enumerate(refs, start=2):
        say(f"[{step}/{total}] scoring {'the base ' if ref == merge.base_model else ''}{ref}")
        folder = Path(config.model_paths[ref])
        entry = scoring.score(f"input model {ref}",
                              lambda: score_folder(config, folder, folder_fingerprint(ref, folder), cache, say))
        if ref == merge.base_model:
            final["base"] = entry
        elif entry is not None:
            final["experts"][ref] = entry
    for failure in scoring.failed:
        say(f"could not score {failure['what']}: {failure['error']}")
    return final


def score_folder(config, folder: Path, fingerprint: str, cache_path: Path, say) -> dict:
    """One checkpoint scored on the configured tasks, every example (or `evaluation.limit`: N examples of the
    largest task and the same share of the others, as a search budget of N would select; < 1: a fraction)."""
    from auto_merge.evaluation.backends import vllm_options
    from auto_merge.evaluation.budgeted import BudgetedEvaluator
    from auto_merge.evaluation.lm_eval_runner import load_checkpoint, resolve_device

    settings = config.global_params.evaluation
    params = config.global_params
    dtype = settings.torch_dtype if settings.torch_dtype != "auto" else "float32"
    model, tokenizer = load_checkpoint(folder, dtype=dtype, device=resolve_device(settings.device),
                                       allow_pickle=params.allow_pickle, trust_remote_code=params.trust_remote_code)
    budget = settings.limit
    unit = "fraction" if budget is not None and budget < 1 else "examples"
    evaluator = BudgetedEvaluator.from_config(
        config, model, tokenizer, cache_path=cache_path, budget_unit=unit,
        min_examples=settings.min_examples_per_task, allow_code_execution=settings.allow_code_execution,
        vllm=vllm_options(settings, folder, seed=params.random_seed, trust_remote_code=params.trust_remote_code))
    try:
        result = evaluator.evaluate(fingerprint, budget)
    finally:
        evaluator.close()
    entry = {"scores": dict(result.scores), "mean_score": statistics.fmean(result.scores.values()),
             "cost": result.cost, "examples": dict(result.examples), "evaluated_examples": result.evaluated,
             "cached_examples": result.cached, "eval_seconds": round(result.seconds, 3), "folder": str(folder)}
    say(f"    mean {entry['mean_score']:.3f} on {sum(result.examples.values())} examples "
        f"({result.cached} from the cache) in {result.seconds:.1f} s")
    return entry


def folder_fingerprint(ref: str, folder: Path) -> str:
    """Identifies an input model's weights for the result cache: its reference, folder and weight files' stats."""
    from auto_merge.models.inspect import model_identity

    payload = json.dumps({"model": ref, "folder": str(Path(folder).resolve()), "files": model_identity(folder)})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def render_summary(merge, num_layers: int, final: dict | None, run_dir: Path, model_dir: Path | None) -> str:
    from auto_merge.search.outputs import score_table

    method = ", ".join(dict.fromkeys(_methods(merge.recipe)))
    lines = ["", f"{merge.name}: {method} of {', '.join(merge.models)} (base {merge.base_model}), "
                 f"{num_layers} layers"]
    if final is None:
        lines.append("no evaluation task configured: nothing was scored")
    else:
        budget = final["budget"]
        lines.append("scores (every example):" if budget is None else f"scores (evaluation.limit {budget:g}):")
        rows = [("base", final["base"])] + [(f"input {ref}", entry) for ref, entry in final["experts"].items()]
        rows.append(("merge", final["merge"]))
        lines += score_table([(name, entry) for name, entry in rows if entry is not None])
        inputs = [entry["mean_score"] for name, entry in rows[:-1] if entry is not None]
        if final["merge"] is not None and inputs:
            lines.append(f"\nmerge vs best input model: {100 * (final['merge']['mean_score'] - max(inputs)):+.1f} "
                         "points of mean score")
        for failure in final.get("failed", []):
            lines.append(f"NOT scored: {failure['what']}: {failure['error']}")
    lines.append(f"run folder: {run_dir}")
    if model_dir is not None:
        lines.append(f"merged model: {model_dir}")
    if final is not None:
        lines.append(f"scores: {run_dir / SCORES_FILE}")
    lines.append(f"recipe: {run_dir / RECIPE_FILE} (auto-merge merge {run_dir / RECIPE_FILE} OUT_DIR remakes the "
                 "model)")
    return "\n".join(lines)


def _methods(recipe: dict) -> list[str]:
    if "merge_method" in recipe:
        return [recipe["merge_method"]]
    return [piece["merge_method"] for piece in recipe["slices"]]


class _Progress:
    """Stage lines on stderr (the merge's own bar is tqdm's); silent when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)
