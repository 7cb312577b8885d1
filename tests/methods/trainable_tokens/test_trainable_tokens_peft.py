"""Trainable tokens against Hugging Face PEFT 0.21.2 on the transformers twin of the same GPT-2, in float64:
PEFT's TrainableTokensConfig (and LoRA's trainable_token_indices, the same layer inside LoRA) with our Δ copied
in by name; logits, loss and Δ's gradient agree to <= 1e-10 relative; merged weights to <= 1e-12; files
saved by either library load in the other with equal logits."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch
from hf_utils import hf_causal_lm_loss, hf_twin
from hypothesis import given, settings
from strategies import perturbed_model
from token_strategies import token_cases

import tinypeft as tp
from tinypeft import engine
from tinypeft.gradcheck import relative_error
from tinypeft.methods.trainable_tokens import DELTA, TIED_DELTA

TOL = 1e-10
MERGE_TOL = 1e-12
WTE = "transformer.wte.weight"


def peft_twin(model: tp.PeftModel) -> peft.PeftModel:
    """PEFT's model of `model`'s base and adapter, holding exactly our Δ: float64, eval mode."""
    config = peft.TrainableTokensConfig(target_modules=["wte"], token_indices=model.active.config.token_indices)
    twin = peft.get_peft_model(hf_twin(model.base_model), config)
    state = {k: torch.tensor(np.asarray(v)) for k, v in model.adapter_state_dict().items()}
    result = peft.set_peft_model_state_dict(twin, state)
    assert not result.unexpected_keys, result.unexpected_keys
    return twin.eval()


def visible_rows(mask, shape):
    return np.ones(shape, dtype=bool) if mask is None else np.cumsum(mask, axis=1) > 0


@settings(max_examples=20)
@given(token_cases())
def test_logits_loss_gradients_and_merge_match_peft(case_indices):
    case, indices = case_indices
    model = tp.get_peft_model(case.model, tp.TrainableTokensConfig(token_indices=indices, init_weights=False))
    twin = peft_twin(model)
    rows = visible_rows(case.mask, case.ids.shape)
    labels = case.labels.copy()
    labels[:, 1:][~rows[:, :-1]] = -100
    if not (labels[:, 1:] != -100).any():
        return
    view = model.view()
    out = twin(input_ids=torch.tensor(case.ids), attention_mask=None if case.mask is None else torch.tensor(case.mask))
    assert relative_error(engine.logits(view, case.ids, case.mask)[rows], out.logits.detach().numpy()[rows]) <= TOL
    loss_ref = hf_causal_lm_loss(out.logits, torch.tensor(labels))
    loss_ref.backward()
    loss, grads = engine.loss_and_grad(view, case.ids, labels, case.mask)
    assert abs(loss - loss_ref.item()) <= TOL * abs(loss_ref.item())
    peft_grads = {n.replace(".default", ""): p.grad.numpy() for n, p in twin.named_parameters() if p.requires_grad}
    assert set(peft_grads) == set(grads) == {DELTA}
    assert relative_error(grads[DELTA], peft_grads[DELTA]) <= TOL
    ours = model.merge_and_unload().params[WTE]
    theirs = twin.merge_and_unload().state_dict()[WTE]
    assert relative_error(ours, theirs.numpy()) <= MERGE_TOL


def interchange_model() -> tp.GPT:
    return perturbed_model(
        tp.GPTConfig(vocab_size=31, n_positions=16, n_embd=12, n_layer=2, n_head=3, dtype="float64"), 3
    )


IDS = np.random.default_rng(0).integers(0, 31, size=(2, 9))
IDS[0, :4] = [30, 4, 30, 17]  # trained ids, one twice


def test_our_adapter_loads_in_peft(tmp_path):
    base = interchange_model()
    model = tp.get_peft_model(base, tp.TrainableTokensConfig(token_indices=[17, 4, 30], init_weights=False))
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(hf_twin(base), tmp_path).eval()
    ref = loaded(input_ids=torch.tensor(IDS)).logits.detach().numpy()
    assert relative_error(model(IDS), ref) <= TOL
    assert relative_error(model(IDS), base(IDS)) > 1e-3  # the adapter is not the identity: the test can fail


def test_a_peft_adapter_loads_here(tmp_path):
    base = interchange_model()
    torch.manual_seed(0)
    trained = peft.get_peft_model(
        hf_twin(base), peft.TrainableTokensConfig(target_modules=["wte"], token_indices=[17, 4, 30])
    )
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    trained.save_pretrained(tmp_path)
    model = tp.PeftModel.from_pretrained(base, tmp_path)
    assert model.active.config.token_indices == [17, 4, 30]
    ref = trained.eval()(input_ids=torch.tensor(IDS)).logits.detach().numpy()
    assert relative_error(model(IDS), ref) <= TOL
    assert relative_error(model(IDS), base(IDS)) > 1e-3


def test_peft_saves_the_tied_copy_we_save():
    """The names PEFT writes, and that its two entries are one tensor."""
    base = interchange_model()
    twin = peft.get_peft_model(hf_twin(base), peft.TrainableTokensConfig(target_modules=["wte"], token_indices=[2]))
    state = peft.get_peft_model_state_dict(twin)
    assert set(state) == {DELTA, TIED_DELTA}
    ours = tp.get_peft_model(base, tp.TrainableTokensConfig(token_indices=[2])).adapter_state_dict()
    assert set(ours) == set(state)
    for k in state:
        np.testing.assert_array_equal(ours[k], state[k].numpy())


@pytest.mark.parametrize("indices", [[3], [30, 0, 12]])
def test_peft_head_reads_the_trained_rows(indices):
    """What the tied head does in PEFT, pinned apart from the rest: logits at the trained ids move with Δ."""
    base = perturbed_model(tp.GPTConfig(vocab_size=31, n_positions=16, n_embd=12, n_layer=1, n_head=3,
                                        dtype="float64"), 1)  # fmt: skip
    model = tp.get_peft_model(base, tp.TrainableTokensConfig(token_indices=indices, init_weights=False))
    twin = peft_twin(model)
    ids = np.array([[1, 2, 5]])  # no trained id is looked up: only the head reads Δ
    ids = np.where(np.isin(ids, indices), 7, ids)
    ref = twin(input_ids=torch.tensor(ids)).logits.detach().numpy()
    ours = model(ids)
    assert relative_error(ours, ref) <= TOL
    moved = np.abs(ours - base(ids)).max(axis=(0, 1)) > 0
    assert np.flatnonzero(moved).tolist() == sorted(indices)
