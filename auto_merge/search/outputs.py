"""What a search leaves behind: the trial log, progress, found configurations, final scores, the model, plots.

Run folder layout:
    run.json                 the run's fingerprint, config file, strategy and model paths
    trials.jsonl             one line per finished trial (appended and flushed as SMAC is told each result)
    smac/                    SMAC's own state (runhistory, intensifier...), used to resume
    eval_cache.sqlite        per-example evaluation results (reused on promotion and on resume)
    search_config/           best.json (single objective) or front_*.json (multi-objective): self-describing
    final_scores.json        full-budget scores of the winner(s), the base and each expert alone
    best_model/              the winning merge as a Hugging Face checkpoint with its model card
    plots/                   progress.png, winner_groups.png, front.png (multi-objective)
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections import Counter
from pathlib import Path

from smac.callback import Callback

from auto_merge.search.baselines import comparison_lines, compute_spent, score_baselines
from auto_merge.search.progress import ProgressLine, best_so_far
from auto_merge.search.report import REFRESH_SECONDS, REPORT_FILE, final_rows, write_report
from auto_merge.search.results import SearchError, SearchResult
from auto_merge.search.trial import RECIPE_KEY, SCORES_KEY, source_alone

SEARCH_CONFIG_FORMAT = "auto-merge/search-config/1"
STRATA_RECORD = "stratify.json"  # evaluation.stratify: sources — what scoring the sources first cost (the driver)


class TrialRecorder(Callback):
    """Appends every told trial to trials.jsonl (flushed and fsynced: a crash loses no finished trial)."""

    def __init__(self, path: Path, progress: ProgressLine, objectives: tuple[str, ...] = ()):
        super().__init__()
        self.path = path
        self.progress = progress
        self.objectives = objectives
        drop_torn_tail(path)
        self.records = read_trials(path)
        # Trials logged by an earlier process: a resume tells them to SMAC again (replayed, see the driver), and a
        # trial must not be logged twice.
        self._logged_earlier = Counter(trial_key(r) for r in self.records)
        self.progress.update(len(self.records), None, best_so_far(self.records))
        self._last_told = time.monotonic()
        self._report_written, self._report_failed = -math.inf, False

    @property
    def completed(self) -> int:
        return len(self.records)

    def on_tell_end(self, smbo, info, value) -> bool | None:
        extra = dict(value.additional_info or {})
        scores = extra.get(SCORES_KEY)
        status = value.status.name.lower()
        if str(extra.get("error") or "").startswith("TrialTimeout("):  # our own walltime limit (search/timed.py)
            status = "timeout"
        record = {
            "trial": len(self.records),
            "configuration": {k: _plain(v) for k, v in dict(info.config).items()},
            "config_origin": getattr(info.config, "origin", None),
            "budget": info.budget,
            "seed": info.seed,
            "status": status,
            "cost": value.cost,
            "scores": scores,
            # The aggregate score the search maximises (single objective), or the mean (multi-objective).
            "score": (1.0 - extra["cost"]) if scores is not None and "cost" in extra else None,
            RECIPE_KEY: extra.get(RECIPE_KEY),
            "fingerprint": extra.get("fingerprint"),
            "examples": extra.get("examples"),
            "evaluated_examples": extra.get("evaluated_examples"),
            "cached_examples": extra.get("cached_examples"),
            "merge_seconds": extra.get("merge_seconds"),
            "eval_seconds": extra.get("eval_seconds"),
            "seconds": value.time,  # inside the trial function: merge + evaluation
            # Wall time since the previous result (or the start): also SMAC's own work, scheduling and model loading.
            "since_previous_seconds": round(time.monotonic() - self._last_told, 3),
            "worker_pid": extra.get("worker_pid"),
            "driver_pid": os.getpid(),  # which start of the run (a resume is another process)
            # When the trial ran (SMAC's runner clocks it on the worker): worker busy time (search/parallel.py).
            "started_unix": round(value.starttime, 3) if value.starttime else None,
            "ended_unix": round(value.endtime, 3) if value.endtime else None,
            "error": extra.get("error") or _default_error(status),
            "traceback": extra.get("traceback"),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "finished_unix": round(time.time(), 3),
        }
        self._last_told = time.monotonic()
        if self._logged_earlier[trial_key(record)]:
            self._logged_earlier[trial_key(record)] -= 1
            self.progress.update(len(self.records), info.budget, best_so_far(self.records))
            return None
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(record)
        if status != "success":
            self.progress.write(f"trial {record['trial']} {status}: {record['error'] or 'no result'}")
        self.progress.update(len(self.records), info.budget, best_so_far(self.records))
        self._refresh_report()
        return None

    def _refresh_report(self) -> None:
        """report.html of the run so far, at most every REFRESH_SECONDS; a failure to write it is said once and
        never stops the search."""
        if time.monotonic() - self._report_written < REFRESH_SECONDS:
            return
        self._report_written = time.monotonic()
        try:
            write_report(self.path.parent, self.records)
        except Exception as error:  # a convenience view: the trial itself is already logged
            if not self._report_failed:
                self.progress.write(f"note: could not refresh {REPORT_FILE}: {type(error).__name__}: {error}")
            self._report_failed = True


def _default_error(status: str) -> str | None:
    """SMAC reports a stopped trial without a reason: say which limit stopped it."""
    if status == "success":
        return None
    if status == "timeout":
        return "timeout: stopped after trial_walltime_limit"
    return f"{status}: the trial gave no result"


def trial_key(record: dict) -> str:
    """What identifies a trial to SMAC: its configuration, budget and seed."""
    from auto_merge.search.trial import trial_key as key_of

    return key_of(record["configuration"], record["budget"], record["seed"])


def read_trials(path: Path) -> list[dict]:
    """The trial records of a trials.jsonl. A torn last line (the process was killed while appending it) is not a
    record: that trial never finished being logged (see :func:`drop_torn_tail`)."""
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the write was cut short
                break
            raise SearchError(f"{path}:{number} is not a JSON trial record; the file was edited or damaged "
                              f"(remove that line to resume, or rerun with --overwrite)") from None
    return records


def drop_torn_tail(path: Path) -> None:
    """Cut a trials.jsonl after its last complete line, so that appending goes on from a whole record."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value


def evaluation_record(settings, config_dir: str | Path) -> dict:
    """The evaluation settings, with include paths made absolute so the record is usable from anywhere."""
    record = settings.model_dump()
    record["include_paths_resolved"] = [str((Path(config_dir) / p).resolve()) for p in settings.include_paths]
    return record


def search_config_payload(strategy, configuration: dict, scores: dict | None, *, spec, run_dir: Path,
                          kind: str) -> dict:
    """A found configuration that replays without the original YAML: strategy, models, space, scores, tasks."""
    return {
        "format": SEARCH_CONFIG_FORMAT,
        "kind": kind,
        "strategy": strategy.describe(),
        "configuration": configuration,
        "scores": scores,
        "budget": None,  # scores are at the full budget
        "seed": spec.seed,
        "model_paths": spec.model_paths,
        "evaluation": evaluation_record(spec.evaluation, spec.config_dir),
        "run": str(run_dir),
    }


def _config_key(configuration: dict) -> str:
    return json.dumps(configuration, sort_keys=True)


def finish_run(smac, config, strategy, spec, run_dir: Path, objectives: tuple[str, ...], *, write_model: bool):
    """Export the winner(s), score them and the experts at the full budget, write the model and the plots."""
    from auto_merge.output_dirs import write_json_atomic
    from auto_merge.search.final_scoring import FinalScoring
    from auto_merge.search.trial import runner_for

    records = [r for r in read_trials(run_dir / "trials.jsonl") if r["status"] == "success"]
    if not records:
        raise SearchError(f"no trial succeeded; see the errors in {run_dir / 'trials.jsonl'}")
    runner = runner_for(spec)
    scoring = FinalScoring()  # the run still ends with its found configurations, scores and model
    final = {"winners": [], "shortlist": [], "experts": {}, "base": None, "failed": scoring.failed}

    def scored(what: str, recipe: dict) -> dict | None:
        return scoring.score(what, lambda: _final_scores(runner.score_recipe(recipe, None)))

    if objectives:
        front = [{k: _plain(v) for k, v in dict(c).items()} for c in smac.intensifier.get_incumbents()]
        for index, configuration in enumerate(front or [max(records, key=lambda r: r["score"])["configuration"]]):
            entry = scored(f"front member {index}", strategy.decode(configuration))
            if entry is not None:
                final["winners"].append({"configuration": configuration, **entry})
    else:
        # SMAC's incumbent is the best at the highest budget it reached, which few configurations get to in a short
        # run; the shortlist adds the best-scoring configurations at any budget, and all of them are re-scored on
        # every example: the winner is the best at the full budget.
        incumbent = smac.intensifier.get_incumbent()
        candidates = shortlist(records, SHORTLIST_SIZE)
        if incumbent is not None:
            candidates.insert(0, {k: _plain(v) for k, v in dict(incumbent).items()})
        seen = set()
        for index, configuration in enumerate(candidates):
            key = _config_key(configuration)
            if key in seen:
                continue
            seen.add(key)
            entry = scored(f"shortlist candidate {index}", strategy.decode(configuration))
            if entry is None:
                continue
            entry = {"configuration": configuration, **entry}
            entry["smac_incumbent"] = incumbent is not None and key == _config_key(candidates[0])
            final["shortlist"].append(entry)
        if final["shortlist"]:
            final["winners"].append(max(final["shortlist"], key=lambda e: e["mean_score"]))
    if not final["winners"]:  # nothing could be re-scored: the best trial, with the scores of its own budget
        best = max(records, key=lambda r: r["score"])
        final["winners"].append({"configuration": best["configuration"], "scores": best["scores"],
                                 "mean_score": statistics.fmean(best["scores"].values()), "recipe": best["recipe"],
                                 "budget": best["budget"], "note": "full-budget scoring failed; scores at this budget"})
    for expert in strategy.models:
        entry = scored(f"expert {expert}", source_alone(expert, strategy.base_model))
        if entry is not None:
            final["experts"][expert] = entry
    final["base"] = scored("base model", source_alone(strategy.base_model, strategy.base_model))
    if config.global_params.baselines:
        final["baselines"] = score_baselines(strategy.base_model, strategy.models, scored)
    trials = read_trials(run_dir / "trials.jsonl")
    full_evaluation = max((w.get("examples", 0) for w in final["winners"]), default=0)
    strata_record = run_dir / STRATA_RECORD
    stratify_examples = json.loads(strata_record.read_text())["examples_evaluated"] if strata_record.exists() else 0
    final["compute"] = compute_spent(trials, full_evaluation, stratify_examples)
    write_json_atomic(run_dir / "final_scores.json", final)

    export_dir = run_dir / "search_config"
    export_dir.mkdir(exist_ok=True)
    exported = []
    for index, winner in enumerate(final["winners"]):
        name = "best.json" if not objectives else f"front_{index}.json"
        payload = search_config_payload(strategy, winner["configuration"], winner["scores"], spec=spec,
                                        run_dir=run_dir, kind="pareto_front_member" if objectives else "best")
        write_json_atomic(export_dir / name, payload)
        exported.append(export_dir / name)

    best_model = None
    chosen = max(final["winners"], key=lambda w: w["mean_score"])
    if write_model:
        try:
            best_model = write_winner_model(chosen["recipe"], run_dir / "best_model", spec,
                                            notes=[("Search results", comparison_lines(final))])
        except Exception as error:  # e.g. a full disk: the found configuration is saved; replay makes the model
            scoring.record("best_model", error)
            write_json_atomic(run_dir / "final_scores.json", final)
    from auto_merge.search.plots import draw_plots

    try:
        plots = draw_plots(run_dir, records, chosen["recipe"], strategy, final, objectives)
    except Exception as error:  # plots are a convenience; never the reason a finished search fails
        plots = []
        scoring.record("plots", error)
        write_json_atomic(run_dir / "final_scores.json", final)
    try:
        write_report(run_dir, read_trials(run_dir / "trials.jsonl"), final)
    except Exception as error:  # like the plots: the run's results are already saved
        scoring.record("report.html", error)
        write_json_atomic(run_dir / "final_scores.json", final)
    print(render_final(final, strategy, run_dir, best_model, plots))
    return SearchResult(run_dir=run_dir, best_configs=exported, best_model=best_model, final_scores=final,
                        plots=plots)


SHORTLIST_SIZE = 4


def shortlist(records: list[dict], size: int) -> list[dict]:
    """Up to `size` configurations to re-score on every example: first the best half of those that reached the
    highest budget of the run, then the best of the rest, each ranked by its score at the highest budget it reached.

    Ranking all budgets together is not enough: near the ceiling a perfect score on the 28 examples per task of the
    lowest rung outranks 767 of 768 at the full budget, and a shortlist of low-budget perfect scores then leaves out
    the run's best full-budget trial (SMAC's incumbent need not be it: with highest_observed_budget it can be a
    configuration that never reached the full budget)."""
    best: dict[str, tuple[float, float, dict]] = {}
    for record in records:
        key = _config_key(record["configuration"])
        budget = record["budget"] if record["budget"] is not None else math.inf
        if key not in best or budget >= best[key][0]:
            best[key] = (budget, record["score"], record["configuration"])
    ranked = sorted(best.values(), key=lambda item: item[1], reverse=True)
    top_budget = max(budget for budget, _, _ in ranked) if ranked else None
    at_top = [item for item in ranked if item[0] == top_budget][: max(1, size // 2)]
    chosen = at_top + [item for item in ranked if item not in at_top][: size - len(at_top)]
    chosen.sort(key=lambda item: item[1], reverse=True)
    return [configuration for _, _, configuration in chosen[:size]]


def _final_scores(info: dict) -> dict:
    return {"scores": info[SCORES_KEY], "mean_score": statistics.fmean(info[SCORES_KEY].values()),
            "recipe": info[RECIPE_KEY], "examples": sum((info.get("examples") or {}).values())}


def write_winner_model(recipe: dict, out_dir: Path, spec, notes=()) -> Path:
    """The winner as a checkpoint, through the same engine `auto-merge merge` uses (replaced when the run is)."""
    from auto_merge.merge.engine import run_recipe
    from auto_merge.merge.plan import ModelCatalog, SourceModel
    from auto_merge.merge.recipe import parse_recipe

    catalog = ModelCatalog(allow_pickle=spec.allow_pickle)
    for ref, path in spec.model_paths.items():
        catalog.add(SourceModel.from_folder(ref, path, allow_pickle=spec.allow_pickle))
    run_recipe(parse_recipe(recipe), out_dir, seed=spec.seed, overwrite=True, catalog=catalog, notes=notes)
    return out_dir


def score_table(rows: list[tuple[str, dict]]) -> list[str]:
    """Aligned text lines: a header, then per (label, {scores: {task: score}, mean_score}) one row."""
    tasks = list(rows[0][1]["scores"])
    width = max(len(label) for label, _ in rows) + 2
    lines = ["model".ljust(width) + "".join(t.rjust(12) for t in tasks) + "mean".rjust(10)]
    for label, entry in rows:
        lines.append(label.ljust(width) + "".join(f"{entry['scores'][t]:12.3f}" for t in tasks)
                     + f"{entry['mean_score']:10.3f}")
    return lines


def final_table(final: dict) -> list[str]:
    """The full-budget table (base, experts, baselines, winners) and the winner's comparison lines."""
    return ["full-budget scores:"] + score_table(final_rows(final)) + [""] + comparison_lines(final)


def render_final(final: dict, strategy, run_dir: Path, best_model: Path | None, plots: list[Path]) -> str:
    lines = [""] + final_table(final)
    for failure in final.get("failed", []):
        lines.append(f"not scored: {failure['what']}: {failure['error']}")
    lines.append(f"run folder: {run_dir}")
    lines.append(f"found configuration(s): {run_dir / 'search_config'}")
    if best_model is not None:
        lines.append(f"best model: {best_model}")
    if plots:
        lines.append(f"plots: {', '.join(str(p) for p in plots)}")
    return "\n".join(lines)
