"""Successive halving as the driver runs SMAC's: ties at a rung's cut promoted whole, total_budget kept as a cap."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from auto_merge.search.driver import run_search, trials_for_total_budget
from auto_merge.search.outputs import read_trials
from tests.test_search import write_config

# 9 configurations at the lowest rung of min 1, max 9, eta 3 (3 go on): the third-best cost is shared by three.
RUNG_COSTS = [0.5, 0.2, 0.3, 0.3, 0.9, 0.3, 0.6, 0.7, 0.8]


def _promoted(kind: str, stage: int, costs: list[float], tmp_path) -> list[float]:
    from ConfigSpace import ConfigurationSpace, Float
    from smac import Scenario
    from smac.intensifier.hyperband import Hyperband
    from smac.intensifier.successive_halving import SuccessiveHalving
    from smac.runhistory import RunHistory
    from smac.runhistory.dataclasses import InstanceSeedBudgetKey

    from auto_merge.search.multi_fidelity import TiedHyperband, TiedSuccessiveHalving

    space = ConfigurationSpace(seed=0)
    space.add([Float("x", (0, 1))])
    scenario = Scenario(space, n_trials=90, deterministic=True, output_directory=tmp_path, min_budget=1, max_budget=9)
    intensifier = {"smac": SuccessiveHalving, "tied": TiedSuccessiveHalving, "smac-hyperband": Hyperband,
                   "tied-hyperband": TiedHyperband}[kind](scenario, eta=3)
    intensifier.runhistory = RunHistory()
    intensifier.__post_init__()
    seed = intensifier._tf_seeds[0]
    budget = [1.0, 3.0, 9.0][stage]
    configs = space.sample_configuration(9)[: len(costs)]
    for config, cost in zip(configs, costs):
        intensifier.runhistory.add(config, cost=cost, budget=budget, seed=seed)
    keys = [InstanceSeedBudgetKey(instance=None, seed=seed, budget=budget)]
    return sorted(costs[configs.index(c)] for c in intensifier._get_best_configs(configs, 0, stage, keys))


@pytest.mark.parametrize("family", ["", "-hyperband"])
def test_a_tie_at_the_cut_is_promoted_whole(tmp_path, family):
    # SMAC keeps 3 of 9: the best and two of the three tied at 0.3, chosen by sampling order.
    assert _promoted("smac" + family, 0, RUNG_COSTS, tmp_path) == [0.2, 0.3, 0.3]
    assert _promoted("tied" + family, 0, RUNG_COSTS, tmp_path) == [0.2, 0.3, 0.3, 0.3]
    # No tie at the cut: the same three as SMAC's.
    distinct = [0.5, 0.2, 0.3, 0.35, 0.9, 0.25, 0.6, 0.7, 0.8]
    assert _promoted("tied" + family, 0, distinct, tmp_path) == [0.2, 0.25, 0.3]
    # Ties below the cut stay behind; a tie among the promoted ones changes nothing.
    assert _promoted("tied" + family, 0, [0.1, 0.1, 0.2, 0.5, 0.5, 0.5, 0.6, 0.7, 0.8], tmp_path) == [0.1, 0.1, 0.2]
    # The second rung keeps 1 of 3; the top one promotes none.
    assert _promoted("tied" + family, 1, [0.4, 0.2, 0.2], tmp_path) == [0.2, 0.2]
    assert _promoted("tied" + family, 2, [0.2], tmp_path) == []


def _tell(cap, config, budget):
    return cap.on_tell_end(None, SimpleNamespace(config=config, instance=None, seed=0, budget=budget), None)


def test_the_budget_cap_charges_what_a_promotion_adds():
    from auto_merge.search.multi_fidelity import BudgetCap

    cap = BudgetCap(2334)
    # One successive-halving round of min 111, max 1000, eta 3, charged as trials_for_total_budget counts it: 9x111
    # + 3x(333-111) + 1x(1000-333) = 2332, just under the cap.
    assert trials_for_total_budget(2334, 100, 1000, 3, "successive_halving") == 13
    for config in "abcdefghi":
        assert _tell(cap, config, 111) is None
    for config in "abc":
        assert _tell(cap, config, 333) is None
    assert _tell(cap, "a", 1000) is None and cap.spent == 2332
    # A tied configuration promoted on top of them: its 1000 - 333 more examples reach the cap.
    assert _tell(cap, "b", 1000) is False and cap.spent == 2999
    # A lower budget after a higher one adds nothing.
    assert _tell(cap, "b", 333) is False and cap.spent == 2999


def _rounds(trials):
    """Successive halving's rounds, min 10 max 30, eta 3: three new configurations at 10, then the promoted at 30."""
    rounds, current = [], None
    for trial in trials:
        key = tuple(sorted(trial["configuration"].items()))
        if trial["budget"] == 10.0:
            if current is None or current["promoted"]:
                current = {"rung": {}, "promoted": []}
                rounds.append(current)
            current["rung"][key] = trial["score"]
        else:
            current["promoted"].append(key)
    return rounds


def test_a_search_promotes_every_tied_configuration_and_stops_at_total_budget(tmp_path, monkeypatch, capsys):
    """End to end on the demo zoo: each round promotes exactly the configurations tied at its best rung score, and
    the run stops at the first trial that brings its spending to total_budget. The trial count derived from
    total_budget is lifted here (it binds first on so short a run), so that only the cap can stop the search."""
    import auto_merge.search.driver as driver

    monkeypatch.setattr(driver, "trials_for_total_budget", lambda *args: 60)
    config = write_config(tmp_path, n_trials=0, optimizer="successive_halving")
    raw = yaml.safe_load(config.read_text())
    total = 195  # about four rounds of SMAC's size (3 x 10 + 20 each)
    raw["strategies"]["lfs"]["total_budget"] = total
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = run_search(config, show_progress=False, write_model=False)
    trials = read_trials(result.run_dir / "trials.jsonl")
    rounds = _rounds(trials)
    spent = 0.0
    for number, round_ in enumerate(rounds):
        best = max(round_["rung"].values())
        tied = {key for key, score in round_["rung"].items() if score == best}
        if round_ is not rounds[-1] or round_["promoted"]:
            assert set(round_["promoted"]) == tied, number
        spent += 10 * len(round_["rung"]) + 20 * len(round_["promoted"])
    assert any(len(r["promoted"]) > 1 for r in rounds), "no tie in this run: the test shows nothing"
    last = 20 if trials[-1]["budget"] == 30 else 10
    assert spent >= total and spent - last < total and len(trials) < 60
    assert f"total_budget spent (195 budget units) after {len(trials)} of the 60 planned trials" in \
        capsys.readouterr().err


def test_workers_stop_asking_once_the_budget_is_spent(tmp_path, monkeypatch):
    """With 2 workers and no queue, the trial that brings the spending to total_budget stops new trials; only the
    one the other worker was running then is told after it."""
    import auto_merge.search.driver as driver

    monkeypatch.setattr(driver, "trials_for_total_budget", lambda *args: 60)
    config = write_config(tmp_path, n_trials=0, n_workers=2, optimizer="successive_halving", queued_per_worker=0)
    raw = yaml.safe_load(config.read_text())
    total = 195
    raw["strategies"]["lfs"]["total_budget"] = total
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = run_search(config, show_progress=False, write_model=False)
    trials = read_trials(result.run_dir / "trials.jsonl")
    spent, highest, reached_at = 0.0, {}, None
    for index, trial in enumerate(trials):
        key = json.dumps(trial["configuration"], sort_keys=True)
        spent += max(0.0, trial["budget"] - highest.get(key, 0.0))
        highest[key] = max(trial["budget"], highest.get(key, 0.0))
        if reached_at is None and spent >= total:
            reached_at = index
    assert reached_at is not None and len(trials) - 1 - reached_at <= 1 and len(trials) < 60
