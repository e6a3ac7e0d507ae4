"""The fused GTA kernels (auto_merge.merge.fused_gta) against the registry's evaluation: the same result, bit for bit
where the reference's order of operations is the same, for the magnitude trims (both threshold paths, the fallbacks)
and for DARE and DELLA given the kernels' Philox masks.

They run on a CUDA GPU, or anywhere with Triton's interpreter (``TRITON_INTERPRET=1``, set here when there is no
GPU). Triton is not a dependency (a CPU install of torch does not bring it), so without it they are skipped; CI has
no Triton."""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from auto_merge.merge import fused_gta, sparsify  # noqa: E402
from auto_merge.merge.methods import merge_tensor  # noqa: E402
from auto_merge.merge.methods.apply import MergeInputs  # noqa: E402
from auto_merge.merge.methods.spec import validate_params  # noqa: E402
from auto_merge.merge.methods.task_arithmetic import finish_task_arithmetic  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = (96, 70)  # thresholds by one sort
LARGE = (400, 352)  # 140,800 elements: sampled bracket and gathering kernel
WEIGHTS = (1.0, 0.6, -0.3)


def models(shape, seed=1, zero_fraction=0.0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    experts = []
    for _ in WEIGHTS:
        delta = 0.05 * torch.randn(shape, generator=generator)
        if zero_fraction:
            delta[torch.rand(shape, generator=generator) < zero_fraction] = 0.0
        experts.append(base + delta)
    return base, experts


def per_model(**params):
    return [dict(weight=weight, **params) for weight in WEIGHTS]


def fused(method, base, tensors, global_params, per_model_params, **kwargs):
    params = validate_params(method, global_params, per_model_params)
    return fused_gta.gta_merge_fused(method, params, base.to(DEVICE), [t.to(DEVICE) for t in tensors], seed=3,
                                     tensor_name="w", **kwargs).cpu()


def assert_same(actual, expected):
    # Far below what one wrongly kept or dropped entry changes (~1e-3 here); bit-identical under the interpreter.
    assert torch.allclose(actual, expected, rtol=1e-6, atol=1e-7), (actual - expected).abs().max()


@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["sorted", "bracketed"])
@pytest.mark.parametrize("method,global_params,params", [
    ("ties", {"lambda": 0.9}, {"density": 0.3}),
    ("ties", {"normalize": False, "rescale_mode": "l1"}, {"density": 0.2}),
    ("breadcrumbs", {}, {"density": 0.8, "gamma": 0.05}),
    ("breadcrumbs_ties", {"rescale_mode": "inverse_p"}, {"density": 0.7, "gamma": 0.01}),
], ids=["ties", "ties-l1", "breadcrumbs", "breadcrumbs_ties"])
def test_trims_equal_the_registry_method(shape, method, global_params, params):
    base, experts = models(shape)
    expected = merge_tensor(method, experts, base, global_params, per_model(**params), seed=3, tensor_name="w")
    assert_same(fused(method, base, experts, global_params, per_model(**params)), expected)


def test_stored_task_vectors_and_output_dtype_and_scale():
    """``relative``: the models are given as task vectors (here bf16, as resident); the result goes into a bf16
    target, times output_scale."""
    base, experts = models(LARGE)
    deltas = [(expert - base).to(torch.bfloat16) for expert in experts]
    global_params, params = {"lambda": 0.8}, per_model(density=0.4)
    # TIES of the task vectors against a zero base is lambda * mixed; adding the base is the same sum.
    mixed = merge_tensor("ties", [d.float() for d in deltas], torch.zeros_like(base), global_params, params)
    expected = (base + mixed) * 1.5
    assert torch.equal(fused("ties", base, deltas, global_params, params, relative=True, output_scale=1.5), expected)
    out = torch.empty(LARGE, dtype=torch.bfloat16, device=DEVICE)
    result = fused("ties", base, deltas, global_params, params, relative=True, out=out, output_scale=1.5)
    assert result.dtype == torch.bfloat16
    if DEVICE == "cuda":
        assert torch.equal(result, expected.to(torch.bfloat16))
    else:  # the interpreter truncates to bf16 instead of rounding to nearest: within one bf16 step
        assert torch.allclose(result.float(), expected, rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("case", ["missed-bracket", "zero-runs", "extreme-densities", "tied-runs"])
def test_threshold_fallbacks_and_edge_cases(case, monkeypatch):
    base, experts = models(LARGE, zero_fraction=0.7 if case == "zero-runs" else 0.0)
    if case == "tied-runs":  # bf16 models: few distinct task-vector magnitudes, so the bracket ends on long runs
        base, experts = base.to(torch.bfloat16), [expert.to(torch.bfloat16) for expert in experts]
    params = per_model(density=0.5)
    if case == "extreme-densities":  # keep all; keep one entry; keep none (a tiny tensor: floor(density * n) = 0)
        params = [dict(weight=1.0, density=1.0), dict(weight=0.5, density=1 / 140800), dict(weight=0.2, density=0.9)]
    expected = merge_tensor("ties", experts, base, {}, params)
    if case == "missed-bracket":  # a bracket narrower than nothing: every query falls back to the exact search
        monkeypatch.setattr(sparsify, "_BRACKET_SIGMAS", -1000.0)
        monkeypatch.setattr(sparsify, "_RADIX_MIN_ELEMENTS", 1 << 40)  # the fallback's own search: no bracket
    exact_searches = []
    exact = sparsify.kth_smallest
    monkeypatch.setattr(sparsify, "kth_smallest", lambda *a: exact_searches.append(1) or exact(*a))
    assert_same(fused("ties", base, experts, {}, params), expected)
    # Runs of equal magnitudes on the bracket's ends are counted, not gathered: no whole-tensor search for them.
    assert len(exact_searches) == (3 if case == "missed-bracket" else 0)
    tiny_base, tiny = models((3, 3))
    tiny_params = per_model(density=0.1)
    assert_same(fused("ties", tiny_base, tiny, {}, tiny_params), merge_tensor("ties", tiny, tiny_base, {}, tiny_params))


@triton.jit
def philox_uniforms(out, seed, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + offsets, tl.rand(seed, offsets), mask=offsets < n)


def kernel_uniforms(shape, models=3, seed=3, name="w"):
    """The kernels' Philox uniforms for each model of a tensor, [models, *shape]."""
    numel = math.prod(shape)
    draws = []
    for index in range(models):
        uniforms = torch.empty(numel, device=DEVICE)
        philox_uniforms[(triton.cdiv(numel, 1024),)](uniforms, fused_gta.philox_seed(seed, name, index), numel,
                                                     BLOCK=1024)
        draws.append(uniforms.cpu().view(shape))
    return torch.stack(draws)


def kernel_keep_masks(shape, densities, seed=3, name="w"):
    keep = kernel_uniforms(shape, len(densities), seed, name) < torch.tensor(densities).view(-1, *[1] * len(shape))
    keep[torch.tensor(densities) >= 1] = True
    return keep


@pytest.mark.parametrize("method,global_params,densities", [
    ("dare_ties", {}, (0.4, 0.4, 0.4)),
    ("dare_linear", {"rescale_mode": "inverse_p"}, (0.4, 0.6, 0.9)),
    ("dare_ties", {"normalize": True, "rescale_mode": "none"}, (1.0, 0.3, 0.9)),
])
def test_dare_equals_the_pipeline_with_the_kernels_masks(method, global_params, densities):
    """Dropping by the Philox masks, rescaling as ``sparsify.rescale`` and mixing as the registry does gives the
    kernels' result (the L1 factor's norms are summed in other blocks: fp32 rounding)."""
    shape = (200, 300)
    base, experts = models(shape)
    params_list = [dict(weight=w, density=d) for w, d in zip(WEIGHTS, densities)]
    params = validate_params(method, global_params, params_list)
    deltas = torch.stack(experts) - base
    keep = kernel_keep_masks(shape, densities)
    assert abs(keep[1].float().mean() - densities[1]) < 0.01
    kept = sparsify.rescale(deltas, torch.where(keep, deltas, 0.0), params.global_params["rescale_mode"],
                            torch.tensor(densities).view(-1, 1, 1))
    consensus = "sum" if method.endswith("ties") else "none"
    expected = finish_task_arithmetic(MergeInputs(tuple(experts), base, params), kept, consensus)
    assert_same(fused(method, base, experts, global_params, params_list), expected)


@pytest.mark.parametrize("method,global_params,shape", [
    ("della", {}, (200, 300)),
    ("della_linear", {"rescale_mode": "inverse_p"}, (200, 300)),
    ("della", {"rescale_mode": "none"}, (4, 30, 50)),  # ranks along dim 1 of a 3-D tensor
    ("della_linear", {}, (3000,)),  # a 1-D tensor is one row
], ids=["della", "della_linear-inverse_p", "3d", "1d"])
def test_della_equals_the_pipeline_with_the_kernels_masks(method, global_params, shape):
    """The reference's keep probabilities (per-row ranks), the kernels' uniforms, the reference's rescale and mix."""
    base, experts = models(shape)
    densities, epsilons = (0.5, 0.6, 1.0), (0.2, 0.1, 0.1)
    params_list = [dict(weight=w, density=d, epsilon=e) for w, d, e in zip(WEIGHTS, densities, epsilons)]
    params = validate_params(method, global_params, params_list)
    deltas = torch.stack(experts) - base
    probability = sparsify.della_keep_probabilities(deltas, densities, epsilons).reshape(deltas.shape)
    keep = kernel_uniforms(shape) < probability
    keep[2] = True  # density 1: nothing dropped
    kept = sparsify.rescale(deltas, torch.where(keep, deltas, 0.0), params.global_params["rescale_mode"], probability)
    consensus = "sum" if method == "della" else "none"
    expected = finish_task_arithmetic(MergeInputs(tuple(experts), base, params), kept, consensus)
    assert_same(fused(method, base, experts, global_params, params_list), expected)


def test_dare_masks_depend_on_seed_and_tensor_name_not_on_shape_or_order():
    shape = (64, 50)
    first = kernel_keep_masks(shape, (0.5, 0.5, 0.5))
    assert torch.equal(first, kernel_keep_masks(shape, (0.5, 0.5, 0.5)))
    assert not torch.equal(first, kernel_keep_masks(shape, (0.5, 0.5, 0.5), seed=4))
    assert not torch.equal(first, kernel_keep_masks(shape, (0.5, 0.5, 0.5), name="v"))
    assert not torch.equal(first[0], first[1])  # each model its own stream
    # A flat index's draw is the same whatever the tensor's shape: masks do not depend on blocks or launch shape.
    assert torch.equal(kernel_keep_masks((50, 64), (0.5, 0.5, 0.5)).reshape(3, -1), first.reshape(3, -1))


KERNEL_ARGUMENT_TYPES = {
    # name -> non-constexpr argument types; pointers' element types as for bf16 task vectors over an fp32 base
    "bracket": ["*fp32", "*i64", "*bf16", "i32", "*i64", "*fp32", "*fp32", "*i32", "*fp32", "i32", "i32"],
    "norms": ["*fp32", "*i64", "*bf16", "i32", "*fp32", "*i64", "*fp32", "*fp32", "i32", "i32"],
    "mix": ["*fp32", "*i64", "*bf16", "*bf16", "i32", "*fp32", "*i64", "*fp32", "i32", "fp32", "fp32", "fp32",
            "fp32"],
}


COMPILE_SCRIPT = """
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from auto_merge.merge import _gta_kernels, fused_gta

types, capability = json.loads(sys.argv[1]), int(sys.argv[2])
first = {"COLUMNS": fused_gta._COLUMNS, "RELATIVE": True, "RANDOM": True, "RANKED": True, "DIVIDE_BY_P": True, "CONSENSUS": True,
         "NORMALIZE": True, "BLOCK": 2048, "TILES": 16}
second = {**first, "RELATIVE": False, "RANDOM": False, "RANKED": False, "DIVIDE_BY_P": False, "CONSENSUS": False,
          "TILES": 1}
found = {}
for name, argument_types, flags in [(n, t, f) for f in (first, second) for n, t in types.items()]:
    kernel = _gta_kernels.KERNELS[name]
    constants = {arg: flags[arg] for arg in kernel.arg_names if arg in flags}
    names = [arg for arg in kernel.arg_names if arg not in constants]
    assert len(names) == len(argument_types), name
    signature = {**dict(zip(names, argument_types)), **{arg: "constexpr" for arg in constants}}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", capability, 32), options=dict(fused_gta.LAUNCH_OPTIONS))
    entry = found.setdefault(name, {"cubin_bytes": [], "instructions": []})
    entry["cubin_bytes"].append(len(compiled.asm["cubin"]))
    entry["instructions"] = sorted(set(entry["instructions"]) | set(re.findall(r"\\b(div\\.[a-z0-9.]+|fma\\.[a-z0-9.]+)",
                                                                         compiled.asm["ptx"])))
print(json.dumps(found))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above compile and run the kernels")
@pytest.mark.parametrize("capability", [80, 90])
def test_kernels_compile_for_nvidia_gpus_without_contraction_or_approximate_division(capability):
    """Ahead-of-time compilation to machine code (ptxas included; no GPU needed) catches what the interpreter does
    not, and the PTX has IEEE divisions and no FMA, so GPU results round as the CPU's. (A subprocess: the kernels of
    this process are the interpreter's.)"""
    import json
    import subprocess
    import sys

    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(KERNEL_ARGUMENT_TYPES), str(capability)],
                          capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(found) == set(KERNEL_ARGUMENT_TYPES)
    for name, result in found.items():
        assert len(result["cubin_bytes"]) == 2 and min(result["cubin_bytes"]) > 0, name
        assert not [i for i in result["instructions"] if i.startswith("fma") or i == "div.full.f32"], (name, result)
    assert "div.rn.f32" in found["mix"]["instructions"]


def test_kernel_arguments_avoid_the_names_of_tritons_argument_binder():
    """Triton 3.6's generated binder keeps its dict of all arguments in a local called ``params``, which shadowed a
    kernel argument of that name on the GPU ("failed to specialize argument of type: dict"); the interpreter used on
    a CPU has no binder, so only this check catches it there."""
    from auto_merge.merge import _gta_kernels

    binder_locals = {"params", "options", "specialization"}
    for name, kernel in _gta_kernels.KERNELS.items():
        assert not binder_locals & set(kernel.arg_names), name


@pytest.mark.parametrize("tiles", [4, 16])
def test_bracket_programs_covering_several_blocks_count_and_gather_the_same(tiles, monkeypatch):
    """Large tensors run the bracket kernel with several blocks per program (one atomic per counter per program);
    here forced onto a small tensor whose last program is partly past its end, bf16 so the bracket ends on runs."""
    base, experts = models(LARGE)
    base, experts = base.to(torch.bfloat16), [expert.to(torch.bfloat16) for expert in experts]
    monkeypatch.setattr(fused_gta, "bracket_tiles", lambda numel: tiles)
    exact_searches = []
    exact = sparsify.kth_smallest
    monkeypatch.setattr(sparsify, "kth_smallest", lambda *a: exact_searches.append(1) or exact(*a))
    for method, params in [("ties", per_model(density=0.4)), ("breadcrumbs", per_model(density=0.8, gamma=0.05))]:
        assert_same(fused(method, base, experts, {}, params), merge_tensor(method, experts, base, {}, params))
    assert not exact_searches
