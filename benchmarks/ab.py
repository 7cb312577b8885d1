"""`python -m benchmarks.ab BEFORE AFTER`: a change's effect on one tinypeft training step, apart from the
machine's drift.

BEFORE and AFTER are two source trees of tinypeft (for instance `git worktree add /tmp/before HEAD~1` and
the working tree). Each round runs one fresh process per tree, in turn: it builds the model from its own
tree, takes the warm-up steps, then times the steps (forward, backward, AdamW at lr 1e-4, float32, random
byte ids). Fresh processes alternate so that load which comes and goes falls on both trees alike, and
every process pays the same imports and heap growth. The report is each tree's median over all its timed
steps and their ratio. The "before/after" figures in benchmarks/README.md and in the code's comments were
measured this way.

The worker uses tinypeft's public API only (GPT, get_peft_model, the configs, AdamW), so an older tree
runs it as well as a newer one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from .run import LORA_TARGETS, NUM_VIRTUAL_TOKENS

METHODS = ("full", "lora", "dora", "prompt", "prefix", "ia3", "loha", "lokr", "vera", "adapter")

WORKER = r"""
import json, sys, time
import numpy as np
import tinypeft as tp
from tinypeft.optim import AdamW

a = json.loads(sys.argv[1])
configs = {
    "lora": lambda: tp.LoraConfig(r=8, lora_alpha=16, target_modules=a["targets"]),
    "dora": lambda: tp.LoraConfig(r=8, lora_alpha=16, target_modules=a["targets"], use_dora=True),
    "prompt": lambda: tp.PromptTuningConfig(num_virtual_tokens=a["virtual"]),
    "prefix": lambda: tp.PrefixTuningConfig(num_virtual_tokens=a["virtual"]),
    "ia3": lambda: tp.IA3Config(target_modules=a["targets"], feedforward_modules=["c_fc"]),
    "loha": lambda: tp.LoHaConfig(r=8, alpha=8, target_modules=a["targets"]),
    "lokr": lambda: tp.LoKrConfig(r=8, alpha=8, target_modules=a["targets"]),
    "vera": lambda: tp.VeraConfig(r=64, target_modules=a["targets"]),
    "adapter": lambda: tp.AdapterConfig(),
}
config = tp.GPTConfig(vocab_size=256, n_positions=max(256, a["seq_len"] + a["virtual"]), n_embd=a["n_embd"],
                      n_layer=a["n_layer"], n_head=a["n_head"])
base = tp.GPT(config, seed=0)
model = base if a["method"] == "full" else tp.get_peft_model(base, configs[a["method"]]())
ids = np.random.default_rng(0).integers(0, 256, size=(a["batch_size"], a["seq_len"]))
params, optimizer = model.trainable_parameters(), AdamW(lr=1e-4)
times = []
for i in range(a["warmup"] + a["steps"]):
    t0 = time.perf_counter()
    _, grads = model.loss_and_grad(ids, ids)
    optimizer.step(params, grads)
    if i >= a["warmup"]:
        times.append(time.perf_counter() - t0)
print(json.dumps(times))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path, help="a tinypeft source tree (the folder holding tinypeft/)")
    p.add_argument("after", type=Path, help="another one")
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=512)
    p.add_argument("--n_head", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="tinypeft's row-block threads and BLAS threads")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per tree, alternating")
    p.add_argument("--steps", type=int, default=7, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first, in every process")
    return p.parse_args(argv)


def time_tree(tree: Path, settings: dict, threads: int) -> list[float]:
    """The timed steps of one fresh process built from `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TINYPEFT_THREADS"):
        env[var] = str(threads)
    done = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(settings)], cwd=tree, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{tree}: the worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, tree in trees.items():
        if not (tree / "tinypeft" / "__init__.py").is_file():
            raise SystemExit(f"{name} tree {tree} holds no tinypeft/ package; give the folder that does")
    settings = {k: getattr(args, k) for k in ("method", "n_layer", "n_embd", "n_head", "seq_len", "batch_size")}
    settings |= {"steps": max(1, args.steps), "warmup": max(0, args.warmup)}
    settings |= {"targets": LORA_TARGETS, "virtual": NUM_VIRTUAL_TOKENS}  # what the step table trains
    times: dict[str, list[float]] = {name: [] for name in trees}
    for _ in range(max(1, args.rounds)):
        for name, tree in trees.items():
            times[name] += time_tree(tree, settings, args.threads)
    before, after = (1e3 * statistics.median(times[name]) for name in trees)
    shape = ", ".join(f"{k} {settings[k]}" for k in ("n_layer", "n_embd", "n_head", "seq_len", "batch_size"))
    print(f"{args.method} ({shape}, {args.threads} threads, {len(times['after'])} steps each):")
    print(f"before {before:.1f} ms, after {after:.1f} ms, after / before {after / before:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
