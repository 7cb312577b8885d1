"""P-tuning's prompt encoder (MLP and bidirectional LSTM): gradients three ways over hypothesis-drawn
models and encoders, the LSTM's backward through time against autograd on its own, the encoder's
output against torch.nn.LSTM / the MLP in float64, and the file's table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from additive_utils import assert_gradients_check, virtual_token_cases
from hypothesis import given, settings
from hypothesis import strategies as st

import tinypeft as tp
from tinypeft.gradcheck import relative_error
from tinypeft.methods.ptuning import (
    EMBEDDING,
    head_names,
    lstm_direction_backward,
    lstm_direction_forward,
    lstm_names,
    prompt_encoder_forward,
)


@st.composite
def encoder_configs(draw, NV: int):
    kind = draw(st.sampled_from(["MLP", "LSTM"]))
    return tp.PromptEncoderConfig(
        num_virtual_tokens=NV,
        encoder_reparameterization_type=kind,
        encoder_hidden_size=draw(st.integers(1, 6)),
        encoder_num_layers=draw(st.integers(1, 3)),
    )


def perturb(model: tp.PeftModel, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, value in model.active.params.items():
        model.active.params[name] = value + 0.3 * rng.standard_normal(value.shape)


@settings(max_examples=20, deadline=None)
@given(case_nv=virtual_token_cases(max_len=8, min_embd=3), data=st.data())
def test_gradients_three_ways(case_nv, data):
    case, NV = case_nv
    NV = min(NV, 6)
    config = data.draw(encoder_configs(NV))
    model = tp.get_peft_model(case.model, config, seed=case.seed)
    perturb(model, case.seed)
    report = assert_gradients_check(model, case.ids, case.labels, case.mask)
    assert EMBEDDING in report


@pytest.mark.parametrize("reverse", [False, True])
def test_the_lstm_backward_through_time_is_autograd_s(reverse):
    """One direction alone, every output position weighted: dx, dW_ih, dW_hh and db to 1e-12."""
    import autograd
    import autograd.numpy as anp

    rng = np.random.default_rng(0)
    T, n_in, H = 6, 4, 3
    x, W_ih, W_hh = rng.standard_normal((T, n_in)), rng.standard_normal((4 * H, n_in)), rng.standard_normal((4 * H, H))
    b_ih, b_hh, weights = rng.standard_normal(4 * H), rng.standard_normal(4 * H), rng.standard_normal((T, H))

    def loss(x, W_ih, W_hh, b_ih, b_hh):
        return anp.sum(lstm_direction_forward(x, W_ih, W_hh, b_ih, b_hh, reverse)[0] * weights)

    expected = autograd.grad(loss, argnum=(0, 1, 2, 3, 4))(x, W_ih, W_hh, b_ih, b_hh)
    _, cache = lstm_direction_forward(x, W_ih, W_hh, b_ih, b_hh, reverse)
    dx, dW_ih, dW_hh, db = lstm_direction_backward(weights, cache)
    for got, want in zip((dx, dW_ih, dW_hh, db, db), expected, strict=True):
        assert relative_error(got, want) <= 1e-12


@pytest.mark.parametrize("n_layers", [1, 2])
def test_the_lstm_encoder_is_torch_s(n_layers):
    """The same tensors in torch.nn.LSTM(bidirectional, batch_first) + the head: the same P, float64."""
    base = tp.GPT(tp.GPTConfig(n_layer=1, n_embd=6, n_head=2, vocab_size=20, n_positions=16, dtype="float64"))
    config = tp.PromptEncoderConfig(
        num_virtual_tokens=5, encoder_reparameterization_type="LSTM", encoder_hidden_size=4, encoder_num_layers=n_layers
    )
    adapter = tp.get_peft_model(base, config, seed=3).active
    lstm = torch.nn.LSTM(6, 4, num_layers=n_layers, bidirectional=True, batch_first=True).double()
    with torch.no_grad():
        for layer in range(n_layers):
            for reverse in (False, True):
                for name in lstm_names(layer, reverse):
                    getattr(lstm, name.rsplit(".", 1)[1]).copy_(torch.tensor(adapter.params[name]))
        out = lstm(torch.tensor(adapter.params[EMBEDDING])[None])[0][0]
        (w0, b0), (w2, b2) = (
            (torch.tensor(adapter.params[w]), torch.tensor(adapter.params[b])) for w, b in head_names(2)
        )
        expected = torch.relu(out @ w0.T + b0) @ w2.T + b2
    P, _ = prompt_encoder_forward(adapter.params, "LSTM", n_layers)
    assert relative_error(P, expected.numpy()) <= 1e-13


def test_the_saved_table_is_the_encoder_s_output_and_loads_as_the_same_model(tmp_path):
    base = tp.GPT(tp.GPTConfig(n_layer=2, n_embd=8, n_head=2, vocab_size=30, n_positions=16, dtype="float64"), seed=1)
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    for kind in ("MLP", "LSTM"):
        model = tp.get_peft_model(
            base, tp.PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type=kind)
        )
        model.save_pretrained(tmp_path / kind)
        loaded = tp.PeftModel.from_pretrained(base, tmp_path / kind)
        assert set(loaded.active.params) == {"prompt_embeddings"}
        np.testing.assert_array_equal(loaded.active.params["prompt_embeddings"], model.active.table())
        assert relative_error(loaded(ids), model(ids)) <= 1e-13
        # the loaded table trains as prompt tuning's does
        loss, grads = loaded.loss_and_grad(ids, ids)
        assert set(grads) == {"prompt_embeddings"} and np.isfinite(loss)
