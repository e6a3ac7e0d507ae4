"""The GPU paths (run where CUDA is available; CI machines have none, so these are skipped there): the fused
one-pass linear combinations and the GPU methods agree with the CPU evaluation."""

from __future__ import annotations

import pytest
import torch

from auto_merge.merge.fused import combine_into
from auto_merge.merge.methods import merge_tensor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("terms", [1, 3, 6, 9])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_combination_equals_the_torch_sum(terms, out_dtype):
    generator = torch.Generator(device="cuda").manual_seed(terms)
    shape = (1000, 77)  # not a multiple of the kernel's block
    tensors = [torch.randn(shape, device="cuda", generator=generator).to(torch.bfloat16 if k % 2 else torch.float32)
               for k in range(terms)]
    coefficients = [0.5 - 0.3 * k for k in range(terms)]
    expected = sum(t.double() * c for t, c in zip(tensors, coefficients))
    out = torch.empty(shape, device="cuda", dtype=out_dtype)
    combine_into(out, list(zip(tensors, coefficients)))
    tolerance = 1e-5 if out_dtype == torch.float32 else 1e-2
    assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance)


def test_gpu_task_arithmetic_combination_equals_the_cpu():
    """A relative (task-arithmetic) combination goes through the kernel in its expanded form; it agrees with the
    CPU's chunked evaluation up to fp32 rounding."""
    from auto_merge.merge.fused import LinearForm, combination

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1000, 77, generator=generator)
    experts = [base + 0.05 * torch.randn(1000, 77, generator=generator) for _ in range(3)]
    form = LinearForm((0.7, -0.2, 1.1), base_coefficient=1.0)
    cpu = torch.empty_like(base)
    combine_into(cpu, combination(form, (base, None), [(x, None) for x in experts]))
    gpu = torch.empty_like(base, device="cuda")
    combine_into(gpu, combination(form, (base.cuda(), None), [(x.cuda(), None) for x in experts]))
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.3}),
    ("dare_ties", {"density": 0.5}),
    ("della", {"density": 0.5}),
    ("breadcrumbs", {"density": 0.8}),
])
def test_gpu_methods_agree_with_the_cpu(method, params):
    """Deterministic methods give the CPU's result; random ones the same statistics (CUDA generators differ)."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(512, 384, generator=generator)
    experts = [base + 0.05 * torch.randn(512, 384, generator=generator) for _ in range(3)]
    per_model = [{"weight": 1.0, **params}] * 3
    cpu = merge_tensor(method, experts, base, {"lambda": 0.9}, per_model, seed=1, tensor_name="w")
    gpu = merge_tensor(method, [e.cuda() for e in experts], base.cuda(), {"lambda": 0.9}, per_model, seed=1,
                       tensor_name="w").cpu()
    if method in ("ties", "breadcrumbs"):
        assert torch.allclose(gpu, cpu, rtol=1e-5, atol=1e-6)
    else:
        assert abs((gpu - base).abs().mean() / (cpu - base).abs().mean() - 1) < 0.05


GTA_RECIPE = {
    "base_model": "zoo:base",
    "parameters": {"weight": 1.0, "density": 0.5},
    "slices": [
        {"sources": [{"model": m, "layer_range": [0, 4]} for m in ("zoo:num", "zoo:wrd", "zoo:col")],
         "merge_method": "ties", "parameters": {"lambda": 0.9}},
        {"sources": [{"model": m, "layer_range": [4, 8]} for m in ("zoo:num", "zoo:wrd", "zoo:col")],
         "merge_method": "dare_ties", "parameters": {"density": 0.4}},
    ],
    "merge_method": "ties",
    "dtype": "float32",
}


def test_gpu_gta_recipes_run_through_the_fused_kernels(monkeypatch, tmp_path):
    """On CUDA every TIES / DARE-TIES tensor goes through the fused kernels, in the live path (fp32 weights or bf16
    task vectors) and the streaming engine alike: fp32 TIES equals the CPU, and both GPU paths give the same DARE
    masks (Philox), so their checkpoints are bit-identical."""
    from transformers import AutoModelForCausalLM

    from auto_merge.merge import fused_gta
    from auto_merge.merge.engine import run_recipe
    from auto_merge.merge.live import LiveMerger
    from auto_merge.merge.recipe import parse_recipe
    from auto_merge.zoo import zoo_root

    pytest.importorskip("triton")
    zoo = zoo_root(0)
    calls = []
    fused = fused_gta.gta_merge_fused
    monkeypatch.setattr(fused_gta, "gta_merge_fused", lambda *a, **k: calls.append(a[0]) or fused(*a, **k))
    recipe = parse_recipe(GTA_RECIPE)

    cpu_model = AutoModelForCausalLM.from_pretrained(zoo / "base").eval()
    LiveMerger(cpu_model, device="cpu").apply(recipe, seed=2)
    assert not calls
    gpu_model = AutoModelForCausalLM.from_pretrained(zoo / "base").eval().cuda()
    merger = LiveMerger(gpu_model, device="cuda")
    plan = merger.compile(recipe)
    merger.apply(plan, seed=2)
    merged_tasks = [task for task in plan.tasks if task.method in ("ties", "dare_ties")]
    assert sorted(calls) == sorted(task.method for task in merged_tasks)
    cpu_state, gpu_state = cpu_model.state_dict(), {k: v.cpu() for k, v in gpu_model.state_dict().items()}
    for task in merged_tasks:
        if task.method == "ties":
            assert torch.allclose(gpu_state[task.name], cpu_state[task.name], rtol=1e-6, atol=1e-7), task.name

    calls.clear()
    written = run_recipe(recipe, tmp_path / "out", seed=2, device="cuda").out_dir
    assert len(calls) == len(merged_tasks)
    streamed = AutoModelForCausalLM.from_pretrained(written).state_dict()
    for task in merged_tasks:
        assert torch.equal(streamed[task.name], gpu_state[task.name]), task.name

    compact_model = AutoModelForCausalLM.from_pretrained(zoo / "base").eval().cuda()
    calls.clear()
    LiveMerger(compact_model, device="cuda", dtype=torch.bfloat16).apply(recipe, seed=2)
    assert len(calls) == len(merged_tasks)  # bf16 task vectors read as stored
    compact_state = compact_model.state_dict()
    base_state = AutoModelForCausalLM.from_pretrained(zoo / "base").state_dict()
    for task in merged_tasks:
        if task.method == "ties":  # bf16 rounding of the task vectors flips a few trimmed entries at most
            difference = (compact_state[task.name].cpu() - cpu_state[task.name]).norm()
            assert difference <= 0.1 * (cpu_state[task.name] - base_state[task.name]).norm(), task.name

    calls.clear()
    monkeypatch.setenv(fused_gta.DISABLE_VARIABLE, "0")  # opting out: the generic path
    LiveMerger(compact_model, device="cuda").apply(recipe, seed=2)
    assert not calls
