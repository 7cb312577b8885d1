"""Softmax over the last axis."""

from __future__ import annotations

from ..backend import Array, namespace


def softmax_forward(x: Array) -> tuple[Array, Array]:
    """p = exp(x - max x) / sum exp(x - max x) over the last axis; subtracting the max changes
    nothing mathematically and keeps exp from overflowing. Cache: p."""
    xp = namespace(x)
    e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
    p = e / xp.sum(e, axis=-1, keepdims=True)
    return p, p


def softmax_backward(dp: Array, p: Array, out: Array | None = None) -> Array:
    """dx_i = sum_j dp_j dp_j/dx_i = p_i (dp_i - sum_j dp_j p_j), from dp_j/dx_i = p_j (delta_ij - p_i).

    out: where to write dx (may be dp itself, when the caller no longer needs it).
    """
    xp = namespace(dp)
    weighted = (dp * p).sum(axis=-1, keepdims=True)  # [..., 1]
    out = xp.subtract(dp, weighted, out=out)
    out *= p
    return out
