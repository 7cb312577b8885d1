"""Storage precision (tinypeft/precision.py), the model behind examples/merge_precision.py: half-precision values
rounded as torch rounds them, and PEFT's merge and unmerge of a (b)float16 LoRA weight, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from multi_adapters import peft_twin, small_base, with_adapters

import tinypeft as tp
from tinypeft.errors import ConfigError
from tinypeft.precision import lora_delta_float32, lora_merge_like_peft, lora_unmerge_like_peft, round_to, stored

TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def awkward_values() -> np.ndarray:
    """Every magnitude float32 holds, ties of both parities, the types' largest values and just past them,
    subnormals, signed zeros, infinities and NaN."""
    rng = np.random.default_rng(0)
    spread = rng.standard_normal(200_000) * 10.0 ** rng.integers(-45, 39, 200_000)
    edges = [0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, 3.39e38, 1e-40, 6e-8, 65504, 65520, 65519.99]
    ties = [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-8)]  # halfway for bfloat16, float16
    return np.concatenate([spread, edges, ties])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("source", ["float64", "float32"])
def test_rounding_equals_torch_bit_for_bit(dtype, source):
    x = awkward_values().astype(source)
    with np.errstate(over="ignore"):
        ours = round_to(x, dtype)
    theirs = torch.tensor(x).to(TORCH[dtype]).float().numpy()
    same = (ours.view(np.uint32) == theirs.view(np.uint32)) | (np.isnan(ours) & np.isnan(theirs))
    assert same.all(), x[~same][:5]
    assert ours.dtype == np.float32


def test_an_unknown_storage_dtype_is_refused():
    with pytest.raises(ConfigError, match="'int8'"):
        round_to(np.ones(3), "int8")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_merge_and_unmerge_are_peft_s_in_half_precision(dtype):
    """PEFT's model in (b)float16 on a CPU, merged and unmerged five times: every base weight equals ours after
    every step, bit for bit, given PEFT's ΔW; and our float32 ΔW, rounded, is PEFT's to the last bit."""
    configs = {"x": tp.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["c_attn", "c_proj"])}
    model = with_adapters(small_base(), configs)
    twin = peft_twin(model).to(TORCH[dtype])
    ours = {}
    for layer in model.adapters["x"].layers:
        module = twin.base_model.model.get_submodule(layer.module)
        peft_delta = module.get_delta_weight("x").detach().float().numpy()
        A, B = (round_to(model.adapters["x"].params[n], dtype) for n in (layer.lora_A, layer.lora_B))
        our_delta = lora_delta_float32(A, B, model.adapters["x"].config.scaling)
        assert np.array_equal(round_to(our_delta, dtype), peft_delta), layer.module
        ours[layer.module] = (round_to(model.base_model.params[layer.weight], dtype), peft_delta)
    for _ in range(5):
        twin.merge_adapter()
        for module, (W, delta) in ours.items():
            ours[module] = (lora_merge_like_peft(W, delta, dtype), delta)
            theirs = twin.base_model.model.get_submodule(module).base_layer.weight.float().numpy()
            assert np.array_equal(ours[module][0], theirs), module
        twin.unmerge_adapter()
        for module, (W, delta) in ours.items():
            ours[module] = (lora_unmerge_like_peft(W, delta, dtype), delta)
            theirs = twin.base_model.model.get_submodule(module).base_layer.weight.float().numpy()
            assert np.array_equal(ours[module][0], theirs), module
    drift = [np.abs(W - round_to(model.base_model.params[m + ".weight"], dtype)).max() for m, (W, _) in ours.items()]
    assert max(drift) > 0  # PEFT's round trip does not give the weight back


def test_tinypeft_s_unmerge_restores_stored_weights_exactly():
    model = with_adapters(small_base(dtype="float32"), {"x": tp.LoraConfig(r=2, init_lora_weights=False)})
    model.base_model.params = stored(model.base_model.params, "bfloat16")
    originals = dict(model.base_model.params)
    for _ in range(20):
        model.merge_adapter()
        model.unmerge_adapter()
    assert all(model.base_model.params[k] is v for k, v in originals.items())
