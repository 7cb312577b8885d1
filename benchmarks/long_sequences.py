"""`python -m benchmarks --sections long`: a LoRA step at T 1024, time and peak memory, tinypeft beside
PyTorch + PEFT, and tinypeft with the attention it had before the engine's blocks, for the record.

The model is the scaling grid's (4 layers, n_embd 128, 4 heads, byte vocabulary, B 8), LoRA r = 8 on
c_attn, c_proj and c_fc, float32. Memory is measured two ways:

- every contender alike: the process's peak resident set (Linux's VmHWM) over two steps, reset once
  the model is built, minus its size then (`gpt2_124m.worker`). This counts what the allocator holds,
  live or freed and kept, so it is what the machine must have;
- tinypeft also by tracemalloc (NumPy reports its buffers to it): the live arrays at their peak, in a
  process of its own, since tracing slows every allocation.

PyTorch's attention is whatever transformers chooses for GPT-2 by default (its name is recorded):
`sdpa`, which on the CPU runs a fused, blocked kernel that keeps no (T, T) weights either.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

from .gpt2_124m import worker as memory_worker
from .run import Setup, build_step, race

LONG = {"n_layer": 4, "n_embd": 128, "n_head": 4, "seq_len": 1024, "batch_size": 8}
QUICK = {"n_layer": 1, "n_embd": 16, "n_head": 2, "seq_len": 64, "batch_size": 2}


def _tracemalloc_worker(setup: Setup, conn: Any) -> None:
    import tracemalloc

    tracemalloc.start()
    step = build_step(setup)
    built = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    step()
    step()  # the optimizer's state exists from the first step on
    conn.send((built, tracemalloc.get_traced_memory()[1]))


def _traced(setup: Setup) -> tuple[int, int]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_tracemalloc_worker, args=(setup, child))
    proc.start()
    out = parent.recv()
    proc.join()
    return out


def _torch_attention() -> str:
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2)
    return transformers.GPT2LMHeadModel(config).config._attn_implementation


def section_long(args: Any) -> dict[str, Any]:
    shape = QUICK if args.quick else LONG
    steps, warmup = (1, 1) if args.quick else (min(args.steps, 5), 1)
    setups = [
        Setup(lib, "lora", shape["n_layer"], shape["n_embd"], shape["n_head"], shape["seq_len"],
              shape["batch_size"], threads=args.threads, attention=attention)
        for lib, attention in (("tinypeft", "blocked"), ("tinypeft", "reference"), ("torch", "blocked"))
    ]  # fmt: skip
    res = race(setups, steps, warmup, target=memory_worker, memory=True)
    traced = {s.label: _traced(s) for s in setups if s.library == "tinypeft"}
    print(f"\n### LoRA at T {shape['seq_len']}: time and peak memory ({shape}, {args.threads} threads)\n")
    print("| contender | median step (s) | peak RSS over the built model (MiB) | tracemalloc peak (MiB) |")
    print("|---|---|---|---|")
    rows = {}
    for label, r in res.items():
        if "error" in r:
            print(f"| {label} | error: {r['error']} | | |")
            continue
        rss = (r["memory"]["peak_kib"] - r["memory"]["built_kib"]) / 1024
        trace = traced.get(label)
        traced_mib = None if trace is None else (trace[1] - trace[0]) / 2**20
        rows[label] = {"median_s": r["median_s"], "rss_over_built_mib": rss, "tracemalloc_over_built_mib": traced_mib}
        shown = "-" if traced_mib is None else f"{traced_mib:,.1f}"
        print(f"| {label} | {r['median_s']:.3f} | {rss:,.1f} | {shown} |")
    torch_label = "torch+peft lora"
    ratios = {}
    if "tinypeft lora" in rows and torch_label in rows:
        ours, theirs = rows["tinypeft lora"], rows[torch_label]
        ratios = {
            "step: tinypeft / torch+peft": ours["median_s"] / theirs["median_s"],
            "peak RSS: tinypeft / torch+peft": ours["rss_over_built_mib"] / theirs["rss_over_built_mib"],
            "tinypeft tracemalloc / torch+peft peak RSS": ours["tracemalloc_over_built_mib"]
            / theirs["rss_over_built_mib"],
        }
        for k, v in ratios.items():
            print(f"| ratio {k} | {v:.2f} | | |")
    return {"shape": shape, "steps": steps, "rows": rows, "ratios": ratios, "torch_attention": _torch_attention()}
