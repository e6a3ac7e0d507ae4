#!/usr/bin/env bash
# Wheels that the workplace's GPU machines lack for bench/gpu_checks.sh (their image has torch, transformers,
# safetensors, numpy, scipy, pyyaml, pytest and triton, for Python 3.12, and no package index). Run here, in the
# repository's root, once per checkout; .whl/ stays out of git and travels with `carry: [".whl"]` (well under the
# 64 MiB a call carries).
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    ConfigSpace==1.2.2 more-itertools==11.2.1
du -sh .whl
