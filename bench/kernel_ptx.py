"""Static instruction counts of the fused GTA mixing kernel, compiled ahead of time for a GPU (no GPU needed).

    .venv/bin/python bench/kernel_ptx.py [--capability 90]

Compiles `auto_merge/merge/_gta_kernels.py`'s mixing kernel for the flag sets of DARE-TIES, TIES, DELLA and DARE
(linear) with Triton (ptxas included) and prints, per method, the PTX instructions, the `mul.hi` instructions (almost
all from Philox rounds), the global loads and the IEEE divisions. The loop over models is one PTX loop, so the counts
are per kernel, not per model: a proxy for the work per element, to compare kernel changes on a machine without a
GPU. Time on a GPU with `bench/materialise.py --device cuda`.
"""

from __future__ import annotations

import argparse
import os
import re

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

# Non-constexpr argument types of mix_kernel: fp32 base, bf16 task vectors and output.
MIX_TYPES = ["*fp32", "*i64", "*bf16", "*bf16", "i32", "*fp32", "*i64", "*fp32", "i32", "fp32", "fp32", "fp32",
             "fp32"]
FLAGS = {
    "dare_ties": dict(RELATIVE=True, RANDOM=True, RANKED=False, DIVIDE_BY_P=False, CONSENSUS=True, NORMALIZE=False),
    "ties": dict(RELATIVE=True, RANDOM=False, RANKED=False, DIVIDE_BY_P=False, CONSENSUS=True, NORMALIZE=True),
    "della": dict(RELATIVE=True, RANDOM=True, RANKED=True, DIVIDE_BY_P=False, CONSENSUS=True, NORMALIZE=False),
    "dare_linear": dict(RELATIVE=True, RANDOM=True, RANKED=False, DIVIDE_BY_P=False, CONSENSUS=False,
                        NORMALIZE=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", type=int, default=90, help="compute capability (90 = Hopper, 80 = Ampere)")
    args = parser.parse_args()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from auto_merge.merge import _gta_kernels, fused_gta

    kernel = _gta_kernels.KERNELS["mix"]
    print(f"mix_kernel for sm_{args.capability}, BLOCK {fused_gta.BLOCK}:")
    print(f"{'method':<12} {'PTX instructions':>17} {'mul.hi':>7} {'ld.global':>10} {'div.rn':>7}")
    for method, flags in FLAGS.items():
        flags = {"COLUMNS": fused_gta._COLUMNS, "BLOCK": fused_gta.BLOCK, **flags}
        constants = {name: flags[name] for name in kernel.arg_names if name in flags}
        names = [name for name in kernel.arg_names if name not in constants]
        signature = {**dict(zip(names, MIX_TYPES)), **{name: "constexpr" for name in constants}}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", args.capability, 32),
                                  options=dict(fused_gta.LAUNCH_OPTIONS))
        ptx = compiled.asm["ptx"]
        instructions = [line for line in ptx.splitlines()
                        if re.match(r"\s+[a-z]", line) and not line.strip().startswith(("//", "."))]
        print(f"{method:<12} {len(instructions):>17} {len(re.findall(r'mul.hi', ptx)):>7} "
              f"{len(re.findall(r'ld.global', ptx)):>10} {len(re.findall(r'div.rn', ptx)):>7}")


if __name__ == "__main__":
    main()
