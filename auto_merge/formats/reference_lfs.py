"""The reference implementation's published LFS configurations in (flat SMAC JSON) into this project's space.

The reference's keys embed model ids and parameter-set names (docs/reference_format.md); its decoder gives a linear
group normalised per-model weights, a task-arithmetic group one λ per parameter set over all experts, a TIES group one
mask rate and one λ per parameter set, and a slerp group the two experts with the largest summed `slerp_t`, with
t = e^{t2} / (e^{t1} + e^{t2}) from the first (t1) to the runner-up (t2). Each maps onto this project's LFS space:
per-expert weights λ for task arithmetic, density = 1 - mask rate for TIES, and for slerp the pair in index order with
t flipped (slerp(a, b, t) = slerp(b, a, 1 - t)) when the reference's first expert has the larger index.

The mapping is exact but for TIES's trim count: with mask rate r this project keeps the floor((1 - r) * n) largest
entries of an n-entry task vector (mergekit's rule), the reference kept n - floor(r * n) + 1 (it kept every entry at
least as large as the floor(r * n)-th smallest), 1 or 2 more. A replay says so (``LFSStrategy.reference_departures``).
The reference also computed in fp16; replays compute in fp32.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from auto_merge.strategies.families import REST
from auto_merge.strategies.registry import StrategyError

_GROUP_METHOD = re.compile(r"^layer_selection_method_(?P<g>\d+)$")
_PER_MODEL = re.compile(
    r"^model_(?P<model>.+)_layer_(?P<g>\d+)_paramset_(?P<ps>.+?)_method_(?P<m>linear|slerp)_param_(?P<p>weights|slerp_t)$")
_SHARED = re.compile(r"^layer_(?P<g>\d+)_paramset_(?P<ps>.+?)_method_(?P<m>task_arithmetic|ties)_param_(?P<p>.+)$")


def parse_reference_lfs(flat: Mapping[str, object], strategy) -> dict:
    """The reference's flat keys as {group: {"method", "per_model": {(ps, method, param): {model: v}},
    "shared": {(ps, method, param): v}}}; unknown keys, models or parameter sets are errors."""
    families = {("base" if f == REST else f) for f in strategy.families}
    groups: dict[int, dict] = {}

    def group(g: int) -> dict:
        return groups.setdefault(g, {"method": None, "per_model": {}, "shared": {}})

    for key, value in flat.items():
        if match := _GROUP_METHOD.match(key):
            group(int(match["g"]))["method"] = str(value)
        elif match := _PER_MODEL.match(key):
            if match["model"] not in strategy.models:
                raise StrategyError(f"{key}: model {match['model']!r} is not among the configured models "
                                    f"{list(strategy.models)} (ids must match the exp_config byte for byte)")
            _check_family(key, match["ps"], families)
            slot = group(int(match["g"]))["per_model"].setdefault((match["ps"], match["m"], match["p"]), {})
            slot[match["model"]] = float(value)
        elif match := _SHARED.match(key):
            _check_family(key, match["ps"], families)
            group(int(match["g"]))["shared"][(match["ps"], match["m"], match["p"])] = float(value)
        else:
            raise StrategyError(f"{key}: not a key of the reference's LFS space")
    missing = [g for g in range(strategy.n_groups) if g not in groups or groups[g]["method"] is None]
    if missing:
        raise StrategyError(f"no layer_selection_method for group(s) {missing}: the file does not fit a space of "
                            f"{strategy.n_groups} groups")
    extra = sorted(set(groups) - set(range(strategy.n_groups)))
    if extra:
        raise StrategyError(f"group(s) {extra} beyond the {strategy.n_groups} groups of this space")
    return groups


def _check_family(key: str, family: str, families: set[str]) -> None:
    if family not in families:
        raise StrategyError(f"{key}: parameter set {family!r} is not among the configured filters + base "
                            f"({sorted(families)})")


def reference_slerp_pair(per_model: Mapping, strategy) -> tuple[int, int]:
    """The reference's slerp experts: largest summed slerp_t first, ties kept in `models` order."""
    scores = {i: sum(values.get(model, 0.0) for (ps, m, p), values in per_model.items() if m == "slerp")
              for i, model in enumerate(strategy.models)}
    ranked = sorted(scores, key=lambda i: (-scores[i], i))
    return ranked[0], ranked[1]


def import_reference_lfs(flat: Mapping[str, object], strategy) -> dict:
    """Configuration values in this project's LFS space that decode to the merge the reference built."""
    groups = parse_reference_lfs(flat, strategy)
    values: dict[str, object] = {}
    for g in range(strategy.n_groups):
        entry = groups[g]
        method = entry["method"]
        if method not in strategy.methods:
            raise StrategyError(f"group {g} uses {method!r}, which this space does not search "
                                f"({', '.join(strategy.methods)})")
        values[f"g{g}:method"] = method
        for family in strategy.families:
            ps = "base" if family == REST else family
            prefix = f"g{g}:{family}:{method}"
            if method == "linear":
                weights = entry["per_model"][(ps, "linear", "weights")]
                for i, model in enumerate(strategy.models):
                    values[f"{prefix}:weight:m{i}"] = weights[model]
            elif method == "task_arithmetic":
                lam = entry["shared"][(ps, "task_arithmetic", "scaling_coefficient")]
                for i in range(len(strategy.models)):
                    values[f"{prefix}:weight:m{i}"] = lam
            elif method == "ties":
                values[f"{prefix}:density"] = 1.0 - entry["shared"][(ps, "ties", "param_value_mask_rate")]
                values[f"{prefix}:lambda"] = entry["shared"][(ps, "ties", "scaling_coefficient")]
            elif method == "slerp":
                first, second = reference_slerp_pair(entry["per_model"], strategy)
                slerp_t = entry["per_model"][(ps, "slerp", "slerp_t")]
                t1, t2 = slerp_t[strategy.models[first]], slerp_t[strategy.models[second]]
                t = math.exp(t2) / (math.exp(t1) + math.exp(t2))
                low, high = sorted((first, second))
                values[f"g{g}:slerp:pair"] = f"{low}-{high}"
                values[f"{prefix}:t"] = t if first == low else 1.0 - t
            else:
                raise StrategyError(f"group {g}: the reference's LFS has no method {method!r}")
    return values
