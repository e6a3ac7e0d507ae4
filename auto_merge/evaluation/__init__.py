"""Scoring candidates with lm-evaluation-harness tasks.

- `BudgetedEvaluator` (budgeted.py): what a search calls per trial — nested seeded subsets per budget (budget.py),
  a per-document result cache (cache.py), the configured objectives (objective.py).
- `TaskSuite`, `LiveEvaluator` (lm_eval_runner.py): task resolution and one live model wrapped in lm-eval once.
- plugins.py: task folders — relative data paths, Python plugins, name collisions, the code-execution gate.
"""

from auto_merge.evaluation.budget import BudgetRule, DocumentRef, NestedSubsets
from auto_merge.evaluation.budgeted import BudgetedEvaluator
from auto_merge.evaluation.cache import ResultCache
from auto_merge.evaluation.lm_eval_runner import LiveEvaluator, TaskSuite, load_checkpoint
from auto_merge.evaluation.objective import TaskObjective, TrialScores, aggregate_cost, task_cost
from auto_merge.evaluation.plugins import (
    CodeExecutionNotAllowedError,
    TaskConfigError,
    TaskNameCollisionError,
    TaskNotFoundError,
)

__all__ = [
    "BudgetRule", "BudgetedEvaluator", "CodeExecutionNotAllowedError", "DocumentRef", "LiveEvaluator",
    "NestedSubsets", "ResultCache", "TaskConfigError", "TaskNameCollisionError", "TaskNotFoundError",
    "TaskObjective", "TaskSuite", "TrialScores", "aggregate_cost", "load_checkpoint", "task_cost",
]
