"""`python -m benchmarks --sections gpt2_124m`: a LoRA fine-tune at gpt2's own shape, tinypeft beside
PyTorch + PEFT.

The model is gpt2's shape (12 layers, n_embd 768, 12 heads, 50,257 tokens, 1,024 positions: 124M
parameters), randomly initialised on both sides (the values do not change the work); LoRA is r = 8,
alpha 16 on c_attn, c_proj and c_fc, as in the other sections; a step is forward, backward and AdamW
on a batch of B = 4 sequences of T = 256 random token ids, float32. The two contenders are timed
round-robin in their own processes (`run.race`), which spreads load from anything else on the machine
over both alike. Memory is each process's peak resident set (Linux's VmHWM) over the warm-up and timed
steps, reset once the model is built, so it holds parameters, activations, gradients, the optimizer's
state and the library itself; "above the library" subtracts the process's size after importing its
library (numpy and tinypeft; torch, transformers and peft), before the model is built.
"""

from __future__ import annotations

import time
from typing import Any

from .run import Setup, build_step, race

GPT2_124M = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
BATCH_SIZE, SEQ_LEN = 4, 256  # the performance issue's shape
QUICK = {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 1000, "n_positions": 64}  # the smoke run's


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: now; VmHWM: the peak since the last reset)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(setup: Setup, conn: Any) -> None:
    """`run.worker`, measuring memory too: answers "step" with a step's time, "memory" with the sizes."""
    try:
        if setup.library == "tinypeft":
            import tinypeft  # noqa: F401
        else:
            import peft  # noqa: F401
            import torch  # noqa: F401
            import transformers  # noqa: F401
        library = _status_kib("VmRSS")
        step = build_step(setup)
        built = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the size now: the peak below is the steps'
        conn.send(("ready", None))
        while (request := conn.recv()) != "stop":
            if request == "memory":
                conn.send(("memory", {"library_kib": library, "built_kib": built, "peak_kib": _status_kib("VmHWM")}))
                continue
            t0 = time.perf_counter()
            step()
            conn.send(("time", time.perf_counter() - t0))
    except Exception as e:  # reported to the coordinator, which prints it
        conn.send(("error", f"{type(e).__name__}: {e}"))


def section_gpt2_124m(args: Any) -> dict[str, Any]:
    shape, (B, T) = (QUICK, (2, 16)) if args.quick else (GPT2_124M, (BATCH_SIZE, SEQ_LEN))
    steps, warmup = (1, 1) if args.quick else (min(args.steps, 5), 1)
    setups = [
        Setup(
            lib,
            "lora",
            shape["n_layer"],
            shape["n_embd"],
            shape["n_head"],
            T,
            B,
            threads=args.threads,
            vocab_size=shape["vocab_size"],
            n_positions=shape["n_positions"],
        )
        for lib in ("tinypeft", "torch")
    ]
    res = race(setups, steps, warmup, target=worker, memory=True)
    print(f"\n### LoRA r=8 (c_attn, c_proj, c_fc) at gpt2's shape {shape}, B {B}, T {T}, {args.threads} threads\n")
    print("| contender | median step (s) | peak memory (MiB) | above the library (MiB) |\n|---|---|---|---|")
    for label, r in res.items():
        if "error" in r:
            print(f"| {label} | error: {r['error']} | | |")
            continue
        peak, above = r["memory"]["peak_kib"] / 1024, (r["memory"]["peak_kib"] - r["memory"]["library_kib"]) / 1024
        print(f"| {label} | {r['median_s']:.2f} | {peak:,.0f} | {above:,.0f} |")
    ours, theirs = res["tinypeft lora"], res["torch+peft lora"]
    ratios = {}
    if "median_s" in ours and "median_s" in theirs:
        ratios["step: tinypeft / torch+peft"] = ours["median_s"] / theirs["median_s"]
        ratios["peak memory: tinypeft / torch+peft"] = ours["memory"]["peak_kib"] / theirs["memory"]["peak_kib"]
        for k, v in ratios.items():
            print(f"| ratio {k} | {v:.2f} | | |")
    return {
        "shape": shape,
        "batch_size": B,
        "seq_len": T,
        "steps": steps,
        "warmup": warmup,
        "raw": res,
        "ratios": ratios,
    }
