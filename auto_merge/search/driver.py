"""The search driver: SMAC over a strategy's space, trials on dask workers, a run folder that survives crashes.

`run_search(config_path)`:
1. validates the config and resolves its models (nothing is loaded before the config is known to be good);
2. builds the strategy (space + decoder) and holds the run folder `<output_path>/<run_name>` (auto_merge.output_dirs:
   one process at a time); a run folder holding a different config, or one whose source files changed, is refused
   unless `overwrite` (which replaces it) — rerunning the same config resumes by replaying the trial log to SMAC;
3. runs SMAC: multi-fidelity Hyperband (the default) or successive halving (a tie at a rung's cut promoted whole,
   and `total_budget` a cap on what the trials spend: search/multi_fidelity.py), plain BO at max_budget, or random
   search (or, outside SMAC, CMA-ES over the continuous weights: search/cmaes_search.py); multi-objective
   (`lfs_multiobj`, or `prune` with multi_objective: one cost per task) uses ParEGO with incumbent selection at the
   highest budget (SMAC #1050);
4. records every trial as one JSON line in `trials.jsonl` as soon as SMAC is told its result;
5. exports the best configuration (or the Pareto front) as self-describing JSON, scores it and every expert alone at
   the full budget, writes the winning merged checkpoint, and draws the plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import warnings
from pathlib import Path

from auto_merge.search.results import SearchError, SearchResult  # noqa: F401  (SearchError: re-exported)
from auto_merge.search.run_folder import claim_run
from auto_merge.search.smac_state import atomic_state_writes
from auto_merge.search.trial import TrialSpec, TrialTarget

SMAC_NAME = "smac"
TRIALS_LOG = "trials.jsonl"
MULTI_FIDELITY = ("hyperband", "successive_halving")
CRASH_COST = 1.0  # every task cost is in [0, 1] (1 - score), so a failed trial counts as the worst possible



def hyperband_round(min_budget: float, max_budget: float, eta: int) -> list[tuple[int, float]]:
    """(trials, budget) of each stage of one full Hyperband round, as SMAC schedules them."""
    s_max = int(math.floor(math.log(max_budget / min_budget) / math.log(eta) + 1e-9))
    stages = []
    for s in range(s_max, -1, -1):
        n = int(math.ceil((s_max + 1) / (s + 1) * eta ** s))
        for i in range(s + 1):
            stages.append((int(n * eta ** (-i)), max_budget * eta ** (i - s)))
    return stages


def trials_for_total_budget(total_budget: float, min_budget: float, max_budget: float, eta: int,
                            optimizer: str) -> int:
    """`n_trials: 0` means: as many trials as `total_budget` examples pay for.

    A promoted configuration pays only for the examples its new budget adds: the subsets are nested and every
    example's result is cached (eval_cache.sqlite). Counting each promotion at its whole budget made successive
    halving stop at about 3/4 of the compute it was given."""
    if optimizer not in MULTI_FIDELITY:
        return max(1, int(total_budget // max_budget))
    stages = hyperband_round(min_budget, max_budget, eta)
    if optimizer == "successive_halving":  # Hyperband's first (most aggressive) bracket, repeated
        stages = stages[: int(math.floor(math.log(max_budget / min_budget) / math.log(eta) + 1e-9)) + 1]
    trials = sum(n for n, _ in stages)
    cost, previous = 0.0, None
    for n, budget in stages:
        # Within a bracket the budgets rise; a budget that does not rise starts the next bracket.
        already = previous if previous is not None and previous < budget else 0.0
        cost += n * (budget - already)
        previous = budget
    return max(1, int(total_budget / cost * trials))


def _trial_budget(config) -> float:
    """total_budget less what `evaluation.stratify: sources` spends before the first trial (the config checks refuse
    a total_budget that this leaves at nothing)."""
    from auto_merge.config.schema import sources_scoring_budget

    block = config.selected
    if config.global_params.evaluation.stratify == "sources":
        return block.total_budget - sources_scoring_budget(block)
    return block.total_budget


def _facade(config, strategy, space, spec: TrialSpec, run_dir: Path, n_trials: int, callbacks):
    """SMAC's facade for the configured optimizer. It never holds a dask client: with workers, the driver submits the
    trials itself (search/parallel.py)."""
    from smac import HyperparameterOptimizationFacade, MultiFidelityFacade, RandomFacade, Scenario
    from smac.multi_objective.parego import ParEGO

    block = config.selected
    objectives = list(spec.objectives)
    scenario_kwargs = dict(
        configspace=space, name=SMAC_NAME, output_directory=run_dir, deterministic=True, n_trials=n_trials,
        seed=config.global_params.random_seed, crash_cost=[CRASH_COST] * len(objectives) if objectives else CRASH_COST,
        # trial_walltime_limit is enforced by our own long-lived trial process (search/timed.py): SMAC's would start
        # a new process, and reload every model, for each trial.
    )
    if objectives:
        scenario_kwargs["objectives"] = objectives
    if block.optimizer in MULTI_FIDELITY:
        scenario_kwargs.update(min_budget=block.min_budget, max_budget=block.max_budget)
    scenario = Scenario(**scenario_kwargs)
    target = TrialTarget(spec)
    # SMAC's own saved state is never loaded (a resume replays the trial log instead, see _search_in): SMAC starts
    # fresh every time, so it has no reason to ask on stdin about an old state either.
    common = dict(overwrite=True, logging_level=40, callbacks=callbacks)
    if objectives:
        common["multi_objective_algorithm"] = ParEGO(scenario)
    if block.optimizer in MULTI_FIDELITY:
        facade = MultiFidelityFacade
        # Multi-objective with budgets fails an assertion with the default selection (SMAC issue #1050).
        selection = "highest_budget" if objectives else "highest_observed_budget"
        if block.promote_ties:
            from auto_merge.search.multi_fidelity import TiedHyperband as Hyperband
            from auto_merge.search.multi_fidelity import TiedSuccessiveHalving as SuccessiveHalving
        else:
            from smac.intensifier.hyperband import Hyperband
            from smac.intensifier.successive_halving import SuccessiveHalving
        # Built directly, with the class defaults that MultiFidelityFacade.get_intensifier passes too.
        kind = Hyperband if block.optimizer == "hyperband" else SuccessiveHalving
        intensifier = kind(scenario, eta=block.eta, incumbent_selection=selection)
    elif block.optimizer == "bo":
        facade = HyperparameterOptimizationFacade
        intensifier = facade.get_intensifier(scenario, max_config_calls=1)
    else:
        facade = RandomFacade
        intensifier = facade.get_intensifier(scenario, max_config_calls=1)
    # SMAC refuses an initial design larger than n_trials: keep the strategy's designs in order (experts first).
    designs = strategy.initial_configurations(space)
    if facade is RandomFacade:  # its design is the default configuration plus the additional ones
        initial_design = facade.get_initial_design(scenario, additional_configs=designs[: max(0, n_trials - 1)])
    else:
        initial_design = facade.get_initial_design(
            scenario, n_configs=block.random_init_points, max_ratio=1.0,
            additional_configs=designs[: max(0, n_trials - block.random_init_points)])
    if facade is not RandomFacade:
        common["model"] = _surrogate(facade, scenario, n_trials)
    selector = _config_selector(block, scenario, space)
    if selector is not None:
        common["config_selector"] = selector
    return facade(scenario, target, intensifier=intensifier, initial_design=initial_design, **common)


def _config_selector(block, scenario, space):
    """SMAC's config selector with its own defaults but min_trials (`model_min_results`: its model learns from the
    highest budget with at least that many results; bohb: len(space) + 1); None where SMAC's default (1) applies."""
    if block.optimizer not in MULTI_FIDELITY or block.model_min_results == 1:
        return None
    from smac.main.config_selector import ConfigSelector

    min_trials = len(space) + 1 if block.model_min_results == "bohb" else block.model_min_results
    return ConfigSelector(scenario, retrain_after=8, max_new_config_tries=16, min_trials=min_trials)


def _surrogate(facade, scenario, n_trials: int):
    """SMAC's default random forest, with its leaf bound cut from 2**20 to a bound that a run's data cannot reach.

    scikit-learn grows a tree with a leaf bound best-first and allocates room for the bound's nodes up front: at
    2**20 that is ~1 s per fit on this project's 2-core machines, every few trials, during which workers wait for the
    next trial. A tree has at most one leaf per training row and SMAC trains on at most one row per trial, so any
    bound above n_trials is never reached: the same builder then grows the same trees and SMAC suggests the same
    configurations (tests/test_search.py checks the predictions are equal), 30x faster."""
    model = facade.get_model(scenario)
    options = getattr(model, "_rf_opts", None)  # SMAC 2.x's RandomForest keeps scikit-learn's options here
    bound = 2 * max(n_trials, 1) + 16
    if isinstance(options, dict) and isinstance(options.get("max_leaf_nodes"), int) and \
            options["max_leaf_nodes"] > bound:
        options["max_leaf_nodes"] = bound
    return model


def _with_source_strata(spec: TrialSpec, run_dir: Path, client, progress) -> TrialSpec:
    """`evaluation.stratify: sources`: the base and each expert scored on every document (on a worker, whose runner
    then stays for its trials), and the spec carrying each document's label. What that evaluated counts as search
    compute (STRATA_RECORD, kept from the first start: a resume finds the results cached)."""
    from auto_merge.output_dirs import write_json_atomic
    from auto_merge.search.outputs import STRATA_RECORD
    from auto_merge.search.trial import compute_strata

    progress.write("scoring the base and each expert on every example (evaluation.stratify: sources)")
    if client is not None:
        strata, evaluated = client.submit(compute_strata, spec, pure=False).result()
    else:
        strata, evaluated = compute_strata(spec)
    record = run_dir / STRATA_RECORD
    if not record.exists():
        labels = {task: len(set(doc_labels.values())) for task, doc_labels in strata.items()}
        write_json_atomic(record, {"examples_evaluated": evaluated, "strata_per_task": labels})
    return dataclasses.replace(spec, strata=strata)


def _dask_client(block, progress, device: str | None = None):
    if block.dask_scheduler:
        from dask.distributed import Client

        progress.write(f"connecting to the dask scheduler at {block.dask_scheduler}")
        try:
            return Client(block.dask_scheduler, timeout=20), None
        except (OSError, TimeoutError, ValueError) as error:
            raise SearchError(f"dask_scheduler {block.dask_scheduler}: cannot connect ({error}); start the "
                              f"scheduler and its workers, or remove dask_scheduler to run on this machine "
                              f"(n_workers)") from None
    if block.n_workers > 1:
        import dask
        from dask.distributed import Client, LocalCluster

        # The local scheduler runs in this process, whose main thread is often busy in SMAC (model refits hold the
        # GIL for seconds): with dask's default scheduler-side queueing, a worker that finishes waits for the
        # scheduler to send its next task. Queued trials go to the workers at once instead (search/parallel.py).
        gpus = worker_gpus(device)
        with dask.config.set({"distributed.scheduler.worker-saturation": float("inf")}):
            if len(gpus) > 1:
                cluster = _cluster_over_gpus(block.n_workers, gpus)
                progress.write(f"{block.n_workers} workers over GPUs {', '.join(gpus)} (one per worker, in turn)")
            else:
                cluster = LocalCluster(n_workers=block.n_workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
        return Client(cluster), cluster
    return None, None


def worker_gpus(device: str | None) -> list[str]:
    """The GPUs local workers take in turn: with several visible and evaluation.device `cuda` or auto (absent), their
    ids (from CUDA_VISIBLE_DEVICES when it is set); else none (a `cuda:N` device pins every worker to that GPU)."""
    if device not in (None, "auto", "cuda"):
        return []
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [item.strip() for item in visible.split(",") if item.strip()] if visible else []
    return ids[:count] if len(ids) >= count else [str(index) for index in range(count)]


def _cluster_over_gpus(n_workers: int, gpus: list[str]):
    """A local cluster whose worker i sees only GPU gpus[i mod len(gpus)] (CUDA_VISIBLE_DEVICES, set before the
    worker process starts), so each worker's live model and evaluation engine sit on a GPU of their own."""
    from dask.distributed import Nanny, Scheduler, SpecCluster

    workers = {index: {"cls": Nanny, "options": {"nthreads": 1,
                                                  "env": {"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]}}}
               for index in range(n_workers)}
    return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}})


@contextlib.contextmanager
def _without_smacs_empty_mean_warnings():
    """SMAC's local search formats a debug log with `np.mean` of its step timings even when it took no step, so numpy
    warns on the user's terminal during many suggestions. Only those two numpy messages are silenced, while SMAC runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning, r"numpy\.")
        warnings.filterwarnings("ignore", "invalid value encountered in scalar divide", RuntimeWarning, r"numpy\.")
        yield


def run_search(config_path: str | Path, *, overwrite: bool = False, run_name: str | None = None,
               show_progress: bool = True, write_model: bool = True, config=None) -> SearchResult:
    """`config`: the already validated ExperimentConfig of `config_path`, when the caller has it (the CLI)."""
    from auto_merge.config import load_experiment
    from auto_merge.strategies import build_strategy, get_strategy

    if config is None:
        config = load_experiment(config_path)  # raises ConfigError before any model is loaded
    if get_strategy(config.strategy).one_shot:  # normal_models, normal_slices: one merge, no search
        from auto_merge.search.oneshot import run_oneshot

        return run_oneshot(config, overwrite=overwrite, run_name=run_name, show_progress=show_progress,
                           write_model=write_model)
    strategy = build_strategy(config)
    from auto_merge.search.preflight import check_evaluation

    check_evaluation(config)  # device, tasks, metrics, documents: before any model is loaded
    with claim_run(config, strategy, overwrite=overwrite, run_name=run_name) as run:
        return _search_in(run.path, run.fingerprint, run.resumed, config, strategy, show_progress=show_progress,
                          write_model=write_model)


def _search_in(run_dir: Path, fingerprint: str, resumed: bool, config, strategy, *, show_progress: bool,
               write_model: bool):
    """The search itself, in a run folder this process holds."""
    from auto_merge.search.outputs import TrialRecorder, finish_run, trial_key
    from auto_merge.search.progress import ProgressLine
    from auto_merge.search.trial import spec_cache_path
    from auto_merge.strategies import objectives_of

    block = config.selected
    space = strategy.build_space(seed=config.global_params.random_seed)
    objectives = objectives_of(config)
    workers = 1 if not block.dask_scheduler and block.n_workers <= 1 else block.n_workers
    spec = TrialSpec(
        run_id=fingerprint,
        strategy=strategy.describe(),
        model_paths={ref: str(path) for ref, path in config.model_paths.items()},
        evaluation=config.global_params.evaluation,
        config_dir=str(Path(config.source_file).parent),
        cache_path=spec_cache_path(run_dir.resolve()),
        seed=config.global_params.random_seed,
        objectives=objectives,
        torch_threads=max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0,
        device=config.global_params.evaluation.device,
        allow_pickle=config.global_params.allow_pickle,
        trust_remote_code=config.global_params.trust_remote_code,
        trial_walltime_limit=block.trial_walltime_limit,
        max_budget=block.max_budget if block.optimizer in MULTI_FIDELITY else None,
    )
    n_trials = block.n_trials or trials_for_total_budget(_trial_budget(config), block.min_budget, block.max_budget,
                                                         block.eta, block.optimizer)
    progress = ProgressLine(n_trials, enabled=show_progress)
    recorder = TrialRecorder(run_dir / TRIALS_LOG, progress, objectives=objectives)
    if sys.flags.hash_randomization:
        progress.write("note: Python's hash seed is random in this process, so SMAC's suggestions can differ between "
                       "runs of the same config; `auto-merge search` and `python merge.py` fix it (PYTHONHASHSEED=0)")
    if resumed:
        # The trial log is the run's state: SMAC starts over and is told each logged result at once (no model is
        # merged or scored for them), so it re-derives everything it had (its models, random streams, successive-
        # halving brackets) and continues exactly as an uninterrupted run would.
        replay: dict = {}
        for record in recorder.records:
            replay.setdefault(trial_key(record), record)
        spec = dataclasses.replace(spec, replay=replay)
        progress.write(f"resuming {run_dir} ({recorder.completed} trials already recorded)")
    else:
        progress.write(f"run folder: {run_dir}")
    client = cluster = None
    try:
        if block.optimizer != "cmaes":
            client, cluster = _dask_client(block, progress, config.global_params.evaluation.device)
        if config.global_params.evaluation.stratify == "sources":
            spec = _with_source_strata(spec, run_dir, client, progress)
        if block.optimizer == "cmaes":
            from auto_merge.search.cmaes_search import CMAESSearch

            if workers > 1:
                progress.write("note: optimizer cmaes runs one trial at a time (n_workers is not used)")
            # Every trial on every example, as with `bo` and `random` (budget None).
            smac = CMAESSearch(space, TrialTarget(spec), [recorder], n_trials=n_trials,
                               seed=config.global_params.random_seed, budget=None, crash_cost=CRASH_COST)
            smac.optimize()
        else:
            # A kill mid-save must not leave a state the rerun cannot read.
            with atomic_state_writes(), _without_smacs_empty_mean_warnings():
                callbacks = [recorder]
                if block.optimizer in MULTI_FIDELITY and not block.n_trials:
                    from auto_merge.search.multi_fidelity import BudgetCap

                    total = _trial_budget(config)
                    callbacks.append(BudgetCap(total, on_spent=lambda told: progress.write(
                        f"total_budget spent ({total:g} budget units) after {told} of the {n_trials} planned trials: "
                        f"no new trial starts")))
                smac = _facade(config, strategy, space, spec, run_dir, n_trials, callbacks)
                if client is None:
                    smac.optimize()
                else:
                    from auto_merge.search.parallel import optimize_on_workers

                    optimize_on_workers(smac, client, queued_per_worker=block.queued_per_worker)  # saves at its end
    except KeyboardInterrupt:
        progress.close()
        print(f"\ninterrupted: {recorder.completed} trials are saved in {run_dir}; rerun the same command to "
              "resume", file=sys.stderr)
        raise
    except BaseException:
        progress.close()  # the error message then starts on a line of its own
        raise
    finally:
        from auto_merge.search.timed import close_all

        close_all()  # this process's timed trial child, if any
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    progress.close()
    return finish_run(smac, config, strategy, spec, run_dir, objectives, write_model=write_model)
