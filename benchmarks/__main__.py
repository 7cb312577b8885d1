"""`python -m benchmarks`: tinypeft against PyTorch eager (+ peft) on the same GPT-2, side by side.

Every contender lives in its own worker process (so no library's idle threads spin while another
computes) with the same thread count; the coordinator asks them for one training step each in turn,
round-robin, and reports the median of the timed steps after warm-up. A training step is forward +
backward + AdamW (lr 1e-4, no weight decay), float32, batches of random byte ids.

Sections: step times (full fine-tuning, LoRA r=8 on c_attn/c_proj/c_fc, prompt tuning NV=20) on two
configs; tinypeft against HIPS autograd differentiating the same forward; peak memory of a training
step (tracemalloc: every NumPy allocation, parameters included); achieved GFLOP/s against NumPy's own
sgemm; scaling with T, n_embd and LoRA rank. Writes a JSON file and prints markdown tables. Apart:
gpt2_124m, a LoRA step at gpt2's own shape (124M parameters, 50,257 tokens) with its step time and peak
memory beside PyTorch + PEFT (benchmarks/gpt2_124m.py).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="BLAS/torch threads for every contender (default 2)")
    p.add_argument("--steps", type=int, default=7, help="timed steps per contender (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--quick", action="store_true", help="tiny configs, one timed step: a smoke run for CI")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: tinypeft on cupy against torch on CUDA"
    )
    p.add_argument(
        "--sections",
        default="steps,autograd,memory,gflops,scaling,long,floor,profile",
        help="comma-separated subset of steps,autograd,memory,gflops,scaling,long,floor,profile, or gpt2_124m (not in "
        "the default: a LoRA fine-tune at gpt2's 124M shape, several minutes on 2 cores)",
    )
    p.add_argument("--out", default="benchmarks/results.json", help="where to write the JSON results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # thread counts must be fixed before numpy or torch is imported, here and in every worker
    # (TINYPEFT_THREADS: tinypeft's row blocks, which otherwise take every core, whatever --threads says)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TINYPEFT_THREADS"):
        os.environ[var] = str(args.threads)
    from .run import run_all

    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
