"""Array backends.

Every op is written once against an array namespace `xp`: numpy on the CPU, cupy on a GPU,
and autograd.numpy when the gradient oracle traces the forward. Ops find their namespace
from their inputs with `namespace(...)`; a model chooses numpy or cupy once, when it is made.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from . import runtime
from .errors import ConfigError

Array = Any  # a numpy, cupy or autograd-traced array: the one alias every module uses

DTYPES = ("float32", "float64")


def namespace(*arrays: Any) -> ModuleType:
    """The namespace to compute with: autograd.numpy if any input is being traced by autograd,
    cupy if any input lives on a GPU, numpy otherwise."""
    for a in arrays:
        module = type(a).__module__
        if module.startswith("autograd"):
            import autograd.numpy as anp

            return anp
        if module.startswith("cupy"):
            import cupy

            return cupy
    return np


def get_backend(device: str | None = None) -> ModuleType:
    """numpy for device None/"cpu", cupy for "cuda"; `TINYPEFT_BACKEND` (cpu or cuda; numpy and cupy are
    accepted as their synonyms) sets the default."""
    if device is None:
        device = runtime.default_device()
    if device == "cpu":
        runtime.tune_allocator()
        return np
    if device == "cuda":
        try:
            import cupy
        except ImportError:
            raise ConfigError(
                "device 'cuda' needs CuPy, which is not installed: pip install 'tinypeft[gpu]' (on a machine "
                "with an NVIDIA GPU), or use device 'cpu'"
            ) from None
        return cupy
    raise ConfigError(f"device={device!r}: allowed values are 'cpu' and 'cuda'")


def device_of(xp: ModuleType) -> str:
    return "cuda" if xp.__name__ == "cupy" else "cpu"


def to_numpy(a: Any) -> np.ndarray:
    """A numpy copy-or-view of a numpy or cupy array (scalars become 0-d arrays)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def scatter_add_rows(n_rows: int, index: Any, values: Any) -> Any:
    """out[index[i]] += values[i] for every i, repeats summed: out (n_rows, C), index (N,), values (N, C).

    `out[index] += values` would keep only one of each repeated index; this does not."""
    xp = namespace(values)
    out = xp.zeros((n_rows, values.shape[-1]), dtype=values.dtype)
    if xp is np:
        np.add.at(out, index, values)
    else:  # cupy
        import cupyx

        cupyx.scatter_add(out, index, values)
    return out
