"""The evaluator a search calls once per trial: budgeted, nested, cached, scored against the configured objectives.

    evaluator = BudgetedEvaluator(settings, model, tokenizer, seed=0, cache_path="run/eval_cache.sqlite")
    scores = evaluator.evaluate(candidate_fingerprint, budget=111)
    scores.cost             # the aggregate cost (single objective)
    scores.objective_costs  # one cost per task (multi-objective)

- The model is live: it is wrapped in lm-eval's HFLM once, here, and the merge engine overwrites its weights in
  place between trials. It is moved to the evaluation device once, here (the engine's in-place copies follow it).
- A budget selects nested, seeded, size-scaled subsets of every task's documents (`budget.py`).
- Per-document results are cached by (candidate fingerprint, task, document) in SQLite (`cache.py`): a promotion
  from 111 to 333 examples runs only the 222 new ones, and a restarted search reuses everything already run.
- With `evaluation.contested_first`, a candidate's subsets start with the documents on which the best candidates
  scored at the search's max_budget before it disagree (`budget.py`); its promotions keep that order, so they stay
  nested.
- Scores are recomputed from the per-document values of exactly the selected documents with the task's own lm-eval
  aggregation function (the mean for acc / exact_match / pass@1; corpus-level aggregations such as F1 or BLEU
  receive their per-document items, so they are exact too). A group's score is the mean of its subtasks' scores
  weighted by their selected document counts (lm-eval's `weight_by_size`, the default) or unweighted when the group
  says so; a tag's is always weighted.
- Few-shot examples are drawn per document from a seed derived from the document, not from lm-eval's single
  run-wide generator: otherwise a document's prompt would depend on which documents ran before it, and cached
  results would not be comparable across trials.
- One lm-eval `evaluate` call per trial on the preloaded tasks: no TaskManager, no environment collection, no
  stderr bootstrap, progress bars silenced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from auto_merge.evaluation.budget import (
    DEFAULT_MIN_EXAMPLES,
    BudgetRule,
    BudgetUnit,
    DocumentRef,
    NestedSubsets,
    shuffle_seed,
)
from auto_merge.evaluation.backends import VllmOptions
from auto_merge.evaluation.cache import ResultCache, round_trip
from auto_merge.evaluation.lm_eval_runner import (
    ChatFormat,
    LiveEvaluator,
    TaskConfigError,
    TaskSuite,
    TaskUnit,
    resolve_device,
)
from auto_merge.evaluation.objective import Aggregate, TaskObjective, TrialScores, aggregate_cost, task_cost
from auto_merge.evaluation.plugins import plugin_source_digest

# Bumped when the way per-document values are produced or keyed changes, so old cache rows are not reused.
SCORING_VERSION = 1


class BudgetedEvaluator:
    """Scores one live model, whose weights change between trials, at a budget (see the module docstring).

    `settings`: the config's `global_params.evaluation` (`EvaluationSettings`): tasks (with metric, direction,
    weight, overrides), aggregate, include_path, batch_size, device, num_fewshot. Its `limit`, `torch_dtype`
    and `in_memory` are the caller's business (how the model is loaded); `vllm`: the backend's options when the
    settings ask for vLLM (:func:`auto_merge.evaluation.backends.vllm_options`; None: transformers).
    `config_dir`: where relative include paths and override data paths are taken from (the config file's folder).
    `seed`: fixes each task's document order for the whole run. `cache_path`: the SQLite file of per-document
    results (shared by the run's workers, kept across restarts). `budget_unit`, `reference_size`, `min_examples`:
    the budget rule (`budget.py`; `reference_size` defaults to the largest task's size; a search passes its
    `max_budget`, so that its largest budget is a full run of every task). Tasks that execute model-written code
    run only with `allow_code_execution`. `full_budget`: with `contested_first`, the budget at which a
    candidate counts as complete (a search's max_budget; None: every document).
    """

    def __init__(self, settings, model, tokenizer, *, seed: int, cache_path: str | os.PathLike,
                 config_dir: str | os.PathLike | None = None, budget_unit: BudgetUnit = "examples",
                 reference_size: float | None = None, min_examples: int = DEFAULT_MIN_EXAMPLES,
                 allow_code_execution: bool = False, max_length: int | None = None,
                 vllm: VllmOptions | None = None, full_budget: float | None = None):
        self.objectives = [TaskObjective.from_config(entry) for entry in settings.tasks]
        if not self.objectives:
            raise TaskConfigError("evaluation.tasks is empty: nothing to score")
        self.aggregate: Aggregate = settings.aggregate
        self.seed = seed
        self.suite = TaskSuite(
            [o.task for o in self.objectives], settings.include_paths or None,
            overrides={o.task: o.overrides for o in self.objectives if o.overrides},
            num_fewshot=settings.num_fewshot, allow_code_execution=allow_code_execution, base_dir=config_dir)
        self.live = LiveEvaluator(model, tokenizer, self.suite, batch_size=settings.batch_size,
                                  device=resolve_device(settings.device), max_length=max_length,
                                  chat=ChatFormat.from_settings(settings), vllm=vllm)
        leaves = self.suite.leaf_tasks
        self._aggregation = {}
        for objective in self.objectives:
            for leaf in self.suite.units[objective.task].leaves:
                self._aggregation[leaf] = _metric_aggregation(leaves[leaf], objective)
        for name, task in leaves.items():
            if (task.config.num_fewshot or 0) > 0:
                _pin_fewshot_sampling(task, seed)
        self.contexts = _task_contexts(leaves, model, tokenizer, self.live.lm.max_length, self.suite.include_paths,
                                       backend=self.live.backend.name)
        documents = {unit.name: [DocumentRef(leaf, doc_id) for leaf in unit.leaves
                                 for doc_id in range(len(leaves[leaf].eval_docs))]
                     for unit in self.suite.units.values()}
        largest = max(len(docs) for docs in documents.values())
        self.subsets = NestedSubsets(documents, seed, BudgetRule(reference_size or largest, budget_unit,
                                                                 min_examples))
        self.cache = ResultCache(cache_path)
        self.contested_first = bool(getattr(settings, "contested_first", False))
        self.full_budget = full_budget  # contested_first compares the candidates scored at this budget (None: all)
        self._contested: dict[frozenset, NestedSubsets] = {}  # reference candidates -> their reordered subsets
        leaf_ids: dict[str, set[int]] = {}
        for docs in documents.values():
            for ref in docs:
                leaf_ids.setdefault(ref.task, set()).add(ref.doc_id)
        self._leaf_documents = {leaf: sorted(ids) for leaf, ids in sorted(leaf_ids.items())}  # every leaf's ids

    @classmethod
    def from_config(cls, config, model, tokenizer, *, cache_path: str | os.PathLike, **options) -> "BudgetedEvaluator":
        """From a whole `ExperimentConfig`: its evaluation settings, its seed, and its file's folder."""
        source = config.source_file
        options.setdefault("config_dir", Path(source).parent if source is not None else None)
        options.setdefault("seed", config.global_params.random_seed)
        return cls(config.global_params.evaluation, model, tokenizer, cache_path=cache_path, **options)

    @property
    def sizes(self) -> dict[str, int]:
        """Documents per configured task (a group's or tag's: all its subtasks')."""
        return self.subsets.sizes

    def examples(self, budget: float | None) -> dict[str, int]:
        """Documents per task that `budget` selects (None: all)."""
        return self.sizes if budget is None else self.subsets.examples(budget)

    def evaluate(self, fingerprint: str, budget: float | None = None) -> TrialScores:
        """Score the model's current weights, known to the cache as `fingerprint`, at `budget` (None: all
        documents). The fingerprint must change whenever the weights do: results are reused by it."""
        started = time.perf_counter()
        selection = self.subsets.order if budget is None else self.subsets_for(fingerprint).select(budget)
        values, wanted, missing, model_seconds, forward_seconds = self._document_metrics(fingerprint, selection)
        scores = {o.task: self._score(self.suite.units[o.task], o, selection[o.task], values)
                  for o in self.objectives}
        costs = {o.task: task_cost(scores[o.task], o.higher_is_better) for o in self.objectives}
        evaluated = sum(len(ids) for ids in missing.values())
        return TrialScores(
            fingerprint=fingerprint, budget=None if budget is None else float(budget), scores=scores,
            costs=costs, cost=aggregate_cost(costs, self.objectives, self.aggregate),
            examples={task: len(docs) for task, docs in selection.items()}, evaluated=evaluated,
            cached=sum(len(ids) for ids in wanted.values()) - evaluated, seconds=time.perf_counter() - started,
            model_seconds=model_seconds if evaluated else 0.0, forward_seconds=forward_seconds)

    def document_values(self, fingerprint: str) -> tuple[dict[str, dict[DocumentRef, Any]], int]:
        """Per configured task, each document's value of the task's metric for the current weights (`fingerprint`),
        on every document (cached like any evaluation); and how many documents had to be run."""
        selection = self.subsets.order
        values, _, missing, _, _ = self._document_metrics(fingerprint, selection)
        per_task = {o.task: {ref: values[ref.task][ref.doc_id].get(o.metric) for ref in selection[o.task]}
                    for o in self.objectives}
        return per_task, sum(len(ids) for ids in missing.values())

    def stratify(self, strata: Mapping[str, Mapping[DocumentRef, str]]) -> None:
        """Order each task's documents by strata (task -> document -> label, see budget.stratified_order)."""
        self.subsets = NestedSubsets(self.subsets.order, self.seed, self.subsets.rule, strata)
        self._contested.clear()

    def subsets_for(self, fingerprint: str) -> NestedSubsets:
        """The subsets a budget of this candidate selects: the run's, or with `contested_first` the run's reordered by
        the best candidates complete (scored at `full_budget`, or on every document) before this one's first
        evaluation. Derived from the cache's write times alone, so every worker, and a resumed run, finds the same
        order for a candidate. (With several workers, a candidate completed while this one's first evaluation ran
        joins its order at its promotion: the scores stay exact, the promotion runs a few more documents.)"""
        if not self.contested_first:
            return self.subsets
        leaves = self._leaf_documents
        spans = self.cache.spans([(leaf, self.contexts[leaf]) for leaf in leaves])
        complete = sum(self.examples(self.full_budget).values())
        first_written = spans[fingerprint][1] if fingerprint in spans else float("inf")
        reference = frozenset(other for other, (count, _, last) in spans.items()
                              if other != fingerprint and count >= complete and last < first_written)
        if len(reference) < 2:
            return self.subsets
        if reference not in self._contested:
            self._contested[reference] = self.subsets.reordered(self._spread(sorted(reference)))
        return self._contested[reference]

    def _spread(self, reference: Sequence[str]) -> dict[str, dict[DocumentRef, float]]:
        """Per task, the variance of each document's value across the better half (at least two) of the `reference`
        candidates, ranked by their mean value over the tasks (lower-is-better metrics negated), on the documents
        they all have. Tasks whose metric has non-numeric per-document values (corpus-level metrics) are left out."""
        values = {fingerprint: {leaf: self.cache.get(fingerprint, leaf, self.contexts[leaf], ids)
                                for leaf, ids in self._leaf_documents.items()} for fingerprint in reference}
        numeric = {}  # task -> fingerprint -> document -> value
        sign = {}
        for objective in self.objectives:
            per_candidate = {fingerprint: {ref: values[fingerprint][ref.task][ref.doc_id].get(objective.metric)
                                           for ref in self.subsets.order[objective.task]
                                           if ref.doc_id in values[fingerprint][ref.task]}
                             for fingerprint in reference}
            if all(_is_number(v) for docs in per_candidate.values() for v in docs.values()):
                numeric[objective.task] = per_candidate
                sign[objective.task] = 1.0 if objective.higher_is_better else -1.0
        if not numeric:
            return {}
        quality = {fingerprint: sum(sign[task] * sum(per[fingerprint].values()) / max(1, len(per[fingerprint]))
                                    for task, per in numeric.items()) for fingerprint in reference}
        better = sorted(reference, key=lambda f: (-quality[f], f))[:max(2, math.ceil(len(reference) / 2))]
        return {task: {ref: _variance([float(per_candidate[f][ref]) for f in better])
                       for ref in self.subsets.order[task] if all(ref in per_candidate[f] for f in better)}
                for task, per_candidate in numeric.items()}

    def _document_metrics(self, fingerprint: str, selection: Mapping[str, Sequence[DocumentRef]]):
        """Per-document metrics of `selection`: from the cache, the rest run now (and cached)."""
        wanted: dict[str, set[int]] = {}
        for documents in selection.values():
            for ref in documents:
                wanted.setdefault(ref.task, set()).add(ref.doc_id)
        values = {leaf: self.cache.get(fingerprint, leaf, self.contexts[leaf], ids) for leaf, ids in wanted.items()}
        missing = {leaf: sorted(ids - values[leaf].keys()) for leaf, ids in wanted.items()}
        forward_before = self.live.forward_seconds
        model_started = time.perf_counter()
        fresh = self.live.evaluate_documents({leaf: ids for leaf, ids in missing.items() if ids})
        model_seconds = time.perf_counter() - model_started
        fresh = {leaf: {doc_id: round_trip(metrics) for doc_id, metrics in docs.items()}
                 for leaf, docs in fresh.items()}
        self.cache.put(fingerprint, {(leaf, self.contexts[leaf]): docs for leaf, docs in fresh.items()})
        for leaf, docs in fresh.items():
            values[leaf].update(docs)
        return values, wanted, missing, model_seconds, self.live.forward_seconds - forward_before

    def _score(self, unit: TaskUnit, objective: TaskObjective, documents: Sequence[DocumentRef],
               values: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> float:
        items: dict[str, list[Any]] = {}
        for ref in sorted(documents):  # lm-eval aggregates in document order; keep it for order-sensitive metrics
            metrics = values[ref.task][ref.doc_id]
            if objective.metric not in metrics:
                raise TaskConfigError(f"task {ref.task!r} produced no {objective.metric!r} for document {ref.doc_id} "
                                      f"(it produced {', '.join(sorted(metrics))})")
            items.setdefault(ref.task, []).append(metrics[objective.metric])
        leaf_scores = {leaf: float(self._aggregation[leaf](leaf_items)) for leaf, leaf_items in items.items()}
        if unit.kind == "task":
            return leaf_scores[unit.name]
        weighted = unit.weight_by_size(objective.metric_name)
        weights = {leaf: len(items[leaf]) if weighted else 1 for leaf in leaf_scores}
        return sum(weights[leaf] * score for leaf, score in leaf_scores.items()) / sum(weights.values())

    def close(self) -> None:
        self.cache.close()


def _is_number(value) -> bool:
    return isinstance(value, (int, float))  # bool included


def _variance(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def _metric_aggregation(task, objective: TaskObjective):
    """The task's aggregation function for the objective's metric, after checking that the task reports the key."""
    metrics = list(getattr(task, "_metric_fn_list", {}))
    filters = [pipeline.name for pipeline in getattr(task, "_filters", [])]
    available = [f"{metric},{name}" for metric in metrics for name in filters]
    if objective.metric not in available:
        raise TaskConfigError(f"task {task.task_name!r} does not report {objective.metric!r} (configured for "
                              f"{objective.task!r}); it reports: {', '.join(available) or 'nothing'}")
    return task.aggregation()[objective.metric_name]


def _pin_fewshot_sampling(task, seed: int) -> None:
    """Draw each document's few-shot examples from a generator seeded by the document itself.

    lm-eval draws them from one generator shared by the whole run, so a document's prompt would depend on which
    documents were built before it: a cached result and a fresh one would not be the same measurement."""
    build_context = task.fewshot_context

    def fewshot_context(doc, *args, **kwargs):
        doc_seed = shuffle_seed(seed, json.dumps(doc, sort_keys=True, default=str))
        if hasattr(task, "sampler"):
            task.sampler.set_rnd(doc_seed)
        task.fewshot_rnd = random.Random(doc_seed)
        return build_context(doc, *args, **kwargs)

    task.fewshot_context = fewshot_context


def _stable(value: Any) -> str:
    # Config values that JSON cannot hold (functions, classes, filters): their qualified name, never an address.
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
    return type(value).__qualname__


def _task_contexts(tasks: Mapping[str, Any], model, tokenizer, max_length: int,
                   plugin_folders: Sequence[Path], backend: str = "transformers") -> dict[str, str]:
    """Per leaf task, a digest of everything but the weights that its per-document values depend on (the backend
    too: vLLM's kernels may answer a few documents differently)."""
    from importlib.metadata import version

    model_config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    vocabulary = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    shared = json.dumps({
        "scoring_version": SCORING_VERSION, "lm_eval": version("lm_eval"), "model_class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype), "model_config": model_config, "vocabulary": vocabulary,
        "max_length": max_length, "plugins": plugin_source_digest(plugin_folders),
        # Only named when it is not transformers, so the caches written before there was a choice stay valid.
        **({"backend": backend} if backend != "transformers" else {}),
    }, sort_keys=True, default=_stable)
    contexts = {}
    for name, task in tasks.items():
        digest = hashlib.sha256(shared.encode())
        digest.update(json.dumps(task.dump_config(), sort_keys=True, default=_stable).encode())
        for doc in task.eval_docs:
            digest.update(json.dumps(doc, sort_keys=True, default=str).encode())
        contexts[name] = digest.hexdigest()[:32]
    return contexts
