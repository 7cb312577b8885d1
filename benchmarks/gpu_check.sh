#!/usr/bin/env bash
# The GPU check, one prepared script (< 5 minutes): on a machine with an NVIDIA GPU, with cupy and the
# test dependencies installed (pip install -e '.[test,gpu]'), run
#   1. the cupy-against-numpy tests (every method, float64 and float32, plus a short training run): the
#      numpy side is the one the gradient and PEFT cross-checks prove, so agreement carries those over;
#   2. the step-time benchmark, tinypeft on cupy against PyTorch CUDA eager (+ peft).
# and leave everything it printed in gpu_check.log and the benchmark's JSON in benchmarks/results-gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
exec > >(tee gpu_check.log) 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv
python -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
timeout 120 python -m pytest -q tests/model/test_cupy.py
timeout 150 python -m benchmarks --device cuda --sections steps --steps 10 --warmup 3 --out benchmarks/results-gpu.json
