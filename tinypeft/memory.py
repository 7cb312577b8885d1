"""Memory, checked before it is allocated: what a model's parameters, an adapter's tensors and a
training step's activations need, against what the machine has.

A size from a file or a flag (an n_embd of 16384, a bottleneck_size of 10**12 in adapter_config.json,
a batch_size of 100000) is refused in one line, saying how much it would need and how much there is,
instead of ending in a MemoryError, an allocation that takes minutes, or a process the kernel kills.

The estimates count only what must be held at once, so they are lower bounds, and a size is refused
only when even that exceeds MARGIN times what is available: nothing that fits is refused. Measured
peak / estimate (tracemalloc; tests/model/test_memory.py keeps the first three within 1..2):

    a GPT's parameters (GPT(config); each tensor is drawn in float64, then cast)    1.14 - 1.31
    a training step (loss_and_grad), B 4-16, T 64-256, C 32-128, V 64-2048,
        the base, LoRA, prompt, prefix (IA3 1.47: its own caches are not counted)   1.00 - 1.37
    an evaluation (loss)                                                           1.00 - 1.28
    an adapter (get_peft_model): LoRA, bottleneck in float64                       1.10 - 1.13
        in float32 (drawn in float64, then cast)                                   1.27 - 1.39
        a table drawn whole and tiny (prompt, prefix: kilobytes)                   up to 2.5

On the CPU a large batch runs as row blocks on threads (engine.py), whose logits and loss temporaries
may or may not overlap; where the vocabulary dominates, a step then measured up to 1.9 times its
estimate (V 4096, four blocks).

A training step holds, per block, the caches `gpt.py` keeps (nine [B, T, C]: the LayerNorms'
normalised inputs and outputs, c_attn's q, k and v and the scaled copy of q, the attention's output
(with prefix keys and values, k and v joined to them in place of c_attn's output); two [B, T, 4C]: the
MLP's hidden layer before and after GELU; [B, NH, T]: each query's log-sum-exp, from which the engine's
blocked attention rebuilds the weights, so no [B, NH, T, P+T] array is kept), the final LayerNorm's,
one block of attention scores (two in the backward), and at the
head the logits [B, T, V], the loss's copy of them and its two temporaries (in the backward, dlogits
and every gradient); a training run adds the optimizer's state. Available memory is the kernel's
MemAvailable (else the free pages, else all physical memory) plus the freed memory this process's
allocator keeps for reuse (runtime.tune_allocator keeps it all); on a GPU, the device's free memory
plus CuPy's pool. Where it cannot be read, nothing is refused.
"""

from __future__ import annotations

import math
import os
import stat
from typing import Any

import numpy as np

from . import attention_blocks, runtime
from .config import GPTConfig, shown
from .errors import ConfigError

GiB = 1 << 30
# refuse only what needs more than this times what is available: the closest estimates are within 0.1%
# of a measured peak (where the vocabulary dominates), and the memory available moves while a run starts
MARGIN = 1.1


def parameter_count(config: GPTConfig) -> int:
    """The numbers in `parameter_shapes(config)`, by formula: a corrupt config's n_layer of 10**12
    must not cost a table of 10**12 entries to be refused."""
    C, F = config.n_embd, config.inner_dim
    per_block = 4 * C * C + 2 * C * F + 9 * C + F  # ln_1, c_attn, c_proj, ln_2, c_fc, mlp.c_proj
    return (config.vocab_size + config.n_positions) * C + config.n_layer * per_block + 2 * C


def activation_count(
    config: GPTConfig,
    batch: int,
    seq_len: int,
    embedding: int = 0,
    prefix: int = 0,
    gradients: int = 0,
    row_blocks: int = 1,
) -> int:
    """The numbers a forward and its loss hold at their peak (and with `gradients`, the trainable
    numbers, its backward), for `batch` rows of `seq_len` tokens with `embedding` virtual tokens in front
    of them (prompt tuning) and `prefix` keys and values before them (prefix tuning), computed as
    `row_blocks` row blocks (engine.py): every block's caches are held at once, the temporaries of one."""
    B, C, F, V, NH = batch, config.n_embd, config.inner_dim, config.vocab_size, config.n_head
    T = min(seq_len, max(config.n_positions - embedding - prefix, 1)) + embedding  # a longer one is refused later
    S, N, k = prefix + T, batch * T, row_blocks
    keys_values = 2 * B * S * C if prefix else 3 * N * C  # k, v joined to the past, else views of c_attn's qkv
    per_block = 6 * N * C + keys_values + 2 * N * F + B * NH * T  # gpt.BlockCache
    caches = config.n_layer * per_block + 2 * N * C  # every block's, and the final LayerNorm's
    targets = batch * (T - 1) * V  # [B, T-1, V]: the loss's copy of the logits, and each of its temporaries
    loss = targets + (N * V + 2 * targets) // k  # the copies; a row block's logits and two temporaries
    backward = targets + N * V // k + gradients  # the copies, a row block's dlogits and every gradient, at the end
    # attention_blocks.py: one block of scores at a time, two in the backward
    scores = min(B * NH * T * S, attention_blocks.BLOCK_BYTES // np.dtype(config.dtype).itemsize)
    return caches + max(loss, backward if gradients else 0, scores * (2 if gradients else 1))


def bytes_of(count: int, dtype: str) -> int:
    return count * np.dtype(dtype).itemsize


def counted(n: int) -> str:
    """A count for a message: 1,234,567, or one of 30 digits or more by its order of magnitude."""
    return f"{n:,d}" if n < 10**30 else f"~10^{len(str(n)) - 1}"


def gib(n_bytes: float) -> str:
    """A byte count for a message; one past float's range (a 401-digit --n_embd) by its order of magnitude."""
    if isinstance(n_bytes, int) and n_bytes >= 10**300:  # int / int in float raises OverflowError there
        return f"10^{len(str(n_bytes // GiB)) - 1} GiB"
    return f"{n_bytes / GiB:,.1f} GiB" if n_bytes >= GiB / 10 else f"{n_bytes / (1 << 20):,.1f} MiB"


# ------------------------------------------------------------------ what is available
def available_bytes(xp: Any = np) -> int | None:
    """Bytes a new allocation can get now: on the host, MemAvailable (else the free pages, else all
    physical memory) plus the freed memory this process keeps for reuse; on a GPU (xp cupy), the
    device's free memory plus what CuPy's pool holds free. None where it cannot be told."""
    if xp.__name__ == "cupy":
        try:
            return int(xp.cuda.runtime.memGetInfo()[0]) + int(xp.get_default_memory_pool().free_bytes())
        except Exception:  # no device to ask (or a CuPy without these calls): nothing to refuse
            return None
    host = _meminfo_available()
    for name in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        if host is None:
            try:
                host = os.sysconf(name) * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                host = None
    return None if host is None else host + _freed_but_kept()


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _freed_but_kept() -> int:
    """Free bytes inside this process's heap (glibc's mallinfo2 fordblks): memory the kernel counts
    as used but a new array here gets first. 0 where it cannot be read."""
    try:
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd")] + [
                (name, ctypes.c_size_t) for name in ("usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
            ]

        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        mallinfo2.restype = MallInfo2
        return int(mallinfo2().fordblks)
    except (OSError, AttributeError):  # not glibc, or one older than 2.33
        return 0


def require(needed: int, subject: str, purpose: str, hint: str, xp: Any = np) -> None:
    """Raise a ConfigError, "<subject> needs about <needed> <purpose>; the machine has <available>
    available: <hint>", if `needed` bytes exceed MARGIN times what is available (on the GPU when xp is
    cupy)."""
    available = available_bytes(xp)
    if available is None or needed <= MARGIN * available:
        return
    where = "the GPU has" if xp.__name__ == "cupy" else "the machine has"
    raise ConfigError(f"{subject} needs about {gib(needed)} {purpose}; {where} {gib(available)} available: {hint}")


# ------------------------------------------------------------------ the checks, before each allocation
def check_parameters(config: GPTConfig, xp: Any = np, host: bool = True) -> None:
    """Before a GPT's parameters are made: on the host, where they are drawn (host=True), and on the
    GPU they are copied to (xp cupy)."""
    n = parameter_count(config)
    sizes = f"n_embd={shown(config.n_embd)}, n_layer={shown(config.n_layer)}"
    purpose = f"for its {counted(n)} parameters ({config.dtype}, {sizes})"
    hint = "use a smaller n_embd, n_layer, n_inner or vocab_size"
    for device in ([np] if host else []) + ([xp] if xp is not np else []):
        require(bytes_of(n, config.dtype), "this model", purpose, hint, device)


def check_saved_model(folder: Any) -> None:
    """Before a saved model's weights are read: reading model.safetensors holds at least its bytes. (Its
    config.json is not trusted here: one that disagrees with the weights is the loader's to report.)"""
    from .checkpoint import WEIGHTS_NAME
    from .io.files import MAX_TENSOR_FILE_BYTES

    try:
        info = os.lstat(os.path.join(os.fspath(folder), WEIGHTS_NAME))
    except OSError:
        return  # the loader says what is wrong with it
    if stat.S_ISREG(info.st_mode) and info.st_size <= MAX_TENSOR_FILE_BYTES:  # the loader refuses the rest unread
        purpose = f"for its {info.st_size:,d} bytes"
        require(info.st_size, f"reading {WEIGHTS_NAME}", purpose, "load it on a machine with more memory")


def check_adapter(config: Any, base: Any) -> None:
    """Before an adapter is built for `base` (a GPT): the tensors its config says it will hold, drawn
    on the host, then copied to the GPU if the base is on one."""
    n = int(config.estimated_parameters(base))
    dtype = base.config.dtype
    for device in [np] + ([base.xp] if base.xp is not np else []):
        require(
            bytes_of(n, dtype),
            f"this {type(config).__name__}'s adapter",
            f"for its {counted(n)} numbers ({dtype})",
            "make the adapter smaller",
            device,
        )


def check_step(model: Any, batch: int, seq_len: int, optimizer_states: int | None = None) -> None:
    """Before a model computes a batch of `batch` rows of `seq_len` tokens: its activations, and for a
    training step (optimizer_states: the optimizer's arrays per trainable one) the gradients and the
    optimizer's state. A model that offers no view() (a stand-in in a test) is not checked."""
    view = getattr(model, "view", None)
    if not callable(view) or batch < 1:
        return
    view = view()
    sites, params, config = view.sites, view.params, view.config
    embedding = 0 if sites.embedding is None else sites.embedding.positions(params)
    prefix = 0 if sites.prefix is None else sites.prefix.positions(params)
    trainable = 0 if optimizer_states is None else sum(math.prod(params[k].shape) for k in view.trainable)
    whole = view.xp is not np or sites.stochastic  # as engine.loss_and_grad splits a batch
    blocks = 1 if whole else len(runtime.row_blocks(batch, seq_len * config.n_embd))
    n = activation_count(config, batch, seq_len, embedding, prefix, trainable, blocks)
    n += (optimizer_states or 0) * trainable
    if optimizer_states is None:
        doing, held = "evaluating", "activations"
    else:
        doing, held = "a training step on", "activations, gradients and optimizer state"
    subject = f"{doing} a batch of {counted(batch)} x {counted(seq_len)} tokens"
    require(
        bytes_of(n, config.dtype), subject, f"({held}, {config.dtype})", "use a smaller batch_size or seq_len", view.xp
    )
