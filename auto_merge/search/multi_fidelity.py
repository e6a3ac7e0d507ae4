"""Multi-fidelity search as this tool runs SMAC's: a tie at a rung's cut promoted whole, total_budget kept as a cap.

SMAC promotes the best 1/eta of a rung and cuts a tie at that boundary by crowding distance, in effect by the order
the configurations were sampled in. Scores here are shares of a rung's examples, so ties are common near the ceiling
(two good merges that each miss one example): the rung holds no evidence for either, so both go on and the next
rung's examples decide. On the demo zoo (bench/search_efficiency.py, seed 0) SMAC's cut sent a merge 766 of 768 to
the full budget and left one at 767, tied with it at the rung below, waiting six more brackets."""
from __future__ import annotations

import numpy as np
from smac.callback import Callback
from smac.intensifier.hyperband import Hyperband
from smac.intensifier.successive_halving import SuccessiveHalving


class _PromoteTies:
    def _get_best_configs(self, configs, bracket, stage, from_keys):
        selected = super()._get_best_configs(configs, bracket, stage, from_keys)
        if not selected:  # the last stage: nothing is promoted
            return selected

        def cost(config):  # as SMAC ranks it: averaged over the rung's keys, unnormalised, one entry per objective
            return np.atleast_1d(np.asarray(self.runhistory.average_cost(config, from_keys, normalize=False), float))

        cut = [cost(config) for config in selected]
        return selected + [config for config in configs
                           if config not in selected and any(np.array_equal(cost(config), c) for c in cut)]


class TiedSuccessiveHalving(_PromoteTies, SuccessiveHalving):
    """SMAC's successive halving; a tie at a rung's cut is promoted whole."""


class TiedHyperband(_PromoteTies, Hyperband):
    """SMAC's Hyperband; a tie at a rung's cut is promoted whole."""


class BudgetCap(Callback):
    """Stops the search once its trials have spent `total` budget units (examples per task; one full evaluation =
    max_budget), counted as `n_trials: 0` derives its trial count (driver.trials_for_total_budget): a trial pays for
    the budget it adds to its configuration's highest earlier one, since subsets are nested and results cached.

    That derivation assumes SMAC's fixed rung sizes; a promoted tie makes a bracket dearer, so the trial count alone
    would overspend. Counted from SMAC's trials only, so a resumed run (which tells SMAC the logged trials again)
    stops where the uninterrupted one would."""

    def __init__(self, total: float, on_spent=None):
        super().__init__()
        self.total = total
        self.spent = 0.0
        self._highest: dict = {}
        self._told = 0
        self._on_spent = on_spent  # called once, with the number of trials told, when the cap is reached

    def on_tell_end(self, smbo, info, value) -> bool | None:
        budget = float(info.budget)
        key = (info.config, info.instance, info.seed)
        earlier = self._highest.get(key, 0.0)
        self.spent += max(0.0, budget - earlier)
        self._highest[key] = max(budget, earlier)
        self._told += 1
        if self.spent < self.total:
            return None
        if self._on_spent is not None:
            self._on_spent(self._told)
            self._on_spent = None
        return False
