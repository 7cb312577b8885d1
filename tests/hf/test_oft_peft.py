"""OFT against peft 0.21.2 + transformers in float64, on the GPT-2 twin whose Conv1D layers are nn.Linear
(tests/linear_gpt2.py): PEFT applies OFT to nn.Linear only and refuses GPT-2's Conv1D (pinned below).

Over hypothesis-drawn models, block shapes (oft_block_size or r), targets, the exact Cayley transform and
PEFT's Neumann series, COFT, block sharing, biases and padded batches, with the skew parameters away from
zero (PEFT's init is the identity rotation): logits, loss and every trainable gradient agree to <= 1e-10
relative (measured ~1e-15). Also: the Neumann series term for term, merged weights, files both ways, and
COFT's projected training steps.
"""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch
from hf_utils import hf_causal_lm_loss, hf_twin, linear_twin, torch_float64
from hypothesis import assume, given, settings
from linear_gpt2 import (
    compare_with_peft,
    peft_linear_twin,
    peft_trainable,
    without_unseen_predictions,
)
from orthogonal_utils import oft_kwargs
from peft.tuners.oft.layer import OFTRotationModule
from strategies import cases, perturbed_model

import tinypeft as tp
from tinypeft.gradcheck import relative_error
from tinypeft.methods import oft as oft_module
from tinypeft.methods import orthogonal
from tinypeft.optim import SGD

TOL = 1e-10
IDS = np.array([[3, 1, 4, 1, 5, 9, 2], [2, 6, 5, 3, 5, 8, 9]])


def away_from_identity(model: tp.PeftModel, seed: int, scale: float = 0.3) -> tp.PeftModel:
    rng = np.random.default_rng(seed)
    model.active.params.update({k: v + scale * rng.standard_normal(v.shape) for k, v in model.active.params.items()})
    return model


@settings(max_examples=20)
@given(cases(min_len=2, max_layers=2, max_head_dim=6, min_embd=3).flatmap(
    lambda case: oft_kwargs(case.model.config).map(lambda kw: (case, kw))))  # fmt: skip
def test_oft_matches_peft(case_kwargs):
    case, kwargs = case_kwargs
    ours = away_from_identity(tp.get_peft_model(case.model, tp.OFTConfig(**kwargs), seed=case.seed), case.seed)
    assume(not kwargs["coft"] or all(radius_agrees(kwargs["eps"], layer.stored_blocks) for layer in ours.active.layers))
    pm = peft_linear_twin(ours, peft.OFTConfig(task_type="CAUSAL_LM", **kwargs))
    labels = without_unseen_predictions(case.labels, case.mask)
    if not (labels[:, 1:] != -100).any():
        return
    diffs = compare_with_peft(ours, pm, case.ids, labels, case.mask)
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, (kwargs, bad)


def test_peft_refuses_oft_on_gpt2_s_conv1d():
    """Why the comparisons run on the nn.Linear twin (docs/oft.md says so)."""
    base = perturbed_model(
        tp.GPTConfig(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2, dtype="float64"), 0
    )
    with pytest.raises(TypeError, match="not supported"):
        peft.get_peft_model(hf_twin(base), peft.OFTConfig(oft_block_size=4, target_modules=["c_attn"]))


@pytest.mark.parametrize("terms", [2, 3, 4, 5, 6, 8, None])
def test_the_cayley_forms_are_peft_s(terms):
    """tinypeft's rotation blocks equal PEFT's `_cayley_batch` (the Neumann series for `terms`, the exact solve
    for None), from the same upper triangles."""
    b = 6
    q = torch.randn(3, b * (b - 1) // 2, dtype=torch.float64, generator=torch.Generator().manual_seed(terms or 0))
    module = OFTRotationModule(3, q.shape[1], b, 3 * b)
    theirs = module._cayley_batch(q, b, terms is not None, terms or 5).numpy()
    ours, _ = oft_module.oft_rotation_forward(q.numpy(), b, None, terms)
    assert relative_error(ours, theirs) <= 1e-15


def torch_radius(eps: float, n_blocks: int) -> float:
    """PEFT's COFT radius, computed as PEFT computes it (under torch's default dtype, float32)."""
    return float(eps * 1 / torch.sqrt(torch.tensor(n_blocks)))


def radius_agrees(eps: float, n_blocks: int) -> bool:
    return orthogonal.coft_block_eps(eps, n_blocks) == torch_radius(eps, n_blocks)


def test_coft_radius_is_peft_s_but_for_torch_s_float32_sqrt():
    """The radius eps/√n in float32, as PEFT's; where torch's float32 √n is not correctly rounded (on this CPU,
    for n = 19, 34, 37, ...), PEFT's radius is one or two float32 units from ours, and only there."""
    for eps in (6e-5, 0.05, 0.3, 5.0):
        for n in range(1, 200):
            ours, theirs = orthogonal.coft_block_eps(eps, n), torch_radius(eps, n)
            torch_sqrt = float(torch.sqrt(torch.tensor(n)))
            if torch_sqrt == float(np.sqrt(np.float32(n))):
                assert ours == theirs, (eps, n)
            else:
                assert abs(ours - theirs) <= 2 * np.spacing(np.float32(theirs)), (eps, n)


def test_coft_projection_is_peft_s():
    q = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.2
    q[1] *= 1e-4  # one block inside the ball: kept
    module = OFTRotationModule(4, 10, 5, 20, coft=True, eps=0.3)
    theirs = module._project_batch(q.clone(), eps=0.3).numpy()  # under torch's default (float32) dtype
    ours = orthogonal.coft_project(q.numpy(), orthogonal.coft_block_eps(0.3, 4))
    assert relative_error(ours, theirs) <= 1e-15
    np.testing.assert_array_equal(ours[1], q[1].numpy())


MERGE_CONFIGS = {
    "neumann": dict(oft_block_size=4, target_modules=["c_attn", "mlp.c_proj"]),
    "exact_shared_coft": dict(oft_block_size=3, use_cayley_neumann=False, block_share=True, coft=True, eps=0.4,
                              target_modules=["c_fc", "attn.c_proj"]),
    "r_given_bias": dict(r=2, oft_block_size=0, bias="oft_only", target_modules=["c_attn", "c_fc"]),
}  # fmt: skip


def small_base(seed=3):
    return perturbed_model(
        tp.GPTConfig(vocab_size=64, n_positions=16, n_embd=12, n_layer=2, n_head=3, dtype="float64"), seed
    )


@pytest.mark.parametrize("name", sorted(MERGE_CONFIGS))
def test_merged_weights_are_peft_s(name):
    kwargs = MERGE_CONFIGS[name]
    ours = away_from_identity(tp.get_peft_model(small_base(), tp.OFTConfig(init_weights=False, **kwargs)), 5)
    pm = peft_linear_twin(ours, peft.OFTConfig(task_type="CAUSAL_LM", init_weights=False, **kwargs))
    merged = ours.merge_and_unload()
    pm.merge_adapter()
    theirs = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()}
    for module in [layer.module for layer in ours.active.layers]:
        W = theirs[module + ".base_layer.weight"].numpy().T  # nn.Linear's (out, in) -> GPT-2's (in, out)
        assert relative_error(merged.params[module + ".weight"], W) <= 1e-14, module
    assert relative_error(merged(IDS), pm(input_ids=torch.tensor(IDS)).logits.detach().numpy()) <= TOL


@pytest.mark.parametrize("name", sorted(MERGE_CONFIGS))
def test_our_adapter_loads_in_peft(tmp_path, name):
    kwargs = MERGE_CONFIGS[name]
    ours = away_from_identity(tp.get_peft_model(small_base(), tp.OFTConfig(init_weights=False, **kwargs)), 6)
    ours.save_pretrained(tmp_path)
    with torch_float64():
        pm = peft.PeftModel.from_pretrained(linear_twin(small_base()), tmp_path).eval()
    assert pm.peft_config["default"].peft_type == "OFT"
    with torch.no_grad():
        assert relative_error(ours(IDS), pm(input_ids=torch.tensor(IDS)).logits.numpy()) <= TOL


@pytest.mark.parametrize("name", sorted(MERGE_CONFIGS))
def test_peft_adapter_loads_here(tmp_path, name):
    torch.manual_seed(7)
    with torch_float64():
        config = peft.OFTConfig(task_type="CAUSAL_LM", init_weights=False, **MERGE_CONFIGS[name])
        pm = peft.get_peft_model(linear_twin(small_base()), config).eval()
    pm.save_pretrained(tmp_path)
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(IDS)).logits.numpy()
    ours = tp.PeftModel.from_pretrained(small_base(), tmp_path)
    assert relative_error(ours(IDS), theirs) <= TOL
    again = tp.get_peft_model(small_base(), ours.peft_config["default"])
    again.load_adapter_state_dict(peft.get_peft_model_state_dict(pm))
    assert relative_error(again(IDS), theirs) <= TOL


def test_zero_init_is_peft_s():
    kwargs = dict(oft_block_size=4, target_modules=["c_attn", "mlp.c_proj"], bias="oft_only")
    ours = tp.get_peft_model(small_base(), tp.OFTConfig(**kwargs))
    with torch_float64():
        pm = peft.get_peft_model(linear_twin(small_base()), peft.OFTConfig(**kwargs))
    theirs = peft.get_peft_model_state_dict(pm)
    state = ours.adapter_state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for k, v in state.items():
        np.testing.assert_array_equal(v, theirs[k].numpy())


def train_both(ours: tp.PeftModel, pm, steps: int, lr: float = 0.5) -> float:
    """SGD steps on the same batches, tinypeft in training mode; the largest difference of the stored skew
    parameters after each step."""
    opt, torch_opt = SGD(lr), torch.optim.SGD(list(peft_trainable(pm).values()), lr=lr)
    pm.train()
    worst = 0.0
    rng = np.random.default_rng(0)
    for _ in range(steps):
        ids = rng.integers(0, 64, size=(2, 8))
        _, grads = ours.loss_and_grad(ids, ids)
        opt.step(ours.trainable_parameters(), grads)
        torch_opt.zero_grad()
        hf_causal_lm_loss(pm(input_ids=torch.tensor(ids)).logits, torch.tensor(ids)).backward()
        torch_opt.step()
        for name, p in peft_trainable(pm).items():
            worst = max(worst, relative_error(ours.trainable_parameters()[name.replace(".default.", ".")],
                                              p.detach().numpy()))  # fmt: skip
    return worst


def test_coft_training_takes_peft_s_projected_steps():
    """PEFT writes the projection into the parameter at every forward, so each step starts from the projected
    value; a training forward here does the same (OFTAdapter.sites). Without it (an evaluation-mode forward, which
    leaves the stored tensor alone) the steps start elsewhere and the runs part."""
    kwargs = dict(oft_block_size=4, target_modules=["c_attn", "c_fc"], coft=True, eps=0.05, init_weights=False)
    for train_mode, agrees in ((True, True), (False, False)):
        ours = away_from_identity(tp.get_peft_model(small_base(), tp.OFTConfig(**kwargs)), 8, scale=0.02)
        pm = peft_linear_twin(ours, peft.OFTConfig(task_type="CAUSAL_LM", **kwargs))
        ours.train(train_mode)
        worst = train_both(ours, pm, steps=4)
        assert (worst <= TOL) == agrees, (train_mode, worst)
