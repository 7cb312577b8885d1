"""float32 stays float32: every method's logits, gradients, adapter tensors and AdamW state, through a
training step. A float64 scalar or table that slips into a float32 computation would upcast what follows
it silently (NumPy promotes), doubling memory traffic; these outputs are where it would show."""

from __future__ import annotations

import numpy as np
import pytest

import tinypeft as tp
from tinypeft.optim import AdamW

CFG = tp.GPTConfig(vocab_size=40, n_positions=24, n_embd=12, n_layer=2, n_head=3)
METHODS = {
    "full": lambda: None,
    "lora": lambda: tp.LoraConfig(r=2, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.1),
    "rslora+dora": lambda: tp.LoraConfig(r=2, use_rslora=True, use_dora=True, init_lora_weights="gaussian"),
    "pissa": lambda: tp.LoraConfig(r=2, init_lora_weights="pissa"),
    "prompt": lambda: tp.PromptTuningConfig(num_virtual_tokens=3),
    "ptuning": lambda: tp.PromptEncoderConfig(num_virtual_tokens=3, encoder_reparameterization_type="LSTM"),
    "prefix": lambda: tp.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True),
    "ia3": lambda: tp.IA3Config(),
    "adapter": lambda: tp.AdapterConfig(bottleneck_size=4),
    "bitfit": lambda: tp.BitFitConfig(),
    "vera": lambda: tp.VeraConfig(r=5, target_modules=["c_attn", "c_fc"], vera_dropout=0.1, bias="vera_only"),
    "oft": lambda: tp.OFTConfig(oft_block_size=4, coft=True, eps=0.1, block_share=True, init_weights=False),
    "oft-exact": lambda: tp.OFTConfig(r=2, oft_block_size=0, use_cayley_neumann=False, bias="oft_only"),
    "boft": lambda: tp.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, boft_dropout=0.5, init_weights=False),
}


@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
def test_float32_stays_float32_through_a_training_step(method):
    config = method()
    base = tp.GPT(CFG, seed=0)
    model = base if config is None else tp.get_peft_model(base, config)
    model.train()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG.vocab_size, size=(3, 8))
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    assert model(ids, attention_mask=mask).dtype == np.float32
    loss, grads = model.loss_and_grad(ids, ids, attention_mask=mask)
    assert np.isfinite(loss)
    assert {name: g.dtype for name, g in grads.items()} == {name: np.dtype(np.float32) for name in grads}
    params = model.trainable_parameters()
    optimizer = AdamW(lr=1e-3)
    optimizer.step(params, grads)
    assert {name: p.dtype for name, p in model.trainable_parameters().items()} == {
        name: np.dtype(np.float32) for name in params
    }
    state = [a for slots in optimizer.state.values() for a in slots.values()]
    assert len(state) == 2 * len(params) and all(a.dtype == np.float32 for a in state)  # m and v of each
    assert {p.dtype for p in base.params.values()} == {np.dtype(np.float32)}
