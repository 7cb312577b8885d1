"""Three ways to a gradient, so each can check the others.

1. The hand-written backward (`GPT.backward`, the ops' `*_backward`).
2. autograd (HIPS) differentiating the very forward we ship: the ops find their namespace from
   their inputs, so feeding them autograd's traced arrays runs the same lines under autograd.numpy.
3. Central finite differences in float64: element by element for small tensors, and along a random
   direction for any size,  (f(p + eps u) - f(p - eps u)) / (2 eps)  ~=  <grad f(p), u>,  with an
   error of O(eps^2) from truncation plus O(1e-16 |f| / eps) from rounding; eps = 1e-5 balances them
   near 1e-10 relative for the losses here.

Float32 finite differences are noise (about 1e-4 relative through a LayerNorm), so these checks
refuse anything but float64.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

Array = Any
Params = Mapping[str, Array]
LossFn = Callable[[Params], Any]  # params -> scalar loss, written with the shipped forward


def _require_float64(params: Params) -> None:
    bad = {k: str(v.dtype) for k, v in params.items() if v.dtype != np.float64}
    if bad:
        raise ValueError(f"gradient checks need float64 parameters; got {bad}")


def relative_error(a: Array, b: Array) -> float:
    """||a - b|| / max(||a||, ||b||), and 0 when both are exactly zero."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(float(np.linalg.norm(a)), float(np.linalg.norm(b)))
    return 0.0 if scale == 0.0 else float(np.linalg.norm(a - b)) / scale


def autograd_grads(loss_fn: LossFn, params: Params, wrt: list[str]) -> dict[str, np.ndarray]:
    """Gradients of loss_fn at params with respect to the names in wrt, by autograd's reverse mode."""
    from autograd import grad

    fixed = dict(params)

    def f(free: dict[str, Array]) -> Any:
        return loss_fn({**fixed, **free})

    return dict(grad(f)({k: params[k] for k in wrt}))


def finite_difference_grad(loss_fn: LossFn, params: Params, name: str, eps: float = 1e-6) -> np.ndarray:
    """d loss / d params[name], one central difference per element (for small tensors)."""
    _require_float64(params)
    base = params[name]
    g = np.zeros(base.shape)
    for idx in np.ndindex(base.shape):
        bump = np.zeros(base.shape)
        bump[idx] = eps
        hi = float(loss_fn({**params, name: base + bump}))
        lo = float(loss_fn({**params, name: base - bump}))
        g[idx] = (hi - lo) / (2 * eps)
    return g


def directional_check(
    loss_fn: LossFn,
    params: Params,
    grads: Mapping[str, Array],
    rng: np.random.Generator,
    eps: float = 1e-5,
) -> tuple[float, float, float]:
    """Compare <grads, u> with the central difference of loss_fn along a random unit direction u over
    every tensor in grads (each tensor's part of u drawn with unit norm). Returns
    (relative error, analytic, numeric).
    """
    _require_float64(params)
    direction = {}
    for name, g in grads.items():
        u = rng.standard_normal(np.shape(g))
        direction[name] = u / max(np.linalg.norm(u), 1e-300)
    analytic = sum(float(np.sum(np.asarray(grads[k]) * u)) for k, u in direction.items())
    hi = float(loss_fn({**params, **{k: params[k] + eps * u for k, u in direction.items()}}))
    lo = float(loss_fn({**params, **{k: params[k] - eps * u for k, u in direction.items()}}))
    numeric = (hi - lo) / (2 * eps)
    scale = max(abs(analytic), abs(numeric), 1e-300)
    return abs(analytic - numeric) / scale, analytic, numeric


def per_tensor_directional_check(
    loss_fn: LossFn, params: Params, grads: Mapping[str, Array], rng: np.random.Generator, eps: float = 1e-5
) -> dict[str, float]:
    """`directional_check` for each tensor on its own: a wrong gradient in a tensor with a small
    gradient cannot hide behind a large correct one."""
    return {k: directional_check(loss_fn, params, {k: g}, rng, eps)[0] for k, g in grads.items()}
