"""Embedding lookup: rows of a table selected by integer ids."""

from __future__ import annotations

from ..backend import Array, scatter_add_rows


def embedding_forward(weight: Array, ids: Array) -> tuple[Array, tuple]:
    """out = W[ids]:  weight (V, C), ids (...) of ints  ->  out (..., C). Cache: ids and V."""
    return weight[ids], (ids, weight.shape[0])


def embedding_backward(dout: Array, cache: tuple) -> Array:
    """dW[v] = sum of dout over every position whose id is v.

    An id that appears twice gets both gradients: a scatter-add, not `dW[ids] = dout`
    (which keeps only one of the repeats).
    """
    ids, n_rows = cache
    C = dout.shape[-1]
    return scatter_add_rows(n_rows, ids.reshape(-1), dout.reshape(-1, C))
