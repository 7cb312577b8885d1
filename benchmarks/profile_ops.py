"""`python -m benchmarks --sections profile`: where a full fine-tuning step's time goes, by op, against
what its matrix products would take at NumPy's own sgemm rate.

One thread, the whole batch as one row block (so that the profiler, which sees one thread, sees all
of it), config B (4 layers, n_embd 512, 8 heads, T 128, B 8), float32: forward, backward and AdamW,
profiled over a few steps with cProfile and grouped by the function the time is spent in. The
matmul-bound floor is the step's matmul FLOPs (`run.train_step_flops`) at the single-thread sgemm
rate measured in the same process; the rest of the table says where the time above it goes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

from .run import Setup, build_step, train_step_flops

# which group a function's own time belongs to: the first group whose module and name match
GROUPS = (
    ("linear layers (x W, dy Wᵀ, xᵀ dy)", ("ops.py", ("linear_forward", "linear_backward"))),
    ("LoRA sites", ("lora.py", ())),
    ("attention", ("attention_blocks.py", ())),
    ("attention (reference)", ("ops.py", ("attention_forward", "attention_backward", "softmax"))),
    ("GELU", ("ops.py", ("gelu_tanh_forward", "gelu_tanh_backward"))),
    ("LayerNorm", ("ops.py", ("layernorm_forward", "layernorm_backward"))),
    ("head and loss", ("gpt.py", ("head_backward", "forward"))),
    ("head and loss", ("ops.py", ("cross_entropy_forward", "cross_entropy_backward", "causal_lm_loss"))),
    ("AdamW", ("optim.py", ())),
    ("embeddings", ("ops.py", ("embedding_forward", "embedding_backward"))),
)
CONFIG_B = (4, 512, 8, 128, 8)
# Until the heap has reached its peak, a step's new temporaries fault their pages in, and the largest of
# them (GELU's, 4 n_embd wide) took the blame: with one warm-up step GELU read 91 ms (9%) of a step, with
# three 42 ms (4%), what timing its calls alone gives
WARMUP_STEPS = 3


def group_of(filename: str, function: str) -> str:
    for label, (module, names) in GROUPS:
        if filename.endswith(module) and (not names or function.startswith(names)):
            return label
    return "other (NumPy reductions and copies outside the ops, Python)"


def _profile_worker(config: tuple[int, ...], steps: int, conn: Any) -> None:
    import cProfile
    import pstats

    import numpy as np
    from threadpoolctl import threadpool_limits

    from tinypeft import runtime

    os.environ[runtime.THREADS_ENV] = "1"  # one row block and AdamW whole: the profiler sees one thread
    n_layer, n_embd, n_head, T, B = config
    with threadpool_limits(1):
        a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
        a @ a
        t0 = time.perf_counter()
        for _ in range(3):
            a @ a
        sgemm = 3 * 2 * 2048**3 / (time.perf_counter() - t0)
        step = build_step(Setup("tinypeft", "full", n_layer, n_embd, n_head, T, B, threads=1))
        for _ in range(WARMUP_STEPS):
            step()
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        for _ in range(steps):
            step()
        profiler.disable()
        seconds = (time.perf_counter() - t0) / steps
    groups: dict[str, float] = {}
    for (filename, _, function), (_, _, own, _, _) in pstats.Stats(profiler).stats.items():
        label = group_of(filename, function)
        groups[label] = groups.get(label, 0.0) + own / steps
    conn.send({"step_s": seconds, "sgemm_flops": sgemm, "groups_s": groups})


def section_profile(args: Any) -> dict[str, Any]:
    config = (1, 32, 2, 16, 2) if args.quick else CONFIG_B
    steps = 1 if args.quick else 3
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_profile_worker, args=(config, steps, child))
    proc.start()
    out = parent.recv()
    proc.join()
    n_layer, n_embd, _, T, B = config
    floor = train_step_flops(n_layer, n_embd, T, B) / out["sgemm_flops"]
    step = out["step_s"]
    print(f"\n### where a full fine-tuning step goes, by op (1 thread, n_embd {n_embd}, T {T}, B {B})\n")
    print(f"step {1e3 * step:.0f} ms; its matmuls at the sgemm rate: {1e3 * floor:.0f} ms ({floor / step:.0%})\n")
    print("| op | ms | share |\n|---|---|---|")
    for label, seconds in sorted(out["groups_s"].items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {1e3 * seconds:.1f} | {seconds / step:.0%} |")
    return {"config": dict(zip(("n_layer", "n_embd", "n_head", "seq_len", "batch_size"), config, strict=True)),
            "matmul_floor_s": floor, **out}  # fmt: skip
