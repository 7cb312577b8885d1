"""A fine-tuning run measured one way, for `tinypeft finetune` and for the experiments in examples/.

`finetune` takes a base model and a method config, trains on a task corpus, and reports what the
command prints: trainable parameters, validation loss on the task and on the original prose corpus
before and after (the forgetting), greedy samples before and after, and step time; given a run folder
it also writes the adapter (PEFT format), summary.json and a loss-curve PNG.

`lab.py` runs it over a grid (methods, ranks, learning rates) for the experiments in examples/.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .data import Corpus
from .errors import ConfigError
from .io import save_json
from .methods import PeftConfig
from .methods.virtual_tokens import VirtualTokenConfig
from .model import GPT
from .peft_model import PeftModel, get_peft_model
from .tokenizer import BYTES, Tokenizer
from .train import Trainable, TrainConfig, TrainResult, evaluate, train
from .train_checkpoints import run_lock

# set in the environment, these fix how many threads NumPy's BLAS uses (None: as many as cores)
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
SHIPPED_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "base")


def bits(nats: float) -> float:
    """Nats per byte as bits per byte."""
    return nats / math.log(2)


def base_dir(path: str | None) -> str:
    """The base model folder to use: `path`, else the one shipped in the package."""
    if path is not None:
        return path
    if os.path.exists(os.path.join(SHIPPED_BASE, "model.safetensors")):
        return SHIPPED_BASE
    raise ConfigError(
        "no --base given and no shipped base model in tinypeft/assets/base; "
        "make one with `tinypeft pretrain --out runs/pretrain` and pass --base runs/pretrain/model"
    )


def virtual_tokens(method_config: PeftConfig | None) -> int:
    """Positions a method adds in front of every sequence (prompt and prefix tuning), else 0."""
    return method_config.num_virtual_tokens if isinstance(method_config, VirtualTokenConfig) else 0


def check_fits(base: GPT, seq_len: int, method_config: PeftConfig | None) -> None:
    """Refuse, before any work, sequences that with the method's virtual tokens exceed the base's positions."""
    virtual = virtual_tokens(method_config)
    if seq_len + virtual > base.config.n_positions:
        extra = f" + {virtual} virtual tokens" if virtual else ""
        raise ConfigError(f"--seq_len {seq_len}{extra} exceeds the base model's n_positions {base.config.n_positions}")


def build_model(base: GPT, method_config: PeftConfig | None, seed: int = 0) -> Trainable:
    """The model to train: `base` itself for full fine-tuning (method_config None, so training changes
    `base`), otherwise `base` wrapped with a fresh adapter initialised from `seed`."""
    return base if method_config is None else get_peft_model(base, method_config, seed=seed)


def base_only(model: Trainable) -> contextlib.AbstractContextManager:
    """Inside this block `model` computes its base alone: a PeftModel's adapter is disabled (a soft
    prompt drawn at random is not the base model either); a plain GPT is its own base."""
    return model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()


def validation_losses(model: Trainable, eval_sets: Mapping[str, np.ndarray], config: TrainConfig) -> dict[str, float]:
    """The model's loss on each evaluation set, on the windows `train` evaluates."""
    model.eval()
    return {
        name: evaluate(model, data, config.seq_len, config.eval_windows, config.batch_size)
        for name, data in eval_sets.items()
    }


def greedy_sample(model: Any, prompt: str, n_bytes: int, tokenizer: Tokenizer = BYTES) -> str:
    """The model's greedy continuation of prompt, n_bytes tokens long ("" for n_bytes 0)."""
    if n_bytes <= 0:
        return ""
    ids = tokenizer.encode(prompt)[None, :]
    return tokenizer.decode(model.generate(ids, n_bytes)[0, ids.shape[1] :])


@dataclass
class FinetuneRun:
    """What `finetune` returns: the JSON-ready summary, the training history, and the trained model."""

    summary: dict[str, Any]
    result: TrainResult
    model: Trainable


def finetune(
    base: GPT,
    method_config: PeftConfig | None,
    task: Corpus,
    prose: Corpus,
    config: TrainConfig,
    *,
    method: str,
    out: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    quiet: bool = False,
    prompt: str | None = None,
    prompt_bytes: int = 48,
    sample_bytes: int = 120,
    base_name: str = "",
    command: str | None = None,
    base_losses: Mapping[str, float] | None = None,
    tokenizer: Tokenizer = BYTES,
) -> FinetuneRun:
    """Fine-tune `base` with `method_config` (None: full fine-tuning, which trains `base` itself) on
    task.train, and measure it on task.val and prose.val before and after.

    method names the method in the summary and the plot title; the adapter is initialised from
    config.seed. out, if given, receives resumable checkpoints, `adapter/` (PEFT format; `model/` for
    full fine-tuning), summary.json and loss.png (when matplotlib is installed); it is locked for the
    whole run, and a folder holding another run is refused unless `overwrite` (see `train`). quiet
    prints nothing; otherwise the header (corpora, method, trainable parameters) and train's evaluation
    lines are printed. prompt defaults to the first prompt_bytes of the task's validation text. Raises
    TrainingError if the loss turns non-finite.

    "before" is the base model alone (the adapter disabled), so a method whose adapter does not start
    as the identity (prompt tuning's random soft prompt) is measured against the model it changes;
    base_losses, if given, are those numbers already measured on the same windows (a grid of runs
    measures the base once). The evaluations in "evals" are of the model being trained, from step 0.

    tokenizer is the base's (`tinypeft.tokenizer.load_tokenizer`), which made the corpora's ids: it
    turns the prompt and samples into text, prompt_bytes and sample_bytes count its tokens, and losses
    are per token (per byte for the byte tokenizer). A full fine-tune's model/ gets its files.
    """
    check_fits(base, config.seq_len, method_config)
    if out is not None:
        os.makedirs(out, exist_ok=True)  # an unusable folder fails now, not after training
    with run_lock(out) if out is not None else contextlib.nullcontext():
        model = build_model(base, method_config, seed=config.seed)
        if not quiet:
            base_line = [f"base model: {base_name}"] if base_name else []
            base_line += [f"tokenizer: {tokenizer.name}"] if tokenizer.unit != "byte" else []
            print("\n".join([*base_line, f"task corpus   {task.describe()}", f"prose corpus  {prose.describe()}"]))
            print(f"method: {method} (learning rate {config.lr:g})\n{model.trainable_parameters_line()}")
        if prompt is None:
            prompt = tokenizer.decode(task.val[:prompt_bytes])
        # a sample longer than the positions left after the virtual tokens and the prompt is cut short
        room = base.config.n_positions - virtual_tokens(method_config) - len(tokenizer.encode(prompt)) + 1
        sample_bytes = min(sample_bytes, max(room, 0))
        eval_sets = {"task": task.val, "prose": prose.val}
        with base_only(model):
            before = dict(base_losses) if base_losses is not None else validation_losses(model, eval_sets, config)
            samples = [greedy_sample(model, prompt, sample_bytes, tokenizer)]
        t0 = time.perf_counter()
        quiet_log = (lambda line: None) if quiet else None
        result = train(
            model, task.train, config, eval_sets, out, resume, progress and not quiet, quiet_log, None, overwrite
        )
        seconds = time.perf_counter() - t0
        after = {k: v for k, v in result.evals[-1].items() if k != "step"}
        samples.append(greedy_sample(model, prompt, sample_bytes, tokenizer))
        saved, plot = _save_run(out, model, tokenizer, result, f"{method} fine-tuning", task, prose, config)
        bits_key = f"bits_per_{tokenizer.unit}"
        summary = {
            "command": command,
            "base": base_name,
            **({} if tokenizer.unit == "byte" else {"tokenizer": tokenizer.name, "unit": tokenizer.unit}),
            "method": method,
            "method_config": None if method_config is None else method_config.to_dict(),
            "train_config": asdict(config),
            "task_corpus": task.describe(),
            "prose_corpus": prose.describe(),
            "trainable_parameters": sum(int(v.size) for v in model.trainable_parameters().values()),
            "trainable_line": model.trainable_parameters_line(),
            **_timings(seconds, result),
            "before": {k: {"loss": v, bits_key: bits(v)} for k, v in before.items()},
            "after": {k: {"loss": v, bits_key: bits(v)} for k, v in after.items()},
            "task_gain": before["task"] - after["task"],
            "prose_forgetting": after["prose"] - before["prose"],
            "prompt": prompt,
            "sample_before": samples[0],
            "sample_after": samples[1],
            "evals": result.evals,
            "saved": saved,
            "plot": plot,
        }
        if out is not None:
            save_json(os.path.join(out, "summary.json"), summary)
    return FinetuneRun(summary, result, model)


def _timings(seconds: float, result: TrainResult) -> dict[str, float]:
    return {
        "seconds": round(seconds, 2),
        "seconds_per_step": round(result.seconds / max(1, result.steps), 4),
        "median_step_seconds": round(result.median_step_seconds(), 4),
        "tokens_per_second": round(result.tokens_per_second, 1),
    }


def _save_run(
    out: str | None,
    model: Trainable,
    tokenizer: Tokenizer,
    result: TrainResult,
    what: str,
    task: Corpus,
    prose: Corpus,
    config: TrainConfig,
) -> tuple[str | None, str | None]:
    """(where the adapter, or for full fine-tuning the model, was saved; the loss plot), both None without `out`."""
    if out is None:
        return None, None
    full = not isinstance(model, PeftModel)
    saved = os.path.join(out, "model" if full else "adapter")
    model.save_pretrained(saved)
    if full:  # a model folder that loads with its tokenizer, here and in transformers
        tokenizer.save(saved)
    trainable = sum(int(v.size) for v in model.trainable_parameters().values())
    plot = maybe_plot_run(
        result,
        os.path.join(out, "loss.png"),
        f"{what} on {task.name}, learning rate {config.lr:g}\n{trainable:,d} trainable parameters",
        {"task": f"task ({task.name}) validation loss", "prose": f"original ({prose.name}) validation loss"},
        tokenizer.unit,
    )
    return saved, plot


def report(summary: dict[str, Any], task_name: str, prose_name: str) -> str:
    """The before/after table, the change in each loss, and the samples, as `tinypeft finetune` prints them."""
    before = {k: v["loss"] for k, v in summary["before"].items()}
    after = {k: v["loss"] for k, v in summary["after"].items()}
    per_token = summary.get("unit", "byte") == "token"  # nats and bits per token: bpt
    lines = [f"{'':8s}{'task (' + task_name + ')':>24s}{'prose (' + prose_name + ')':>24s}"]
    for label, row in (("before", before), ("after", after)):
        cells = "".join(
            f"{row[k]:10.4f} nats {bits(row[k]):6.3f} {'bpt' if per_token else 'bpb'}" for k in ("task", "prose")
        )
        lines.append(f"{label:8s}{cells}")
    lines.append(
        f"task loss {before['task']:.4f} -> {after['task']:.4f} ({-summary['task_gain']:+.4f}); "
        f"prose loss {before['prose']:.4f} -> {after['prose']:.4f} "
        f"({summary['prose_forgetting']:+.4f}; positive means forgetting)"
    )
    lines.append(f"\nprompt: {summary['prompt']!r}")
    lines.append(f"  before: {summary['sample_before']!r}\n  after:  {summary['sample_after']!r}")
    return "\n".join(lines)


def maybe_plot_run(
    result: TrainResult, path: str, title: str, labels: dict[str, str], unit: str = "byte"
) -> str | None:
    """The run's loss curves as a PNG at path, or None without matplotlib."""
    from .plots import have_matplotlib, plot_training

    if not have_matplotlib():
        return None
    return plot_training(result.train_losses, result.evals, path, title, labels, unit)
