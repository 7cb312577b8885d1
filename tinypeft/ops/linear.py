"""Linear layer in GPT-2's Conv1D layout: the weight is (in, out) and y = x @ W + b."""

from __future__ import annotations

from ..backend import Array


def linear_forward(x: Array, weight: Array, bias: Array | None) -> tuple[Array, tuple]:
    """y = x W + b.

    x: (..., in), weight: (in, out), bias: (out,) or None  ->  y: (..., out).
    Cache: x and W, both needed by the backward; nothing is copied.
    """
    lead, n_in = x.shape[:-1], x.shape[-1]
    y = x.reshape(-1, n_in) @ weight  # [N, in] @ [in, out] -> [N, out]: one large matmul
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, weight.shape[1]), (x, weight)


def linear_backward(
    dy: Array,
    cache: tuple,
    need_dx: bool = True,
    need_dweight: bool = True,
    need_dbias: bool = True,
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients of y = x W + b.

        dx = dy W^T      dW = x^T dy  (summed over every leading position)      db = sum dy

    A frozen weight skips its dW matmul entirely (need_dweight=False): that matmul costs as
    much as the forward, and skipping it is where freezing saves compute.
    """
    x, weight = cache
    n_in, n_out = weight.shape
    dy2 = dy.reshape(-1, n_out)  # [N, out]
    dx = (dy2 @ weight.T).reshape(x.shape) if need_dx else None  # [N, out] @ [out, in]
    dweight = x.reshape(-1, n_in).T @ dy2 if need_dweight else None  # [in, N] @ [N, out]
    dbias = dy2.sum(axis=0) if need_dbias else None
    return dx, dweight, dbias
