"""Training checkpoints that resume bit-exactly: the trainable tensors, the optimizer's state, the
batch generator's and the model's random states, the loss history, the run's config and its identity,
written as checkpoints/step-NNNNNN/ with latest.json pointing at the newest complete one.

A run's identity is everything besides the training config that makes two runs one computation: the
method and every field of its config (or the trainable names), the base model's config and a hash of
its weights, a hash of the training and evaluation bytes, and the thread count that splits a batch
into row blocks (another count rounds differently). Resume refuses any difference and names it.

A run folder is locked while a run uses it (`run_lock`), and a new run refuses a folder that holds
another run's checkpoints unless told to overwrite them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from . import runtime
from .backend import namespace, to_numpy
from .errors import CheckpointError, ConfigError, TrainingError
from .io import load_json, load_safetensors, save_json, save_safetensors
from .optim import Optimizer

if TYPE_CHECKING:
    from .train import Trainable, TrainConfig, TrainResult

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
STEP_PREFIX = "step-"
LOCK = ".tinypeft.lock"
_held: dict[str, int] = {}  # run folders this process holds, and how many times (the lock is reentrant)


@contextlib.contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """Hold `run_dir` for this run: a second run on it, in another process, gets a ConfigError at once.
    An advisory lock (flock) on run_dir/.tinypeft.lock, released when the run ends or its process dies."""
    key = os.path.realpath(run_dir)
    if _held.get(key):
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(
                f"run folder {run_dir} is in use by another tinypeft run (process {holder}); wait for it to end, "
                "or give another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)  # closing releases the lock


def claim_run_folder(run_dir: str, overwrite: bool, say: Any) -> None:
    """A new run may use run_dir only if it holds no other run's checkpoints, or `overwrite` is set
    (then they are deleted, and it says so)."""
    latest = os.path.join(run_dir, CHECKPOINTS, LATEST)
    if not os.path.lexists(latest):
        return
    if not overwrite:
        raise ConfigError(
            f"{run_dir} holds another run's checkpoints ({os.path.join(CHECKPOINTS, LATEST)}); resume it "
            "(--resume, resume=True), or replace it (--overwrite, overwrite=True), or give another output folder"
        )
    shutil.rmtree(os.path.join(run_dir, CHECKPOINTS))
    say(f"overwriting the run in {run_dir}: its checkpoints are deleted")


def run_identity(model: Any, train_data: np.ndarray, eval_sets: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """What makes two runs one computation besides the training config (see the module docstring)."""
    base = getattr(model, "base_model", model)
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None:
        method = peft_config[model.active_adapter].to_dict()
    else:
        method = {"trainable": sorted(model.trainable)}
    weights = hashlib.sha256()
    for name, value in base.params.items():
        host = np.ascontiguousarray(to_numpy(value))
        weights.update(f"{name}:{host.dtype}:{host.shape};".encode())
        weights.update(host.tobytes())
    on_cpu = getattr(base, "xp", np) is np
    return {
        "method": method,
        "base_config": base.config.to_hf_dict(),
        "base_weights_sha256": weights.hexdigest(),
        "train_data_sha256": _sha256(train_data),
        "eval_data_sha256": {name: _sha256(data) for name, data in sorted(eval_sets.items())},
        "threads": runtime.threads() if on_cpu else None,
    }


def _sha256(data: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def identity_differences(saved: Any, now: Mapping[str, Any]) -> list[str]:
    """Each field where two identities differ, as "field: now X, saved Y" (a method's config field by field)."""
    if not isinstance(saved, Mapping):
        return [f"identity: saved {saved!r} is not an object"]
    found = []
    for key, value in now.items():
        old = saved.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            found += [
                f"{key}.{k}: now {value.get(k)!r}, saved {old.get(k)!r}"
                for k in sorted(set(value) | set(old), key=str)
                if value.get(k) != old.get(k)
            ]
        elif value != old:
            found.append(f"{key}: now {_short(value)}, saved {_short(old)}")
    return found


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def save_checkpoint(
    run_dir: str,
    step: int,
    model: Trainable,
    optimizer: Optimizer,
    rng: np.random.Generator,
    result: TrainResult,
    config: TrainConfig,
    identity: Mapping[str, Any] | None = None,
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
        "identity": dict(identity or {}),
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


def checkpoint_steps(run_dir: str) -> int:
    """The step count (config.steps) of the run whose latest checkpoint is in run_dir (already checked)."""
    latest = _latest(run_dir)
    if latest is None:
        raise CheckpointError(f"no checkpoint in {run_dir} (no {CHECKPOINTS}/{LATEST})")
    return int(load_json(os.path.join(latest[0], "state.json"))["train_config"]["steps"])


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


def _check_state(
    state: Any, path: str, step: int, config: TrainConfig, rng: np.random.Generator, identity: Mapping[str, Any]
) -> None:
    """state.json must be what save_checkpoint writes, for this step, these settings and this run."""
    where = os.path.join(path, "state.json")
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} must be a JSON object; got {type(state).__name__}")
    missing = [k for k in ("step", "rng", "train_config", "result", "identity") if k not in state]
    if missing:
        raise CheckpointError(
            f"{where} lacks {missing}; a checkpoint's state has step, rng, train_config, result and identity"
        )
    if state["step"] != step:
        raise CheckpointError(f"{where} is for step {state['step']!r}, but latest.json names step {step}")
    if step > config.steps:
        raise CheckpointError(f"{where} is for step {step}, past the run's {config.steps} steps")
    saved_config = state["train_config"]
    if not isinstance(saved_config, dict):
        raise CheckpointError(f"{where} has train_config {saved_config!r}; expected a JSON object")
    differing = {k: (v, saved_config.get(k)) for k, v in dataclasses.asdict(config).items() if saved_config.get(k) != v}
    differing.pop("checkpoint_every", None)
    differing.pop("steps", None)  # extending (or shortening) a run is allowed: train() says what it does
    if differing:
        raise CheckpointError(
            f"cannot resume {path}: the training config differs from the saved one ({differing}, as (now, saved)); "
            "a resumed run must use the same settings to continue the same computation"
        )
    changed = identity_differences(state["identity"], identity)
    if changed:
        raise CheckpointError(
            f"cannot resume {path}: this is another run ({'; '.join(changed[:4])}"
            f"{' ...' if len(changed) > 4 else ''}); resume with the same method, base, corpus and threads "
            f"(TINYPEFT_THREADS), or start a new run"
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
    identity: Mapping[str, Any] | None = None,
) -> int:
    """Restore the newest checkpoint in run_dir into model, optimizer, rng and result; returns its step.
    Every field of `identity` (`run_identity`; train() passes it) must equal the saved one.

    Everything is read and checked before anything is changed, so a bad checkpoint raises a
    CheckpointError and leaves the model as it was."""
    latest = _latest(run_dir)
    if latest is None:
        raise CheckpointError(f"no checkpoint to resume from in {run_dir} (no {CHECKPOINTS}/{LATEST})")
    path, step = latest
    state = load_json(os.path.join(path, "state.json"))
    _check_state(state, path, step, config, rng, identity or {})
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


def _random_state(model: Trainable) -> dict[str, Any]:
    """The model's own random-generator states (a PeftModel's dropout; a GPT has none)."""
    return model.random_state() if hasattr(model, "random_state") else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
