"""The `tinypeft` command: pretrain a base model, fine-tune it with a PEFT method, evaluate, generate, merge.

Each subcommand is a function of the parsed arguments; `main` routes to it and turns tinypeft's own
errors into a one-line message and exit status 2 instead of a traceback (the operating system's, such
as a full disk or a folder that cannot be written, into one line and status 1).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, TinyPeftError

DEFAULT_TASK_CORPUS = "code"
DEFAULT_PROSE_CORPUS = "prose"
DEVICE_HELP = "cpu (numpy) or cuda (cupy); default: $TINYPEFT_BACKEND, else cpu"


# ------------------------------------------------------------------ methods
@dataclass(frozen=True)
class MethodSpec:
    """A `finetune --method` choice: what it is, its default learning rate, and how its flags become a
    config (None: train the base model itself)."""

    help: str
    default_lr: float
    build: Callable[[argparse.Namespace], Any]


def _selective(args: argparse.Namespace):
    from .methods import SelectiveConfig

    if not args.trainable:
        raise ConfigError("--method selective needs --trainable PATTERN [PATTERN ...] (globs over parameter names)")
    return SelectiveConfig(patterns=args.trainable)


def _targets(value: list[str] | None) -> list[str] | None:
    return None if value is None else list(value)


def _prompt(args: argparse.Namespace):
    from .methods import PromptTuningConfig

    return PromptTuningConfig(
        num_virtual_tokens=args.num_virtual_tokens,
        prompt_tuning_init=args.prompt_tuning_init,
        prompt_tuning_init_text=args.prompt_tuning_init_text,
    )


def _prefix(args: argparse.Namespace):
    from .methods import PrefixTuningConfig

    return PrefixTuningConfig(
        num_virtual_tokens=args.num_virtual_tokens,
        prefix_projection=args.prefix_projection,
        encoder_hidden_size=args.encoder_hidden_size,
    )


def _ia3(args: argparse.Namespace):
    from .methods import IA3Config

    return IA3Config(
        target_modules=_targets(args.target_modules), feedforward_modules=_targets(args.feedforward_modules)
    )


def _adapter(args: argparse.Namespace):
    from .methods import AdapterConfig

    return AdapterConfig(
        bottleneck_size=args.bottleneck_size, non_linearity=args.non_linearity, placement=args.placement
    )


def _lora(args: argparse.Namespace):
    from .methods import LoraConfig

    init = {"true": True, "false": False}.get(args.init_lora_weights, args.init_lora_weights)
    return LoraConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.rank,
        lora_dropout=args.lora_dropout,
        target_modules=_targets(args.target_modules),
        use_rslora=args.use_rslora,
        use_dora=args.use_dora,
        init_lora_weights=init,
        bias=args.bias,
    )


def _methods() -> dict[str, MethodSpec]:
    from .methods import BitFitConfig, LastBlocksConfig, LNTuningConfig

    return {
        "lora": MethodSpec(
            "LoRA on --target_modules (rsLoRA, DoRA, PiSSA by flag); its rate was picked by a sweep, see the README",
            1e-2,
            _lora,
        ),
        "prompt": MethodSpec("prompt tuning: --num_virtual_tokens trainable input embeddings", 3e-2, _prompt),
        "prefix": MethodSpec("prefix tuning: trainable keys/values in every layer", 1e-2, _prefix),
        "ia3": MethodSpec("IA3: learned scaling of c_attn outputs and mlp.c_proj inputs", 2e-2, _ia3),
        "adapter": MethodSpec("bottleneck adapters after attn.c_proj and mlp.c_proj", 3e-3, _adapter),
        "full": MethodSpec("full fine-tuning: every parameter", 3e-4, lambda a: None),
        "bitfit": MethodSpec("BitFit: only the bias vectors", 3e-3, lambda a: BitFitConfig()),
        "lntuning": MethodSpec("LayerNorm tuning: ln_1, ln_2, ln_f", 3e-3, lambda a: LNTuningConfig()),
        "last_blocks": MethodSpec(
            "the last --num_blocks blocks and ln_f", 3e-4, lambda a: LastBlocksConfig(num_blocks=a.num_blocks)
        ),
        "selective": MethodSpec("the parameters matching --trainable globs", 1e-3, _selective),
    }


def method_defaults(method: str, *flags: str) -> tuple[Any, float]:
    """(config, learning rate) that `tinypeft finetune --method METHOD FLAGS...` trains with: the
    experiments use this, so they compare the very configurations the command line gives."""
    methods = _methods()
    if method not in methods:
        raise ConfigError(f"unknown method {method!r}; choose from {sorted(methods)}")
    args = build_parser().parse_args(["finetune", "--method", method, *flags])
    spec = methods[method]
    return spec.build(args), spec.default_lr if args.lr is None else args.lr


def _add_method_args(p: argparse.ArgumentParser, methods: dict[str, MethodSpec]) -> None:
    p.add_argument(
        "--method",
        choices=sorted(methods),
        default=DEFAULT_METHOD if DEFAULT_METHOD in methods else "bitfit",
        help="; ".join(f"{k}: {v.help} (lr {v.default_lr:g})" for k, v in sorted(methods.items())),
    )
    g = p.add_argument_group("method options")
    g.add_argument(
        "--target_modules",
        nargs="+",
        default=None,
        metavar="NAME",
        help="lora/ia3: layers to adapt (PEFT matching: a name or a suffix such as c_attn); default: PEFT's for gpt2",
    )
    g.add_argument("--rank", "-r", dest="rank", type=int, default=8, help="lora: rank r")
    g.add_argument("--lora_alpha", type=float, default=None, help="lora: scale numerator (default 2 * rank)")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="lora: dropout on the LoRA branch")
    g.add_argument("--use_rslora", action="store_true", help="lora: scale by alpha / sqrt(r) (rsLoRA)")
    g.add_argument("--use_dora", action="store_true", help="lora: weight-decomposed LoRA (DoRA)")
    g.add_argument(
        "--init_lora_weights",
        choices=["true", "false", "gaussian", "pissa"],
        default="true",
        help="lora: B = 0 with A uniform (true) or gaussian; false: both random; pissa: from the SVD of W",
    )
    g.add_argument("--bias", choices=["none", "all", "lora_only"], default="none", help="lora: which biases train")
    g.add_argument(
        "--feedforward_modules", nargs="+", default=None, metavar="NAME", help="ia3: targets scaled on input"
    )
    g.add_argument("--num_virtual_tokens", type=int, default=20, help="prompt/prefix: virtual tokens")
    g.add_argument(
        "--prompt_tuning_init",
        choices=["RANDOM", "SAMPLE_VOCAB", "TEXT"],
        default="SAMPLE_VOCAB",
        help="prompt: initialise from N(0,1), random vocabulary rows, or the bytes of --prompt_tuning_init_text "
        "(PEFT's default is RANDOM; vocabulary rows start the prompt at the scale of real inputs: see "
        "docs/experiments.md)",
    )
    g.add_argument("--prompt_tuning_init_text", default=None, help="prompt: text for TEXT initialisation")
    g.add_argument("--prefix_projection", action="store_true", help="prefix: reparameterise through a tanh MLP")
    g.add_argument("--encoder_hidden_size", type=int, default=None, help="prefix: MLP width (default n_embd)")
    g.add_argument("--bottleneck_size", type=int, default=16, help="adapter: bottleneck width")
    g.add_argument(
        "--non_linearity", choices=["relu", "gelu_tanh", "tanh", "silu"], default="relu", help="adapter: activation"
    )
    g.add_argument(
        "--placement", choices=["both", "attn", "mlp"], default="both", help="adapter: after attention, MLP, or both"
    )
    g.add_argument("--num_blocks", type=int, default=1, help="last_blocks: how many blocks to train")
    g.add_argument("--trainable", nargs="+", default=None, metavar="GLOB", help="selective: parameter name globs")


DEFAULT_METHOD = "lora"


# ------------------------------------------------------------------ shared
class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None and False: their help says what happens instead."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False):
            return action.help or ""
        return super()._get_help_string(action)


def _add_train_args(
    p: argparse.ArgumentParser,
    steps: int,
    lr: float | None,
    lr_help: str,
    eval_every: int = 100,
    batch_size: int = 16,
    seq_len: int | None = 128,
    seq_len_help: str = "bytes per sequence",
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
    g.add_argument("--eval_windows", type=int, default=32, help="validation windows of seq_len bytes per corpus")
    g.add_argument("--checkpoint_every", type=int, default=100, help="resumable checkpoint every N steps; 0 = end")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation and batches")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help=DEVICE_HELP)


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
    from .experiment import base_dir
    from .model import GPT
    from .peft_model import PeftModel

    model = GPT.from_pretrained(base_dir(base), device=device, dtype=dtype)
    return PeftModel.from_pretrained(model, adapter) if adapter else model


# ------------------------------------------------------------------ commands
def cmd_pretrain(args: argparse.Namespace) -> int:
    from .data import VOCAB_SIZE, load_corpus
    from .experiment import bits, maybe_plot_run
    from .io import save_json
    from .model import GPT, GPTConfig
    from .train import train

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
    if args.seq_len > config.n_positions:
        raise ConfigError(f"--seq_len {args.seq_len} exceeds --n_positions {config.n_positions}")
    if args.seq_len < config.n_positions:
        # a later fine-tune with virtual tokens, or a long sample, would read these never-trained rows
        print(
            f"note: --seq_len {args.seq_len} < --n_positions {config.n_positions}: position embeddings "
            f"{args.seq_len}..{config.n_positions - 1} are never seen in training"
        )
    train_config = _train_config(args, args.lr)
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

    spec = _methods()[args.method]
    lr = spec.default_lr if args.lr is None else args.lr
    train_config = _train_config(args, lr)
    os.makedirs(args.out, exist_ok=True)  # an unusable --out fails now, not after training
    base_folder = base_dir(args.base)
    base = GPT.from_pretrained(base_folder, device=args.device)
    method_config = spec.build(args)
    task, prose = load_corpus(args.corpus), load_corpus(args.prose_corpus)
    run = finetune(
        base,
        method_config,
        task,
        prose,
        train_config,
        method=args.method,
        out=args.out,
        resume=args.resume,
        progress=not args.no_progress,
        prompt=args.prompt,
        prompt_bytes=args.prompt_bytes,
        sample_bytes=args.sample_bytes,
        base_name=base_folder,
        command="tinypeft " + " ".join(sys.argv[1:]),
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

    model = load_model(args.model, args.adapter, args.device)
    for name in args.corpus:
        corpus = load_corpus(name)
        loss = evaluate(model, corpus.val, args.seq_len, args.eval_windows, args.batch_size)
        print(f"{name}: validation loss {loss:.4f} nats/byte = {bits(loss):.4f} bits/byte")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .data import decode, encode

    model = load_model(args.model, args.adapter, args.device)
    prompt = encode(args.prompt)
    if prompt.size == 0:
        raise ConfigError("--prompt must not be empty")
    out = model.generate(prompt[None, :], args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(decode(out[0]))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.adapter, args.device)
    merged = model.merge_and_unload(safe_merge=True)
    merged.save_pretrained(args.out)
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
    from .vectors import check_vectors, load_impl

    reports = check_vectors(args.dir, load_impl(args.impl), args.cases)
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
    print(f"{len(reports)} cases: {len(reports) - len(failed)} passed, {len(failed)} failed")
    if args.report:
        save_json(args.report, {"impl": args.impl, "cases": [_report_json(r) for r in reports]})
    return 1 if failed else 0


def _report_json(report: Any) -> dict[str, Any]:
    """A CaseReport for --report: errors as numbers, or strings where they are inf or nan (not JSON numbers)."""

    def number(x: float) -> float | str:
        return x if math.isfinite(x) else str(x)

    tensors = [
        {"tensor": c.tensor, "error": number(c.error), "tolerance": c.tolerance, "passed": c.passed, "note": c.note}
        for c in report.checks
    ]
    return {
        "name": report.name,
        "method": report.method,
        "dtype": report.dtype,
        "passed": report.passed,
        "failure": report.failure,
        "tensors": tensors,
    }


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    fmt = _DefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="tinypeft", description="Parameter-efficient fine-tuning from scratch in NumPy."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "pretrain",
        formatter_class=fmt,
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
    p.set_defaults(func=cmd_pretrain)

    methods = _methods()
    f = sub.add_parser(
        "finetune",
        formatter_class=fmt,
        help="fine-tune a base model with a PEFT method",
        description="Fine-tune a base model (default: the one shipped in the package) on a task corpus "
        "(default: the standard library's sources) with a PEFT method, measuring the task loss and the loss "
        "on the original prose corpus before and after (forgetting). Writes OUT/adapter (PEFT format; "
        "OUT/model for full fine-tuning), OUT/summary.json, OUT/loss.png and resumable OUT/checkpoints.",
    )
    f.add_argument("--base", default=None, help="base model folder (default: tinypeft/assets/base)")
    f.add_argument("--corpus", default=DEFAULT_TASK_CORPUS, help="task corpus: 'code', 'prose' or a path")
    f.add_argument("--prose_corpus", default=DEFAULT_PROSE_CORPUS, help="corpus to measure forgetting on")
    f.add_argument("--out", default="runs/finetune", help="run folder")
    f.add_argument("--prompt", default=None, help="sample prompt (default: the start of the task validation text)")
    f.add_argument("--prompt_bytes", type=int, default=48, help="length of the default prompt")
    f.add_argument("--sample_bytes", type=int, default=120, help="greedy sample length before and after")
    _add_method_args(f, methods)
    _add_train_args(
        f,
        steps=200,
        lr=None,
        lr_help="peak learning rate (default: the method's, listed under --method)",
        eval_every=25,  # a few evaluations cost seconds and give the loss curve its shape
    )
    f.set_defaults(func=cmd_finetune)

    e = sub.add_parser(
        "eval",
        formatter_class=fmt,
        help="validation loss of a model (and adapter) on corpora",
        description="Print the validation loss, in nats and bits per byte, of a model (optionally with an "
        "adapter) on each corpus: a fixed set of windows, the same one finetune reports.",
    )
    e.add_argument("--model", default=None, help="model folder (default: the shipped base)")
    e.add_argument("--adapter", default=None, help="adapter folder (PEFT format) to apply")
    e.add_argument("--corpus", nargs="+", default=[DEFAULT_TASK_CORPUS, DEFAULT_PROSE_CORPUS], help="corpora")
    e.add_argument("--seq_len", type=int, default=128, help="bytes per validation window")
    e.add_argument("--eval_windows", type=int, default=32, help="validation windows per corpus")
    e.add_argument("--batch_size", type=int, default=16, help="windows per forward pass")
    e.add_argument("--device", choices=["cpu", "cuda"], default=None, help=DEVICE_HELP)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser(
        "generate",
        formatter_class=fmt,
        help="continue a prompt with a model (and adapter)",
        description="Continue a text prompt byte by byte with a model saved by tinypeft or transformers, "
        "optionally with an adapter (PEFT format): greedy by default, or sampled with --temperature/--top_k.",
    )
    g.add_argument("--model", default=None, help="model folder (default: the shipped base)")
    g.add_argument("--adapter", default=None, help="adapter folder (PEFT format) to apply")
    g.add_argument("--prompt", default="The ", help="text to continue")
    g.add_argument("--max_new_tokens", type=int, default=200, help="bytes to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    g.add_argument("--top_k", type=int, default=None, help="sample only from the k most likely bytes")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help=DEVICE_HELP)
    g.set_defaults(func=cmd_generate)

    mg = sub.add_parser(
        "merge",
        formatter_class=fmt,
        help="merge an adapter into its base: a plain model folder",
        description="Fold an adapter into its base model's weights (safe merge: refuses non-finite results) "
        "and save the merged model as config.json + model.safetensors.",
    )
    mg.add_argument("--model", default=None, help="base model folder (default: the shipped base)")
    mg.add_argument("--adapter", required=True, help="adapter folder (PEFT format)")
    mg.add_argument("--out", required=True, help="folder for the merged model")
    mg.add_argument("--device", choices=["cpu", "cuda"], default=None, help=DEVICE_HELP)
    mg.set_defaults(func=cmd_merge)

    x = sub.add_parser(
        "export-vectors",
        formatter_class=fmt,
        help="write golden vectors: every method's logits, loss and gradients on small cases",
        description="Write golden vectors for ports: for the base model and every method, small cases (odd "
        "sizes, rank 1, padded batches, virtual tokens filling the position table) in float64 and float32, each "
        "a folder with case.json (configs, inputs, loss, tolerances), weights.safetensors and "
        "expected.safetensors (logits and every trainable gradient). The same command writes the same bytes. "
        "VECTORS.md describes the format.",
    )
    x.add_argument("dir", help="folder to write the cases and index.json into")
    x.add_argument("--cases", nargs="+", default=["*"], metavar="GLOB", help="only cases whose name matches a glob")
    x.add_argument("--dtype", nargs="+", choices=["float64", "float32"], default=["float64", "float32"], help="dtypes")
    x.set_defaults(func=cmd_export_vectors)

    c = sub.add_parser(
        "check-vectors",
        formatter_class=fmt,
        help="run an implementation (a port) on golden vectors and compare",
        description="Load every golden case in DIR, call run_case(case) from the implementation MODULE, and "
        "compare its logits, loss and gradients with the expected ones, tensor by tensor, at the tolerances the "
        "vectors state. Exit status 1 if any case fails. VECTORS.md documents the run_case interface.",
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
    c.add_argument("--report", default=None, help="also write every tensor's error to this JSON file")
    c.set_defaults(func=cmd_check_vectors)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TinyPeftError as e:
        print(f"tinypeft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's refusal (disk full, no permission): its own words, not a traceback
        print(f"tinypeft {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tinypeft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
