"""Which documents a budget selects: nested, seeded subsets whose size scales with each task's size.

**Order.** Each task's documents (for a group or tag: the pooled documents of all its subtasks, as (subtask,
document id) pairs) are shuffled once with a seed derived from the run's seed and the task's name (SHA-256, so the
order is the same in every process and after a restart). A budget selects a prefix of that order, so the documents
of a smaller budget are always among those of a larger one, for every task, whatever the order of its data file.

**Size.** A budget is expressed against a *reference size* R (by default the size of the largest task; a search
driver passes its `max_budget` so that the largest budget is a full run of every task):

    fraction(b) = min(b / R, 1)                      for budget_unit "examples" (b = examples of the reference task)
    fraction(b) = b, with 0 < b <= 1                 for budget_unit "fraction"
    examples(task) = min(size, max(ceil(fraction(b) * size), min(size, min_examples)))

So every task runs the same share of its documents: at b = R/3 a 2,000-document task runs 667 and a 90-document one
30, and both are complete only at b = R. `min_examples` (default 10) keeps tiny budgets from scoring a small task on
one or two documents. `examples` never decreases when b grows, so the selections are nested.

**Strata** (optional). A random prefix of 28 documents may hold 10 or 18 of the 14 that, say, only one expert answers,
and that noise decides which candidates a successive-halving rung promotes. Given a label per document (the search
labels each by how the source models answer it: `evaluation.stratify: sources`), the order interleaves the labels so
that every prefix holds each in its share; still one fixed order per task, so the selections stay nested.

**Contested first** (optional). Near the top of a search most documents are answered alike by every good candidate:
they cannot tell the good ones apart, and a small budget of them promotes a candidate by chance. Given how much the
best fully scored candidates so far disagree on each document (the variance of their values), the order moves the
documents they disagree on to the front, most disputed first; the others keep their order. The evaluator computes
it per candidate from the candidates completed before that candidate's first evaluation, so all of one candidate's
budgets select nested subsets of one order (`BudgetedEvaluator`, `evaluation.contested_first`).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

DEFAULT_MIN_EXAMPLES = 10
BudgetUnit = Literal["examples", "fraction"]
# Budgets come from SMAC as floats (e.g. 111.11...); a product that lands a hair above an integer must not round up.
_CEIL_TOLERANCE = 1e-9


@dataclass(frozen=True, order=True)
class DocumentRef:
    """One document: the lm-eval (leaf) task it belongs to and its index in that task's evaluation split."""

    task: str
    doc_id: int


@dataclass(frozen=True)
class BudgetRule:
    """Maps a budget to a number of documents per task (see the module docstring)."""

    reference_size: float  # examples of the reference task (a search's max_budget, or the largest task's size)
    unit: BudgetUnit = "examples"
    min_examples: int = DEFAULT_MIN_EXAMPLES

    def __post_init__(self):
        if not self.reference_size > 0 or math.isinf(self.reference_size):
            raise ValueError(f"reference_size must be a positive finite number, got {self.reference_size}")
        if self.unit not in ("examples", "fraction"):
            raise ValueError(f"budget unit must be 'examples' or 'fraction', got {self.unit!r}")
        if self.min_examples < 0:
            raise ValueError(f"min_examples must be >= 0, got {self.min_examples}")

    def fraction(self, budget: float) -> float:
        if not budget > 0 or math.isinf(budget):
            raise ValueError(f"a budget must be a positive finite number, got {budget!r}")
        if self.unit == "fraction":
            if budget > 1:
                raise ValueError(f"a fractional budget must be in (0, 1], got {budget!r}")
            return float(budget)
        return min(float(budget) / self.reference_size, 1.0)

    def examples(self, task_size: int, budget: float) -> int:
        """Documents of a task of `task_size` documents that `budget` selects."""
        wanted = math.ceil(self.fraction(budget) * task_size - _CEIL_TOLERANCE)
        return min(task_size, max(wanted, min(task_size, self.min_examples)))


def shuffle_seed(seed: int, task: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{task}".encode()).digest()[:8], "big")


def seeded_order(task: str, documents: Sequence[DocumentRef], seed: int) -> list[DocumentRef]:
    """The task's documents in the run's fixed order: a seeded shuffle of them in their canonical (sorted) order."""
    order = sorted(documents)
    random.Random(shuffle_seed(seed, task)).shuffle(order)
    return order


def stratified_order(task: str, documents: Sequence[DocumentRef], labels: Mapping[DocumentRef, str],
                     seed: int) -> list[DocumentRef]:
    """The task's documents in a fixed order whose every prefix holds each stratum (documents of one label) in
    proportion to its size, to within one document: each stratum is shuffled with the seed, then the next document
    always comes from the stratum furthest below its share (ties: the larger stratum, then the label)."""
    strata: dict[str, list[DocumentRef]] = {}
    for ref in sorted(documents):
        strata.setdefault(labels.get(ref, ""), []).append(ref)
    names = sorted(strata, key=lambda name: (-len(strata[name]), name))
    for name in names:
        random.Random(shuffle_seed(seed, f"{task}\0{name}")).shuffle(strata[name])
    total, taken, order = len(documents), dict.fromkeys(names, 0), []
    for position in range(1, total + 1):
        name = max((n for n in names if taken[n] < len(strata[n])),
                   key=lambda n: (len(strata[n]) * position / total - taken[n], len(strata[n])))
        order.append(strata[name][taken[name]])
        taken[name] += 1
    return order


def contested_first(order: Sequence[DocumentRef], spread: Mapping[DocumentRef, float]) -> list[DocumentRef]:
    """`order` with the documents of positive `spread` (how much reference candidates disagree on them) moved to the
    front, largest spread first (ties: in `order`); the other documents follow in `order`."""
    position = {ref: i for i, ref in enumerate(order)}
    front = sorted((ref for ref in order if spread.get(ref, 0.0) > 0), key=lambda ref: (-spread[ref], position[ref]))
    return front + [ref for ref in order if not spread.get(ref, 0.0) > 0]


class NestedSubsets:
    """Per configured task, its documents in a fixed seeded order; a budget selects a prefix of each.

    `strata` (task -> document -> label), when given for a task, orders it with :func:`stratified_order`."""

    def __init__(self, documents: Mapping[str, Sequence[DocumentRef]], seed: int, rule: BudgetRule,
                 strata: Mapping[str, Mapping[DocumentRef, str]] | None = None):
        empty = [task for task, docs in documents.items() if not docs]
        if empty:
            raise ValueError(f"task(s) without documents to evaluate: {', '.join(empty)}")
        self.rule = rule
        self.seed = seed
        strata = strata or {}
        self.order = {task: stratified_order(task, docs, strata[task], seed) if task in strata
                      else seeded_order(task, docs, seed) for task, docs in documents.items()}

    def reordered(self, spread: Mapping[str, Mapping[DocumentRef, float]]) -> "NestedSubsets":
        """The same subsets with each task's contested documents first (:func:`contested_first`; task -> document ->
        spread, tasks left out keep their order)."""
        subsets = object.__new__(NestedSubsets)
        subsets.rule, subsets.seed = self.rule, self.seed
        subsets.order = {task: contested_first(order, spread[task]) if task in spread else list(order)
                         for task, order in self.order.items()}
        return subsets

    @property
    def sizes(self) -> dict[str, int]:
        return {task: len(order) for task, order in self.order.items()}

    def examples(self, budget: float) -> dict[str, int]:
        return {task: self.rule.examples(len(order), budget) for task, order in self.order.items()}

    def select(self, budget: float) -> dict[str, list[DocumentRef]]:
        return {task: self.order[task][:count] for task, count in self.examples(budget).items()}
