"""Final-answer extraction for GSM-style math: the number a model gives as its answer, in a canonical form.

Numbers may carry thousands separators (1,234), a sign (-7, +3, the Unicode minus), a currency sign ($1,000), a
decimal part (3.50) or be fractions (3/4). The answer is the first number after the last answer marker ("The answer
is", "The final answer is", "Answer:", "####", "\\boxed{"); in `flexible` mode, when there is no marker, the last
number of the text. The canonical form is exact (no rounding): an integer ("1234"), a terminating decimal without
trailing zeros ("3.5", "0.75": so 3/4 and 0.75 agree) or a reduced fraction ("1/3").
"""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction

from lm_eval.api.filter import Filter

INVALID = "[invalid]"
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
# Not inside a word or right after a decimal point; an optional sign and/or dollar sign; an optional denominator.
NUMBER = re.compile(
    rf"(?<![\w.])(?P<prefix>[-+\u2212]?\$?[-+\u2212]?)(?P<value>{_DIGITS})(?:\s*/\s*(?P<denominator>{_DIGITS}))?(?!\d)")
MARKERS = re.compile(r"####|\\boxed\{|\banswer\s*(?:is\b|:|=)", re.IGNORECASE)


def _value(digits: str) -> Fraction:
    return Fraction(digits.replace(",", ""))


def _from_match(match: re.Match) -> Fraction | None:
    value = _value(match["value"])
    if match["denominator"] is not None:
        denominator = _value(match["denominator"])
        if denominator == 0:
            return None
        value /= denominator
    return -value if ("-" in match["prefix"] or "\u2212" in match["prefix"]) else value


def format_number(value: Fraction) -> str:
    """Exact canonical text: integer, terminating decimal, or reduced fraction."""
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator != 1:
        return f"{value.numerator}/{value.denominator}"
    text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def canonical_number(text: str) -> str | None:
    """The canonical form of the first number in `text` (e.g. a data set's reference answer), None if none."""
    match = NUMBER.search(str(text))
    value = _from_match(match) if match else None
    return None if value is None else format_number(value)


def extract_final_answer(text: str, mode: str = "strict") -> str:
    """The canonical final answer in a model's output, or "[invalid]"."""
    if mode not in ("strict", "flexible"):
        raise ValueError(f"mode must be 'strict' or 'flexible', got {mode!r}")
    text = str(text)
    for marker in reversed(list(MARKERS.finditer(text))):
        for match in NUMBER.finditer(text, marker.end()):
            value = _from_match(match)
            if value is not None:
                return format_number(value)
    if mode == "flexible":
        for match in reversed(list(NUMBER.finditer(text))):
            value = _from_match(match)
            if value is not None:
                return format_number(value)
    return INVALID


class FinalAnswerFilter(Filter):
    """lm-eval filter: each response → its canonical final answer (see the module docstring)."""

    def __init__(self, mode: str = "strict", **kwargs) -> None:
        super().__init__(**kwargs)
        extract_final_answer("", mode)  # validates the mode when the task is built, not mid-run
        self.mode = mode

    def apply(self, resps, docs):
        return [[extract_final_answer(response, self.mode) for response in responses] for responses in resps]


def process_docs(dataset):
    """Keep questions with a numeric answer, and add `answer_canonical`, the target the filters' output is compared
    with. GSM-Plus's "critical thinking" variants (answer "None": the question lacks information) are dropped, as
    a number-extracting metric cannot score them."""

    def with_canonical(doc):
        return {"answer_canonical": canonical_number(doc["answer"]) or ""}

    return dataset.map(with_canonical).filter(lambda doc: doc["answer_canonical"] != "")
