"""Bottleneck adapters: gradients three ways over random models, bottleneck widths 1..16, every
non-linearity and placement, with padding masks; the zero up-projection is the base model bit for
bit; no merge (the reason given); PEFT-style names; only the adapters train."""

from __future__ import annotations

import numpy as np
import pytest
from additive_utils import AUTOGRAD_TOL, assert_checks_catch, assert_gradients_check, assert_only_adapter_changes
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import cases, perturbed_model

import tinypeft as tp
from tinypeft import gpt
from tinypeft.gradcheck import check_gradients, relative_error
from tinypeft.methods import adapter as adapter_module


def small(**kw):
    cfg = dict(vocab_size=37, n_positions=24, n_embd=12, n_layer=2, n_head=3, dtype="float64") | kw
    return perturbed_model(tp.GPTConfig(**cfg), 0)


def random_adapter(base, r=4, non_linearity="relu", placement="both", seed=0):
    """Up-projection drawn, not zero, so every tensor's gradient is non-trivial."""
    config = tp.AdapterConfig(bottleneck_size=r, non_linearity=non_linearity, placement=placement, init_weights=False)
    return tp.get_peft_model(base, config, seed=seed)


def smallest_pre_activation(model, ids, mask) -> float:
    """min |a| over every adapter's pre-activation a: the distance to relu's kink."""
    view = model.view()
    ids, mask = view.check_inputs(ids, mask)
    _, cache = gpt.forward(view.params, view.config, ids, mask, view.sites)
    smallest = np.inf
    for block in cache.blocks:
        for call in (block.attn_proj, block.mlp_proj):
            if call.site is not gpt.BASE_LINEAR:
                a = call.cache[1][5]  # (module, (linear cache, h, Wd, Wu, g, act cache = a for relu, ...))
                smallest = min(smallest, float(np.abs(a).min()))
    return smallest


@settings(max_examples=20)
@given(
    cases(min_len=2),
    st.integers(1, 16),
    st.sampled_from(sorted(adapter_module.ACTIVATIONS)),
    st.sampled_from(sorted(adapter_module.PLACEMENTS)),
)
def test_gradients(case, r, non_linearity, placement):
    model = random_adapter(case.model, r, non_linearity, placement, case.seed)
    if non_linearity == "relu":
        # a finite difference across relu's kink measures a one-sided slope, not the derivative
        assume(smallest_pre_activation(model, case.ids, case.mask) > 1e-3)
    assert_gradients_check(model, case.ids, mask=case.mask, output_weights=case.output_weights)
    assert_gradients_check(model, case.ids, labels=case.labels, mask=case.mask)


def test_checks_catch_a_wrong_adapter_backward(monkeypatch):
    model = random_adapter(small(), non_linearity="tanh")
    ids = np.random.default_rng(0).integers(0, 37, size=(2, 6))
    assert_checks_catch(monkeypatch, adapter_module, "bottleneck_backward", model, ids, ids)


@pytest.mark.parametrize("non_linearity", sorted(adapter_module.ACTIVATIONS))
def test_checks_catch_a_wrong_activation_backward(monkeypatch, non_linearity):
    model = random_adapter(small(), non_linearity=non_linearity)
    ids = np.random.default_rng(0).integers(0, 37, size=(2, 6))
    clean = check_gradients(model, ids, labels=ids)
    assert max(e["autograd"] for e in clean.values()) <= AUTOGRAD_TOL
    forward, backward = adapter_module.ACTIVATIONS[non_linearity]
    monkeypatch.setitem(adapter_module.ACTIVATIONS, non_linearity, (forward, lambda *a: backward(*a) * 1.001))
    broken = check_gradients(model, ids, labels=ids)
    assert max(e["autograd"] for e in broken.values()) > 1e-5
    assert max(e["directional"] for e in broken.values()) > 1e-5


@pytest.mark.parametrize("non_linearity", sorted(adapter_module.ACTIVATIONS))
def test_activations_are_what_their_names_say(non_linearity):
    a = np.linspace(-3, 3, 13)
    expected = {
        "relu": np.maximum(a, 0.0),
        "tanh": np.tanh(a),
        "silu": a / (1 + np.exp(-a)),
        "gelu_tanh": 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3))),
    }[non_linearity]
    g, _ = adapter_module.ACTIVATIONS[non_linearity][0](a)
    assert relative_error(g, expected) <= 1e-15


def test_zero_up_projection_is_the_base_model_bit_for_bit():
    base = small()
    ids = np.random.default_rng(1).integers(0, 37, size=(3, 9))
    for placement in adapter_module.PLACEMENTS:
        model = tp.get_peft_model(
            base, tp.AdapterConfig(bottleneck_size=5, non_linearity="gelu_tanh", placement=placement)
        )
        np.testing.assert_array_equal(model(ids), base(ids))
        _, grads = model.loss_and_grad(ids, ids)
        assert all(np.abs(g).sum() > 0 for k, g in grads.items() if "adapter_up" in k)
        assert all(np.all(g == 0) for k, g in grads.items() if "adapter_down" in k)  # Wu = 0 blocks them at first


def test_formula_at_one_site():
    base = small(n_layer=1)
    model = random_adapter(base, r=3, non_linearity="silu", placement="mlp")
    module = "transformer.h.0.mlp.c_proj"
    p = model.view().params
    x = np.random.default_rng(0).standard_normal((2, 4, 48))
    y, _ = model.view().sites.linear[module].forward(p, module, x)
    h = x @ p[module + ".weight"] + p[module + ".bias"]
    pre = h @ p[f"base_model.model.{module}.adapter_down.weight"].T + p[f"base_model.model.{module}.adapter_down.bias"]
    up = (pre / (1 + np.exp(-pre))) @ p[f"base_model.model.{module}.adapter_up.weight"].T
    assert relative_error(y, h + up + p[f"base_model.model.{module}.adapter_up.bias"]) <= 1e-15


def test_names_shapes_placement_and_init():
    base = small(n_layer=2)
    model = tp.get_peft_model(base, tp.AdapterConfig(bottleneck_size=4))
    shapes = {k: v.shape for k, v in model.trainable_parameters().items()}
    expected = {}
    for i in range(2):
        for m, width in (("attn.c_proj", 12), ("mlp.c_proj", 12)):
            name = f"base_model.model.transformer.h.{i}.{m}"
            expected |= {
                f"{name}.adapter_down.weight": (4, width),  # torch.nn.Linear's (out, in)
                f"{name}.adapter_down.bias": (4,),
                f"{name}.adapter_up.weight": (width, 4),
                f"{name}.adapter_up.bias": (width,),
            }
    assert shapes == expected
    params = model.trainable_parameters()
    down = params["base_model.model.transformer.h.0.attn.c_proj.adapter_down.weight"]
    assert 0 < np.abs(down).max() <= 1 / np.sqrt(12)  # U(-1/sqrt(C), 1/sqrt(C)), torch's Linear default
    assert all(np.all(v == 0) for k, v in params.items() if "adapter_up" in k)
    mlp_only = tp.get_peft_model(base, tp.AdapterConfig(bottleneck_size=4, placement="mlp"))
    assert {k.split(".")[5] for k in mlp_only.trainable_parameters()} == {"mlp"}
    attn_only = tp.get_peft_model(base, tp.AdapterConfig(bottleneck_size=4, placement="attn"))
    assert {k.split(".")[5] for k in attn_only.trainable_parameters()} == {"attn"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bottleneck_size=0), "bottleneck_size must be an integer >= 1"),
        (dict(non_linearity="gelu"), r"non_linearity must be one of \['gelu_tanh', 'relu', 'silu', 'tanh'\]"),
        (dict(placement="ffn"), "placement must be one of"),
        (dict(init_weights=0), "init_weights must be True or False"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(tp.ConfigError, match=message):
        tp.AdapterConfig(**kwargs)


def test_merge_is_refused_with_the_reason():
    model = random_adapter(small(), non_linearity="tanh")
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(tp.MergeError, match=r"h \+ up\(tanh\(down\(h\)\)\) is not linear in h"):
            merge()


def test_only_the_adapters_train():
    model = tp.get_peft_model(small(), tp.AdapterConfig(bottleneck_size=3))
    assert_only_adapter_changes(model, vocab_size=37)  # zero init: the down-projection moves from step 2


def test_save_and_load_round_trip(tmp_path):
    model = random_adapter(small(), r=3, non_linearity="gelu_tanh", placement="both")
    model.save_pretrained(tmp_path)
    loaded = tp.PeftModel.from_pretrained(small(), tmp_path)
    assert loaded.peft_config["default"] == model.peft_config["default"]
    ids = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_array_equal(loaded(ids), model(ids))
    assert loaded.peft_config["default"].to_dict()["peft_type"] == "BOTTLENECK_ADAPTER"
