#!/usr/bin/env bash
# Wheels that the workplace's GPU machines lack for bench/gpu_checks.sh (their image has torch, transformers,
# safetensors, numpy, scipy, scikit-learn, pandas, pyarrow, pyyaml, pytest and triton, for Python 3.12, and no package
# index): pydantic and ConfigSpace for the merge benchmarks; lm-eval, SMAC, dask and their needs for the GPU search
# (bench/gpu_search.py). Run here, in the repository's root, once per checkout; .whl/ (about 19 MB) stays out of git
# and travels with `carry: [".whl"]` (a call carries at most 64 MiB with the working tree).
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    ConfigSpace==1.2.2 more-itertools==11.2.1 \
    lm-eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 nltk==3.10.4 \
    pytablewriter==1.2.1 dataproperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 \
    tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 defusedxml==0.7.1 \
    dask==2026.8.0 distributed==2026.8.0 dask-jobqueue==0.9.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 \
    tornado==6.6.1 zict==3.0.0 emcee==3.1.6
# Published as source only: built into wheels here (pure Python).
python3 -m pip wheel -q --no-deps -w .whl smac==2.4.1 pynisher==1.0.10 rouge-score==0.1.2 sqlitedict==2.1.0 \
    word2number==1.1
du -sh .whl
