"""Several LoRA adapters active at once (PEFT's `set_adapter([...])` for LoRA): their updates add.

A linear layer targeted by the active adapters i computes

    y = x W + b + Σ_i s_i · x_d,i A_iᵀ B_iᵀ,        x_d,i = x ⊙ keep_i (adapter i's own dropout)

so its effective weight is W + Σ_i s_i (B_i A_i)ᵀ, and the gradients are each adapter's own LoRA gradients
with dy shared (below). Every adapter keeps its tensors; in the flat parameter dict they take PEFT's
in-memory names, which carry the adapter's name (`base_model.model.transformer.h.0.attn.c_attn.lora_A.x.weight`)
because the file names (no adapter name) would clash. Gradients come back under those names, as PEFT's
`named_parameters` gives them.

Plain LoRA and rsLoRA only: a DoRA adapter rescales the whole output, PiSSA computes with a residual W of its
own and trained biases would be two copies of one bias, so none of these adds to another adapter's update.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from ..backend import Array
from ..config import shown
from ..errors import ConfigError
from ..sites import Sites
from .base import Adapter
from .lora import LoraAdapter, LoraLayer


# ===================================================================== the math
def lora_sum_forward(
    x: Array, weight: Array, bias: Array, factors: Sequence[tuple[Array, Array, float, Array | None]]
) -> tuple[Array, tuple]:
    """y = x W + b + Σ_i s_i · (x ⊙ keep_i) A_iᵀ B_iᵀ for factors (A_i (r_i, in), B_i (out, r_i), s_i, keep_i or
    None). Cache: per adapter x_d,i and h_i = x_d,i A_iᵀ (N, r_i), as `lora_forward` keeps them for one."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in)  # [B, T, in] -> [N, in]
    y = x2 @ weight + bias  # [N, in] @ [in, out] -> [N, out]
    kept = []
    for A, B, s, keep in factors:
        x_drop = x2 if keep is None else x2 * keep.reshape(-1, n_in)  # [N, in]
        h = x_drop @ A.T  # [N, in] @ [in, r_i] -> [N, r_i]
        y = y + (s * h) @ B.T  # [N, r_i] @ [r_i, out] -> [N, out]
        kept.append((x_drop, h, None if keep is None else keep.reshape(-1, n_in)))
    return y.reshape(*lead, weight.shape[1]), (weight, factors, kept)


def lora_sum_backward(dy: Array, cache: tuple, need_dx: bool = True) -> tuple[Array | None, list[tuple[Array, Array]]]:
    """(dx, [(dA_i, dB_i)]) for y = x W + b + Σ_i s_i h_i B_iᵀ, h_i = x_d,i A_iᵀ: each adapter's own LoRA gradient,

        dB_i = s_i dyᵀ h_i,   dh_i = s_i dy B_i,   dA_i = dh_iᵀ x_d,i,   dx = dy Wᵀ + Σ_i (dh_i A_i) ⊙ keep_i,

    the paths joining at x. W and b are frozen: their gradients are never computed."""
    weight, factors, kept = cache
    n_in, n_out = weight.shape
    # in the forward pass this was: y = x W + b + Σ_i s_i (x_d,i A_iᵀ) B_iᵀ, so now:
    dy2 = dy.reshape(-1, n_out)  # [N, out]
    dx = dy2 @ weight.T if need_dx else None  # [N, out] @ [out, in]
    grads = []
    for (A, B, s, _), (x_drop, h, keep) in zip(factors, kept, strict=True):
        dh = s * (dy2 @ B)  # [N, out] @ [out, r_i] -> [N, r_i]
        grads.append((dh.T @ x_drop, s * (dy2.T @ h)))  # dA_i [r_i, in], dB_i [out, r_i]
        if need_dx:
            lora_dx = dh @ A  # [N, r_i] @ [r_i, in]
            dx = dx + (lora_dx if keep is None else lora_dx * keep)
    return None if dx is None else dx.reshape(*dy.shape[:-1], n_in), grads


# ===================================================================== names, checks, site
def in_memory_name(file_name: str, adapter_name: str) -> str:
    """PEFT's in-memory name of a LoRA tensor: `...c_attn.lora_A.weight` -> `...c_attn.lora_A.<adapter>.weight`."""
    stem, _, leaf = file_name.rpartition(".")
    return f"{stem}.{adapter_name}.{leaf}"


def check_several(adapters: Mapping[str, Adapter]) -> None:
    """Refuse a set of adapters whose updates do not simply add (see the module docstring)."""
    for name, adapter in adapters.items():
        config = adapter.config
        why = (
            f"it is {config.peft_type}" if not isinstance(adapter, LoraAdapter)
            else "it is DoRA, which rescales the whole output" if config.use_dora
            else "it is PiSSA, which computes with a residual weight of its own" if config.init_lora_weights == "pissa"
            else f"it trains biases (bias={config.bias!r}), which the others would share" if config.bias != "none"
            else "it changes the token table (wte or trainable_token_indices)" if adapter.sites().tokens is not None
            else ""
        )  # fmt: skip
        if why:
            raise ConfigError(
                f"several active adapters add their updates, which plain LoRA adapters do; {name!r} cannot: {why} "
                f"(active: {shown(list(adapters))})"
            )


class SeveralLoraSite:
    """The site of every linear layer any of the active LoRA adapters targets. Each adapter's own `LoraSite`
    (drawn for this forward) supplies its dropout mask, so each adapter drops as it would alone."""

    def __init__(self, adapters: Mapping[str, LoraAdapter], training: bool) -> None:
        self.parts: dict[str, list[tuple[str, LoraAdapter, LoraLayer, Any]]] = {}
        stochastic = False
        for name, adapter in adapters.items():
            sites = adapter.sites(training)
            stochastic |= sites.stochastic
            for layer in adapter.layers:
                self.parts.setdefault(layer.module, []).append((name, adapter, layer, sites.linear[layer.module]))
        self.stochastic = stochastic

    def keep_mask(self, adapter_name: str, module: str, shape: tuple[int, ...]) -> Any:
        """Adapter `adapter_name`'s dropout multiplier at `module` in this forward (None without dropout)."""
        site = next(site for n, _, _, site in self.parts[module] if n == adapter_name)
        return site.keep_mask(module, shape)

    def names(self, module: str) -> list[tuple[str, str]]:
        return [(in_memory_name(lay.lora_A, n), in_memory_name(lay.lora_B, n)) for n, _, lay, _ in self.parts[module]]

    def forward(self, params: Mapping[str, Array], module: str, x: Array) -> tuple[Array, tuple]:
        factors = []
        for (a_name, b_name), (_, adapter, _, site) in zip(self.names(module), self.parts[module], strict=True):
            keep = site.keep_mask(module, x.shape)
            keep = None if keep is None else adapter.xp.asarray(keep)
            factors.append((params[a_name], params[b_name], adapter.config.scaling, keep))
        y, cache = lora_sum_forward(x, params[module + ".weight"], params[module + ".bias"], factors)
        return y, (module, cache)

    def backward(
        self, dy: Array, cache: tuple, trainable: Collection[str], need_dx: bool = True
    ) -> tuple[Array | None, dict[str, Array]]:
        module, inner = cache
        if module + ".weight" in trainable or module + ".bias" in trainable:
            raise ConfigError(f"{module}'s weight or bias is trainable, but LoRA keeps the base layer frozen")
        dx, grads = lora_sum_backward(dy, inner, need_dx)
        out = {}
        for (a_name, b_name), (dA, dB) in zip(self.names(module), grads, strict=True):
            out |= {k: g for k, g in ((a_name, dA), (b_name, dB)) if k in trainable}
        return dx, out

    def owned(self, module: str) -> tuple[str, ...]:
        return (*(n for pair in self.names(module) for n in pair), module + ".weight", module + ".bias")


def several_lora_parts(adapters: Mapping[str, LoraAdapter], training: bool) -> tuple[dict[str, Array], Sites]:
    """(the adapters' tensors under their in-memory names, the sites) for the active adapters together."""
    check_several(adapters)
    tensors = {in_memory_name(k, n): v for n, a in adapters.items() for k, v in a.params.items()}
    site = SeveralLoraSite(adapters, training)
    return tensors, Sites(linear=dict.fromkeys(site.parts, site), stochastic=site.stochastic)
