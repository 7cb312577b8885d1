"""The engine's attention: `ops.attention_forward`'s function, computed a block of queries at a time.

The reference builds the whole (B, NH, T, S) score array, masks it, softmaxes it in several full
passes, keeps the weights p for the backward, and in the backward makes two more arrays of that size.
At T 1024 one such array is B·NH·T² numbers (32 MiB at B 8, NH 4 in float32) per layer, and each pass
over it streams it through memory. Here, as in FlashAttention (Dao et al., 2022) without its fused
kernel, the queries are taken in blocks:

    for each block of queries i0..i1:                       s: [B, NH, Tb, P+i1], Tb·S numbers at most
        s   = q_blk k[:P+i1]ᵀ                               keys after P+i1-1 are hidden from every query
        s[hidden] = min;  m = max s;  l = Σ exp(s - m)      of the block, so they are never computed
        y_blk = (exp(s - m) / l) v[:P+i1]                   p in place of s; (m, l) kept per row

and the backward rebuilds each block's p from q, k and (m, l) rather than storing it:

    p  = exp(q_blk kᵀ - m) / l                              the forward's arithmetic again: the same p
    dv += pᵀ dy_blk;   dp = dy_blk vᵀ
    ds = p ⊙ (dp - D),  D = Σ_d dy ⊙ y  (= Σ_j p_j dp_j)    one (T, hs) product instead of a (T, S) pass
    dq_blk = ds k · scale;   dk += dsᵀ q_blk · scale

So a (T, S) array exists for one block at a time (two in the backward: s and dp), sized to stay in
cache, every pass runs in place, and the causal half of the scores is skipped. What it costs: the
backward's extra q kᵀ product and exp pass. The equality with the reference (float64, 1e-12 relative,
every method, padding and prefixes) is proven in tests/engine/test_attention_blocks.py; the figures
are in benchmarks/README.md.

A query that sees no key at all (left padding) gets, as in the reference, uniform weights over all S
keys and no gradient through its scores: its y is the mean of v and its dv share is added apart.
"""

from __future__ import annotations

from typing import NamedTuple

from .backend import Array, namespace
from .ops import split_heads

# Scores computed at once, in bytes: one block's (B, NH, Tb, S) array. Measured in benchmarks/README.md
# ("attention in blocks"): from 256 KiB to 4 MiB within a few percent of each other; the full array
# (the reference's way) is what falls behind at long T.
BLOCK_BYTES = 1 << 20
MIN_QUERIES = 64


class BlockedAttentionCache(NamedTuple):
    q: Array  # [B, NH, T, hs], already multiplied by the score scale
    k: Array  # [B, NH, P+T, hs], the past included (what a KV cache keeps)
    v: Array  # [B, NH, P+T, hs]
    y: Array  # [B, NH, T, hs], the output before the heads were merged
    logsumexp: Array  # [B, NH, T, 1]: m + log l, l = Σ_j exp(s_j - m), so that p_j = exp(s_j - logsumexp)
    hidden: Array  # [B or 1, 1, T, P+T]: not visible
    dead: Array | None  # [B or 1, 1, T, 1]: queries that see no key (None: there are none)
    past_length: int
    scale: float
    block: tuple[int, int, int]  # (batch rows, heads, queries) of a block: `block_shape`


def block_shape(B: int, NH: int, T: int, S: int, itemsize: int) -> tuple[int, int, int]:
    """(batch rows, heads, queries) of one block: at least MIN_QUERIES queries where there are that many
    (a matmul of a few rows wastes most of its time), more while all of B·NH fit within BLOCK_BYTES, then
    as many heads, and then batch rows, as fit beside them."""
    row = S * itemsize  # one query's scores in one head
    queries = min(T, max(MIN_QUERIES, BLOCK_BYTES // (B * NH * row)))
    queries = max(1, min(queries, BLOCK_BYTES // row))  # a huge S: fewer queries, never over the budget
    heads_and_rows = max(1, BLOCK_BYTES // (queries * row))
    if heads_and_rows < NH:
        return 1, heads_and_rows, queries
    return min(B, heads_and_rows // NH), NH, queries


def blocks(B: int, NH: int, T: int, P: int, shape: tuple[int, int, int]):
    """(rows, heads, queries, keys) slices of every block; keys end at the block's last query (causal)."""
    rows, heads, queries = shape
    for b0 in range(0, B, rows):
        for h0 in range(0, NH, heads):
            for t0 in range(0, T, queries):
                t1 = min(T, t0 + queries)
                yield slice(b0, b0 + rows), slice(h0, h0 + heads), slice(t0, t1), slice(0, P + t1)


def blocked_attention_forward(
    qkv: Array,
    n_head: int,
    visible: Array,
    past_key: Array | None = None,
    past_value: Array | None = None,
) -> tuple[Array, BlockedAttentionCache]:
    """`ops.attention_forward`'s y (B, T, C), a block of queries at a time; the same arguments."""
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
    B, NH, T, hs = q.shape
    S = P + T
    scale = 1.0 / (hs**0.5)
    q = q * q.dtype.type(scale)  # scaled once here, not in every (T, S) block
    hidden = ~visible
    dead = ~visible.any(axis=-1, keepdims=True)  # [B or 1, 1, T, 1]
    dead = dead if bool(dead.any()) else None
    y = xp.empty((B, T, NH, hs), dtype=q.dtype)  # laid out as merge_heads wants it: merging is a view
    y_heads = y.transpose((0, 2, 1, 3))  # [B, NH, T, hs]
    logsumexp = xp.empty((B, NH, T, 1), dtype=q.dtype)
    block = block_shape(B, NH, T, S, q.dtype.itemsize)
    for b, h, t, keys in blocks(B, NH, T, P, block):  # keys: causal, none after the block's last query
        s = _scores(xp, q[b, h, t], k[b, h, keys], _rows(hidden, b)[:, :, t, keys], P + t.start)  # [B', H', Tb, S']
        m = s.max(axis=-1, keepdims=True)
        s -= m
        xp.exp(s, out=s)  # e = exp(s - m); p = e / l
        l = s.sum(axis=-1, keepdims=True)
        y_block = xp.matmul(s, v[b, h, keys], out=y_heads[b, h, t])  # [B', H', Tb, S'] @ [B', H', S', hs]
        y_block /= l  # p v = (e v) / l: the division on (Tb, hs) numbers rather than (Tb, S')
        logsumexp[b, h, t] = m + xp.log(l)
    if dead is not None:
        uniform_weights_where_dead(xp, dead, v, y_heads)
    cache = BlockedAttentionCache(q, k, v, y_heads, logsumexp, hidden, dead, P, scale, block)
    return y.reshape(B, T, C), cache


def _rows(mask: Array, b: slice) -> Array:
    """A (B or 1, 1, ...) mask's rows b: all of it when it is the same for every row."""
    return mask if mask.shape[0] == 1 else mask[b]


def _scores(xp, q_block: Array, keys: Array, hidden: Array, first_diagonal: int) -> Array:
    """s = q_block keysᵀ with the hidden ones set to the dtype's minimum (as the reference sets them).

    Columns before `first_diagonal` are causally visible to every query of the block, so only padding
    can hide them; when nothing does, the mask is written on the block's diagonal part alone."""
    s = q_block @ keys.swapaxes(-1, -2)  # [B, NH, Tb, hs] @ [B, NH, hs, S'] -> [B, NH, Tb, S']
    lowest = s.dtype.type(xp.finfo(s.dtype).min)
    if bool(hidden[..., :first_diagonal].any()):
        xp.copyto(s, lowest, where=hidden)
    else:
        xp.copyto(s[..., first_diagonal:], lowest, where=hidden[..., first_diagonal:])
    return s


def uniform_weights_where_dead(xp, dead: Array, v: Array, y: Array) -> None:
    """y (B, NH, T, hs) of the queries that see no key: the mean of all S values, the reference's uniform
    weights over its all-hidden row (the blocks gave them uniform weights over their own keys only)."""
    y[...] = xp.where(dead, v.mean(axis=2, keepdims=True), y)


def add_dead_rows_share(dy: Array, dead: Array, dv: Array) -> None:
    """dv += the dead queries' share: their y is the mean of v over all S keys, so each key gets dy / S
    (their scores, hidden, get nothing: the blocks left them out)."""
    dv += (dy * dead).sum(axis=2, keepdims=True) / dv.dtype.type(dv.shape[2])


def blocked_attention_backward(dy: Array, cache: BlockedAttentionCache) -> tuple[Array, Array | None, Array | None]:
    """`ops.attention_backward` for the blocked forward: (dqkv (B, T, 3C), dpast_key, dpast_value)."""
    q, k, v, y, logsumexp, hidden, dead, P, scale, block = cache
    xp = namespace(dy)
    B, NH, T, hs = q.shape
    dy = split_heads(dy, NH)  # [B, NH, T, hs]
    D = (dy * y).sum(axis=-1, keepdims=True)  # [B, NH, T, 1]: Σ_j p_j dp_j, since y = p v and dp = dy vᵀ
    dq = xp.empty_like(q)
    dk = xp.zeros_like(k)
    dv = xp.zeros_like(v)
    for b, h, t, keys in blocks(B, NH, T, P, block):
        p = _scores(xp, q[b, h, t], k[b, h, keys], _rows(hidden, b)[:, :, t, keys], P + t.start)
        p -= logsumexp[b, h, t]
        xp.exp(p, out=p)  # the forward's p: exp(s - m) / l in one pass
        if dead is not None:  # their share is added below; their scores get no gradient
            xp.copyto(p, p.dtype.type(0), where=_rows(dead, b)[:, :, t])
        dy_block = dy[b, h, t]
        dv[b, h, keys] += p.swapaxes(-1, -2) @ dy_block  # [B', H', S', Tb] @ [B', H', Tb, hs]
        ds = dy_block @ v[b, h, keys].swapaxes(-1, -2)  # dp: [B', H', Tb, hs] @ [B', H', hs, S']
        ds -= D[b, h, t]
        ds *= p  # zero wherever hidden, since p is
        xp.matmul(ds, k[b, h, keys], out=dq[b, h, t])  # [B', H', Tb, S'] @ [B', H', S', hs]
        dk[b, h, keys] += ds.swapaxes(-1, -2) @ q[b, h, t]  # q carries the scale already
    dq *= dq.dtype.type(scale)
    if dead is not None:
        add_dead_rows_share(dy, dead, dv)
    dqkv = xp.empty((B, T, 3, NH, hs), dtype=dq.dtype)  # q, k, v side by side, as c_attn produced them
    dqkv[:, :, 0] = dq.transpose((0, 2, 1, 3))
    dqkv[:, :, 1] = dk[:, :, P:].transpose((0, 2, 1, 3))
    dqkv[:, :, 2] = dv[:, :, P:].transpose((0, 2, 1, 3))
    dqkv = dqkv.reshape(B, T, 3 * NH * hs)
    if P == 0:
        return dqkv, None, None
    return dqkv, dk[:, :, :P], dv[:, :, :P]
