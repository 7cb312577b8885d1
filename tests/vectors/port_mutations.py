"""One-line breaks of the PyTorch port (examples/port_torch/port.py), each with the cases it must make fail:
tests/vectors/test_port_torch.py shows that they do, and tests/vectors/vectors_page.py measures by how much,
for VECTORS.md's table."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tinypeft.vectors import Case, GenerationVector, MergeVector, RoundTrip, Trajectory

PORT = Path(__file__).resolve().parents[2] / "examples" / "port_torch" / "port.py"


@dataclass(frozen=True)
class Mutation:
    """A wrong formula: `old` (which must occur exactly once in the port) replaced by `new`, and the cases
    it must make fail."""

    old: str
    new: str
    breaks: Callable[[Case], bool]


def everything(case: Case) -> bool:
    return True


def lora_scaling(case: Case) -> float:
    cfg = case.method_config
    return cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])


def is_lora(case: Case, **fields: object) -> bool:
    cfg = case.method_config or {}
    return cfg.get("peft_type") == "LORA" and all(cfg.get(k) == v for k, v in fields.items())


def trains_token_rows(case: Case) -> bool:
    """Trainable tokens, or LoRA's trainable_token_indices: the rows of wte that train, read by the tied head."""
    cfg = case.method_config or {}
    return cfg.get("peft_type") == "TRAINABLE_TOKENS" or cfg.get("trainable_token_indices") is not None


def loss_reads_a_query_that_sees_nothing(case: Case) -> bool:
    """A left-padded row whose last pad predicts its first token, with no virtual token in front to see."""
    virtual = "num_virtual_tokens" in (case.method_config or {})
    return case.attention_mask is not None and not case.attention_mask[:, 0].all() and not virtual


def vera_sliced(case: Case, which: str) -> bool:
    """A VeRA case with a target narrower than the shared A (which="A": in < max in) or shorter than B ("B")."""
    cfg, model = case.method_config or {}, case.model_config
    if cfg.get("peft_type") != "VERA":
        return False
    C, inner = model["n_embd"], model["n_inner"] or 4 * model["n_embd"]
    sizes = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, inner), "mlp.c_proj": (inner, C)}
    targets = cfg["target_modules"]
    hit = [size for module, size in sizes.items() if any(module == t or module.endswith("." + t) for t in targets)]
    axis = 0 if which == "A" else 1
    return len({size[axis] for size in hit}) > 1


def is_peft_type(case: Case, peft_type: str, **fields: object) -> bool:
    cfg = case.method_config or {}
    return cfg.get("peft_type") == peft_type and all(cfg.get(k) == v for k, v in fields.items())


MUTATIONS = {
    "LayerNorm with the unbiased variance": Mutation(
        "((x - mean) ** 2).mean(-1, keepdim=True)", "((x - mean) ** 2).sum(-1, keepdim=True) / (x.shape[-1] - 1)",
        everything),
    "LayerNorm ignores the config's epsilon": Mutation(
        "torch.sqrt(var + eps)", "torch.sqrt(var + 1e-5)", lambda c: c.model_config["layer_norm_epsilon"] != 1e-5),
    "GELU in its erf form": Mutation(
        "0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))",
        "0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))", everything),
    "scores scaled by 1/sqrt(C), not 1/sqrt(head size)": Mutation(
        "/ math.sqrt(C // n_head)", "/ math.sqrt(C)", lambda c: c.model_config["n_head"] > 1),
    "q, k, v split in another order": Mutation(
        "heads(qkv[..., :C]), heads(qkv[..., C : 2 * C])", "heads(qkv[..., C : 2 * C]), heads(qkv[..., :C])",
        everything),
    "causal mask off by one": Mutation(
        "torch.arange(P + T)[None, :] <= (P + torch.arange(T))", "torch.arange(P + T)[None, :] < (P + torch.arange(T))",
        everything),
    "padding mask ignored": Mutation(
        "(mask[:, None, None, :] != 0)", "(mask[:, None, None, :] != 2)", lambda c: c.attention_mask is not None),
    "hidden scores added to, as transformers does, not replaced": Mutation(
        "torch.where(visible, scores, torch.finfo(scores.dtype).min)",
        "scores + torch.where(visible, torch.zeros_like(scores), torch.finfo(scores.dtype).min)",
        loss_reads_a_query_that_sees_nothing),
    "final LayerNorm skipped": Mutation(
        'return self.ln("transformer.ln_f", x) @', "return x @", everything),
    "ignored labels counted in the loss": Mutation(
        "labels[:, 1:].reshape(-1), ignore_index=-100", "labels[:, 1:].reshape(-1).clamp(min=0)", everything),
    "rsLoRA scaled by alpha / r": Mutation(
        'cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])', 'cfg["lora_alpha"] / cfg["r"]',
        lambda c: is_lora(c, use_rslora=True) and c.method_config["r"] > 1),
    # issue 17: DoRA with rsLoRA was tested at r = 1 only, where this port passed every case
    "rsLoRA ignored under DoRA": Mutation(
        'if cfg["use_rslora"] else', 'if cfg["use_rslora"] and not cfg["use_dora"] else',
        lambda c: is_lora(c, use_rslora=True, use_dora=True) and c.method_config["r"] > 1),
    "IA3's feed-forward entries matched with a '.' boundary": Mutation(
        "module.endswith(tuple(ff))", 'any(module == f or module.endswith("." + f) for f in ff)',
        lambda c: c.method == "ia3" and c.method_config["feedforward_modules"] == ["_proj"]),
    "LoRA without its scaling": Mutation(
        "x @ W + b + s * (x @ A.T) @ B.T", "x @ W + b + (x @ A.T) @ B.T",
        lambda c: is_lora(c, use_dora=False) and lora_scaling(c) != 1),
    "DoRA's norm not detached": Mutation(
        ".norm(dim=0).detach()", ".norm(dim=0)", lambda c: is_lora(c, use_dora=True)),
    "DoRA rescales the bias too": Mutation(
        "(m / norm) * (x @ W + s * (x @ A.T) @ B.T) + b", "(m / norm) * (x @ W + s * (x @ A.T) @ B.T + b)",
        lambda c: is_lora(c, use_dora=True)),
    "PiSSA's residual from the trained factors, not the SVD": Mutation(
        "W = pissa_residual(W, r, s)",
        'W = W - s * (p[f"{PEFT}{module}.lora_B.weight"] @ p[f"{PEFT}{module}.lora_A.weight"]).T.detach()',
        lambda c: is_lora(c, init_lora_weights="pissa")),
    "the tied head reads the base table, not the trained token rows": Mutation(
        "return table[ids], table", 'return table[ids], model.params["transformer.wte.weight"]', trains_token_rows),
    "LoRA on wte's update in the head too": Mutation(
        "(W[ids] + s * A.T[ids] @ B.T, W)", "(W[ids] + s * A.T[ids] @ B.T, W + s * (B @ A).T)",
        lambda c: is_lora(c) and "wte" in c.method_config["target_modules"]),
    "virtual tokens appended instead of prepended": Mutation(
        "torch.cat([table.expand(B, -1, -1), x], 1)", "torch.cat([x, table.expand(B, -1, -1)], 1)",
        lambda c: c.method == "prompt_tuning"),
    "prefix table laid out [key/value][layer]": Mutation(
        "(kv[2 * i].expand(shape), kv[2 * i + 1].expand(shape))", "(kv[i].expand(shape), kv[L + i].expand(shape))",
        lambda c: c.method == "prefix_tuning"),
    "prefix: real tokens keep positions from 0": Mutation(
        'p["transformer.wpe.weight"][P : P + T]', 'p["transformer.wpe.weight"][:T]',
        lambda c: c.method == "prefix_tuning"),
    "prefix projection without its tanh": Mutation(
        "hidden = torch.tanh(E @", "hidden = (E @", lambda c: c.method == "prefix_tuning"
        and c.method_config["prefix_projection"]),
    "IA3 leaves the bias unscaled": Mutation(
        "(x @ W + b) * l", "(x @ W) * l + b", lambda c: c.method == "ia3"),
    "bottleneck adapter without its residual": Mutation(
        "return h + g @", "return g @", lambda c: c.method == "bottleneck_adapter"),
    "P-tuning's reverse LSTM reads the rows in order": Mutation(
        'range(x.shape[0] - 1, -1, -1) if suffix.endswith("_reverse") else range(x.shape[0])', "range(x.shape[0])",
        lambda c: c.method == "ptuning" and c.method_config["encoder_reparameterization_type"] == "LSTM"),
    "P-tuning's LSTM with the input and forget gates swapped": Mutation(
        "c = f * c + i * g", "c = i * c + f * g",
        lambda c: c.method == "ptuning" and c.method_config["encoder_reparameterization_type"] == "LSTM"),
    "P-tuning's MLP without its second ReLU": Mutation(
        "linear(torch.relu(linear(torch.relu(linear(x, 0)), 2)), 4)", "linear(linear(torch.relu(linear(x, 0)), 2), 4)",
        lambda c: c.method == "ptuning" and c.method_config["encoder_reparameterization_type"] == "MLP"),
    "VeRA without its b vector": Mutation(
        "x @ W + b + l_b * ((l_d * (x @ A.T)) @ B.T)", "x @ W + b + ((l_d * (x @ A.T)) @ B.T)",
        lambda c: c.method == "vera"),
    "VeRA's d scales the output, not the rank": Mutation(
        "l_b * ((l_d * (x @ A.T)) @ B.T)", "l_b * ((x @ A.T) @ B.T) * l_d.sum()",
        lambda c: c.method == "vera" and c.method_config["r"] > 1),  # at r = 1 the two are the same
    "VeRA's A sliced from the right": Mutation(
        "A[:, : W.shape[0]]", "A[:, A.shape[1] - W.shape[0] :]", lambda c: vera_sliced(c, "A")),
    "VeRA's B sliced from the bottom": Mutation(
        "B[: W.shape[1]]", "B[B.shape[0] - W.shape[1] :]", lambda c: vera_sliced(c, "B")),
    "VeRA's B drawn before A": Mutation(
        "A = torch.empty(r, n_in).uniform_(-bound[0], bound[0], generator=generator)",
        "B0 = torch.empty(n_out, r).uniform_(-bound[1], bound[1], generator=generator)\n"
        "    A = torch.empty(r, n_in).uniform_(-bound[0], bound[0], generator=generator)",
        lambda c: c.method == "vera"),
    "VeRA's kaiming bound without its gain": Mutation(
        "math.sqrt(3.0) * (math.sqrt(2.0) / math.sqrt(shape[1]))", "math.sqrt(3.0) / math.sqrt(shape[1])",
        lambda c: c.method == "vera"),
    "VeRA's projections seeded with the key plus one": Mutation(
        'manual_seed(cfg["projection_prng_key"])', 'manual_seed(cfg["projection_prng_key"] + 1)',
        lambda c: c.method == "vera"),
    "AdaLoRA's regulariser squared, as the paper writes it": Mutation(
        "torch.linalg.matrix_norm(M - torch.eye(M.shape[0], dtype=M.dtype))",
        "torch.linalg.matrix_norm(M - torch.eye(M.shape[0], dtype=M.dtype)) ** 2",
        lambda c: c.method == "adalora" and c.method_config["orth_reg_weight"] > 0),
    "AdaLoRA scaled by the layer's rank, not init_r": Mutation(
        "c * (x @ (A * E).T) @ B.T", "c * (cfg['init_r'] + 1e-5) / (len(A) + 1e-5) * (x @ (A * E).T) @ B.T",
        lambda c: c.method == "adalora" and c.variant == "pruned"),
    "LoHa: the sum of the two products, not their Hadamard product": Mutation(
        "s * (w1a @ w1b) * (w2a @ w2b)", "s * ((w1a @ w1b) + (w2a @ w2b))", lambda c: c.method == "loha"),
    "LoHa's (out, in) delta reshaped, not transposed, to GPT-2's (in, out)": Mutation(
        "return x @ W + b + x @ delta.T", "return x @ W + b + x @ delta.reshape(delta.shape[::-1])",
        lambda c: c.method == "loha"),
    "LoHa scaled by alpha, not alpha / r": Mutation(
        'p, s = model.params, cfg["alpha"] / cfg["r"]', 'p, s = model.params, cfg["alpha"]',
        lambda c: c.method == "loha" and c.method_config["r"] > 1),
    "LoKr's Kronecker factors in the other order": Mutation(
        "torch.kron(w1, w2)", "torch.kron(w2, w1)", lambda c: c.method == "lokr" and c.variant != "factor2_odd"),
    "LoKr's (out, in) delta reshaped, not transposed, to GPT-2's (in, out)": Mutation(
        "x @ delta.T + b", "x @ delta.reshape(delta.shape[::-1]) + b", lambda c: c.method == "lokr"),
    "LoKr scaled by alpha, not alpha / r": Mutation(
        'cfg["r"], cfg["alpha"] / cfg["r"]', 'cfg["r"], cfg["alpha"]',
        lambda c: c.method == "lokr" and c.method_config["r"] > 1),
    "LoKr makes W1 low-rank without decompose_both": Mutation(
        'low_rank_w1 = cfg["decompose_both"] and r', "low_rank_w1 = r",
        lambda c: c.method == "lokr" and c.variant == "odd"),
    "OFT's Cayley transform the other way round, (I + S)(I - S)^-1": Mutation(
        "torch.linalg.solve(eye + S, eye - S, left=False)", "torch.linalg.solve(eye - S, eye + S, left=False)",
        lambda c: is_peft_type(c, "OFT", use_cayley_neumann=False)),
    "Neumann series with its last term weighted 2": Mutation(
        "[1] + [2] * (m - 1) + [1]", "[1] + [2] * m", lambda c: is_peft_type(c, "OFT", use_cayley_neumann=True)),
    "OFT's S symmetric, not skew": Mutation(
        "S = S - S.transpose(1, 2)", "S = S + S.transpose(1, 2)", lambda c: is_peft_type(c, "OFT")),
    "OFT's blocks applied transposed": Mutation(
        '"...rk,rkc->...rc"', '"...rk,rck->...rc"', lambda c: is_peft_type(c, "OFT")),
    "COFT's radius not divided by sqrt(blocks)": Mutation(
        "np.float32(eps) * (np.float32(1) / np.sqrt(np.float32(q.shape[0])))", "np.float32(eps)",
        lambda c: is_peft_type(c, "OFT", coft=True)),
    "COFT's projection differentiated, not straight through": Mutation(
        "return q + (projected - q.detach())", "return torch.where(norm <= radius, q, q * radius / norm)",
        lambda c: is_peft_type(c, "OFT", coft=True)),
    "BOFT's skew part without its 1/2": Mutation(
        "cayley(0.5 * (X - X.transpose(-1, -2)))", "cayley(X - X.transpose(-1, -2))",
        lambda c: is_peft_type(c, "BOFT")),
    "BOFT's factors multiplied the other way round": Mutation(
        "M = P @ torch.block_diag(*R[f]) @ P.T @ M", "M = M @ P @ torch.block_diag(*R[f]) @ P.T",
        lambda c: is_peft_type(c, "BOFT") and c.method_config["boft_n_butterfly_factor"] > 1),
    "BOFT's permutation matrices transposed": Mutation(
        "[butterfly_perm(W.shape[0], D // 2**f, H // 2, F)]", "[butterfly_perm(W.shape[0], D // 2**f, H // 2, F)].T",
        lambda c: is_peft_type(c, "BOFT") and c.method_config["boft_n_butterfly_factor"] > 2),
    "butterfly permutation with the odd groups first": Mutation(
        "list(range(0, step, 2)) + list(range(1, step, 2))", "list(range(1, step, 2)) + list(range(0, step, 2))",
        lambda c: is_peft_type(c, "BOFT") and c.method_config["boft_n_butterfly_factor"] > 1),
    "BOFT scales the bias too": Mutation(
        "(x @ M @ W) * s[:, 0] + b", "(x @ M @ W + b) * s[:, 0]", lambda c: is_peft_type(c, "BOFT")),
}  # fmt: skip


def broken_port(name: str) -> str:
    """The port's source with mutation `name` applied (its `old` must occur exactly once)."""
    mutation = ALL_MUTATIONS[name]
    source = PORT.read_text()
    assert source.count(mutation.old) == 1, f"the port no longer holds {mutation.old!r} exactly once"
    return source.replace(mutation.old, mutation.new)


# ------------------------------------------------------------------ breaks of the port's training steps
def decays_a_vector(t: Trajectory) -> bool:
    """Weight decay is on, and some trainable tensor is a vector (which must not decay)."""
    return t.spec["optimizer"]["weight_decay"] > 0 and any(t.case.weights[n].ndim < 2 for n in t.case.trainable)


def decays_a_matrix(t: Trajectory) -> bool:
    return t.spec["optimizer"]["weight_decay"] > 0 and any(t.case.weights[n].ndim >= 2 for n in t.case.trainable)


def adamw(t: Trajectory) -> bool:
    return t.spec["optimizer"]["name"] == "AdamW"


def clipped(t: Trajectory) -> bool:
    return bool(t.spec["grad_clip"])


TRAJECTORY_MUTATIONS = {
    "weight decay on vectors too": Mutation("p.ndim >= 2", "p.ndim >= 1", decays_a_vector),
    "AdamW without its bias corrections": Mutation(
        "(lr / (1 - b1**t)) * m / (v.sqrt() / math.sqrt(1 - b2**t) + opt[\"eps\"])",
        "lr * m / (v.sqrt() + opt[\"eps\"])", adamw),
    "AdamW's decay as an L2 term in the gradient": Mutation(
        'p.mul_(1 - lr * opt["weight_decay"])', 'g = g + opt["weight_decay"] * p',
        lambda t: adamw(t) and decays_a_matrix(t)),
    "clipping without its 1e-6": Mutation("(norm + 1e-6)", "norm", clipped),
    "clipping each tensor by its own norm": Mutation(
        "grads = {n: g * (t[\"grad_clip\"] / (norm + 1e-6)) for n, g in grads.items()}",
        "grads = {n: g * min(1.0, t[\"grad_clip\"] / (float(g.double().norm()) + 1e-6)) for n, g in grads.items()}",
        clipped),
    "warm-up one step late": Mutation("lr * (step + 1) / warmup", "lr * step / warmup",
                                      lambda t: t.spec["warmup_steps"] > 0),
    "cosine decayed to zero, not to min_lr_ratio": Mutation(
        "lr * (floor + (1 - floor) * 0.5", "lr * (0.0 + (1 - 0.0) * 0.5", lambda t: t.spec["min_lr_ratio"] > 0),
    "SGD's momentum with dampening": Mutation(
        'g.clone() if "b" not in s else opt["momentum"] * s["b"] + g',
        '(1 - opt["momentum"]) * g if "b" not in s else opt["momentum"] * s["b"] + (1 - opt["momentum"]) * g',
        lambda t: t.spec["optimizer"]["name"] == "SGD" and t.spec["optimizer"]["momentum"] > 0),
}  # fmt: skip


# ------------------------------------------------------------------ breaks of the port's merge and unmerge
def merges_with(m: MergeVector, peft_type: str, **fields: object) -> bool:
    return is_peft_type(m.case, peft_type, **fields)


READ_OFF = ("VERA", "ADALORA", "LOHA", "LOKR", "OFT", "BOFT")  # the methods whose merge the port reads off the site

MERGE_MUTATIONS = {
    "LoRA's update reshaped, not transposed, to GPT-2's (in, out)": Mutation(
        'p[f"{PEFT}{module}.lora_A.weight"]).T', 'p[f"{PEFT}{module}.lora_A.weight"]).reshape(W.shape)',
        lambda m: merges_with(m, "LORA")),
    "DoRA merged without its magnitude": Mutation(
        "W = W_used + delta if k is None else (W_used + delta) * k", "W = W_used + delta",
        lambda m: merges_with(m, "LORA", use_dora=True)),
    "DoRA's k from the base weight's norm": Mutation(
        "/ (W + delta).norm(dim=0)", "/ W.norm(dim=0)", lambda m: merges_with(m, "LORA", use_dora=True)),
    "IA3's merge leaves the bias unscaled": Mutation(
        "W, b = W * l[None, :], b * l", "W = W * l[None, :]", lambda m: merges_with(m, "IA3")),
    "IA3's feed-forward merge scales the columns, not the rows": Mutation(
        "W = W * l[:, None]", "W = W * l[None, : W.shape[1]]", lambda m: merges_with(m, "IA3")),
    "the read-off merge does not subtract site(0)": Mutation(
        "return site(torch.eye(n_in, dtype=dtype)) - b, b", "return site(torch.eye(n_in, dtype=dtype)), b",
        lambda m: m.case.method_config["peft_type"] in READ_OFF),
    "DoRA unmerged by subtracting, then dividing by k": Mutation(
        "W = (W if k is None else W / k) - delta", "W = W - delta if k is None else (W - delta) / k",
        lambda m: merges_with(m, "LORA", use_dora=True)),
    "PiSSA unmerged to its residual": Mutation(
        'W = W + (p[module + ".weight"] - W_used)', "W = W",
        lambda m: merges_with(m, "LORA", init_lora_weights="pissa")),
    "IA3 unmerged by dividing by l + 1e-8, as PEFT does": Mutation(
        "W = W / l[:, None]", "W = W / (l[:, None] + 1e-8)", lambda m: merges_with(m, "IA3")),
}  # fmt: skip


# ------------------------------------------------------------------ breaks of the port's KV cache
def generates_with(g: GenerationVector, method: str) -> bool:
    return g.case.method == method


# each breaks the cached generations only: `breaks` says which (the uncached ones must still pass)
GENERATION_MUTATIONS = {
    "the prefix prepended again at every cached step": Mutation(
        "            pasts = cache\n",
        "            pasts = cache if pasts is None else [(torch.cat([a, k], 2), torch.cat([b, v], 2))"
        " for (a, b), (k, v) in zip(pasts, cache)]\n",
        lambda g: generates_with(g, "prefix_tuning")),
    "the prefix left out of the cache": Mutation(
        "keys_values.append(kv)",
        "keys_values.append(kv if self.prefix is None or cache is not None else (kv[0][:, :, P:], kv[1][:, :, P:]))",
        lambda g: generates_with(g, "prefix_tuning")),
    "the virtual tokens prepended again at every cached step": Mutation(
        "if self.prompt is not None and cache is None:", "if self.prompt is not None:",
        lambda g: generates_with(g, "prompt_tuning")),
    "the cache not grown past the prompt": Mutation(
        "logits, cache = model.forward(tokens if cache is None else tokens[:, -1:], None, cache)",
        "logits, kept = model.forward(tokens if cache is None else tokens[:, -1:], None, cache)"
        "; cache = kept if cache is None else cache",
        lambda g: True),
}  # fmt: skip


# ------------------------------------------------------------------ breaks of the port's adapter files
def saves(t: RoundTrip, peft_type: str) -> bool:
    return is_peft_type(t.case, peft_type)


ROUND_TRIP_MUTATIONS = {
    "IA3's vectors saved flat": Mutation(
        "out[name].reshape(1, -1) if feedforward else out[name].reshape(-1, 1)", "out[name]",
        lambda t: saves(t, "IA3")),
    "IA3's feed-forward vectors saved as (n, 1)": Mutation(
        "out[name].reshape(1, -1) if feedforward else", "out[name].reshape(-1, 1) if feedforward else",
        lambda t: saves(t, "IA3")),
    "LoRA's trained bias of a targeted layer saved under the bias's own name": Mutation(
        'f"{PEFT}{module}.base_layer.bias" if targeted else PEFT + name', "PEFT + name", lambda t: saves(t, "LORA")),
    "the prefix projection's encoder saved, not its table": Mutation(
        'out = {"prompt_embeddings": prefix_table(model.prefix)}', "out = out",
        lambda t: saves(t, "PREFIX_TUNING")),
    "the prefix table laid out [layer][head] with keys and values swapped": Mutation(
        "kv.permute(2, 0, 1, 3)", "kv.permute(2, 1, 0, 3)", lambda t: saves(t, "PREFIX_TUNING")),
    "P-tuning's file holds the encoder's input, not its output": Mutation(
        'out = {"prompt_embeddings": model.prompt()}',
        'out = {"prompt_embeddings": p["prompt_encoder.embedding.weight"]}',
        lambda t: saves(t, "P_TUNING")),
    "VeRA's shared projections not saved": Mutation(
        'out["base_model.vera_A"], out["base_model.vera_B"] = derived', "_ = derived", lambda t: saves(t, "VERA")),
    "a float32 adapter saved in float64": Mutation(
        "tensors = {n: t.numpy() for n, t in", "tensors = {n: t.double().numpy() for n, t in",
        lambda t: t.case.dtype == "float32"),
}  # fmt: skip

ALL_MUTATIONS = {**MUTATIONS, **TRAJECTORY_MUTATIONS, **MERGE_MUTATIONS, **GENERATION_MUTATIONS, **ROUND_TRIP_MUTATIONS}
