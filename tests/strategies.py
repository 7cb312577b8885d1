"""Hypothesis strategies shared by the gradient and property tests: small random GPT configs, random
(non-degenerate) weights, and batches with optional padding masks and ignored labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

import tinypeft as tp


@dataclass
class Case:
    """A float64 model with perturbed weights and one batch for it."""

    model: tp.GPT
    ids: np.ndarray
    labels: np.ndarray
    mask: np.ndarray | None
    output_weights: np.ndarray
    seed: int


@st.composite
def gpt_configs(
    draw, max_layers: int = 3, max_heads: int = 4, max_head_dim: int = 8, dtype: str = "float64", min_embd: int = 1
):
    """min_embd: the gradient tests ask for 3. A LayerNorm over one or two features maps every row to
    (nearly) fixed values, so its backward is a near-total cancellation whose result is rounding noise,
    and comparing two orders of evaluation at 1e-10 then measures the conditioning, not the code."""
    n_head = draw(st.integers(1, max_heads))
    head_dim = draw(st.integers(-(-min_embd // n_head), max(max_head_dim, -(-min_embd // n_head))))
    return tp.GPTConfig(
        vocab_size=draw(st.integers(3, 64)),
        n_positions=draw(st.integers(16, 24)),
        n_embd=n_head * head_dim,
        n_layer=draw(st.integers(1, max_layers)),
        n_head=n_head,
        dtype=dtype,
    )


def perturbed_model(cfg: tp.GPTConfig, seed: int, scale: float = 0.3) -> tp.GPT:
    """GPT-2 init plus N(0, scale) noise everywhere, so LayerNorm weights differ from 1, biases from 0,
    and attention is far from uniform: a gradient bug cannot hide behind a symmetric start."""
    model = tp.GPT(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    model.params = {k: v + scale * rng.standard_normal(v.shape).astype(v.dtype) for k, v in model.params.items()}
    return model


@st.composite
def cases(draw, min_len: int = 1, max_len: int = 16, max_batch: int = 3, padding: bool | None = None, **cfg_kwargs):
    cfg = draw(gpt_configs(**cfg_kwargs))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    B = draw(st.integers(1, max_batch))
    T = draw(st.integers(min_len, min(max_len, cfg.n_positions)))
    ids = rng.integers(0, cfg.vocab_size, size=(B, T))
    use_mask = draw(st.booleans()) if padding is None else padding
    mask = None
    labels = ids.copy()
    if use_mask:
        # left and right padding, and some rows with no padding at all
        mask = np.ones((B, T), dtype=np.int64)
        for b in range(B):
            left, right = rng.integers(0, T // 2 + 1, size=2) if T > 1 else (0, 0)
            mask[b, :left] = 0
            mask[b, T - right :] = 0
        labels = np.where(mask == 1, labels, -100)
    if T > 1 and not (labels[:, 1:] != -100).any():
        labels[0, 1] = ids[0, 1]
    model = perturbed_model(cfg, seed)
    output_weights = rng.standard_normal((B, T, cfg.vocab_size))
    return Case(model, ids, labels, mask, output_weights, seed)
