"""Three ways to a gradient, so each can check the others.

1. The hand-written backward (`GPT.backward`, the ops' `*_backward`).
2. autograd (HIPS) differentiating the very forward we ship: the ops find their namespace from
   their inputs, so feeding them autograd's traced arrays runs the same lines under autograd.numpy.
3. Central finite differences in float64: element by element for small tensors, and along a random
   direction u for any size, where a fourth-order central difference of t -> loss(p + t u) is
   compared with <grad, u> (see `directional_check` for the error budget).

Float32 finite differences are noise (about 1e-4 relative through a LayerNorm), so these checks
refuse anything but float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .backend import Array, to_numpy

Params = Mapping[str, Array]
LossFn = Callable[[Params], Any]  # params -> scalar loss, written with the shipped forward


def _require_float64(params: Params) -> None:
    bad = {k: str(v.dtype) for k, v in params.items() if v.dtype != np.float64}
    if bad:
        raise ValueError(f"gradient checks need float64 parameters; got {bad}")


def relative_error(a: Array, b: Array, floor: float = 0.0) -> float:
    """||a - b|| / max(||a||, ||b||, floor), and 0 when all three are zero.

    floor sets the size below which a difference is rounding rather than disagreement, for tensors
    whose exact gradient is zero or nearly so (a LayerNorm over one feature has dweight == 0 exactly,
    which one library computes as 0 and another as 1e-15).
    """
    a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    scale = max(float(np.linalg.norm(a)), float(np.linalg.norm(b)), floor)
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
    eps: float = 1e-4,
) -> tuple[float, float, float]:
    """Compare <grads, u> with the numerical derivative of loss_fn along a random direction u through
    every tensor in grads (each tensor's part of u drawn with unit norm). Returns
    (relative error, analytic, numeric).

    The derivative is the fourth-order central difference
        (-f(2h) + 8 f(h) - 8 f(-h) + f(-2h)) / (12 h),   f(t) = loss(params + t u),
    whose truncation error is O(h^4) (~1e-16 at h = 1e-4) and whose rounding error is about
    1e-16 |f| / h (~1e-12 |f|). The error is taken relative to ||grads|| ||u||, the largest value
    <grads, u> can have (a random u in n dimensions makes <grads, u> itself about 1/sqrt(n) of it,
    and dividing by a near-cancelled sum would measure rounding noise, not the gradient), with a
    floor of 1e-5 max(1, |f|): a difference below 1e-11 |f|, ten times the quotient's own rounding
    noise, counts as agreement (an exactly-zero gradient, say, checked against pure noise).
    """
    _require_float64(params)
    direction = {}
    for name, g in grads.items():
        u = rng.standard_normal(np.shape(g))
        direction[name] = u / max(np.linalg.norm(u), 1e-300)
    analytic = sum(float(np.sum(np.asarray(grads[k]) * u)) for k, u in direction.items())

    def f(t: float) -> float:
        return float(loss_fn({**params, **{k: params[k] + t * u for k, u in direction.items()}}))

    f_plus, f_minus = f(eps), f(-eps)
    numeric = (-f(2 * eps) + 8 * f_plus - 8 * f_minus + f(-2 * eps)) / (12 * eps)
    grad_norm = math.sqrt(sum(float(np.sum(np.asarray(g, dtype=np.float64) ** 2)) for g in grads.values()))
    u_norm = math.sqrt(len(direction))
    noise_floor = 1e-5 * max(1.0, abs(f_plus + f_minus) / 2)
    scale = max(grad_norm * u_norm, abs(numeric), noise_floor)
    return abs(analytic - numeric) / scale, analytic, numeric


def per_tensor_directional_check(
    loss_fn: LossFn, params: Params, grads: Mapping[str, Array], rng: np.random.Generator, eps: float = 1e-4
) -> dict[str, float]:
    """`directional_check` for each tensor on its own: a wrong gradient in a tensor with a small
    gradient cannot hide behind a large correct one."""
    return {k: directional_check(loss_fn, params, {k: g}, rng, eps)[0] for k, g in grads.items()}


def model_loss_fn(
    view: Any, input_ids: Any, labels: Any = None, attention_mask: Any = None, output_weights: Any = None
) -> tuple[LossFn, Callable[[], tuple[float, dict[str, Array]]]]:
    """(loss_fn, hand_loss_and_grads) for a model's ComputeView (`model.view()`).

    With labels: the shifted, -100-ignoring causal-LM loss (positions a site puts in front get -100), plus
    the sites' loss terms (`Sites.loss_terms`, a regulariser of the adapter's tensors), as every loss has them.
    With output_weights R (B, T', V) instead: the linear functional sum(logits * R), which, unlike
    the shifted loss, also reaches the last position's logits.
    loss_fn(params) differentiates the reference forward (`gpt.forward`); hand() runs it and the
    engine's backward (`engine.backward`, proven equal to the reference's in tests/engine).
    """
    from . import checks, engine, gpt
    from .ops import causal_lm_loss_backward, causal_lm_loss_forward

    ids, mask = view.check_inputs(input_ids, attention_mask)
    if (labels is None) == (output_weights is None):
        raise ValueError("give exactly one of labels and output_weights")
    if labels is not None:
        leading = 0 if view.sites.embedding is None else view.sites.embedding.positions(view.params)
        labels = engine.pad_labels(checks.check_labels(labels, ids.shape, view.config.vocab_size, leading), leading)
        labels = view.xp.asarray(labels)  # on the model's device (the vectors' trajectories run there too)

    def loss_fn(params: Params) -> Any:
        logits, _ = gpt.forward(params, view.config, ids, mask, view.sites)
        if labels is None:
            return (logits * output_weights).sum()
        return causal_lm_loss_forward(logits, labels)[0] + sum(t.forward(params)[0] for t in view.sites.loss_terms)

    def hand() -> tuple[float, dict[str, Array]]:
        logits, cache = gpt.forward(view.params, view.config, ids, mask, view.sites)
        if labels is None:
            loss, dlogits = float((logits * output_weights).sum()), np.asarray(output_weights, dtype=logits.dtype)
        else:
            value, loss_cache = causal_lm_loss_forward(logits, labels)
            loss, dlogits = float(value), causal_lm_loss_backward(1.0, loss_cache)
            term_value, term_grads = engine.loss_terms(view)
            return loss + term_value, engine.add_grads(engine.backward(dlogits, cache, view), term_grads)
        return loss, engine.backward(dlogits, cache, view)

    return loss_fn, hand


def check_gradients(
    model: Any,
    input_ids: Any,
    labels: Any = None,
    attention_mask: Any = None,
    output_weights: Any = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """All three gradients of a float64 GPT or PeftModel at its current parameters, compared.

    Returns {public tensor name: {"autograd": relative error of the hand gradient against autograd's,
    "directional": relative error of its directional derivative against a central difference}} and,
    under "__all__", the directional error along one direction through every tensor at once.
    """
    view = model.view()
    _require_float64(view.params)
    loss_fn, hand = model_loss_fn(view, input_ids, labels, attention_mask, output_weights)
    _, grads = hand()
    auto = autograd_grads(loss_fn, view.params, sorted(grads))
    rng = np.random.default_rng(seed)
    directional = per_tensor_directional_check(loss_fn, view.params, grads, rng)
    report = {
        view.public_names.get(k, k): {"autograd": relative_error(grads[k], auto[k]), "directional": directional[k]}
        for k in grads
    }
    report["__all__"] = {"autograd": 0.0, "directional": directional_check(loss_fn, view.params, grads, rng)[0]}
    return report
