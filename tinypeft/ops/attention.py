"""Causal multi-head self-attention over GPT-2's fused qkv projection, with an optional
padding mask and optional past keys/values (a KV cache, or prefix tuning's prefixes)."""

from __future__ import annotations

from typing import Any, NamedTuple

from ..backend import Array, namespace
from .softmax import softmax_backward, softmax_forward


class AttentionCache(NamedTuple):
    q: Array  # [B, NH, T, hs]
    k: Array  # [B, NH, P+T, hs], the past included: with v, what a KV cache keeps
    v: Array  # [B, NH, P+T, hs]
    p: Array  # [B, NH, T, P+T], the attention weights
    visible: Array
    past_length: int
    scale: float


def attention_visibility(xp: Any, T: int, past_length: int = 0, attention_mask: Array | None = None) -> Array:
    """Which keys each query may attend to: a bool array (B or 1, 1, T, P+T).

    Query i sits at position P+i and sees key j when j <= P+i (causal) and, if an attention
    mask (B, P+T) of 0/1 is given, when mask[b, j] == 1. Built once per forward and shared by
    every layer.
    """
    S = past_length + T
    causal = xp.arange(S)[None, :] <= (past_length + xp.arange(T))[:, None]  # [T, S]
    visible = causal[None, None, :, :]  # [1, 1, T, S]
    if attention_mask is not None:
        visible = visible & (attention_mask[:, None, None, :] != 0)  # [B, 1, T, S]
    return visible


def split_heads(x: Array, n_head: int) -> Array:
    """[B, T, C] -> [B, NH, T, hs]"""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose((0, 2, 1, 3))


def merge_heads(x: Array) -> Array:
    """[B, NH, T, hs] -> [B, T, C]"""
    B, NH, T, hs = x.shape
    return x.transpose((0, 2, 1, 3)).reshape(B, T, NH * hs)


def attention_forward(
    qkv: Array,
    n_head: int,
    visible: Array,
    past_key: Array | None = None,
    past_value: Array | None = None,
) -> tuple[Array, tuple]:
    """y = softmax(q k^T / sqrt(hs) + mask) v, per head, with q, k, v split from qkv in that order.

    qkv: (B, T, 3C); visible: (B or 1, 1, T, P+T) from `attention_visibility`;
    past_key/past_value: (B, NH, P, hs) or None. Returns y (B, T, C).

    Hidden scores are replaced by the dtype's most negative finite value rather than -inf, which
    gives transformers' eager values: every row that sees a key is exact (exp(min - max) == 0), and
    a row that sees nothing (a query on left padding) gets uniform weights instead of NaN.
    The gradient differs from transformers' in that one case: here a hidden score is a constant, so
    its gradient is zero, which is the derivative of this forward (finite differences agree);
    transformers adds its mask, and autograd then passes a gradient through the scores of a fully
    hidden row that is not the derivative of its own (locally constant) forward. It matters only if
    a loss reads a fully hidden position; see docs/model.md.

    Cache (`AttentionCache`): q, k, v (k, v including the past), the attention weights p
    (B, NH, T, P+T), the mask and P. Its k and v are what a KV cache keeps.
    """
    xp = namespace(qkv, past_key)
    C = qkv.shape[-1] // 3
    q = split_heads(qkv[..., :C], n_head)  # [B, NH, T, hs]
    k = split_heads(qkv[..., C : 2 * C], n_head)
    v = split_heads(qkv[..., 2 * C :], n_head)
    P = 0
    if past_key is not None:
        P = past_key.shape[2]
        k = xp.concatenate([past_key, k], axis=2)  # [B, NH, P+T, hs]
        v = xp.concatenate([past_value, v], axis=2)
    scale = 1.0 / (q.shape[-1] ** 0.5)
    scores = (q @ k.swapaxes(-1, -2)) * scale  # [B, NH, T, hs] @ [B, NH, hs, S] -> [B, NH, T, S]
    scores = xp.where(visible, scores, xp.finfo(scores.dtype).min)
    p, _ = softmax_forward(scores)
    y = p @ v  # [B, NH, T, S] @ [B, NH, S, hs] -> [B, NH, T, hs]
    return merge_heads(y), AttentionCache(q, k, v, p, visible, P, scale)


def attention_backward(dy: Array, cache: AttentionCache) -> tuple[Array, Array | None, Array | None]:
    """Gradients of attention: (dqkv (B, T, 3C), dpast_key, dpast_value), the past ones None if no past.

    in the forward pass this was: s = q k^T * scale, s[hidden] = min, p = softmax(s), y = p v, so:
        dv = p^T dy        dp = dy v^T        ds = softmax_backward(dp, p), zeroed where hidden
        dq = ds k * scale  dk = ds^T q * scale
    A hidden score is a constant, so its gradient is zero; it is already zero wherever p == 0,
    but a row with nothing visible has uniform p and needs the explicit zero.
    """
    q, k, v, p, visible, P, scale = cache
    xp = namespace(dy)
    n_head = q.shape[1]
    dy = split_heads(dy, n_head)  # [B, NH, T, hs]
    dv = p.swapaxes(-1, -2) @ dy  # [B, NH, S, T] @ [B, NH, T, hs] -> [B, NH, S, hs]
    dp = dy @ v.swapaxes(-1, -2)  # [B, NH, T, hs] @ [B, NH, hs, S] -> [B, NH, T, S]
    ds = softmax_backward(dp, p, out=dp)
    ds *= visible * ds.dtype.type(scale)  # zero where hidden, and the score scale, in one pass
    dq = ds @ k  # [B, NH, T, S] @ [B, NH, S, hs] -> [B, NH, T, hs]
    dk = ds.swapaxes(-1, -2) @ q  # [B, NH, S, T] @ [B, NH, T, hs] -> [B, NH, S, hs]
    B, NH, T, hs = dq.shape
    dqkv = xp.empty((B, T, 3, NH, hs), dtype=dq.dtype)  # q, k, v side by side, as c_attn produced them
    dqkv[:, :, 0] = dq.transpose((0, 2, 1, 3))
    dqkv[:, :, 1] = dk[:, :, P:].transpose((0, 2, 1, 3))
    dqkv[:, :, 2] = dv[:, :, P:].transpose((0, 2, 1, 3))
    dqkv = dqkv.reshape(B, T, 3 * NH * hs)
    if P == 0:
        return dqkv, None, None
    return dqkv, dk[:, :, :P], dv[:, :, :P]
