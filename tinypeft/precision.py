"""Storage precision: parameters kept in float16 or bfloat16 and computed with in float32, as PyTorch does on a
CPU (PEFT's merge casts (b)float16 LoRA factors to float32 there), for measuring what a merge costs.

tinypeft computes in float32 or float64; a half-precision parameter is modelled as the float32 array of the
values the half-precision type holds (`round_to`), so a model "stored in bfloat16" is a float32 model whose
every parameter was rounded to bfloat16. Activations stay float32: this isolates what storage and merging
lose, which is what "the merged model differs from the unmerged one" is about (huggingface/peft #1388,
#2502, #1904). bfloat16 is rounded in NumPy by its bit pattern (no ml_dtypes needed); both roundings equal
torch's conversions bit for bit (tests/model/test_precision.py).

PEFT's LoRA merge of a (b)float16 weight, written out (`lora_merge_like_peft`): ΔW = s (B A)ᵀ in float32,
cast to the weight's dtype, then added in it; its unmerge subtracts the same cast ΔW, so a merge/unmerge cycle
rounds twice and the weight drifts (`lora_unmerge_like_peft`). tinypeft's `unmerge_adapter` puts the original
arrays back: no drift, whatever the dtype. (PEFT's IA3 unmerge divides by
l + 1e-8 and its DoRA unmerge divides by the DoRA factor: they drift too; not modelled here.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import ConfigError

STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def round_to(x: Any, dtype: str) -> np.ndarray:
    """x rounded to the nearest value of `dtype` (ties to even), as a float32 array. float64 input is rounded to
    float32 first, as torch converts a float64 tensor to (b)float16 (through float)."""
    with np.errstate(over="ignore"):  # past the type's range is inf, as in torch
        x32 = np.asarray(x, dtype=np.float32)  # [...]: one rounding from float64
        if dtype == "float32":
            return x32
        if dtype == "float16":
            return x32.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        # keep the top 16 bits, the low 16 rounded to nearest, ties to an even top half (torch's rounding)
        bits = x32.view(np.uint32)
        lsb = (bits >> np.uint32(16)) & np.uint32(1)
        with np.errstate(over="ignore"):
            top = (bits + np.uint32(0x7FFF) + lsb) & np.uint32(0xFFFF0000)
        return np.where(np.isnan(x32), x32, top.view(np.float32))
    raise ConfigError(f"storage dtype must be one of {STORAGE_DTYPES}; got {dtype!r}")


def stored(params: Mapping[str, Any], dtype: str) -> dict[str, np.ndarray]:
    """Every array rounded to `dtype`, as float32."""
    return {name: round_to(value, dtype) for name, value in params.items()}


def lora_delta_float32(A: np.ndarray, B: np.ndarray, scaling: float) -> np.ndarray:
    """ΔW = (B A)ᵀ · s in float32, in PEFT's order of operations (get_delta_weight on a CPU): (in, out)."""
    A32, B32 = np.asarray(A, np.float32), np.asarray(B, np.float32)
    return (B32 @ A32).T * np.float32(scaling)


def lora_merge_like_peft(W: np.ndarray, delta: np.ndarray, dtype: str) -> np.ndarray:
    """PEFT's `weight.data += get_delta_weight()` on a weight stored in `dtype`: ΔW cast to dtype, the sum
    rounded to dtype."""
    return round_to(W + round_to(delta, dtype), dtype)


def lora_unmerge_like_peft(W: np.ndarray, delta: np.ndarray, dtype: str) -> np.ndarray:
    """PEFT's `weight.data -= delta_weight.to(dtype)`: the same cast ΔW subtracted, the result rounded again."""
    return round_to(W - round_to(delta, dtype), dtype)
