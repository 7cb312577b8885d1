"""The reference GPT-2: its forward and backward as straight calls, read top to bottom.

    x      = wte[ids] + wpe[positions]                            embeddings        [B, T, C]
    x      = x + attn(ln_1(x))          for each block            residual block    [B, T, C]
    x      = x + mlp(ln_2(x))
    logits = ln_f(x) @ wteᵀ                                       tied head         [B, T, V]

`forward` returns the logits and a named cache; `backward` is the forward's calls reversed, each
step saying what it was in the forward. Parameters are GPT-2's, by name, in one flat dict, with
weights in the (in, out) layout (y = x W + b). A PEFT method enters only through the sites
(`sites.py`): the token table, a linear layer, the input embeddings, or keys/values in front of
every attention.

What is not here, on purpose: input validation (`checks.py`), row blocks on threads, stopping the
backward at the lowest trainable layer and the KV cache (`engine.py`, proven equal to this file),
files (`checkpoint.py`). A frozen parameter's gradient is never computed: each op is asked only
for the gradients of parameters in `trainable`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

from .backend import Array, namespace
from .ops import (
    attention_backward,
    attention_forward,
    attention_visibility,
    embedding_backward,
    embedding_forward,
    gelu_tanh_backward,
    gelu_tanh_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)
from .sites import NO_SITES, HeadGradient, LinearSite, Sites, TokenSite

Params = Mapping[str, Array]
Grads = dict[str, Array]


class BaseLinear:
    """The base model's own linear layer y = x W + b, at every linear site no method fills."""

    def forward(self, params: Params, module: str, x: Array) -> tuple[Array, tuple]:
        y, cache = linear_forward(x, params[module + ".weight"], params[module + ".bias"])
        return y, (module, cache)

    def backward(
        self, dy: Array, cache: tuple, trainable: Collection[str], need_dx: bool = True
    ) -> tuple[Array | None, Grads]:
        module, inner = cache
        w, b = module + ".weight", module + ".bias"
        dx, dw, db = linear_backward(dy, inner, need_dx, w in trainable, b in trainable)
        return dx, trainable_only({w: dw, b: db}, trainable)

    def owned(self, module: str) -> tuple[str, str]:
        return module + ".weight", module + ".bias"


BASE_LINEAR = BaseLinear()


class BaseTokens:
    """The base model's own token table, wte, when no method stands in for it: the lookup wte[ids] and
    the tied head's weight are the same array, so wte's gradient is the sum of both uses."""

    param_names = ("transformer.wte.weight",)

    def forward(self, params: Params, input_ids: Array) -> tuple[Array, Array, tuple]:
        wte = params["transformer.wte.weight"]
        x, lookup = embedding_forward(wte, input_ids)  # [B, T] -> [B, T, C]
        return x, wte, lookup

    def backward(self, dembeds: Array, head: HeadGradient, cache: tuple, trainable: Collection[str]) -> Grads:
        if "transformer.wte.weight" not in trainable:
            return {}
        # the tied wte: the lookup's scatter-add plus the head's dlogitsᵀ x
        return {"transformer.wte.weight": embedding_backward(dembeds, cache) + head.full()}  # [V, C]


BASE_TOKENS = BaseTokens()


class LinearCall(NamedTuple):
    site: LinearSite
    cache: Any


class Attention(NamedTuple):
    """Causal self-attention as a forward/backward pair: `ops`' reference pair here; the engine passes
    its blocked one (`attention_blocks.py`), the same function in less memory."""

    forward: Callable
    backward: Callable


REFERENCE_ATTENTION = Attention(attention_forward, attention_backward)


class BlockCache(NamedTuple):
    ln_1: tuple
    c_attn: LinearCall
    attention: Attention
    attn: Any  # ops.AttentionCache: its k and v (past included) are what a KV cache keeps
    attn_proj: LinearCall
    ln_2: tuple
    mlp_fc: LinearCall
    gelu: tuple
    mlp_proj: LinearCall


class TokenCall(NamedTuple):
    site: TokenSite
    cache: Any


class GPTCache(NamedTuple):
    tokens: TokenCall  # the token table's lookup (and the head's weight)
    embedding_site: Any
    prefix_site: Any
    positions: tuple
    blocks: list[BlockCache]
    ln_f: tuple
    x_final: Array  # ln_f's output, which the head multiplies
    head_weight: Array  # [V, C]: wte, or what the tokens site stands in for it with
    sites: Sites


def linear(params: Params, sites: Sites, module: str, x: Array) -> tuple[Array, LinearCall]:
    """The linear layer `module`, computed by whatever stands at its site."""
    site = sites.linear.get(module, BASE_LINEAR)
    y, cache = site.forward(params, module, x)
    return y, LinearCall(site, cache)


def trainable_only(grads: Mapping[str, Array | None], trainable: Collection[str]) -> Grads:
    return {name: g for name, g in grads.items() if g is not None and name in trainable}


# ------------------------------------------------------------------ forward
def forward(
    params: Params,
    config: Any,
    input_ids: Array,
    attention_mask: Array | None = None,
    sites: Sites = NO_SITES,
    attention: Attention | None = None,
) -> tuple[Array, GPTCache]:
    """logits (B, T', V) for token ids (B, T); T' = T plus any positions an embedding site adds.

    attention_mask (B, T) of 0/1 marks padding. Keys/values from a prefix site (P per layer) are
    the attention's past: always visible, and the real tokens take positions P..P+T'-1. `attention`:
    the kernel (None: the reference pair in ops.py).
    """
    attention = REFERENCE_ATTENTION if attention is None else attention
    token_site = BASE_TOKENS if sites.tokens is None else sites.tokens
    x, head_weight, token_cache = token_site.forward(params, input_ids)  # [B, T] -> [B, T, C]; [V, C]
    tokens, wpe = TokenCall(token_site, token_cache), params["transformer.wpe.weight"]
    embedding_site = prefix_site = None
    if sites.embedding is not None:
        x, attention_mask, embedding_site = sites.embedding.forward(params, x, attention_mask)  # -> [B, T', C]
    B, T, C = x.shape
    past = [(None, None)] * config.n_layer
    if sites.prefix is not None:
        past, prefix_site = sites.prefix.forward(params, B)  # per layer ([B, NH, P, hs], [B, NH, P, hs])
    P = 0 if past[0][0] is None else past[0][0].shape[2]
    xp = namespace(x)
    if P and attention_mask is not None:  # the past is never padding
        attention_mask = xp.concatenate([xp.ones((B, P), dtype=bool), xp.asarray(attention_mask)], 1)
    pos, positions = embedding_forward(wpe, xp.arange(P, P + T))  # [T, C]
    x = x + pos  # [B, T, C] + [T, C]
    visible = attention_visibility(xp, T, P, attention_mask)  # [B or 1, 1, T, P + T]
    blocks = []
    for i in range(config.n_layer):
        x, block = block_forward(params, config, sites, i, x, visible, past[i], attention)
        blocks.append(block)
    ln_w, ln_b = params["transformer.ln_f.weight"], params["transformer.ln_f.bias"]
    x, ln_f = layernorm_forward(x, ln_w, ln_b, config.layer_norm_epsilon)  # [B, T, C]
    logits = (x.reshape(-1, C) @ head_weight.T).reshape(B, T, -1)  # tied head: [B*T, C] @ [C, V] -> [B, T, V]
    return logits, GPTCache(tokens, embedding_site, prefix_site, positions, blocks, ln_f, x, head_weight, sites)


def block_forward(
    params: Params,
    config: Any,
    sites: Sites,
    i: int,
    x: Array,
    visible: Array,
    past: tuple,
    attention: Attention,
) -> tuple[Array, BlockCache]:
    """x + attn(ln_1(x)), then + mlp(ln_2(.)): GPT-2's pre-LayerNorm residual block. x: [B, T, C]."""
    h, eps = f"transformer.h.{i}", config.layer_norm_epsilon
    a, ln_1 = layernorm_forward(x, params[f"{h}.ln_1.weight"], params[f"{h}.ln_1.bias"], eps)  # [B, T, C]
    qkv, c_attn = linear(params, sites, f"{h}.attn.c_attn", a)  # [B, T, C] -> [B, T, 3C]
    a, attn = attention.forward(qkv, config.n_head, visible, *past)  # [B, T, 3C] -> [B, T, C]
    a, attn_proj = linear(params, sites, f"{h}.attn.c_proj", a)  # [B, T, C] -> [B, T, C]
    x = x + a  # [B, T, C]
    m, ln_2 = layernorm_forward(x, params[f"{h}.ln_2.weight"], params[f"{h}.ln_2.bias"], eps)  # [B, T, C]
    m, mlp_fc = linear(params, sites, f"{h}.mlp.c_fc", m)  # [B, T, C] -> [B, T, 4C]
    m, gelu = gelu_tanh_forward(m)  # [B, T, 4C]
    m, mlp_proj = linear(params, sites, f"{h}.mlp.c_proj", m)  # [B, T, 4C] -> [B, T, C]
    x = x + m  # [B, T, C]
    return x, BlockCache(ln_1, c_attn, attention, attn, attn_proj, ln_2, mlp_fc, gelu, mlp_proj)


# ------------------------------------------------------------------ backward
def backward(dlogits: Array, cache: GPTCache, trainable: Collection[str]) -> Grads:
    """The gradients of the parameters in `trainable`, given dlogits (B, T', V).

    Every backward returns fresh arrays; where a value fed two consumers, the two gradients are
    added here, explicitly: the residual stream, and the tied wte (embedding and head).
    """
    dx, grads = head_backward(dlogits, cache, trainable)  # [B, T, C]
    dpast = []
    for i in reversed(range(len(cache.blocks))):
        dx, dpast_i, block_grads = block_backward(dx, cache.blocks[i], i, trainable)
        dpast.insert(0, dpast_i)
        grads |= block_grads
    if cache.sites.prefix is not None:
        grads |= cache.sites.prefix.backward(dpast, cache.prefix_site, trainable)
    head = HeadGradient(dlogits.reshape(-1, dlogits.shape[-1]), cache.x_final.reshape(-1, dx.shape[-1]))
    return grads | embeddings_backward(dx, cache, trainable, head)


def head_backward(dlogits: Array, cache: GPTCache, trainable: Collection[str]) -> tuple[Array, Grads]:
    """Back through logits = ln_f(x) @ W_headᵀ: (dx at the last block's output, ln_f's grads). The
    head's share of the tied table's gradient, dlogitsᵀ x, is left to the tokens site
    (`embeddings_backward`), which forms only what it trains."""
    B, T, V = dlogits.shape
    dlogits2 = dlogits.reshape(-1, V)  # [B*T, V]
    # in the forward this was: logits = x_final @ W_headᵀ, so:
    dx = (dlogits2 @ cache.head_weight).reshape(B, T, -1)  # [B*T, V] @ [V, C] -> [B, T, C]
    # in the forward this was: x_final = ln_f(x), so:
    need = "transformer.ln_f.weight" in trainable or "transformer.ln_f.bias" in trainable
    dx, dw, db = layernorm_backward(dx, cache.ln_f, need_dparams=need)  # [B, T, C]
    return dx, trainable_only({"transformer.ln_f.weight": dw, "transformer.ln_f.bias": db}, trainable)


def block_backward(
    dx: Array, cache: BlockCache, i: int, trainable: Collection[str]
) -> tuple[Array, tuple[Array, Array] | None, Grads]:
    """Back through block i: (dx at its input, (dkeys, dvalues) of its past or None, grads)."""
    h = f"transformer.h.{i}"
    grads: Grads = {}
    # in the forward this was: x_out = x_mid + mlp_proj(gelu(mlp_fc(ln_2(x_mid)))), so the residual
    # passes dx straight to x_mid and the branch adds its share
    dm, g = linear_backward_call(dx, cache.mlp_proj, trainable)  # [B, T, C] -> [B, T, 4C]
    grads |= g
    dm = gelu_tanh_backward(dm, cache.gelu)  # [B, T, 4C]
    dm, g = linear_backward_call(dm, cache.mlp_fc, trainable)  # [B, T, 4C] -> [B, T, C]
    grads |= g
    dm, g = layernorm_backward_named(dm, cache.ln_2, f"{h}.ln_2", trainable)  # [B, T, C]
    grads |= g
    dx = dx + dm
    # in the forward this was: x_mid = x_in + attn_proj(attention(c_attn(ln_1(x_in)))), so:
    da, g = linear_backward_call(dx, cache.attn_proj, trainable)  # [B, T, C]
    grads |= g
    dqkv, dpast_k, dpast_v = cache.attention.backward(da, cache.attn)  # [B, T, C] -> [B, T, 3C]
    da, g = linear_backward_call(dqkv, cache.c_attn, trainable)  # [B, T, 3C] -> [B, T, C]
    grads |= g
    da, g = layernorm_backward_named(da, cache.ln_1, f"{h}.ln_1", trainable)  # [B, T, C]
    grads |= g
    dpast = None if dpast_k is None else (dpast_k, dpast_v)
    return dx + da, dpast, grads


def embeddings_backward(dx: Array, cache: GPTCache, trainable: Collection[str], head: HeadGradient) -> Grads:
    """Back through x = site(tokens(ids)) + wpe[positions]: both lookups get the full dx; the tokens
    site gets the head's share of its table's gradient too (`head`)."""
    grads: Grads = {}
    if "transformer.wpe.weight" in trainable:
        grads["transformer.wpe.weight"] = embedding_backward(dx.sum(axis=0), cache.positions)  # [n_positions, C]
    if cache.sites.embedding is not None:
        dx, site_grads = cache.sites.embedding.backward(dx, cache.embedding_site, trainable)  # -> [B, T, C]
        grads |= site_grads
    return grads | cache.tokens.site.backward(dx, head, cache.tokens.cache, trainable)


def linear_backward_call(dy: Array, call: LinearCall, trainable: Collection[str]) -> tuple[Array, Grads]:
    return call.site.backward(dy, call.cache, trainable)


def layernorm_backward_named(dy: Array, cache: tuple, module: str, trainable: Collection[str]) -> tuple[Array, Grads]:
    w, b = module + ".weight", module + ".bias"
    dx, dw, db = layernorm_backward(dy, cache, need_dparams=w in trainable or b in trainable)
    return dx, trainable_only({w: dw, b: db}, trainable)
