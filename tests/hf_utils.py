"""Building the transformers twin of a tinypeft GPT, for the cross-checks (float64, eager attention)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import tinypeft as tp


def hf_config(cfg: tp.GPTConfig) -> GPT2Config:
    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.n_inner,
        activation_function="gelu_new",
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )


def hf_twin(model: tp.GPT, attn_implementation: str = "eager") -> GPT2LMHeadModel:
    """A float64 GPT2LMHeadModel holding exactly `model`'s weights (same names, same layout)."""
    config = hf_config(model.config)
    config._attn_implementation = attn_implementation
    hf = GPT2LMHeadModel(config).double().eval()
    state = {k: torch.tensor(np.asarray(v, dtype=np.float64)) for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing  # tied to wte
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    return hf


def hf_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The shifted, -100-ignoring mean cross-entropy in float64 (transformers' own loss casts the
    logits to float32 first, which would limit agreement to ~1e-8)."""
    V = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def linear_twin(model: tp.GPT) -> GPT2LMHeadModel:
    """`hf_twin(model)` with every Conv1D replaced by the torch.nn.Linear that computes the same thing: its
    weight (out, in) is Conv1D's (in, out) transposed, its bias the same. Module names do not change
    (`transformer.h.0.attn.c_attn`). PEFT's LoHa, LoKr, OFT and BOFT accept only nn.Linear, not Conv1D:
    they are cross-checked on this model."""
    hf = hf_twin(model)
    for name, module in list(hf.named_modules()):
        if isinstance(module, Conv1D):
            n_in, n_out = module.weight.shape
            linear = torch.nn.Linear(n_in, n_out, dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(hf.get_submodule(parent), child, linear)
    return hf.eval()


@contextlib.contextmanager
def torch_float64() -> Iterator[None]:
    """PEFT makes adapter tensors in torch's default dtype; float64 keeps loaded values exact."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
