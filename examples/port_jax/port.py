"""tinypeft ported to JAX from its docs alone, checked against the golden vectors.

A second, independent port beside examples/port_torch: every formula comes from a page of docs/ (named
beside it), `jax.grad` does the backward, and float64 is switched on (`jax_enable_x64`) so the float64 cases
compute in float64. It imports neither tinypeft, nor transformers, nor peft, nor torch.

    tinypeft export-vectors vectors/
    tinypeft check-vectors vectors/ --impl examples/port_jax/port.py

`run_case(case)` is the interface VECTORS.md defines; `run_trajectory(t)` opts into the training trajectories,
`merge_case` and `unmerge_case` into the merges, `generate_case` into greedy generation with and without the KV
cache, `save_adapter` into the adapter round trips (VECTORS.md describes each).

How it is laid out: a method is one function, registered under its `peft_type` with `@method(...)`, that puts
its sites on a `Sites` (a linear layer replaced, a prompt in front of the embeddings, a prefix in front of every
layer's keys and values) and may add constants it computes once (PiSSA's residual, VeRA's projections). Every
site reads its tensors from the dict `p` it is called with, so the whole forward is a pure function of the
weights, which `jax.jit` compiles once per case (model, method, trainable set, shapes and dtype) and reuses for
that case's training trajectory.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np

jax.config.update("jax_enable_x64", True)  # float64 cases compute in float64; float32 ones stay float32

Array = jax.Array
Params = dict[str, Array]
PEFT = "base_model.model."  # the prefix of every adapter tensor that lives under a module (lora.md, ia3.md, ...)
LINEAR_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # model.md §0, in block order


# ================================================================ the base model (docs/model.md)
def layernorm(x: Array, weight: Array, bias: Array, eps: float) -> Array:
    """model.md §3: y = w * (x - mean) / sqrt(var + eps) + b, biased variance over the last axis."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * weight + bias


def gelu_tanh(x: Array) -> Array:
    """model.md §4: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def attention(
    qkv: Array, n_head: int, visible: Array, past: tuple[Array, Array] | None
) -> tuple[Array, tuple[Array, Array]]:
    """model.md §5: q, k, v split from c_attn's output in that order, past keys/values in front, scores
    scaled by 1/sqrt(head size), hidden scores *replaced* by the dtype's most negative finite value. Also the
    keys and values, past included: what a KV cache holds after these positions."""
    B, T, C3 = qkv.shape
    C = C3 // 3

    def heads(t: Array) -> Array:  # [B, T, C] -> [B, NH, T, hs]
        return t.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)

    q, k, v = heads(qkv[..., :C]), heads(qkv[..., C : 2 * C]), heads(qkv[..., 2 * C :])
    if past is not None:
        k, v = jnp.concatenate([past[0], k], 2), jnp.concatenate([past[1], v], 2)  # [B, NH, P + T, hs]
    scores = q @ jnp.swapaxes(k, -1, -2) / math.sqrt(C // n_head)  # [B, NH, T, P + T]
    scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
    y = jax.nn.softmax(scores, -1) @ v  # [B, NH, T, hs]
    return y.transpose(0, 2, 1, 3).reshape(B, T, C), (k, v)


@dataclass
class Sites:
    """Where a method plugs in (model.md): `linear[module](p, x)` replaces a linear layer, `prompt(p)` is
    prepended to the token embeddings, `prefix(p)` gives every layer keys and values [NH, P, hs] in front of
    the tokens' own. `constants` are frozen tensors a method computes once from the base weights, which the sites
    read from p; `derived` are the tensors an init computes that run_case returns to be checked (VECTORS.md)."""

    linear: dict[str, Callable[[Params, Array], Array]] = field(default_factory=dict)
    tokens: Callable[[Params, Array], tuple[Array, Array]] | None = None  # (the lookup [B, T, C], the head's table)
    regulariser: Callable[[Params], Array] | None = None  # added to the loss (adalora.md)
    prompt: Callable[[Params], Array] | None = None
    prefix: Callable[[Params], list[tuple[Array, Array]]] | None = None
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    derived: dict[str, np.ndarray] = field(default_factory=dict)


def base_linear(p: Params, module: str, x: Array) -> Array:
    """model.md §2: y = x W + b, W stored (in, out)."""
    return x @ p[module + ".weight"] + p[module + ".bias"]


def gpt(config: dict[str, Any], sites: Sites, p: Params, ids: Array, mask: Array | None) -> Array:
    """GPT-2's logits [B, T', V] over the flat dict p of parameters named as in model.md."""
    return gpt_forward(config, sites, p, ids, mask)[0]


def gpt_forward(
    config: dict[str, Any],
    sites: Sites,
    p: Params,
    ids: Array,
    mask: Array | None,
    cache: list[tuple[Array, Array]] | None = None,
) -> tuple[Array, list[tuple[Array, Array]]]:
    """The logits, and every layer's keys and values so far [B, NH, P + T, hs] (the KV cache). With a cache, ids
    are the tokens after the cached positions: the virtual tokens and the prefix are in the cache already."""
    n_head, eps = config["n_head"], config["layer_norm_epsilon"]

    def layer(module: str, x: Array) -> Array:
        site = sites.linear.get(module)
        return site(p, x) if site is not None else base_linear(p, module, x)

    def ln(name: str, x: Array) -> Array:
        return layernorm(x, p[name + ".weight"], p[name + ".bias"], eps)

    B, wte = ids.shape[0], p["transformer.wte.weight"]
    x, head = (wte[ids], wte) if sites.tokens is None else sites.tokens(p, ids)  # [B, T, C], [V, C]
    if sites.prompt is not None and cache is None:  # prompt_tuning.md: the table in front, mask ones in front
        table = sites.prompt(p)
        x = jnp.concatenate([jnp.broadcast_to(table, (B, *table.shape)), x], 1)
        mask = None if mask is None else jnp.concatenate([jnp.ones((B, table.shape[0]), mask.dtype), mask], 1)
    pasts = None
    if sites.prefix is not None:  # the same keys and values for every row of the batch
        pasts = [tuple(jnp.broadcast_to(t, (B, *t.shape)) for t in kv) for kv in sites.prefix(p)]
    if cache is not None:  # a cached step: the keys and values of every position so far, the prefix's included
        pasts = cache
    P = 0 if pasts is None else pasts[0][0].shape[2]
    if P and mask is not None:  # prefix_tuning.md: every token sees every prefix entry
        mask = jnp.concatenate([jnp.ones((B, P), mask.dtype), mask], 1)
    T = x.shape[1]
    x = x + p["transformer.wpe.weight"][P : P + T]  # model.md §1: positions P..P+T-1, padding or not
    visible = jnp.arange(P + T)[None, :] <= (P + jnp.arange(T))[:, None]  # [T, P + T], causal
    visible = visible[None, None] if mask is None else visible[None, None] & (mask[:, None, None, :] != 0)
    keys_values = []
    for i in range(config["n_layer"]):
        h = f"transformer.h.{i}"
        past = None if pasts is None else pasts[i]
        a, kv = attention(layer(f"{h}.attn.c_attn", ln(f"{h}.ln_1", x)), n_head, visible, past)
        keys_values.append(kv)
        x = x + layer(f"{h}.attn.c_proj", a)
        m = gelu_tanh(layer(f"{h}.mlp.c_fc", ln(f"{h}.ln_2", x)))
        x = x + layer(f"{h}.mlp.c_proj", m)
    return ln("transformer.ln_f", x) @ head.T, keys_values  # tied head: [B, T, V]


def causal_lm_loss(logits: Array, labels: Array) -> Array:
    """model.md §7: position t predicts label t+1; -100 is ignored; the mean over the rest. Virtual tokens
    in front of the tokens (prompt tuning) get labels of -100 (prompt_tuning.md)."""
    B, added = labels.shape[0], logits.shape[1] - labels.shape[1]
    labels = jnp.concatenate([jnp.full((B, added), -100, labels.dtype), labels], 1)
    targets = labels[:, 1:]
    valid = targets != -100
    log_probs = jax.nn.log_softmax(logits[:, :-1], -1)  # z - max z - log sum e^(z - max z)
    picked = jnp.take_along_axis(log_probs, jnp.maximum(targets, 0)[..., None], -1)[..., 0]  # -100 reads row 0
    return -jnp.where(valid, picked, 0).sum() / valid.sum().astype(logits.dtype)


# ================================================================ target matching (lora.md, ia3.md)
def matches(module: str, targets: str | list[str]) -> bool:
    """PEFT's rule: a list entry t matches module m if m == t or m ends with "." + t; a string is a
    regular expression that must match the whole name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def targets(config: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The linear modules of the model that cfg's target_modules hits, in block order."""
    modules = [f"transformer.h.{i}.{m}" for i in range(config["n_layer"]) for m in LINEAR_MODULES]
    return [m for m in modules if matches(m, cfg["target_modules"])]


# ================================================================ the methods, by peft_type
Method = Callable[[Sites, dict[str, Any], dict[str, Any], dict[str, np.ndarray]], None]
METHODS: dict[str, Method] = {}


def method(*peft_types: str) -> Callable[[Method], Method]:
    """Register `attach(sites, config, cfg, weights)` for these peft_types: a new method is one such function.
    None (full fine-tuning), BITFIT and LN_TUNING are the base model, with the trainable tensors the case names."""

    def register(attach: Method) -> Method:
        for peft_type in peft_types:
            METHODS[peft_type] = attach
        return attach

    return register


# ---------------------------------------------------------------- LoRA, rsLoRA, DoRA, PiSSA (docs/lora.md)
def pissa_residual(W: np.ndarray, r: int, s: float) -> np.ndarray:
    """lora.md, PiSSA: with W^T = U S V^T (SVD in float64), A = diag(sqrt(S_r/s)) V_r^T, B = U_r diag(sqrt(S_r/s))
    at init, and the frozen residual W - s (B A)^T, computed once from the base weight."""
    U, S, Vh = np.linalg.svd(W.astype(np.float64).T, full_matrices=False)
    root = np.sqrt(S[:r] / s)
    A, B = root[:, None] * Vh[:r], U[:, :r] * root[None, :]
    return (W.astype(np.float64) - s * (B @ A).T).astype(W.dtype)


def lora_scaling(cfg: dict[str, Any]) -> float:
    """lora.md: s = alpha / r, or alpha / sqrt(r) with rsLoRA (under DoRA and PiSSA too)."""
    return cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])


@method("LORA")
def lora(sites: Sites, config: dict[str, Any], cfg: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    r, s = cfg["r"], lora_scaling(cfg)
    for module in targets(config, cfg):
        weight = module + ".weight"
        if cfg["init_lora_weights"] == "pissa":  # PiSSA computes with W_res in place of W, DoRA's norm included
            weight = module + ".pissa_residual"
            sites.constants[weight] = sites.derived[weight] = pissa_residual(weights[module + ".weight"], r, s)
        A, B, m = (f"{PEFT}{module}.{t}" for t in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))

        def site(p: Params, x: Array, module=module, weight=weight, A=A, B=B, m=m) -> Array:
            W, b, A, B = p[weight], p[module + ".bias"], p[A], p[B]  # (in, out), (out,), (r, in), (out, r)
            if cfg["use_dora"]:  # per output column; a constant in the backward
                norm = jax.lax.stop_gradient(jnp.linalg.norm(W + s * (B @ A).T, axis=0))
                return (p[m] / norm) * (x @ W + s * (x @ A.T) @ B.T) + b
            return x @ W + b + s * (x @ A.T) @ B.T

        sites.linear[module] = site
    if matches("transformer.wte", cfg["target_modules"]):  # lora.md, on wte: the lookup only; the head reads W
        A, B = (f"{PEFT}transformer.wte.lora_embedding_{t}" for t in "AB")  # (r, V), (C, r)

        def lookup(p: Params, ids: Array, A=A, B=B) -> tuple[Array, Array]:
            W = p["transformer.wte.weight"]
            return W[ids] + s * p[A].T[ids] @ p[B].T, W

        sites.tokens = lookup
    indices = cfg.get("trainable_token_indices")
    if indices is not None:  # trainable_tokens.md, inside LoRA: a list, or {"wte": ids}
        ids = next(iter(indices.values())) if isinstance(indices, dict) else indices
        sites.tokens = token_rows(ids, f"{PEFT}transformer.wte.token_adapter.trainable_tokens_delta")


# ---------------------------------------------------------------- trainable tokens (docs/trainable_tokens.md)
def token_rows(indices: list[int], delta: str) -> Callable[[Params, Array], tuple[Array, Array]]:
    """W' = W.index_copy(idx, Δ): row idx_j of the table is Δ_j; the lookup and the tied head both read W'."""

    def tokens(p: Params, ids: Array) -> tuple[Array, Array]:
        table = p["transformer.wte.weight"].at[np.asarray(indices)].set(p[delta])
        return table[ids], table

    return tokens


@method("TRAINABLE_TOKENS")
def trainable_tokens(sites: Sites, config: dict[str, Any], cfg: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    sites.tokens = token_rows(cfg["token_indices"], f"{PEFT}transformer.wte.trainable_tokens_delta")


# ---------------------------------------------------------------- AdaLoRA (docs/adalora.md)
@method("ADALORA")
def adalora(sites: Sites, config: dict[str, Any], cfg: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    """y = x W + b + c (x (A * E)^T) B^T, c = lora_alpha / (init_r + 1e-5) whatever the layer's rank; the loss
    adds w / (2L) * the sum over layers of ||A A^T - I||_F + ||B^T B - I||_F."""
    c, names = cfg["lora_alpha"] / (cfg["init_r"] + 1e-5), []
    for module in targets(config, cfg):
        A, E, B = (f"{PEFT}{module}.lora_{t}" for t in "AEB")  # (r, in), (r, 1), (out, r)

        def site(p: Params, x: Array, module=module, A=A, E=E, B=B) -> Array:
            W, b, A, E, B = p[module + ".weight"], p[module + ".bias"], p[A], p[E], p[B]
            return x @ W + b + c * (x @ (A * E).T) @ B.T

        sites.linear[module] = site
        names.append((A, B))
    w = cfg["orth_reg_weight"]

    def regulariser(p: Params) -> Array:
        products = [M for A, B in names for M in (p[A] @ p[A].T, p[B].T @ p[B])]
        norms = [jnp.linalg.norm(M - jnp.eye(M.shape[0], dtype=M.dtype)) for M in products]
        return w * sum(norms) / len(norms)

    sites.regulariser = regulariser


# ---------------------------------------------------------------- prompt tuning (docs/prompt_tuning.md)
@method("PROMPT_TUNING")
def prompt_tuning(sites: Sites, config: dict[str, Any], cfg: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    sites.prompt = lambda p: p["prompt_embeddings"]  # (NV, C)
    if cfg["prompt_tuning_init"] == "TEXT":  # the text's UTF-8 bytes as ids, tiled, cut to NV rows of wte
        ids = list(cfg["prompt_tuning_init_text"].encode("utf-8"))
        nv = cfg["num_virtual_tokens"]
        ids = (ids * math.ceil(nv / len(ids)))[:nv]
        sites.derived["prompt_embeddings"] = weights["transformer.wte.weight"][ids]  # equals the stored table


# ---------------------------------------------------------------- P-tuning (docs/ptuning.md)
def lstm_direction(x: Array, p: Params, head: str, suffix: str) -> Array:
    """One direction of one LSTM layer over the rows of x (T, in), from h = c = 0; gates i, f, g, o."""
    W_ih, W_hh = p[f"{head}.weight_ih{suffix}"], p[f"{head}.weight_hh{suffix}"]
    b = p[f"{head}.bias_ih{suffix}"] + p[f"{head}.bias_hh{suffix}"]
    H = W_hh.shape[1]
    h = c = jnp.zeros(H, x.dtype)
    steps = range(x.shape[0] - 1, -1, -1) if suffix.endswith("_reverse") else range(x.shape[0])
    out = {}
    for t in steps:
        z = W_ih @ x[t] + W_hh @ h + b
        i, f, g, o = (
            jax.nn.sigmoid(z[:H]),
            jax.nn.sigmoid(z[H : 2 * H]),
            jnp.tanh(z[2 * H : 3 * H]),
            jax.nn.sigmoid(z[3 * H :]),
        )
        c = f * c + i * g
        h = out[t] = o * jnp.tanh(c)
    return jnp.stack([out[t] for t in range(x.shape[0])])


@method("P_TUNING")
def ptuning(sites: Sites, config: dict[str, Any], cfg: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    enc = "prompt_encoder"
    if "prompt_embeddings" in weights:  # a table alone: prompt tuning's
        sites.prompt = lambda p: p["prompt_embeddings"]
        return

    def linear(p: Params, x: Array, i: int) -> Array:
        return x @ p[f"{enc}.mlp_head.{i}.weight"].T + p[f"{enc}.mlp_head.{i}.bias"]

    def table(p: Params) -> Array:  # (NV, C): the encoder over the rows of E, one sequence
        x = p[f"{enc}.embedding.weight"]
        if cfg["encoder_reparameterization_type"] == "MLP":
            return linear(p, jax.nn.relu(linear(p, jax.nn.relu(linear(p, x, 0)), 2)), 4)
        for layer in range(cfg["encoder_num_layers"]):  # bidirectional: [forward h, reverse h] per row
            both = [lstm_direction(x, p, f"{enc}.lstm_head", f"_l{layer}{rev}") for rev in ("", "_reverse")]
            x = jnp.concatenate(both, 1)
        return linear(p, jax.nn.relu(linear(p, x, 0)), 2)

    sites.prompt = table


# ---------------------------------------------------------------- prefix tuning (docs/prefix_tuning.md)
@method("PREFIX_TUNING")
def prefix_tuning(sites: Sites, config: dict[str, Any], cfg: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    L, NH = config["n_layer"], config["n_head"]

    def table(p: Params) -> Array:  # (NV, 2 L C)
        if not cfg["prefix_projection"]:
            return p["prompt_embeddings"]
        E = p["prompt_encoder.embedding.weight"]
        hidden = jnp.tanh(E @ p["prompt_encoder.transform.0.weight"].T + p["prompt_encoder.transform.0.bias"])
        return hidden @ p["prompt_encoder.transform.2.weight"].T + p["prompt_encoder.transform.2.bias"]

    def prefix(p: Params) -> list[tuple[Array, Array]]:  # the same for every row of the batch
        theta = table(p)
        NV = theta.shape[0]
        kv = theta.reshape(NV, 2 * L, NH, -1).transpose(1, 2, 0, 3)  # [layer][key/value][head][NV][head_dim]
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(L)]

    sites.prefix = prefix


# ---------------------------------------------------------------- IA3 (docs/ia3.md)
def ia3_feedforward(module: str, ff: str | list[str]) -> bool:
    """ia3.md: feedforward_modules is a plain endswith per entry (no "." boundary), or a full-match regex string."""
    return re.fullmatch(ff, module) is not None if isinstance(ff, str) else module.endswith(tuple(ff))


@method("IA3")
def ia3(sites: Sites, config: dict[str, Any], cfg: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    for module in targets(config, cfg):
        l = f"{PEFT}{module}.ia3_l"
        if ia3_feedforward(module, cfg["feedforward_modules"]):
            sites.linear[module] = lambda p, x, module=module, l=l: base_linear(p, module, x * p[l])
        else:
            sites.linear[module] = lambda p, x, module=module, l=l: base_linear(p, module, x) * p[l]


# ---------------------------------------------------------------- bottleneck adapters (docs/adapters.md)
ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "silu": jax.nn.silu, "gelu_tanh": gelu_tanh}
PLACEMENTS = {"both": ("attn.c_proj", "mlp.c_proj"), "attn": ("attn.c_proj",), "mlp": ("mlp.c_proj",)}


@method("BOTTLENECK_ADAPTER")
def bottleneck(sites: Sites, config: dict[str, Any], cfg: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    act = ACTIVATIONS[cfg["non_linearity"]]
    for i in range(config["n_layer"]):
        for place in PLACEMENTS[cfg["placement"]]:
            module = f"transformer.h.{i}.{place}"
            down, up = (f"{PEFT}{module}.adapter_{d}" for d in ("down", "up"))

            def adapted(p: Params, x: Array, module=module, down=down, up=up) -> Array:
                h = base_linear(p, module, x)
                g = act(h @ p[down + ".weight"].T + p[down + ".bias"])
                return h + g @ p[up + ".weight"].T + p[up + ".bias"]

            sites.linear[module] = adapted


# ---------------------------------------------------------------- VeRA (docs/vera.md)
def mt19937(seed: int) -> Callable[[], int]:
    """vera.md: the reference Mersenne Twister, seeded by init_genrand(seed mod 2^32); each call, the next
    32-bit output."""
    state, index = [seed % 2**32], 624
    for i in range(1, 624):
        state.append((1812433253 * (state[-1] ^ (state[-1] >> 30)) + i) % 2**32)

    def next_word() -> int:
        nonlocal index
        if index == 624:
            for k in range(624):
                y = (state[k] & 0x80000000) | (state[(k + 1) % 624] & 0x7FFFFFFF)
                state[k] = state[(k + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            index = 0
        y = state[index]
        index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)

    return next_word


def kaiming_uniform(next_word: Callable[[], int], shape: tuple[int, int]) -> np.ndarray:
    """vera.md: uniform on +-sqrt(3) (sqrt(2) / sqrt(fan_in)), fan_in the shape's second size; each element in
    row-major order takes one 32-bit output w, and v = w mod 2^24 gives v 2^-24 (h - l) + l in float64 (exact),
    rounded to float32 once, with l = float32(-bound), h = float32(bound)."""
    bound = math.sqrt(3.0) * (math.sqrt(2.0) / math.sqrt(shape[1]))
    low, high = float(np.float32(-bound)), float(np.float32(bound))
    v = np.array([next_word() % 2**24 for _ in range(shape[0] * shape[1])], dtype=np.float64)
    return (v * 2.0**-24 * (high - low) + low).astype(np.float32).reshape(shape)


@method("VERA")
def vera(sites: Sites, config: dict[str, Any], cfg: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    """vera.md: one frozen pair A (r, max in) then B (max out, r), drawn from projection_prng_key; each layer
    reads the top-left block it needs, and y = x W + b + l_b * ((l_d * (x A^T)) B^T)."""
    r, dtype, modules = cfg["r"], weights["transformer.wte.weight"].dtype, targets(config, cfg)
    n_in = max(weights[m + ".weight"].shape[0] for m in modules)
    n_out = max(weights[m + ".weight"].shape[1] for m in modules)
    next_word = mt19937(cfg["projection_prng_key"])
    A = kaiming_uniform(next_word, (r, n_in))  # A first, then B, from the one generator
    B = kaiming_uniform(next_word, (n_out, r))
    sites.constants["base_model.vera_A"], sites.constants["base_model.vera_B"] = A.astype(dtype), B.astype(dtype)
    sites.derived.update(sites.constants)
    for module in modules:
        l_d, l_b = f"{PEFT}{module}.vera_lambda_d", f"{PEFT}{module}.vera_lambda_b"

        def site(p: Params, x: Array, module=module, l_d=l_d, l_b=l_b) -> Array:
            W = p[module + ".weight"]
            A, B = p["base_model.vera_A"][:, : W.shape[0]], p["base_model.vera_B"][: W.shape[1]]  # (r, in), (out, r)
            return base_linear(p, module, x) + p[l_b] * ((p[l_d] * (x @ A.T)) @ B.T)

        sites.linear[module] = site


# ---------------------------------------------------------------- LoHa (docs/loha.md)
@method("LOHA")
def loha(sites: Sites, config: dict[str, Any], cfg: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    s = cfg["alpha"] / cfg["r"]
    for module in targets(config, cfg):

        def site(p: Params, x: Array, module=module) -> Array:
            w1a, w1b, w2a, w2b = (p[f"{PEFT}{module}.hada_{w}"] for w in ("w1_a", "w1_b", "w2_a", "w2_b"))
            delta = s * (w1a @ w1b) * (w2a @ w2b)  # (out, in): PEFT's nn.Linear layout, so it enters transposed
            return base_linear(p, module, x) + x @ delta.T

        sites.linear[module] = site


# ---------------------------------------------------------------- LoKr (docs/lokr.md)
def split(dimension: int, factor: int) -> tuple[int, int]:
    """lokr.md, factorization: (f, dim / f) if f > 0 divides dim; else (m, dim / m) with m the largest divisor of
    dim with m <= sqrt(dim), and m <= f when f > 0."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = math.isqrt(dimension) if factor == -1 else min(math.isqrt(dimension), factor)
    m = max(k for k in range(1, limit + 1) if dimension % k == 0)
    return m, dimension // m


@method("LOKR")
def lokr(sites: Sites, config: dict[str, Any], cfg: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    r, scale = cfg["r"], cfg["alpha"] / cfg["r"]
    for module in targets(config, cfg):
        n_in, n_out = weights[module + ".weight"].shape
        c, d = split(n_in, cfg["decompose_factor"])  # in = c d
        a, bb = split(n_out, cfg["decompose_factor"])  # out = a bb
        low_rank_w1 = cfg["decompose_both"] and r < max(a, c) / 2
        low_rank_w2 = r < max(bb, d) / 2

        def site(p: Params, x: Array, module=module, low_rank_w1=low_rank_w1, low_rank_w2=low_rank_w2) -> Array:
            name = f"{PEFT}{module}.lokr_"
            w1 = p[name + "w1_a"] @ p[name + "w1_b"] if low_rank_w1 else p[name + "w1"]  # (a, c)
            w2 = p[name + "w2_a"] @ p[name + "w2_b"] if low_rank_w2 else p[name + "w2"]  # (bb, d)
            delta = scale * jnp.kron(w1, w2)  # (a bb, c d) = (out, in), PEFT's nn.Linear layout
            return x @ delta.T + base_linear(p, module, x)

        sites.linear[module] = site


# ---------------------------------------------------------------- OFT and BOFT (docs/oft.md)
def cayley(S: Array) -> Array:
    """oft.md, Cayley: R = (I - S)(I + S)^-1 per block, PEFT's solve of X (I + S) = I - S, transposed:
    (I + S)^T X^T = (I - S)^T."""
    eye = jnp.eye(S.shape[-1], dtype=S.dtype)
    return jnp.swapaxes(jnp.linalg.solve(jnp.swapaxes(eye + S, -1, -2), jnp.swapaxes(eye - S, -1, -2)), -1, -2)


def neumann(S: Array, terms: int) -> Array:
    """oft.md, Neumann: I + 2S for 2 terms; I + 2S + ... + 2S^(m-1) + S^m with m = max(terms - 1, 3) beyond."""
    m = max(terms - 1, 3)
    coefficients = [1, 2] if terms == 2 else [1] + [2] * (m - 1) + [1]
    R, power = jnp.zeros_like(S), jnp.broadcast_to(jnp.eye(S.shape[-1], dtype=S.dtype), S.shape)
    for c in coefficients:
        R, power = R + c * power, power @ S
    return R


def coft(q: Array, eps: float) -> Array:
    """oft.md, COFT: each block's S (Frobenius norm sqrt(2) |q|) pulled onto the ball of radius eps / sqrt(k) (float32
    arithmetic, k the blocks stored) if outside it; the gradient passes straight through."""
    radius = float(np.float32(eps) * (np.float32(1) / np.sqrt(np.float32(q.shape[0]))))
    fixed = jax.lax.stop_gradient(q)
    norm = math.sqrt(2) * jnp.linalg.norm(fixed, axis=1, keepdims=True)
    projected = jnp.where(norm <= radius, fixed, fixed * radius / norm)
    return q + (projected - fixed)


def rotate_blocks(x: Array, R: Array) -> Array:
    """oft.md: x' = x diag(R_1..R_r), each group of b input features a row vector times its block."""
    r, b = x.shape[-1] // R.shape[-1], R.shape[-1]
    blocks = jnp.broadcast_to(R, (r, b, b))
    return jnp.einsum("...rk,rkc->...rc", x.reshape(*x.shape[:-1], r, b), blocks).reshape(x.shape)


@method("OFT")
def oft(sites: Sites, config: dict[str, Any], cfg: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    for module in targets(config, cfg):
        block = cfg["oft_block_size"] or weights[module + ".weight"].shape[0] // cfg["r"]  # r x block = in

        def site(p: Params, x: Array, module=module, block=block) -> Array:
            q = p[f"{PEFT}{module}.oft_R.weight"]
            if cfg["coft"]:
                q = coft(q, cfg["eps"])
            rows, cols = np.triu_indices(block, 1)
            S = jnp.zeros((q.shape[0], block, block), q.dtype).at[:, rows, cols].set(q)
            S = S - jnp.swapaxes(S, 1, 2)  # skew-symmetric from the strict upper triangle, row by row
            R = neumann(S, cfg["num_cayley_neumann_terms"]) if cfg["use_cayley_neumann"] else cayley(S)
            return base_linear(p, module, rotate_blocks(x, R))

        sites.linear[module] = site


def butterfly_perm(n: int, blocks: int, r: int, n_factors: int) -> list[int]:
    """oft.md, BOFT's permutations: the identity for one factor; else, in each stretch of n / blocks features,
    the groups of r taken evens first, then odds."""
    if n_factors == 1:
        return list(range(n))
    size = n // blocks
    step = size // r
    order = list(range(0, step, 2)) + list(range(1, step, 2))
    within = [k for pos in order for k in range(pos * r, pos * r + r)]
    return [start + k for start in range(0, n, size) for k in within]


@method("BOFT")
def boft(sites: Sites, config: dict[str, Any], cfg: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    for module in targets(config, cfg):

        def site(p: Params, x: Array, module=module) -> Array:
            W, b = p[module + ".weight"], p[module + ".bias"]
            X, s = p[f"{PEFT}{module}.boft_R"], p[f"{PEFT}{module}.boft_s"]  # (F, D, H, H), (out, 1)
            F, D, H, _ = X.shape
            R = cayley(0.5 * (X - jnp.swapaxes(X, -1, -2)))  # the skew part of each block, then Cayley
            M = jnp.eye(W.shape[0], dtype=W.dtype)
            for f in range(F):  # M = M_{F-1} ... M_0, M_f = P_f diag(R_f) P_f^T with P_f[i, perm_f[i]] = 1
                P = jnp.eye(W.shape[0], dtype=W.dtype)[np.array(butterfly_perm(W.shape[0], D // 2**f, H // 2, F))]
                M = P @ jax.scipy.linalg.block_diag(*R[f]) @ P.T @ M
            return (x @ M @ W) * s[:, 0] + b

        sites.linear[module] = site


# ================================================================ the interface (VECTORS.md)
@dataclass
class Compiled:
    """One case's model and method: `step(trainable, frozen, ids, labels, mask)` -> ((loss, logits), grads),
    jit-compiled, and what the method computed once: constants (passed in with the frozen tensors), derived."""

    step: Callable[..., Any]
    constants: dict[str, np.ndarray]
    derived: dict[str, np.ndarray]


_STEPS: dict[str, Callable[..., Any]] = {}


def compiled(case: dict[str, Any]) -> Compiled:
    """The case's method attached (its constants computed from the case's weights) and its compiled loss and
    gradients, built once per (model, method, trainable set, dtype): every site reads its tensors, constants
    included, from the dict it is given, so a case and its trajectory share one; jax.jit compiles once per shape."""
    config, cfg, sites = case["model_config"], case["method_config"] or {}, Sites()
    attach = METHODS.get(cfg.get("peft_type"))
    if attach is not None:
        attach(sites, config, cfg, case["weights"])
    key = json.dumps([config, cfg, case["trainable"], case["dtype"]], sort_keys=True)
    if key not in _STEPS:

        def loss_fn(trainable: Params, frozen: Params, ids: Array, labels: Array, mask: Array | None) -> Any:
            p = {**frozen, **trainable}
            logits = gpt(config, sites, p, ids, mask)
            loss = causal_lm_loss(logits, labels)
            return (loss if sites.regulariser is None else loss + sites.regulariser(p)), logits

        _STEPS[key] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    return Compiled(_STEPS[key], sites.constants, sites.derived)


def inputs(case: dict[str, Any]) -> tuple[Compiled, dict[str, np.ndarray], dict[str, np.ndarray], tuple[Any, ...]]:
    """The compiled step, the trainable and frozen tensors (constants among the frozen), and the batch."""
    entry, weights = compiled(case), dict(case["weights"])  # NumPy arrays: jit takes them as they are
    trainable = {n: weights.pop(n) for n in case["trainable"]}
    frozen = {**weights, **entry.constants}
    return entry, trainable, frozen, (case["input_ids"], case["labels"], case["attention_mask"])


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """logits, loss, the gradient of every trainable tensor, and the tensors the init derives."""
    entry, trainable, frozen, (ids, labels, mask) = inputs(case)
    (loss, logits), grads = entry.step(trainable, frozen, ids, labels, mask)
    return {
        "logits": np.asarray(logits),
        "loss": float(loss),
        "grads": {n: np.asarray(g) for n, g in grads.items()},
        "derived": entry.derived,
    }


# ================================================================ training trajectories (VECTORS.md)
def learning_rate(step: int, t: dict[str, Any]) -> float:
    """Linear warm-up to lr over warmup_steps, then a cosine down to min_lr_ratio * lr at the last step."""
    lr, warmup, steps, floor = t["lr"], t["warmup_steps"], t["steps"], t["min_lr_ratio"]
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def run_trajectory(t: dict[str, Any]) -> dict[str, Any]:
    """`steps` optimizer steps on the case's batch: the loss before each, the trainable tensors after the last.
    The optimizer runs in NumPy in the case's dtype: its scalars are Python floats, which keep that dtype."""
    entry, params, frozen, batch = inputs(t)
    opt, state, losses = t["optimizer"], {n: {} for n in params}, []
    for step in range(t["steps"]):
        (loss, _), grads = entry.step(params, frozen, *batch)
        grads = {n: np.asarray(g) for n, g in grads.items()}
        losses.append(float(loss))
        if t["grad_clip"]:  # one norm over every trainable tensor together
            norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
            if norm > t["grad_clip"]:
                grads = {n: g * (t["grad_clip"] / (norm + 1e-6)) for n, g in grads.items()}
        lr = learning_rate(step, t)
        for name in params:
            params[name] = update(params[name], grads[name], state[name], opt, lr, step + 1)
    return {"losses": losses, "params": params}


def update(p: np.ndarray, g: np.ndarray, s: dict[str, np.ndarray], opt: dict[str, Any], lr: float, t: int) -> Any:
    """One step of AdamW or SGD on p (torch's formulas, VECTORS.md); weight decay only on matrices (ndim >= 2)."""
    decays = opt["weight_decay"] > 0 and p.ndim >= 2
    if opt["name"] == "AdamW":
        b1, b2 = opt["betas"]
        if decays:
            p = p * (1 - lr * opt["weight_decay"])
        m = s["m"] = b1 * s.get("m", np.zeros_like(p)) + (1 - b1) * g
        v = s["v"] = b2 * s.get("v", np.zeros_like(p)) + (1 - b2) * g * g
        return p - (lr / (1 - b1**t)) * m / (np.sqrt(v) / math.sqrt(1 - b2**t) + opt["eps"])
    if decays:
        g = g + opt["weight_decay"] * p
    if opt["momentum"]:
        g = s["b"] = g.copy() if "b" not in s else opt["momentum"] * s["b"] + g
    return p - lr * g


# ================================================================ merge and unmerge (lora.md, ia3.md: Merge)
def attached(case: dict[str, Any]) -> tuple[Sites, Params]:
    """The case's method attached and every tensor its sites read (its weights and constants), in the case's dtype."""
    sites, cfg = Sites(), case["method_config"] or {}
    attach = METHODS.get(cfg.get("peft_type"))
    if attach is not None:
        attach(sites, case["model_config"], cfg, case["weights"])
    return sites, {n: jnp.asarray(w) for n, w in {**case["weights"], **sites.constants}.items()}


def base_names(config: dict[str, Any]) -> list[str]:
    """model.md §0: the base model's parameters."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(config["n_layer"]):
        h = f"transformer.h.{i}"
        names += [f"{h}.{ln}.{w}" for ln in ("ln_1", "ln_2") for w in ("weight", "bias")]
        names += [f"{h}.{m}.{w}" for m in LINEAR_MODULES for w in ("weight", "bias")]
    return [*names, "transformer.ln_f.weight", "transformer.ln_f.bias"]


def read_off(site: Callable[[Params, Array], Array], p: Params, n_in: int, dtype: Any) -> tuple[Array, Array]:
    """Any adapted linear layer is affine in x, y = x W' + b': b' = site(0), and W' = site(I) - b' row by row."""
    b = site(p, jnp.zeros((1, n_in), dtype))[0]
    return site(p, jnp.eye(n_in, dtype=dtype)) - b, b


def lora_update(p: Params, cfg: dict[str, Any], module: str) -> tuple[Array, Array, Array | None]:
    """lora.md: the weight the sites compute with (PiSSA's residual or W), s (BA)^T in (in, out), DoRA's k."""
    s = lora_scaling(cfg)
    W = p[module + (".pissa_residual" if cfg["init_lora_weights"] == "pissa" else ".weight")]
    delta = s * (p[f"{PEFT}{module}.lora_B.weight"] @ p[f"{PEFT}{module}.lora_A.weight"]).T
    if not cfg["use_dora"]:
        return W, delta, None
    return W, delta, p[f"{PEFT}{module}.lora_magnitude_vector"] / jnp.linalg.norm(W + delta, axis=0)


def merge_weights(sites: Sites, p: Params, cfg: dict[str, Any]) -> dict[str, Array]:
    """Each adapted layer's (W', b'): LoRA's and IA3's by their formulas, every other method's read off its site."""
    kind, out = cfg.get("peft_type"), {}
    for module, site in sites.linear.items():
        W, b = p[module + ".weight"], p[module + ".bias"]
        if kind == "LORA":  # W' = W + s (BA)^T; DoRA: each output column times k = m / ||W + s (BA)^T||
            W_used, delta, k = lora_update(p, cfg, module)
            W = W_used + delta if k is None else (W_used + delta) * k
        elif kind == "IA3":
            l = p[f"{PEFT}{module}.ia3_l"]
            if ia3_feedforward(module, cfg["feedforward_modules"]):
                W = W * l[:, None]  # diag(l) W: the rows
            else:
                W, b = W * l[None, :], b * l  # W diag(l): the columns, and the bias
        else:
            W, b = read_off(site, p, W.shape[0], W.dtype)
        out[module + ".weight"], out[module + ".bias"] = W, b
    if sites.tokens is not None:  # the table the lookup reads, every id's row (LoRA on wte, trainable tokens)
        out["transformer.wte.weight"] = sites.tokens(p, jnp.arange(p["transformer.wte.weight"].shape[0]))[0]
    return out


def merge_case(case: dict[str, Any]) -> dict[str, Any]:
    """Every base parameter after folding the adapter into the base weights."""
    sites, p = attached(case)
    merged = merge_weights(sites, p, case["method_config"])
    return {n: np.asarray(merged.get(n, p[n])) for n in base_names(case["model_config"])}


def unmerge_case(case: dict[str, Any]) -> dict[str, Any]:
    """Every base parameter after merging, then taking the adapter back out of the merged weights as PEFT does:
    subtracting the update, dividing by DoRA's k or IA3's l (exactly: not l + 1e-8)."""
    sites, p = attached(case)
    cfg = case["method_config"]
    merged = merge_weights(sites, p, cfg)
    for module in sites.linear:
        W, b = merged[module + ".weight"], merged[module + ".bias"]
        if cfg["peft_type"] == "LORA":
            W_used, delta, k = lora_update(p, cfg, module)
            W = (W if k is None else W / k) - delta
            W = W + (p[module + ".weight"] - W_used)  # PiSSA: back from the residual to the base it came from
        elif cfg["peft_type"] == "IA3":
            l = p[f"{PEFT}{module}.ia3_l"]
            if ia3_feedforward(module, cfg["feedforward_modules"]):
                W = W / l[:, None]
            else:
                W, b = W / l[None, :], b / l
        else:  # subtract the update the merge added
            W, b = W - (merged[module + ".weight"] - p[module + ".weight"]), b - (b - p[module + ".bias"])
        merged[module + ".weight"], merged[module + ".bias"] = W, b
    if "transformer.wte.weight" in merged:  # the token table: subtract the update the merge added
        W = merged["transformer.wte.weight"]
        merged["transformer.wte.weight"] = W - (W - p["transformer.wte.weight"])
    return {n: np.asarray(merged.get(n, p[n])) for n in base_names(case["model_config"])}


# ================================================================ greedy generation (VECTORS.md: Generation)
def generate_case(g: dict[str, Any], use_cache: bool) -> dict[str, Any]:
    """max_new_tokens greedy tokens after input_ids, and the last position's logits at each step: with the cache, a
    step reads the newest token and the keys and values so far; without, the whole sequence again."""
    sites, p = attached(g)
    config, tokens, steps, cache = g["model_config"], jnp.asarray(g["input_ids"]), [], None
    # one compile per shape (a step's tokens, the cache's length) costs less than running each op eagerly
    forward = jax.jit(lambda p, ids, cache: gpt_forward(config, sites, p, ids, None, cache))
    for _ in range(g["max_new_tokens"]):
        if use_cache:
            logits, cache = forward(p, tokens if cache is None else tokens[:, -1:], cache)
        else:
            logits, _ = forward(p, tokens, None)
        steps.append(logits[:, -1])
        tokens = jnp.concatenate([tokens, logits[:, -1].argmax(-1, keepdims=True).astype(tokens.dtype)], 1)
    return {"tokens": np.asarray(tokens), "logits": np.asarray(jnp.stack(steps))}


# ================================================================ adapter files (VECTORS.md: Adapter round trips)
def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors format: 8 bytes little-endian, the length of a JSON header naming each tensor's dtype, shape
    and byte range; then the tensors' bytes, little-endian, C order. Written to a temporary name, then renamed."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name])
        data = value.astype(value.dtype.newbyteorder("<")).tobytes()
        dtype = {"float64": "F64", "float32": "F32"}[value.dtype.name]
        header[name] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path + ".tmp", "wb") as f:
        f.write(np.array([len(text)], dtype="<u8").tobytes() + text + b"".join(blobs))
    os.replace(path + ".tmp", path)


def adapter_file(case: dict[str, Any], sites: Sites, p: Params) -> dict[str, Array]:
    """The tensors PEFT's adapter_model.safetensors holds, under its names (each method page's "Names in the
    golden vectors"): the method's own tensors, with these differences from the vectors' names."""
    cfg, base = case["method_config"], set(base_names(case["model_config"]))
    out = {n: p[n] for n in case["weights"] if n not in base}
    kind = cfg["peft_type"]
    if kind == "LORA":  # lora.md: a trained bias of a targeted layer is the base layer's; others keep their names
        for name in case["trainable"]:
            if name in base:
                module = name.removesuffix(".bias")
                out[f"{PEFT}{module}.base_layer.bias" if module in sites.linear else PEFT + name] = p[name]
    elif kind == "IA3":  # ia3.md: (out, 1), or (1, in) for a feed-forward target
        for module in sites.linear:
            name = f"{PEFT}{module}.ia3_l"
            feedforward = ia3_feedforward(module, cfg["feedforward_modules"])
            out[name] = out[name].reshape(1, -1) if feedforward else out[name].reshape(-1, 1)
    elif kind == "PREFIX_TUNING" and cfg["prefix_projection"]:  # prefix_tuning.md: the table the projection computes
        kv = jnp.stack([t for pair in sites.prefix(p) for t in pair])  # [2 L, NH, NV, hs]
        out = {"prompt_embeddings": kv.transpose(2, 0, 1, 3).reshape(kv.shape[2], -1)}
    elif kind == "P_TUNING":  # ptuning.md: only the encoder's output
        out = {"prompt_embeddings": sites.prompt(p)}
    elif kind == "VERA":  # vera.md: the shared projections, saved though never trained
        out["base_model.vera_A"], out["base_model.vera_B"] = p["base_model.vera_A"], p["base_model.vera_B"]
    return out


def save_adapter(case: dict[str, Any], folder: str) -> None:
    """adapter_model.safetensors and adapter_config.json, as PEFT writes them, in the case's dtype."""
    sites, p = attached(case)
    tensors = {n: np.asarray(t) for n, t in adapter_file(case, sites, p).items()}
    write_safetensors(os.path.join(folder, "adapter_model.safetensors"), tensors)
    config = os.path.join(folder, "adapter_config.json")
    with open(config + ".tmp", "w") as f:
        json.dump({**case["method_config"], "base_model_name_or_path": None}, f, indent=2)
    os.replace(config + ".tmp", config)
