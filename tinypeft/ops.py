"""The ops: pure forward/backward pairs, `y, cache = op_forward(...)`, `grads = op_backward(dy, cache)`.

Each forward uses no in-place writes, so autograd can differentiate the very code we ship; each
backward is checked against autograd and against finite differences in the tests. In the order a
GPT-2 uses them: linear (Conv1D layout), embedding, LayerNorm, GELU (tanh form), softmax, causal
self-attention, and the cross-entropy with transformers' label shift. The derivations are in each
backward's docstring and in docs/model.md.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from .backend import Array, namespace, scatter_add_rows

# ===================================================================== linear layer
# Linear layer in GPT-2's Conv1D layout: the weight is (in, out) and y = x @ W + b.


def linear_forward(x: Array, weight: Array, bias: Array | None) -> tuple[Array, tuple]:
    """y = x W + b.

    x: (..., in), weight: (in, out), bias: (out,) or None  ->  y: (..., out).
    Cache: x and W, both needed by the backward; nothing is copied.
    """
    lead, n_in = x.shape[:-1], x.shape[-1]
    y = x.reshape(-1, n_in) @ weight  # [N, in] @ [in, out] -> [N, out]: one large matmul
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, weight.shape[1]), (x, weight)


def linear_backward(
    dy: Array,
    cache: tuple,
    need_dx: bool = True,
    need_dweight: bool = True,
    need_dbias: bool = True,
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients of y = x W + b.

        dx = dy W^T      dW = x^T dy  (summed over every leading position)      db = sum dy

    A frozen weight skips its dW matmul entirely (need_dweight=False): that matmul costs as
    much as the forward, and skipping it is where freezing saves compute.
    """
    x, weight = cache
    n_in, n_out = weight.shape
    dy2 = dy.reshape(-1, n_out)  # [N, out]
    dx = (dy2 @ weight.T).reshape(x.shape) if need_dx else None  # [N, out] @ [out, in]
    dweight = x.reshape(-1, n_in).T @ dy2 if need_dweight else None  # [in, N] @ [N, out]
    dbias = dy2.sum(axis=0) if need_dbias else None
    return dx, dweight, dbias


# ===================================================================== embedding
# Embedding lookup: rows of a table selected by integer ids.


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


# ===================================================================== layernorm
# Layer normalisation over the last axis (biased variance, eps inside the square root).


def layernorm_forward(x: Array, weight: Array, bias: Array, eps: float = 1e-5) -> tuple[Array, tuple]:
    """y = w * xhat + b,  xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps), over the last axis.

    x: (..., C) -> y: (..., C). Cache: xhat (..., C), rstd (..., 1) and w; mean and x are not
    kept, since the backward needs only xhat and rstd.
    """
    xp = namespace(x, weight)
    mean = xp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    var = xp.mean(xc * xc, axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + eps)
    xhat = xc * rstd
    return xhat * weight + bias, (xhat, rstd, weight)


def layernorm_backward(
    dy: Array, cache: tuple, need_dx: bool = True, need_dparams: bool = True
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients of y = w * xhat + b.

    in the forward pass this was: xhat = (x - mean(x)) * rstd, y = w * xhat + b, so:
        dw = sum over positions of dy * xhat,   db = sum over positions of dy
        g = dy * w  (the gradient at xhat)
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (means over C)
    The two mean terms come from mean and rstd depending on every element of the row.
    """
    xhat, rstd, weight = cache
    C = xhat.shape[-1]
    dx = dweight = dbias = None
    if need_dparams:
        dweight = (dy * xhat).reshape(-1, C).sum(axis=0)
        dbias = dy.reshape(-1, C).sum(axis=0)
    if need_dx:
        dx = dy * weight  # g, the gradient at xhat
        g_xhat_mean = (dx * xhat).mean(axis=-1, keepdims=True)
        dx -= dx.mean(axis=-1, keepdims=True)
        dx -= xhat * g_xhat_mean
        dx *= rstd
    return dx, dweight, dbias


# ===================================================================== gelu
# GELU, tanh form (GPT-2's "gelu_new"; PyTorch's gelu(approximate="tanh")).
#
# The erf form differs from it by up to ~5e-4, so the name says which one this is.

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBIC = 0.044715


def gelu_tanh_forward(x: Array) -> tuple[Array, Array]:
    """y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3).

    Cache: x only; tanh(u) is recomputed in the backward to keep one activation-sized array
    (the MLP's 4*n_embd-wide hidden layer is the largest activation in the model).
    """
    xp = namespace(x)
    u = x * (SQRT_2_OVER_PI + (SQRT_2_OVER_PI * CUBIC) * (x * x))  # = sqrt(2/pi) (x + 0.044715 x^3)
    return (0.5 * x) * (1.0 + xp.tanh(u)), x


def gelu_tanh_backward(dy: Array, x: Array) -> Array:
    """dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx,  t = tanh(u),  du/dx = sqrt(2/pi) (1 + 3*0.044715 x^2).

    Written with in-place updates of three fresh buffers: the backward is never traced by autograd,
    and on the MLP's activation (the model's largest) each avoided temporary is a pass over memory.
    """
    xp = namespace(x)
    x2 = x * x
    t = x2 * (SQRT_2_OVER_PI * CUBIC)
    t += SQRT_2_OVER_PI
    t *= x  # u = sqrt(2/pi) (x + 0.044715 x^3)
    xp.tanh(t, out=t)  # t = tanh(u)
    du_dx = x2
    du_dx *= 3.0 * CUBIC * SQRT_2_OVER_PI
    du_dx += SQRT_2_OVER_PI
    slope = t * t
    xp.subtract(1.0, slope, out=slope)
    slope *= x
    slope *= du_dx  # x (1 - t^2) du/dx
    t += 1.0
    t += slope
    t *= 0.5
    t *= dy
    return t


# ===================================================================== softmax
# Softmax over the last axis.


def softmax_forward(x: Array) -> tuple[Array, Array]:
    """p = exp(x - max x) / sum exp(x - max x) over the last axis; subtracting the max changes
    nothing mathematically and keeps exp from overflowing. Cache: p."""
    xp = namespace(x)
    e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
    p = e / xp.sum(e, axis=-1, keepdims=True)
    return p, p


def softmax_backward(dp: Array, p: Array, out: Array | None = None) -> Array:
    """dx_i = sum_j dp_j dp_j/dx_i = p_i (dp_i - sum_j dp_j p_j), from dp_j/dx_i = p_j (delta_ij - p_i).

    out: where to write dx (may be dp itself, when the caller no longer needs it).
    """
    xp = namespace(dp)
    weighted = (dp * p).sum(axis=-1, keepdims=True)  # [..., 1]
    out = xp.subtract(dp, weighted, out=out)
    out *= p
    return out


# ===================================================================== causal self-attention
# Causal multi-head self-attention over GPT-2's fused qkv projection, with an optional
# padding mask and optional past keys/values (a KV cache, or prefix tuning's prefixes).


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


# ===================================================================== cross-entropy and the causal-lm loss
# Mean cross-entropy over the targets that are not ignored (label -100, as PyTorch and HF).

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
