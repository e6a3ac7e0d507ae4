#!/usr/bin/env bash
# Every GPU figure issue 14 asks for, in one run that fits a short GPU slot (about 7 minutes on an H200):
#   1. the CUDA tests (fused TIES/DARE/DELLA kernels, the streamed memory-plan path on the GPU);
#   2. bench/materialise.py at the Llama-2-7B shape, bf16 (goal: <= 250 ms per TIES/DARE/DELLA candidate), then one
#      profiled candidate per GTA method;
#   3. bench/gpu_search.py: the demo LFS search with its merges and evaluations on the GPU;
#   4. bench/memory_plan_13b.py: the 13B x (base + 3 experts) plan's candidate time on the GPU;
#   5. bench/vllm_backend.py (vLLM against transformers), only where vllm imports.
# Each step has its own time limit, and its log and JSON go to $OUT (default bench/results/gpu), so a step that
# fails or runs out of time leaves the others' figures. With wheels carried in .whl/ (bench/gpu_wheels.sh), they are
# installed first. `bench/gpu_checks.sh --cpu-check` runs every step at tiny sizes on the CPU, to check the script.
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, say how it ended
    local name=$1 limit=$2; shift 2
    local started=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status after $((SECONDS - started)) s (log: $OUT/$name.log)" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
}
: > "$OUT/summary.txt"
if [ "${1:-}" = "--cpu-check" ]; then
    step tests 300 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_memory_plan.py -x
    step materialise 300 $PY bench/materialise.py --config tiny --candidates 2 --methods linear ties --paths recipe \
        --json "$OUT/materialise.json"
    step profile 300 $PY bench/materialise.py --config tiny --candidates 1 --methods ties --paths recipe --profile
    step search 300 $PY bench/gpu_search.py --device cpu --trials 4 --out /tmp/gpu-search --json "$OUT/search.json"
    step plan13b 300 $PY bench/memory_plan_13b.py --shape tiny --candidates 1 --json "$OUT/plan13b.json"
    step vllm 300 $PY bench/vllm_backend.py --shape tiny --cpu-check --examples 8 --max-gen-toks 16 --trials 1 \
        --json "$OUT/vllm.json"
    exit 0
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())" \
    | tee -a "$OUT/summary.txt" || exit 1
# The versions this run used (the image's and the carried wheels'), for reading its figures later.
$PY -m pip list 2>/dev/null | grep -i -E "^(torch|triton|transformers|huggingface.hub|tokenizers|datasets|pyarrow|numpy|lm.eval|smac|dask) " \
    | tee -a "$OUT/summary.txt"
step tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_memory_plan.py tests/test_fused_gta.py
step materialise 200 $PY bench/materialise.py --device cuda --candidates 3 --paths recipe --json "$OUT/materialise.json"
# Where the GTA methods' time goes (torch.profiler: kernels by GPU time, host calls by CPU time).
step profile 150 $PY bench/materialise.py --device cuda --candidates 1 --paths recipe --methods ties dare_ties della \
    --profile
# The demo LFS search with merges and evaluation on the GPU (lm-eval, SMAC and dask come from .whl).
step search 240 $PY bench/gpu_search.py --device cuda --out /tmp/gpu-search --json "$OUT/search.json"
step plan13b 180 $PY bench/memory_plan_13b.py --candidates 2 --json "$OUT/plan13b.json"
if $PY -c "import vllm" >/dev/null 2>&1; then
    step vllm 300 $PY bench/vllm_backend.py --shape 7b --json "$OUT/vllm.json"
else
    echo "vllm: not installed here; bench/vllm_backend.py not run" | tee -a "$OUT/summary.txt"
fi
