"""What a reader reads to follow one LoRA training step: every tinypeft function that runs, with its
source lines (docstring included; and apart, the lines of code: no docstring, comment or blank line),
counted by tracing the step.

    python -m benchmarks.reading_path            # through the reference: gpt.forward, the loss, gpt.backward
    python -m benchmarks.reading_path --api      # through the public API: PeftModel.loss_and_grad

The step: the default GPTConfig, LoraConfig(r=8) (PEFT's gpt2 default target, c_attn), float32, a batch of
2 rows of 16 tokens (one row block, so everything runs on the calling thread and is traced). A function
counts once however often it runs; comprehensions and lambdas count as part of their function.
"""

from __future__ import annotations

import argparse
import ast
import collections
import inspect
import os
import sys
import textwrap
from typing import Any

import numpy as np

import tinypeft as tp
from tinypeft import gpt
from tinypeft.ops import causal_lm_loss_backward, causal_lm_loss_forward

ROOT = os.path.dirname(os.path.abspath(tp.__file__))
ANONYMOUS = ("<lambda>", "<genexpr>", "<listcomp>", "<dictcomp>", "<setcomp>")


def code_lines(source: list[str]) -> int:
    """The lines of a function that are code: not its docstring, a comment line or a blank line."""
    tree = ast.parse(textwrap.dedent("".join(source)))
    function = tree.body[0]
    skipped: set[int] = set()
    body = getattr(function, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        skipped.update(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(
        1 for i, line in enumerate(source, 1) if i not in skipped and line.strip() and not line.strip().startswith("#")
    )


def trace(step: Any) -> dict[tuple[str, int, str], tuple[int, int]]:
    """{(file, first line, name): (source lines, code lines)} of every tinypeft function `step()` runs."""
    seen: dict[tuple[str, int, str], tuple[int, int]] = {}

    def tracer(frame: Any, event: str, arg: Any) -> None:
        code = frame.f_code
        if event == "call" and code.co_filename.startswith(ROOT) and code.co_name not in ANONYMOUS:
            key = (code.co_filename, code.co_firstlineno, code.co_name)
            if key not in seen:
                source = inspect.getsourcelines(code)[0]
                seen[key] = (len(source), code_lines(source))

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
    code: collections.Counter[str] = collections.Counter()
    names: dict[str, list[str]] = collections.defaultdict(list)
    for (path, _, name), (n, n_code) in seen.items():
        rel = os.path.relpath(path, os.path.dirname(ROOT))
        files[rel] += n
        code[rel] += n_code
        names[rel].append(name)
    total, total_code = sum(files.values()), sum(code.values())
    print(f"{len(seen)} functions, {total} lines, {len(files)} files ({total_code} of them code)")
    for rel, n in files.most_common():
        print(f"  {n:4d}  ({code[rel]:4d} code)  {rel}  ({', '.join(names[rel])})")


if __name__ == "__main__":
    main()
