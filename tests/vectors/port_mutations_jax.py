"""The same one-line breaks as tests/vectors/port_mutations.py, made to the JAX port (examples/port_jax/port.py):
each name of the torch table, with the JAX text it replaces and the cases it must make fail (the torch table's
own `breaks`, so the two ports are held to the same cases). tests/vectors/test_port_jax.py shows that they do."""

from __future__ import annotations

from pathlib import Path

from port_mutations import (
    GENERATION_MUTATIONS,
    MERGE_MUTATIONS,
    MUTATIONS,
    ROUND_TRIP_MUTATIONS,
    TRAJECTORY_MUTATIONS,
    Mutation,
)

JAX_PORT = Path(__file__).resolve().parents[2] / "examples" / "port_jax" / "port.py"

# name -> (old, new): `old` occurs exactly once in the JAX port
CASE_EDITS = {
    "LayerNorm with the unbiased variance": (
        "((x - mean) ** 2).mean(-1, keepdims=True)", "((x - mean) ** 2).sum(-1, keepdims=True) / (x.shape[-1] - 1)"),
    "LayerNorm ignores the config's epsilon": ("jnp.sqrt(var + eps)", "jnp.sqrt(var + 1e-5)"),
    "GELU in its erf form": (
        "0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))",
        "0.5 * x * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))"),
    "scores scaled by 1/sqrt(C), not 1/sqrt(head size)": ("/ math.sqrt(C // n_head)", "/ math.sqrt(C)"),
    "q, k, v split in another order": (
        "heads(qkv[..., :C]), heads(qkv[..., C : 2 * C])", "heads(qkv[..., C : 2 * C]), heads(qkv[..., :C])"),
    "causal mask off by one": (
        "jnp.arange(P + T)[None, :] <= (P + jnp.arange(T))", "jnp.arange(P + T)[None, :] < (P + jnp.arange(T))"),
    "padding mask ignored": ("(mask[:, None, None, :] != 0)", "(mask[:, None, None, :] != 2)"),
    "hidden scores added to, as transformers does, not replaced": (
        "jnp.where(visible, scores, jnp.finfo(scores.dtype).min)",
        "scores + jnp.where(visible, 0.0, jnp.finfo(scores.dtype).min)"),
    "final LayerNorm skipped": ('return ln("transformer.ln_f", x) @', "return x @"),
    "ignored labels counted in the loss": ("valid = targets != -100", "valid = targets == targets"),
    "rsLoRA scaled by alpha / r": (
        'cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])', 'cfg["lora_alpha"] / cfg["r"]'),
    "rsLoRA ignored under DoRA": ('if cfg["use_rslora"] else', 'if cfg["use_rslora"] and not cfg["use_dora"] else'),
    "IA3's feed-forward entries matched with a '.' boundary": (
        "module.endswith(tuple(ff))", 'any(module == f or module.endswith("." + f) for f in ff)'),
    "LoRA without its scaling": ("x @ W + b + s * (x @ A.T) @ B.T", "x @ W + b + (x @ A.T) @ B.T"),
    "DoRA's norm not detached": (
        "jax.lax.stop_gradient(jnp.linalg.norm(W + s * (B @ A).T, axis=0))",
        "jnp.linalg.norm(W + s * (B @ A).T, axis=0)"),
    "DoRA rescales the bias too": (
        "(p[m] / norm) * (x @ W + s * (x @ A.T) @ B.T) + b", "(p[m] / norm) * (x @ W + s * (x @ A.T) @ B.T + b)"),
    "PiSSA's residual from the trained factors, not the SVD": (
        'pissa_residual(weights[module + ".weight"], r, s)',
        'weights[module + ".weight"] - s * (weights[f"{PEFT}{module}.lora_B.weight"]'
        ' @ weights[f"{PEFT}{module}.lora_A.weight"]).T'),
    "virtual tokens appended instead of prepended": (
        "jnp.concatenate([jnp.broadcast_to(table, (B, *table.shape)), x], 1)",
        "jnp.concatenate([x, jnp.broadcast_to(table, (B, *table.shape))], 1)"),
    "prefix table laid out [key/value][layer]": ("(kv[2 * i], kv[2 * i + 1])", "(kv[i], kv[L + i])"),
    "prefix: real tokens keep positions from 0": (
        'p["transformer.wpe.weight"][P : P + T]', 'p["transformer.wpe.weight"][:T]'),
    "prefix projection without its tanh": ("hidden = jnp.tanh(E @", "hidden = (E @"),
    "IA3 leaves the bias unscaled": (
        "base_linear(p, module, x) * p[l]", '(x @ p[module + ".weight"]) * p[l] + p[module + ".bias"]'),
    "bottleneck adapter without its residual": ("return h + g @", "return g @"),
    "P-tuning's reverse LSTM reads the rows in order": (
        'range(x.shape[0] - 1, -1, -1) if suffix.endswith("_reverse") else range(x.shape[0])', "range(x.shape[0])"),
    "P-tuning's LSTM with the input and forget gates swapped": ("c = f * c + i * g", "c = i * c + f * g"),
    "P-tuning's MLP without its second ReLU": (
        "linear(p, jax.nn.relu(linear(p, jax.nn.relu(linear(p, x, 0)), 2)), 4)",
        "linear(p, linear(p, jax.nn.relu(linear(p, x, 0)), 2), 4)"),
    "the tied head reads the base table, not the trained token rows": (
        "return table[ids], table", 'return table[ids], p["transformer.wte.weight"]'),
    "LoRA on wte's update in the head too": (
        "W[ids] + s * p[A].T[ids] @ p[B].T, W", "W[ids] + s * p[A].T[ids] @ p[B].T, W + s * (p[B] @ p[A]).T"),
    "AdaLoRA's regulariser squared, as the paper writes it": (
        "jnp.linalg.norm(M - jnp.eye(M.shape[0], dtype=M.dtype))",
        "jnp.linalg.norm(M - jnp.eye(M.shape[0], dtype=M.dtype)) ** 2"),
    "AdaLoRA scaled by the layer's rank, not init_r": (
        "c * (x @ (A * E).T) @ B.T", "c * (cfg['init_r'] + 1e-5) / (len(A) + 1e-5) * (x @ (A * E).T) @ B.T"),
    "VeRA without its b vector": (
        "base_linear(p, module, x) + p[l_b] * ((p[l_d] * (x @ A.T)) @ B.T)",
        "base_linear(p, module, x) + ((p[l_d] * (x @ A.T)) @ B.T)"),
    "VeRA's d scales the output, not the rank": (
        "p[l_b] * ((p[l_d] * (x @ A.T)) @ B.T)", "p[l_b] * ((x @ A.T) @ B.T) * p[l_d].sum()"),
    "VeRA's A sliced from the right": (
        'p["base_model.vera_A"][:, : W.shape[0]]',
        'p["base_model.vera_A"][:, p["base_model.vera_A"].shape[1] - W.shape[0] :]'),
    "VeRA's B sliced from the bottom": (
        'p["base_model.vera_B"][: W.shape[1]]',
        'p["base_model.vera_B"][p["base_model.vera_B"].shape[0] - W.shape[1] :]'),
    "VeRA's B drawn before A": (
        "A = kaiming_uniform(next_word, (r, n_in))",
        "B0 = kaiming_uniform(next_word, (n_out, r))\n    A = kaiming_uniform(next_word, (r, n_in))"),
    "VeRA's kaiming bound without its gain": (
        "math.sqrt(3.0) * (math.sqrt(2.0) / math.sqrt(shape[1]))", "math.sqrt(3.0) / math.sqrt(shape[1])"),
    "VeRA's projections seeded with the key plus one": (
        'mt19937(cfg["projection_prng_key"])', 'mt19937(cfg["projection_prng_key"] + 1)'),
    "LoHa: the sum of the two products, not their Hadamard product": (
        "s * (w1a @ w1b) * (w2a @ w2b)", "s * ((w1a @ w1b) + (w2a @ w2b))"),
    "LoHa's (out, in) delta reshaped, not transposed, to GPT-2's (in, out)": (
        "base_linear(p, module, x) + x @ delta.T", "base_linear(p, module, x) + x @ delta.reshape(delta.shape[::-1])"),
    "LoHa scaled by alpha, not alpha / r": ('s = cfg["alpha"] / cfg["r"]', 's = cfg["alpha"]'),
    "LoKr's Kronecker factors in the other order": ("jnp.kron(w1, w2)", "jnp.kron(w2, w1)"),
    "LoKr's (out, in) delta reshaped, not transposed, to GPT-2's (in, out)": (
        "x @ delta.T + base_linear", "x @ delta.reshape(delta.shape[::-1]) + base_linear"),
    "LoKr scaled by alpha, not alpha / r": ('cfg["r"], cfg["alpha"] / cfg["r"]', 'cfg["r"], cfg["alpha"]'),
    "LoKr makes W1 low-rank without decompose_both": ('low_rank_w1 = cfg["decompose_both"] and r', "low_rank_w1 = r"),
    "OFT's Cayley transform the other way round, (I + S)(I - S)^-1": (
        "jnp.linalg.solve(jnp.swapaxes(eye + S, -1, -2), jnp.swapaxes(eye - S, -1, -2))",
        "jnp.linalg.solve(jnp.swapaxes(eye - S, -1, -2), jnp.swapaxes(eye + S, -1, -2))"),
    "Neumann series with its last term weighted 2": ("[1] + [2] * (m - 1) + [1]", "[1] + [2] * m"),
    "OFT's S symmetric, not skew": ("S = S - jnp.swapaxes(S, 1, 2)", "S = S + jnp.swapaxes(S, 1, 2)"),
    "OFT's blocks applied transposed": ('"...rk,rkc->...rc"', '"...rk,rck->...rc"'),
    "COFT's radius not divided by sqrt(blocks)": (
        "np.float32(eps) * (np.float32(1) / np.sqrt(np.float32(q.shape[0])))", "np.float32(eps)"),
    "COFT's projection differentiated, not straight through": (
        "return q + (projected - fixed)", "return jnp.where(norm <= radius, q, q * radius / norm)"),
    "BOFT's skew part without its 1/2": (
        "cayley(0.5 * (X - jnp.swapaxes(X, -1, -2)))", "cayley(X - jnp.swapaxes(X, -1, -2))"),
    "BOFT's factors multiplied the other way round": (
        "M = P @ jax.scipy.linalg.block_diag(*R[f]) @ P.T @ M", "M = M @ P @ jax.scipy.linalg.block_diag(*R[f]) @ P.T"),
    "BOFT's permutation matrices transposed": (
        "[np.array(butterfly_perm(W.shape[0], D // 2**f, H // 2, F))]",
        "[np.array(butterfly_perm(W.shape[0], D // 2**f, H // 2, F))].T"),
    "butterfly permutation with the odd groups first": (
        "list(range(0, step, 2)) + list(range(1, step, 2))", "list(range(1, step, 2)) + list(range(0, step, 2))"),
    "BOFT scales the bias too": ("(x @ M @ W) * s[:, 0] + b", "(x @ M @ W + b) * s[:, 0]"),
}  # fmt: skip

TRAJECTORY_EDITS = {
    "weight decay on vectors too": ("p.ndim >= 2", "p.ndim >= 1"),
    "AdamW without its bias corrections": (
        '(lr / (1 - b1**t)) * m / (np.sqrt(v) / math.sqrt(1 - b2**t) + opt["eps"])',
        'lr * m / (np.sqrt(v) + opt["eps"])'),
    "AdamW's decay as an L2 term in the gradient": (
        'p = p * (1 - lr * opt["weight_decay"])', 'g = g + opt["weight_decay"] * p'),
    "clipping without its 1e-6": ("(norm + 1e-6)", "norm"),
    "clipping each tensor by its own norm": (
        'grads = {n: g * (t["grad_clip"] / (norm + 1e-6)) for n, g in grads.items()}',
        'grads = {n: g * min(1.0, t["grad_clip"] / (float(np.linalg.norm(g.astype(np.float64))) + 1e-6))'
        " for n, g in grads.items()}"),
    "warm-up one step late": ("lr * (step + 1) / warmup", "lr * step / warmup"),
    "cosine decayed to zero, not to min_lr_ratio": (
        "lr * (floor + (1 - floor) * 0.5", "lr * (0.0 + (1 - 0.0) * 0.5"),
    "SGD's momentum with dampening": (
        'g.copy() if "b" not in s else opt["momentum"] * s["b"] + g',
        '(1 - opt["momentum"]) * g if "b" not in s else opt["momentum"] * s["b"] + (1 - opt["momentum"]) * g'),
}  # fmt: skip

MERGE_EDITS = {
    "LoRA's update reshaped, not transposed, to GPT-2's (in, out)": (
        'p[f"{PEFT}{module}.lora_A.weight"]).T', 'p[f"{PEFT}{module}.lora_A.weight"]).reshape(W.shape)'),
    "DoRA merged without its magnitude": (
        "W = W_used + delta if k is None else (W_used + delta) * k", "W = W_used + delta"),
    "DoRA's k from the base weight's norm": ("/ jnp.linalg.norm(W + delta, axis=0)", "/ jnp.linalg.norm(W, axis=0)"),
    "IA3's merge leaves the bias unscaled": ("W, b = W * l[None, :], b * l", "W = W * l[None, :]"),
    "IA3's feed-forward merge scales the columns, not the rows": (
        "W = W * l[:, None]", "W = W * l[None, : W.shape[1]]"),
    "the read-off merge does not subtract site(0)": (
        "return site(p, jnp.eye(n_in, dtype=dtype)) - b, b", "return site(p, jnp.eye(n_in, dtype=dtype)), b"),
    "DoRA unmerged by subtracting, then dividing by k": (
        "W = (W if k is None else W / k) - delta", "W = W - delta if k is None else (W - delta) / k"),
    "PiSSA unmerged to its residual": ('W = W + (p[module + ".weight"] - W_used)', "W = W"),
    "IA3 unmerged by dividing by l + 1e-8, as PEFT does": ("W = W / l[:, None]", "W = W / (l[:, None] + 1e-8)"),
}  # fmt: skip

GENERATION_EDITS = {
    "the prefix prepended again at every cached step": (
        "        pasts = cache\n",
        "        pasts = cache if pasts is None else [(jnp.concatenate([a, k], 2), jnp.concatenate([b, v], 2))"
        " for (a, b), (k, v) in zip(pasts, cache)]\n"),
    "the prefix left out of the cache": (
        "keys_values.append(kv)",
        "keys_values.append(kv if sites.prefix is None or cache is not None else (kv[0][:, :, P:], kv[1][:, :, P:]))"),
    "the virtual tokens prepended again at every cached step": (
        "if sites.prompt is not None and cache is None:", "if sites.prompt is not None:"),
    "the cache not grown past the prompt": (
        "logits, cache = forward(p, tokens if cache is None else tokens[:, -1:], cache)",
        "logits, kept = forward(p, tokens if cache is None else tokens[:, -1:], cache)"
        "; cache = kept if cache is None else cache"),
}  # fmt: skip

ROUND_TRIP_EDITS = {
    "IA3's vectors saved flat": (
        "out[name].reshape(1, -1) if feedforward else out[name].reshape(-1, 1)", "out[name]"),
    "IA3's feed-forward vectors saved as (n, 1)": (
        "out[name].reshape(1, -1) if feedforward else", "out[name].reshape(-1, 1) if feedforward else"),
    "LoRA's trained bias of a targeted layer saved under the bias's own name": (
        'f"{PEFT}{module}.base_layer.bias" if module in sites.linear else PEFT + name', "PEFT + name"),
    "the prefix projection's encoder saved, not its table": (
        'out = {"prompt_embeddings": kv.transpose(2, 0, 1, 3).reshape(kv.shape[2], -1)}', "out = out"),
    "the prefix table laid out [layer][head] with keys and values swapped": (
        "kv.transpose(2, 0, 1, 3)", "kv.transpose(2, 1, 0, 3)"),
    "P-tuning's file holds the encoder's input, not its output": (
        'out = {"prompt_embeddings": sites.prompt(p)}',
        'out = {"prompt_embeddings": p["prompt_encoder.embedding.weight"]}'),
    "VeRA's shared projections not saved": ('out["base_model.vera_A"], out["base_model.vera_B"] = p', "_ = p"),
    "a float32 adapter saved in float64": (
        "tensors = {n: np.asarray(t) for n, t in", "tensors = {n: np.asarray(t, np.float64) for n, t in"),
}  # fmt: skip

# the torch table's cases for each break: the two ports must fail the same ones
JAX_MUTATIONS = {name: Mutation(*CASE_EDITS[name], MUTATIONS[name].breaks) for name in MUTATIONS if name in CASE_EDITS}
JAX_TRAJECTORY_MUTATIONS = {
    name: Mutation(*TRAJECTORY_EDITS[name], TRAJECTORY_MUTATIONS[name].breaks) for name in TRAJECTORY_EDITS
}

JAX_MERGE_MUTATIONS = {name: Mutation(*MERGE_EDITS[name], MERGE_MUTATIONS[name].breaks) for name in MERGE_EDITS}
JAX_GENERATION_MUTATIONS = {
    name: Mutation(*GENERATION_EDITS[name], GENERATION_MUTATIONS[name].breaks) for name in GENERATION_EDITS
}
JAX_ROUND_TRIP_MUTATIONS = {
    name: Mutation(*ROUND_TRIP_EDITS[name], ROUND_TRIP_MUTATIONS[name].breaks) for name in ROUND_TRIP_EDITS
}
ALL_JAX_MUTATIONS = {
    **JAX_MUTATIONS,
    **JAX_TRAJECTORY_MUTATIONS,
    **JAX_MERGE_MUTATIONS,
    **JAX_GENERATION_MUTATIONS,
    **JAX_ROUND_TRIP_MUTATIONS,
}


def broken_jax_port(name: str) -> str:
    """The JAX port's source with mutation `name` applied (its `old` must occur exactly once)."""
    mutation = ALL_JAX_MUTATIONS[name]
    source = JAX_PORT.read_text()
    assert source.count(mutation.old) == 1, f"the JAX port no longer holds {mutation.old!r} exactly once"
    return source.replace(mutation.old, mutation.new)
