"""Optimizers over trainable parameters only, gradient clipping, and the learning-rate schedule.

An optimizer holds state only for the tensors it is given gradients for, so a frozen parameter
costs no optimizer memory. Updates are written into the parameter arrays in place (the model's
dict and any adapter keep pointing at the same arrays). The update formulas are PyTorch's, in
the same order, so a float64 step agrees with `torch.optim.AdamW` / `SGD` to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .backend import namespace, to_numpy
from .errors import CheckpointError, ConfigError

Array = Any


def _check_positive(name: str, value: float, allow_zero: bool = True) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}; got {value!r}")


class Optimizer:
    """Base: `step(params, grads, lr)` updates params[name] in place for every name in grads."""

    def __init__(self, lr: float, weight_decay: float) -> None:
        _check_positive("lr", lr)
        _check_positive("weight_decay", weight_decay)
        self.lr = lr
        self.weight_decay = weight_decay
        self.t = 0
        self.state: dict[str, dict[str, Array]] = {}

    def decays(self, param: Array) -> bool:
        """Weight decay applies to matrices only, not to biases, LayerNorm or IA3 vectors (GPT practice)."""
        return self.weight_decay > 0 and param.ndim >= 2

    def step(self, params: Mapping[str, Array], grads: Mapping[str, Array], lr: float | None = None) -> None:
        unknown = set(grads) - set(params)
        if unknown:
            raise ConfigError(f"gradients for unknown parameters {sorted(unknown)[:3]}")
        self.t += 1
        lr = self.lr if lr is None else lr
        for name, g in grads.items():
            self._update(name, params[name], g, lr)

    def _update(self, name: str, p: Array, g: Array, lr: float) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat host arrays: `t` and `<slot>/<param name>` for every state tensor (safetensors-ready)."""
        out = {"t": np.array([self.t], dtype=np.int64)}
        for name, slots in self.state.items():
            for slot, value in slots.items():
                out[f"{slot}/{name}"] = to_numpy(value).copy()
        return out

    def load_state_dict(self, state: Mapping[str, Any], params: Mapping[str, Array]) -> None:
        """Restore from `state_dict()`; state arrays go to the device and dtype of their parameters."""
        if "t" not in state:
            raise CheckpointError("optimizer state lacks its step counter 't'")
        new: dict[str, dict[str, Array]] = {}
        for key, value in state.items():
            if key == "t":
                continue
            slot, _, name = key.partition("/")
            if name not in params:
                raise CheckpointError(f"optimizer state for {name!r}, which is not a trainable parameter here")
            p = params[name]
            if tuple(value.shape) != tuple(p.shape):
                raise CheckpointError(f"optimizer state {key!r} has shape {tuple(value.shape)}; parameter is {p.shape}")
            xp = namespace(p)
            new.setdefault(name, {})[slot] = xp.asarray(np.asarray(value, dtype=p.dtype))
        self.t = int(np.asarray(state["t"]).reshape(-1)[0])
        self.state = new


class SGD(Optimizer):
    """p <- p - lr * b,  b <- momentum * b + (g + wd * p)   (PyTorch's SGD, dampening 0)."""

    def __init__(self, lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ConfigError(f"momentum must be in [0, 1); got {momentum!r}")
        self.momentum = momentum

    def _update(self, name: str, p: Array, g: Array, lr: float) -> None:
        if self.decays(p):
            g = g + self.weight_decay * p
        if self.momentum:
            slots = self.state.setdefault(name, {})
            if "momentum" not in slots:
                slots["momentum"] = g.copy()
            else:
                slots["momentum"] *= self.momentum
                slots["momentum"] += g
            g = slots["momentum"]
        p -= lr * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), bias-corrected, as torch.optim.AdamW:

    p <- p (1 - lr wd)
    m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2
    p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, weight_decay)
        if not (len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"betas must be two numbers in [0, 1); got {betas!r}")
        _check_positive("eps", eps, allow_zero=False)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = eps

    def _update(self, name: str, p: Array, g: Array, lr: float) -> None:
        xp = namespace(p)
        b1, b2 = self.betas
        slots = self.state.setdefault(name, {})
        if not slots:
            slots["exp_avg"] = xp.zeros_like(p)
            slots["exp_avg_sq"] = xp.zeros_like(p)
        m, v = slots["exp_avg"], slots["exp_avg_sq"]
        if self.decays(p):
            p *= 1 - lr * self.weight_decay
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * (g * g)
        bias_correction1 = 1 - b1**self.t
        bias_correction2 = 1 - b2**self.t
        denom = xp.sqrt(v) / math.sqrt(bias_correction2) + self.eps
        p -= (lr / bias_correction1) * (m / denom)


def clip_grad_norm(grads: Mapping[str, Array], max_norm: float | None) -> tuple[dict[str, Array], float]:
    """(grads scaled so their global L2 norm is at most max_norm, the norm before clipping).

    The norm is over every tensor together, as torch.nn.utils.clip_grad_norm_; max_norm None or 0
    leaves the gradients as they are. A non-finite norm is returned as is (the caller stops).
    """
    total = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    if not max_norm or not math.isfinite(total) or total <= max_norm:
        return dict(grads), total
    scale = max_norm / (total + 1e-6)
    return {k: g * g.dtype.type(scale) for k, g in grads.items()}, total


def cosine_schedule(step: int, total_steps: int, lr: float, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """Learning rate at `step` (0-based): linear warm-up to lr over warmup_steps, then a cosine decay
    to min_lr_ratio * lr at total_steps."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
