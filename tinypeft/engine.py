"""The engine: what makes the reference GPT (`gpt.py`) fast, each shortcut proven equal to it.

The reference computes every gradient it is asked for, all the way down to the embeddings. The
engine adds, on top of the very same calls:

1. Stopping the backward at the lowest trainable parameter. Where each parameter sits comes from
   the config's table and from what each site says it owns (`Sites.owned`), never from names.
   Blocks below the lowest trainable one get no backward at all, and the embeddings' backward runs
   only when something there trains. Measured (default config, B 16, T 128, float32, the same
   loss_and_grad with the reference backward swapped in): LastBlocksConfig(num_blocks=1) 61 vs 90 ms
   a step, LoRA on the last block's c_attn 56 vs 87 ms; LoRA on c_attn in every block 83 vs 83 ms
   (nothing to skip but the embeddings). The engine this replaced also stopped inside the lowest
   block, a stage at a time; against it, this measured within noise (LoRA on c_attn in every block
   85 vs 86 ms, BitFit 91 vs 85, last block 63 vs 59), so that complication is gone.
2. Row blocks on threads (`runtime.py`): on the CPU, a large batch runs as row blocks, one thread
   each with one BLAS thread. LoRA r=8 on every linear, default config, B=16, T=128, float32:
   86 -> 67 ms a step.
3. The positions a site puts in front of the tokens are checked against n_positions, and get no
   label, before the forward (the reference does not validate).
4. Attention a block of queries at a time (`attention_blocks.py`): no (T, S) array of the whole
   sequence is held, its causal half is never computed, and the backward rebuilds each block's weights
   from a log-sum-exp per query. Measured (one thread, B 4, 4 heads of 32, float32, forward and
   backward of one layer's attention): T 512 43 -> 23 ms, T 1024 185 -> 84 ms, T 128 2.2 -> 2.5 ms
   (the backward's second q kᵀ costs more than it saves there); a LoRA step (default config with
   n_embd 128, B 8) T 512 349 -> 247 ms, T 1024 1271 -> 735 ms.

`tests/engine/` proves each equal to the reference in float64 over hypothesis-drawn configs and
every method: bitwise, since the arithmetic is the same; row blocks and blocked attention to 1e-12 (sums
in another order).
Generation's KV cache is in `generation.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import checks, gpt, runtime
from .attention_blocks import blocked_attention_backward, blocked_attention_forward
from .backend import Array
from .config import GPTConfig, module_locations, parameter_locations
from .errors import InputError
from .ops import IGNORE_INDEX, causal_lm_loss_backward, causal_lm_loss_forward
from .sites import Location, Sites

Grads = dict[str, Array]
BLOCKED_ATTENTION = gpt.Attention(blocked_attention_forward, blocked_attention_backward)


@dataclass(frozen=True)
class ComputeView:
    """What one forward computes with: the flat parameter dict, the sites, the trainable names (in the
    dict's naming), and `public_names`, the name loss_and_grad reports for a trainable entry when it
    differs (a PEFT model's stand-in for a base parameter). Gradient checks differentiate this."""

    config: GPTConfig
    xp: Any
    params: Mapping[str, Array]
    sites: Sites
    trainable: frozenset[str]
    public_names: Mapping[str, str] = field(default_factory=dict)

    def public(self, grads: Mapping[str, Array]) -> dict[str, Array]:
        return {self.public_names.get(k, k): g for k, g in grads.items()}

    def check_inputs(self, input_ids: Any, attention_mask: Any = None) -> tuple[Array, Array | None]:
        """Validated (ids, mask) on this view's device, or an InputError saying what is wrong."""
        ids, mask = checks.check_inputs(input_ids, attention_mask, self.config)
        extra = positions_in_front(self)
        if extra + ids.shape[1] > self.config.n_positions:
            raise InputError(
                f"sequence of {extra + ids.shape[1]} positions ({extra} past/prefix/virtual + {ids.shape[1]} tokens) "
                f"exceeds n_positions={self.config.n_positions}; give at most {self.config.n_positions - extra} tokens"
            )
        return self.xp.asarray(ids), None if mask is None else self.xp.asarray(mask)


def positions_in_front(view: ComputeView) -> int:
    """Positions the sites put before the tokens: virtual tokens, and prefix (or cached) keys."""
    sites = view.sites
    return sum(0 if s is None else s.positions(view.params) for s in (sites.embedding, sites.prefix))


def lowest_trainable(view: ComputeView) -> Location | None:
    """The first place in the forward where a trainable parameter is used (None: nothing trains)."""
    where = parameter_locations(view.config) | view.sites.owned(module_locations(view.config))
    return min((where[name] for name in view.trainable), default=None)


def backward(dlogits: Array, cache: gpt.GPTCache, view: ComputeView) -> Grads:
    """`gpt.backward`, stopped below the lowest trainable parameter: equal to it, bitwise."""
    lowest = lowest_trainable(view)
    if lowest is None:
        return {}
    if lowest.layer < 0:  # the embeddings train: the whole way down, as the reference goes
        return gpt.backward(dlogits, cache, view.trainable)
    dx, grads = gpt.head_backward(dlogits, cache, view.trainable)
    dpast = []
    for i in reversed(range(lowest.layer, len(cache.blocks))):
        dx, dpast_i, block_grads = gpt.block_backward(dx, cache.blocks[i], i, view.trainable)
        dpast.insert(0, dpast_i)
        grads |= block_grads
    if cache.sites.prefix is not None and len(dpast) == len(cache.blocks):
        grads |= cache.sites.prefix.backward(dpast, cache.prefix_site, view.trainable)
    return grads


def loss_and_grad(
    view: ComputeView, input_ids: Any, labels: Any, attention_mask: Any = None, need_grads: bool = True
) -> tuple[float, Grads]:
    """Validated loss and gradients of the trainable parameters.

    On the CPU a large batch is computed as row blocks on parallel threads: block i with n_i targets
    contributes its mean loss with weight n_i / n, and its gradient is taken of that weighted loss,
    so the sums are the mean over all n targets and its gradient, up to rounding. Sites that draw
    random masks per forward (dropout) keep the batch whole: their masks are drawn for the shape
    they see.
    """
    ids, mask = view.check_inputs(input_ids, attention_mask)
    leading = 0 if view.sites.embedding is None else view.sites.embedding.positions(view.params)
    host_labels = checks.check_labels(labels, ids.shape, view.config.vocab_size, leading)
    B, T = ids.shape
    whole = view.xp is not np or view.sites.stochastic
    blocks = [slice(0, B)] if whole else runtime.row_blocks(B, T * view.config.n_embd)
    parts = runtime.map_blocks(lambda rows: _forward_block(view, ids, mask, host_labels, leading, rows), blocks)
    n_total = sum(part.n_targets for part in parts)
    loss = sum(part.loss * part.n_targets for part in parts) / n_total
    # the sites' loss terms (a regulariser) belong to the training objective: loss() reports the data's loss alone
    term_value, term_grads = loss_terms(view) if need_grads else (0.0, {})
    loss += term_value
    if not need_grads or not view.trainable:
        return loss, {}

    def backward_block(part: _Part) -> Grads:
        dlogits = causal_lm_loss_backward(part.n_targets / n_total, part.loss_cache)
        return backward(dlogits, part.cache, view)

    block_grads = runtime.map_blocks(backward_block, [part for part in parts if part.n_targets])
    grads = block_grads[0]
    for more in block_grads[1:]:  # in block order: the sum does not depend on thread timing
        grads = {k: g + more[k] for k, g in grads.items()}
    return loss, add_grads(grads, term_grads)


def loss_terms(view: ComputeView) -> tuple[float, Grads]:
    """The sum of the sites' loss terms (`Sites.loss_terms`, which depend on the parameters alone) and its
    gradients for the trainable names: what the training objective adds to the batch's mean cross-entropy."""
    value, grads = 0.0, {}
    for term in view.sites.loss_terms:
        term_value, cache = term.forward(view.params)
        value += float(term_value)
        grads = add_grads(grads, term.backward(cache, view.trainable))
    return value, grads


def add_grads(grads: Grads, more: Mapping[str, Array]) -> Grads:
    """grads + more, name by name (a name in one only is taken as it is); new arrays, neither input written."""
    if not more:
        return grads
    return {**grads, **{k: grads[k] + g if k in grads else g for k, g in more.items()}}


@dataclass(frozen=True)
class _Part:
    loss: float
    n_targets: int
    loss_cache: Any = None
    cache: gpt.GPTCache | None = None


def _forward_block(view: ComputeView, ids: Array, mask: Array | None, labels: np.ndarray, leading: int, rows: slice):
    """One row block's forward and loss; the positions in front of the tokens get label -100."""
    rows_mask = None if mask is None else mask[rows]
    logits, cache = gpt.forward(view.params, view.config, ids[rows], rows_mask, view.sites, BLOCKED_ATTENTION)
    block_labels = view.xp.asarray(pad_labels(labels[rows], leading))
    n_targets = int((block_labels[:, 1:] != IGNORE_INDEX).sum())
    if n_targets == 0:  # a block of padding: it adds nothing to the loss or the gradient
        return _Part(0.0, 0)
    loss, loss_cache = causal_lm_loss_forward(logits, block_labels)
    return _Part(float(loss), n_targets, loss_cache, cache)


def pad_labels(labels: np.ndarray, leading: int) -> np.ndarray:
    """labels (B, T) -> (B, leading + T): no label for positions in front of the tokens (PEFT's rule
    for prompt tuning's virtual tokens, whose last one then predicts token 0)."""
    if not leading:
        return labels
    return np.concatenate([np.full((labels.shape[0], leading), IGNORE_INDEX, dtype=labels.dtype), labels], axis=1)


def logits(view: ComputeView, input_ids: Any, attention_mask: Any = None) -> Array:
    ids, mask = view.check_inputs(input_ids, attention_mask)
    return gpt.forward(view.params, view.config, ids, mask, view.sites, BLOCKED_ATTENTION)[0]
