"""The budgeted evaluator: nested subsets, the per-document cache, objectives, task plugins and the code gate."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from auto_merge.config.schema import EvaluationSettings
from auto_merge.evaluation import (
    BudgetedEvaluator,
    BudgetRule,
    CodeExecutionNotAllowedError,
    DocumentRef,
    LiveEvaluator,
    NestedSubsets,
    ResultCache,
    TaskConfigError,
    TaskNameCollisionError,
    TaskNotFoundError,
    TaskObjective,
    TaskSuite,
    aggregate_cost,
    load_checkpoint,
    task_cost,
)
from auto_merge.evaluation.lm_eval_runner import quiet
from auto_merge.zoo import zoo_root

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
TASK_DATA = DATA / "task_data"
ZOO_TASKS = ("zoo_num", "zoo_col", "zoo_wrd", "zoo_col_mc")
METRICS = {"zoo_num": "exact_match,none", "zoo_wrd": "exact_match,none", "zoo_col": "exact_match,none",
           "zoo_col_mc": "acc,none"}


@pytest.fixture(scope="module")
def zoo() -> Path:
    return zoo_root(0)


@pytest.fixture(scope="module")
def base(zoo):
    return load_checkpoint(zoo / "base")


def settings(tasks, **extra) -> EvaluationSettings:
    entries = [{"task": t, "metric": METRICS[t]} if isinstance(t, str) else t for t in tasks]
    return EvaluationSettings.model_validate({"tasks": entries, "batch_size": 64, "device": "cpu", **extra})


def zoo_evaluator(zoo, model_and_tokenizer, cache_path, tasks=ZOO_TASKS, seed=0, **extra):
    model, tokenizer = model_and_tokenizer
    return BudgetedEvaluator(settings(tasks, include_path=str(zoo / "tasks"), **extra), model, tokenizer,
                             seed=seed, cache_path=cache_path)


# ------------------------------------------------------------------------------------------------- budget rule


def test_budgets_scale_with_task_size():
    rule = BudgetRule(reference_size=2000, min_examples=10)
    assert [rule.examples(2000, b) for b in (20, 111, 333, 1000, 2000, 5000)] == [20, 111, 333, 1000, 2000, 2000]
    # A 90-document task runs the same share of its documents: complete only at the full budget.
    assert [rule.examples(90, b) for b in (20, 111, 333, 1000, 1999, 2000)] == [10, 10, 15, 45, 90, 90]
    assert rule.examples(5, 20) == 5  # the floor never exceeds the task
    fractions = BudgetRule(reference_size=1, unit="fraction", min_examples=0)
    assert [fractions.examples(90, f) for f in (0.01, 1 / 3, 1.0)] == [1, 30, 90]
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            rule.examples(90, bad)
    with pytest.raises(ValueError):
        fractions.examples(90, 1.5)


def test_a_budget_selects_a_seeded_shuffle_prefix():
    docs = {"a": [DocumentRef("a", i) for i in range(100)], "b": [DocumentRef("b", i) for i in range(7)]}
    subsets = NestedSubsets(docs, seed=3, rule=BudgetRule(reference_size=100, min_examples=1))
    again = NestedSubsets(docs, seed=3, rule=BudgetRule(reference_size=100, min_examples=1))
    other_seed = NestedSubsets(docs, seed=4, rule=BudgetRule(reference_size=100, min_examples=1))
    assert subsets.order == again.order and subsets.order != other_seed.order
    assert subsets.order["a"] != sorted(subsets.order["a"])  # shuffled, not "first N in file order"
    assert sorted(subsets.order["a"]) == docs["a"]
    assert subsets.examples(50) == {"a": 50, "b": 4}


def test_strata_are_interleaved_so_every_prefix_holds_each_in_its_share():
    docs = {"t": [DocumentRef("t", i) for i in range(30)], "u": [DocumentRef("u", i) for i in range(5)]}
    # 18 documents every source answers, 9 only one expert answers, 3 none does.
    labels = {ref: "all" if ref.doc_id < 18 else "one" if ref.doc_id < 27 else "none" for ref in docs["t"]}
    rule = BudgetRule(reference_size=30, min_examples=1)
    subsets = NestedSubsets(docs, seed=3, rule=rule, strata={"t": labels})
    order = subsets.order["t"]
    assert sorted(order) == docs["t"]  # each document once
    for k in range(1, 31):
        prefix = [labels[ref] for ref in order[:k]]
        for name, size in (("all", 18), ("one", 9), ("none", 3)):
            assert abs(prefix.count(name) - size * k / 30) < 1 + 1e-9, (k, name, prefix)
    assert subsets.select(10)["t"] == order[:10]  # still one order, so budgets stay nested
    assert NestedSubsets(docs, seed=3, rule=rule, strata={"t": labels}).order == subsets.order
    other = NestedSubsets(docs, seed=4, rule=rule, strata={"t": labels}).order["t"]
    assert other != order and [labels[r] for r in other] == [labels[r] for r in order]  # same pattern, new draws
    assert subsets.order["u"] == NestedSubsets(docs, seed=3, rule=rule).order["u"]  # unlabelled: as before


def test_contested_documents_come_first_most_disputed_first_and_the_rest_keep_their_order():
    from auto_merge.evaluation.budget import contested_first

    docs = {"t": [DocumentRef("t", i) for i in range(12)], "u": [DocumentRef("u", i) for i in range(4)]}
    subsets = NestedSubsets(docs, seed=3, rule=BudgetRule(reference_size=12, min_examples=1))
    order = subsets.order["t"]
    spread = {order[7]: 0.25, order[2]: 0.25, order[9]: 0.5, order[4]: 0.0}
    assert contested_first(order, spread) == [order[9], order[2], order[7]] + [
        ref for ref in order if ref not in (order[9], order[2], order[7])]
    reordered = subsets.reordered({"t": spread})
    assert reordered.order["t"] == contested_first(order, spread)
    assert reordered.order["u"] == subsets.order["u"]  # no spread given: as before
    assert reordered.select(3)["t"] == reordered.order["t"][:3] and reordered.examples(6) == subsets.examples(6)
    assert subsets.order["t"] == order  # the run's own order is left as it was


def _write_results(cache, evaluator, fingerprint, wrong, documents=None):
    """Store a candidate's results on `documents` (task -> doc ids; default: every document): exact_match 0 on the
    (task, doc_id) pairs in `wrong`."""
    documents = documents or {leaf: range(256) for leaf in ("zoo_num", "zoo_wrd")}
    cache.put(fingerprint, {(leaf, evaluator.contexts[leaf]): {
        i: {"exact_match,none": 0.0 if (leaf, i) in wrong else 1.0} for i in ids} for leaf, ids in documents.items()})
    time.sleep(0.01)  # write times order the candidates


def test_contested_first_compares_the_candidates_scored_at_the_searchs_max_budget(zoo, base, tmp_path):
    """A search whose max_budget is below its tasks' size: its complete candidates are those scored at max_budget,
    and only documents they all have can be compared."""
    evaluator = zoo_evaluator(zoo, base, tmp_path / "cache.sqlite", tasks=("zoo_num", "zoo_wrd"),
                              contested_first=True)
    evaluator.full_budget = 60
    top = {task: [ref.doc_id for ref in docs] for task, docs in evaluator.subsets.select(60).items()}
    disputed, unshared = top["zoo_num"][40], evaluator.subsets.order["zoo_num"][100].doc_id
    _write_results(evaluator.cache, evaluator, "a", {("zoo_num", disputed)}, top)
    _write_results(evaluator.cache, evaluator, "partial", set(), {task: ids[:30] for task, ids in top.items()})
    assert evaluator.subsets_for("next").order == evaluator.subsets.order  # "partial" is not complete: one
    _write_results(evaluator.cache, evaluator, "b", {("zoo_num", unshared)}, {**top, "zoo_num": top["zoo_num"] +
                                                                              [unshared]})
    reordered = evaluator.subsets_for("next").order
    # a and b disagree on `disputed`; `unshared` only b has, so it is not compared
    assert reordered["zoo_num"][0] == DocumentRef("zoo_num", disputed)
    assert reordered["zoo_num"][1:] == [r for r in evaluator.subsets.order["zoo_num"] if r.doc_id != disputed]
    assert reordered["zoo_wrd"] == evaluator.subsets.order["zoo_wrd"]


def test_contested_first_orders_each_candidate_by_the_best_candidates_completed_before_it(zoo, base, tmp_path):
    path = tmp_path / "cache.sqlite"
    evaluator = zoo_evaluator(zoo, base, path, tasks=("zoo_num", "zoo_wrd"), contested_first=True)
    run_order = evaluator.subsets.order
    everything = {("zoo_num", i) for i in range(256)} | {("zoo_wrd", i) for i in range(256)}
    _write_results(evaluator.cache, evaluator, "good", {("zoo_num", 5), ("zoo_num", 6)})
    assert evaluator.subsets_for("next").order == run_order  # one complete candidate: nothing to compare yet
    early = evaluator.evaluate("early", 20)  # scored before the others completed
    _write_results(evaluator.cache, evaluator, "worst", everything)
    _write_results(evaluator.cache, evaluator, "better", {("zoo_num", 5), ("zoo_wrd", 7)})
    # The better half of the three is good and better: they disagree on num 6 and wrd 7 (both miss num 5; "worst"
    # misses everything but is not among the best), so those come first and the rest keep the run's order.
    later = evaluator.subsets_for("later").order
    assert later["zoo_num"][0] == DocumentRef("zoo_num", 6) and later["zoo_wrd"][0] == DocumentRef("zoo_wrd", 7)
    assert later["zoo_num"][1:] == [ref for ref in run_order["zoo_num"] if ref.doc_id != 6]
    promoted = evaluator.evaluate("later", 20)
    assert promoted.examples == early.examples
    assert evaluator.evaluate("later", 60).evaluated == sum(promoted.examples.values()) * 2  # nested: 40 new each
    # A candidate keeps the order of its first evaluation: "early" is promoted on the run's order, only new documents.
    assert evaluator.subsets_for("early").order == run_order
    assert evaluator.evaluate("early", 60).evaluated == 2 * (60 - 20)
    # Derived from the cache alone: another process (a worker, a resumed run) finds the same orders.
    again = zoo_evaluator(zoo, base, path, tasks=("zoo_num", "zoo_wrd"), contested_first=True)
    assert again.subsets_for("early").order == run_order and again.subsets_for("later").order == later
    assert zoo_evaluator(zoo, base, path, tasks=("zoo_num", "zoo_wrd")).subsets_for("later").order == run_order


# ------------------------------------------------------------------------------------------------- nesting


def test_subsets_are_nested_across_budgets_for_every_zoo_task(zoo, base, tmp_path):
    evaluator = zoo_evaluator(zoo, base, tmp_path / "cache.sqlite")
    assert evaluator.sizes == {"zoo_num": 256, "zoo_col": 256, "zoo_wrd": 256, "zoo_col_mc": 256}
    budgets = [1, 5, 20, 37.5, 111, 200, 255, 256]
    selections = [evaluator.subsets.select(b) for b in budgets]
    for task in ZOO_TASKS:
        sizes = [len(selection[task]) for selection in selections]
        assert sizes == sorted(sizes) and sizes[-1] == evaluator.sizes[task], (task, sizes)
        for smaller, larger in zip(selections, selections[1:]):
            assert larger[task][:len(smaller[task])] == smaller[task]
    # The same run seed gives the same order in a new evaluator; another seed another order.
    assert zoo_evaluator(zoo, base, tmp_path / "b.sqlite").subsets.order == evaluator.subsets.order
    assert zoo_evaluator(zoo, base, tmp_path / "c.sqlite", seed=1).subsets.order != evaluator.subsets.order


def test_documents_run_are_exactly_the_selected_ones(zoo, base):
    """lm-eval pairs the k-th selected document with the k-th id it was given; ids are passed sorted so the
    per-document results belong to the right documents, in whatever order they were asked for."""
    model, tokenizer = base
    suite = TaskSuite(["zoo_num"], [zoo / "tasks"])
    live = LiveEvaluator(model, tokenizer, suite, batch_size=64)
    everything = live.evaluate_documents({"zoo_num": range(256)})["zoo_num"]
    some = live.evaluate_documents({"zoo_num": [200, 3, 77, 150, 9]})["zoo_num"]
    assert sorted(some) == [3, 9, 77, 150, 200]
    assert {doc: everything[doc] for doc in some} == some
    full = live.evaluate(limit=None)["zoo_num"]["exact_match,none"]
    assert full == pytest.approx(sum(v["exact_match,none"] for v in everything.values()) / 256)


# ------------------------------------------------------------------------------------------------- cache


def test_promotion_runs_only_the_new_examples(zoo, base, tmp_path):
    evaluator = zoo_evaluator(zoo, base, tmp_path / "cache.sqlite", tasks=("zoo_num", "zoo_wrd"))
    low = evaluator.evaluate("candidate-1", 30)
    assert low.examples == {"zoo_num": 30, "zoo_wrd": 30} and low.evaluated == 60 and low.cached == 0
    high = evaluator.evaluate("candidate-1", 90)
    assert high.examples == {"zoo_num": 90, "zoo_wrd": 90}
    assert high.cached == 60 and high.evaluated == 90 + 90 - 60
    assert evaluator.evaluate("candidate-1", 90).evaluated == 0
    # Another candidate shares nothing.
    assert evaluator.evaluate("candidate-2", 30).cached == 0
    # Cached and fresh results give the same scores as an evaluator that never saw a smaller budget.
    fresh = zoo_evaluator(zoo, base, tmp_path / "fresh.sqlite", tasks=("zoo_num", "zoo_wrd")).evaluate("x", 90)
    assert fresh.evaluated == 90 + 90 and fresh.scores == high.scores


def test_cache_survives_a_restart(zoo, base, tmp_path):
    path = tmp_path / "cache.sqlite"
    first = zoo_evaluator(zoo, base, path, tasks=("zoo_col", "zoo_col_mc"))
    before = first.evaluate("candidate", 50)
    first.close()
    restarted = zoo_evaluator(zoo, base, path, tasks=("zoo_col", "zoo_col_mc"))
    after = restarted.evaluate("candidate", 50)
    assert after.evaluated == 0 and after.cached == before.evaluated == sum(before.examples.values())
    assert after.scores == before.scores and after.cost == before.cost


def test_changing_a_task_setting_does_not_reuse_cached_results(zoo, base, tmp_path):
    path = tmp_path / "cache.sqlite"
    zoo_evaluator(zoo, base, path, tasks=("zoo_num",)).evaluate("candidate", 20)
    stop_at_digits = {"task": "zoo_num", "metric": "exact_match,none",
                      "generation_kwargs": {"until": ["</s>", *"0123456789"], "max_gen_toks": 10,
                                            "do_sample": False}}
    changed = zoo_evaluator(zoo, base, path, tasks=(stop_at_digits,)).evaluate("candidate", 20)
    assert changed.cached == 0 and changed.scores["zoo_num"] == 0.0  # every answer is cut at its first digit


def test_cache_is_shared_by_concurrent_processes(tmp_path):
    """Two processes write transactions into one cache at the same time; every row lands, nothing is corrupted."""
    path = tmp_path / "shared.sqlite"
    script = textwrap.dedent(f"""
        import sys
        from auto_merge.evaluation.cache import ResultCache
        cache = ResultCache({str(path)!r})
        worker = sys.argv[1]
        for trial in range(40):
            cache.put(f"candidate-{{worker}}-{{trial}}", {{("task", "ctx"): {{i: {{"acc,none": i % 2}} for i in range(25)}}}})
            assert len(cache.get(f"candidate-{{worker}}-{{trial}}", "task", "ctx", range(25))) == 25
    """)
    workers = [subprocess.Popen([sys.executable, "-c", script, str(n)], cwd=REPO, stderr=subprocess.PIPE, text=True)
               for n in range(2)]
    for worker in workers:
        assert worker.wait(timeout=120) == 0, worker.stderr.read()
    with ResultCache(path) as cache:
        assert cache.count() == 2 * 40 * 25
        assert cache.get("candidate-1-39", "task", "ctx", [3, 4]) == {3: {"acc,none": 1}, 4: {"acc,none": 0}}


def test_processes_opening_a_new_cache_at_once_all_succeed(tmp_path):
    """Switching a fresh database to WAL from several processes at once makes SQLite answer "locked" without waiting;
    every opener must still get its cache (found by CI: a dask worker would have lost its trial)."""
    script = textwrap.dedent(f"""
        import sys, time
        from auto_merge.evaluation.cache import ResultCache
        start = float(sys.argv[1])
        while time.time() < start:
            pass
        for n in range(25):
            ResultCache({str(tmp_path)!r} + f"/cache-{{n}}.sqlite").close()
    """)
    start = time.time() + 3.0  # past the interpreters' start-up, so the openers collide
    workers = [subprocess.Popen([sys.executable, "-c", script, str(start)], cwd=REPO, stderr=subprocess.PIPE,
                                text=True) for _ in range(3)]
    failures = [worker.stderr.read() for worker in workers if worker.wait(timeout=120) != 0]
    assert not failures, failures[0]


def test_only_lock_contention_is_retried(tmp_path):
    cache = ResultCache(tmp_path / "c.sqlite", timeout_s=0.5)
    answers = iter([sqlite3.OperationalError("database is locked")] * 3 + ["done"])

    def contended():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert cache._retry_while_contended(contended) == "done"

    def broken():
        raise sqlite3.OperationalError("no such table: results")

    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        cache._retry_while_contended(broken)
    assert time.monotonic() - started < 0.1  # raised at once, not retried

    def always_locked():
        raise sqlite3.OperationalError("database is locked")

    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        cache._retry_while_contended(always_locked)
    assert 0.2 < time.monotonic() - started < 2.0  # gave up after about the timeout


# ------------------------------------------------------------------------------------------------- objectives


def test_costs_and_aggregates():
    objectives = [TaskObjective("a", "acc,none"), TaskObjective("b", "exact_match,none", weight=3.0),
                  TaskObjective("ppl", "word_perplexity,none", higher_is_better=False)]
    costs = {"a": task_cost(0.8, True), "b": task_cost(0.4, True), "ppl": task_cost(12.0, False)}
    assert costs == pytest.approx({"a": 0.2, "b": 0.6, "ppl": 12.0})
    assert aggregate_cost(costs, objectives, "mean") == pytest.approx((0.2 + 0.6 + 12.0) / 3)
    assert aggregate_cost(costs, objectives, "weighted_mean") == pytest.approx((0.2 + 3 * 0.6 + 12.0) / 5)
    with pytest.raises(ValueError, match="result key"):
        TaskObjective("a", "acc")


def test_single_objective_optimises_the_aggregate_of_all_tasks(zoo, base, tmp_path):
    tasks = [{"task": "zoo_num", "metric": "exact_match,none", "weight": 1.0},
             {"task": "zoo_col_mc", "metric": "acc,none", "weight": 3.0}]
    scores = zoo_evaluator(zoo, base, tmp_path / "c.sqlite", tasks=tasks, aggregate="weighted_mean").evaluate("c", 60)
    assert set(scores.scores) == {"zoo_num", "zoo_col_mc"}
    assert scores.costs == {task: pytest.approx(1 - score) for task, score in scores.scores.items()}
    assert scores.cost == pytest.approx((scores.costs["zoo_num"] + 3 * scores.costs["zoo_col_mc"]) / 4)
    assert scores.cost != pytest.approx(scores.costs["zoo_num"])  # not silently the first task
    assert scores.objective_costs == [scores.costs["zoo_num"], scores.costs["zoo_col_mc"]]
    mean = zoo_evaluator(zoo, base, tmp_path / "c.sqlite", tasks=("zoo_num", "zoo_col_mc")).evaluate("c", 60)
    assert mean.cost == pytest.approx(sum(mean.costs.values()) / 2) and mean.cached == sum(mean.examples.values())


def test_full_budget_matches_lm_evals_own_scores(zoo, base, tmp_path):
    tasks = ("zoo_num", "zoo_col_mc")
    evaluator = zoo_evaluator(zoo, base, tmp_path / "c.sqlite", tasks=tasks)
    full = evaluator.evaluate("base", None)
    reference = evaluator.live.evaluate()
    assert full.scores == {task: pytest.approx(reference[task][METRICS[task]]) for task in tasks}


def test_an_unknown_metric_key_is_reported_with_the_available_ones(zoo, base, tmp_path):
    with pytest.raises(TaskConfigError, match="exact_match,none"):
        zoo_evaluator(zoo, base, tmp_path / "c.sqlite", tasks=({"task": "zoo_num", "metric": "acc,none"},))


def test_trials_print_nothing(zoo, base, tmp_path, capfd):
    evaluator = zoo_evaluator(zoo, base, tmp_path / "c.sqlite", tasks=("zoo_wrd", "zoo_col_mc"))
    capfd.readouterr()
    scores = evaluator.evaluate("c", 20)
    assert capfd.readouterr() == ("", "")
    assert 0 < scores.forward_seconds <= scores.model_seconds <= scores.seconds


def test_few_shot_examples_depend_only_on_the_document(zoo, base, tmp_path):
    evaluator = zoo_evaluator(zoo, base, tmp_path / "c.sqlite", tasks=("zoo_num",), num_fewshot=2)
    task = evaluator.suite.leaf_tasks["zoo_num"]
    docs = list(task.eval_docs)

    def prompt(doc):
        return task.fewshot_context(doc, num_fewshot=2)

    first = prompt(docs[5])
    for doc in docs[:40]:
        prompt(doc)
    assert prompt(docs[5]) == first and first.count("=") == 3


# ------------------------------------------------------------------------------------------------- plugins


def test_plugin_folder_with_relative_data_and_registered_filter_and_metric(zoo, tmp_path, monkeypatch):
    """`include_path: plugin_tasks` relative to the config's folder; the YAML's `data_files: data/codes.jsonl`
    relative to the YAML's folder; run from an unrelated working directory."""
    monkeypatch.chdir(tmp_path)
    plugin = {"include_path": "plugin_tasks"}
    tasks = [{"task": "plugin_codes", "metric": "plugin_digits_equal,digits"}]
    model, tokenizer = load_checkpoint(zoo / "num")
    expert = BudgetedEvaluator(EvaluationSettings.model_validate({"tasks": tasks, "device": "cpu", **plugin}),
                               model, tokenizer, seed=0, cache_path=tmp_path / "c.sqlite", config_dir=DATA)
    assert expert.sizes == {"plugin_codes": 12}
    assert expert.evaluate("num", None).scores == {"plugin_codes": 1.0}  # the number expert knows every code
    model, tokenizer = load_checkpoint(zoo / "col")
    other = BudgetedEvaluator(EvaluationSettings.model_validate({"tasks": tasks, "device": "cpu", **plugin}),
                              model, tokenizer, seed=0, cache_path=tmp_path / "c.sqlite", config_dir=DATA)
    assert other.evaluate("col", None).scores["plugin_codes"] < 1.0


def test_lm_eval_alone_resolves_the_plugin_data_against_the_working_directory(tmp_path, monkeypatch):
    """Why the plugin loader rewrites data paths: plain lm-eval cannot load the same folder from elsewhere."""
    from lm_eval.tasks import TaskManager

    TaskSuite(["plugin_codes"], [DATA / "plugin_tasks"])  # registers the plugin's filter and metric
    monkeypatch.chdir(tmp_path)
    with quiet(), pytest.raises(FileNotFoundError, match="codes.jsonl"):
        TaskManager(include_path=str(DATA / "plugin_tasks"), include_defaults=False).load(["plugin_codes"])


def test_a_group_scores_its_subtasks_weighted_by_size(zoo, base, tmp_path):
    folder = tmp_path / "tasks"
    (folder / "data").mkdir(parents=True)
    lines = (REPO / "custom_tasks" / "zoo" / "data" / "num.jsonl").read_text().splitlines()
    (folder / "data" / "first.jsonl").write_text("\n".join(lines[:30]) + "\n")
    (folder / "data" / "second.jsonl").write_text("\n".join(lines[100:110]) + "\n")
    for name in ("first", "second"):
        (folder / f"{name}.yaml").write_text(textwrap.dedent(f"""
            task: part_{name}
            dataset_path: json
            dataset_kwargs: {{data_files: {{test: data/{name}.jsonl}}}}
            test_split: test
            output_type: generate_until
            doc_to_text: "{{{{prompt}}}}"
            doc_to_target: "{{{{answer}}}}"
            target_delimiter: ""
            generation_kwargs: {{until: ["</s>"], max_gen_toks: 10, do_sample: false}}
            metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
        """))
    (folder / "group.yaml").write_text(textwrap.dedent("""
        group: parts
        task: [part_first, part_second]
        aggregate_metric_list: [{metric: exact_match, weight_by_size: true}]
    """))
    model, tokenizer = base
    evaluator = BudgetedEvaluator(
        EvaluationSettings.model_validate({"tasks": [{"task": "parts", "metric": "exact_match,none"}],
                                           "device": "cpu", "include_path": str(folder)}),
        model, tokenizer, seed=0, cache_path=tmp_path / "c.sqlite")
    assert evaluator.sizes == {"parts": 40}
    full = evaluator.evaluate("base", None)
    lm_eval_scores = evaluator.live.evaluate()
    assert full.scores["parts"] == pytest.approx(lm_eval_scores["parts"]["exact_match,none"])
    part = evaluator.evaluate("base", 20)
    selected = evaluator.subsets.select(20)["parts"]
    counts = {leaf: sum(ref.task == leaf for ref in selected) for leaf in ("part_first", "part_second")}
    assert sum(counts.values()) == 20 and all(counts.values())
    assert part.evaluated == 0  # every document was cached by the full run
    # An override on the group reaches its subtasks.
    stop_at_digits = {"task": "parts", "metric": "exact_match,none",
                      "generation_kwargs": {"until": ["</s>", *"0123456789"], "max_gen_toks": 10, "do_sample": False}}
    overridden = BudgetedEvaluator(
        EvaluationSettings.model_validate({"tasks": [stop_at_digits], "device": "cpu", "include_path": str(folder)}),
        model, tokenizer, seed=0, cache_path=tmp_path / "c.sqlite")
    assert overridden.evaluate("base", 20).scores == {"parts": 0.0}


def test_a_task_colliding_with_a_builtin_is_an_error_naming_both(tmp_path):
    (tmp_path / "gsm8k.yaml").write_text("task: gsm8k\ndataset_path: json\noutput_type: generate_until\n")
    with pytest.raises(TaskNameCollisionError) as error:
        TaskSuite(["zoo_num"], [REPO / "custom_tasks" / "zoo", tmp_path])
    message = str(error.value)
    assert str(tmp_path / "gsm8k.yaml") in message and "lm_eval/tasks/gsm8k/gsm8k.yaml" in message


def test_a_name_defined_in_two_task_folders_is_an_error(tmp_path):
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "t.yaml").write_text("task: my_task\ndataset_path: json\n")
    with pytest.raises(TaskNameCollisionError, match="defined twice") as error:
        TaskSuite(["my_task"], [tmp_path / "one", tmp_path / "two"])
    assert str(tmp_path / "one" / "t.yaml") in str(error.value) and str(tmp_path / "two") in str(error.value)


def test_builtin_tasks_never_reach_for_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TaskConfigError, match="gsm8k.*OfflineModeIsEnabled"):
        TaskSuite(["gsm8k"])


def test_unknown_task_names_are_listed(zoo):
    with pytest.raises(TaskNotFoundError, match="unknown task.*zoo_nope"):
        TaskSuite(["zoo_num", "zoo_nope"], [zoo / "tasks"])


# ------------------------------------------------------------------------------------------------- shipped tasks


class ScriptedLM:
    """A stand-in model for lm-eval: generations and log-likelihoods come from functions of the document."""

    def __new__(cls, generate=None, choose=None):
        from lm_eval.api.model import LM

        class Scripted(LM):
            def generate_until(self, requests, disable_tqdm=False):
                return [generate(r.doc) for r in requests]

            def loglikelihood(self, requests, disable_tqdm=False):
                return [(0.0 if choose(r.doc, r.arguments[1]) else -5.0, True) for r in requests]

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError("no rolling log-likelihood tasks here")

        return Scripted()


def run(suite, lm, allow=False):
    from lm_eval.evaluator import evaluate

    with quiet():
        return evaluate(lm=lm, task_dict=suite.task_dict, bootstrap_iters=0, log_samples=True,
                        confirm_run_unsafe_code=allow)


def local(task, split, file):
    return {task: {"dataset_kwargs": {"data_files": {split: str(TASK_DATA / file)}}}}


def test_gsm_task_extracts_final_answers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    suite = TaskSuite(["gsm_plus_mini_custom"], overrides=local("gsm_plus_mini_custom", "test", "gsm_plus.jsonl"))
    task = suite.leaf_tasks["gsm_plus_mini_custom"]
    assert len(task.eval_docs) == 5  # the "None" answer is dropped

    def formatted(answer):  # how a model might write the reference answer
        return {"1234": "1,234", "1000": "$1,000", "0.75": "3/4"}.get(answer, answer)

    marked = run(suite, ScriptedLM(lambda d: f"First 2 + 2 = 4. The answer is {formatted(d['answer_canonical'])}."))
    scores = marked["results"]["gsm_plus_mini_custom"]
    assert scores["exact_match,custom-strict-match"] == 1.0 and scores["exact_match,custom-flexible-extract"] == 1.0
    unmarked = run(suite, ScriptedLM(lambda d: f"so x = {formatted(d['answer_canonical'])}"))
    scores = unmarked["results"]["gsm_plus_mini_custom"]
    assert scores["exact_match,custom-strict-match"] == 0.0 and scores["exact_match,custom-flexible-extract"] == 1.0


def test_mmlu_task_scores_letter_choices(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    suite = TaskSuite(["mmlu_val_custom"], overrides=local("mmlu_val_custom", "validation", "mmlu.jsonl"))
    oracle = run(suite, ScriptedLM(choose=lambda doc, choice: choice.strip() == "ABCD"[doc["answer"]]))
    assert oracle["results"]["mmlu_val_custom"]["acc,none"] == 1.0
    prompt = oracle["samples"]["mmlu_val_custom"][0]["arguments"][0][0]
    assert prompt.startswith("The following are multiple choice questions (with answers) about elementary "
                             "mathematics.\n\nWhat is 2 + 2?\nA. 3\nB. 4")
    always_a = run(suite, ScriptedLM(choose=lambda doc, choice: choice.strip() == "A"))
    assert always_a["results"]["mmlu_val_custom"]["acc,none"] == 0.25


def test_code_executing_tasks_run_only_when_allowed(zoo, base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = local("mbpp_custom", "validation", "mbpp.jsonl")
    with pytest.raises(CodeExecutionNotAllowedError, match="mbpp_custom"):
        TaskSuite(["mbpp_custom"], overrides=overrides)
    model, tokenizer = base
    config = EvaluationSettings.model_validate({"tasks": [{"task": "mbpp_custom", "metric": "pass_at_1,none",
                                                           **overrides["mbpp_custom"]}], "device": "cpu"})
    with pytest.raises(CodeExecutionNotAllowedError):
        BudgetedEvaluator(config, model, tokenizer, seed=0, cache_path=tmp_path / "c.sqlite")

    suite = TaskSuite(["mbpp_custom"], overrides=overrides, allow_code_execution=True)
    solved = run(suite, ScriptedLM(lambda d: f"```python\n{d['code']}\n```\n[DONE]"), allow=True)
    assert solved["results"]["mbpp_custom"]["pass_at_1,none"] == 1.0
    prompt = solved["samples"]["mbpp_custom"][0]["arguments"][0][0]
    assert prompt.count("[BEGIN]") == 4 and "Write a function to add two numbers." in prompt  # 3-shot + the task
    wrong = run(suite, ScriptedLM(lambda d: "def add(a, b):\n    return 0\n[DONE]"), allow=True)
    assert wrong["results"]["mbpp_custom"]["pass_at_1,none"] == 0.0


def test_shipped_tasks_without_their_data_say_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = {"gsm_plus_mini_custom": {"dataset_kwargs": {"data_files": {"test": "absent/testmini.jsonl"}}}}
    with pytest.raises(TaskConfigError, match="README"):
        TaskSuite(["gsm_plus_mini_custom"], overrides=missing)


def test_evaluator_from_an_experiment_config(zoo, base, tmp_path, monkeypatch):
    """exp_config/config_lfs.yaml: `include_path: ../custom_tasks`, relative to the config file."""
    from auto_merge.config import load_experiment

    monkeypatch.chdir(tmp_path)
    config = load_experiment(REPO / "exp_config" / "config_lfs.yaml", check_models=False)
    model, tokenizer = base
    evaluator = BudgetedEvaluator.from_config(config, model, tokenizer, cache_path=tmp_path / "c.sqlite")
    assert [o.task for o in evaluator.objectives] == [t.task for t in config.global_params.evaluation.tasks]
    scores = evaluator.evaluate("base", 10)
    assert set(scores.scores) == {"zoo_num", "zoo_wrd", "zoo_col"} and math.isfinite(scores.cost)
    json.dumps(scores.as_dict())
