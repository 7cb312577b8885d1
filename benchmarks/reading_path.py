"""What a reader reads to follow one LoRA training step: every tinypeft function that runs, with its
source lines (docstring included), counted by tracing the step.

    python -m benchmarks.reading_path            # through the reference: gpt.forward, the loss, gpt.backward
    python -m benchmarks.reading_path --api      # through the public API: PeftModel.loss_and_grad

The step: the default GPTConfig, LoraConfig(r=8) (PEFT's gpt2 default target, c_attn), float32, a batch of
2 rows of 16 tokens (one row block, so everything runs on the calling thread and is traced). A function
counts once however often it runs; comprehensions and lambdas count as part of their function.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import sys
from typing import Any

import numpy as np

import tinypeft as tp
from tinypeft import gpt
from tinypeft.ops import causal_lm_loss_backward, causal_lm_loss_forward

ROOT = os.path.dirname(os.path.abspath(tp.__file__))
ANONYMOUS = ("<lambda>", "<genexpr>", "<listcomp>", "<dictcomp>", "<setcomp>")


def trace(step: Any) -> dict[tuple[str, int, str], int]:
    """{(file, first line, name): source lines} of every tinypeft function `step()` runs."""
    seen: dict[tuple[str, int, str], int] = {}

    def tracer(frame: Any, event: str, arg: Any) -> None:
        code = frame.f_code
        if event == "call" and code.co_filename.startswith(ROOT) and code.co_name not in ANONYMOUS:
            key = (code.co_filename, code.co_firstlineno, code.co_name)
            if key not in seen:
                seen[key] = len(inspect.getsourcelines(code)[0])

    sys.settrace(tracer)
    try:
        step()
    finally:
        sys.settrace(None)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", action="store_true", help="follow PeftModel.loss_and_grad, not the reference")
    args = parser.parse_args()
    model = tp.get_peft_model(tp.GPT(tp.GPTConfig()), tp.LoraConfig(r=8))
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 16))
    model.loss_and_grad(ids, ids)  # warm: imports and the thread pool are not part of a step

    def reference_step() -> None:
        view = model.view()
        logits, cache = gpt.forward(view.params, view.config, ids, None, view.sites)
        _, loss_cache = causal_lm_loss_forward(logits, ids)
        gpt.backward(causal_lm_loss_backward(1.0, loss_cache), cache, view.trainable)

    seen = trace((lambda: model.loss_and_grad(ids, ids)) if args.api else reference_step)
    files: collections.Counter[str] = collections.Counter()
    names: dict[str, list[str]] = collections.defaultdict(list)
    for (path, _, name), n in seen.items():
        rel = os.path.relpath(path, os.path.dirname(ROOT))
        files[rel] += n
        names[rel].append(name)
    print(f"{len(seen)} functions, {sum(seen.values())} lines, {len(files)} files")
    for rel, n in files.most_common():
        print(f"  {n:4d}  {rel}  ({', '.join(names[rel])})")


if __name__ == "__main__":
    main()
