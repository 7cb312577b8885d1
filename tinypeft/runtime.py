"""Process-level state, in one place: the environment's defaults (device, threads, allocator), the C
allocator's tuning, and the thread pool for row-parallel steps.

Row-parallel training steps on the CPU.

A batch's rows are independent until the loss averages them, so a step can split the batch into row
blocks, run each block's forward and backward on its own thread, and add the results. NumPy releases
the GIL inside ufunc loops and BLAS calls, so two threads on two halves of a batch keep two cores
busy with everything, the element-wise work included; one thread with multi-threaded BLAS keeps the
second core busy only inside matmuls. While blocks run, BLAS is held to one thread per block, so the
cores are not oversubscribed (multi-threaded OpenBLAS on a busy machine can slow down tenfold).

The number of threads is `TINYPEFT_THREADS`, else the number of CPU cores (at most 8). A batch is
split only when each block still holds at least MIN_BLOCK_WORK activations per layer (rows * T * C):
below that, thread overhead outweighs the gain. GPU (cupy) models never split.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

BACKEND_ENV = "TINYPEFT_BACKEND"  # cpu | cuda (or numpy | cupy): the device a model is made on when none is given
THREADS_ENV = "TINYPEFT_THREADS"
ALLOCATOR_ENV = "TINYPEFT_KEEP_MALLOC"  # set to 1 to leave the C allocator's settings alone
MIN_BLOCK_WORK = 1 << 17  # activations per layer in one block: 131,072 (e.g. 8 rows of 128 tokens x 128)
_allocator_tuned = False

T = TypeVar("T")
K = TypeVar("K")
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_blas: Any = None


def default_device() -> str:
    """$TINYPEFT_BACKEND as a device: cpu (or unset) -> "cpu", cuda -> "cuda"; the array libraries'
    names, numpy and cupy, are accepted as synonyms."""
    value = os.environ.get(BACKEND_ENV, "")
    device = {"cpu": "cpu", "cuda": "cuda", "cupy": "cuda", "numpy": "cpu", "": "cpu"}.get(value.strip().lower())
    if device is None:
        from .errors import ConfigError

        raise ConfigError(f"{BACKEND_ENV}={value!r}: allowed values are 'cpu' and 'cuda' (or 'numpy' and 'cupy')")
    return device


def threads() -> int:
    """Worker threads for row blocks: $TINYPEFT_THREADS, else the CPU count, at most 8."""
    value = os.environ.get(THREADS_ENV, "")
    if value:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            from .errors import ConfigError

            raise ConfigError(f"{THREADS_ENV}={value!r}: give a whole number of threads >= 1")
        return n
    return max(1, min(os.cpu_count() or 1, 8))


def row_blocks(n_rows: int, work_per_row: int) -> list[slice]:
    """Contiguous row slices covering range(n_rows): one per thread while each block keeps at least
    MIN_BLOCK_WORK of work; a single slice when splitting would not pay."""
    n_blocks = min(threads(), n_rows, max(1, (n_rows * work_per_row) // MIN_BLOCK_WORK))
    bounds = [round(i * n_rows / n_blocks) for i in range(n_blocks + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(n_blocks)]


def map_blocks(fn: Callable[[K], T], blocks: list[K]) -> list[T]:
    """[fn(block) for block in blocks], on parallel threads with one BLAS thread each when there are
    several blocks. Results come back in block order, so what the caller adds up does not depend on
    which thread finished first."""
    if len(blocks) == 1:
        return [fn(blocks[0])]
    with _numpy_blas().limit(limits=1):
        return list(_executor(len(blocks)).map(fn, blocks))


def _numpy_blas() -> Any:
    """threadpoolctl's handle on the BLAS libraries loaded when first asked (NumPy's among them), kept:
    `threadpool_limits(...)` scans every loaded library on each entry, 0.4 ms, twice a step; the kept
    handle's limit costs 0.014 ms. A BLAS loaded later is not NumPy's and does not run these matmuls."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController().select(user_api="blas")
    return _blas


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size < n:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool, _pool_size = ThreadPoolExecutor(max_workers=n, thread_name_prefix="tinypeft-rows"), n
    return _pool


def tune_allocator() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (no mmap for large blocks, no trimming).

    A NumPy forward pass allocates a fresh activation-sized array for nearly every operation. By
    default glibc serves each large one with a new mmap and returns it on free, so every operation
    pays a page fault per 4 KiB of its output. With these settings the freed blocks are reused
    instead. Measured (LoRA r=8 on every linear, default config, B 16, T 128, float32, a fresh process
    each): 93.7 ms a step tuned, 158.6 ms with glibc's defaults. The cost: the process keeps its peak
    heap until it exits. Linux/glibc only; done once, when the first numpy
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
