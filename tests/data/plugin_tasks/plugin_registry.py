"""Registers a filter and a metric with lm-eval by name; auto-merge imports this file before building tasks."""

import re

from lm_eval.api.filter import Filter
from lm_eval.api.registry import register_filter, register_metric


def digits(text) -> str:
    return re.sub(r"\D", "", str(text))


@register_filter("plugin_keep_digits")
class KeepDigits(Filter):
    def apply(self, resps, docs):
        return [[digits(response) for response in responses] for responses in resps]


@register_metric(metric="plugin_digits_equal", higher_is_better=True, output_type="generate_until",
                 aggregation="mean")
def digits_equal(references, predictions, **kwargs) -> float:
    return 1.0 if digits(references[0]) == digits(predictions[0]) else 0.0
