"""The engine equals the reference GPT.

- `engine.backward` (stopped at the lowest trainable parameter) gives the reference `gpt.backward`'s
  gradients bitwise, for every method, over hypothesis-drawn configs and batches: it runs the same
  calls, so the same arithmetic.
- The KV-cache path (`generation.forward_cached`) gives the full forward's logits at every position,
  for every method that computes at generation time (float64, <= 1e-12 relative: the cached step
  multiplies the same numbers in smaller matmuls, which may round differently).
- A frozen weight's gradient matmul never runs, and blocks below the lowest trainable parameter are
  never visited, for every method.
Row blocks on threads are proven equal to the whole batch in test_parallel.py.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import cases, perturbed_model

import tinypeft as tp
from tinypeft import engine, gpt
from tinypeft import ops as linear_module
from tinypeft.generation import forward_cached
from tinypeft.gradcheck import relative_error
from tinypeft.ops import causal_lm_loss_backward, causal_lm_loss_forward

# every method, with its tensors drawn away from an identity start so that no gradient is trivially zero
METHODS = {
    "full": None,
    "bitfit": lambda cfg: tp.BitFitConfig(),
    "lntuning": lambda cfg: tp.LNTuningConfig(),
    "last_blocks": lambda cfg: tp.LastBlocksConfig(num_blocks=1),
    "selective_top_mlp": lambda cfg: tp.SelectiveConfig(patterns=[f"transformer.h.{cfg.n_layer - 1}.mlp.*"]),
    "lora": lambda cfg: tp.LoraConfig(r=1, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False),
    "lora_bias_all": lambda cfg: tp.LoraConfig(r=1, bias="all", init_lora_weights=False),
    "dora": lambda cfg: tp.LoraConfig(r=1, use_dora=True, target_modules=["mlp.c_proj"], init_lora_weights=False),
    "pissa": lambda cfg: tp.LoraConfig(r=1, init_lora_weights="pissa", target_modules=["attn.c_proj"]),
    "prompt": lambda cfg: tp.PromptTuningConfig(num_virtual_tokens=2),
    "prefix": lambda cfg: tp.PrefixTuningConfig(num_virtual_tokens=2),
    "ptuning_lstm": lambda cfg: tp.PromptEncoderConfig(
        num_virtual_tokens=2, encoder_hidden_size=3, encoder_reparameterization_type="LSTM"
    ),
    "prefix_projection": lambda cfg: tp.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True),
    "ia3": lambda cfg: tp.IA3Config(init_ia3_weights=False),
    "adapter": lambda cfg: tp.AdapterConfig(bottleneck_size=2, init_weights=False),
    "vera": lambda cfg: tp.VeraConfig(r=2, target_modules=["c_attn", "mlp.c_proj"], init_weights=False),
}


def wrapped(base: tp.GPT, method: str) -> tp.GPT | tp.PeftModel:
    make = METHODS[method]
    return base if make is None else tp.get_peft_model(base, make(base.config), seed=3)


@settings(max_examples=8, deadline=None)
@given(case=cases(min_len=2, max_len=8), method=st.sampled_from(sorted(METHODS)))
def test_engine_backward_equals_the_reference_bitwise(case, method):
    model = wrapped(case.model, method)
    view = model.view()
    ids, mask = view.check_inputs(case.ids, case.mask)
    leading = 0 if view.sites.embedding is None else view.sites.embedding.positions(view.params)
    labels = engine.pad_labels(case.labels, leading)
    if not (labels[:, 1:] != -100).any():
        labels[0, -1] = 0
    logits, cache = gpt.forward(view.params, view.config, ids, mask, view.sites)
    dlogits = causal_lm_loss_backward(1.0, causal_lm_loss_forward(logits, labels)[1])
    reference = gpt.backward(dlogits, cache, view.trainable)
    fast = engine.backward(dlogits, cache, view)
    assert set(fast) == set(reference) == set(view.trainable)
    for name, g in reference.items():
        np.testing.assert_array_equal(fast[name], g, err_msg=name)


def test_the_engine_skips_the_blocks_below_the_lowest_trainable_parameter(monkeypatch):
    visited = []
    original = gpt.block_backward

    def spy(dx, cache, i, trainable):
        visited.append(i)
        return original(dx, cache, i, trainable)

    monkeypatch.setattr(gpt, "block_backward", spy)
    base = perturbed_model(tp.GPTConfig(vocab_size=11, n_positions=12, n_embd=8, n_layer=4, n_head=2), 0)
    ids = np.random.default_rng(0).integers(0, 11, size=(2, 7))
    expected = {
        "last_blocks": [3],  # the top block only
        "dora": [3, 2, 1, 0],  # mlp.c_proj in every block
        "selective_top_mlp": [3],
        "prefix": [3, 2, 1, 0],
    }
    for method, blocks in expected.items():
        visited.clear()
        wrapped(base, method).loss_and_grad(ids, ids)
        assert visited == blocks, method
    visited.clear()
    tp.trainable_only(base, ["transformer.ln_f.*"])  # the head alone: no block at all
    base.loss_and_grad(ids, ids)
    assert visited == []


@pytest.mark.parametrize("method", sorted(METHODS))
def test_frozen_weights_never_run_their_gradient_matmul(monkeypatch, method):
    """Every call of the linear op anywhere (the base's linears, IA3's and the adapters' inner ones) asks
    for dW only of a trainable weight and db only of a trainable bias."""
    calls = []
    original = linear_module.linear_backward

    def spy(dy, cache, need_dx=True, need_dweight=True, need_dbias=True):
        calls.append((cache[1], need_dweight, need_dbias))
        return original(dy, cache, need_dx, need_dweight, need_dbias)

    for module in list(sys.modules.values()):
        named = getattr(module, "__name__", "")
        if named.startswith("tinypeft") and getattr(module, "linear_backward", None) is original:
            monkeypatch.setattr(module, "linear_backward", spy)
    base = perturbed_model(tp.GPTConfig(vocab_size=11, n_positions=8, n_embd=8, n_layer=3, n_head=2), 0)
    model = wrapped(base, method)
    model.loss_and_grad([[1, 2, 3, 4]], [[1, 2, 3, 4]])
    view = model.view()
    names_of: dict[int, set[str]] = {}  # a stand-in is in the dict under its base name and its own
    for k, v in view.params.items():
        names_of.setdefault(id(v), set()).add(k)
    assert calls or method == "lora", "no linear op ran in the backward"  # LoRA on every linear: none is plain
    for weight, need_dweight, need_dbias in calls:
        names = names_of.get(id(weight), {"a frozen tensor that is no parameter (PiSSA's residual)"})
        assert need_dweight == any(n in view.trainable for n in names), names
        bias_names = {n.removesuffix(".weight") + ".bias" for n in names}
        assert need_dbias == any(n in view.trainable for n in bias_names), names


@settings(max_examples=10, deadline=None)
@given(case=cases(max_len=8, padding=False), method=st.sampled_from(sorted(METHODS)), split=st.integers(1, 7))
def test_the_kv_cache_equals_the_full_forward(case, method, split):
    model = wrapped(case.model, method).eval()
    view = model.view()
    ids = case.ids
    split = min(split, ids.shape[1] - 1) if ids.shape[1] > 1 else 1
    full = model(ids)
    logits, kv = forward_cached(view, ids[:, :split], None)
    pieces = [logits]
    for t in range(split, ids.shape[1]):
        logits, kv = forward_cached(view, ids[:, t : t + 1], kv)
        pieces.append(logits)
    assert relative_error(np.concatenate(pieces, axis=1), full) <= 1e-12
