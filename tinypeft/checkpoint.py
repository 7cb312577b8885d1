"""A GPT-2 checkpoint's files: reading and validating a state dict (names, shapes, dtypes, the tied
head), and the folder transformers writes for a GPT2LMHeadModel (config.json, model.safetensors)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .backend import to_numpy
from .config import GPTConfig, layer_of, parameter_shapes
from .errors import CheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_state(config: GPTConfig, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Load GPT-2 weights by name. Names may lack the "transformer." prefix (GPT2Model checkpoints);
    "lm_head.weight" is accepted when it equals wte (tied); attention-mask buffers are skipped.
    Every parameter must be present with its exact shape. Returns host arrays in config.dtype, in
    GPT-2's order, or raises CheckpointError saying what is wrong."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"a state dict must map tensor names to arrays; got {type(state).__name__}")
    bad_keys = [k for k in state if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"tensor names must be strings; got {bad_keys[0]!r}")
    # compare the block count first: it is cheap, says what is wrong in one line, and keeps a
    # corrupt config's huge n_layer from costing a huge table of expected names
    full_names = {k: k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k for k in state}
    blocks = {layer_of(name) for name in full_names.values()} - {None}
    n_blocks = max(blocks) + 1 if blocks else 0
    if n_blocks != config.n_layer:
        held = f"{n_blocks} transformer block(s), transformer.h.0 to h.{n_blocks - 1}" if n_blocks else "no blocks"
        raise CheckpointError(f"the checkpoint holds {held}; this GPTConfig has n_layer={config.n_layer}")
    expected = parameter_shapes(config)
    loaded: dict[str, np.ndarray] = {}
    lm_head = None
    for key, value in sorted(state.items(), key=lambda item: str(item[0])):  # a message names the first, always
        name = full_names[key]
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers old transformers versions saved; not parameters
        if name == "lm_head.weight":
            lm_head = _as_host_array(key, value)
            continue
        if name not in expected:
            raise CheckpointError(
                f"unexpected tensor {key!r} for this GPTConfig; expected names like {next(iter(expected))!r} "
                f"(n_layer={config.n_layer})"
            )
        if name in loaded:
            raise CheckpointError(f"tensor {name!r} appears twice (with and without the 'transformer.' prefix)")
        arr = _as_host_array(key, value)
        if not (np.issubdtype(arr.dtype, np.floating)):
            raise CheckpointError(f"tensor {key!r} has dtype {arr.dtype}; weights must be floating point")
        if tuple(arr.shape) != expected[name]:
            raise CheckpointError(f"tensor {key!r} has shape {tuple(arr.shape)}; this GPTConfig needs {expected[name]}")
        if not np.isfinite(arr).all():
            raise CheckpointError(
                f"tensor {key!r} holds {int((~np.isfinite(arr)).sum())} non-finite value(s) (NaN or inf); a model "
                "computed from it would give NaN logits, so it is not loaded"
            )
        loaded[name] = arr.astype(config.dtype)
        if name == "transformer.wte.weight":
            saved_wte = arr  # as saved, before the cast, to compare with a saved lm_head
    missing = [k for k in expected if k not in loaded]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s), first {missing[:3]}")
    if lm_head is not None and not np.array_equal(lm_head, saved_wte):
        raise CheckpointError("lm_head.weight differs from wte.weight; tinypeft's GPT ties them (GPT-2 does)")
    return {k: loaded[k] for k in expected}


def save_folder(folder: str | os.PathLike, config: GPTConfig, params: Mapping[str, Any]) -> None:
    """config.json and model.safetensors, the files transformers writes for a GPT2LMHeadModel."""
    from .io import save_json, save_safetensors

    os.makedirs(folder, exist_ok=True)
    save_safetensors(os.path.join(folder, WEIGHTS_NAME), params)
    save_json(os.path.join(folder, CONFIG_NAME), config.to_hf_dict())


def load_folder(folder: str | os.PathLike, dtype: str | None = None) -> tuple[GPTConfig, dict[str, np.ndarray]]:
    """(config, host params) from a folder written by `save_folder` or by transformers' GPT2LMHeadModel."""
    from .io import load_json, load_safetensors

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder} is not a folder; expected one holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = GPTConfig.from_hf_dict(load_json(os.path.join(folder, CONFIG_NAME)), dtype=dtype)
    config = config.replace(name_or_path=os.path.abspath(folder))
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.exists(weights_path):
        raise CheckpointError(f"{weights_path} does not exist{pickle_hint(folder)}")
    return config, load_state(config, load_safetensors(weights_path))


def pickle_hint(folder: str) -> str:
    """A note on the pickle files a folder holds instead of safetensors: they are never loaded."""
    others = sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES))
    return f"; found {others}, which are pickles and are never loaded" if others else ""


def _as_host_array(name: str, value: Any) -> np.ndarray:
    """A host array from a state-dict value, or a CheckpointError naming the tensor."""
    try:
        return to_numpy(value)
    except Exception as e:  # ragged lists and objects NumPy cannot turn into an array
        raise CheckpointError(f"tensor {name!r} is not an array ({type(value).__name__}: {e})") from None
