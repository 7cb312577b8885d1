"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"): a small
residual MLP inserted after a sublayer's output projection, h -> h + up(act(down(h))).

Houlsby places one after the attention output projection and one after the MLP, before each
residual add; here they stand at the linear sites attn.c_proj and mlp.c_proj (placement "both"),
or at one of them ("attn", "mlp"; "mlp" alone is Pfeiffer et al.'s placement). At a site whose base
layer is h = x W + b:

    a = h Wd^T + bd        down-projection   (N, C) -> (N, r)
    g = act(a)             non-linearity
    u = g Wu^T + bu        up-projection     (N, r) -> (N, C)
    y = h + u

Wd (r, C), Wu (C, r) are in torch.nn.Linear's (out, in) layout, like LoRA's lora_A/lora_B here, and
named in PEFT's style: `base_model.model.transformer.h.0.attn.c_proj.adapter_down.weight`.
Init: the down-projection like torch's nn.Linear (weight and bias U(-1/sqrt(C), 1/sqrt(C))), the
up-projection zero, so the adapter starts as the identity (u = 0) and the gradient reaches Wu first.

PEFT has no bottleneck adapters (a long-standing open request), so there is no PEFT file format to
match: adapter_config.json says peft_type "BOTTLENECK_ADAPTER", which only tinypeft loads. There is no
merge: act sits between the two projections, so h + up(act(down(h))) is not a linear map of h and no
change of W and b reproduces it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import Array, namespace
from ..config import shown
from ..errors import ConfigError, MergeError
from ..ops import gelu_tanh_backward, gelu_tanh_forward, linear_backward, linear_forward
from ..sites import Sites
from .base import PEFT_PREFIX, Adapter, PeftConfig, register
from .registry import ODD_EPS, SMALL, Batch, ErrorCase, Flag, GoldenCase, MethodSpec, as_is, register_method

if TYPE_CHECKING:
    from ..model import GPT

Params = Mapping[str, Array]

PLACEMENTS = {"both": ("attn.c_proj", "mlp.c_proj"), "attn": ("attn.c_proj",), "mlp": ("mlp.c_proj",)}
SUFFIXES = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")


# ------------------------------------------------------------------ non-linearities
def relu_forward(a: Array) -> tuple[Array, Array]:
    """g = max(a, 0). Cache: a."""
    xp = namespace(a)
    return xp.where(a > 0, a, 0.0), a


def relu_backward(dg: Array, a: Array) -> Array:
    """in the forward pass this was: g = max(a, 0), so da = dg where a > 0, else 0."""
    return dg * (a > 0)


def tanh_forward(a: Array) -> tuple[Array, Array]:
    """g = tanh(a). Cache: g."""
    g = namespace(a).tanh(a)
    return g, g


def tanh_backward(dg: Array, g: Array) -> Array:
    """in the forward pass this was: g = tanh(a), so da = dg (1 - g^2)."""
    return dg * (1.0 - g * g)


def silu_forward(a: Array) -> tuple[Array, tuple]:
    """g = a sigmoid(a). Cache: a and s = sigmoid(a)."""
    xp = namespace(a)
    s = 1.0 / (1.0 + xp.exp(-a))
    return a * s, (a, s)


def silu_backward(dg: Array, cache: tuple) -> Array:
    """in the forward pass this was: g = a s, s = sigmoid(a), so da = dg (s + a s (1 - s)),
    from d/da [a s(a)] = s + a s'(a) and s' = s (1 - s)."""
    a, s = cache
    return dg * (s + a * s * (1.0 - s))


ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "relu": (relu_forward, relu_backward),
    "gelu_tanh": (gelu_tanh_forward, gelu_tanh_backward),
    "tanh": (tanh_forward, tanh_backward),
    "silu": (silu_forward, silu_backward),
}


# ------------------------------------------------------------------ forward / backward
def bottleneck_forward(
    x: Array, W: Array, b: Array, Wd: Array, bd: Array, Wu: Array, bu: Array, non_linearity: str
) -> tuple[Array, tuple]:
    """y = h + act(h Wd^T + bd) Wu^T + bu,  h = x W + b.

    x (..., in), W (in, C), b (C,), Wd (r, C), bd (r,), Wu (C, r), bu (C,)  ->  y (..., C).
    Cache: the base layer's cache, h, Wd, Wu, the activation's cache and g = act(a).
    """
    act_forward = ACTIVATIONS[non_linearity][0]
    h, linear_cache = linear_forward(x, W, b)  # [..., in] -> [..., C]
    a = h @ Wd.T + bd  # [..., C] @ [C, r] -> [..., r]
    g, act_cache = act_forward(a)
    u = g @ Wu.T + bu  # [..., r] @ [r, C] -> [..., C]
    return h + u, (linear_cache, h, Wd, Wu, g, act_cache, non_linearity)


def bottleneck_backward(
    dy: Array,
    cache: tuple,
    need: Collection[str] = ("x", "Wd", "bd", "Wu", "bu"),
) -> dict[str, Array]:
    """Gradients of bottleneck_forward for the names in `need` ("x", "W", "b", "Wd", "bd", "Wu", "bu").

    in the forward pass this was: h = x W + b, a = h Wd^T + bd, g = act(a), u = g Wu^T + bu, y = h + u, so:
        dWu = dy^T g     dbu = sum dy     dg = dy Wu     da = act'(a) dg
        dWd = da^T h     dbd = sum da     dh = dy + da Wd   (the residual passes dy straight to h)
        then dx, dW, db from the base linear layer at dh.
    Sums run over every leading position (N = B*T rows).
    """
    linear_cache, h, Wd, Wu, g, act_cache, non_linearity = cache
    act_backward = ACTIVATIONS[non_linearity][1]
    C, r = Wu.shape
    dy2, h2, g2 = dy.reshape(-1, C), h.reshape(-1, C), g.reshape(-1, r)  # [N, C], [N, C], [N, r]
    grads = {}
    if "Wu" in need:
        grads["Wu"] = dy2.T @ g2  # [C, N] @ [N, r] -> [C, r]
    if "bu" in need:
        grads["bu"] = dy2.sum(axis=0)  # [C]
    need_below = {"x", "W", "b"} & set(need)
    if not ({"Wd", "bd"} & set(need) or need_below):
        return grads
    dg = dy2 @ Wu  # [N, C] @ [C, r] -> [N, r]
    da = act_backward(dg, _flat(act_cache, r))  # [N, r]
    if "Wd" in need:
        grads["Wd"] = da.T @ h2  # [r, N] @ [N, C] -> [r, C]
    if "bd" in need:
        grads["bd"] = da.sum(axis=0)  # [r]
    if need_below:
        dh = dy + (da @ Wd).reshape(dy.shape)  # [N, r] @ [r, C] -> [..., C]
        dx, dW, db = linear_backward(dh, linear_cache, "x" in need, "W" in need, "b" in need)
        grads |= {k: v for k, v in (("x", dx), ("W", dW), ("b", db)) if v is not None}
    return grads


def _flat(act_cache: Any, r: int) -> Any:
    """An activation's cache (an array or a tuple of arrays of shape (..., r)) viewed as (N, r)."""
    if isinstance(act_cache, tuple):
        return tuple(c.reshape(-1, r) for c in act_cache)
    return act_cache.reshape(-1, r)


@dataclass(frozen=True)
class BottleneckSite:
    """A linear site that adds the adapter of its module after the base layer."""

    non_linearity: str

    def forward(self, params: Params, module: str, x: Array) -> tuple[Array, tuple]:
        names = adapter_names(module)
        y, cache = bottleneck_forward(
            x, params[module + ".weight"], params[module + ".bias"], *(params[n] for n in names), self.non_linearity
        )
        return y, (module, cache)

    def backward(
        self, dy: Array, cache: tuple, trainable: Collection[str], need_dx: bool = True
    ) -> tuple[Array | None, dict[str, Array]]:
        module, inner = cache
        down_w, down_b, up_w, up_b = adapter_names(module)
        by_role = {"W": module + ".weight", "b": module + ".bias", "Wd": down_w, "bd": down_b, "Wu": up_w, "bu": up_b}
        need = [role for role, name in by_role.items() if name in trainable] + (["x"] if need_dx else [])
        grads = bottleneck_backward(dy, inner, need)
        return grads.pop("x", None), {by_role[role]: g for role, g in grads.items()}

    def owned(self, module: str) -> tuple[str, ...]:
        return module + ".weight", module + ".bias", *adapter_names(module)


def adapter_names(module: str) -> tuple[str, str, str, str]:
    """(down weight, down bias, up weight, up bias) of the adapter after `module`, in PEFT's naming."""
    return tuple(f"{PEFT_PREFIX}{module}.{suffix}" for suffix in SUFFIXES)  # type: ignore[return-value]


# ------------------------------------------------------------------ config and adapter
@register
@dataclass
class AdapterConfig(PeftConfig):
    """Houlsby bottleneck adapters of width bottleneck_size after attn.c_proj and/or mlp.c_proj.

    non_linearity: one of ACTIVATIONS ("relu", "gelu_tanh", "tanh", "silu").
    placement: "both" (Houlsby), "attn" or "mlp" (after the MLP only, as Pfeiffer et al.).
    init_weights=False draws the up-projection like the down-projection instead of zero (tests use it
    to make the adapter non-identity).
    """

    peft_type = "BOTTLENECK_ADAPTER"
    bottleneck_size: int = 16
    non_linearity: str = "relu"
    placement: str = "both"
    init_weights: bool = True

    def __post_init__(self) -> None:
        r = self.bottleneck_size
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError(f"AdapterConfig.bottleneck_size must be an integer >= 1; got {shown(r)}")
        if not isinstance(self.non_linearity, str) or self.non_linearity not in ACTIVATIONS:
            raise ConfigError(
                f"AdapterConfig.non_linearity must be one of {sorted(ACTIVATIONS)}; got {shown(self.non_linearity)}"
            )
        if not isinstance(self.placement, str) or self.placement not in PLACEMENTS:
            raise ConfigError(
                f"AdapterConfig.placement must be one of {sorted(PLACEMENTS)}; got {shown(self.placement)}"
            )
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"AdapterConfig.init_weights must be True or False; got {shown(self.init_weights)}")

    def modules(self, base: GPT) -> list[str]:
        return [f"transformer.h.{i}.{m}" for i in range(base.config.n_layer) for m in PLACEMENTS[self.placement]]

    def estimated_parameters(self, base: GPT) -> int:
        C, r = base.config.n_embd, self.bottleneck_size
        return len(self.modules(base)) * (2 * r * C + r + C)  # down (r, C) and (r,), up (C, r) and (C,)

    def build(self, base: GPT, seed: int = 0) -> Adapter:
        rng = np.random.default_rng(seed)
        C, r = base.config.n_embd, self.bottleneck_size
        params = {}
        for module in self.modules(base):
            down_w, down_b, up_w, up_b = adapter_names(module)
            k_down, k_up = 1 / np.sqrt(C), 1 / np.sqrt(r)  # torch.nn.Linear's default bound, 1/sqrt(fan_in)
            values = {
                down_w: rng.uniform(-k_down, k_down, size=(r, C)),
                down_b: rng.uniform(-k_down, k_down, size=r),
                up_w: np.zeros((C, r)) if self.init_weights else rng.uniform(-k_up, k_up, size=(C, r)),
                up_b: np.zeros(C) if self.init_weights else rng.uniform(-k_up, k_up, size=C),
            }
            params |= {k: base.xp.asarray(v.astype(base.config.dtype)) for k, v in values.items()}
        return BottleneckAdapter(self, base, params, self.modules(base))


class BottleneckAdapter(Adapter):
    """adapter_down/adapter_up weights and biases after each placed module."""

    def __init__(self, config: AdapterConfig, base: GPT, params: dict[str, Array], modules: list[str]) -> None:
        super().__init__(config, base, params)
        self.modules = modules

    def sites(self, training: bool = False) -> Sites:
        site = BottleneckSite(self.config.non_linearity)
        return Sites(linear={module: site for module in self.modules})

    def can_merge(self) -> bool:
        return False

    def merge_error(self) -> MergeError:
        return MergeError(
            f"bottleneck adapters cannot be merged: h + up({self.config.non_linearity}(down(h))) is not linear in h "
            "(the non-linearity sits between the two projections), so no change of the base weights computes it; "
            "keep the PeftModel to use the adapter"
        )


# ------------------------------------------------------------------ the registry's entry
def _build(args: argparse.Namespace) -> AdapterConfig:
    return AdapterConfig(
        bottleneck_size=args.bottleneck_size, non_linearity=args.non_linearity, placement=args.placement
    )


def _error_cases() -> list[ErrorCase]:
    return [
        ErrorCase("bottleneck_size 0", as_is, ConfigError, ("bottleneck_size", "got 0", ">= 1"),
                  config=lambda: AdapterConfig(bottleneck_size=0)),
        ErrorCase("adapter non_linearity unknown", as_is, ConfigError,
                  ("'swish'", "'gelu_tanh', 'relu', 'silu', 'tanh'"),
                  config=lambda: AdapterConfig(non_linearity="swish")),
        ErrorCase("adapter placement unknown", as_is, ConfigError, ("'everywhere'", "'attn', 'both', 'mlp'"),
                  config=lambda: AdapterConfig(placement="everywhere")),
        ErrorCase("adapter non_linearity unhashable", as_is, ConfigError, ("non_linearity", "['relu']", "one of"),
                  config=lambda: AdapterConfig(non_linearity=["relu"])),
        ErrorCase("adapter placement unhashable", as_is, ConfigError, ("placement", "{'both': 1}", "one of"),
                  config=lambda: AdapterConfig(placement={"both": 1})),
        ErrorCase("merging bottleneck adapters", lambda model: model.merge_and_unload(), MergeError,
                  ("bottleneck adapters cannot be merged", "not linear"), config=AdapterConfig),
    ]  # fmt: skip


register_method(MethodSpec(
    name="adapter",
    help="bottleneck adapters after attn.c_proj and mlp.c_proj",
    default_lr=3e-3,
    build=_build,
    # size 4 with gelu_tanh: with relu at size 2 some layers' units were all dead in some harness cases
    example=lambda cfg: AdapterConfig(bottleneck_size=4, non_linearity="gelu_tanh", init_weights=False),
    flags=(
        Flag(("--bottleneck_size",), {"type": int, "default": 16, "help": "bottleneck width"}),
        Flag(("--non_linearity",), {"choices": ["relu", "gelu_tanh", "tanh", "silu"], "default": "relu",
             "help": "activation"}),
        Flag(("--placement",), {"choices": ["both", "attn", "mlp"], "default": "both",
             "help": "after attention, MLP, or both"}),
    ),
    golden_cases=(
        GoldenCase("bottleneck_adapter", "relu", "relu, size 3, after attn.c_proj and mlp.c_proj", ODD_EPS,
                   lambda: AdapterConfig(bottleneck_size=3, non_linearity="relu"), Batch(2, 7), seed=30),
        GoldenCase("bottleneck_adapter", "gelu_attn", "gelu_tanh, size 4, after attn.c_proj only; padded batch", SMALL,
                   lambda: AdapterConfig(bottleneck_size=4, non_linearity="gelu_tanh", placement="attn"),
                   Batch(3, 8, "mixed"), seed=26),
        GoldenCase("bottleneck_adapter", "silu_rank1", "silu, size 1, after mlp.c_proj only", SMALL,
                   lambda: AdapterConfig(bottleneck_size=1, non_linearity="silu", placement="mlp"), Batch(2, 6),
                   seed=27),
        GoldenCase("bottleneck_adapter", "tanh", "tanh, size 2, both places; padded batch", ODD_EPS,
                   lambda: AdapterConfig(bottleneck_size=2, non_linearity="tanh"), Batch(3, 8, "mixed"), seed=28),
    ),
    error_cases=_error_cases,
    inert_fields={"init_weights": "an init (up-projection zero or random): the vectors store the tensors"},
    peft_files="PEFT has no bottleneck adapters: base_model.model.<module>.adapter_down/adapter_up.{weight,bias} "
    "with peft_type BOTTLENECK_ADAPTER, which only tinypeft loads; and no merge either (the non-linearity sits "
    "between the projections), so keep a PeftModel (or `tinypeft eval`/`generate --adapter`) to use one",
))  # fmt: skip
