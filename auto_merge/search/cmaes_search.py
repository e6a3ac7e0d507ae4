"""`optimizer: cmaes`: CMA-ES over the space's continuous parameters, every trial at the full budget, as
mergekit-evolve searches merge weights. A baseline for the Bayesian searches, run through the same trial target,
trial log, resume and final scoring.

Categorical choices (an LFS group's merge method) stay at their defaults, the first method of the config's
`merging_method`; the search is over the weights (and densities, ...) active for those choices, each scaled to
[0, 1] by its range (log ranges in log space). CMA-ES starts at the default configuration with a step size of a
sixth of each range (mergekit-evolve's default), and its population size is the `cmaes` library's default,
4 + ⌊3 ln d⌋ for d parameters. The library's sampling is seeded, so a config and seed give the same trials, and a
resumed run re-asks the same points and is told the logged results again (the trial target replays them).
"""

from __future__ import annotations

import math
import time
import traceback

STEP_SIZE = 1 / 6


class CMAESSearch:
    """Runs the ask/tell loop; `intensifier.get_incumbent()` is the best trial, as SMAC's facades give it."""

    def __init__(self, space, target, callbacks, *, n_trials: int, seed: int, budget: float | None,
                 crash_cost: float):
        self.space, self.target, self.callbacks = space, target, list(callbacks)
        self.n_trials, self.seed, self.budget, self.crash_cost = n_trials, seed, budget, crash_cost
        self.fixed, self.searched = split_space(space)
        if not self.searched:
            raise ValueError("optimizer cmaes needs at least one continuous parameter in the search space")
        self._best: tuple[float, object] | None = None

    @property
    def intensifier(self):
        return self

    def get_incumbent(self):
        return None if self._best is None else self._best[1]

    def optimize(self) -> None:
        import numpy as np
        from cmaes import CMA

        mean = np.array([to_unit(hp, hp.default_value) for hp in self.searched])
        bounds = np.array([[0.0, 1.0]] * len(self.searched))
        optimiser = CMA(mean=mean, sigma=STEP_SIZE, bounds=bounds, seed=self.seed)
        done = 0
        while done < self.n_trials:
            told = []
            for _ in range(optimiser.population_size):
                if done >= self.n_trials:
                    break
                point = optimiser.ask()
                told.append((point, self._run(self._configuration(point))))
                done += 1
            if len(told) == optimiser.population_size:  # a partial last generation is not told
                optimiser.tell(told)

    def _configuration(self, point):
        from ConfigSpace import Configuration

        values = dict(self.fixed)
        values.update({hp.name: from_unit(hp, float(x)) for hp, x in zip(self.searched, point)})
        configuration = Configuration(self.space, values=values)
        configuration.origin = "CMA-ES"
        return configuration

    def _run(self, configuration) -> float:
        """One trial through the target, told to the callbacks (the trial log) as SMAC would; returns its cost."""
        from smac.runhistory import StatusType, TrialInfo, TrialValue

        started = time.time()
        try:
            cost, info = self.target(configuration, seed=self.seed, budget=self.budget)
            status = StatusType.SUCCESS
        except Exception as error:  # recorded with its reason, as SMAC records a crashed trial; the search goes on
            cost, status = self.crash_cost, StatusType.CRASHED
            info = {"error": repr(error), "traceback": traceback.format_exc()}
        value = TrialValue(cost=cost, time=time.time() - started, status=status, starttime=started,
                           endtime=time.time(), additional_info=info)
        trial = TrialInfo(configuration, seed=self.seed, budget=self.budget)
        for callback in self.callbacks:
            callback.on_tell_end(None, trial, value)
        if status == StatusType.SUCCESS and (self._best is None or cost < self._best[0]):
            self._best = (cost, configuration)
        return cost


def split_space(space) -> tuple[dict, list]:
    """(values fixed at their defaults: categoricals, ordinals, constants; the active numeric hyperparameters)."""
    from ConfigSpace.hyperparameters import NumericalHyperparameter

    default = dict(space.get_default_configuration())
    fixed, searched = {}, []
    for name, value in default.items():
        hyperparameter = space[name]
        if isinstance(hyperparameter, NumericalHyperparameter) and hyperparameter.lower < hyperparameter.upper:
            searched.append(hyperparameter)
        else:
            fixed[name] = value
    return fixed, searched


def to_unit(hp, value: float) -> float:
    low, high, value = float(hp.lower), float(hp.upper), float(value)
    if getattr(hp, "log", False):
        low, high, value = math.log(low), math.log(high), math.log(value)
    return (value - low) / (high - low)


def from_unit(hp, x: float):
    from ConfigSpace.hyperparameters import IntegerHyperparameter

    x = min(1.0, max(0.0, x))
    low, high = float(hp.lower), float(hp.upper)
    if getattr(hp, "log", False):
        value = math.exp(math.log(low) + x * (math.log(high) - math.log(low)))
    else:
        value = low + x * (high - low)
    value = min(high, max(low, value))  # float rounding at the ends
    if isinstance(hp, IntegerHyperparameter):
        return int(round(value))
    return value
