"""The golden cases: each method's `golden_cases` (tinypeft/methods/registry.py), in registration order,
and the batch a case is computed on. Nothing here names a method: a method's file says which cases it has.
"""

from __future__ import annotations

import numpy as np

from .. import checks
from ..backend import Array
from ..methods.registry import Batch, GoldenCase, golden_cases  # (the package's import registers every method)

# every golden case registered by the time the vectors are first imported (all the built-in methods', and
# those of a method defined outside tinypeft and imported before): what `export_vectors` writes
SPECS: tuple[GoldenCase, ...] = tuple(golden_cases())


def make_batch(batch: Batch, vocab_size: int, rng: np.random.Generator) -> tuple[Array, Array, Array | None]:
    """(input_ids, labels, attention_mask) for a Batch. Labels are the ids with -100 where the mask is 0
    (so a left-padded row's last pad predicts its first token, as transformers' usual labels do), and
    one -100 in the first row when there is no padding, so that ignoring is exercised everywhere."""
    B, T = batch.B, batch.T
    ids = rng.integers(0, vocab_size, size=(B, T))
    mask = np.ones((B, T), dtype=np.int64)
    if batch.padding == "mixed":
        mask[1, T - 3 :] = 0  # right padding
        mask[2, :2] = 0  # left padding: the first two queries see no key at all
    elif batch.padding == "ends":
        mask[1, :1] = 0
        mask[1, T - 2 :] = 0
    labels = np.where(mask == 1, ids, checks.IGNORE_INDEX)
    if batch.padding == "none":
        labels[0, 3] = checks.IGNORE_INDEX
        return ids, labels, None
    return ids, labels, mask
