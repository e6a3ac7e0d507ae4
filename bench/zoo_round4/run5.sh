#!/bin/bash
# sequential: one process at a time, nice 19, 1 thread. usage: run5.sh CFG seed:variant ...
cd "$(dirname "$0")" && mkdir -p r4
cfg=$1; shift
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for job in "$@"; do
  seed=${job%:*}; var=${job#*:}
  if [ "$var" = default ]; then export ATEN_CPU_CAPABILITY=default; else unset ATEN_CPU_CAPABILITY; fi
  nice -n 19 ../../.venv/bin/python run5.py $cfg $seed 2>&1 | grep --line-buffered -v Warning > r4/${cfg}_s${seed}_${var}.log
done
