"""Input validation: turn bad call-time input into an error that says what is wrong and what
is allowed, before it reaches NumPy."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError, InputTypeError, TinyPeftError
from .ops import IGNORE_INDEX


def _host(a: Any, what: str) -> np.ndarray:
    if type(a).__module__.startswith("cupy"):
        return a.get()
    try:
        return np.asarray(a)
    except Exception as e:  # ragged lists and the like
        raise InputError(f"{what} must be a rectangular array; got {type(a).__name__} ({e})") from None


def check_inputs(input_ids: Any, attention_mask: Any, config: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids, mask) as host arrays a model of this config takes, or an error saying what is wrong."""
    ids = check_token_ids(input_ids, config.vocab_size)
    if ids.shape[1] > config.n_positions:
        raise InputError(
            f"input_ids has {ids.shape[1]} tokens; this model takes at most n_positions={config.n_positions}"
        )
    return ids, check_attention_mask(attention_mask, ids.shape)


def check_token_ids(input_ids: Any, vocab_size: int, what: str = "input_ids") -> np.ndarray:
    """ids as a (B, T) integer array with 0 <= id < vocab_size, B >= 1, T >= 1."""
    ids = _host(input_ids, what)
    if ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
        raise InputTypeError(f"{what} must hold integers (token ids); got dtype {ids.dtype}")
    if ids.ndim != 2:
        raise InputError(f"{what} must have shape (batch, seq_len); got shape {ids.shape}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise InputError(f"{what} is empty (shape {ids.shape}); batch and seq_len must be >= 1")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise InputError(f"{what} holds token id {bad}; allowed ids are 0..{vocab_size - 1} (vocab_size={vocab_size})")
    return ids.astype(np.int64, copy=False)


def check_labels(labels: Any, shape: tuple[int, ...], vocab_size: int, leading_positions: int | None = 0) -> np.ndarray:
    """labels as a (B, T) integer array of ids or -100 (ignored), with at least one target after the shift.

    leading_positions: how many positions the model puts in front of the tokens (prompt tuning's
    virtual tokens, labelled -100). With any, the last of them predicts label 0, so label 0 is a
    target too. None: not known yet (before the forward); call `check_has_target` once it is.
    """
    lab = _host(labels, "labels")
    if lab.dtype == bool or not np.issubdtype(lab.dtype, np.integer):
        raise InputTypeError(f"labels must hold integers (token ids or {IGNORE_INDEX}); got dtype {lab.dtype}")
    if lab.shape != tuple(shape):
        raise InputError(f"labels must have the shape of input_ids {tuple(shape)}; got {lab.shape}")
    bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= vocab_size))
    if bad.any():
        raise InputError(
            f"labels hold {int(lab[bad][0])}; allowed are 0..{vocab_size - 1} and {IGNORE_INDEX} (ignored)"
        )
    if leading_positions is not None:
        check_has_target(lab, leading_positions)
    return lab.astype(np.int64, copy=False)


def check_has_target(labels: np.ndarray, leading_positions: int = 0) -> None:
    """Raise InputError unless some label is predicted: one after the first, or with leading positions
    in front of the tokens, any."""
    if leading_positions:
        if not (labels != IGNORE_INDEX).any():
            raise InputError(f"labels give nothing to predict: every label is {IGNORE_INDEX}; give at least one target")
    elif not (labels[:, 1:] != IGNORE_INDEX).any():
        raise InputError(
            "labels give nothing to predict: the loss compares position t with label t+1, and every label "
            f"after the first is {IGNORE_INDEX} (or seq_len is 1); give at least one target"
        )


def check_attention_mask(attention_mask: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """An attention mask of shape `shape` holding only 0 and 1 (or bools)."""
    if attention_mask is None:
        return None
    mask = _host(attention_mask, "attention_mask")
    if mask.shape != tuple(shape):
        raise InputError(f"attention_mask must have shape {tuple(shape)}; got {mask.shape}")
    if mask.dtype != bool:
        if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
            raise InputTypeError(f"attention_mask must hold 0/1 or bools; got dtype {mask.dtype}")
        other = mask[~np.isin(mask, (0, 1))]
        if other.size:
            raise InputError(
                f"attention_mask must hold only 0 (padding) and 1 (token); found {other.reshape(-1)[0].item()!r}"
            )
    return mask.astype(bool)


def check_seed(seed: Any, what: str = "seed", error: type[TinyPeftError] = InputError) -> int:
    """A seed for np.random.default_rng: an integer >= 0 (a bool is not a seed)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise error(f"{what} must be an integer >= 0; got {seed!r}")
    return int(seed)
