"""BOFT against peft 0.21.2 + transformers in float64, on the GPT-2 twin whose Conv1D layers are nn.Linear
(tests/linear_gpt2.py): PEFT applies BOFT to nn.Linear only.

PEFT computes more than one butterfly factor only with its CUDA extension (fbd_cuda); without it, as on this
CPU, it warns and makes one factor whatever boft_n_butterfly_factor says (pinned below). The comparisons with
F > 1 run PEFT with the extension's block-diagonal kernel stood in for in torch (orthogonal_utils.fake_fbd_cuda,
the kernel's contract read from peft/tuners/boft/fbd/fbd_cuda_kernel.cu); those with F = 1 run PEFT's own CPU
path too. Over hypothesis-drawn models, block shapes, factors, targets, biases and padded batches: logits, loss
and every trainable gradient agree to <= 1e-10 relative. Also: the permutations, merged weights, the init, and
files both ways.
"""

from __future__ import annotations

import warnings

import numpy as np
import peft
import pytest
import torch
from hf_utils import linear_twin, torch_float64
from hypothesis import given, settings
from linear_gpt2 import (
    compare_with_peft,
    peft_linear_twin,
    without_unseen_predictions,
)
from orthogonal_utils import _TorchBlockDiag, boft_kwargs
from peft.tuners.boft.layer import BOFTLayer
from strategies import cases, perturbed_model

import tinypeft as tp
from tinypeft.gradcheck import relative_error
from tinypeft.methods import orthogonal

TOL = 1e-10
IDS = np.array([[3, 1, 4, 1, 5, 9, 2], [2, 6, 5, 3, 5, 8, 9]])


@pytest.fixture
def cuda_kernel(monkeypatch):
    """PEFT's BOFT as if its CUDA extension had built (it is looked up at construction and at every call)."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _TorchBlockDiag())


def away_from_identity(model: tp.PeftModel, seed: int, scale: float = 0.3) -> tp.PeftModel:
    rng = np.random.default_rng(seed)
    model.active.params.update({k: v + scale * rng.standard_normal(v.shape) for k, v in model.active.params.items()})
    return model


def check_against_peft(case, kwargs) -> None:
    ours = away_from_identity(tp.get_peft_model(case.model, tp.BOFTConfig(**kwargs), seed=case.seed), case.seed)
    pm = peft_linear_twin(ours, peft.BOFTConfig(task_type="CAUSAL_LM", **kwargs))
    labels = without_unseen_predictions(case.labels, case.mask)
    if not (labels[:, 1:] != -100).any():
        return
    diffs = compare_with_peft(ours, pm, case.ids, labels, case.mask)
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, (kwargs, bad)


@settings(max_examples=20)
@given(cases(min_len=2, max_layers=2, max_head_dim=6, min_embd=3).flatmap(
    lambda case: boft_kwargs(case.model.config).map(lambda kw: (case, kw))))  # fmt: skip
def test_boft_matches_peft_with_its_cuda_kernel(case_kwargs):
    import peft.tuners.boft.layer as boft_layer

    saved, boft_layer._FBD_CUDA = boft_layer._FBD_CUDA, _TorchBlockDiag()  # (a fixture would not reset per example)
    try:
        check_against_peft(*case_kwargs)
    finally:
        boft_layer._FBD_CUDA = saved


@settings(max_examples=10)
@given(cases(min_len=2, max_layers=2, max_head_dim=6, min_embd=3).flatmap(
    lambda case: boft_kwargs(case.model.config).map(lambda kw: (case, kw))))  # fmt: skip
def test_one_factor_boft_matches_peft_s_cpu_path(case_kwargs):
    case, kwargs = case_kwargs
    kwargs = {**kwargs, "boft_n_butterfly_factor": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Failed to load the CUDA extension"
        check_against_peft(case, kwargs)


def small_base(seed=3):
    return perturbed_model(
        tp.GPTConfig(vocab_size=64, n_positions=16, n_embd=12, n_layer=2, n_head=3, dtype="float64"), seed
    )


def test_peft_without_its_cuda_extension_makes_one_factor():
    """Why an adapter of 2+ factors loads in PEFT only where the extension builds (docs/oft.md)."""
    with warnings.catch_warnings(record=True) as caught, torch_float64():
        warnings.simplefilter("always")
        config = peft.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=["c_attn"])
        pm = peft.get_peft_model(linear_twin(small_base()), config)
    assert any("Setting boft_n_butterfly_factor to 1" in str(w.message) for w in caught)
    (shape,) = {tuple(v.shape) for k, v in peft.get_peft_model_state_dict(pm).items() if k.endswith("boft_R")}
    assert shape == (1, 6, 2, 2)
    ours = tp.get_peft_model(small_base(), tp.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2))
    assert ours.active.params["base_model.model.transformer.h.0.attn.c_attn.boft_R"].shape == (2, 6, 2, 2)


PERMUTATION_SHAPES = [(8, 4, 2, 2), (8, 2, 4, 2), (16, 8, 2, 3), (24, 6, 4, 2), (32, 8, 4, 3), (48, 12, 4, 3),
                      (12, 6, 2, 2), (64, 16, 4, 4)]  # fmt: skip


@pytest.mark.parametrize(("n", "D", "H", "F"), PERMUTATION_SHAPES)
def test_butterfly_permutations_are_peft_s(n, D, H, F):
    ours = orthogonal.butterfly_permutations(n, D, H, F)
    for f, perm in enumerate(ours):
        theirs = BOFTLayer.block_butterfly_perm(None, n, int(D / 2**f), int(H / 2), F - 1).numpy()
        np.testing.assert_array_equal(perm, theirs)
    assert sorted(ours[0]) == list(range(n)) and all(sorted(p) == list(range(n)) for p in ours)


MERGE_CONFIGS = {
    "one_factor": dict(boft_block_size=3, target_modules=["c_attn", "mlp.c_proj"]),
    "butterfly": dict(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=["c_fc", "attn.c_proj"],
                      bias="boft_only"),
    "block_num": dict(boft_block_size=0, boft_block_num=12, boft_n_butterfly_factor=3, target_modules=["mlp.c_proj"]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MERGE_CONFIGS))
def test_merged_weights_are_peft_s(cuda_kernel, name):
    kwargs = MERGE_CONFIGS[name]
    ours = away_from_identity(tp.get_peft_model(small_base(), tp.BOFTConfig(init_weights=False, **kwargs)), 5)
    pm = peft_linear_twin(ours, peft.BOFTConfig(task_type="CAUSAL_LM", init_weights=False, **kwargs))
    merged = ours.merge_and_unload()
    pm.merge_adapter()
    theirs = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()}
    for module in [layer.module for layer in ours.active.layers]:
        W = theirs[module + ".base_layer.weight"].numpy().T  # nn.Linear's (out, in) -> GPT-2's (in, out)
        assert relative_error(merged.params[module + ".weight"], W) <= 1e-14, module
    assert relative_error(merged(IDS), pm(input_ids=torch.tensor(IDS)).logits.detach().numpy()) <= TOL


@pytest.mark.parametrize("name", sorted(MERGE_CONFIGS))
def test_our_adapter_loads_in_peft(cuda_kernel, tmp_path, name):
    ours = away_from_identity(
        tp.get_peft_model(small_base(), tp.BOFTConfig(init_weights=False, **MERGE_CONFIGS[name])), 6
    )
    ours.save_pretrained(tmp_path)
    with torch_float64():
        pm = peft.PeftModel.from_pretrained(linear_twin(small_base()), tmp_path).eval()
    assert pm.peft_config["default"].peft_type == "BOFT"
    with torch.no_grad():
        assert relative_error(ours(IDS), pm(input_ids=torch.tensor(IDS)).logits.numpy()) <= TOL


@pytest.mark.parametrize("name", sorted(MERGE_CONFIGS))
def test_peft_adapter_loads_here(cuda_kernel, tmp_path, name):
    torch.manual_seed(7)
    with torch_float64():
        config = peft.BOFTConfig(task_type="CAUSAL_LM", init_weights=False, **MERGE_CONFIGS[name])
        pm = peft.get_peft_model(linear_twin(small_base()), config).eval()
    pm.save_pretrained(tmp_path)
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(IDS)).logits.numpy()
    ours = tp.PeftModel.from_pretrained(small_base(), tmp_path)
    assert relative_error(ours(IDS), theirs) <= TOL
    again = tp.get_peft_model(small_base(), ours.peft_config["default"])
    again.load_adapter_state_dict(peft.get_peft_model_state_dict(pm))
    assert relative_error(again(IDS), theirs) <= TOL


def test_identity_init_is_peft_s(cuda_kernel):
    kwargs = dict(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=["c_attn", "mlp.c_proj"], bias="all")
    ours = tp.get_peft_model(small_base(), tp.BOFTConfig(**kwargs))
    with torch_float64():
        pm = peft.get_peft_model(linear_twin(small_base()), peft.BOFTConfig(**kwargs))
    theirs = peft.get_peft_model_state_dict(pm)
    state = ours.adapter_state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for k, v in state.items():
        np.testing.assert_array_equal(v, theirs[k].numpy())
