"""Optimizers made for LoRA: LoRA+ (Hayou et al. 2024) and LoRA-FA (Zhang et al. 2023), with PEFT's semantics.

LoRA+ (`create_loraplus_optimizer`, PEFT's function of that name): B learns loraplus_lr_ratio times faster
than A. PEFT sorts the trainable tensors into torch parameter groups, each with its learning rate and weight
decay, which this file keeps as one tinypeft optimizer per group:

    group        tensors                                                   lr            weight decay
    A            every other trainable tensor (the A's)                    lr            loraplus_weight_decay
    embedding    LoRA on embedding layers (none in tinypeft: linear only)  lr_embedding  loraplus_weight_decay
    B            lora_B, and 1-D tensors (DoRA's m) not a bias or LayerNorm lr · ratio   loraplus_weight_decay
    B, no decay  1-D biases and LayerNorm tensors (bias="all"/"lora_only") lr · ratio    0

As in torch, a group's weight decay applies to every tensor in it (tinypeft's own optimizers decay matrices
only), and the `weight_decay` given with the optimizer's options is overridden by the groups' (PEFT's
`loraplus_weight_decay`, default 0): passing weight_decay=0.01 alone decays nothing, in PEFT and here.

LoRA-FA (`LoraFA`, PEFT's `create_lorafa_optimizer` and `LoraFAOptimizer`): A stays frozen at its init and B
takes the projected gradient, the B step whose update s·ΔB·A best approximates a full fine-tune's step of W
(`projected_b_gradient`), then an AdamW step as Hugging Face's AdamW computes it (`hf_adamw_update`); every
other trainable tensor (trained biases) takes that AdamW step with its plain gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .backend import Array, namespace
from .errors import CheckpointError, ConfigError
from .methods.lora import LoraAdapter
from .methods.lora_multi import in_memory_name
from .optim import Optimizer, _check_positive

LORAPLUS_GROUPS = ("A", "embedding", "B", "B_no_decay")


# ===================================================================== LoRA+
def loraplus_group(name: str, param: Array) -> str:
    """PEFT's group for a trainable tensor: "lora_B" or 1-D goes with B (without decay if a bias or LayerNorm,
    which transformers' get_parameter_names leaves out of decay), the rest with A."""
    if "lora_B" in name or param.ndim == 1:
        layernorm = any(part.startswith("ln_") for part in name.split("."))
        return "B_no_decay" if "bias" in name or layernorm else "B"
    return "A"


class GroupedOptimizer(Optimizer):
    """torch's parameter groups over tinypeft's optimizers: each tensor takes the learning rate and weight decay
    of its group (`group_of(name)`); a learning rate given to `step` (a schedule's) scales every group's as
    torch's schedulers do. State and `t` are the inner optimizers', saved as one optimizer's."""

    def __init__(
        self,
        optimizer_cls: type[Optimizer],
        group_of: Callable[[str], str],
        settings: Mapping[str, tuple[float, float]],
        lr: float,
        **options: Any,
    ) -> None:
        super().__init__(lr, 0.0)
        whole = type(f"{optimizer_cls.__name__}Group", (optimizer_cls,), {"decays": _decays_whole_group})
        self.inner = {g: whole(lr=glr, weight_decay=wd, **options) for g, (glr, wd) in settings.items()}
        self.group_of = group_of
        self.SLOTS = optimizer_cls.SLOTS

    def step(self, params: Mapping[str, Array], grads: Mapping[str, Array], lr: float | None = None) -> None:
        unknown = set(grads) - set(params)
        if unknown:
            raise ConfigError(f"gradients for unknown parameters {sorted(unknown)[:3]}")
        self.t += 1
        scale = 1.0 if lr is None else lr / self.lr
        for group, inner in self.inner.items():
            mine = {n: g for n, g in grads.items() if self.group_of(n) == group}
            inner.step(params, mine, inner.lr * scale)

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {"t": np.array([self.t], dtype=np.int64)}
        for inner in self.inner.values():
            out |= {k: v for k, v in inner.state_dict().items() if k != "t"}
        return out

    def load_state_dict(self, state: Mapping[str, Any], params: Mapping[str, Array]) -> None:
        if not isinstance(state, Mapping) or "t" not in state:
            raise CheckpointError("optimizer state must map names to arrays and hold the step counter 't'")
        for group, inner in self.inner.items():
            mine = {k: v for k, v in state.items() if k == "t" or self.group_of(k.partition("/")[2]) == group}
            inner.load_state_dict(mine, {n: p for n, p in params.items() if self.group_of(n) == group})
        self.t = next(iter(self.inner.values())).t


def _decays_whole_group(self: Optimizer, param: Array) -> bool:
    return self.weight_decay > 0  # torch: a group's weight decay applies to each of its tensors


def create_loraplus_optimizer(
    model: Any,
    optimizer_cls: type[Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    loraplus_weight_decay: float = 0.0,
    **options: Any,
) -> GroupedOptimizer:
    """LoRA+ over `model`'s trainable tensors (PEFT's `create_loraplus_optimizer`): optimizer_cls (AdamW, SGD)
    per group, B's learning rate lr · loraplus_lr_ratio (PEFT's docs: a ratio >= 1, the paper uses 2^4).
    `options` go to every group's optimizer (betas, eps, momentum), except weight_decay, which the groups set."""
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
        raise ConfigError(f"optimizer_cls must be a tinypeft optimizer class (AdamW, SGD); got {optimizer_cls!r}")
    for name, value in (("lr", lr), ("loraplus_lr_ratio", loraplus_lr_ratio), ("loraplus_lr_embedding",
                        loraplus_lr_embedding), ("loraplus_weight_decay", loraplus_weight_decay)):  # fmt: skip
        _check_positive(name, value)
    options.pop("weight_decay", None)  # PEFT passes it on, but every group sets its own
    trainable = model.trainable_parameters()
    groups = {n: loraplus_group(n, p) for n, p in trainable.items()}
    settings = {
        "A": (lr, loraplus_weight_decay),
        "embedding": (loraplus_lr_embedding, loraplus_weight_decay),
        "B": (lr * loraplus_lr_ratio, loraplus_weight_decay),
        "B_no_decay": (lr * loraplus_lr_ratio, 0.0),
    }
    return GroupedOptimizer(optimizer_cls, lambda n: groups.get(n, "A"), settings, lr, **options)


# ===================================================================== LoRA-FA
def projected_b_gradient(dB: Array, A: Array, scaling: float, delta: float = 1e-8) -> Array:
    """LoRA-FA's gradient of B with A frozen: (1/s²) dB (A Aᵀ + δ I)⁺, (out, r).

    With A fixed, a step ΔB moves the weight by s ΔB A (the (out, in) orientation). A full fine-tune's step
    follows G = ∂L/∂W_effᵀ (out, in), and LoRA's own gradient is dB = s G Aᵀ. The ΔB whose s ΔB A is closest to G
    (least squares, ridge δ) solves s² ΔB (A Aᵀ + δ I) = dB, so ΔB = (1/s²) dB (A Aᵀ + δ I)⁻¹. δ = 1e-8 and the
    pseudo-inverse are PEFT's (which on a CPU with bfloat16 computes this product in bfloat16 under autocast for
    float32 tensors; float64 is not autocast)."""
    xp = namespace(A)
    r = A.shape[0]
    gram = A @ A.T + delta * xp.eye(r, dtype=A.dtype)  # [r, in] @ [in, r] -> [r, r]
    return (1.0 / scaling**2) * (dB @ xp.linalg.pinv(gram))  # [out, r] @ [r, r]


def hf_adamw_update(p: Array, g: Array, m: Array, v: Array, t: int, lr: float, betas, eps: float, wd: float) -> None:
    """One step of Hugging Face's AdamW ("adamw_hf", which LoRA-FA's optimizer is), in place: eps is added to
    √v before the bias correction, which moves into the step size, and the decay follows the step, on the
    updated p, for every tensor:

        m <- b1 m + (1 - b1) g        v <- b2 v + (1 - b2) g²
        p <- p - lr √(1 - b2^t) / (1 - b1^t) · m / (√v + eps)        p <- p - lr wd p
    """
    b1, b2 = betas
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * (g * g)
    step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
    p -= step_size * (m / (namespace(p).sqrt(v) + eps))
    if wd > 0:
        p -= (lr * wd) * p


class LoraFA(Optimizer):
    """LoRA-FA over a PeftModel's active LoRA adapter(s): A frozen (its gradient, if given, is ignored), B stepped
    with `projected_b_gradient`, the rest with plain AdamW; every step is `hf_adamw_update` (PEFT's defaults:
    betas (0.9, 0.999), eps 1e-6). DoRA is refused: its magnitude would take a plain step and its direction a
    projection that ignores it (PEFT pairs it with the next layer's A)."""

    SLOTS = ("exp_avg", "exp_avg_sq")

    def __init__(
        self, model: Any, lr: float = 1e-3, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-6
    ) -> None:
        super().__init__(lr, weight_decay)
        _check_positive("eps", eps)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), eps
        self.pairs: dict[str, tuple[str, float]] = {}  # B's name -> (A's name, the adapter's scaling)
        several = len(model.active_adapters) > 1
        for adapter_name in model.active_adapters:
            adapter = model.adapters[adapter_name]
            if not isinstance(adapter, LoraAdapter) or adapter.config.use_dora:
                kind = "DoRA" if isinstance(adapter, LoraAdapter) else adapter.config.peft_type
                raise ConfigError(f"LoRA-FA trains LoRA's B with A frozen; adapter {adapter_name!r} is {kind}")
            for layer in adapter.layers:
                a, b = layer.lora_A, layer.lora_B
                if several:
                    a, b = in_memory_name(a, adapter_name), in_memory_name(b, adapter_name)
                self.pairs[b] = (a, adapter.config.scaling)
        self.frozen = {a for a, _ in self.pairs.values()}

    def step(self, params: Mapping[str, Array], grads: Mapping[str, Array], lr: float | None = None) -> None:
        unknown = set(grads) - set(params)
        if unknown:
            raise ConfigError(f"gradients for unknown parameters {sorted(unknown)[:3]}")
        self.t += 1
        lr = self.lr if lr is None else lr
        for name, g in grads.items():
            if name in self.frozen:
                continue
            if name in self.pairs:
                a_name, scaling = self.pairs[name]
                g = projected_b_gradient(g, params[a_name], scaling)
            slots = self.state.setdefault(name, {})
            if not slots:
                slots["exp_avg"], slots["exp_avg_sq"] = namespace(g).zeros_like(g), namespace(g).zeros_like(g)
            p = params[name]
            hf_adamw_update(p, g, slots["exp_avg"], slots["exp_avg_sq"], self.t, lr, self.betas, self.eps,
                            self.weight_decay)  # fmt: skip
