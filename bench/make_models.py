"""Benchmark models: a Llama base and 3 "experts" (base + small seeded random deltas), deterministic, cached.

    .venv/bin/python bench/make_models.py [--config 170m] [--seed 0] [--root ~/.cache/auto-merge/bench-models]

Writes ROOT/<config>-seed<seed>/{base,expert1,expert2,expert3}/ (config.json + model.safetensors, fp32) and skips
the work when the folder is already complete (a `.complete` stamp holding the spec). No tokenizer is written: both
engines are run without copying one.

Weights are generated directly (not through `transformers`' initialisers, so that they do not change with its
version): matrices ~ N(0, 0.02²), norm weights 1. Expert e's tensor is θ + δ with δ = g · 0.05 · ‖θ‖ / ‖g‖,
g ~ N(0, 1) from a generator seeded by (seed, e, tensor index), so |δ|/|θ| = 0.05 per tensor and different per
expert. :func:`synthetic_state` gives the same tensors in memory on any device and dtype (the GPU benchmark of
`bench/materialise.py` uses it for the 7B shape, which is not written to disk).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

DEFAULT_ROOT = Path(os.environ.get("AUTO_MERGE_BENCH_MODELS", "~/.cache/auto-merge/bench-models")).expanduser()
EXPERTS = ("expert1", "expert2", "expert3")
DELTA_RATIO = 0.05
INIT_STD = 0.02

# Llama shapes. "170m": 169.5M parameters (untied head, 16 layers so that LFS groups of 2 divide the depth),
# about 678 MB per model in fp32.
CONFIGS: dict[str, dict] = {
    "170m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2240, num_hidden_layers=16,
                 num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
}
COMMON = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=INIT_STD)


def hf_config(name: str) -> dict:
    return {**COMMON, **CONFIGS[name]}


def tensor_shapes(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """LlamaForCausalLM's parameter names and shapes, in a fixed order (embeddings, layers, norm, head)."""
    c = CONFIGS[name]
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    head_dim = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    shapes = [("model.embed_tokens.weight", (v, h))]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return shapes


def n_params(name: str) -> int:
    total = 0
    for _, shape in tensor_shapes(name):
        count = 1
        for d in shape:
            count *= d
        total += count
    return total


def _generator(device: torch.device, *key: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(hashlib.sha256(repr(key).encode()).hexdigest()[:15], 16))
    return gen


def base_tensor(name: str, shape, index: int, seed: int, device) -> torch.Tensor:
    device = torch.device(device)
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.float32, device=device)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    return out.normal_(0.0, INIT_STD, generator=_generator(device, seed, 0, index))


def expert_delta(theta: torch.Tensor, index: int, seed: int, expert: int) -> torch.Tensor:
    g = torch.empty_like(theta).normal_(0.0, 1.0, generator=_generator(theta.device, seed, expert, index))
    g.mul_(DELTA_RATIO * theta.norm() / g.norm())
    return g


def synthetic_state(config: str, seed: int = 0, *, expert: int = 0, device="cpu",
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One model's tensors (expert 0 = the base), generated in fp32 on `device`, then cast to `dtype`."""
    state = {}
    for index, (name, shape) in enumerate(tensor_shapes(config)):
        theta = base_tensor(name, shape, index, seed, device)
        if expert:
            theta.add_(expert_delta(theta, index, seed, expert))
        state[name] = theta.to(dtype)
    return state


def model_dir(config: str = "170m", seed: int = 0, root: Path = DEFAULT_ROOT) -> Path:
    return Path(root).expanduser() / f"{config}-seed{seed}"


def _spec(config: str, seed: int) -> str:
    return json.dumps({"config": hf_config(config), "seed": seed, "delta_ratio": DELTA_RATIO, "std": INIT_STD,
                       "version": 2}, sort_keys=True)


def ensure_models(config: str = "170m", seed: int = 0, root: Path = DEFAULT_ROOT, *, verbose: bool = True) -> Path:
    """Build (once) and return the folder holding base/ and expert1..3/."""
    from safetensors.torch import save_file

    folder = model_dir(config, seed, root)
    stamp = folder / ".complete"
    if stamp.exists() and stamp.read_text() == _spec(config, seed):
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    staging = folder.with_name(folder.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    cfg = {**hf_config(config), "dtype": "float32", "use_cache": True}
    shapes = tensor_shapes(config)
    if verbose:
        print(f"building {config} models ({n_params(config) / 1e6:.1f}M params each) in {folder}", flush=True)
    for expert, sub in enumerate(("base",) + EXPERTS):
        out = staging / sub
        out.mkdir()
        state = {}
        for index, (name, shape) in enumerate(shapes):
            theta = base_tensor(name, shape, index, seed, "cpu")
            if expert:
                theta.add_(expert_delta(theta, index, seed, expert))
            state[name] = theta
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        del state
        if verbose:
            print(f"  wrote {sub}", flush=True)
    staging.rename(folder)
    stamp.write_text(_spec(config, seed))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("170m", "tiny"), default="170m",
                        help="7b is generated in memory only (synthetic_state): on disk it would take 108 GB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    args = parser.parse_args()
    print(ensure_models(args.config, args.seed, args.root))


if __name__ == "__main__":
    main()
