"""Mean cross-entropy over the targets that are not ignored (label -100, as PyTorch and HF)."""

from __future__ import annotations

from ..backend import Array, namespace

IGNORE_INDEX = -100


def cross_entropy_forward(logits: Array, targets: Array) -> tuple[Array, tuple]:
    """loss = -(1/n) sum over valid i of log softmax(logits_i)[t_i],  n = number of valid targets.

    logits: (N, V), targets: (N,) ints, -100 for "no target here"  ->  a scalar.
    log softmax is computed as z - log sum exp z with z = logits - max, so logits of +-1e4 stay
    finite. The caller guarantees n > 0. Cache: logits, targets, the log-sum-exp and n.
    """
    xp = namespace(logits)
    valid = targets != IGNORE_INDEX
    n_valid = int(valid.sum())
    safe_targets = xp.where(valid, targets, 0)
    shifted = logits - xp.max(logits, axis=-1, keepdims=True)
    log_norm = xp.log(xp.sum(xp.exp(shifted), axis=-1))  # [N]
    target_logit = shifted[xp.arange(logits.shape[0]), safe_targets]  # [N]
    loss = -xp.sum(xp.where(valid, target_logit - log_norm, 0.0)) / n_valid
    return loss, (logits, safe_targets, valid, n_valid)


def cross_entropy_backward(dloss: Array, cache: tuple) -> Array:
    """dlogits_i = dloss * (softmax(logits_i) - onehot(t_i)) / n for valid i, and 0 where ignored."""
    logits, safe_targets, valid, n_valid = cache
    xp = namespace(logits)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = xp.exp(shifted)
    probs /= probs.sum(axis=-1, keepdims=True)
    probs[xp.arange(logits.shape[0]), safe_targets] -= 1.0
    probs *= (valid * (dloss / n_valid)).astype(logits.dtype)[:, None]
    return probs


def causal_lm_loss_forward(logits: Array, labels: Array) -> tuple[Array, tuple]:
    """The causal language-model loss with transformers' label shift: position t predicts label t+1.

    logits (B, T, V), labels (B, T) with -100 for "not a target"  ->  the mean over valid targets of
    cross_entropy(logits[:, :-1], labels[:, 1:]). So labels may simply be the input ids.
    """
    V = logits.shape[-1]
    loss, ce_cache = cross_entropy_forward(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    return loss, (ce_cache, logits.shape)


def causal_lm_loss_backward(dloss: Array, cache: tuple) -> Array:
    """dlogits (B, T, V): the cross-entropy gradient at positions 0..T-2, zero at the last position
    (it predicts nothing)."""
    ce_cache, (B, T, V) = cache
    d = cross_entropy_backward(dloss, ce_cache)  # [B*(T-1), V]
    xp = namespace(d)
    return xp.concatenate([d.reshape(B, T - 1, V), xp.zeros((B, 1, V), dtype=d.dtype)], axis=1)
