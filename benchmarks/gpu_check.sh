#!/usr/bin/env bash
# The GPU check, one prepared script (< 6 minutes, every step under its own timeout): on a machine with an
# NVIDIA GPU, with cupy and the test dependencies installed (pip install -e '.[test,gpu]'), run
#   1. the cupy-against-numpy tests (every method, float64 and float32, plus a short training run): the
#      numpy side is the one the gradient and PEFT cross-checks prove, so agreement carries those over;
#   2. the step-time benchmark, tinypeft on cupy against PyTorch CUDA eager (+ peft).
# and leave everything it printed in gpu_check.log (or $OUT/gpu_check.log where OUT is set) and the
# benchmark's JSON in benchmarks/results-gpu.json.
#
# Why every step has a timeout and its own line: on 2026-11-28 the first run on a rented H200 printed
# nvidia-smi's line and then nothing for 7 minutes (the import of cupy and torch in one `python -c`, under
# `exec > >(tee ...)`), and the lease ran out with no result. Each import is now its own timed step, so a
# hang names itself and the rest still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
LOG=${OUT:-.}/gpu_check.log
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
step() {  # step SECONDS DESCRIPTION COMMAND...: run with a timeout, log its output and its exit status
    local seconds=$1 what=$2
    shift 2
    echo "== $(date -u +%T) $what (limit ${seconds}s)" | tee -a "$LOG"
    timeout "$seconds" "$@" 2>&1 | tee -a "$LOG"
    echo "== $what: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}
step 20 "the GPU" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step 60 "import numpy" "$PY" -c "import numpy; print('numpy', numpy.__version__)"
step 90 "import cupy, one kernel" "$PY" -c "import cupy; print('cupy', cupy.__version__, int(cupy.arange(10).sum()))"
step 90 "import torch, CUDA" "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
step 150 "cupy tests" "$PY" -m pytest -q -p no:cacheprovider tests/model/test_cupy.py
step 150 "step benchmark" "$PY" -m benchmarks --device cuda --sections steps --steps 10 --warmup 3 \
    --out benchmarks/results-gpu.json
