"""Tests for the merge-method registry (auto_merge.merge): closed forms, design-note §14 vectors, edge cases,
parameter validation and seeded determinism of the random methods."""

from __future__ import annotations

import math

import pytest
import torch

from auto_merge.merge import (
    METHODS,
    common_submatrix,
    get_method,
    list_methods,
    merge_tensor,
    validate_params,
)
from auto_merge.merge import sparsify
from auto_merge.merge.methods.fourier import fourier_high_pass, fourier_mask

torch.set_num_threads(1)

ATOL = 1e-5


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def weights(*values: float) -> list[dict]:
    return [{"weight": value} for value in values]


def assert_close(actual: torch.Tensor, expected, atol: float = ATOL) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def slerp_formula(t: float, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Textbook slerp coefficients from the normalized angle, applied to the unnormalized vectors (float64)."""
    start64, end64 = start.double(), end.double()
    cosine = float(start64 @ end64 / (start64.norm() * end64.norm()))
    omega = math.acos(max(-1.0, min(1.0, cosine)))
    return ((math.sin((1 - t) * omega) * start64 + math.sin(t * omega) * end64) / math.sin(omega)).float()


# --- registry
ALL_METHODS = {
    "linear", "slerp", "nuslerp", "multislerp", "task_arithmetic", "ties", "dare_linear", "dare_ties",
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "karcher", "sce", "passthrough",
    "fourier", "nearswap", "ram", "ramplus_tl", "arcee_fusion",
}


def test_registry_lists_every_method_with_consistent_specs():
    assert set(list_methods()) == ALL_METHODS
    assert set(METHODS) == ALL_METHODS
    for name in ALL_METHODS:
        spec = get_method(name)
        assert spec.name == name
        assert spec.base_model in ("required", "optional", "none")
        assert spec.min_models >= 1
        assert spec.max_models is None or spec.max_models >= spec.min_models
        for param in spec.params:
            assert param.scope in ("global", "per_model")
            if not param.required:
                param.coerce(param.default, name)  # every default satisfies its own range
    random_methods = {name for name in ALL_METHODS if get_method(name).is_random}
    assert random_methods == {"dare_linear", "dare_ties", "della", "della_linear", "arcee_fusion"}
    base_required = {name for name in ALL_METHODS if get_method(name).requires_base}
    assert base_required == {
        "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
        "della", "della_linear", "model_stock", "sce", "fourier", "nearswap", "ram", "ramplus_tl", "arcee_fusion",
    }
    assert (get_method("slerp").min_models, get_method("slerp").max_models) == (1, 1)
    assert (get_method("nuslerp").min_models, get_method("nuslerp").max_models) == (2, 2)
    assert get_method("passthrough").max_models == 1
    assert get_method("ties").param("weight").scope == "per_model"
    assert get_method("ties").param("lambda").scope == "global"


def test_validate_params_fills_method_specific_defaults():
    ties = validate_params("ties", {}, weights(1, 1))
    assert ties.global_params == {"lambda": 1.0, "normalize": True, "rescale_mode": "none"}
    assert ties.per_model("density") == [1.0, 1.0]
    dare = validate_params("dare_ties", {}, weights(1))
    assert dare.global_params["normalize"] is False and dare.global_params["rescale_mode"] == "l1"
    della = validate_params("della", {"density": 0.5}, weights(1))
    assert della.global_params["normalize"] is True
    assert della.per_model_params[0] == {"weight": 1.0, "density": 0.5, "epsilon": 0.15}
    crumbs = validate_params("breadcrumbs", {}, weights(1))
    assert crumbs.per_model("gamma") == [0.01]
    assert crumbs.global_params["compat_breadcrumbs_empty_slice"] is False
    assert validate_params("karcher", {}, [{}, {}]).global_params == {"max_iter": 10, "tol": 1e-5}
    assert validate_params("fourier", {}, weights(1)).global_params == {
        "lambda": 1.0, "normalize": False, "consensus": "sum", "fr_ratio": 0.9, "fr_mask": "reference",
    }
    assert validate_params("passthrough", {}, [{}]).per_model("scale") == [None]


def test_per_model_param_in_global_params_is_a_default_overridden_per_model():
    resolved = validate_params("ties", {"density": 0.4}, [{"weight": 1}, {"weight": 2, "density": 0.9}])
    assert resolved.per_model("density") == [0.4, 0.9]
    assert resolved.per_model("weight") == [1.0, 2.0]


def test_rescale_bool_alias_maps_to_rescale_mode():
    assert validate_params("dare_linear", {"rescale": False}, weights(1)).global_params["rescale_mode"] == "none"
    assert validate_params("ties", {"rescale": True}, weights(1)).global_params["rescale_mode"] == "l1"
    assert (
        validate_params("della", {"rescale": True, "rescale_mode": "inverse_p"}, weights(1)).global_params[
            "rescale_mode"
        ]
        == "inverse_p"
    )
    with pytest.raises(ValueError, match="contradicts"):
        validate_params("dare_linear", {"rescale": False, "rescale_mode": "l1"}, weights(1))
    with pytest.raises(ValueError, match="unknown parameter 'rescale'"):
        validate_params("task_arithmetic", {"rescale": True}, weights(1))


@pytest.mark.parametrize(
    ("method", "global_params", "per_model", "pattern"),
    [
        ("nonexistent", {}, [], r"unknown merge method 'nonexistent'.*linear"),
        ("ties", {"densty": 0.5}, weights(1), r"unknown parameter 'densty'.*density"),
        ("ties", {}, [{}], r"model 0.*missing required parameter 'weight'"),
        ("ties", {}, [{"weight": 1, "density": 0.0}], r"'density'.*allowed: a finite real number in \(0.0, 1.0\]"),
        ("ties", {}, [{"weight": 1, "density": 1.5}], r"'density'.*out of range"),
        ("ties", {}, [{"weight": True}], r"'weight' must be a number"),
        ("ties", {}, [{"weight": float("nan")}], r"'weight' must be finite"),
        ("ties", {"normalize": 1}, weights(1), r"'normalize' must be a bool.*true or false"),
        ("ties", {}, [{"weight": 1, "lambda": 2.0}], r"model 0.*'lambda' is global"),
        ("dare_ties", {"rescale_mode": "half"}, weights(1), r"'rescale_mode'.*'none', 'l1', 'inverse_p'"),
        ("fourier", {"fr_ratio": 0.0}, weights(1), r"'fr_ratio'.*> 0.0"),
        ("fourier", {"consensus": "count"}, weights(1), r"'consensus'.*'sum', 'none'"),
        ("karcher", {"max_iter": 2.5}, [{}, {}], r"'max_iter' must be an integer"),
        ("karcher", {"max_iter": 0}, [{}, {}], r"'max_iter'.*an integer >= 1"),
        ("karcher", {"tol": 0.0}, [{}, {}], r"'tol'.*> 0.0"),
        ("karcher", {}, [{"weight": 1}, {"weight": 1}], r"unknown parameter 'weight'"),
        ("sce", {"select_topk": 1.2}, [{}], r"'select_topk'.*\[0.0, 1.0\]"),
        ("slerp", {}, [{}], r"missing required parameter 't'"),
        ("slerp", {"t": 0.5}, [{}, {}], r"exactly 1 non-base model"),
        ("model_stock", {}, [{}], r"at least 2 non-base model"),
        ("breadcrumbs", {}, [{"weight": 1, "gamma": -0.1}], r"'gamma'.*\[0.0, 1.0\]"),
        ("della", {}, [{"weight": 1, "density": 0.9}], r"'density'=0.9 and 'epsilon'=0.15"),
        ("della_linear", {"epsilon": 0.3}, [{"weight": 1, "density": 0.2}], r"0 < density - epsilon"),
        ("linear", {}, weights(1, -1), r"sum to ~0"),
        ("multislerp", {}, weights(2, -2), r"sum to ~0"),
    ],
)
def test_validate_params_rejects_bad_values_with_a_clear_message(method, global_params, per_model, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate_params(method, global_params, per_model)


def test_validation_accepts_boundary_values_and_integral_floats():
    assert validate_params("karcher", {"max_iter": 12.0}, [{}, {}]).global_params["max_iter"] == 12
    assert validate_params("della", {}, [{"weight": 1, "density": 1.0, "epsilon": 0.15}])  # density 1 is a no-op
    assert validate_params("linear", {"normalize": False}, weights(1, -1))  # sum 0 is fine without normalizing
    assert validate_params("sce", {"select_topk": 0.0}, [{}]).global_params["select_topk"] == 0.0


def test_merge_tensor_checks_base_counts_and_shapes():
    a, b = vec(1, 2), vec(3, 4)
    with pytest.raises(ValueError, match="requires a base"):
        merge_tensor("ties", [a], None, {}, weights(1))
    with pytest.raises(ValueError, match="does not take a base"):
        merge_tensor("linear", [a], b, {}, weights(1))
    with pytest.raises(ValueError, match="shape"):
        merge_tensor("linear", [a, vec(1, 2, 3)], None, {}, weights(1, 1))
    with pytest.raises(ValueError, match="2 tensors but 1 per-model"):
        merge_tensor("linear", [a, b], None, {}, weights(1))
    # an empty per-model list means "defaults for every model"; per-model values may come from global_params
    assert_close(merge_tensor("linear", [a, b], None, {"weight": 1.0}, []), [2, 3])
    with pytest.raises(ValueError, match="floating-point"):
        merge_tensor("linear", [torch.tensor([1, 2])], None, {}, weights(1))


def test_common_submatrix_truncates_to_smallest_vocab_and_width():
    small, large = torch.ones(5, 3), torch.arange(28.0).reshape(7, 4)
    truncated = common_submatrix([small, large])
    assert [tuple(t.shape) for t in truncated] == [(5, 3), (5, 3)]
    assert torch.equal(truncated[1], large[:5, :3])
    with pytest.raises(ValueError, match="different rank"):
        common_submatrix([torch.ones(3), torch.ones(3, 1)])


METHOD_SMOKE_CASES = {
    "linear": (False, 2, {}, weights(0.3, 0.7)),
    "slerp": (True, 1, {"t": 0.3}, [{}]),
    "nuslerp": (True, 2, {}, weights(1, 2)),
    "multislerp": (False, 3, {}, weights(1, 2, 3)),
    "task_arithmetic": (True, 2, {}, weights(1, 1)),
    "ties": (True, 2, {"density": 0.5}, weights(1, 1)),
    "dare_linear": (True, 2, {"density": 0.5}, weights(1, 1)),
    "dare_ties": (True, 2, {"density": 0.5}, weights(1, 1)),
    "breadcrumbs": (True, 2, {"density": 0.5, "gamma": 0.1}, weights(1, 1)),
    "breadcrumbs_ties": (True, 2, {"density": 0.5, "gamma": 0.1}, weights(1, 1)),
    "della": (True, 2, {"density": 0.5, "epsilon": 0.1}, weights(1, 1)),
    "della_linear": (True, 2, {"density": 0.5, "epsilon": 0.1}, weights(1, 1)),
    "model_stock": (True, 2, {}, [{}, {}]),
    "karcher": (False, 3, {}, [{}, {}, {}]),
    "sce": (True, 2, {"select_topk": 0.5}, [{}, {}]),
    "passthrough": (False, 1, {}, [{"scale": 0.5}]),
    "fourier": (True, 2, {}, weights(1, 1)),
    "nearswap": (True, 1, {"t": 0.05}, [{}]),
    "ram": (True, 2, {}, [{}, {}]),
    "ramplus_tl": (True, 2, {}, [{}, {}]),
    "arcee_fusion": (True, 1, {}, [{}]),
}


@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_every_method_takes_bf16_returns_fp32_and_leaves_inputs_untouched(method):
    assert set(METHOD_SMOKE_CASES) == ALL_METHODS
    uses_base, count, global_params, per_model = METHOD_SMOKE_CASES[method]
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(6, 10, generator=generator)
    tensors = [base + 0.1 * torch.randn(6, 10, generator=generator) for _ in range(count)]
    bf16_base, bf16_tensors = base.bfloat16(), [t.bfloat16() for t in tensors]
    copies = [t.clone() for t in bf16_tensors] + [bf16_base.clone()]
    fp32_tensors, fp32_base = [t.float() for t in bf16_tensors], bf16_base.float()
    fp32_copies = [t.clone() for t in fp32_tensors] + [fp32_base.clone()]

    base_arg = bf16_base if uses_base else None
    out_bf16 = merge_tensor(method, bf16_tensors, base_arg, global_params, per_model, seed=1, tensor_name="w")
    out_fp32 = merge_tensor(
        method, fp32_tensors, fp32_base if uses_base else None, global_params, per_model, seed=1, tensor_name="w"
    )
    assert out_bf16.dtype == torch.float32 and out_bf16.shape == base.shape
    assert torch.isfinite(out_bf16).all()
    # bf16 inputs are upcast exactly, so the result must equal the fp32 run on the same values.
    assert torch.equal(out_bf16, out_fp32)
    for before, after in zip(copies, bf16_tensors + [bf16_base]):
        assert torch.equal(before, after)
    for before, after in zip(fp32_copies, fp32_tensors + [fp32_base]):
        assert torch.equal(before, after)
    if method == "passthrough":
        assert out_fp32.data_ptr() != fp32_tensors[0].data_ptr()


# --- linear
def test_linear_design_vectors():
    x1, x2 = vec(1, 2, 3, 4), vec(3, 2, 1, 0)
    assert_close(merge_tensor("linear", [x1, x2], None, {}, weights(1, 3)), [2.5, 2.0, 1.5, 1.0])
    assert_close(merge_tensor("linear", [x1, x2], None, {"normalize": False}, weights(1, 3)), [10, 8, 6, 4])
    # negative weights are allowed: (2*x1 - x2) / 1
    assert_close(merge_tensor("linear", [x1, x2], None, {}, weights(2, -1)), [-1, 2, 5, 8])
    assert_close(merge_tensor("linear", [x1], None, {}, weights(5)), x1)


# --- slerp
@pytest.mark.parametrize(
    ("start", "end", "t", "expected"),
    [
        ((1, 0), (0, 1), 0.5, (0.70711, 0.70711)),
        ((2, 0), (0, 1), 0.5, (1.41421, 0.70711)),
        ((2, 0), (0, 1), 0.25, (1.84776, 0.38268)),
        ((1, 0), (0.5, 0.86603), 0.5, (0.86603, 0.5)),
        ((1, 2), (2, 4), 0.5, (1.5, 3)),
        ((1, 0), (-1, 0), 0.5, (0, 0)),
        ((0, 0), (0, 1), 0.5, (0, 0.70711)),
        ((3, -1), (0.5, 2), 0.0, (3, -1)),
        ((3, -1), (0.5, 2), 1.0, (0.5, 2)),
    ],
)
def test_slerp_design_vectors(start, end, t, expected):
    assert_close(merge_tensor("slerp", [vec(*end)], vec(*start), {"t": t}), expected)


def test_slerp_works_on_the_flattened_tensor_and_lerps_near_colinear():
    start = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    end = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    out = merge_tensor("slerp", [end], start, {"t": 0.3})
    assert_close(out, slerp_formula(0.3, start.reshape(-1), end.reshape(-1)).reshape(2, 2))
    # cos = 0.99995 > 0.9995 triggers plain lerp even though the vectors are not exactly parallel
    near = vec(1.0, 0.01)
    assert_close(merge_tensor("slerp", [near], vec(1, 0), {"t": 0.5}), [1.0, 0.005])


# --- nuslerp
def test_nuslerp_takes_t_from_weights_and_uses_task_vectors_with_a_base():
    x1, x2 = vec(2, 0), vec(0, 1)
    # t = w2/(w1+w2) = 0.25 gives mergekit slerp's [1.84776, 0.38268] for these orthogonal inputs
    assert_close(merge_tensor("nuslerp", [x1, x2], None, {}, weights(3, 1)), [1.84776, 0.38268])
    # weights summing to ~0 fall back to t = 0.5
    assert_close(merge_tensor("nuslerp", [x1, x2], None, {}, weights(1, -1)), [1.41421, 0.70711])
    base = vec(1, 1)
    out = merge_tensor("nuslerp", [vec(2, 1), vec(1, 2)], base, {}, weights(1, 1))
    assert_close(out, [1.70711, 1.70711])
    # exactly colinear inputs lerp
    assert_close(merge_tensor("nuslerp", [vec(1, 2), vec(2, 4)], None, {}, weights(1, 1)), [1.5, 3])


def test_nuslerp_vector_axis_follows_flatten_and_row_wise():
    x1 = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    x2 = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    flat = merge_tensor("nuslerp", [x1, x2], None, {}, weights(1, 1))
    assert_close(flat, slerp_formula(0.5, x1.reshape(-1), x2.reshape(-1)).reshape(2, 2))
    rows = merge_tensor("nuslerp", [x1, x2], None, {"nuslerp_flatten": False}, weights(1, 1))
    assert_close(rows, [[0.70711, 0.70711], [2.0, 0.0]])  # row 0 orthogonal, row 1 colinear -> lerp
    columns = merge_tensor(
        "nuslerp", [x1, x2], None, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, weights(1, 1)
    )
    expected_column0 = slerp_formula(0.5, x1[:, 0], x2[:, 0])
    # column 1 of x1 is zero: its clamped norm gives cos = 0, so slerp at 90 degrees gives sin(pi/4) * x2[:, 1]
    assert_close(columns, torch.stack([expected_column0, torch.tensor([0.70711, 0.0])], dim=1))


# --- multislerp
def mergekit_multislerp_procedure(vectors: list[torch.Tensor], raw_weights: list[float], eps: float = 1e-8):
    """mergekit's tangent-space procedure, written out literally in float64, as the test oracle."""
    stacked = torch.stack([v.double().reshape(-1) for v in vectors])
    w = torch.tensor(raw_weights, dtype=torch.float64)
    w = w / w.sum()
    norms = stacked.norm(dim=1)
    units = stacked / (norms + eps).unsqueeze(1)
    mean = w @ units
    mean_hat = mean / mean.norm()
    tangents = units - (units @ mean_hat).unsqueeze(1) * mean_hat
    tangent = w @ tangents
    tangent_norm = tangent.norm() + eps
    direction = mean_hat * torch.cos(tangent_norm) + tangent * torch.sin(tangent_norm) / tangent_norm
    return (direction * (w @ norms)).float().reshape(vectors[0].shape)


def test_multislerp_design_vectors_and_closed_form():
    xs = [vec(2, 0, 0), vec(0, 1, 0), vec(0, 0, 3)]
    assert_close(merge_tensor("multislerp", xs, None, {}, weights(1, 2, 1)), [0.71443, 1.42887, 0.71443])
    two = merge_tensor("multislerp", [vec(2, 0), vec(0, 1)], None, {}, weights(0.75, 0.25))
    assert_close(two, [1.66020, 0.55340])  # a normalized lerp, not slerp's [1.84776, 0.38268]
    generator = torch.Generator().manual_seed(0)
    random_inputs = [torch.randn(4, 5, generator=generator) for _ in range(3)]
    out = merge_tensor("multislerp", random_inputs, None, {}, weights(0.2, 0.5, 0.3))
    assert_close(out, mergekit_multislerp_procedure(random_inputs, [0.2, 0.5, 0.3]), atol=1e-5)


def test_multislerp_with_base_and_degenerate_inputs():
    base = vec(1, 1, 1)
    out = merge_tensor("multislerp", [vec(3, 1, 1), vec(1, 2, 1)], base, {}, weights(1, 1))
    # task vectors [2,0,0] and [0,1,0]: direction (1,1)/sqrt2, mean norm 1.5
    assert_close(out, [1 + 1.5 / math.sqrt(2), 1 + 1.5 / math.sqrt(2), 1])
    # antipodal pair cancels: lerp with normalized weights
    assert_close(merge_tensor("multislerp", [vec(1, 0), vec(-1, 0)], None, {}, weights(1, 1)), [0, 0])
    with pytest.raises(ValueError, match="cancel"):
        merge_tensor("multislerp", [vec(1, 0), vec(-1, 0), vec(0, 0)], None, {}, weights(1, 1, 0.0))
    # all task vectors zero: the result is the base, not an error
    assert_close(merge_tensor("multislerp", [base, base, base], base, {}, weights(1, 1, 1)), base)
    # a zero tensor adds no direction but halves the magnitude
    assert_close(merge_tensor("multislerp", [vec(2, 0), vec(0, 0)], None, {}, weights(1, 1)), [1, 0])


# --- karcher
def test_karcher_two_inputs_equal_equal_weight_multislerp():
    a, b = vec(2, 0, 1), vec(0, 1, -1)
    karcher = merge_tensor("karcher", [a, b], None, {}, [{}, {}])
    assert_close(karcher, merge_tensor("multislerp", [a, b], None, {}, weights(1, 1)))


def test_karcher_three_inputs_satisfy_the_mean_condition():
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(12, generator=generator).abs() + 0.1 * i for i in range(3)]
    out = merge_tensor("karcher", inputs, None, {"max_iter": 100, "tol": 1e-7}, [{}, {}, {}])
    norms = [float(x.norm()) for x in inputs]
    assert float(out.norm()) == pytest.approx(sum(norms) / 3, rel=1e-5)
    mean = out.double() / out.double().norm()
    gradient = torch.zeros_like(mean)
    for x in inputs:
        unit = x.double() / x.double().norm()
        cosine = float(unit @ mean)
        angle = math.acos(min(1.0, cosine))
        gradient += angle / math.sin(angle) * (unit - cosine * mean) / 3
    assert float(gradient.norm()) < 1e-5
    # the plain normalized average is measurably different, so the iteration did something
    chordal = sum(x / x.norm() for x in inputs)
    assert float((chordal / chordal.norm() - mean.float()).norm()) > 1e-4


def test_karcher_zero_inputs():
    assert_close(merge_tensor("karcher", [vec(0, 0), vec(0, 0)], None, {}, [{}, {}]), [0, 0])
    # a zero input gives no direction but counts in the mean norm
    assert_close(merge_tensor("karcher", [vec(3, 0), vec(0, 0)], None, {}, [{}, {}]), [1.5, 0])


# --- model_stock
def test_model_stock_design_vectors():
    base = vec(0, 0)
    assert_close(merge_tensor("model_stock", [vec(1, 0), vec(1, 1)], base), [0.82843, 0.41421])
    assert_close(merge_tensor("model_stock", [vec(2, 0), vec(0, 2)], base), [0, 0])
    orthogonal_base = vec(1, 1)
    assert_close(merge_tensor("model_stock", [vec(2, 1), vec(1, 3)], orthogonal_base), [1, 1])
    # colinear offsets: t = 1, the plain mean
    assert_close(merge_tensor("model_stock", [vec(1, 2), vec(2, 4), vec(3, 6)], base), [2, 4])


def test_model_stock_filter_wise_and_division_guard():
    base = torch.zeros(2, 2)
    x1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    x2 = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    per_row = merge_tensor("model_stock", [x1, x2], base, {"filter_wise": True})
    assert_close(per_row, [[0.82843, 0.41421], [0.0, 0.0]])
    whole = merge_tensor("model_stock", [x1, x2], base)
    cosine = 1 / math.sqrt(6)
    t = 2 * cosine / (1 + cosine)
    assert_close(whole, t * (x1 + x2) / 2)
    with pytest.raises(ValueError, match="divides by zero"):
        merge_tensor("model_stock", [vec(1, 0), vec(-1, 0)], vec(0, 0))


# --- task arithmetic family
TA_BASE, TA_X1, TA_X2 = vec(1, 1, 1, 1), vec(2, 0, 1, 3), vec(1, 3, 0, 1)


def test_task_arithmetic_design_vectors():
    assert_close(merge_tensor("task_arithmetic", [TA_X1, TA_X2], TA_BASE, {}, weights(1, 0.5)), [2, 1, 0.5, 3])
    normalized = merge_tensor("task_arithmetic", [TA_X1, TA_X2], TA_BASE, {"normalize": True}, weights(1, 0.5))
    assert_close(normalized, [1.66667, 1, 0.66667, 2.33333])
    assert_close(merge_tensor("task_arithmetic", [TA_X1, TA_X2], TA_BASE, {"lambda": 2}, weights(1, 0.5)), [3, 1, 0, 5])
    # weights summing to 0 with normalize: the divisor falls back to 1 (mergekit), no inf
    cancelled = merge_tensor("task_arithmetic", [TA_X1, TA_X2], TA_BASE, {"normalize": True}, weights(1, -1))
    assert_close(cancelled, TA_BASE + (TA_X1 - TA_BASE) - (TA_X2 - TA_BASE))


TIES_X1, TIES_X2, ZERO5 = vec(3, -1, 0.5, -2, 0.1), vec(-1, 2, 0.4, -3, 0.2), torch.zeros(5)


def test_ties_design_vectors():
    params = {"density": 0.6}
    assert_close(merge_tensor("ties", [TIES_X1, TIES_X2], ZERO5, params, weights(1, 1)), [3, 2, 0, -2.5, 0])
    summed = merge_tensor("ties", [TIES_X1, TIES_X2], ZERO5, {**params, "normalize": False}, weights(1, 1))
    assert_close(summed, [3, 2, 0, -5, 0])
    assert_close(merge_tensor("ties", [TIES_X1, TIES_X2], ZERO5, params, weights(1, 0.5)), [3, 2, 0, -2.33333, 0])
    shifted_base = vec(1, -1, 2, 0.5, 0)
    shifted_inputs = [TIES_X1 + shifted_base, TIES_X2 + shifted_base]
    shifted = merge_tensor("ties", shifted_inputs, shifted_base, params, weights(1, 1))
    assert_close(shifted, shifted_base + vec(3, 2, 0, -2.5, 0))


def test_ties_with_density_below_one_element_zeroes_the_task_vector():
    # floor(0.1 * 9) = 0: documented choice is "keep nothing" (mergekit asserts), so the base comes back
    base = torch.linspace(-1, 1, 9)
    x = base + torch.linspace(0.5, 2.5, 9)
    assert_close(merge_tensor("ties", [x], base, {"density": 0.1}, weights(1)), base)
    assert sparsify.count_from_fraction(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996 in floats


def test_magnitude_trim_and_rescale_modes():
    deltas = torch.stack([TIES_X1, TIES_X2])
    trimmed = sparsify.magnitude(deltas, [0.6, 0.4])
    assert_close(trimmed, [[3, -1, 0, -2, 0], [0, 2, 0, -3, 0]])
    l1 = sparsify.magnitude(deltas, [0.6, 1.0], "l1")
    assert_close(l1[0], vec(3, -1, 0, -2, 0) * (6.6 / 6.0))
    assert_close(l1[1], TIES_X2)  # density 1 untouched
    inverse = sparsify.magnitude(deltas, [0.6, 0.4], "inverse_p")
    assert_close(inverse, [[5, -5 / 3, 0, -10 / 3, 0], [0, 5, 0, -7.5, 0]])


@pytest.mark.parametrize("numpy_selection", [True, False], ids=["numpy", "bracket-radix"])
def test_kth_smallest_matches_kthvalue(numpy_selection, monkeypatch):
    monkeypatch.setattr(sparsify, "CPU_NUMPY_SELECTION", numpy_selection)
    generator = torch.Generator().manual_seed(5)
    # bf16 rounding creates many ties; exact zeros and a wide dynamic range stress the bucket search
    values = (torch.randn(70_000, generator=generator) * torch.logspace(-6, 1, 70_000)).bfloat16().float().abs()
    values[:500] = 0.0
    original = values.clone()
    for k in (1, 499, 500, 501, 12_345, 35_000, 69_999, 70_000):
        assert float(sparsify.kth_smallest(values, k)) == float(torch.kthvalue(values, k).values)
        assert float(sparsify._kth_smallest_radix(values, k)) == float(torch.kthvalue(values, k).values)
    assert torch.equal(values, original)  # a selection on a copy: the input keeps its order
    with pytest.raises(ValueError, match="out of range"):
        sparsify.kth_smallest(values, 0)


# --- breadcrumbs
CRUMBS = vec(0.5, -0.1, 0.9, 0.3, -1.0, 0.7, 0.2, -0.6, 0.8, 0.4)
CRUMBS_KEPT = vec(0.5, 0, 0.9, 0, 0, 0.7, 0, -0.6, 0.8, 0)


def test_breadcrumbs_removes_smallest_and_largest():
    assert sparsify.breadcrumbs_cut_counts(10, 0.5, 0.1) == (4, 1)
    assert sparsify.breadcrumbs_cut_counts(10, 0.95, 0.1) == (0, 1)
    assert sparsify.breadcrumbs_cut_counts(10, 0.95, 0.3) == (0, 1)  # top cut shrinks to fit density
    kept = sparsify.magnitude_outliers(CRUMBS.unsqueeze(0), [0.5], [0.1])[0]
    assert_close(kept, CRUMBS_KEPT)
    assert_close(sparsify.magnitude_outliers(CRUMBS.unsqueeze(0), [0.5], [0.1], "inverse_p")[0], CRUMBS_KEPT * 2)
    assert_close(sparsify.magnitude_outliers(CRUMBS.unsqueeze(0), [0.5], [0.1], "l1")[0], CRUMBS_KEPT * (5.5 / 3.5))
    merged = merge_tensor("breadcrumbs", [CRUMBS + 1], torch.ones(10), {"density": 0.5, "gamma": 0.1}, weights(2))
    assert_close(merged, 1 + 2 * CRUMBS_KEPT)


def test_breadcrumbs_empty_top_cut_intended_rule_and_mergekit_compat():
    # gamma * n = 0.5 -> no top cut: the intended rule keeps the 5 largest; mergekit's slice keeps nothing
    params = {"density": 0.5, "gamma": 0.05}
    intended = merge_tensor("breadcrumbs", [CRUMBS], torch.zeros(10), params, weights(1))
    assert_close(intended, vec(0, 0, 0.9, 0, -1.0, 0.7, 0, -0.6, 0.8, 0))
    compat = merge_tensor(
        "breadcrumbs", [CRUMBS], torch.zeros(10), {**params, "compat_breadcrumbs_empty_slice": True}, weights(1)
    )
    assert_close(compat, torch.zeros(10))


def test_breadcrumbs_ties_uses_sign_consensus_sum():
    other = -CRUMBS * 0.5  # opposite signs everywhere, smaller magnitudes
    params = {"density": 0.5, "gamma": 0.1}
    out = merge_tensor("breadcrumbs_ties", [CRUMBS, other], torch.zeros(10), params, weights(1, 1))
    other_kept = sparsify.magnitude_outliers(other.unsqueeze(0), [0.5], [0.1])[0]
    total = CRUMBS_KEPT + other_kept
    expected = torch.where(torch.sign(CRUMBS_KEPT) == torch.where(total >= 0, 1.0, -1.0), CRUMBS_KEPT, 0.0)
    expected += torch.where(torch.sign(other_kept) == torch.where(total >= 0, 1.0, -1.0), other_kept, 0.0)
    assert_close(out, expected)
    plain = merge_tensor("breadcrumbs", [CRUMBS, other], torch.zeros(10), params, weights(1, 1))
    assert_close(plain, total)
    assert not torch.allclose(out, plain)


# --- sce
def test_sce_closed_form():
    base = torch.zeros(4)
    x1, x2 = vec(1, 2, -1, 0), vec(3, -2, -1, 0)
    # energies 1.5 and 3.5 -> omega 0.3 / 0.7; elected signs [+,+,-,+]
    assert_close(merge_tensor("sce", [x1, x2], base, {}, [{}, {}]), [2.4, 2.0, -1.0, 0.0])
    # variances [1, 4, 0, 0]: select_topk 0.5 of the 2 non-zero positions keeps index 1 only
    assert_close(merge_tensor("sce", [x1, x2], base, {"select_topk": 0.5}, [{}, {}]), [0, 2, 0, 0])
    assert_close(merge_tensor("sce", [x1 + 1, x2 + 1], base + 1, {"select_topk": 0.0}, [{}, {}]), base + 1)
    # weights come from the selected task vectors: [4,0,0] and [1,0,0] give omega 16/17 and 1/17
    selected = merge_tensor("sce", [vec(4, 1, 0), vec(1, 3, 0)], torch.zeros(3), {"select_topk": 0.5}, [{}, {}])
    assert_close(selected, [65 / 17, 0, 0])
    # mergekit quirk: total energy < 1e-6 switches to uniform weights (0.5/0.5 instead of 0.3/0.7)
    tiny = merge_tensor("sce", [x1 * 1e-4, x2 * 1e-4], base, {}, [{}, {}])
    assert_close(tiny, vec(2.0, 2.0, -1.0, 0.0) * 1e-4, atol=1e-9)


# --- passthrough
def test_passthrough_scale():
    x = vec(1, -2, 3)
    assert_close(merge_tensor("passthrough", [x]), x)
    assert_close(merge_tensor("passthrough", [x], None, {}, [{"scale": -0.5}]), [-0.5, 1, -1.5])
    with pytest.raises(ValueError, match="exactly 1"):
        merge_tensor("passthrough", [x, x])


# --- fourier
ROWS_8x2 = torch.arange(8).unsqueeze(1).expand(8, 2)
COLS_8x2 = torch.arange(2).unsqueeze(0).expand(8, 2)
ALTERNATING_ROWS = (-1.0) ** ROWS_8x2
CHECKERBOARD = (-1.0) ** (ROWS_8x2 + COLS_8x2)


def test_fourier_reference_mask_8x2():
    mask = fourier_mask(8, 2, 0.9)
    expected = torch.zeros(8, 2)
    expected[3:6] = 1
    expected[4, 1] = 2
    assert torch.equal(mask, expected)
    clean = fourier_mask(8, 2, 0.9, "clean")
    assert torch.equal(clean, expected.clamp(max=1))


def test_fourier_filter_design_vectors():
    assert_close(fourier_high_pass(torch.ones(8, 2), 0.9), torch.zeros(8, 2))
    assert_close(fourier_high_pass(ALTERNATING_ROWS, 0.9), ALTERNATING_ROWS)
    assert_close(fourier_high_pass(CHECKERBOARD, 0.9), 2 * CHECKERBOARD)
    assert_close(fourier_high_pass(CHECKERBOARD, 0.9, "clean"), CHECKERBOARD)
    generator = torch.Generator().manual_seed(2)
    matrix = torch.randn(4, 4, generator=generator)
    nyquist = torch.fft.fft2(matrix.double())[2, 2].real / 16
    checkerboard_4x4 = (-1.0) ** (torch.arange(4).unsqueeze(1) + torch.arange(4).unsqueeze(0))
    assert_close(fourier_high_pass(matrix, 0.9) - matrix, float(nyquist) * checkerboard_4x4)


def test_fourier_ring_counts_on_square_matrices():
    # r_low = 4: 16 = 4^2 + 0^2 only -> 4 ring bins (like 5120^2); r_low = 5: 25 = 5^2 = 3^2 + 4^2 -> 12 (like 4096^2)
    for size, ring_bins in ((40, 4), (50, 12)):
        mask = fourier_mask(size, size, 0.9)
        assert int((mask == 2).sum()) == ring_bins
        assert int((mask == 0).sum()) == 0
        assert torch.equal(fourier_mask(size, size, 0.9, "clean"), torch.ones(size, size))
        # the clean mask is the identity on square matrices with ratio >= 1/sqrt(2)
        matrix = torch.randn(size, size)
        assert torch.equal(fourier_high_pass(matrix, 0.9, "clean"), matrix)


@pytest.mark.parametrize("shape", [(5, 7), (6, 9), (9, 4), (12, 30)])
def test_fourier_rfft_path_matches_real_part_of_full_complex_filter(shape):
    generator = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    matrices = torch.randn(3, *shape, generator=generator)
    for ratio in (0.3, 0.7):
        mask = fourier_mask(*shape, ratio).double()
        reference = torch.fft.ifft2(torch.fft.fft2(matrices.double()) * mask).real.float()
        assert_close(fourier_high_pass(matrices, ratio), reference, atol=1e-5)


def test_fourier_merge_design_vector():
    base = torch.zeros(8, 2)
    tau1, tau2 = 1 + ALTERNATING_ROWS, 0.5 - 0.5 * ALTERNATING_ROWS
    params = {"lambda": 1.1}
    out = merge_tensor("fourier", [tau1, tau2], base, params, weights(0.8, 0.8))
    assert_close(out, 0.88 * ALTERNATING_ROWS)
    # 1-D tensors are not filtered: the same data flattened gives the unfiltered control
    control = merge_tensor("fourier", [tau1.reshape(-1), tau2.reshape(-1)], base.reshape(-1), params, weights(0.8, 0.8))
    assert_close(control.reshape(8, 2), torch.where(ALTERNATING_ROWS > 0, 1.76, 0.88))
    # consensus none is the plain sum of the filtered vectors: 0.88*(-1)^i - 0.44*(-1)^i
    plain = merge_tensor("fourier", [tau1, tau2], base, {**params, "consensus": "none"}, weights(0.8, 0.8))
    assert_close(plain, 0.44 * ALTERNATING_ROWS)
    # normalize divides by the per-element agreeing weight (0.8)
    normalized = merge_tensor("fourier", [tau1, tau2], base, {**params, "normalize": True}, weights(0.8, 0.8))
    assert_close(normalized, 1.1 * ALTERNATING_ROWS)


# --- random: DARE / DELLA
def test_derived_generator_is_stable_and_keyed_on_seed_name_and_model():
    def draw(seed, name, index):
        return torch.rand(8, generator=sparsify.derive_generator(seed, name, index))

    assert torch.equal(draw(1, "a", 0), draw(1, "a", 0))
    assert not torch.equal(draw(1, "a", 0), draw(2, "a", 0))
    assert not torch.equal(draw(1, "a", 0), draw(1, "b", 0))
    assert not torch.equal(draw(1, "a", 0), draw(1, "a", 1))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_are_reproducible_and_independent_of_processing_order(method):
    generator = torch.Generator().manual_seed(11)
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]
    bases = {name: torch.randn(16, 32, generator=generator) for name in names}
    models = {name: [bases[name] + torch.randn(16, 32, generator=generator) for _ in range(2)] for name in names}
    params = {"density": 0.5, "epsilon": 0.2} if method.startswith("della") else {"density": 0.5}

    def run(order, seed, global_seed):
        torch.manual_seed(global_seed)  # the global RNG must not matter
        return {
            name: merge_tensor(method, models[name], bases[name], params, weights(1, 1), seed=seed, tensor_name=name)
            for name in order
        }

    forward = run(names, seed=42, global_seed=0)
    backward = run(list(reversed(names)), seed=42, global_seed=123)
    for name in names:
        assert torch.equal(forward[name], backward[name])
    other_seed = run(names, seed=43, global_seed=0)
    for name in names:
        assert not torch.equal((forward[name] - bases[name]) != 0, (other_seed[name] - bases[name]) != 0)


def test_dare_model_mask_does_not_depend_on_the_other_models():
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(50, generator=generator)
    first = base + torch.randn(50, generator=generator)
    second = base + torch.randn(50, generator=generator)
    params = {"density": 0.3, "rescale_mode": "none"}
    alone = merge_tensor("dare_linear", [first], base, params, weights(1), seed=9, tensor_name="t")
    together = merge_tensor("dare_linear", [first, second], base, params, weights(1, 0), seed=9, tensor_name="t")
    assert torch.equal(alone, together)
    # identical inputs at different model indices get different masks
    same = merge_tensor("dare_linear", [first, first], base, params, weights(1, -1), seed=9, tensor_name="t")
    assert not torch.equal(same, base)


def test_dare_keep_fraction_and_rescale_statistics():
    numel, density = 200_000, 0.3
    delta = torch.linspace(0.5, 1.5, numel)
    for index, seed in enumerate((0, 1)):
        kept = sparsify.bernoulli(
            delta.unsqueeze(0), [density], [sparsify.derive_generator(seed, "w", index)], "none"
        )[0]
        fraction = float((kept != 0).float().mean())
        sigma = math.sqrt(density * (1 - density) / numel)
        assert abs(fraction - density) < 4 * sigma
        assert torch.equal(kept[kept != 0], delta[kept != 0])  # "none" leaves kept entries untouched
    generators = [sparsify.derive_generator(5, "w", 0)]
    inverse = sparsify.bernoulli(delta.unsqueeze(0), [density], generators, "inverse_p")[0]
    kept_positions = inverse != 0
    torch.testing.assert_close(inverse[kept_positions], delta[kept_positions] / density)
    assert float(inverse.mean()) == pytest.approx(float(delta.mean()), rel=0.01)  # E[out] = delta
    l1 = sparsify.bernoulli(delta.unsqueeze(0), [density], [sparsify.derive_generator(5, "w", 0)], "l1")[0]
    assert float(l1.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-5)
    assert torch.equal(l1 != 0, inverse != 0)  # same generator, same mask


def test_dare_density_one_is_plain_task_arithmetic_and_ties():
    generator = torch.Generator().manual_seed(8)
    base = torch.randn(30, generator=generator)
    xs = [base + torch.randn(30, generator=generator) for _ in range(3)]
    w = weights(1, 0.5, -0.7)
    assert_close(
        merge_tensor("dare_linear", xs, base, {"lambda": 0.9}, w),
        merge_tensor("task_arithmetic", xs, base, {"lambda": 0.9}, w),
    )
    assert_close(
        merge_tensor("dare_ties", xs, base, {}, w), merge_tensor("ties", xs, base, {"normalize": False}, w)
    )
    assert_close(merge_tensor("della", xs, base, {}, w), merge_tensor("ties", xs, base, {}, w))


def test_della_keep_probabilities_design_vector_and_ranks_per_row():
    row = vec(0.1, -0.4, 0.2, 0.3)
    probabilities = sparsify.della_keep_probabilities(row.unsqueeze(0), [0.7], [0.07])[0]
    assert_close(probabilities, [0.63, 0.77, 0.67667, 0.72333])
    matrix = torch.stack([row, -row.flip(0)])  # ranks are computed within each row
    per_row = sparsify.della_keep_probabilities(matrix.unsqueeze(0), [0.7], [0.07])[0]
    assert_close(per_row, [[0.63, 0.77, 0.67667, 0.72333], [0.72333, 0.67667, 0.77, 0.63]])
    single = sparsify.della_keep_probabilities(torch.ones(1, 3, 1), [0.6], [0.1])[0]
    assert_close(single, torch.full((3, 1), 0.6))  # rows of length 1 use rho = 0.5
    untouched = sparsify.della_keep_probabilities(row.unsqueeze(0), [1.0], [0.07])[0]
    assert_close(untouched, torch.ones(4))
    # Equal magnitudes rank in index order, on every device alike: 600 x 0.1, then 600 x 0.2, then 1200 x 0.3.
    tied = torch.cat([vec(0.3, -0.1, -0.3, 0.2)] * 600).unsqueeze(0)  # long rows: the sort's fast paths differ
    ranks = (sparsify.della_keep_probabilities(tied, [0.7], [0.07])[0] - 0.63) / 0.14 * 2399
    assert torch.equal(ranks.round()[:8], torch.tensor([1200.0, 0, 1201, 600, 1202, 1, 1203, 601]))


def _argsort_ranks(values, dim):
    order = values.abs().argsort(dim=dim, stable=True)
    positions = torch.arange(values.shape[dim]).reshape([-1 if d == dim % values.dim() else 1
                                                           for d in range(values.dim())]).expand_as(order)
    return torch.empty_like(order).scatter_(dim, order, positions)


@pytest.mark.parametrize("shape,dim", [((1, 2400), 1), ((3, 40, 96), 2), ((3, 40, 96), 1), ((2, 5, 7, 9), 2),
                                       ((4, 1), 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_magnitude_ranks_equal_a_stable_argsort(shape, dim, dtype):
    generator = torch.Generator().manual_seed(11)
    values = (torch.randn(shape, generator=generator) * 4).round() / 4  # many ties, signed
    flat = values.view(-1)
    flat[:: 7] = 0.0
    flat[3:: 11] = -0.0
    flat[5:: 13] = float("inf")
    flat[6:: 17] = -float("inf")
    values = values.to(dtype)
    ranks = sparsify.magnitude_ranks(values, dim)
    assert ranks.dtype == torch.int64 and ranks.shape == values.shape
    assert torch.equal(ranks, _argsort_ranks(values, dim))


def test_della_mask_frequency_and_inverse_p_expectation():
    rows = 100_000
    matrix = vec(0.1, -0.4, 0.2, 0.3).repeat(rows, 1)
    expected_p = vec(0.63, 0.77, 0.67667, 0.72333)
    kept = sparsify.della_magprune(
        matrix.unsqueeze(0), [0.7], [0.07], [sparsify.derive_generator(3, "w", 0)], "none"
    )[0]
    frequency = (kept != 0).float().mean(dim=0)
    sigma = torch.sqrt(expected_p * (1 - expected_p) / rows)
    assert bool(((frequency - expected_p).abs() < 4 * sigma).all()), (frequency, expected_p)
    inverse = sparsify.della_magprune(
        matrix.unsqueeze(0), [0.7], [0.07], [sparsify.derive_generator(3, "w", 0)], "inverse_p"
    )[0]
    assert torch.equal(inverse != 0, kept != 0)
    torch.testing.assert_close(inverse.mean(dim=0), matrix[0], rtol=0.01, atol=0)
    l1 = sparsify.della_magprune(matrix.unsqueeze(0), [0.7], [0.07], [sparsify.derive_generator(3, "w", 0)], "l1")[0]
    assert float(l1.abs().sum()) == pytest.approx(float(matrix.abs().sum()), rel=1e-5)


def test_della_rejects_out_of_window_density_when_called_directly():
    with pytest.raises(ValueError, match="density - epsilon"):
        sparsify.della_magprune(torch.ones(1, 4), [0.1], [0.15], [sparsify.derive_generator(0, "w", 0)])


# --- the fused, chunked GTA pipeline against the stacked reference (the design note's pipeline, step by step)
def reference_gta(method: str, tensors, base, global_params, per_model_params, seed=0, name="w") -> torch.Tensor:
    """Stack the task vectors, sparsify them with the stacked sparsify.* functions, weight, elect and mix."""
    from auto_merge.merge.methods.gta_variants import GTA_VARIANTS

    variant = next(v for v in GTA_VARIANTS if v.name == method)
    params = validate_params(method, global_params, per_model_params)
    per_model, param = params.per_model, params.global_params.__getitem__
    deltas = torch.stack(tensors) - base
    generators = [sparsify.derive_generator(seed, name, i, base.device) for i in range(len(tensors))]
    if variant.sparsifier == "magnitude":
        deltas = sparsify.magnitude(deltas, per_model("density"), param("rescale_mode"))
    elif variant.sparsifier == "bernoulli":
        deltas = sparsify.bernoulli(deltas, per_model("density"), generators, param("rescale_mode"))
    elif variant.sparsifier == "magnitude_outliers":
        deltas = sparsify.magnitude_outliers(deltas, per_model("density"), per_model("gamma"),
                                             param("rescale_mode"), param("compat_breadcrumbs_empty_slice"))
    elif variant.sparsifier == "della_magprune":
        deltas = sparsify.della_magprune(deltas, per_model("density"), per_model("epsilon"), generators,
                                         param("rescale_mode"))
    column = torch.tensor(per_model("weight")).reshape(-1, *([1] * base.dim()))
    weighted = deltas * column
    if variant.consensus == "sum":
        elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
        agree = torch.sign(weighted) == elected
        mixed = torch.where(agree, weighted, 0.0).sum(dim=0)
        if param("normalize"):
            divisor = (agree * column).sum(dim=0)
            mixed = mixed / torch.where(divisor.abs() < 1e-8, 1.0, divisor)
    else:
        mixed = weighted.sum(dim=0)
        if param("normalize"):
            divisor = sum(per_model("weight"))
            mixed = mixed / (divisor if abs(divisor) >= 1e-8 else 1.0)
    return base + param("lambda") * mixed


def gta_inputs(shape, models=3, seed=0, repeats=False):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    experts = [base + 0.05 * torch.randn(shape, generator=generator) for _ in range(models)]
    if repeats:  # bf16-rounded deltas repeat magnitudes (ties at the cut-offs); some entries equal the base
        experts = [base + (e - base).bfloat16().float() for e in experts]
        for expert in experts:
            expert.view(-1)[::7] = base.view(-1)[::7]
    return experts, base


GTA_CASES = [
    ("task_arithmetic", {"lambda": 0.7}, [{"weight": w} for w in (1.0, 0.5, -0.3)]),
    ("task_arithmetic", {"normalize": True}, [{"weight": w} for w in (1.0, 0.5, -0.3)]),
    ("ties", {}, [{"weight": 1.0, "density": d} for d in (0.5, 0.3, 1.0)]),
    ("ties", {"normalize": False, "lambda": 1.3}, [{"weight": w, "density": 0.4} for w in (1.0, 0.7, 0.2)]),
    ("ties", {"rescale_mode": "l1"}, [{"weight": w, "density": 0.4} for w in (1.0, -1.0, 0.5)]),
    ("ties", {"rescale_mode": "inverse_p"}, [{"weight": 1.0, "density": d} for d in (0.2, 0.6, 0.9)]),
    ("dare_ties", {}, [{"weight": 1.0, "density": d} for d in (0.5, 0.3, 1.0)]),
    ("dare_ties", {"normalize": True, "rescale_mode": "inverse_p"}, [{"weight": 1.0, "density": 0.4}] * 3),
    ("dare_linear", {"rescale_mode": "none"}, [{"weight": w, "density": 0.6} for w in (0.5, 0.3, 0.2)]),
    ("dare_linear", {}, [{"weight": w, "density": 0.6} for w in (0.5, 0.3, 0.2)]),
    ("breadcrumbs", {}, [{"weight": 1.0, "density": 0.5, "gamma": g} for g in (0.01, 0.1, 0.0)]),
    ("breadcrumbs_ties", {"rescale_mode": "l1", "compat_breadcrumbs_empty_slice": True},
     [{"weight": 1.0, "density": 0.5, "gamma": g} for g in (0.01, 0.1, 0.0)]),
    ("della", {}, [{"weight": 1.0, "density": d, "epsilon": 0.1} for d in (0.5, 0.3, 1.0)]),
    ("della", {"rescale_mode": "inverse_p"}, [{"weight": 1.0, "density": 0.5}] * 3),
    ("della_linear", {"rescale_mode": "none"}, [{"weight": w, "density": 0.6} for w in (0.5, 0.3, 0.2)]),
    ("della_linear", {}, [{"weight": w, "density": 0.6} for w in (0.5, 0.3, 0.2)]),
]
# odd sizes, several CPU chunks with a ragged last one, 0-d, 1-D and 3-D tensors
GTA_SHAPES = [(), (7,), (1001,), (5, 3, 4), (300, 1000), (129, 2049)]


@pytest.mark.parametrize("method, global_params, per_model_params", GTA_CASES)
@pytest.mark.parametrize("shape", GTA_SHAPES, ids=str)
@pytest.mark.parametrize("repeats", [False, True], ids=["distinct", "ties"])
def test_fused_gta_pipeline_matches_the_stacked_reference(method, global_params, per_model_params, shape, repeats):
    experts, base = gta_inputs(shape, seed=len(shape), repeats=repeats)
    fused = merge_tensor(method, experts, base, global_params, per_model_params, seed=3, tensor_name="w")
    expected = reference_gta(method, experts, base, global_params, per_model_params, seed=3, name="w")
    if global_params.get("rescale_mode", "l1" if method.startswith(("dare", "della")) else "none") == "l1":
        # the L1 norms are summed in a different order: the factor may differ in its last bits
        torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6)
        assert (fused == expected).float().mean() > 0.5
    else:
        assert torch.equal(fused, expected)


TRIM_CASES = [case for case in GTA_CASES if case[0].startswith(("ties", "breadcrumbs"))
              and case[1].get("rescale_mode") != "l1"]


@pytest.mark.parametrize("method, global_params, per_model_params", TRIM_CASES)
@pytest.mark.parametrize("shape", [(300, 1000), (129, 2049)], ids=str)
def test_bracketed_selection_trims_as_numpys_selection(method, global_params, per_model_params, shape, monkeypatch):
    """The CPU selects thresholds with numpy; the bracketed search (what other devices run) trims identically."""
    experts, base = gta_inputs(shape, seed=9, repeats=True)
    expected = reference_gta(method, experts, base, global_params, per_model_params)
    monkeypatch.setattr(sparsify, "CPU_NUMPY_SELECTION", False)
    bracketed = sparsify.bracketed_order_statistics
    calls = []
    monkeypatch.setattr(sparsify, "bracketed_order_statistics", lambda *a: calls.append(1) or bracketed(*a))
    assert torch.equal(merge_tensor(method, experts, base, global_params, per_model_params), expected)
    assert calls  # the bracket path ran


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_fused_gta_pipeline_does_not_depend_on_the_thread_count(method):
    experts, base = gta_inputs((700, 1000), seed=9)
    per_model = [{"weight": 1.0, "density": 0.5}] * 3
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            results.append(merge_tensor(method, experts, base, {"rescale_mode": "l1"}, per_model, seed=1,
                                        tensor_name="w"))
        finally:
            torch.set_num_threads(1)
    assert torch.equal(results[0], results[1])


def test_fused_gta_pipeline_handles_empty_tensors_and_many_models():
    empty = torch.empty(0, 4)
    out = merge_tensor("ties", [empty, empty], empty, {}, [{"weight": 1.0, "density": 0.5}] * 2)
    assert out.shape == (0, 4)
    experts, base = gta_inputs((3001,), models=9, seed=4)
    per_model = [{"weight": 0.1 * (i + 1), "density": 0.5} for i in range(9)]
    fused = merge_tensor("ties", experts, base, {}, per_model)
    assert torch.equal(fused, reference_gta("ties", experts, base, {}, per_model))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_fused_trims_fall_back_to_the_exact_search_when_a_bracket_misses(method, monkeypatch):
    monkeypatch.setattr(sparsify, "CPU_NUMPY_SELECTION", False)  # the bracketed search, as on a GPU
    experts, base = gta_inputs((300, 1000), seed=2, repeats=True)
    per_model = [{"weight": 1.0, "density": 0.4, "gamma": 0.05}] * 3 if method == "breadcrumbs" else \
        [{"weight": 1.0, "density": 0.4}] * 3
    expected = reference_gta(method, experts, base, {}, per_model)
    monkeypatch.setattr(sparsify, "bracketed_order_statistics", lambda chunks, count, ks, sample: [None] * len(ks))
    assert torch.equal(merge_tensor(method, experts, base, {}, per_model), expected)


def test_bracketed_order_statistics_are_exact_or_report_a_miss():
    generator = torch.Generator().manual_seed(1)
    values = (torch.randn(200_000, generator=generator) * 0.01).bfloat16().float().abs()
    values[:50_000] = 0.0  # a run of equal values: answered by counting
    chunks = lambda: iter(values.split(30_001))
    ks = [1, 50_000, 50_001, 123_456, 200_000]
    found = sparsify.bracketed_order_statistics(chunks, values.numel(), ks, values[::7])
    assert found == [float(torch.kthvalue(values, k).values) for k in ks]
    # a sample that does not represent the values: a miss, never a wrong answer
    assert sparsify.bracketed_order_statistics(chunks, values.numel(), [150_000], torch.zeros(1000)) == [None]
