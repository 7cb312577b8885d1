"""The benchmark runner: worker processes per contender, round-robin timing, and the report."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]
NUM_VIRTUAL_TOKENS = 20
STEP_METHODS = ("full", "lora", "prompt", "prefix")


@dataclass(frozen=True)
class Setup:
    """One contender: which library computes which method on which model and batch."""

    library: str  # "tinypeft" | "torch"
    method: str  # "full" | "lora" | "prompt" | "prefix"
    n_layer: int
    n_embd: int
    n_head: int
    seq_len: int
    batch_size: int
    rank: int = 8
    threads: int = 2
    device: str = "cpu"  # "cuda": tinypeft on cupy, torch on CUDA
    vocab_size: int = 256  # the byte vocabulary; 50257 for gpt2's shape
    n_positions: int = 0  # 0: max(256, seq_len + the virtual tokens)
    attention: str = "blocked"  # tinypeft's engine kernel; "reference": ops.py's pair, as before blocks

    @property
    def label(self) -> str:
        lib = {"tinypeft": "tinypeft", "torch": "torch" if self.method == "full" else "torch+peft"}[self.library]
        kernel = " (reference attention)" if self.library == "tinypeft" and self.attention == "reference" else ""
        return f"{lib} {self.method}{kernel}"


# ---------------------------------------------------------------- contenders (run inside workers)
def build_step(setup: Setup, seed: int = 0):
    """A zero-argument function running one training step (forward, backward, AdamW) of the setup."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, setup.vocab_size, size=(setup.batch_size, setup.seq_len))
    n_positions = setup.n_positions or max(256, setup.seq_len + NUM_VIRTUAL_TOKENS)
    if setup.library == "tinypeft":
        import tinypeft as tp
        from tinypeft import engine, gpt
        from tinypeft.optim import AdamW

        if setup.attention == "reference":  # this worker process only: the kernel before blocks, for the record
            engine.BLOCKED_ATTENTION = gpt.REFERENCE_ATTENTION

        base = tp.GPT(
            tp.GPTConfig(
                vocab_size=setup.vocab_size,
                n_positions=n_positions,
                n_embd=setup.n_embd,
                n_layer=setup.n_layer,
                n_head=setup.n_head,
            ),
            seed=seed,
            device=setup.device,
        )
        model = base if setup.method == "full" else tp.get_peft_model(base, tinypeft_config(setup))
        params = model.trainable_parameters()
        optimizer = AdamW(lr=1e-4)

        def step() -> None:
            _, grads = model.loss_and_grad(ids, ids)
            optimizer.step(params, grads)
            if setup.device == "cuda":
                base.xp.cuda.Device().synchronize()  # time the work, not its launch

        return step

    import warnings

    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    warnings.filterwarnings("ignore")  # transformers' notes about the config are not results
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(setup.threads)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=setup.vocab_size,
        n_positions=n_positions,
        n_embd=setup.n_embd,
        n_layer=setup.n_layer,
        n_head=setup.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).to(setup.device)
    if setup.method != "full":
        import peft

        model = peft.get_peft_model(model, peft_config(setup))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    tids = torch.tensor(ids, device=setup.device)

    def torch_step() -> None:
        loss = model(input_ids=tids, labels=tids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if setup.device == "cuda":
            torch.cuda.synchronize()

    return torch_step


def tinypeft_config(setup: Setup):
    import tinypeft as tp

    if setup.method == "lora":
        return tp.LoraConfig(r=setup.rank, lora_alpha=2 * setup.rank, target_modules=LORA_TARGETS)
    if setup.method == "prompt":
        return tp.PromptTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    if setup.method == "prefix":
        return tp.PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS)
    raise ValueError(setup.method)


def peft_config(setup: Setup):
    import peft

    if setup.method == "lora":
        return peft.LoraConfig(
            r=setup.rank,
            lora_alpha=2 * setup.rank,
            target_modules=LORA_TARGETS,
            fan_in_fan_out=True,
            task_type="CAUSAL_LM",
        )
    if setup.method == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS, task_type="CAUSAL_LM")
    if setup.method == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS, task_type="CAUSAL_LM")
    raise ValueError(setup.method)


def worker(setup: Setup, conn: Any) -> None:
    """Build the contender, then time one step per request until told to stop."""
    try:
        step = build_step(setup)
        conn.send(("ready", None))
        while conn.recv() == "step":
            t0 = time.perf_counter()
            step()
            conn.send(("time", time.perf_counter() - t0))
    except Exception as e:  # reported to the coordinator, which prints it
        conn.send(("error", f"{type(e).__name__}: {e}"))


def race(
    setups: list[Setup], steps: int, warmup: int, target: Any = worker, memory: bool = False
) -> dict[str, dict[str, Any]]:
    """Median step time of each setup, timed round-robin one step at a time, each in its own process
    (`target`; with `memory`, a worker that also answers "memory" with what it measured)."""
    ctx = mp.get_context("spawn")
    procs = []
    for s in setups:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(s, child), daemon=True)
        proc.start()
        procs.append((s, proc, parent))
    times: dict[Setup, list[float]] = {s: [] for s in setups}
    errors: dict[Setup, str] = {}
    for s, _, conn in procs:
        kind, value = conn.recv()
        if kind == "error":
            errors[s] = value
    live = [(s, p, c) for s, p, c in procs if s not in errors]
    for i in range(warmup + steps):
        for s, _, conn in live:
            conn.send("step")
            kind, value = conn.recv()
            if kind == "error":
                raise RuntimeError(f"{s.label}: {value}")
            if i >= warmup:
                times[s].append(value)
    measured = {}
    for s, _, conn in live if memory else []:
        conn.send("memory")
        measured[s] = conn.recv()[1]
    for _, proc, conn in procs:
        if proc.is_alive():
            conn.send("stop")
        proc.join(timeout=10)
    out = {}
    for s in setups:
        if s in errors:
            out[s.label] = {"error": errors[s]}
        else:
            out[s.label] = {"median_s": statistics.median(times[s]), "times_s": times[s]}
            if s in measured:
                out[s.label]["memory"] = measured[s]
    return out


# ---------------------------------------------------------------- sections
def section_steps(args, configs) -> dict[str, Any]:
    results = {}
    for name, (n_layer, n_embd, n_head, T, B) in configs.items():
        setups = [
            Setup(lib, method, n_layer, n_embd, n_head, T, B, threads=args.threads, device=args.device)
            for method in STEP_METHODS
            for lib in ("tinypeft", "torch")
        ]
        res = race(setups, args.steps, args.warmup)
        row = {label: r.get("median_s") for label, r in res.items()}
        ratios = {}
        for method in STEP_METHODS:
            ours = row.get(f"tinypeft {method}")
            theirs = row.get(f"{'torch' if method == 'full' else 'torch+peft'} {method}")
            if ours and theirs:
                ratios[f"{method}: tinypeft / torch"] = ours / theirs
        if row.get("tinypeft lora") and row.get("tinypeft full"):
            ratios["tinypeft lora / tinypeft full"] = row["tinypeft lora"] / row["tinypeft full"]
        results[name] = {
            "config": dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, seq_len=T, batch_size=B),
            "median_s": row,
            "ratios": ratios,
            "raw": res,
        }
        print(f"\n### step time, {name}: n_layer {n_layer}, n_embd {n_embd}, n_head {n_head}, T {T}, B {B}\n")
        print("| contender | median step (ms) |\n|---|---|")
        for label, t in row.items():
            print(f"| {label} | {'error: ' + res[label]['error'] if t is None else f'{1e3 * t:.1f}'} |")
        for k, v in ratios.items():
            print(f"| ratio {k} | {v:.2f} |")
    return results


AUTOGRAD_RUNS = 3  # separate processes: the speed-up is reported as the range over them
AUTOGRAD_ROUNDS = 2  # in each process, runs of steps of each side, alternating


def _autograd_worker(args_tuple, conn) -> None:
    n_layer, n_embd, n_head, T, B, steps, warmup = args_tuple
    import numpy as np
    from autograd import grad

    import tinypeft as tp
    from tinypeft import gpt
    from tinypeft.ops import causal_lm_loss_forward

    model = tp.GPT(tp.GPTConfig(vocab_size=256, n_positions=max(256, T), n_embd=n_embd, n_layer=n_layer, n_head=n_head))
    ids = np.random.default_rng(0).integers(0, 256, size=(B, T))

    def loss(params):
        return causal_lm_loss_forward(gpt.forward(params, model.config, ids)[0], ids)[0]

    auto = grad(loss)
    contenders = {"hand": lambda: model.loss_and_grad(ids, ids), "autograd": lambda: auto(dict(model.params))}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up
        for _ in range(warmup):
            fn()
    # Each side runs a few steps in a row and its first step after the switch is not counted: OpenBLAS's
    # idle thread keeps spinning for a while after autograd's two-thread matmuls, and a hand step timed
    # right after an autograd pass shared the two cores with it (158 ms, against 124 ms in a loop of its
    # own and 119 ms 0.3 s later; n_embd 128, T 128, B 16). Rounds alternate, so load that drifts over the
    # run falls on both sides.
    for _ in range(AUTOGRAD_ROUNDS):
        for name, fn in contenders.items():
            for i in range(1 + max(1, -(-steps // AUTOGRAD_ROUNDS))):  # steps, rounded up to whole rounds
                t0 = time.perf_counter()
                fn()
                if i:
                    times[name].append(time.perf_counter() - t0)
    conn.send((statistics.median(times["hand"]), statistics.median(times["autograd"])))


def section_autograd(args, config) -> dict[str, Any]:
    n_layer, n_embd, n_head, T, B = config
    ctx = mp.get_context("spawn")
    runs = []
    for _ in range(1 if args.quick else AUTOGRAD_RUNS):
        parent, child = ctx.Pipe()
        settings = (n_layer, n_embd, n_head, T, B, max(1, args.steps), min(args.warmup, 2))
        proc = ctx.Process(target=_autograd_worker, args=(settings, child))
        proc.start()
        runs.append(parent.recv())
        proc.join()
    speedups = sorted(auto / hand for hand, auto in runs)
    hand, auto = statistics.median(h for h, _ in runs), statistics.median(a for _, a in runs)
    print(f"\n### hand-written backward vs HIPS autograd of the same forward (n_embd {n_embd}, T {T}, B {B})\n")
    print("| tinypeft step | autograd | speed-up (median) | range over runs |\n|---|---|---|---|")
    print(f"| {1e3 * hand:.1f} ms | {1e3 * auto:.1f} ms | {auto / hand:.1f}x | {speedups[0]:.1f}-{speedups[-1]:.1f}x |")
    return {
        "tinypeft_s": hand,
        "autograd_s": auto,
        "speedup": auto / hand,
        "speedup_range": [speedups[0], speedups[-1]],
        "runs": [{"tinypeft_s": h, "autograd_s": a} for h, a in runs],
        "config": dict(n_embd=n_embd, seq_len=T, batch_size=B),
    }


def _memory_worker(setup: Setup, conn) -> None:
    import tracemalloc

    tracemalloc.start()
    step = build_step(setup)
    step()
    step()  # the optimizer's state exists from the first step on
    conn.send(tracemalloc.get_traced_memory()[1])


def section_memory(args, config) -> dict[str, Any]:
    n_layer, n_embd, n_head, T, B = config
    ctx = mp.get_context("spawn")
    out = {}
    for method in ("full", "lora", "prompt"):
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_memory_worker, args=(Setup("tinypeft", method, n_layer, n_embd, n_head, T, B), child)
        )
        proc.start()
        out[method] = parent.recv()
        proc.join()
    print(f"\n### peak memory of a training step (tracemalloc, parameters included; n_embd {n_embd}, T {T}, B {B})\n")
    print("| method | peak MiB | vs full |\n|---|---|---|")
    for method, peak in out.items():
        print(f"| {method} | {peak / 2**20:.1f} | {peak / out['full']:.2f} |")
    return {"peak_bytes": out, "ratios": {m: v / out["full"] for m, v in out.items()}}


def train_step_flops(n_layer: int, n_embd: int, T: int, B: int, vocab: int = 256) -> float:
    """Matmul FLOPs of a full fine-tuning step: the backward of every matmul is twice its forward."""
    C, tokens = n_embd, B * T
    per_layer = 2 * tokens * (C * 3 * C + C * C + 2 * C * 4 * C) + 2 * 2 * B * T * T * C  # projections + qk^T, pv
    forward = n_layer * per_layer + 2 * tokens * C * vocab
    return 3 * forward


def _gflops_worker(args_tuple, conn) -> None:
    n_layer, n_embd, n_head, T, B, threads, steps, warmup = args_tuple
    import numpy as np

    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    a @ a
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    sgemm = 5 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9
    step = build_step(Setup("tinypeft", "full", n_layer, n_embd, n_head, T, B, threads=threads))
    # as many warm-up and timed steps as the step table: with one warm-up and three steps, the first
    # steps' page faults (the heap still growing) made config B 607 ms here against 507 ms in the table
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    achieved = train_step_flops(n_layer, n_embd, T, B) / statistics.median(times) / 1e9
    conn.send((sgemm, achieved))


def section_gflops(args, configs) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = {}
    print("\n### achieved GFLOP/s of a full fine-tuning step vs NumPy's own sgemm (2048^3)\n")
    print("| config | sgemm GFLOP/s | step GFLOP/s | fraction |\n|---|---|---|---|")
    for name, (n_layer, n_embd, n_head, T, B) in configs.items():
        parent, child = ctx.Pipe()
        settings = (n_layer, n_embd, n_head, T, B, args.threads, max(1, args.steps), args.warmup)
        proc = ctx.Process(target=_gflops_worker, args=(settings, child))
        proc.start()
        sgemm, achieved = parent.recv()
        proc.join()
        out[name] = {"sgemm_gflops": sgemm, "step_gflops": achieved, "fraction": achieved / sgemm}
        print(f"| {name} | {sgemm:.1f} | {achieved:.1f} | {achieved / sgemm:.2f} |")
    return out


def section_scaling(args) -> dict[str, Any]:
    steps, warmup = max(1, args.steps // 2), 1
    if args.quick:
        grid = {"seq_len": [8, 16], "n_embd": [16], "rank": [1], "batch_size": [1]}  # one fit, the rest a point
        base = dict(n_layer=1, n_embd=16, n_head=2, seq_len=16, batch_size=2, rank=4)
    else:
        grid = {
            "seq_len": [32, 64, 128, 256, 512, 1024],
            "n_embd": [64, 128, 256, 512, 1024],
            "rank": [1, 2, 4, 8, 16, 32, 64],
            "batch_size": [1, 2, 4, 8, 16, 32],
        }
        base = dict(n_layer=4, n_embd=128, n_head=4, seq_len=128, batch_size=8, rank=8)
    out = {}
    for axis, values in grid.items():
        rows = {}
        for v in values:
            kw = base | {axis: v}
            if axis == "n_embd":
                kw["n_head"] = max(1, v // 32)
            setups = [
                Setup(
                    lib,
                    "lora",
                    kw["n_layer"],
                    kw["n_embd"],
                    kw["n_head"],
                    kw["seq_len"],
                    kw["batch_size"],
                    kw["rank"],
                    args.threads,
                )
                for lib in ("tinypeft", "torch")
            ]
            res = race(setups, steps, warmup)
            rows[v] = {label: r.get("median_s") for label, r in res.items()}
        out[axis] = rows
        print(f"\n### LoRA step time against {axis} (others: {base})\n")
        print(f"| {axis} | tinypeft (ms) | torch+peft (ms) | ratio |\n|---|---|---|---|")
        for v, row in rows.items():
            ours, theirs = row.get("tinypeft lora"), row.get("torch+peft lora")
            ratio = f"{ours / theirs:.2f}" if ours and theirs else "-"
            print(
                f"| {v} | {1e3 * ours:.1f} | {1e3 * theirs:.1f} | {ratio} |"
                if ours and theirs
                else f"| {v} | - | - | - |"
            )
    return out


def machine() -> dict[str, Any]:
    import numpy as np

    info = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def run_all(args) -> int:
    if args.device == "cuda":
        try:  # said here, not as an AttributeError from inside the first contender
            import cupy

            cupy.cuda.runtime.getDeviceCount()
        except Exception as e:
            print(f"--device cuda needs CuPy and a CUDA device (pip install cupy-cuda12x): {e!r}", file=sys.stderr)
            return 2
    if args.quick:
        configs = {"tiny": (1, 16, 2, 16, 2)}
        args.steps, args.warmup = 1, 1
    else:
        configs = {"A": (4, 128, 4, 128, 16), "B": (4, 512, 8, 128, 8)}
    sections = set(args.sections.split(","))
    big = configs.get("B", next(iter(configs.values())))
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine(),
        "threads": args.threads,
        "quick": args.quick,
        "device": args.device,
    }
    print(f"# tinypeft benchmarks ({results['machine'].get('cpu')}, {args.threads} threads for every contender)")
    if "steps" in sections:
        results["steps"] = section_steps(args, configs)
    if "autograd" in sections:
        results["autograd"] = section_autograd(args, next(iter(configs.values())))
    if "memory" in sections:
        results["memory"] = section_memory(args, big)
    if "gflops" in sections:
        results["gflops"] = section_gflops(args, configs)
    if "scaling" in sections:
        results["scaling"] = section_scaling(args)
    if "scaling" in sections:
        from .growth import plot_growth, print_exponents

        print_exponents(results["scaling"])
        plot_growth(results["scaling"], os.path.join(os.path.dirname(os.path.abspath(args.out)), "growth.png"))
    if "long" in sections:
        from .long_sequences import section_long

        results["long"] = section_long(args)
    if "floor" in sections:
        from .matmul_floor import section_floor

        results["floor"] = section_floor(args, configs)
    if "profile" in sections:
        from .profile_ops import section_profile

        results["profile"] = section_profile(args)
    if "gpt2_124m" in sections:
        from .gpt2_124m import section_gpt2_124m

        results["gpt2_124m"] = section_gpt2_124m(args)
    results["seconds"] = time.perf_counter() - t0
    print(f"\n(total {results['seconds']:.0f} s)")
    from tinypeft.io import save_json

    save_json(
        args.out,
        json.loads(json.dumps(results, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))),
    )
    print(f"results written to {args.out}")
    return 0
