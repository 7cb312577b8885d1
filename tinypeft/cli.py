"""The `tinypeft` command: pretrain a base model, generate text.

Each subcommand is a function taking parsed arguments; `main` routes to it and turns tinypeft's
errors into a one-line message and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from .errors import TinyPeftError


def _add_train_args(p: argparse.ArgumentParser, steps: int, lr: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--batch_size", type=int, default=16, help="sequences per step (default 16)")
    g.add_argument("--seq_len", type=int, default=128, help="bytes per sequence (default 128)")
    g.add_argument(
        "--learning_rate",
        "--lr",
        dest="lr",
        type=float,
        default=lr,
        help=f"peak learning rate (default {lr})",
    )
    g.add_argument(
        "--warmup_steps",
        type=int,
        default=20,
        help="linear warm-up steps before the cosine decay (default 20)",
    )
    g.add_argument(
        "--weight_decay", type=float, default=0.0, help="AdamW decoupled weight decay on matrices (default 0)"
    )
    g.add_argument(
        "--grad_clip",
        type=float,
        default=1.0,
        help="clip the global gradient norm to this; 0 = off (default 1)",
    )
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="default adamw")
    g.add_argument("--eval_every", type=int, default=100, help="validation every N steps; 0 = only at start and end")
    g.add_argument("--eval_windows", type=int, default=32, help="validation windows of seq_len bytes (default 32)")
    g.add_argument("--checkpoint_every", type=int, default=100, help="resumable checkpoint every N steps; 0 = end only")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation and batches (default 0)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")


def _train_config(args: argparse.Namespace):
    from .train import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        optimizer=args.optimizer,
        eval_every=args.eval_every,
        eval_windows=args.eval_windows,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )


def cmd_pretrain(args: argparse.Namespace) -> int:
    import math

    from .data import VOCAB_SIZE, load_corpus
    from .io import save_json
    from .model import GPT, GPTConfig
    from .train import train

    train_config = _train_config(args)
    config = GPTConfig(
        vocab_size=VOCAB_SIZE,
        n_positions=args.n_positions,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        dtype=args.dtype,
    )
    if args.seq_len > config.n_positions:
        raise _usage(f"--seq_len {args.seq_len} exceeds --n_positions {config.n_positions}")
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
    final = result.evals[-1]["val"] if result.evals else float("nan")
    summary = {
        "command": "tinypeft " + " ".join(sys.argv[1:]),
        "config": config.to_hf_dict(),
        "corpus": corpus.describe(),
        "steps": result.steps,
        "seconds": round(time.perf_counter() - t0, 2),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "val_loss": final,
        "val_bits_per_byte": final / math.log(2),
        "evals": result.evals,
    }
    save_json(os.path.join(args.out, "summary.json"), summary)
    print(
        f"done: {result.steps} steps in {summary['seconds']} s ({summary['tokens_per_second']:,.0f} tokens/s); "
        f"val loss {final:.4f} nats/byte = {final / math.log(2):.3f} bits/byte (uniform: ln 256 = 5.545)"
    )
    print(f"model saved to {model_dir}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .data import decode, encode
    from .model import GPT

    model = GPT.from_pretrained(args.model, device=args.device)
    prompt = encode(args.prompt)
    if prompt.size == 0:
        raise _usage("--prompt must not be empty")
    out = model.generate(prompt[None, :], args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(decode(out[0]))
    return 0


class _UsageError(TinyPeftError, ValueError):
    pass


def _usage(message: str) -> _UsageError:
    return _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinypeft",
        description="Parameter-efficient fine-tuning from scratch in NumPy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "pretrain",
        help="train a base GPT from scratch on a corpus",
        description="Train a byte-level GPT from scratch (all parameters) and save it in transformers' GPT-2 "
        "format to OUT/model, with resumable checkpoints in OUT/checkpoints and OUT/summary.json.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--n_layer", type=int, default=4, help="transformer blocks (default 4)")
    m.add_argument("--n_embd", type=int, default=128, help="model width (default 128)")
    m.add_argument("--n_head", type=int, default=4, help="attention heads; must divide n_embd (default 4)")
    m.add_argument("--n_positions", type=int, default=256, help="longest sequence (default 256)")
    m.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="default float32")
    m.add_argument("--device", choices=["cpu", "cuda"], default=None, help="cpu (numpy) or cuda (cupy)")
    p.add_argument("--corpus", default="prose", help="'prose' (pydoc topics), 'code' (stdlib sources) or a path")
    p.add_argument("--out", default="runs/pretrain", help="run folder (default runs/pretrain)")
    _add_train_args(p, steps=300, lr=3e-3)
    p.set_defaults(func=cmd_pretrain)

    g = sub.add_parser(
        "generate",
        help="continue a prompt with a saved model",
        description="Continue a text prompt, byte by byte, with a model saved by `pretrain` or transformers.",
    )
    g.add_argument("--model", required=True, help="folder with config.json and model.safetensors")
    g.add_argument("--prompt", default="The ", help="text to continue (default 'The ')")
    g.add_argument("--max_new_tokens", type=int, default=200, help="bytes to generate (default 200)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (default 0)")
    g.add_argument("--top_k", type=int, default=None, help="sample only from the k most likely bytes")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="cpu (numpy) or cuda (cupy)")
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TinyPeftError as e:
        print(f"tinypeft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinypeft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
