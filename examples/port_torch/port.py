"""tinypeft ported to PyTorch from its docs alone, checked against the golden vectors.

Every formula here comes from a page of docs/ (named beside it); PyTorch's autograd does the backward,
so the port checks the forward math of the docs directly, and the backward the docs derive through
the gradients the vectors hold. It imports neither tinypeft, nor transformers, nor peft.

    tinypeft export-vectors vectors/
    tinypeft check-vectors vectors/ --impl examples/port_torch/port.py

`run_case(case)` is the interface VECTORS.md defines: a case (configs, weights, inputs, the trainable
tensor names) in, {"logits", "loss", "grads", "derived"} out, as NumPy arrays. `run_trajectory(t)` opts into
the training trajectories: ten AdamW or SGD steps from a case, {"losses", "params"} out. `merge_case` and
`unmerge_case` opt into the merges, `generate_case` into greedy generation with and without the KV cache,
`save_adapter` into the adapter round trips (VECTORS.md describes each).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor
PEFT = "base_model.model."  # the prefix of every adapter tensor that lives under a module (lora.md, ia3.md, ...)
LINEAR_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # model.md §0, in block order


# ================================================================ the base model (docs/model.md)
def layernorm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """model.md §3: y = w * (x - mean) / sqrt(var + eps) + b, biased variance over the last axis."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu_tanh(x: Tensor) -> Tensor:
    """model.md §4: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def attention(
    qkv: Tensor, n_head: int, visible: Tensor, past: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """model.md §5: q, k, v split from c_attn's output in that order, past keys/values in front, scores
    scaled by 1/sqrt(head size), hidden scores *replaced* by the dtype's most negative finite value. Also the
    keys and values, past included: what a KV cache holds after these positions."""
    B, T, C3 = qkv.shape
    C = C3 // 3

    def heads(t: Tensor) -> Tensor:  # [B, T, C] -> [B, NH, T, hs]
        return t.reshape(B, T, n_head, C // n_head).transpose(1, 2)

    q, k, v = heads(qkv[..., :C]), heads(qkv[..., C : 2 * C]), heads(qkv[..., 2 * C :])
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)  # [B, NH, P + T, hs]
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // n_head)  # [B, NH, T, P + T]
    scores = torch.where(visible, scores, torch.finfo(scores.dtype).min)
    y = torch.softmax(scores, -1) @ v  # [B, NH, T, hs]
    return y.transpose(1, 2).reshape(B, T, C), (k, v)


class GPT:
    """GPT-2 over a flat dict of parameters named as in model.md; methods plug in at four sites: `tokens`
    gives the token embeddings of the ids and the tied head's weight, `linear[module]` replaces a linear
    layer, `prompt` is prepended to the token embeddings, and `prefix` gives every layer keys and values in
    front of the tokens' own."""

    def __init__(self, config: dict[str, Any], params: dict[str, Tensor]) -> None:
        self.config, self.params = config, params
        self.tokens: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
        self.linear: dict[str, Callable[[Tensor], Tensor]] = {}
        self.prompt: Callable[[], Tensor] | None = None
        self.prefix: Callable[[int], list[tuple[Tensor, Tensor]]] | None = None
        self.regulariser: Callable[[], Tensor] | None = None  # added to the loss (adalora.md)

    def base_linear(self, module: str, x: Tensor) -> Tensor:
        """model.md §2: y = x W + b, W stored (in, out)."""
        return x @ self.params[module + ".weight"] + self.params[module + ".bias"]

    def layer(self, module: str, x: Tensor) -> Tensor:
        site = self.linear.get(module)
        return site(x) if site is not None else self.base_linear(module, x)

    def ln(self, name: str, x: Tensor) -> Tensor:
        eps = self.config["layer_norm_epsilon"]
        return layernorm(x, self.params[name + ".weight"], self.params[name + ".bias"], eps)

    def __call__(self, ids: Tensor, mask: Tensor | None) -> Tensor:
        return self.forward(ids, mask)[0]

    def forward(
        self, ids: Tensor, mask: Tensor | None, cache: list[tuple[Tensor, Tensor]] | None = None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """logits, and every layer's keys and values so far (the KV cache). With a cache, ids are the tokens after
        the cached positions: virtual tokens and the prefix are in the cache already."""
        p, n_head = self.params, self.config["n_head"]
        B = ids.shape[0]
        wte = p["transformer.wte.weight"]
        x, head = (wte[ids], wte) if self.tokens is None else self.tokens(ids)  # [B, T, C], [V, C]
        if self.prompt is not None and cache is None:  # prompt_tuning.md: the table in front, mask ones in front
            table = self.prompt()
            x = torch.cat([table.expand(B, -1, -1), x], 1)
            mask = None if mask is None else torch.cat([torch.ones(B, table.shape[0], dtype=mask.dtype), mask], 1)
        pasts = self.prefix(B) if self.prefix is not None else None
        if cache is not None:  # a cached step: the keys and values of every position so far, the prefix's included
            pasts = cache
        P = 0 if pasts is None else pasts[0][0].shape[2]
        if P and mask is not None:  # prefix_tuning.md: every token sees every prefix entry
            mask = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], 1)
        T = x.shape[1]
        x = x + p["transformer.wpe.weight"][P : P + T]  # model.md §1: positions P..P+T-1, padding or not
        visible = torch.arange(P + T)[None, :] <= (P + torch.arange(T))[:, None]  # [T, P + T], causal
        visible = visible[None, None] if mask is None else visible[None, None] & (mask[:, None, None, :] != 0)
        keys_values = []
        for i in range(self.config["n_layer"]):
            h = f"transformer.h.{i}"
            past = None if pasts is None else pasts[i]
            a, kv = attention(self.layer(f"{h}.attn.c_attn", self.ln(f"{h}.ln_1", x)), n_head, visible, past)
            keys_values.append(kv)
            x = x + self.layer(f"{h}.attn.c_proj", a)
            m = gelu_tanh(self.layer(f"{h}.mlp.c_fc", self.ln(f"{h}.ln_2", x)))
            x = x + self.layer(f"{h}.mlp.c_proj", m)
        return self.ln("transformer.ln_f", x) @ head.T, keys_values  # tied head: [B, T, V]


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """model.md §7: position t predicts label t+1; -100 is ignored; the mean over the rest. Virtual tokens
    in front of the tokens (prompt tuning) get labels of -100 (prompt_tuning.md)."""
    added = logits.shape[1] - labels.shape[1]
    if added:
        labels = torch.cat([torch.full((labels.shape[0], added), -100, dtype=labels.dtype), labels], 1)
    V = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100
    )


# ================================================================ target matching (lora.md, ia3.md)
def matches(module: str, targets: str | list[str]) -> bool:
    """PEFT's rule: a list entry t matches module m if m == t or m ends with "." + t; a string is a
    regular expression that must match the whole name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def linear_modules(config: dict[str, Any]) -> list[str]:
    return [f"transformer.h.{i}.{m}" for i in range(config["n_layer"]) for m in LINEAR_MODULES]


# ================================================================ LoRA, rsLoRA, DoRA, PiSSA (docs/lora.md)
def pissa_residual(W: Tensor, r: int, s: float) -> Tensor:
    """lora.md, PiSSA: with W^T = U S V^T (SVD in float64), A = diag(sqrt(S_r/s)) V_r^T, B = U_r diag(sqrt(S_r/s))
    at init, and the frozen residual W - s (B A)^T, computed once from the base weight."""
    U, S, Vh = torch.linalg.svd(W.detach().double().T, full_matrices=False)
    root = torch.sqrt(S[:r] / s)
    A, B = root[:, None] * Vh[:r], U[:, :r] * root[None, :]
    return (W.detach().double() - s * (B @ A).T).to(W.dtype)


def lora_scaling(cfg: dict[str, Any]) -> float:
    """lora.md: s = alpha / r, or alpha / sqrt(r) with rsLoRA (under DoRA and PiSSA too)."""
    return cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])


def add_lora(model: GPT, cfg: dict[str, Any], derived: dict[str, Tensor]) -> None:
    r, s = cfg["r"], lora_scaling(cfg)
    p = model.params
    if matches("transformer.wte", cfg["target_modules"]):  # lora.md, on wte: the lookup only; the head reads W
        W, A, B = (
            p["transformer.wte.weight"],
            p[f"{PEFT}transformer.wte.lora_embedding_A"],
            p[f"{PEFT}transformer.wte.lora_embedding_B"],
        )
        model.tokens = lambda ids, W=W, A=A, B=B: (W[ids] + s * A.T[ids] @ B.T, W)  # A (r, V), B (C, r)
    indices = cfg.get("trainable_token_indices")
    if indices is not None:  # trainable_tokens.md, inside LoRA: a list, or {"wte": ids}
        ids = next(iter(indices.values())) if isinstance(indices, dict) else indices
        add_trainable_tokens(model, ids, f"{PEFT}transformer.wte.token_adapter.trainable_tokens_delta")
    for module in (m for m in linear_modules(model.config) if matches(m, cfg["target_modules"])):
        W = p[module + ".weight"]
        if cfg["init_lora_weights"] == "pissa":
            W = pissa_residual(W, r, s)  # PiSSA computes with W_res in place of W, DoRA's norm included
            derived[module + ".pissa_residual"] = W
        A, B = p[f"{PEFT}{module}.lora_A.weight"], p[f"{PEFT}{module}.lora_B.weight"]  # (r, in), (out, r)
        b = p[module + ".bias"]
        if cfg["use_dora"]:
            m = p[f"{PEFT}{module}.lora_magnitude_vector"]  # (out,)

            def dora(x: Tensor, W=W, A=A, B=B, b=b, m=m) -> Tensor:
                norm = (W + s * (B @ A).T).norm(dim=0).detach()  # per output column; a constant in the backward
                return (m / norm) * (x @ W + s * (x @ A.T) @ B.T) + b

            model.linear[module] = dora
        else:
            model.linear[module] = lambda x, W=W, A=A, B=B, b=b: x @ W + b + s * (x @ A.T) @ B.T


# ================================================================ trainable tokens (docs/trainable_tokens.md)
def add_trainable_tokens(model: GPT, indices: list[int], delta: str) -> None:
    """W' = W.index_copy(idx, Δ): row idx_j of the table is Δ_j; the lookup and the tied head both read W'."""

    def tokens(ids: Tensor) -> tuple[Tensor, Tensor]:
        table = model.params["transformer.wte.weight"].index_copy(0, torch.tensor(indices), model.params[delta])
        return table[ids], table

    model.tokens = tokens


# ================================================================ prompt tuning (docs/prompt_tuning.md)
def add_prompt(model: GPT, cfg: dict[str, Any], derived: dict[str, Tensor]) -> None:
    model.prompt = lambda: model.params["prompt_embeddings"]  # (NV, C)
    if cfg["prompt_tuning_init"] == "TEXT":  # the text's UTF-8 bytes as ids, tiled, cut to NV rows of wte
        ids = list(cfg["prompt_tuning_init_text"].encode("utf-8"))
        nv = cfg["num_virtual_tokens"]
        ids = (ids * math.ceil(nv / len(ids)))[:nv]
        derived["prompt_embeddings"] = model.params["transformer.wte.weight"][ids].detach()


# ================================================================ P-tuning (docs/ptuning.md)
def lstm_direction(x: Tensor, p: dict[str, Tensor], head: str, suffix: str) -> Tensor:
    """One direction of one LSTM layer over the rows of x (T, in), from h = c = 0; gates i, f, g, o."""
    W_ih, W_hh = p[f"{head}.weight_ih{suffix}"], p[f"{head}.weight_hh{suffix}"]
    b = p[f"{head}.bias_ih{suffix}"] + p[f"{head}.bias_hh{suffix}"]
    H = W_hh.shape[1]
    h = c = x.new_zeros(H)
    steps = range(x.shape[0] - 1, -1, -1) if suffix.endswith("_reverse") else range(x.shape[0])
    out = {}
    for t in steps:
        z = W_ih @ x[t] + W_hh @ h + b
        i, f, g, o = (
            torch.sigmoid(z[:H]),
            torch.sigmoid(z[H : 2 * H]),
            torch.tanh(z[2 * H : 3 * H]),
            torch.sigmoid(z[3 * H :]),
        )
        c = f * c + i * g
        h = out[t] = o * torch.tanh(c)
    return torch.stack([out[t] for t in range(x.shape[0])])


def add_ptuning(model: GPT, cfg: dict[str, Any]) -> None:
    p, enc = model.params, "prompt_encoder"
    if "prompt_embeddings" in p:  # a table alone: prompt tuning's
        model.prompt = lambda: p["prompt_embeddings"]
        return

    def linear(x: Tensor, i: int) -> Tensor:
        return x @ p[f"{enc}.mlp_head.{i}.weight"].T + p[f"{enc}.mlp_head.{i}.bias"]

    def table() -> Tensor:  # (NV, C): the encoder over the rows of E, one sequence
        x = p[f"{enc}.embedding.weight"]
        if cfg["encoder_reparameterization_type"] == "MLP":
            return linear(torch.relu(linear(torch.relu(linear(x, 0)), 2)), 4)
        for layer in range(cfg["encoder_num_layers"]):  # bidirectional: [forward h, reverse h] per row
            x = torch.cat([lstm_direction(x, p, f"{enc}.lstm_head", f"_l{layer}{rev}") for rev in ("", "_reverse")], 1)
        return linear(torch.relu(linear(x, 0)), 2)

    model.prompt = table


# ================================================================ prefix tuning (docs/prefix_tuning.md)
def add_prefix(model: GPT, cfg: dict[str, Any]) -> None:
    p, L, NH = model.params, model.config["n_layer"], model.config["n_head"]

    def table() -> Tensor:  # (NV, 2 L C)
        if not cfg["prefix_projection"]:
            return p["prompt_embeddings"]
        E = p["prompt_encoder.embedding.weight"]
        hidden = torch.tanh(E @ p["prompt_encoder.transform.0.weight"].T + p["prompt_encoder.transform.0.bias"])
        return hidden @ p["prompt_encoder.transform.2.weight"].T + p["prompt_encoder.transform.2.bias"]

    def prefix(batch_size: int) -> list[tuple[Tensor, Tensor]]:
        theta = table()
        NV = theta.shape[0]
        kv = theta.reshape(NV, 2 * L, NH, -1).permute(1, 2, 0, 3)  # [layer][key/value][head][head_dim]
        shape = (batch_size, NH, NV, kv.shape[-1])
        return [(kv[2 * i].expand(shape), kv[2 * i + 1].expand(shape)) for i in range(L)]  # the same for every row

    model.prefix = prefix


# ================================================================ IA3 (docs/ia3.md)
def ia3_feedforward(module: str, ff: str | list[str]) -> bool:
    """ia3.md: feedforward_modules is a plain endswith per entry (no "." boundary), or a full-match regex string."""
    return re.fullmatch(ff, module) is not None if isinstance(ff, str) else module.endswith(tuple(ff))


def add_ia3(model: GPT, cfg: dict[str, Any]) -> None:
    p, ff = model.params, cfg["feedforward_modules"]
    for module in (m for m in linear_modules(model.config) if matches(m, cfg["target_modules"])):
        feedforward = ia3_feedforward(module, ff)
        W, b, l = p[module + ".weight"], p[module + ".bias"], p[f"{PEFT}{module}.ia3_l"]
        if feedforward:
            model.linear[module] = lambda x, W=W, b=b, l=l: (x * l) @ W + b
        else:
            model.linear[module] = lambda x, W=W, b=b, l=l: (x @ W + b) * l


# ================================================================ bottleneck adapters (docs/adapters.md)
ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "silu": torch.nn.functional.silu, "gelu_tanh": gelu_tanh}
PLACEMENTS = {"both": ("attn.c_proj", "mlp.c_proj"), "attn": ("attn.c_proj",), "mlp": ("mlp.c_proj",)}


def add_bottleneck(model: GPT, cfg: dict[str, Any]) -> None:
    p, act = model.params, ACTIVATIONS[cfg["non_linearity"]]
    for i in range(model.config["n_layer"]):
        for place in PLACEMENTS[cfg["placement"]]:
            module = f"transformer.h.{i}.{place}"
            down, up = (f"{PEFT}{module}.adapter_{d}" for d in ("down", "up"))

            def adapted(x: Tensor, module=module, down=down, up=up) -> Tensor:
                h = model.base_linear(module, x)
                g = act(h @ p[down + ".weight"].T + p[down + ".bias"])
                return h + g @ p[up + ".weight"].T + p[up + ".bias"]

            model.linear[module] = adapted


# ================================================================ VeRA (docs/vera.md)
def add_vera(model: GPT, cfg: dict[str, Any], derived: dict[str, Tensor]) -> None:
    """vera.md: one frozen pair A (r, max in) then B (max out, r), drawn by one torch.Generator seeded with
    projection_prng_key, each uniform in +-sqrt(3) sqrt(2) / sqrt(fan_in), fan_in its second size, in float32;
    each layer reads the top-left block it needs, and y = x W + b + l_b * ((l_d * (x A^T)) B^T)."""
    p, r, dtype = model.params, cfg["r"], model.params["transformer.wte.weight"].dtype
    modules = [m for m in linear_modules(model.config) if matches(m, cfg["target_modules"])]
    n_in = max(p[m + ".weight"].shape[0] for m in modules)
    n_out = max(p[m + ".weight"].shape[1] for m in modules)
    generator = torch.Generator().manual_seed(cfg["projection_prng_key"])
    bound = [math.sqrt(3.0) * (math.sqrt(2.0) / math.sqrt(shape[1])) for shape in ((r, n_in), (n_out, r))]
    A = torch.empty(r, n_in).uniform_(-bound[0], bound[0], generator=generator).to(dtype)  # A first, then B
    B = torch.empty(n_out, r).uniform_(-bound[1], bound[1], generator=generator).to(dtype)
    derived["base_model.vera_A"], derived["base_model.vera_B"] = A, B
    for module in modules:
        W, b = p[module + ".weight"], p[module + ".bias"]
        l_d, l_b = p[f"{PEFT}{module}.vera_lambda_d"], p[f"{PEFT}{module}.vera_lambda_b"]
        A_s, B_s = A[:, : W.shape[0]], B[: W.shape[1]]  # (r, in), (out, r)
        model.linear[module] = lambda x, W=W, b=b, A=A_s, B=B_s, l_d=l_d, l_b=l_b: (
            x @ W + b + l_b * ((l_d * (x @ A.T)) @ B.T)
        )


# ================================================================ AdaLoRA (docs/adalora.md)
def add_adalora(model: GPT, cfg: dict[str, Any]) -> None:
    """adalora.md: y = x W + b + c (x (A * E)^T) B^T, c = lora_alpha / (init_r + 1e-5) whatever the layer's rank;
    the loss adds w / (2L) * sum over layers of ||A A^T - I||_F + ||B^T B - I||_F."""
    p, c = model.params, cfg["lora_alpha"] / (cfg["init_r"] + 1e-5)
    pairs = []
    for module in (m for m in linear_modules(model.config) if matches(m, cfg["target_modules"])):
        W, b = p[module + ".weight"], p[module + ".bias"]
        A, E, B = (p[f"{PEFT}{module}.lora_{t}"] for t in "AEB")  # (r, in), (r, 1), (out, r)
        model.linear[module] = lambda x, W=W, b=b, A=A, E=E, B=B: x @ W + b + c * (x @ (A * E).T) @ B.T
        pairs.append((A, B))
    w = cfg["orth_reg_weight"]

    def regulariser() -> Tensor:
        norms = [
            torch.linalg.matrix_norm(M - torch.eye(M.shape[0], dtype=M.dtype))
            for A, B in pairs
            for M in (A @ A.T, B.T @ B)
        ]
        return w * sum(norms) / len(norms)

    model.regulariser = regulariser


# ================================================================ LoHa (docs/loha.md)
def add_loha(model: GPT, cfg: dict[str, Any]) -> None:
    p, s = model.params, cfg["alpha"] / cfg["r"]
    for module in (m for m in linear_modules(model.config) if matches(m, cfg["target_modules"])):
        w1a, w1b, w2a, w2b = (p[f"{PEFT}{module}.hada_{w}"] for w in ("w1_a", "w1_b", "w2_a", "w2_b"))
        W, b = p[module + ".weight"], p[module + ".bias"]

        def loha(x: Tensor, W=W, b=b, w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b) -> Tensor:
            delta = s * (w1a @ w1b) * (w2a @ w2b)  # (out, in): PEFT's nn.Linear layout, so it enters transposed
            return x @ W + b + x @ delta.T

        model.linear[module] = loha


# ================================================================ LoKr (docs/lokr.md)
def split(dimension: int, factor: int) -> tuple[int, int]:
    """lokr.md, factorization: (f, dim / f) if f > 0 divides dim; else (m, dim / m) with m the largest divisor of
    dim with m <= sqrt(dim), and m <= f when f > 0."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = math.isqrt(dimension) if factor == -1 else min(math.isqrt(dimension), factor)
    m = max(k for k in range(1, limit + 1) if dimension % k == 0)
    return m, dimension // m


def add_lokr(model: GPT, cfg: dict[str, Any]) -> None:
    p, r, scale = model.params, cfg["r"], cfg["alpha"] / cfg["r"]
    for module in (m for m in linear_modules(model.config) if matches(m, cfg["target_modules"])):
        W, b = p[module + ".weight"], p[module + ".bias"]
        c, d = split(W.shape[0], cfg["decompose_factor"])  # in = c d
        a, bb = split(W.shape[1], cfg["decompose_factor"])  # out = a bb
        name = f"{PEFT}{module}.lokr_"
        low_rank_w1 = cfg["decompose_both"] and r < max(a, c) / 2
        low_rank_w2 = r < max(bb, d) / 2

        def lokr(x: Tensor, W=W, b=b, name=name, low_rank_w1=low_rank_w1, low_rank_w2=low_rank_w2) -> Tensor:
            w1 = p[name + "w1_a"] @ p[name + "w1_b"] if low_rank_w1 else p[name + "w1"]  # (a, c)
            w2 = p[name + "w2_a"] @ p[name + "w2_b"] if low_rank_w2 else p[name + "w2"]  # (bb, d)
            delta = scale * torch.kron(w1, w2)  # (a bb, c d) = (out, in), PEFT's nn.Linear layout
            return x @ W + x @ delta.T + b

        model.linear[module] = lokr


# ================================================================ OFT and BOFT (docs/oft.md)
def cayley(S: Tensor) -> Tensor:
    """oft.md, Cayley: R = (I - S)(I + S)^-1 per block, PEFT's solve X (I + S) = I - S."""
    eye = torch.eye(S.shape[-1], dtype=S.dtype)
    return torch.linalg.solve(eye + S, eye - S, left=False)


def neumann(S: Tensor, terms: int) -> Tensor:
    """oft.md, Neumann: I + 2S for 2 terms; I + 2S + ... + 2S^(m-1) + S^m with m = max(terms - 1, 3) beyond."""
    m = max(terms - 1, 3)
    coefficients = [1, 2] if terms == 2 else [1] + [2] * (m - 1) + [1]
    R, power = torch.zeros_like(S), torch.eye(S.shape[-1], dtype=S.dtype).expand_as(S)
    for c in coefficients:
        R, power = R + c * power, power @ S
    return R


def coft(q: Tensor, eps: float) -> Tensor:
    """oft.md, COFT: each block's S (Frobenius norm sqrt(2) |q|) pulled onto the ball of radius eps / sqrt(k) (float32
    arithmetic, k the blocks stored) if outside it; the gradient passes straight through."""
    radius = float(np.float32(eps) * (np.float32(1) / np.sqrt(np.float32(q.shape[0]))))
    norm = math.sqrt(2) * q.detach().norm(dim=1, keepdim=True)
    projected = torch.where(norm <= radius, q.detach(), q.detach() * radius / norm)
    return q + (projected - q.detach())


def rotate_blocks(x: Tensor, R: Tensor) -> Tensor:
    """oft.md: x' = x diag(R_1..R_r), each group of b input features a row vector times its block."""
    r, b = x.shape[-1] // R.shape[-1], R.shape[-1]
    return torch.einsum("...rk,rkc->...rc", x.reshape(*x.shape[:-1], r, b), R.expand(r, b, b)).reshape(x.shape)


def add_oft(model: GPT, cfg: dict[str, Any]) -> None:
    p = model.params
    for module in (m for m in linear_modules(model.config) if matches(m, cfg["target_modules"])):
        W, b, q = p[module + ".weight"], p[module + ".bias"], p[f"{PEFT}{module}.oft_R.weight"]
        n_in = W.shape[0]
        block = cfg["oft_block_size"] or n_in // cfg["r"]  # r x oft_block_size = in_features
        if cfg["coft"]:
            q = coft(q, cfg["eps"])
        rows, cols = torch.triu_indices(block, block, 1)
        S = torch.zeros(q.shape[0], block, block, dtype=q.dtype)
        S[:, rows, cols] = q
        S = S - S.transpose(1, 2)  # skew-symmetric from the strict upper triangle, row by row
        R = neumann(S, cfg["num_cayley_neumann_terms"]) if cfg["use_cayley_neumann"] else cayley(S)
        model.linear[module] = lambda x, W=W, b=b, R=R: rotate_blocks(x, R) @ W + b


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


def add_boft(model: GPT, cfg: dict[str, Any]) -> None:
    p = model.params
    for module in (m for m in linear_modules(model.config) if matches(m, cfg["target_modules"])):
        W, b = p[module + ".weight"], p[module + ".bias"]
        X, s = p[f"{PEFT}{module}.boft_R"], p[f"{PEFT}{module}.boft_s"]  # (F, D, H, H), (out, 1)
        F, D, H, _ = X.shape
        R = cayley(0.5 * (X - X.transpose(-1, -2)))  # the skew part of each block, then Cayley
        M = torch.eye(W.shape[0], dtype=W.dtype)
        for f in range(F):  # M = M_{F-1} ... M_0, M_f = P_f diag(R_f) P_f^T with P_f[i, perm_f[i]] = 1
            P = torch.eye(W.shape[0], dtype=W.dtype)[butterfly_perm(W.shape[0], D // 2**f, H // 2, F)]
            M = P @ torch.block_diag(*R[f]) @ P.T @ M
        model.linear[module] = lambda x, W=W, b=b, M=M, s=s: (x @ M @ W) * s[:, 0] + b


# ================================================================ the interface (VECTORS.md)
def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """logits, loss, the gradient of every trainable tensor, and the tensors the init derives."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the cases are tiny: waking a thread pool for each op costs more than the op
    try:
        return compute(case)
    finally:
        torch.set_num_threads(threads)


def attach(model: GPT, cfg: dict[str, Any], derived: dict[str, Tensor]) -> None:
    """Put the method of `cfg` on the model. None (full fine-tuning), BITFIT, LN_TUNING: the base model, with
    the trainable tensors the case names. The sites read their tensors when called: updating them in place
    (a training step) updates the model."""
    kind = cfg.get("peft_type")
    if kind == "LORA":
        add_lora(model, cfg, derived)
    elif kind == "PROMPT_TUNING":
        add_prompt(model, cfg, derived)
    elif kind == "PREFIX_TUNING":
        add_prefix(model, cfg)
    elif kind == "P_TUNING":
        add_ptuning(model, cfg)
    elif kind == "IA3":
        add_ia3(model, cfg)
    elif kind == "BOTTLENECK_ADAPTER":
        add_bottleneck(model, cfg)
    elif kind == "VERA":
        add_vera(model, cfg, derived)
    elif kind == "ADALORA":
        add_adalora(model, cfg)
    elif kind == "LOHA":
        add_loha(model, cfg)
    elif kind == "LOKR":
        add_lokr(model, cfg)
    elif kind == "OFT":
        add_oft(model, cfg)
    elif kind == "BOFT":
        add_boft(model, cfg)
    elif kind == "TRAINABLE_TOKENS":
        add_trainable_tokens(model, cfg["token_indices"], f"{PEFT}transformer.wte.trainable_tokens_delta")


def compute(case: dict[str, Any]) -> dict[str, Any]:
    dtype = {"float64": torch.float64, "float32": torch.float32}[case["dtype"]]
    params = {name: torch.tensor(w, dtype=dtype) for name, w in case["weights"].items()}
    for name in case["trainable"]:
        params[name].requires_grad_(True)
    model, derived = GPT(case["model_config"], params), {}
    attach(model, case["method_config"] or {}, derived)
    ids = torch.from_numpy(case["input_ids"])
    mask = None if case["attention_mask"] is None else torch.from_numpy(case["attention_mask"])
    logits = model(ids, mask)
    loss = causal_lm_loss(logits, torch.from_numpy(case["labels"]))
    if model.regulariser is not None:
        loss = loss + model.regulariser()
    grads = torch.autograd.grad(loss, [params[n] for n in case["trainable"]])

    def host(t: Tensor) -> np.ndarray:
        return t.detach().numpy()

    return {
        "logits": host(logits),
        "loss": float(loss.detach()),
        "grads": {n: host(g) for n, g in zip(case["trainable"], grads, strict=True)},
        "derived": {n: host(t) for n, t in derived.items()},
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
    """`steps` optimizer steps on the case's batch: the loss before each, the trainable tensors after the last."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return trajectory(t)
    finally:
        torch.set_num_threads(threads)


def trajectory(t: dict[str, Any]) -> dict[str, Any]:
    dtype = {"float64": torch.float64, "float32": torch.float32}[t["dtype"]]
    params = {name: torch.tensor(w, dtype=dtype) for name, w in t["weights"].items()}
    trained = {name: params[name].requires_grad_(True) for name in t["trainable"]}
    opt, state, losses = t["optimizer"], {name: {} for name in trained}, []
    model = GPT(t["model_config"], params)
    attach(model, t["method_config"] or {}, {})  # PiSSA's residual: computed once, here, from the start
    ids, labels = torch.from_numpy(t["input_ids"]), torch.from_numpy(t["labels"])
    mask = None if t["attention_mask"] is None else torch.from_numpy(t["attention_mask"])
    for step in range(t["steps"]):
        loss = causal_lm_loss(model(ids, mask), labels)
        if model.regulariser is not None:
            loss = loss + model.regulariser()
        grads = dict(zip(trained, torch.autograd.grad(loss, list(trained.values())), strict=True))
        losses.append(float(loss.detach()))
        if t["grad_clip"]:  # one norm over every trainable tensor together
            norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
            if norm > t["grad_clip"]:
                grads = {n: g * (t["grad_clip"] / (norm + 1e-6)) for n, g in grads.items()}
        lr = learning_rate(step, t)
        with torch.no_grad():
            for name, p in trained.items():
                update(p, grads[name], state[name], opt, lr, step + 1)
    return {"losses": losses, "params": {n: p.detach().numpy() for n, p in trained.items()}}


def update(p: Tensor, g: Tensor, s: dict[str, Tensor], opt: dict[str, Any], lr: float, t: int) -> None:
    """One step of AdamW or SGD on p, in place; weight decay only on matrices (ndim >= 2)."""
    decays = opt["weight_decay"] > 0 and p.ndim >= 2
    if opt["name"] == "AdamW":
        b1, b2 = opt["betas"]
        if decays:
            p.mul_(1 - lr * opt["weight_decay"])
        m = s["m"] = b1 * s.get("m", torch.zeros_like(p)) + (1 - b1) * g
        v = s["v"] = b2 * s.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
        p.sub_((lr / (1 - b1**t)) * m / (v.sqrt() / math.sqrt(1 - b2**t) + opt["eps"]))
    else:
        if decays:
            g = g + opt["weight_decay"] * p
        if opt["momentum"]:
            g = s["b"] = g.clone() if "b" not in s else opt["momentum"] * s["b"] + g
        p.sub_(lr * g)


# ================================================================ merge and unmerge (lora.md, ia3.md: Merge)
def one_thread(entry_point: Callable[..., Any]) -> Callable[..., Any]:
    """The entry point on one thread, as run_case: the cases are tiny, and waking a thread pool costs more."""

    def run(*args: Any) -> Any:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return entry_point(*args)
        finally:
            torch.set_num_threads(threads)

    return run


def build(case: dict[str, Any]) -> tuple[GPT, dict[str, Tensor]]:
    """The case's model with its method attached, in the case's dtype, nothing requiring a gradient."""
    dtype = {"float64": torch.float64, "float32": torch.float32}[case["dtype"]]
    params = {name: torch.tensor(w, dtype=dtype) for name, w in case["weights"].items()}
    model, derived = GPT(case["model_config"], params), {}
    attach(model, case["method_config"] or {}, derived)
    return model, derived


def base_names(config: dict[str, Any]) -> list[str]:
    """model.md §0: the base model's parameters."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(config["n_layer"]):
        h = f"transformer.h.{i}"
        names += [f"{h}.{ln}.{w}" for ln in ("ln_1", "ln_2") for w in ("weight", "bias")]
        names += [f"{h}.{m}.{w}" for m in LINEAR_MODULES for w in ("weight", "bias")]
    return [*names, "transformer.ln_f.weight", "transformer.ln_f.bias"]


def read_off(site: Callable[[Tensor], Tensor], n_in: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Any adapted linear layer is affine in x, y = x W' + b': b' = site(0), and W' = site(I) - b' row by row."""
    b = site(torch.zeros(1, n_in, dtype=dtype))[0]
    return site(torch.eye(n_in, dtype=dtype)) - b, b


def lora_update(model: GPT, cfg: dict[str, Any], module: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """lora.md: the weight the sites compute with (PiSSA's residual or W), s (BA)^T in (in, out), DoRA's k."""
    p, r, s = model.params, cfg["r"], lora_scaling(cfg)
    W = p[module + ".weight"]
    if cfg["init_lora_weights"] == "pissa":
        W = pissa_residual(p[module + ".weight"], r, s)  # the merge adds to the residual the sites compute with
    delta = s * (p[f"{PEFT}{module}.lora_B.weight"] @ p[f"{PEFT}{module}.lora_A.weight"]).T
    if not cfg["use_dora"]:
        return W, delta, None
    return W, delta, p[f"{PEFT}{module}.lora_magnitude_vector"] / (W + delta).norm(dim=0)


def merge_weights(model: GPT, cfg: dict[str, Any]) -> dict[str, Tensor]:
    """Each adapted layer's (W', b'): LoRA's and IA3's by their formulas, every other method's read off its site."""
    p, kind, out = model.params, cfg.get("peft_type"), {}
    for module, site in model.linear.items():
        W, b = p[module + ".weight"], p[module + ".bias"]
        if kind == "LORA":  # W' = W + s (BA)^T; DoRA: each output column times k = m / ||W + s (BA)^T||
            W_used, delta, k = lora_update(model, cfg, module)
            W = W_used + delta if k is None else (W_used + delta) * k
        elif kind == "IA3":
            l, ff = p[f"{PEFT}{module}.ia3_l"], cfg["feedforward_modules"]
            if ia3_feedforward(module, ff):
                W = W * l[:, None]  # diag(l) W: the rows
            else:
                W, b = W * l[None, :], b * l  # W diag(l): the columns, and the bias
        else:
            W, b = read_off(site, W.shape[0], W.dtype)
        out[module + ".weight"], out[module + ".bias"] = W, b
    if model.tokens is not None:  # the table the lookup reads, every id's row (LoRA on wte, trainable tokens)
        out["transformer.wte.weight"] = model.tokens(torch.arange(p["transformer.wte.weight"].shape[0]))[0]
    return out


@one_thread
def merge_case(case: dict[str, Any]) -> dict[str, Any]:
    """Every base parameter after folding the adapter into the base weights."""
    with torch.no_grad():
        model, _ = build(case)
        merged = merge_weights(model, case["method_config"])
        return {n: merged.get(n, model.params[n]).numpy() for n in base_names(case["model_config"])}


@one_thread
def unmerge_case(case: dict[str, Any]) -> dict[str, Any]:
    """Every base parameter after merging, then taking the adapter back out of the merged weights as PEFT does:
    subtracting the update, dividing by DoRA's k or IA3's l (exactly: not l + 1e-8)."""
    with torch.no_grad():
        model, _ = build(case)
        cfg, p = case["method_config"], model.params
        merged = merge_weights(model, cfg)
        for module in model.linear:
            W, b = merged[module + ".weight"], merged[module + ".bias"]
            if cfg["peft_type"] == "LORA":
                W_used, delta, k = lora_update(model, cfg, module)
                W = (W if k is None else W / k) - delta
                W = W + (p[module + ".weight"] - W_used)  # PiSSA: back from the residual to the base it came from
            elif cfg["peft_type"] == "IA3":
                l, ff = p[f"{PEFT}{module}.ia3_l"], cfg["feedforward_modules"]
                if ia3_feedforward(module, ff):
                    W = W / l[:, None]
                else:
                    W, b = W / l[None, :], b / l
            else:  # subtract the update the merge added
                W, b = W - (merged[module + ".weight"] - p[module + ".weight"]), b - (b - p[module + ".bias"])
            merged[module + ".weight"], merged[module + ".bias"] = W, b
        if "transformer.wte.weight" in merged:  # the token table: subtract the update the merge added
            W = merged["transformer.wte.weight"]
            merged["transformer.wte.weight"] = W - (W - p["transformer.wte.weight"])
        return {n: merged.get(n, model.params[n]).numpy() for n in base_names(case["model_config"])}


# ================================================================ greedy generation (VECTORS.md: Generation)
@one_thread
def generate_case(g: dict[str, Any], use_cache: bool) -> dict[str, Any]:
    """max_new_tokens greedy tokens after input_ids, and the last position's logits at each step: with the cache, a
    step reads the newest token and the keys and values so far; without, the whole sequence again."""
    with torch.no_grad():
        model, _ = build(g)
        tokens, steps, cache = torch.from_numpy(g["input_ids"]), [], None
        for _ in range(g["max_new_tokens"]):
            if use_cache:
                logits, cache = model.forward(tokens if cache is None else tokens[:, -1:], None, cache)
            else:
                logits, _ = model.forward(tokens, None)
            steps.append(logits[:, -1])
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], 1)
        return {"tokens": tokens.numpy(), "logits": torch.stack(steps).numpy()}


# ================================================================ adapter files (VECTORS.md: Adapter round trips)
def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors format: 8 bytes little-endian, the length of a JSON header naming each tensor's dtype, shape
    and byte range; then the tensors' bytes, little-endian, C order."""
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
    with open(path, "wb") as f:
        f.write(np.array([len(text)], dtype="<u8").tobytes() + text + b"".join(blobs))


def adapter_file(case: dict[str, Any], model: GPT, derived: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors PEFT's adapter_model.safetensors holds, under its names (each method page's "Names in the
    golden vectors"): the method's own tensors, with these differences from the vectors' names."""
    cfg, p = case["method_config"], model.params
    base = set(base_names(case["model_config"]))
    out = {n: t for n, t in p.items() if n not in base}
    kind = cfg["peft_type"]
    if kind == "LORA":  # lora.md: a trained bias of a targeted layer is the base layer's; others keep their names
        for name in case["trainable"]:
            if name in base:
                module = name.removesuffix(".bias")
                targeted = module in model.linear
                out[f"{PEFT}{module}.base_layer.bias" if targeted else PEFT + name] = p[name]
    elif kind == "IA3":  # ia3.md: (out, 1), or (1, in) for a feed-forward target
        ff = cfg["feedforward_modules"]
        for module in model.linear:
            name = f"{PEFT}{module}.ia3_l"
            feedforward = ia3_feedforward(module, ff)
            out[name] = out[name].reshape(1, -1) if feedforward else out[name].reshape(-1, 1)
    elif kind == "PREFIX_TUNING" and cfg["prefix_projection"]:  # prefix_tuning.md: the table the projection computes
        out = {"prompt_embeddings": prefix_table(model.prefix)}
    elif kind == "P_TUNING":  # ptuning.md: only the encoder's output
        out = {"prompt_embeddings": model.prompt()}
    elif kind == "VERA":  # vera.md: the shared projections, saved though never trained
        out["base_model.vera_A"], out["base_model.vera_B"] = derived["base_model.vera_A"], derived["base_model.vera_B"]
    return out


def prefix_table(prefix: Callable[[int], list[tuple[Tensor, Tensor]]]) -> Tensor:
    """The (NV, 2 L C) table back from the per-layer keys and values of one row (prefix_tuning.md's layout)."""
    kv = torch.stack([t[0] for pair in prefix(1) for t in pair])  # [2 L, NH, NV, hs]
    return kv.permute(2, 0, 1, 3).reshape(kv.shape[2], -1)


@one_thread
def save_adapter(case: dict[str, Any], folder: str) -> None:
    """adapter_model.safetensors and adapter_config.json, as PEFT writes them, in the case's dtype."""
    with torch.no_grad():
        model, derived = build(case)
        tensors = {n: t.numpy() for n, t in adapter_file(case, model, derived).items()}
    write_safetensors(os.path.join(folder, "adapter_model.safetensors"), tensors)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({**case["method_config"], "base_model_name_or_path": None}, f, indent=2)
