"""What a PEFT user does with tinypeft's files (issue 16, item 2): the shipped base loads in transformers
without a warning, and an adapter saved here loads with peft.AutoPeftModelForCausalLM from its folder
alone (adapter_config.json names the base's folder), computing the same logits."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

import numpy as np
import pytest
import torch

import tinypeft as tp
from tinypeft.experiment import SHIPPED_BASE


def test_the_shipped_base_loads_in_transformers_without_a_warning(caplog):
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    stderr = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr):
        warnings.simplefilter("always")
        with caplog.at_level(logging.WARNING):
            GPT2LMHeadModel.from_pretrained(SHIPPED_BASE)
    messages = [str(w.message) for w in caught] + [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
    ]
    assert not messages, messages
    assert "must be `None` or an integer within the vocabulary" not in stderr.getvalue()


def test_special_tokens_outside_the_vocabulary_are_read_as_none(tmp_path):
    """A config.json tinypeft wrote before (GPT2Config's default 50256 for a 256-byte vocabulary)."""
    config = tp.GPTConfig.from_hf_dict({**tp.GPTConfig().to_hf_dict(), "bos_token_id": 50256, "eos_token_id": 7})
    assert config.bos_token_id is None and config.eos_token_id == 7
    with pytest.raises(tp.ConfigError, match="eos_token_id"):
        tp.GPTConfig(vocab_size=10, eos_token_id=10)


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_auto_peft_model_loads_an_adapter_saved_here(tmp_path, method):
    from peft import AutoPeftModelForCausalLM

    from tinypeft.methods.registry import METHODS

    cfg = tp.GPTConfig(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    tp.GPT(cfg, seed=0).save_pretrained(tmp_path / "base")
    base = tp.GPT.from_pretrained(tmp_path / "base")
    model = tp.get_peft_model(base, METHODS[method].example(cfg), seed=1)
    model.save_pretrained(tmp_path / "adapter")
    saved = tp.io.load_json(tmp_path / "adapter" / "adapter_config.json")
    assert saved["base_model_name_or_path"] == os.path.abspath(tmp_path / "base")

    ids = np.random.default_rng(0).integers(0, 64, size=(2, 9))
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model(ids))
    if method == "prompt":  # PEFT returns the virtual positions' logits too, as tinypeft does
        assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)  # float32 in both, different summation order


def test_a_base_made_in_memory_names_no_folder(tmp_path):
    model = tp.get_peft_model(tp.GPT(tp.GPTConfig(n_layer=1, n_embd=8, n_head=2)), tp.LoraConfig(r=2))
    model.save_pretrained(tmp_path)
    assert tp.io.load_json(tmp_path / "adapter_config.json")["base_model_name_or_path"] is None


@pytest.mark.parametrize("method", ["bitfit", "lntuning", "last_blocks", "selective"])
def test_a_selective_fine_tune_loads_in_transformers_as_changed_tensors(tmp_path, method):
    """For methods PEFT has no format for (issue 16, item 3): the retrained base tensors under GPT-2's
    names, which transformers' load_state_dict(strict=False) takes; the model then computes the merge."""
    from hf_utils import hf_twin
    from safetensors.torch import load_file

    from tinypeft.methods.registry import METHODS

    cfg = tp.GPTConfig(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, dtype="float64")
    model = tp.get_peft_model(tp.GPT(cfg, seed=0), METHODS[method].example(cfg), seed=1)
    for value in model.trainable_parameters().values():
        value += 0.1 * np.random.default_rng(2).standard_normal(value.shape)
    model.save_changed_tensors(tmp_path / "changed.safetensors")
    hf = hf_twin(model.base_model)
    _, unexpected = hf.load_state_dict(load_file(tmp_path / "changed.safetensors"), strict=False)
    assert not unexpected
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 9))
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, model.merge_and_unload()(ids), rtol=1e-10, atol=1e-12)


def test_changed_tensors_are_refused_for_an_adapter_with_tensors_of_its_own(tmp_path):
    model = tp.get_peft_model(tp.GPT(tp.GPTConfig(n_layer=1, n_embd=8, n_head=2)), tp.LoraConfig(r=2))
    with pytest.raises(tp.ConfigError, match="merge_and_unload"):
        model.save_changed_tensors(tmp_path / "x.safetensors")
