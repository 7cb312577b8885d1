"""The `tinypeft` command's options: one argparse table per subcommand.

`finetune`'s --method choices, their help and default, and the "method options" group are built from
the method registry (tinypeft/methods/registry.py): each method declares the flags it reads, and an
option two methods read (--target_modules, --num_virtual_tokens) appears once, its help prefixed by
both names. The subcommands' functions are in cli.py, which routes `args.command` to them.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import NoReturn

from . import __version__
from .errors import ConfigError
from .methods import METHODS
from .methods.registry import Flag, default_method

DEFAULT_TASK_CORPUS = "code"
DEFAULT_PROSE_CORPUS = "prose"
DEVICE_HELP = "cpu (numpy) or cuda (cupy); default: $TINYPEFT_BACKEND, else cpu"


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with an error in one line (argparse prints the usage block before it, which is
    the same many lines for every mistake): the error, and where to find the options."""

    def error(self, message: str) -> NoReturn:
        message = message.replace("\r", "\\r").replace("\n", "\\n")  # an argument holding a newline
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None and a flag's False: their help says what happens instead
    (0 and 0.0 are defaults like any other, though they equal False). A help of several lines (--method's
    list) keeps its lines, each wrapped on its own."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        if "\n" not in text:
            return super()._split_lines(text, width)
        parts = []
        for line in text.splitlines():
            column = line.find("  ")  # "name  description": a wrapped description stays in its column
            column = column + len(line[column:]) - len(line[column:].lstrip()) if column > 0 else 0
            parts += textwrap.wrap(line, width, subsequent_indent=" " * column)
        return parts


# ------------------------------------------------------------------ methods
def method_flags() -> list[Flag]:
    """Every option a registered method reads, once, in registration order, its help prefixed by the
    methods that read it ("lora/ia3: layers to adapt ..."). Two declarations of one option must agree
    on everything but the help."""
    owners: dict[str, list[tuple[str, Flag]]] = {}
    for name, spec in METHODS.items():
        for flag in spec.flags:
            owners.setdefault(flag.dest, []).append((name, flag))
    flags = []
    for declared in owners.values():
        (first_name, first), *others = declared
        for name, flag in others:
            if flag.names != first.names or {**flag.kwargs, "help": ""} != {**first.kwargs, "help": ""}:
                raise ConfigError(f"methods {first_name} and {name} declare {flag.names[0]} differently")
        helps = [flag.kwargs.get("help", "") for _, flag in declared]
        if len(set(helps)) == 1:
            text = f"{'/'.join(name for name, _ in declared)}: {helps[0]}"
        else:
            text = "; ".join(f"{name}: {h}" for (name, _), h in zip(declared, helps, strict=True))
        flags.append(Flag(first.names, {**first.kwargs, "help": text}))
    return flags


def method_help() -> str:
    """--method's help: one line per registered method, in registration order, with its learning rate."""
    width = max(len(name) for name in METHODS)
    lines = [f"{name:<{width}}  {spec.help} (lr {spec.default_lr:g})" for name, spec in METHODS.items()]
    return "\n".join(["the method, and the learning rate it trains at unless --lr (default: %(default)s):", *lines])


def _add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=list(METHODS), default=default_method(), help=method_help())
    g = p.add_argument_group("method options")
    for flag in method_flags():
        g.add_argument(*flag.names, **flag.kwargs)


# ------------------------------------------------------------------ shared
def _add_train_args(
    p: argparse.ArgumentParser,
    steps: int,
    lr: float | None,
    lr_help: str,
    eval_every: int = 100,
    batch_size: int = 16,
    seq_len: int | None = 128,
    seq_len_help: str = "bytes per sequence (tokens for a model folder with a tokenizer.json)",
) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    g.add_argument("--batch_size", type=int, default=batch_size, help="sequences per step")
    g.add_argument("--seq_len", type=int, default=seq_len, help=seq_len_help)
    g.add_argument("--learning_rate", "--lr", dest="lr", type=float, default=lr, help=lr_help)
    g.add_argument("--warmup_steps", type=int, default=20, help="linear warm-up steps before the cosine decay")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW decoupled weight decay on matrices")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this; 0 = off")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="AdamW, or SGD with momentum 0.9")
    g.add_argument(
        "--eval_every", type=int, default=eval_every, help="evaluate every N steps; 0 = only at start and end"
    )
    g.add_argument("--eval_windows", type=int, default=32, help="validation windows of seq_len per corpus")
    g.add_argument("--checkpoint_every", type=int, default=100, help="resumable checkpoint every N steps; 0 = end")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation and batches")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument(
        "--overwrite", action="store_true", help="start afresh in an --out that holds another run (its checkpoints go)"
    )
    g.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help=DEVICE_HELP)


# ------------------------------------------------------------------ subcommands
def _pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        formatter_class=_DefaultsHelpFormatter,
        help="train a base GPT from scratch on a corpus",
        description="Train a byte-level GPT from scratch (all parameters). Writes OUT/model (transformers' "
        "GPT-2 format), resumable OUT/checkpoints, OUT/summary.json and OUT/loss.png.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--n_layer", type=int, default=4, help="transformer blocks")
    m.add_argument("--n_embd", type=int, default=128, help="model width")
    m.add_argument("--n_head", type=int, default=4, help="attention heads; must divide n_embd")
    m.add_argument("--n_positions", type=int, default=256, help="longest sequence")
    m.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="parameter and compute dtype")
    p.add_argument("--corpus", default="prose", help="'prose' (pydoc topics), 'code' (stdlib sources) or a path")
    p.add_argument("--out", default="runs/pretrain", help="run folder")
    _add_train_args(
        p,
        steps=300,
        lr=3e-3,
        lr_help="peak learning rate",
        batch_size=8,
        seq_len=None,
        seq_len_help="bytes per sequence (default: n_positions, so that every position embedding is trained)",
    )


def _finetune(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser(
        "finetune",
        formatter_class=_DefaultsHelpFormatter,
        help="fine-tune a base model with a PEFT method",
        description="Fine-tune a base model (default: the one shipped in the package) on a task corpus "
        "(default: the standard library's sources) with a PEFT method, measuring the task loss and the loss "
        "on the original prose corpus before and after (forgetting). Writes OUT/adapter (PEFT format; "
        "OUT/model for full fine-tuning), OUT/summary.json, OUT/loss.png and resumable OUT/checkpoints. A base "
        "folder holding tokenizer.json (a Hugging Face GPT-2 folder) tokenizes text with it: corpora must then be "
        "UTF-8, lengths count its tokens and losses are per token.",
    )
    f.add_argument("--base", default=None, help="base model folder (default: tinypeft/assets/base)")
    f.add_argument("--corpus", default=DEFAULT_TASK_CORPUS, help="task corpus: 'code', 'prose' or a path")
    f.add_argument("--prose_corpus", default=DEFAULT_PROSE_CORPUS, help="corpus to measure forgetting on")
    f.add_argument("--out", default="runs/finetune", help="run folder")
    f.add_argument("--prompt", default=None, help="sample prompt (default: the start of the task validation text)")
    f.add_argument("--prompt_bytes", type=int, default=48, help="length of the default prompt, in bytes or tokens")
    f.add_argument(
        "--sample_bytes", type=int, default=120, help="greedy sample length before and after, in bytes or tokens"
    )
    _add_method_args(f)
    _add_train_args(
        f,
        steps=200,
        lr=None,
        lr_help="peak learning rate (default: the method's, listed under --method)",
        eval_every=25,  # a few evaluations cost seconds and give the loss curve its shape
    )


def _eval(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "eval",
        formatter_class=_DefaultsHelpFormatter,
        help="validation loss of a model (and adapter) on corpora",
        description="Print the validation loss, in nats and bits per byte (per token for a model folder with "
        "a tokenizer.json), of a model (optionally with an adapter) on each corpus: a fixed set of windows, the "
        "same one finetune reports.",
    )
    e.add_argument("--model", default=None, help="model folder (default: the shipped base)")
    e.add_argument("--adapter", default=None, help="adapter folder (PEFT format) to apply (default: none)")
    e.add_argument("--corpus", nargs="+", default=[DEFAULT_TASK_CORPUS, DEFAULT_PROSE_CORPUS], help="corpora")
    e.add_argument(
        "--seq_len",
        type=int,
        default=128,
        help="bytes per validation window (tokens for a model folder with a tokenizer.json)",
    )
    e.add_argument("--eval_windows", type=int, default=32, help="validation windows per corpus")
    e.add_argument("--batch_size", type=int, default=16, help="windows per forward pass")
    e.add_argument("--device", choices=["cpu", "cuda"], default=None, help=DEVICE_HELP)


def _generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate",
        formatter_class=_DefaultsHelpFormatter,
        help="continue a prompt with a model (and adapter)",
        description="Continue a text prompt byte by byte (token by token with a model folder's tokenizer.json, "
        "ending at its eos token) with a model saved by tinypeft or transformers, optionally with an adapter "
        "(PEFT format): greedy by default, or sampled with --temperature/--top_k.",
    )
    g.add_argument("--model", default=None, help="model folder (default: the shipped base)")
    g.add_argument("--adapter", default=None, help="adapter folder (PEFT format) to apply (default: none)")
    g.add_argument("--prompt", default="The ", help="text to continue")
    g.add_argument(
        "--max_new_tokens",
        type=int,
        default=200,
        help="bytes to generate (tokens for a model folder with a tokenizer.json)",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    g.add_argument("--top_k", type=int, default=None, help="sample only from the k most likely tokens (default: all)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help=DEVICE_HELP)


def _merge(sub: argparse._SubParsersAction) -> None:
    mg = sub.add_parser(
        "merge",
        formatter_class=_DefaultsHelpFormatter,
        help="merge an adapter into its base: a plain model folder",
        description="Fold an adapter into its base model's weights (safe merge: refuses non-finite results) "
        "and save the merged model as config.json + model.safetensors.",
    )
    mg.add_argument("--model", default=None, help="base model folder (default: the shipped base)")
    mg.add_argument("--adapter", required=True, help="adapter folder (PEFT format)")
    mg.add_argument("--out", required=True, help="folder for the merged model")
    mg.add_argument("--device", choices=["cpu", "cuda"], default=None, help=DEVICE_HELP)


def _export_vectors(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser(
        "export-vectors",
        formatter_class=_DefaultsHelpFormatter,
        help="write golden vectors: every method's logits, loss and gradients on small cases",
        description="Write golden vectors for ports: for the base model and every method, small cases (odd "
        "sizes, rank 1, padded batches, virtual tokens filling the position table) in float64 and float32, each "
        "a folder with case.json (configs, inputs, loss, tolerances), weights.safetensors and "
        "expected.safetensors (logits and every trainable gradient); training trajectories, ten AdamW or SGD "
        "steps from some of the cases; the merged and unmerged base weights of every case whose method merges; "
        "greedy generations of a few; and the cases whose adapter files a port writes for tinypeft to read back. "
        "The same command writes the same bytes. VECTORS.md describes the format.",
    )
    x.add_argument("dir", help="folder to write the cases and index.json into")
    x.add_argument("--cases", nargs="+", default=["*"], metavar="GLOB", help="only cases whose name matches a glob")
    x.add_argument("--dtype", nargs="+", choices=["float64", "float32"], default=["float64", "float32"], help="dtypes")


def _check_vectors(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "check-vectors",
        formatter_class=_DefaultsHelpFormatter,
        help="run an implementation (a port) on golden vectors and compare",
        description="Load every golden case in DIR, call run_case(case) from the implementation MODULE, and "
        "compare its logits, loss and gradients with the expected ones, tensor by tensor, at the tolerances the "
        "vectors state; and each kind MODULE opts into, from the selected cases: run_trajectory(t) the training "
        "trajectories, merge_case(case) and unmerge_case(case) the merges, generate_case(g, use_cache) greedy "
        "generation with and without the KV cache, save_adapter(case, folder) the adapter round trips. Prints "
        "per kind how many ran and passed, and the worst error. Exit status 1 if any fails. VECTORS.md documents "
        "every interface.",
    )
    c.add_argument("dir", help="folder written by export-vectors")
    c.add_argument(
        "--impl",
        required=True,
        help="the implementation: a module name importable from here, or a .py file or package folder path; "
        "tinypeft.vectors is tinypeft itself",
    )
    c.add_argument("--cases", nargs="+", default=["*"], metavar="GLOB", help="only cases whose name matches a glob")
    c.add_argument("--verbose", "-v", action="store_true", help="print every tensor's error, not only failures")
    c.add_argument(
        "--report", default=None, help="also write every tensor's error to this JSON file (default: no file)"
    )


SUBCOMMANDS = (_pretrain, _finetune, _eval, _generate, _merge, _export_vectors, _check_vectors)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; `args.command` names the one given."""
    parser = _Parser(prog="tinypeft", description="Parameter-efficient fine-tuning from scratch in NumPy.")
    parser.add_argument("--version", action="version", version=f"tinypeft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser
