"""Array backends.

Every op is written once against an array namespace `xp`: numpy on the CPU, cupy on a GPU,
and autograd.numpy when the gradient oracle traces the forward. Ops find their namespace
from their inputs with `namespace(...)`; a model chooses numpy or cupy once, when it is made.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import numpy as np

from .errors import ConfigError

BACKEND_ENV = "TINYPEFT_BACKEND"
ALLOCATOR_ENV = "TINYPEFT_KEEP_MALLOC"  # set to 1 to leave the C allocator's settings alone
DTYPES = ("float32", "float64")
_allocator_tuned = False


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
    """numpy for device None/"cpu", cupy for "cuda"; `TINYPEFT_BACKEND=cupy|numpy` sets the default."""
    if device is None:
        device = {"cupy": "cuda", "numpy": "cpu", "": "cpu"}.get(os.environ.get(BACKEND_ENV, ""))
        if device is None:
            raise ConfigError(f"{BACKEND_ENV}={os.environ[BACKEND_ENV]!r}: allowed values are 'numpy' and 'cupy'")
    if device == "cpu":
        tune_allocator()
        return np
    if device == "cuda":
        try:
            import cupy
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise ImportError("device='cuda' needs cupy: pip install 'tinypeft[gpu]'") from e
        return cupy
    raise ConfigError(f"device={device!r}: allowed values are 'cpu' and 'cuda'")


def tune_allocator() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (no mmap for large blocks, no trimming).

    A NumPy forward pass allocates a fresh activation-sized array for nearly every operation. By
    default glibc serves each large one with a new mmap and returns it on free, so every operation
    pays a page fault per 4 KiB of its output; on a training step of the default model that is a
    third of the time. With these settings the freed blocks are reused instead. The cost: the
    process keeps its peak heap until it exits. Linux/glibc only; done once, when the first numpy
    model is made; `TINYPEFT_KEEP_MALLOC=1` opts out. Returns whether the settings were applied.
    """
    global _allocator_tuned
    if _allocator_tuned or os.environ.get(ALLOCATOR_ENV, "") not in ("", "0"):
        return _allocator_tuned
    _allocator_tuned = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
        ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc: nothing to tune
        ok = False
    return ok


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
