"""The `tinypeft` command: pretrain a base model, fine-tune it with a PEFT method, evaluate, generate, merge.

Each subcommand is a function of the parsed arguments; `main` routes to it and turns tinypeft's own
errors into a one-line message and exit status 2 instead of a traceback (the operating system's, such
as a full disk or a folder that cannot be written, into one line and status 1). The options are in
cli_args.py; `finetune`'s methods, their options and defaults come from the method registry
(tinypeft/methods/registry.py), so nothing here names a method.

Text is bytes: the shipped model's vocabulary is bytes, and a command line is bytes too (Python hands it
over decoded as UTF-8, with each byte that is not UTF-8 kept as a lone surrogate), so `generate` takes
its prompt as the bytes typed (os.fsencode) and writes the model's bytes to stdout as they are, and a
file name that is not UTF-8 is printed back as the same bytes. A model folder holding tokenizer.json
(a Hugging Face GPT-2 folder) has its text tokenized by that file instead (tinypeft/tokenizer.py):
corpora and prompts must then be UTF-8 text, and losses are per token.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .cli_args import build_parser
from .errors import ConfigError, TinyPeftError
from .methods.registry import method


# ------------------------------------------------------------------ methods
def method_defaults(name: str, *flags: str) -> tuple[Any, float]:
    """(config, learning rate) that `tinypeft finetune --method NAME FLAGS...` trains with: the
    experiments use this, so they compare the very configurations the command line gives."""
    spec = method(name)
    args = build_parser().parse_args(["finetune", "--method", name, *flags])
    return spec.build(args), spec.default_lr if args.lr is None else args.lr


# ------------------------------------------------------------------ shared
def _train_config(args: argparse.Namespace, lr: float):
    from .train import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        optimizer=args.optimizer,
        eval_every=args.eval_every,
        eval_windows=args.eval_windows,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )


def load_model(base: str | None, adapter: str | None, device: str | None = None, dtype: str | None = None):
    """A GPT from a model folder (default: the shipped base), wrapped with the adapter in `adapter` if given."""
    return load_model_and_tokenizer(base, adapter, device, dtype)[0]


def load_model_and_tokenizer(base: str | None, adapter: str | None, device: str | None = None, dtype=None):
    """(model, tokenizer): `load_model`'s model and the folder's tokenizer (its tokenizer.json, else bytes)."""
    from .experiment import base_dir
    from .model import GPT
    from .peft_model import PeftModel
    from .tokenizer import load_tokenizer

    folder = base_dir(base)
    model = GPT.from_pretrained(folder, device=device, dtype=dtype)
    tokenizer = load_tokenizer(folder, model.config)
    return (PeftModel.from_pretrained(model, adapter) if adapter else model), tokenizer


# ------------------------------------------------------------------ commands
def _pretrain_config(args: argparse.Namespace):
    """The model and the training pretrain runs, with --seq_len settled (default: n_positions; a
    shorter one is noted, once both are known to be valid)."""
    from .data import VOCAB_SIZE
    from .model import GPTConfig

    config = GPTConfig(
        vocab_size=VOCAB_SIZE,
        n_positions=args.n_positions,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        dtype=args.dtype,
    )
    if args.seq_len is None:
        args.seq_len = config.n_positions
    train_config = _train_config(args, args.lr)
    if args.seq_len > config.n_positions:
        raise ConfigError(f"--seq_len {args.seq_len} exceeds --n_positions {config.n_positions}")
    if args.seq_len < config.n_positions:
        # a later fine-tune with virtual tokens, or a long sample, would read these never-trained rows
        print(
            f"note: --seq_len {args.seq_len} < --n_positions {config.n_positions}: position embeddings "
            f"{args.seq_len}..{config.n_positions - 1} are never seen in training"
        )
    return config, train_config


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .data import load_corpus
    from .experiment import bits, maybe_plot_run
    from .io import save_json
    from .model import GPT
    from .train import train

    config, train_config = _pretrain_config(args)
    os.makedirs(args.out, exist_ok=True)  # an unusable --out fails now, not after training
    corpus = load_corpus(args.corpus)
    print(corpus.describe())
    model = GPT(config, seed=args.seed, device=args.device)
    model.print_trainable_parameters()
    t0 = time.perf_counter()
    result = train(
        model,
        corpus.train,
        train_config,
        eval_sets={"val": corpus.val},
        run_dir=args.out,
        resume=args.resume,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    model_dir = os.path.join(args.out, "model")
    model.save_pretrained(model_dir)
    final = result.evals[-1]["val"]
    summary = {
        "command": "tinypeft " + " ".join(sys.argv[1:]),
        "config": config.to_hf_dict(),
        "train_config": vars(train_config),
        "corpus": corpus.describe(),
        "steps": result.steps,
        "seconds": round(time.perf_counter() - t0, 2),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "val_loss": final,
        "val_bits_per_byte": bits(final),
        "evals": result.evals,
    }
    save_json(os.path.join(args.out, "summary.json"), summary)
    maybe_plot_run(
        result, os.path.join(args.out, "loss.png"), f"pretraining on {args.corpus}", {"val": "validation loss"}
    )
    print(
        f"done: {result.steps} steps in {summary['seconds']} s ({summary['tokens_per_second']:,.0f} tokens/s); "
        f"val loss {final:.4f} nats/byte = {bits(final):.3f} bits/byte (guessing uniformly: 5.545 nats = 8 bits)"
    )
    print(f"model saved to {model_dir}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .data import load_corpus
    from .experiment import base_dir, finetune, report
    from .model import GPT
    from .tokenizer import load_tokenizer

    spec = method(args.method)
    lr = spec.default_lr if args.lr is None else args.lr
    train_config = _train_config(args, lr)
    if args.prompt_bytes < 1:
        raise ConfigError(
            f"--prompt_bytes must be an integer >= 1 (the default prompt's length); got {args.prompt_bytes}"
        )
    if args.sample_bytes < 0:
        raise ConfigError(f"--sample_bytes must be an integer >= 0 (0: no samples); got {args.sample_bytes}")
    prompt = None if args.prompt is None else _utf8_text(args.prompt, "--prompt")
    os.makedirs(args.out, exist_ok=True)  # an unusable --out fails now, not after training
    base_folder = base_dir(args.base)
    base = GPT.from_pretrained(base_folder, device=args.device)
    tokenizer = load_tokenizer(base_folder, base.config)
    method_config = spec.build(args)
    task, prose = load_corpus(args.corpus, tokenizer), load_corpus(args.prose_corpus, tokenizer)
    run = finetune(
        base,
        method_config,
        task,
        prose,
        train_config,
        method=args.method,
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        prompt=prompt,
        prompt_bytes=args.prompt_bytes,
        sample_bytes=args.sample_bytes,
        base_name=base_folder,
        command="tinypeft " + " ".join(sys.argv[1:]),
        tokenizer=tokenizer,
    )
    summary = run.summary
    print()
    print(report(summary, args.corpus, args.prose_corpus))
    summary_path = os.path.join(args.out, "summary.json")
    print(f"\n{run.result.steps} steps in {summary['seconds']:.1f} s; saved {summary['saved']}, {summary_path}", end="")
    print(f", {summary['plot']}" if summary["plot"] else " (no plot: pip install 'tinypeft[plot]')")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import load_corpus
    from .experiment import bits
    from .train import evaluate

    model, tokenizer = load_model_and_tokenizer(args.model, args.adapter, args.device)
    unit = tokenizer.unit
    for name in args.corpus:
        corpus = load_corpus(name, tokenizer)
        loss = evaluate(model, corpus.val, args.seq_len, args.eval_windows, args.batch_size)
        print(f"{name}: validation loss {loss:.4f} nats/{unit} = {bits(loss):.4f} bits/{unit}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    text = _argv_bytes(args.prompt, "--prompt")
    if not text:
        raise ConfigError("--prompt must not be empty")
    model, tokenizer = load_model_and_tokenizer(args.model, args.adapter, args.device)
    prompt = tokenizer.encode(text, "--prompt")
    if prompt.size == 0:  # a tokenizer that reads a non-empty text as no token at all
        raise ConfigError(f"--prompt {text!r} is no token of {tokenizer.name}")
    out = model.generate(prompt[None, :], args.max_new_tokens, args.temperature, args.top_k, args.seed)[0]
    new = out[prompt.size :]
    if tokenizer.eos_token_id is not None and (new == tokenizer.eos_token_id).any():
        out = out[: prompt.size + int(np.argmax(new == tokenizer.eos_token_id))]  # the text ends at eos
    _write_stdout(tokenizer.decode_bytes(out) + b"\n")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    model, tokenizer = load_model_and_tokenizer(args.model, args.adapter, args.device)
    merged = model.merge_and_unload(safe_merge=True)
    merged.save_pretrained(args.out)
    tokenizer.save(args.out)  # its tokenizer files, if the base has them
    print(f"merged model saved to {args.out} (loads with tinypeft and with transformers' GPT2LMHeadModel)")
    return 0


def cmd_export_vectors(args: argparse.Namespace) -> int:
    from .vectors import export_vectors

    names = export_vectors(args.dir, args.cases, args.dtype)
    print(f"wrote {len(names)} golden cases to {args.dir} (index.json, and per case case.json, weights.safetensors, ")
    print("expected.safetensors); VECTORS.md describes the format, `tinypeft check-vectors` runs a port on them")
    return 0


def cmd_check_vectors(args: argparse.Namespace) -> int:
    from .io import save_json
    from .vectors import check_all, load_entry_points

    results = check_all(args.dir, load_entry_points(args.impl), args.cases)
    reports = [r for result in results for r in result.reports]
    width = max(len(r.name) for r in reports) + 2
    print(f"{'case':{width}s}result  worst tensor: error / tolerance")
    for report in reports:
        worst = report.worst()
        summary = "" if worst is None else f"{worst.tensor}: {worst.error:.2e} / {worst.tolerance:.0e}"
        print(f"{report.name:{width}s}{'pass' if report.passed else 'FAIL':8s}{summary}")
        if report.failure:
            print(f"    {report.failure}")
        for check in report.checks:
            if args.verbose or check.passed is False:
                verdict = {True: "ok", False: "FAILED", None: "not checked"}[check.passed]
                note = f" ({check.note})" if check.note else ""
                print(f"    {check.tensor}: {check.error:.2e} / {check.tolerance:.0e} {verdict}{note}")
    failed = [r.name for r in reports if not r.passed]
    print()
    print(f"{'kind':23s}{'run':>5s}{'passed':>8s}  worst: error / tolerance (vector, tensor)")
    for result in results:
        if not result.reports:
            continue
        passed = sum(r.passed for r in result.reports)
        found = result.worst()
        worst = (
            "" if found is None else f"{found[1].error:.2e} / {found[1].tolerance:.0e} ({found[0]}, {found[1].tensor})"
        )
        print(f"{result.noun:23s}{len(result.reports):5d}{passed:8d}  {worst}")
    for result in results:
        if result.not_run:
            print(
                f"{result.not_run} {result.noun} not run: {args.impl} has no {result.missing_entry_point} (VECTORS.md)"
            )
    print(f"{len(reports)} cases: {len(reports) - len(failed)} passed, {len(failed)} failed")
    if args.report:
        cases = [_report_json(r, result.key) for result in results for r in result.reports]
        save_json(args.report, {"impl": args.impl, "cases": cases})
    if failed:  # what a non-zero status means, in one line where every command says it (the table is on stdout)
        names = ", ".join(failed[:3]) + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
        print(f"tinypeft check-vectors: {len(failed)} of {len(reports)} cases failed: {names}", file=sys.stderr)
    return 1 if failed else 0


def _report_json(report: Any, kind: str) -> dict[str, Any]:
    """A CaseReport for --report: errors as numbers, or strings where they are inf or nan (not JSON numbers)."""

    def number(x: float) -> float | str:
        return x if math.isfinite(x) else str(x)

    tensors = [
        {"tensor": c.tensor, "error": number(c.error), "tolerance": c.tolerance, "passed": c.passed, "note": c.note}
        for c in report.checks
    ]
    return {
        "name": report.name,
        "kind": kind,
        "method": report.method,
        "dtype": report.dtype,
        "passed": report.passed,
        "failure": report.failure,
        "tensors": tensors,
    }


# ------------------------------------------------------------------ bytes in, bytes out
def _argv_bytes(text: str, option: str) -> bytes:
    """The bytes given on the command line for `option`, exactly: os.fsencode undoes the decoding Python
    applied to argv (UTF-8, each other byte kept as a lone surrogate U+DC80..U+DCFF)."""
    try:
        return os.fsencode(text)
    except UnicodeEncodeError:  # a str from a caller of main(), holding a surrogate no byte decodes to
        raise ConfigError(f"{option} {text!r} holds a character that stands for no byte sequence") from None


def _utf8_text(text: str, option: str) -> str:
    """`option`'s bytes as text, for what needs text (finetune's sample prompt goes into summary.json)."""
    data = _argv_bytes(text, option)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{option} {data!r} is not UTF-8 (byte {data[e.start]:#04x} at {e.start}): finetune's prompt must be "
            "text; `tinypeft generate --prompt` takes any bytes (on a byte-level model)"
        ) from None


def _write_stdout(data: bytes) -> None:
    """Write bytes to stdout as they are (a text-only stream gets them decoded, undecodable bytes escaped)."""
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        sys.stdout.write(data.decode("utf-8", "surrogateescape"))
    else:
        buffer.write(data)
        buffer.flush()


@contextlib.contextmanager
def _byte_exact_stdio() -> Iterator[None]:
    """Print names as the bytes they came as: stdout writes a lone surrogate (a byte of a file name that
    is not UTF-8) back as that byte rather than raising UnicodeEncodeError, and stderr escapes it."""
    saved = []
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        if isinstance(stream, io.TextIOWrapper) and stream.errors != errors:
            saved.append((stream, stream.errors))
            stream.reconfigure(errors=errors)
    try:
        yield
    finally:
        for stream, errors in saved:
            stream.reconfigure(errors=errors)


def _one_line(text: str) -> str:
    """An error message as one line: a newline inside it (from a file name, say) shown as \\n."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "pretrain": cmd_pretrain,
    "finetune": cmd_finetune,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "merge": cmd_merge,
    "export-vectors": cmd_export_vectors,
    "check-vectors": cmd_check_vectors,
}


def main(argv: Sequence[str] | None = None) -> int:
    import numpy as np

    parser = build_parser()
    args = parser.parse_args(argv)
    # NumPy's floating-point warnings would print two lines each on stderr (an overflow in the optimizer at
    # --lr 1e308, say): tinypeft checks what they say itself (a non-finite loss, weights, logits) and
    # stops with one line that says what to change
    with _byte_exact_stdio(), np.errstate(all="ignore"):
        try:
            return COMMANDS[args.command](args)
        except TinyPeftError as e:
            print(f"tinypeft {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
            return 2
        except OSError as e:  # the machine's refusal (disk full, no permission): its own words, not a traceback
            print(f"tinypeft {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
            return 1
        except UnicodeEncodeError as e:  # a name that is not UTF-8 where tinypeft needs text (data.py's split)
            if "surrogates not allowed" not in e.reason:
                raise
            text = _one_line(f"{e.object!r} is not UTF-8, and tinypeft cannot use a name that is not here yet")
            print(f"tinypeft {args.command}: error: {text}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"tinypeft {args.command}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
