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
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .backend import namespace, to_numpy
from .checks import check_seed
from .data import eval_windows, random_batch
from .errors import CheckpointError, ConfigError, TrainingError
from .io import load_json, load_safetensors, save_json, save_safetensors
from .optim import SGD, AdamW, Optimizer, clip_grad_norm, cosine_schedule

Array = Any
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"


class Trainable(Protocol):
    def train(self, mode: bool = True) -> Any: ...
    def eval(self) -> Any: ...
    def loss_and_grad(self, input_ids: Any, labels: Any, attention_mask: Any = None) -> tuple[float, dict]: ...
    def loss(self, input_ids: Any, labels: Any, attention_mask: Any = None) -> float: ...
    def trainable_parameters(self) -> dict[str, Array]: ...


def _random_state(model: Trainable) -> dict[str, Any]:
    """The model's own random-generator states (a PeftModel's dropout; a GPT has none)."""
    return model.random_state() if hasattr(model, "random_state") else {}


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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
) -> TrainResult:
    """Train `model` for config.steps steps on random windows of `train_data`.

    eval_sets: name -> bytes, each evaluated every config.eval_every steps and at the end.
    run_dir: where checkpoints go (every config.checkpoint_every steps and at the end), and where
    `resume=True` picks up from. stop_after ends the run early after that many steps (the schedule
    still spans config.steps): what a test uses to interrupt a run.
    """
    from tqdm.auto import tqdm

    model.train()  # dropout (in methods that have it) on while training, off for evaluation
    params = model.trainable_parameters()
    if not params:
        raise ConfigError("the model has no trainable parameters; choose a method or unfreeze something")
    eval_sets = dict(eval_sets or {})
    optimizer = config.make_optimizer()
    rng = np.random.default_rng(config.seed)
    result = TrainResult(steps=0, seconds=0.0, tokens_per_second=0.0)
    start = 0
    if resume:
        if run_dir is None:
            raise ConfigError("resume=True needs the run_dir holding the checkpoints")
        start = load_checkpoint(run_dir, model, optimizer, rng, result, config)
    say = log or (tqdm.write if progress else functools.partial(print, flush=True))
    end = config.steps if stop_after is None else min(config.steps, stop_after)

    def run_evals(step: int) -> None:
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

    if start == 0 and eval_sets:
        run_evals(0)
    tokens_per_step = config.batch_size * config.seq_len
    bar = tqdm(total=config.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for step in range(start, end):
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
            # the step's own time, evaluations excluded: what a step-time comparison wants
            step_seconds = time.perf_counter() - step_start
            result.train_losses.append(
                {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "seconds": step_seconds}
            )
            elapsed = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step * (step + 1 - start) / elapsed:,.0f}")
            done = step + 1
            if config.eval_every and done % config.eval_every == 0 and done != config.steps:
                run_evals(done)
            if run_dir and config.checkpoint_every and done % config.checkpoint_every == 0 and done != config.steps:
                save_checkpoint(run_dir, done, model, optimizer, rng, result, config)
    finally:
        bar.close()
        model.eval()
    seconds = time.perf_counter() - t0
    result.steps = end
    result.seconds += seconds
    result.tokens_per_second = tokens_per_step * (end - start) / max(seconds, 1e-9)
    if end == config.steps and start < end:  # a finished run resumed has its final evaluation already
        run_evals(end)
    if run_dir:
        save_checkpoint(run_dir, end, model, optimizer, rng, result, config)
    return result


# ---------------------------------------------------------------- checkpoints
STEP_PREFIX = "step-"


def save_checkpoint(
    run_dir: str,
    step: int,
    model: Trainable,
    optimizer: Optimizer,
    rng: np.random.Generator,
    result: TrainResult,
    config: TrainConfig,
) -> str:
    """Write checkpoints/step-NNNNNN/ in full, then point latest.json at it, then drop older ones.

    Non-finite weights or optimizer state are refused with a TrainingError, before anything is
    written: the checkpoint latest.json names must be one a run can continue from.
    """
    tensors = model.trainable_parameters()
    optimizer_state = optimizer.state_dict()
    for kind, arrays in (("weights", tensors), ("optimizer state", optimizer_state)):
        broken = [name for name, value in arrays.items() if not np.isfinite(to_numpy(value)).all()]
        if broken:
            raise TrainingError(
                f"after step {step} the {kind} hold non-finite values (in {broken[:3]}); not saving a checkpoint. "
                f"Last good checkpoint: {_last_good(run_dir)}. Try a lower learning rate or gradient clipping."
            )
    folder = os.path.join(run_dir, CHECKPOINTS)
    name = f"{STEP_PREFIX}{step:06d}"
    path = os.path.join(folder, name)
    os.makedirs(path, exist_ok=True)
    save_safetensors(os.path.join(path, "trainable.safetensors"), tensors)
    save_safetensors(os.path.join(path, "optimizer.safetensors"), optimizer_state)
    state = {
        "step": step,
        "rng": rng.bit_generator.state,
        "model_rng": _random_state(model),
        "train_config": dataclasses.asdict(config),
        "result": result.to_dict(),
    }
    save_json(os.path.join(path, "state.json"), state)
    save_json(os.path.join(folder, LATEST), {"step": step, "path": name})
    for old in os.listdir(folder):
        if old.startswith(STEP_PREFIX) and old != name:
            shutil.rmtree(os.path.join(folder, old), ignore_errors=True)
    return path


def _latest(run_dir: str) -> tuple[str, int] | None:
    """(the folder latest.json names, its step), None if there is no latest.json, or a
    CheckpointError if it is unreadable or names something that is not a checkpoint folder."""
    pointer = os.path.join(run_dir, CHECKPOINTS, LATEST)
    if not os.path.exists(pointer):
        return None
    latest = load_json(pointer)
    name = latest.get("path") if isinstance(latest, dict) else None
    step = latest.get("step") if isinstance(latest, dict) else None
    # a plain step-N name: anything with a separator could point outside the run folder
    if not (isinstance(name, str) and name.startswith(STEP_PREFIX) and os.path.basename(name) == name):
        raise CheckpointError(f'{pointer} must be {{"step": N, "path": "step-NNNNNN"}}; got {latest!r}')
    if not _is_count(step):
        raise CheckpointError(f"{pointer} has step {step!r}; expected an integer >= 0")
    path = os.path.join(run_dir, CHECKPOINTS, name)
    if not os.path.isdir(path):
        raise CheckpointError(f"{pointer} names {name}, but {path} is not a folder")
    return path, step


def _last_good(run_dir: str | None) -> str:
    """The checkpoint a failed run leaves to resume from, for an error message (never raises)."""
    if not run_dir:
        return "none (no run folder)"
    try:
        latest = _latest(run_dir)
    except CheckpointError as e:
        return f"unreadable ({e})"
    return latest[0] if latest else "none saved"


def _is_history(rows: Any) -> bool:
    """A list of rows like {"step": 3, "loss": 2.1, ...}: what plots and summaries read back."""
    return isinstance(rows, list) and all(
        isinstance(r, dict) and "step" in r and all(_is_number(v) for v in r.values()) for r in rows
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_state(state: Any, path: str, step: int, config: TrainConfig, rng: np.random.Generator) -> None:
    """state.json must be what save_checkpoint writes, for this step and these settings."""
    where = os.path.join(path, "state.json")
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} must be a JSON object; got {type(state).__name__}")
    missing = [k for k in ("step", "rng", "train_config", "result") if k not in state]
    if missing:
        raise CheckpointError(f"{where} lacks {missing}; a checkpoint's state has step, rng, train_config and result")
    if state["step"] != step:
        raise CheckpointError(f"{where} is for step {state['step']!r}, but latest.json names step {step}")
    if step > config.steps:
        raise CheckpointError(f"{where} is for step {step}, past the run's {config.steps} steps")
    saved_config = state["train_config"]
    if not isinstance(saved_config, dict):
        raise CheckpointError(f"{where} has train_config {saved_config!r}; expected a JSON object")
    differing = {k: (v, saved_config.get(k)) for k, v in dataclasses.asdict(config).items() if saved_config.get(k) != v}
    differing.pop("checkpoint_every", None)
    if differing:
        raise CheckpointError(
            f"cannot resume {path}: the training config differs from the saved one ({differing}, as (now, saved)); "
            "a resumed run must use the same settings to continue the same computation"
        )
    try:  # the bit generator's own setter is the authority on what a valid state is
        type(rng.bit_generator)().state = state["rng"]
    except Exception as e:
        raise CheckpointError(f"{where} has an invalid random-generator state: {type(e).__name__}: {e}") from None
    result = state["result"]
    history_ok = (
        isinstance(result, dict)
        and _is_number(result.get("seconds"))
        and _is_history(result.get("train_losses"))
        and _is_history(result.get("evals"))
    )
    if not history_ok:
        raise CheckpointError(
            f"{where} has a malformed result; expected seconds (a number) and train_losses and evals "
            "(lists of objects of numbers, each with a step)"
        )


def load_checkpoint(
    run_dir: str,
    model: Trainable,
    optimizer: Optimizer,
    rng: np.random.Generator,
    result: TrainResult,
    config: TrainConfig,
) -> int:
    """Restore the newest checkpoint in run_dir into model, optimizer, rng and result; returns its step.

    Everything is read and checked before anything is changed, so a bad checkpoint raises a
    CheckpointError and leaves the model as it was."""
    latest = _latest(run_dir)
    if latest is None:
        raise CheckpointError(f"no checkpoint to resume from in {run_dir} (no {CHECKPOINTS}/{LATEST})")
    path, step = latest
    state = load_json(os.path.join(path, "state.json"))
    _check_state(state, path, step, config, rng)
    tensors = load_safetensors(os.path.join(path, "trainable.safetensors"))
    params = model.trainable_parameters()
    if set(tensors) != set(params):
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise CheckpointError(
            f"checkpoint {path} holds other tensors than this model trains: "
            f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}"
        )
    for name, value in tensors.items():
        if value.shape != tuple(params[name].shape):
            raise CheckpointError(f"checkpoint tensor {name} has shape {value.shape}; model has {params[name].shape}")
        if value.dtype != params[name].dtype:  # another dtype could not continue the same computation
            raise CheckpointError(f"checkpoint tensor {name} has dtype {value.dtype}; model has {params[name].dtype}")
    optimizer.load_state_dict(load_safetensors(os.path.join(path, "optimizer.safetensors")), params)
    model_rng = state.get("model_rng", {})  # checkpoints written before dropout's state was saved lack it
    if not isinstance(model_rng, dict):
        raise CheckpointError(
            f"checkpoint {path}: state.json's model_rng must be an object of random-generator states; "
            f"got {type(model_rng).__name__}"
        )
    if model_rng and not hasattr(model, "set_random_state"):
        raise CheckpointError(
            f"checkpoint {path} holds random-generator states {sorted(model_rng)[:3]}, but this model draws no "
            "random masks: it was written by another kind of run"
        )
    if model_rng or _random_state(model):
        model.set_random_state(model_rng)  # checks everything before it changes anything
    # checked: from here on nothing can fail
    for name, value in tensors.items():
        params[name][...] = namespace(params[name]).asarray(value)
    rng.bit_generator.state = state["rng"]
    saved = state["result"]
    result.train_losses[:] = saved["train_losses"]
    result.evals[:] = saved["evals"]
    result.seconds = saved["seconds"]
    return step
