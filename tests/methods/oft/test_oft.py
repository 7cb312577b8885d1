"""OFT: the shared harness (hand = autograd = finite differences, engine = reference, merge = unmerged, unmerge
exact) over hypothesis-drawn models, block shapes, Cayley forms, COFT, block sharing, biases and padded batches;
the Cayley step alone; the checks catch a wrong backward; COFT's gradient is the straight-through one PEFT takes;
the zero init is the base model; only the adapter trains. The comparisons with PEFT are in tests/hf/test_oft_peft.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from additive_utils import assert_checks_catch, assert_only_adapter_changes
from hypothesis import given, settings
from hypothesis import strategies as st
from orthogonal_utils import oft_kwargs
from strategies import gpt_configs, perturbed_model

import tinypeft as tp
from tinypeft.gradcheck import check_gradients, relative_error
from tinypeft.harness import HarnessCase, check_case
from tinypeft.methods import oft as oft_module
from tinypeft.methods import orthogonal
from tinypeft.methods.registry import Batch


@st.composite
def drawn(draw):
    cfg = draw(gpt_configs(max_layers=2, max_head_dim=6, min_embd=3))
    batch = Batch(draw(st.integers(1, 3)), draw(st.integers(2, 7)), draw(st.sampled_from(["none", "mixed", "ends"])))
    return HarnessCase("drawn", cfg, batch, draw(st.integers(0, 2**16))), draw(oft_kwargs(cfg))


@settings(max_examples=20)
@given(drawn())
def test_the_harness_passes_over_drawn_configs(case_kwargs):
    case, kwargs = case_kwargs
    report = check_case(lambda cfg: tp.OFTConfig(**kwargs), case)
    assert not report.failures, (kwargs, report.failures)
    assert report.merge is not None and report.merge <= 1e-12


# ------------------------------------------------------------------ the Cayley step alone
@pytest.mark.parametrize("b", [2, 3, 5, 8])
def test_cayley_is_orthogonal_and_its_backward_is_the_derivative(b):
    rng = np.random.default_rng(b)
    q = rng.standard_normal((3, b * (b - 1) // 2))
    S = orthogonal.skew_from_upper_forward(q, b)
    np.testing.assert_array_equal(S, -S.swapaxes(1, 2))
    R, cache = orthogonal.cayley_forward(S)
    eye = np.eye(b)
    assert np.abs(R @ R.swapaxes(1, 2) - eye).max() <= 1e-14  # exactly orthogonal up to rounding
    assert relative_error(R, (eye - S) @ np.linalg.inv(eye + S)) <= 1e-14
    G = rng.standard_normal(R.shape)  # L = <G, R(S(q))>: the hand dq against central differences
    dq = orthogonal.skew_from_upper_backward(orthogonal.cayley_backward(G, cache))
    u = rng.standard_normal(q.shape)
    h = 1e-5

    def loss(qq):
        return np.sum(G * orthogonal.cayley_forward(orthogonal.skew_from_upper_forward(qq, b))[0])

    fd = (loss(q + h * u) - loss(q - h * u)) / (2 * h)
    assert abs(fd - np.sum(dq * u)) <= 1e-8 * np.abs(dq).sum()


def test_zero_skew_is_the_identity_rotation_and_the_base_model_bit_for_bit():
    base = perturbed_model(
        tp.GPTConfig(vocab_size=29, n_positions=16, n_embd=12, n_layer=2, n_head=3, dtype="float64"), 0
    )
    ids = np.random.default_rng(1).integers(0, 29, size=(2, 9))
    for neumann in (True, False):
        model = tp.get_peft_model(
            base, tp.OFTConfig(oft_block_size=4, use_cayley_neumann=neumann, target_modules=["c_attn", "c_fc"])
        )
        np.testing.assert_array_equal(model(ids), base(ids))


def test_neumann_coefficients_follow_peft_s_loop():
    """2 terms: I + 2S; 3 and 4 terms both the cubic (PEFT's loop adds nothing for 4); 5: up to S^4."""
    assert orthogonal.neumann_coefficients(2) == (1, 2)
    assert orthogonal.neumann_coefficients(3) == orthogonal.neumann_coefficients(4) == (1, 2, 2, 1)
    assert orthogonal.neumann_coefficients(5) == (1, 2, 2, 2, 1)
    assert orthogonal.neumann_coefficients(7) == (1, 2, 2, 2, 2, 2, 1)


# ------------------------------------------------------------------ the checks catch a wrong formula
def small_oft(**kw):
    base = perturbed_model(
        tp.GPTConfig(vocab_size=31, n_positions=16, n_embd=12, n_layer=2, n_head=3, dtype="float64"), 0
    )
    config = tp.OFTConfig(
        **{"oft_block_size": 4, "target_modules": ["c_attn", "mlp.c_proj"], "init_weights": False} | kw
    )
    model = tp.get_peft_model(base, config, seed=3)
    model.active.params.update({k: v * 3 for k, v in model.active.params.items()})  # a rotation well off I
    return model


@pytest.mark.parametrize(
    ("module", "function", "kw"),
    [
        (oft_module, "oft_rotation_backward", {}),
        (oft_module, "cayley_backward", {"use_cayley_neumann": False}),
        (oft_module, "neumann_backward", {}),
        (oft_module, "skew_from_upper_backward", {}),
        (oft_module, "block_rotate_backward", {"block_share": True}),
        (oft_module, "oft_backward", {"bias": "all", "use_cayley_neumann": False}),
    ],
)
def test_checks_catch_a_wrong_backward(monkeypatch, module, function, kw):
    model = small_oft(**kw)
    ids = np.random.default_rng(0).integers(0, 31, size=(2, 6))
    assert_checks_catch(monkeypatch, module, function, model, ids, ids)


# ------------------------------------------------------------------ COFT
def test_coft_gradient_is_straight_through_not_the_projection_s_derivative():
    """PEFT projects q under no_grad and differentiates at the projected value: the hand gradient is that one.
    It equals autograd's (which differentiates the same stopped forward) and central differences of the forward
    with the shift held fixed (the harness's holding_norms), but not central differences of the projected
    forward itself, whose derivative also carries the projection's (eps / ‖S‖)(I − ...) factor."""
    model = small_oft(coft=True, eps=0.1)
    ids = np.random.default_rng(2).integers(0, 31, size=(2, 6))
    report = check_gradients(model, ids, labels=ids)
    names = [n for n in report if n.endswith("oft_R.weight")]
    assert all(report[n]["autograd"] <= 1e-10 for n in names)
    assert all(report[n]["directional"] > 1e-3 for n in names)  # not the derivative of proj ∘ forward
    case = HarnessCase("coft", model.base_model.config, Batch(2, 6), 0)
    held = check_case(lambda cfg: tp.OFTConfig(oft_block_size=4, target_modules=["c_attn", "mlp.c_proj"], coft=True,
                                               eps=0.1, init_weights=False), case)  # fmt: skip
    assert not held.failures, held.failures


def test_coft_projects_onto_the_ball_and_a_training_forward_writes_it_back():
    model = small_oft(coft=True, eps=0.2)
    adapter = model.active
    layer = adapter.layers[0]
    q = adapter.params[layer.oft_R].copy()
    eps_block = orthogonal.coft_block_eps(0.2, layer.stored_blocks)
    assert eps_block == np.float32(0.2) * (1 / np.sqrt(np.float32(layer.stored_blocks)))  # float32, as PEFT
    projected = orthogonal.coft_project(q, eps_block)
    norms = np.sqrt(2) * np.linalg.norm(projected, axis=1)
    assert np.all(np.abs(norms - eps_block) <= 1e-15)  # every block was outside: now on the sphere
    model.eval().view()
    np.testing.assert_array_equal(adapter.params[layer.oft_R], q)  # evaluation leaves the tensor alone
    model.train().view()
    np.testing.assert_array_equal(adapter.params[layer.oft_R], projected)
    inside = orthogonal.coft_project(0.5 * projected, eps_block)
    np.testing.assert_array_equal(inside, 0.5 * projected)  # inside the ball: kept exactly


# ------------------------------------------------------------------ merge, training, files
def test_exact_rotation_is_undone_by_its_transpose_and_neumann_s_is_not():
    """Why unmerge restores the original arrays rather than multiplying by Rᵀ: with the exact Cayley R, Rᵀ (R W)
    gives W back to ~1e-15 in float64; the Neumann R (PEFT's default) is not orthogonal, and Rᵀ misses."""
    for neumann, low, high in ((False, 0.0, 1e-14), (True, 1e-6, 1.0)):
        model = small_oft(use_cayley_neumann=neumann)
        adapter, layer = model.active, model.active.layers[0]
        R, _ = oft_module.oft_rotation_forward(adapter.params[layer.oft_R], layer.block_size, None,
                                               adapter.neumann_terms())  # fmt: skip
        M = orthogonal.block_diagonal_matrix(R, layer.in_features)
        W = model.base_model.params[layer.weight]
        assert low <= relative_error(M.T @ (M @ W), W) <= high


def test_only_the_adapter_trains():
    model = small_oft(bias="oft_only", coft=True, eps=5.0)
    assert_only_adapter_changes(model, 31)


def test_save_and_load_round_trip(tmp_path):
    model = small_oft(block_share=True, bias="all")
    model.save_pretrained(tmp_path)
    again = tp.PeftModel.from_pretrained(model.base_model, tmp_path)
    ids = np.arange(12).reshape(2, 6)
    np.testing.assert_array_equal(again(ids), model(ids))
    assert again.peft_config["default"] == model.peft_config["default"]


def test_module_dropout_is_accepted_warned_about_and_not_applied():
    with pytest.warns(UserWarning, match="never applies"):
        config = tp.OFTConfig(oft_block_size=4, module_dropout=0.5, init_weights=False)
    base = perturbed_model(
        tp.GPTConfig(vocab_size=31, n_positions=16, n_embd=12, n_layer=1, n_head=3, dtype="float64"), 0
    )
    model = tp.get_peft_model(base, config)
    ids = np.arange(12).reshape(2, 6)
    np.testing.assert_array_equal(model.train()(ids), model.eval()(ids))
