"""Hypothesis strategies for the methods on the token table (trainable tokens, LoRA on wte): a random case
whose batch reads the trained rows, repeats included."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from strategies import cases


@st.composite
def token_cases(draw, max_tokens: int = 6, **case_kwargs):
    """(case, token_indices): distinct ids in drawn order (not sorted: Δ's rows follow the list), and the
    batch's ids rewritten so that some positions hold trained tokens, often the same one twice (the
    lookup's scatter-add must add repeats)."""
    case = draw(cases(min_embd=3, **{"min_len": 2, **case_kwargs}))
    V = case.model.config.vocab_size
    indices = draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=min(max_tokens, V), unique=True))
    rng = np.random.default_rng(case.seed + 7)
    hits = rng.random(case.ids.shape) < 0.4
    case.ids = np.where(hits, rng.choice(indices, size=case.ids.shape), case.ids)
    case.labels = np.where(case.labels == -100, -100, case.ids)
    if case.ids.shape[1] > 1 and not (case.labels[:, 1:] != -100).any():
        case.labels[0, 1] = case.ids[0, 1]
    return case, indices
