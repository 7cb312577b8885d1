"""The token table W.index_copy(idx, Δ): the math and the site that trainable tokens stand on, shared by
TrainableTokensConfig (trainable_tokens.py) and LoRA's trainable_token_indices (embedding_lora.py).

The rows idx (n of them, in the order given) are stood in for by a trainable Δ: (n, C):

    W' = W.index_copy(idx, Δ):   W'[v] = Δ_j if v = idx_j, else W[v]          (V, C)

and GPT-2's head is tied to the table, so both the lookup W'[ids] and the head ln_f(x) W'ᵀ read W'.
docs/trainable_tokens.md derives the backward.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import Array, namespace, to_numpy
from ..config import shown
from ..errors import ConfigError
from ..ops import embedding_forward, scatter_add_rows
from ..sites import HeadGradient

if TYPE_CHECKING:
    from ..model import GPT

WTE = "transformer.wte.weight"
TOKEN_TABLE = "transformer.wte"  # the module trainable tokens target: GPT-2's one token table


# ===================================================================== the math
def token_source(vocab_size: int, token_indices: Sequence[int]) -> np.ndarray:
    """source (V,): where each row of W' comes from in concat(W, Δ) (V + n rows): row v is V + j when
    v = idx_j, else v itself."""
    source = np.arange(vocab_size)
    source[np.asarray(token_indices, dtype=np.int64)] = vocab_size + np.arange(len(token_indices))
    return source


def delta_rows(vocab_size: int, token_indices: Sequence[int]) -> np.ndarray:
    """(V,): the row of Δ that stands in for each token id, j for idx_j, and n (no row) for the others."""
    rows = np.full(vocab_size, len(token_indices))
    rows[np.asarray(token_indices, dtype=np.int64)] = np.arange(len(token_indices))
    return rows


def trainable_tokens_table(weight: Array, delta: Array, source: Array) -> Array:
    """W' = concat(W, Δ)[source] = W.index_copy(idx, Δ): weight (V, C), delta (n, C), source (V,) from
    `token_source` -> (V, C). A gather, so every row is copied exactly and autograd differentiates it."""
    xp = namespace(weight, delta)
    return xp.concatenate([weight, delta], axis=0)[source]  # [V + n, C] -> [V, C]


def trainable_tokens_forward(
    weight: Array, delta: Array, source: Array, rows: Array, ids: Array
) -> tuple[Array, Array, tuple]:
    """(embeddings W'[ids] (B, T, C), the head's weight W' (V, C), cache) for W' = W.index_copy(idx, Δ);
    source and rows from `token_source` and `delta_rows`.

    Cache: each id's row of Δ (n: none), and n. The table W' is the head's weight, which the model
    keeps; the backward needs only the rows."""
    table = trainable_tokens_table(weight, delta, source)  # [V, C]
    embeds, _ = embedding_forward(table, ids)  # [B, T] -> [B, T, C]
    return embeds, table, (rows[ids], delta.shape[0])


def trainable_tokens_backward(dembeds: Array, head_rows: Array, cache: tuple) -> Array:
    """dΔ (n, C) for W' = W.index_copy(idx, Δ), read by the lookup W'[ids] and by the tied head:

        dW'   = scatter_add(ids, dembeds) + dlogitsᵀ x            (V, C): the lookup's and the head's shares
        dΔ_j  = dW'[idx_j]                                        (n, C): row idx_j of W' is Δ_j
              = Σ_{(b,t): ids[b,t] = idx_j} dembeds[b,t] + dlogits[:, idx_j]ᵀ x

    head_rows is the head's share at those rows, dlogits[:, idx]ᵀ x (n, C). The lookup's share is a
    scatter-add (an id repeated in the batch adds every occurrence) into n + 1 rows, the last one
    taking every untrained id and dropped: no (V, C) array is formed. W is frozen: its gradient, dW'
    with the rows idx zeroed, is never computed.
    """
    delta_row, n = cache
    C = dembeds.shape[-1]
    # in the forward this was: embeds = W'[ids] with W'[idx_j] = Δ_j, so:
    lookup = scatter_add_rows(n + 1, delta_row.reshape(-1), dembeds.reshape(-1, C))[:n]  # [N, C] -> [n, C]
    return lookup + head_rows  # [n, C]


# ===================================================================== checks and init
def check_token_indices(indices: Any, what: str) -> list[int]:
    """A non-empty list of distinct non-negative ints (their range is checked against the base in
    `check_token_range`), or a ConfigError saying what is wrong."""
    if isinstance(indices, (str, bytes)) or not isinstance(indices, (list, tuple)) or not indices:
        raise ConfigError(f"{what} must be a non-empty list of token ids; got {shown(indices)}")
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise ConfigError(f"{what} entries must be non-negative integer token ids; got {shown(i)}")
    ids = [int(i) for i in indices]
    repeated = next((i for k, i in enumerate(ids) if i in ids[:k]), None)
    if repeated is not None:
        raise ConfigError(
            f"{what} lists token {repeated} more than once; each token id may appear once "
            "(two rows of Δ for one row of the table would leave which one wins undefined)"
        )
    return ids


def check_token_range(indices: Sequence[int], vocab_size: int, what: str) -> None:
    """A ConfigError unless every id is below vocab_size."""
    outside = [i for i in indices if i >= vocab_size]
    if outside:
        raise ConfigError(f"{what} holds token id {outside[0]}, outside the vocabulary: ids are 0..{vocab_size - 1}")


def initial_delta(base: GPT, token_indices: Sequence[int], copy_rows: bool, rng: np.random.Generator) -> Array:
    """Δ at its init: a copy of W[idx] (the identity), or N(0, 1) draws, in the base's dtype and device."""
    W = to_numpy(base.params[WTE])
    delta = W[np.asarray(token_indices)].copy() if copy_rows else rng.standard_normal((len(token_indices), W.shape[1]))
    return base.xp.asarray(delta.astype(base.config.dtype))


# ===================================================================== the site
class TrainableTokensSite:
    """The token table W.index_copy(idx, Δ), read by the lookup and the tied head. `delta_name`: Δ's name
    in the parameter dict (TrainableTokensConfig's, or LoRA's `token_adapter` one)."""

    def __init__(self, delta_name: str, token_indices: Sequence[int]) -> None:
        self.delta_name = delta_name
        self.token_indices = list(token_indices)
        self.param_names = (delta_name, WTE)

    def forward(self, params: Mapping[str, Array], input_ids: Array) -> tuple[Array, Array, tuple]:
        weight, delta = params[WTE], params[self.delta_name]
        xp = namespace(weight)
        V = weight.shape[0]
        source, rows = token_source(V, self.token_indices), delta_rows(V, self.token_indices)
        return trainable_tokens_forward(weight, delta, xp.asarray(source), xp.asarray(rows), input_ids)

    def backward(
        self, dembeds: Array, head: HeadGradient, cache: tuple, trainable: Collection[str]
    ) -> dict[str, Array]:
        if WTE in trainable:
            raise ConfigError(f"{WTE} is trainable, but trainable tokens keep the table frozen but for its rows idx")
        if self.delta_name not in trainable:
            return {}
        idx = namespace(dembeds).asarray(self.token_indices)
        return {self.delta_name: trainable_tokens_backward(dembeds, head.rows(idx), cache)}
