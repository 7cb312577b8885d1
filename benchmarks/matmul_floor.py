"""`python -m benchmarks --sections floor`: NumPy's matrix products against PyTorch's on the shapes of a
step, the floor under every step-time ratio.

At n_embd 512 and above a training step is mostly matrix products (`--sections profile`: 78% of a
full step at the sgemm rate). NumPy calls its BLAS (OpenBLAS in the wheels), PyTorch its own (MKL on
x86 wheels). If the two BLAS libraries run the step's products at the same speed, no arrangement of the
rest of the step can put tinypeft's step below the share of the step that is not matmul in PyTorch's
own step; if one is faster, that bounds the ratio too. So this section times every product of a full
fine-tuning step of each config (forward x W, backward dy Wᵀ and xᵀ dy of the four projections and
the tied head) in both libraries, on the same threads, in alternating rounds, and reports the sums.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from typing import Any


def step_shapes(n_embd: int, tokens: int, vocab: int = 256) -> list[tuple[int, int, int]]:
    """(m, k, n) of every matrix product of one layer and of the head, forward and backward."""
    C, N = n_embd, tokens
    shapes = []
    for c_in, c_out in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C), (C, vocab)):
        shapes += [(N, c_in, c_out), (N, c_out, c_in), (c_in, N, c_out)]  # x W, dy Wᵀ, xᵀ dy
    return shapes


def _floor_worker(args_tuple: tuple, conn: Any) -> None:
    shapes, threads, reps = args_tuple
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    out = []
    with threadpool_limits(threads, user_api="blas"):
        for m, k, n in shapes:
            a = rng.standard_normal((m, k), dtype=np.float32)
            b = rng.standard_normal((k, n), dtype=np.float32)
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            times: dict[str, list[float]] = {"numpy": [], "torch": []}
            for _ in range(3):  # rounds alternating the libraries, so load hits both alike
                for lib, (x, y) in (("numpy", (a, b)), ("torch", (ta, tb))):
                    # a pause between libraries: each one's BLAS threads spin-wait a while after a
                    # call, and calls alternating one by one measured PyTorch at 75 against 200
                    # GFLOP/s alone (its threads waited for OpenBLAS's spinning ones)
                    time.sleep(0.05)
                    x @ y  # warm-up
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        x @ y
                        times[lib].append(time.perf_counter() - t0)
            out.append({"shape": (m, k, n), **{lib: statistics.median(t) for lib, t in times.items()}})
    conn.send(out)


def section_floor(args: Any, configs: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    reps = 3 if args.quick else 9
    results = {}
    print("\n### the matmul floor: a full step's matrix products, NumPy (OpenBLAS) against PyTorch\n")
    print("| config | products | NumPy (ms) | PyTorch (ms) | ratio | NumPy GFLOP/s | PyTorch GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for name, (n_layer, n_embd, _, T, B) in configs.items():
        shapes = step_shapes(n_embd, B * T)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_floor_worker, args=((shapes, args.threads, reps), child))
        proc.start()
        rows = parent.recv()
        proc.join()
        layers = [n_layer] * (len(shapes) - 3) + [1, 1, 1]  # the head runs once, each projection per layer
        flops = sum(2 * m * k * n * count for (m, k, n), count in zip(shapes, layers, strict=True))
        ours = sum(r["numpy"] * count for r, count in zip(rows, layers, strict=True))
        theirs = sum(r["torch"] * count for r, count in zip(rows, layers, strict=True))
        results[name] = {"products": rows, "numpy_s": ours, "torch_s": theirs, "ratio": ours / theirs, "flops": flops}
        print(
            f"| {name} | {sum(layers)} | {1e3 * ours:.1f} | {1e3 * theirs:.1f} | {ours / theirs:.2f} "
            f"| {flops / ours / 1e9:.0f} | {flops / theirs / 1e9:.0f} |"
        )
    return results
