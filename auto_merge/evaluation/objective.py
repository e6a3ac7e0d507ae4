"""From per-task scores to what the search minimises.

- Each task names its score: an lm-eval result key `"<metric>,<filter>"` (e.g. `exact_match,custom-strict-match`)
  and whether higher is better.
- A task's **cost** is `1 - score` when higher is better (so a [0, 1] accuracy gives a [0, 1] cost, 0 = perfect),
  and the score itself when lower is better (e.g. perplexity; unbounded).
- Single-objective searches minimise the **aggregate cost** over *all* listed tasks: their mean (`aggregate:
  mean`, the default) or their weighted mean `sum(w_i * cost_i) / sum(w_i)` (`aggregate: weighted_mean`).
  Multi-objective searches take one cost per task, in the order the tasks are listed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Aggregate = Literal["mean", "weighted_mean"]


@dataclass(frozen=True)
class TaskObjective:
    """One scored task: its name, result key, direction, weight, and lm-eval task-config overrides."""

    task: str
    metric: str = "acc,none"
    higher_is_better: bool = True
    weight: float = 1.0
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        name, sep, filter_name = self.metric.partition(",")
        if not (name and sep and filter_name) or "," in filter_name:
            raise ValueError(f"metric {self.metric!r} of task {self.task!r} is not an lm-eval result key "
                             f"'<metric>,<filter>', e.g. 'acc,none'")
        if not self.weight > 0:
            raise ValueError(f"weight of task {self.task!r} must be > 0, got {self.weight}")

    @property
    def metric_name(self) -> str:
        return self.metric.partition(",")[0]

    @property
    def filter_name(self) -> str:
        return self.metric.partition(",")[2]

    @classmethod
    def from_config(cls, entry) -> "TaskObjective":
        """From a config's `evaluation.tasks[i]` (`auto_merge.config.schema.EvaluationTask`)."""
        return cls(entry.task, entry.metric, entry.higher_is_better, entry.weight, dict(entry.overrides))


def task_cost(score: float, higher_is_better: bool) -> float:
    return 1.0 - score if higher_is_better else score


def aggregate_cost(costs: Mapping[str, float], objectives: Sequence[TaskObjective], how: Aggregate = "mean") -> float:
    if not objectives:
        raise ValueError("no tasks to aggregate")
    if how == "mean":
        return sum(costs[o.task] for o in objectives) / len(objectives)
    if how == "weighted_mean":
        return sum(o.weight * costs[o.task] for o in objectives) / sum(o.weight for o in objectives)
    raise ValueError(f"unknown aggregate {how!r}; allowed: mean, weighted_mean")


@dataclass
class TrialScores:
    """The outcome of one evaluation of one candidate at one budget.

    `scores`/`costs`: per configured task; `cost`: the aggregate (single objective); `objective_costs`: one cost
    per task in config order (multi-objective). `examples`: documents scored per task at this budget;
    `evaluated`: documents run through the model in this call; `cached`: documents served from the cache.
    Timings: `seconds` (the whole call), `model_seconds` (inside lm-eval, i.e. request building, forward passes,
    filters and metrics), `forward_seconds` (inside the model's forward passes and generation only).
    """

    fingerprint: str
    budget: float | None  # None: every document
    scores: dict[str, float]
    costs: dict[str, float]
    cost: float
    examples: dict[str, int]
    evaluated: int
    cached: int
    seconds: float
    model_seconds: float
    forward_seconds: float

    @property
    def objective_costs(self) -> list[float]:
        return list(self.costs.values())

    @property
    def overhead_seconds(self) -> float:
        """Time outside the model's forward passes: lm-eval's bookkeeping, the cache and the scoring."""
        return self.seconds - self.forward_seconds

    def as_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "budget": self.budget, "scores": self.scores, "costs": self.costs,
                "cost": self.cost, "examples": self.examples, "evaluated": self.evaluated, "cached": self.cached,
                "seconds": self.seconds, "model_seconds": self.model_seconds,
                "forward_seconds": self.forward_seconds}
