"""BOFT: the shared harness (hand = autograd = finite differences, engine = reference, merge = unmerged, unmerge
exact) over hypothesis-drawn models, block shapes, butterfly factors, targets, biases and padded batches; the
butterfly is a rotation; the checks catch a wrong backward; the multiplicative dropout; the identity init is
the base model; only the adapter trains. The comparisons with PEFT are in tests/hf/test_boft_peft.py."""

from __future__ import annotations

import numpy as np
import pytest
from additive_utils import assert_checks_catch, assert_gradients_check, assert_only_adapter_changes
from hypothesis import given, settings
from hypothesis import strategies as st
from orthogonal_utils import boft_kwargs
from strategies import gpt_configs, perturbed_model

import tinypeft as tp
from tinypeft.gradcheck import relative_error
from tinypeft.harness import HarnessCase, check_case
from tinypeft.methods import boft as boft_module
from tinypeft.methods import orthogonal
from tinypeft.methods.registry import Batch


@st.composite
def drawn(draw):
    cfg = draw(gpt_configs(max_layers=2, max_head_dim=6, min_embd=3))
    batch = Batch(draw(st.integers(1, 3)), draw(st.integers(2, 7)), draw(st.sampled_from(["none", "mixed", "ends"])))
    return HarnessCase("drawn", cfg, batch, draw(st.integers(0, 2**16))), draw(boft_kwargs(cfg))


@settings(max_examples=20)
@given(drawn())
def test_the_harness_passes_over_drawn_configs(case_kwargs):
    case, kwargs = case_kwargs
    report = check_case(lambda cfg: tp.BOFTConfig(**kwargs), case)
    assert not report.failures, (kwargs, report.failures)
    assert report.merge is not None and report.merge <= 1e-12


def base(n_layer=2, seed=0):
    cfg = tp.GPTConfig(vocab_size=31, n_positions=16, n_embd=16, n_layer=n_layer, n_head=2, dtype="float64")
    return perturbed_model(cfg, seed)


def small_boft(**kw):
    config = {"boft_block_size": 2, "boft_n_butterfly_factor": 3, "target_modules": ["c_attn", "mlp.c_proj"],
              "init_weights": False} | kw  # fmt: skip
    model = tp.get_peft_model(base(), tp.BOFTConfig(**config), seed=3)
    model.active.params.update({k: v * 3 if k.endswith("boft_R") else v for k, v in model.active.params.items()})
    return model


@pytest.mark.parametrize("F", [1, 2, 3, 4])
def test_the_butterfly_is_a_rotation_mixing_blocks_2_to_the_f_apart(F):
    model = small_boft(boft_n_butterfly_factor=F)
    layer = model.active.layers[0]
    R, _ = boft_module.boft_rotations_forward(model.active.params[layer.boft_R])
    M = orthogonal.butterfly_matrix(R, layer.gathers, layer.in_features)
    assert np.abs(M.T @ M - np.eye(16)).max() <= 1e-14
    # F factors of blocks of 2 couple features in groups of 2^F: M is block-diagonal at that size, and dense in it
    size = 2**F
    for i in range(0, 16, size):
        inside = M[i : i + size, i : i + size]
        assert np.abs(M[i : i + size]).sum() - np.abs(inside).sum() <= 1e-12
        assert np.count_nonzero(np.abs(inside) > 1e-12) == size * size


def test_zero_init_is_the_base_model_bit_for_bit():
    ids = np.random.default_rng(1).integers(0, 31, size=(2, 9))
    for F in (1, 2, 3):
        model = tp.get_peft_model(base(), tp.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=F,
                                                        target_modules=["c_attn", "c_fc"]))  # fmt: skip
        np.testing.assert_array_equal(model(ids), base()(ids))


BLOCK_NUM = {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 2}


@pytest.mark.parametrize(
    ("module", "function", "kw"),
    [
        (boft_module, "boft_rotations_backward", {}),
        (boft_module, "butterfly_backward", {}),
        (boft_module, "boft_backward", {"bias": "all"}),
        (boft_module, "cayley_backward", {"boft_n_butterfly_factor": 1}),
        (boft_module, "skew_part_backward", {}),
        (orthogonal, "block_rotate_backward", BLOCK_NUM),
    ],
)
def test_checks_catch_a_wrong_backward(monkeypatch, module, function, kw):
    model = small_boft(**kw)
    ids = np.random.default_rng(0).integers(0, 31, size=(2, 6))
    assert_checks_catch(monkeypatch, module, function, model, ids, ids)


def test_dropout_turns_blocks_of_one_factor_into_the_identity_and_its_gradient_checks():
    """PEFT's multiplicative dropout in training: in one random factor, int(p · D) random blocks become I, so
    they get no gradient; the masks are drawn once per forward and shared by its backward and the checks."""
    mask = boft_module.dropout_blocks((5, 0), 3, 8, 0.5, "float64")
    assert mask.shape == (3, 8, 1, 1) and mask.sum() == 4 and np.count_nonzero(mask.sum(axis=(1, 2, 3))) == 1
    model = small_boft(boft_dropout=0.5).train()
    ids = np.random.default_rng(0).integers(0, 31, size=(2, 6))
    assert_gradients_check(model, ids, labels=ids)
    view = model.view()
    site = view.sites.linear["transformer.h.0.attn.c_attn"]
    layer = model.active.layers[0]
    drop = boft_module.dropout_blocks((site.dropout_key, 0), 3, layer.block_num, 0.5, "float64")
    _, grads = model.loss_and_grad(ids, ids)  # a new draw: compare structure, not the same blocks
    dR = grads[layer.boft_R]
    assert np.count_nonzero(np.abs(dR).sum(axis=(2, 3)) == 0) == int(0.5 * layer.block_num)
    x = np.random.default_rng(2).standard_normal((2, 3, 16))
    y, _ = site.forward(view.params, layer.module, x)
    X = view.params[layer.boft_R]
    held = np.where(drop.astype(bool), 0.0, X)  # a dropped block: X = 0, whose Cayley transform is I
    R, _ = boft_module.boft_rotations_forward(held)
    expected, _ = boft_module.boft_forward(x, view.params[layer.weight], view.params[layer.bias], R,
                                           layer.gathers, view.params[layer.boft_s])  # fmt: skip
    assert relative_error(y, expected) <= 1e-14
    np.testing.assert_array_equal(model.eval()(ids), model.eval()(ids))  # no dropout in evaluation


def test_only_the_adapter_trains():
    assert_only_adapter_changes(small_boft(bias="boft_only"), 31)


def test_save_and_load_round_trip(tmp_path):
    model = small_boft(bias="all")
    model.save_pretrained(tmp_path)
    again = tp.PeftModel.from_pretrained(model.base_model, tmp_path)
    ids = np.arange(12).reshape(2, 6)
    np.testing.assert_array_equal(again(ids), model(ids))
    assert again.peft_config["default"] == model.peft_config["default"]
