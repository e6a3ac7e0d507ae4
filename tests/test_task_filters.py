"""The shipped task plugins' filters and metrics, on synthetic model outputs (no model, no data set)."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

TASKS = Path(__file__).resolve().parents[1] / "custom_tasks"


def _module(folder: str, name: str):
    path = TASKS / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_test_{folder}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gsm = _module("gsm_plus_mini_custom", "answer_extraction")
code = _module("mbpp_custom", "code_execution")
mmlu = _module("mmlu_val_custom", "mmlu_docs")


@pytest.mark.parametrize("output, expected", [
    ("The answer is 1,234.", "1234"),
    ("Step 1: 5 + 7 = 12.\n#### -7", "-7"),
    ("answer: 3/4", "0.75"),
    ("The answer is $1,000.", "1000"),
    ("So the total is 40. The answer is 42.", "42"),  # the answer-marked number, not the last one
    ("The answer is 12 apples, and 3 are left.", "12"),  # the first number after the marker
    ("The final answer is 2.50", "2.5"),
    ("Answer: \u22125", "-5"),  # Unicode minus
    ("The answer is -0.5.", "-0.5"),
    ("The answer is 1/3", "1/3"),  # non-terminating: kept as an exact fraction, never rounded
    ("\\boxed{12.25}", "12.25"),
    ("The answer is 7. Check: The answer is 8.", "8"),  # the last marker wins
    ("The answer is 3.0", "3"),
    ("The answer is 10%.", "10"),
    ("The answer is 1,000,000.", "1000000"),
])
def test_final_answer_strict_extraction(output, expected):
    assert gsm.extract_final_answer(output, "strict") == expected


@pytest.mark.parametrize("output, expected_strict, expected_flexible", [
    ("so x = 3.5", "[invalid]", "3.5"),
    ("5 + 7 = 12", "[invalid]", "12"),
    ("I computed 1,200 - 200 = 1,000.", "[invalid]", "1000"),
    ("no numbers here", "[invalid]", "[invalid]"),
    ("10-3=7 so it is 7.", "[invalid]", "7"),
    ("", "[invalid]", "[invalid]"),
])
def test_final_answer_without_a_marker(output, expected_strict, expected_flexible):
    assert gsm.extract_final_answer(output, "strict") == expected_strict
    assert gsm.extract_final_answer(output, "flexible") == expected_flexible


def test_decimals_are_not_rounded_to_integers():
    """The reference's filter rounded to int, so 3.5 could never match; here 3.5 and 4 stay different."""
    assert gsm.extract_final_answer("The answer is 3.5") != gsm.extract_final_answer("The answer is 4")
    assert gsm.canonical_number("3.50") == gsm.canonical_number("7/2") == "3.5"


@pytest.mark.parametrize("reference, canonical", [
    ("1,234", "1234"), ("-7", "-7"), ("0.75", "0.75"), ("3/4", "0.75"), ("$1,000", "1000"), ("8.0", "8"),
    (18, "18"), ("None", None),
])
def test_canonical_reference_answers(reference, canonical):
    assert gsm.canonical_number(reference) == canonical


def test_final_answer_filter_maps_every_response():
    strict = gsm.FinalAnswerFilter(mode="strict")
    flexible = gsm.FinalAnswerFilter(mode="flexible")
    responses = [["The answer is 1,234.", "#### 5"], ["x = 2"]]
    assert strict.apply(responses, [{}, {}]) == [["1234", "5"], ["[invalid]"]]
    assert flexible.apply(responses, [{}, {}]) == [["1234", "5"], ["2"]]
    with pytest.raises(ValueError, match="mode"):
        gsm.FinalAnswerFilter(mode="loose")


def test_gsm_documents_get_a_canonical_target_and_unanswerable_ones_are_dropped():
    import datasets

    docs = datasets.Dataset.from_list([{"question": "q1", "answer": "1,234"}, {"question": "q2", "answer": "None"},
                                       {"question": "q3", "answer": "0.50"}])
    processed = gsm.process_docs(docs)
    assert [d["answer_canonical"] for d in processed] == ["1234", "0.5"]


@pytest.mark.parametrize("generation, program", [
    ("def f():\n    return 1\n[DONE]", "def f():\n    return 1"),
    ("```python\ndef f():\n    return 1\n```\nThat is it.", "def f():\n    return 1"),
    ("[BEGIN]\ndef f(): return 2", "def f(): return 2"),
])
def test_code_extraction(generation, program):
    assert code.extract_code(generation) == program


def test_pass_at_1_runs_the_tests_in_a_child_process():
    tests = "assert add(1, 2) == 3\nassert add(-1, 1) == 0"
    assert code.pass_at_1([tests], ["def add(a, b):\n    return a + b"]) == 1.0
    assert code.pass_at_1([tests], ["def add(a, b):\n    return a - b"]) == 0.0
    assert code.pass_at_1([tests], ["this is not python"]) == 0.0
    assert code.pass_at_1([tests], ["import os\nos._exit(3)"]) == 0.0


def test_a_hanging_program_fails_at_the_timeout():
    started = time.perf_counter()
    assert code.pass_at_1(["assert True"], ["while True:\n    pass"], timeout=1.0) == 0.0
    assert time.perf_counter() - started < 10


def test_mmlu_answers_as_letters_or_indices():
    import datasets

    docs = datasets.Dataset.from_list([
        {"question": "q", "choices": ["a", "b", "c", "d"], "answer": "C", "subject": "x"},
        {"question": "q", "choices": ["a", "b", "c", "d"], "answer": "1", "subject": "x"},
    ])
    assert [d["answer"] for d in mmlu.process_docs(docs)] == [2, 1]
    bad = datasets.Dataset.from_list([{"question": "q", "choices": ["a", "b"], "answer": "A", "subject": "x"}])
    with pytest.raises(ValueError, match="4 choices"):
        mmlu.process_docs(bad)
