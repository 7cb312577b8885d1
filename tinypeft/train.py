"""The training loop: random batches, AdamW or SGD on the trainable tensors, warm-up + cosine
schedule, global-norm clipping, periodic evaluation, a progress bar, and checkpoints that resume
bit-exactly.

It trains anything with `loss_and_grad(ids, labels)`, `loss(ids, labels)` and
`trainable_parameters()`: a `GPT` (full or selective fine-tuning) or a `PeftModel`.

Checkpoints live in `<run>/checkpoints/step-NNNNNN/` (trainable tensors, optimizer state, and
state.json with the step, the batch generator's state and the history); `latest.json` names the
newest complete one and is replaced only after it is fully written, so a run killed mid-save
resumes from the previous checkpoint. Resuming restores all of it, so the resumed run computes
exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from . import memory
from .backend import Array
from .checks import check_seed
from .data import eval_windows, random_batch
from .errors import ConfigError, TrainingError
from .optim import SGD, AdamW, Optimizer, clip_grad_norm, cosine_schedule
from .train_checkpoints import (
    _is_number,
    _last_good,
    checkpoint_steps,
    claim_run_folder,
    load_checkpoint,
    run_identity,
    run_lock,
    save_checkpoint,
)


class Trainable(Protocol):
    def train(self, mode: bool = True) -> Any: ...
    def eval(self) -> Any: ...
    def loss_and_grad(self, input_ids: Any, labels: Any, attention_mask: Any = None) -> tuple[float, dict]: ...
    def loss(self, input_ids: Any, labels: Any, attention_mask: Any = None) -> float: ...
    def trainable_parameters(self) -> dict[str, Array]: ...
    def after_step(self, grads: Mapping[str, Array], step: int) -> None: ...


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes (saved with every checkpoint)."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    optimizer: str = "adamw"
    momentum: float = 0.9
    eval_every: int = 100
    eval_windows: int = 32
    checkpoint_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1; got {value!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0 (0 = never); got {value!r}")
        for name in ("lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0; got {value!r}")
        if not _is_number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be 'adamw' or 'sgd'; got {self.optimizer!r}")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1); got {self.momentum!r}")
        self.seed = check_seed(self.seed, error=ConfigError)  # a plain int: it goes into state.json

    def make_optimizer(self) -> Optimizer:
        if self.optimizer == "sgd":
            return SGD(self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return AdamW(self.lr, weight_decay=self.weight_decay)

    def lr_at(self, step: int) -> float:
        return cosine_schedule(step, self.steps, self.lr, self.warmup_steps, self.min_lr_ratio)


@dataclass
class TrainResult:
    """What a run did. train_losses: one row per step (step, loss, lr, grad_norm, and the step's own
    seconds); evals: one row per evaluation (step and a loss per evaluation set); seconds: the
    training loop's wall time, mid-run evaluations included."""

    steps: int
    seconds: float
    tokens_per_second: float
    train_losses: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def median_step_seconds(self) -> float:
        """Median time of one optimizer step (forward, backward, update), evaluations excluded; the
        median shrugs off the steps another process on the machine slowed down. NaN if no step was
        timed (rows from checkpoints written before steps were timed lack it)."""
        times = [row["seconds"] for row in self.train_losses if "seconds" in row]
        return float(np.median(times)) if times else math.nan


def evaluate(model: Trainable, data: np.ndarray, seq_len: int, max_windows: int = 32, batch_size: int = 16) -> float:
    """Mean loss (nats per predicted byte) over a fixed set of windows of `data`."""
    for name, value, least in (("seq_len", seq_len, 2), ("max_windows", max_windows, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ConfigError(f"evaluate: {name} must be an integer >= {least}; got {value!r}")
    memory.check_step(model, min(batch_size, max_windows, len(data) // seq_len), seq_len)  # eval_windows' rows
    windows = eval_windows(data, seq_len, max_windows)
    total = 0.0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        total += model.loss(batch, batch) * len(batch)  # every window has seq_len - 1 targets
    return total / len(windows)


def train(
    model: Trainable,
    train_data: np.ndarray,
    config: TrainConfig,
    eval_sets: Mapping[str, np.ndarray] | None = None,
    run_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    stop_after: int | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train `model` for config.steps steps on random windows of `train_data`.

    eval_sets: name -> bytes, each evaluated every config.eval_every steps and at the end.
    run_dir: where checkpoints go (every config.checkpoint_every steps and at the end), locked while the
    run uses it; `resume=True` picks up from its latest checkpoint, which must be of the same run (same
    settings and identity, see train_checkpoints.py; config.steps may differ: extending a run says what
    it does to the schedule); a new run refuses a folder holding another run's checkpoints unless
    `overwrite`. stop_after ends the run early after that many steps (the schedule still spans
    config.steps): what a test uses to interrupt a run.
    """
    states = 2 if config.optimizer == "adamw" else int(config.momentum > 0)  # the optimizer's arrays per tensor
    memory.check_step(model, config.batch_size, config.seq_len, optimizer_states=states)
    if run_dir is None:
        if resume:
            raise ConfigError("resume=True needs the run_dir holding the checkpoints")
        return _train(model, train_data, config, eval_sets, None, False, progress, log, stop_after, overwrite)
    with run_lock(run_dir):
        return _train(model, train_data, config, eval_sets, run_dir, resume, progress, log, stop_after, overwrite)


def _train(
    model: Trainable,
    train_data: np.ndarray,
    config: TrainConfig,
    eval_sets: Mapping[str, np.ndarray] | None,
    run_dir: str | None,
    resume: bool,
    progress: bool,
    log: Callable[[str], None] | None,
    stop_after: int | None,
    overwrite: bool,
) -> TrainResult:
    from tqdm.auto import tqdm

    say = log or (tqdm.write if progress else functools.partial(print, flush=True))
    model.train()  # dropout (in methods that have it) on while training, off for evaluation
    if not (params := model.trainable_parameters()):
        raise ConfigError("the model has no trainable parameters; choose a method or unfreeze something")
    eval_sets, optimizer, rng = dict(eval_sets or {}), config.make_optimizer(), np.random.default_rng(config.seed)
    result = TrainResult(steps=0, seconds=0.0, tokens_per_second=0.0)
    identity = run_identity(model, train_data, eval_sets)
    if resume:
        start = _resume_point(run_dir, model, optimizer, rng, result, config, identity, say)
    else:
        start = 0
        if run_dir is not None:
            claim_run_folder(run_dir, overwrite, say)
    end = config.steps if stop_after is None else min(config.steps, stop_after)

    run_evals = functools.partial(_evaluate_all, model, eval_sets, config, result=result, say=say)
    if start == 0:
        run_evals(0)
    tokens_per_step = config.batch_size * config.seq_len
    bar = tqdm(total=config.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for step in range(start, end):
            row = _step(model, params, optimizer, train_data, config, rng, step, run_dir)
            result.train_losses.append(row)
            elapsed = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{tokens_per_step * (step + 1 - start) / elapsed:,.0f}")
            done = step + 1
            if config.eval_every and done % config.eval_every == 0 and done != config.steps:
                run_evals(done)
            if run_dir and config.checkpoint_every and done % config.checkpoint_every == 0 and done != config.steps:
                save_checkpoint(run_dir, done, model, optimizer, rng, result, config, identity)
    finally:
        bar.close()
        model.eval()
    seconds = time.perf_counter() - t0
    result.steps, result.seconds = end, result.seconds + seconds
    result.tokens_per_second = tokens_per_step * (end - start) / max(seconds, 1e-9)
    if end == config.steps and start < end:  # a finished run resumed has its final evaluation already
        run_evals(end)
    if run_dir:
        save_checkpoint(run_dir, end, model, optimizer, rng, result, config, identity)
    return result


def _resume_point(
    run_dir: str,
    model: Trainable,
    optimizer: Optimizer,
    rng: np.random.Generator,
    result: TrainResult,
    config: TrainConfig,
    identity: Mapping[str, Any],
    say: Callable[[str], None],
) -> int:
    """The step a resumed run starts from, with the model, optimizer, batch generator and result as
    the latest checkpoint left them; a run resumed with another step count says what that does."""
    start = load_checkpoint(run_dir, model, optimizer, rng, result, config, identity)
    saved_steps = checkpoint_steps(run_dir)
    if saved_steps != config.steps:
        verb = "extending" if config.steps > saved_steps else "shortening"
        before = dataclasses.replace(config, steps=saved_steps)
        then = f"{before.lr_at(start):.3g}" if start < saved_steps else "none: it had ended"
        say(
            f"{verb} the run from {saved_steps} to {config.steps} steps: the warm-up and cosine schedule now spans "
            f"{config.steps} steps, so step {start + 1} trains at learning rate {config.lr_at(start):.3g} "
            f"(the {saved_steps}-step schedule's: {then})"
        )
    return start


def _evaluate_all(
    model: Trainable,
    eval_sets: Mapping[str, np.ndarray],
    config: TrainConfig,
    step: int,
    *,
    result: TrainResult,
    say: Callable[[str], None],
) -> None:
    """Evaluate every set (dropout off), record the row in `result` and log it."""
    if not eval_sets:
        return
    model.eval()
    row = {"step": step} | {
        name: evaluate(model, data, config.seq_len, config.eval_windows, config.batch_size)
        for name, data in eval_sets.items()
    }
    model.train()
    result.evals.append(row)
    say(f"step {step:5d} | " + " | ".join(f"{k} loss {v:.4f}" for k, v in row.items() if k != "step"))


def _step(
    model: Trainable,
    params: Mapping[str, Any],
    optimizer: Optimizer,
    train_data: np.ndarray,
    config: TrainConfig,
    rng: np.random.Generator,
    step: int,
    run_dir: str | None,
) -> dict[str, float]:
    """One optimizer step on a random batch; returns its row (step, loss, lr, grad_norm, seconds)."""
    step_start = time.perf_counter()
    batch = random_batch(train_data, config.batch_size, config.seq_len, rng)
    loss, grads = model.loss_and_grad(batch, batch)
    grads, grad_norm = clip_grad_norm(grads, config.grad_clip)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        kept = _last_good(run_dir)
        raise TrainingError(
            f"the loss became non-finite at step {step + 1} (loss {loss}, gradient norm {grad_norm}); "
            f"training stopped with no update applied. Last good checkpoint: {kept or 'none saved'}. "
            "Try a lower learning rate or gradient clipping."
        )
    lr = config.lr_at(step)
    optimizer.step(params, grads, lr)
    model.after_step(grads, step)  # a method that adapts between steps (AdaLoRA's ranks); a no-op for the rest
    # the step's own time, evaluations excluded: what a step-time comparison wants
    return {
        "step": step + 1,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "seconds": time.perf_counter() - step_start,
    }
