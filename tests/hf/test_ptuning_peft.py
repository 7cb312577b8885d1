"""P-tuning against peft 0.21.2 + transformers in float64: logits, loss and the gradient of every encoder
tensor (MLP and bidirectional LSTM) to <= 1e-10 relative, and adapter files both ways."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch
from additive_utils import virtual_token_cases
from hf_utils import hf_twin
from hypothesis import given, settings
from hypothesis import strategies as st
from test_additive_peft import (
    IDS,
    TOL,
    assert_close,
    assume_not_degenerate,
    compare,
    peft_logits,
    peft_twin,
    small_base,
    torch_float64,
)

import tinypeft as tp
from tinypeft.gradcheck import relative_error


def configs(NV: int, kind: str, hidden: int, layers: int) -> tuple[tp.PromptEncoderConfig, peft.PromptEncoderConfig]:
    kwargs = dict(
        num_virtual_tokens=NV,
        encoder_reparameterization_type=kind,
        encoder_hidden_size=hidden,
        encoder_num_layers=layers,
    )
    # PEFT's enum, not the string: PEFT 0.21.2 warns that an MLP ignores encoder_num_layers != 2 with
    # `self.encoder_type.value`, which a string type has not (AttributeError)
    theirs = kwargs | {"encoder_reparameterization_type": peft.PromptEncoderReparameterizationType(kind)}
    return tp.PromptEncoderConfig(**kwargs), peft.PromptEncoderConfig(task_type="CAUSAL_LM", **theirs)


@settings(max_examples=12, deadline=None)
@given(virtual_token_cases(max_len=8), st.sampled_from(["MLP", "LSTM"]), st.integers(1, 6), st.integers(1, 2))
def test_p_tuning_matches_peft(case_nv, kind, hidden, layers):
    case, NV = case_nv
    assume_not_degenerate(case)
    NV = min(NV, 8)
    ours_config, peft_config = configs(NV, kind, hidden, layers)
    ours = tp.get_peft_model(case.model, ours_config, seed=case.seed)
    rng = np.random.default_rng(case.seed)
    for name, value in ours.active.params.items():  # off the init: every tensor's gradient informative
        ours.active.params[name] = value + 0.3 * rng.standard_normal(value.shape)
    pm = peft_twin(ours, peft_config)
    assert_close(compare(ours, pm, case.ids, case.labels, case.mask, num_virtual_tokens=NV))


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_our_p_tuning_adapter_loads_in_peft(tmp_path, kind):
    ours_config, _ = configs(4, kind, 5, 2)
    ours = tp.get_peft_model(small_base(), ours_config, seed=4)
    ours.save_pretrained(tmp_path)
    with torch_float64():
        pm = peft.PeftModel.from_pretrained(hf_twin(small_base()), tmp_path).eval()
    assert pm.peft_config["default"].peft_type == "P_TUNING"
    assert relative_error(ours(IDS), peft_logits(pm, IDS)) <= TOL


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_peft_s_p_tuning_adapter_loads_here(tmp_path, kind):
    _, peft_config = configs(4, kind, 5, 2)
    torch.manual_seed(5)
    with torch_float64():
        pm = peft.get_peft_model(hf_twin(small_base()), peft_config).eval()
    pm.save_pretrained(tmp_path)
    ours = tp.PeftModel.from_pretrained(small_base(), tmp_path)
    with torch_float64():
        reloaded = peft.PeftModel.from_pretrained(hf_twin(small_base()), tmp_path).eval()
    assert relative_error(ours(IDS), peft_logits(reloaded, IDS)) <= TOL
    assert relative_error(ours(IDS), peft_logits(pm, IDS)) <= TOL  # the table is what PEFT's encoder computed
