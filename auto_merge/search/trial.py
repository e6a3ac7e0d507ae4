"""One trial of a search: configuration -> recipe (strategy) -> weights in a live model (engine) -> scores (evaluator).

Everything a worker needs travels in a picklable :class:`TrialSpec`. Each process (the driver itself, or a dask
worker) builds one :class:`TrialRunner` per spec and keeps it for every trial it runs: the source weights, the live
model and the evaluator are loaded once per worker, never per trial.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Key fields of a trial record (trials.jsonl and SMAC's additional_info carry the same names).
RECIPE_KEY, SCORES_KEY = "recipe", "scores"


@dataclass(frozen=True)
class TrialSpec:
    """What a worker needs to run trials; plain data so that it pickles to dask workers."""

    run_id: str  # identifies the run (config fingerprint); runners are cached per run_id
    strategy: dict  # the strategy's description (`Strategy.describe()`)
    model_paths: dict[str, str]  # model reference -> resolved local folder
    evaluation: Any  # the config's EvaluationSettings (a pydantic model)
    config_dir: str  # relative include paths are relative to the config file's folder
    cache_path: str  # per-example results (shared by workers, kept across restarts)
    seed: int
    objectives: tuple[str, ...] = ()  # task names, one cost each (multi-objective); empty = one aggregate cost
    torch_threads: int = 0  # 0: leave torch's default
    device: str = "cpu"
    allow_pickle: bool = False  # the user's opt-ins (global_params), for every model this run opens
    trust_remote_code: bool = False
    trial_walltime_limit: float | None = None  # seconds; trials then run in a long-lived child (search/timed.py)
    # A resumed run: trial key -> what that trial gave before (see TrialTarget): SMAC is run again from the start and
    # told these results instantly, so it re-derives its whole state and goes on exactly as an uninterrupted run.
    replay: dict = field(default_factory=dict)
    # evaluation.stratify: sources — task -> document -> label (how the sources answer it), from `source_strata`.
    strata: dict = field(default_factory=dict)
    # A multi-fidelity search's max_budget: its candidates scored at this budget are the complete ones that
    # evaluation.contested_first compares (None: those scored on every document).
    max_budget: float | None = None


def recipe_fingerprint(recipe: dict, seed: int) -> str:
    """Identifies a candidate's weights: equal recipes (and seed, for random methods) give equal models."""
    payload = json.dumps({"recipe": recipe, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class NonFiniteWeightsError(ValueError):
    pass


class TrialRunner:
    def __init__(self, spec: TrialSpec):
        import torch

        from auto_merge.evaluation.backends import vllm_options
        from auto_merge.evaluation.budgeted import BudgetedEvaluator
        from auto_merge.evaluation.lm_eval_runner import load_checkpoint, resolve_device
        from auto_merge.merge.live import LiveMerger
        from auto_merge.merge.plan import ModelCatalog, SourceModel
        from auto_merge.strategies import strategy_from_description

        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.strategy = strategy_from_description(spec.strategy)
        base_ref = spec.strategy["base_model"]
        dtype = spec.evaluation.torch_dtype if spec.evaluation.torch_dtype != "auto" else "float32"
        device = resolve_device(spec.device)  # the config may leave it out (auto)
        self.model, self.tokenizer = load_checkpoint(spec.model_paths[base_ref], dtype=dtype, device=device,
                                                     allow_pickle=spec.allow_pickle,
                                                     trust_remote_code=spec.trust_remote_code)
        catalog = ModelCatalog(allow_pickle=spec.allow_pickle)
        for ref, path in spec.model_paths.items():
            catalog.add(SourceModel.from_folder(ref, path, allow_pickle=spec.allow_pickle))
        self.merger = LiveMerger(self.model, catalog, device=device, models=list(spec.model_paths))
        self._strata: dict | None = None
        self.evaluator = BudgetedEvaluator(
            spec.evaluation, self.model, self.tokenizer, seed=spec.seed, cache_path=spec.cache_path,
            config_dir=spec.config_dir, allow_code_execution=spec.evaluation.allow_code_execution,
            budget_unit=spec.evaluation.budget_unit, min_examples=spec.evaluation.min_examples_per_task,
            full_budget=spec.max_budget,
            vllm=vllm_options(spec.evaluation, spec.model_paths[base_ref], seed=spec.seed,
                              trust_remote_code=spec.trust_remote_code),
        )

    def run(self, values: dict, budget: float | None) -> tuple[float | dict[str, float], dict]:
        """One SMAC trial: the configuration's recipe, scored at `budget`."""
        info = self.score_recipe(self.strategy.decode(values), budget)
        if self.spec.objectives:
            return {task: info["costs"][task] for task in self.spec.objectives}, info
        return info["cost"], info

    def score_recipe(self, recipe: dict, budget: float | None) -> dict:
        """Materialise `recipe` into the live model and score it (budget None: every example)."""
        fingerprint = recipe_fingerprint(recipe, self.spec.seed)
        started = time.perf_counter()
        self.merger.apply(recipe, seed=self.spec.seed)
        check_finite(self.model)
        merged = time.perf_counter()
        scores = self.evaluator.evaluate(fingerprint, budget)
        finished = time.perf_counter()
        return {
            "fingerprint": fingerprint,
            RECIPE_KEY: recipe,
            SCORES_KEY: dict(scores.scores),
            "costs": dict(scores.costs),
            "cost": scores.cost,
            "examples": dict(scores.examples),
            "evaluated_examples": scores.evaluated,
            "cached_examples": scores.cached,
            "merge_seconds": round(merged - started, 4),
            "eval_seconds": round(finished - merged, 4),
            "forward_seconds": round(scores.forward_seconds, 4),
            "worker_pid": os.getpid(),
        }

    def source_strata(self) -> tuple[dict, int]:
        """Each task's documents labelled by how the base and each expert answer them (their metric values), for
        `evaluation.stratify: sources`; and how many documents had to be evaluated (the rest came from the cache).
        Each source alone is scored like any recipe, so the end of the run finds these results cached."""
        base = self.spec.strategy["base_model"]
        per_source, evaluated = [], 0
        for ref in dict.fromkeys([base, *self.strategy.models]):
            recipe = source_alone(ref, base)
            self.merger.apply(recipe, seed=self.spec.seed)
            values, count = self.evaluator.document_values(recipe_fingerprint(recipe, self.spec.seed))
            per_source.append(values)
            evaluated += count
        strata = {task: {doc: "|".join([doc.task, *(_label(values[task][doc]) for values in per_source)])
                         for doc in documents}
                  for task, documents in per_source[0].items()}
        return strata, evaluated

    def use_strata(self, strata: dict) -> None:
        # Compared by value: on a dask worker every trial brings its own unpickled copy of the spec.
        if strata and strata != self._strata:
            self.evaluator.stratify(strata)
            self._strata = strata

    def close(self) -> None:
        self.evaluator.close()


def source_alone(ref: str, base_model: str) -> dict:
    """The recipe of one source model as it is (how the end of a run scores the experts and the base: one recipe,
    so one fingerprint and one set of cached results)."""
    return {"base_model": base_model, "merge_method": "linear",
            "models": [{"model": ref, "parameters": {"weight": 1.0}}]}


def _label(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def compute_strata(spec: "TrialSpec") -> tuple[dict, int]:
    """`TrialRunner.source_strata` in this process (the driver's, or a dask worker's: submitted there, the runner it
    builds stays for that worker's trials)."""
    return runner_for(spec).source_strata()


def check_finite(model) -> None:
    """A merge that produced NaN or inf weights is a failed trial, not a score."""
    import torch

    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteWeightsError(f"merged weights are not finite in {len(bad)} tensor(s), e.g. {bad[:3]}")


_RUNNERS: dict[str, TrialRunner] = {}


def runner_for(spec: TrialSpec) -> TrialRunner:
    """This process's runner for `spec`, built on first use (once per dask worker)."""
    runner = _RUNNERS.get(spec.run_id)
    if runner is None:
        for stale in list(_RUNNERS):  # one run per process: release a previous run's models
            _RUNNERS.pop(stale).close()
        runner = _RUNNERS[spec.run_id] = TrialRunner(spec)
    runner.use_strata(spec.strata)
    return runner


class TrialTarget:
    """SMAC's target function: picklable (it travels to dask workers) and identical across processes.

    SMAC stores its target's bytecode (and, for a functools.partial, the repr of the wrapped function, which holds a
    memory address) in the run's metadata and refuses to resume when that metadata differs: so a plain object whose
    `__code__` is its own `__call__`'s, and no partial.
    """

    def __init__(self, spec: TrialSpec):
        self.spec = spec

    def __call__(self, config, seed: int = 0, budget: float | None = None):
        values = {key: _plain(value) for key, value in dict(config).items()}
        earlier = self.spec.replay.get(trial_key(values, budget, seed))
        if earlier is not None:
            return replayed(earlier, self.spec.objectives)
        if self.spec.trial_walltime_limit is not None:
            from auto_merge.search.timed import timed_trials_for

            return timed_trials_for(self.spec, self.spec.trial_walltime_limit).run(values, budget)
        return runner_for(self.spec).run(values, budget)

    __code__ = __call__.__code__


def trial_key(configuration: dict, budget: float | None, seed: int | None) -> str:
    """What identifies a trial to SMAC: its configuration, budget and seed."""
    return json.dumps([configuration, budget, seed], sort_keys=True, default=str)


class ReplayedFailure(RuntimeError):
    """A trial that failed in the earlier process fails again, with the same reason, when its run resumes."""


def replayed(record: dict, objectives: tuple[str, ...]):
    """What the target returned for a logged trial: its cost(s) and info, or its failure raised again."""
    if record["status"] != "success" or record.get("scores") is None:
        raise ReplayedFailure(record.get("error") or record["status"])
    info = {key: record.get(key) for key in (RECIPE_KEY, SCORES_KEY, "fingerprint", "examples", "merge_seconds",
                                             "eval_seconds", "worker_pid")}
    info.update(evaluated_examples=0, cached_examples=record.get("evaluated_examples"), replayed=True)
    if objectives:
        costs = dict(zip(objectives, record["cost"]))
        info["costs"] = costs
        return costs, info
    info["cost"] = record["cost"]
    return record["cost"], info


def _plain(value):
    """ConfigSpace gives numpy scalars; recipes and JSON want plain Python values."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isfinite(value):
        return float(value)
    return value


def spec_cache_path(run_dir: Path) -> str:
    return str(run_dir / "eval_cache.sqlite")
