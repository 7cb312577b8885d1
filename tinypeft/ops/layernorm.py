"""Layer normalisation over the last axis (biased variance, eps inside the square root)."""

from __future__ import annotations

from ..backend import Array, namespace


def layernorm_forward(x: Array, weight: Array, bias: Array, eps: float = 1e-5) -> tuple[Array, tuple]:
    """y = w * xhat + b,  xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps), over the last axis.

    x: (..., C) -> y: (..., C). Cache: xhat (..., C), rstd (..., 1) and w; mean and x are not
    kept, since the backward needs only xhat and rstd.
    """
    xp = namespace(x, weight)
    mean = xp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    var = xp.mean(xc * xc, axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + eps)
    xhat = xc * rstd
    return xhat * weight + bias, (xhat, rstd, weight)


def layernorm_backward(
    dy: Array, cache: tuple, need_dx: bool = True, need_dparams: bool = True
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients of y = w * xhat + b.

    in the forward pass this was: xhat = (x - mean(x)) * rstd, y = w * xhat + b, so:
        dw = sum over positions of dy * xhat,   db = sum over positions of dy
        g = dy * w  (the gradient at xhat)
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (means over C)
    The two mean terms come from mean and rstd depending on every element of the row.
    """
    xhat, rstd, weight = cache
    C = xhat.shape[-1]
    dx = dweight = dbias = None
    if need_dparams:
        dweight = (dy * xhat).reshape(-1, C).sum(axis=0)
        dbias = dy.reshape(-1, C).sum(axis=0)
    if need_dx:
        dx = dy * weight  # g, the gradient at xhat
        g_xhat_mean = (dx * xhat).mean(axis=-1, keepdims=True)
        dx -= dx.mean(axis=-1, keepdims=True)
        dx -= xhat * g_xhat_mean
        dx *= rstd
    return dx, dweight, dbias
