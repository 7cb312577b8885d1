"""OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"), as PEFT 0.21.2
computes it: a learned block-diagonal rotation of each targeted linear layer's input.

A targeted layer y = x W + b (W: (in, out), GPT-2's layout) becomes

    y = (x R) W + b,      R = diag(R_1, ..., R_r)  (in, in),  r blocks of size b = in / r,

each R_i the Cayley transform (exact, or PEFT's Neumann series: use_cayley_neumann) of a skew-symmetric S_i
(orthogonal.py) stored by its strict upper triangle: `oft_R.weight` (r, b(b−1)/2), or (1, b(b−1)/2) with
block_share. The effective weight is R W, W's rows rotated. Only the skew parameters train.

COFT (coft=True) holds each S to the ball ‖S‖_F ≤ eps/√(blocks stored). PEFT writes the projection into the
parameter before every forward, under no_grad: its gradient is OFT's at the projected value (straight
through). tinypeft's forward computes with the projected value and that gradient, and a training forward
writes the projection back as PEFT does, so training takes PEFT's projected steps.

PEFT applies OFT to nn.Linear only; y = (x R) W + b is its nn.Linear forward with the weight transposed.
docs/oft.md has the derivations.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import Array
from ..config import linear_module_names, shown
from ..errors import ConfigError
from ..ops import linear_backward, linear_forward
from ..sites import Sites
from .base import PEFT_PREFIX, Adapter, PeftConfig, match_modules, register
from .lora_variants import stop_gradient
from .orthogonal import (
    TARGET_FLAG,
    UNSUPPORTED,
    block_diagonal_matrix,
    block_rotate_backward,
    block_rotate_forward,
    cayley_backward,
    cayley_forward,
    check_choice,
    check_count,
    check_probability,
    coft_block_eps,
    coft_project,
    neumann_backward,
    neumann_forward,
    normalize_targets,
    refuse_unsupported,
    skew_from_upper_backward,
    skew_from_upper_forward,
    suggested_divisor,
    trained_biases,
)
from .registry import ODD_EPS, SMALL, Batch, ErrorCase, Flag, GoldenCase, MethodSpec, as_is, inert, register_method

if TYPE_CHECKING:
    from ..model import GPT


# ===================================================================== the math
def oft_rotation_forward(
    q: Array, block_size: int, eps_block: float | None, neumann_terms: int | None, held_shift: Array | None = None
) -> tuple[Array, tuple]:
    """The blocks R_i (k, b, b) from the stored upper triangles q (k, b(b−1)/2).

    COFT (eps_block given): q̃ = q projected onto the ball, with the straight-through derivative dq = dq̃ (PEFT
    projects under no_grad); written q̃ = proj(q) + (q − q) with the second q stopped, its value exactly proj(q).
    held_shift (finite differences only): q̃ = q + shift, the shift held fixed, so that q̃'s true derivative is
    the straight-through one. Then S = skew(q̃) and R = Cayley(S), exact or Neumann (neumann_terms).
    Cache: the Cayley step's cache and which form it took.
    """
    if held_shift is not None:
        q = q + held_shift
    elif eps_block is not None:
        q = coft_project(stop_gradient(q), eps_block) + (q - stop_gradient(q))
    S = skew_from_upper_forward(q, block_size)  # [k, b, b]
    if neumann_terms is None:
        R, cache = cayley_forward(S)
    else:
        R, cache = neumann_forward(S, neumann_terms)
    return R, (neumann_terms is not None, cache)


def oft_rotation_backward(dR: Array, cache: tuple) -> Array:
    """dq from dR (k, b, b): back through the Cayley step, then the skew gather; COFT's projection passes
    the gradient unchanged (straight through, as PEFT's no_grad projection does)."""
    neumann, inner = cache
    dS = neumann_backward(dR, inner) if neumann else cayley_backward(dR, inner)
    return skew_from_upper_backward(dS)  # [k, b(b−1)/2]


def oft_forward(x: Array, weight: Array, bias: Array, R: Array) -> tuple[Array, tuple]:
    """y = (x diag(R_1..R_r)) W + b: x (..., in), W (in, out), R (r or 1, b, b) -> y (..., out).
    Cache: the rotation's (x, R) and the linear layer's (x R, W)."""
    rotated, rotate_cache = block_rotate_forward(x, R)  # [..., in]
    y, linear_cache = linear_forward(rotated, weight, bias)  # [..., out]
    return y, (rotate_cache, linear_cache)


def oft_backward(
    dy: Array, cache: tuple, need_dx: bool = True, need_dR: bool = True, need_dbias: bool = False
) -> tuple[Array | None, Array | None, Array | None]:
    """(dx, dR, db). In the forward pass this was x' = x R_bd, y = x' W + b, so:
    dx' = dy Wᵀ (the frozen W's own gradient x'ᵀ dy is never computed), db = Σ dy, and dx, dR from the
    block rotation at dx' (orthogonal.block_rotate_backward)."""
    rotate_cache, linear_cache = cache
    drotated, _, db = linear_backward(dy, linear_cache, need_dx or need_dR, False, need_dbias)
    dx = dR = None
    if need_dx or need_dR:
        dx, dR = block_rotate_backward(drotated, rotate_cache, need_dx, need_dR)
    return dx, dR, db


# ===================================================================== config
@register
@dataclass
class OFTConfig(PeftConfig):
    """OFT with PEFT's field names and defaults.

    r: the number of blocks per layer, or oft_block_size: their size (exactly one is non-zero; r · b = the
    layer's in_features); target_modules: PEFT's matching (None: ["c_attn"]); coft, eps: the constrained
    variant and its radius; block_share: one block for the whole layer; use_cayley_neumann and
    num_cayley_neumann_terms: PEFT's series in place of the exact inverse; init_weights: True (S = 0, the
    identity rotation) or False (q ~ N(0, 0.1²): tests use it); bias: "none", "all" or "oft_only" (which base
    biases train too). module_dropout is accepted and, as in PEFT 0.21.2's nn.Linear forward, never applied.
    """

    peft_type = "OFT"
    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    exclude_modules: Any = None
    layers_to_transform: Any = None
    layers_pattern: Any = None
    modules_to_save: Any = None

    def __post_init__(self) -> None:
        check_count("OFTConfig", "r", self.r)
        check_count("OFTConfig", "oft_block_size", self.oft_block_size)
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(
                "OFTConfig: give exactly one of r (blocks per layer) and oft_block_size (their size), the other 0, "
                f"since r x oft_block_size = in_features; got r={shown(self.r)}, "
                f"oft_block_size={shown(self.oft_block_size)}"
            )
        terms = self.num_cayley_neumann_terms
        if isinstance(terms, bool) or not isinstance(terms, (int, np.integer)) or not 2 <= terms <= 100:
            # 1 term is the identity (nothing would train); the cap keeps a typo from building a huge series
            raise ConfigError(
                f"OFTConfig.num_cayley_neumann_terms must be an integer between 2 and 100; got {shown(terms)}"
            )
        for name in ("fan_in_fan_out", "init_weights", "coft", "block_share", "use_cayley_neumann"):
            check_choice("OFTConfig", name, getattr(self, name), (True, False))
        check_choice("OFTConfig", "bias", self.bias, ("none", "all", "oft_only"))
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < float("inf"):
            raise ConfigError(f"OFTConfig.eps must be a positive finite number (COFT's radius); got {shown(self.eps)}")
        p = check_probability("OFTConfig", "module_dropout", self.module_dropout)
        if p > 0:
            warnings.warn(
                f"OFTConfig.module_dropout={p}: PEFT 0.21.2 builds this dropout but its nn.Linear forward never "
                "applies it; tinypeft computes as PEFT does, without it",
                UserWarning,
                stacklevel=3,
            )
        self.target_modules = normalize_targets(self.target_modules)
        refuse_unsupported(self, UNSUPPORTED)

    def to_dict(self) -> dict[str, Any]:
        # PEFT >= 0.18 changed the Neumann series; without a version PEFT warns that the adapter may predate it
        return {**super().to_dict(), "peft_version": "0.21.2"}

    def targets(self, base: GPT) -> list[str]:
        return match_modules(linear_module_names(base.config), self.target_modules)

    def layer_shape(self, module: str, n_in: int) -> tuple[int, int]:
        """(r, b) for a layer of n_in input features, or a ConfigError saying why none fits."""
        given, value = ("oft_block_size", self.oft_block_size) if self.r == 0 else ("r", self.r)
        if n_in % value:
            raise ConfigError(
                f"OFTConfig.{given}={shown(value)} does not divide in_features={n_in} of {module} (r x "
                f"oft_block_size = in_features); PEFT would switch to {suggested_divisor(n_in, value)} with a warning; "
                f"choose a divisor of {n_in}"
            )
        r, b = (n_in // value, value) if self.r == 0 else (value, n_in // value)
        if b == 1:
            raise ConfigError(
                f"OFTConfig: blocks of size 1 at {module} ({given}={shown(value)}, in_features={n_in}) hold no "
                "rotation (0 parameters); use blocks of 2 or more"
            )
        return r, b

    def validate(self, base: GPT) -> None:
        for module in self.targets(base):
            self.layer_shape(module, base.params[module + ".weight"].shape[0])

    def estimated_parameters(self, base: GPT) -> int:
        total = 0
        for module in self.targets(base):
            n_in, n_out = base.params[module + ".weight"].shape
            r, b = self.layer_shape(module, n_in)
            total += (1 if self.block_share else r) * b * (b - 1) // 2 + (n_out if self.bias != "none" else 0)
        return total

    def build(self, base: GPT, seed: int = 0) -> OFTAdapter:
        return OFTAdapter.create(self, base, seed)


# ===================================================================== adapter
@dataclass(frozen=True)
class OFTLayer:
    """One targeted layer: its module, sizes, blocks (r of size b) and tensor names."""

    module: str
    in_features: int
    out_features: int
    r: int
    block_size: int
    stored_blocks: int  # r, or 1 with block_share

    @property
    def weight(self) -> str:
        return self.module + ".weight"

    @property
    def bias(self) -> str:
        return self.module + ".bias"

    @property
    def oft_R(self) -> str:
        return f"{PEFT_PREFIX}{self.module}.oft_R.weight"


class OFTAdapter(Adapter):
    """`oft_R.weight` for each targeted layer, and trained bias copies for bias="all"/"oft_only"."""

    def __init__(self, config: OFTConfig, base: GPT, params: dict[str, Array], overrides: Mapping[str, str],
                 layers: list[OFTLayer]) -> None:  # fmt: skip
        super().__init__(config, base, params, overrides)
        self.config: OFTConfig = config
        self.layers = layers

    @classmethod
    def create(cls, config: OFTConfig, base: GPT, seed: int) -> OFTAdapter:
        """Zeros (the identity rotation), or with init_weights=False N(0, 0.1²) as PEFT draws them (from NumPy's
        generator, in model order, not torch's)."""
        rng = np.random.default_rng(seed)
        layers, params = [], {}
        for module in config.targets(base):
            n_in, n_out = base.params[module + ".weight"].shape
            r, b = config.layer_shape(module, n_in)
            layer = OFTLayer(module, n_in, n_out, r, b, 1 if config.block_share else r)
            shape = (layer.stored_blocks, b * (b - 1) // 2)
            q = np.zeros(shape) if config.init_weights else rng.normal(0.0, 0.1, size=shape)
            params[layer.oft_R] = base.xp.asarray(q.astype(base.config.dtype))
            layers.append(layer)
        overrides = trained_biases(config.bias, base, [layer.module for layer in layers])
        params |= {name: base.params[base_name].copy() for base_name, name in overrides.items()}
        return cls(config, base, params, overrides, layers)

    def eps_block(self, layer: OFTLayer) -> float | None:
        return coft_block_eps(self.config.eps, layer.stored_blocks) if self.config.coft else None

    def neumann_terms(self) -> int | None:
        return self.config.num_cayley_neumann_terms if self.config.use_cayley_neumann else None

    def sites(self, training: bool = False) -> Sites:
        """A training forward first writes COFT's projection into the stored tensors, as PEFT's forward does
        (`self.weight.copy_(...)` under no_grad): the optimizer then steps from the projected value."""
        if training and self.config.coft:
            for layer in self.layers:
                q = self.params[layer.oft_R]
                q[...] = coft_project(q, self.eps_block(layer))
        site = OFTSite(self)
        return Sites(linear={layer.module: site for layer in self.layers})

    def merge(self, base_params: dict[str, Array]) -> None:
        """W <- R_bd W (its rows rotated: y = x (R_bd W) + b), with COFT's projected q; bias copies as trained."""
        super().merge(base_params)
        for layer in self.layers:
            R, _ = oft_rotation_forward(self.params[layer.oft_R], layer.block_size, self.eps_block(layer),
                                        self.neumann_terms())  # fmt: skip
            base_params[layer.weight] = block_diagonal_matrix(R, layer.in_features) @ base_params[layer.weight]

    def unmerge(self, base_params: dict[str, Array], originals: Mapping[str, Array]) -> None:
        """Put back the very arrays the merge replaced (exact). PEFT multiplies by inv(R) in float32, and the
        Neumann R is not orthogonal, so Rᵀ would not undo it either (docs/oft.md measures both)."""
        super().unmerge(base_params, originals)
        for layer in self.layers:
            base_params[layer.weight] = originals[layer.weight]


# ===================================================================== site
class OFTSite:
    """What stands in for each targeted layer in one forward and its backward. `held_shifts` (module -> array)
    holds COFT's projection shift fixed, for the finite-difference check (`holding_norms`)."""

    def __init__(self, adapter: OFTAdapter, held_shifts: Mapping[str, Array] | None = None) -> None:
        self.adapter = adapter
        self.layers = {layer.module: layer for layer in adapter.layers}
        self.held_shifts = held_shifts

    def holding_norms(self, params: Mapping[str, Array]) -> OFTSite:
        """This site with COFT's shift proj(q) − q held at its value at `params`: a forward whose true derivative
        is the straight-through gradient, which finite differences can check (the harness calls it)."""
        if not self.adapter.config.coft:
            return self
        shifts = {}
        for module, layer in self.layers.items():
            q = params[layer.oft_R]
            shifts[module] = coft_project(q, self.adapter.eps_block(layer)) - q
        return OFTSite(self.adapter, shifts)

    def forward(self, params: Mapping[str, Array], module: str, x: Array) -> tuple[Array, tuple]:
        layer, adapter = self.layers[module], self.adapter
        held = None if self.held_shifts is None else self.held_shifts[module]
        R, rotation_cache = oft_rotation_forward(
            params[layer.oft_R], layer.block_size, adapter.eps_block(layer), adapter.neumann_terms(), held
        )
        y, cache = oft_forward(x, params[layer.weight], params[layer.bias], R)
        return y, (layer, rotation_cache, cache)

    def backward(
        self, dy: Array, cache: tuple, trainable: Collection[str], need_dx: bool = True
    ) -> tuple[Array | None, dict[str, Array]]:
        layer, rotation_cache, inner = cache
        if layer.weight in trainable:
            raise ConfigError(f"{layer.weight} is trainable, but OFT keeps the base weight frozen")
        need_dR = layer.oft_R in trainable
        dx, dR, db = oft_backward(dy, inner, need_dx, need_dR, layer.bias in trainable)
        grads = {layer.bias: db} if db is not None else {}
        if need_dR:
            grads[layer.oft_R] = oft_rotation_backward(dR, rotation_cache)
        return dx, grads

    def owned(self, module: str) -> tuple[str, ...]:
        layer = self.layers[module]
        return layer.oft_R, layer.weight, layer.bias


# ===================================================================== the registry's entry
def _build(args: argparse.Namespace) -> OFTConfig:
    targets = None if args.target_modules is None else list(args.target_modules)
    return OFTConfig(oft_block_size=args.oft_block_size, target_modules=targets, coft=args.coft, eps=args.eps,
                     block_share=args.block_share, use_cayley_neumann=args.use_cayley_neumann == "true",
                     num_cayley_neumann_terms=args.num_cayley_neumann_terms)  # fmt: skip


FLAGS = (
    TARGET_FLAG,
    Flag(("--oft_block_size",), {"type": int, "default": 32,
         "help": "size b of each rotation block (divides in_features)"}),
    Flag(("--coft",), {"action": "store_true", "help": "constrained OFT: each block's S held to ||S|| <= eps"}),
    Flag(("--eps",), {"type": float, "default": 6e-5, "help": "COFT's radius"}),
    Flag(("--block_share",), {"action": "store_true", "help": "one rotation block shared by the whole layer"}),
    Flag(("--use_cayley_neumann",), {"choices": ["true", "false"], "default": "true",
         "help": "PEFT's truncated Neumann series (true) or the exact Cayley inverse (false)"}),
    Flag(("--num_cayley_neumann_terms",), {"type": int, "default": 5, "help": "terms of the Neumann series"}),
)  # fmt: skip

GOLDEN_CASES = (
    GoldenCase("oft", "odd", "r=1, exact Cayley: one block of 9 on c_attn and attn.c_proj, of 13 on mlp.c_proj",
               ODD_EPS, lambda: OFTConfig(r=1, oft_block_size=0, target_modules=["c_attn", "c_proj"],
                                          use_cayley_neumann=False),
               Batch(2, 7), seed=30),
    GoldenCase("oft", "neumann", "PEFT's default Neumann series (5 terms), blocks of 4 shared, bias='oft_only'; "
               "padded batch", SMALL,
               lambda: OFTConfig(oft_block_size=4, target_modules=["c_attn", "mlp.c_proj"], block_share=True,
                                 bias="oft_only"),
               Batch(3, 8, "mixed"), seed=31),
    GoldenCase("oft", "coft", "COFT (eps 0.5), blocks of 3 on c_attn and mlp.c_fc, Neumann series of 6 terms",
               ODD_EPS, lambda: OFTConfig(oft_block_size=3, target_modules=["c_attn", "mlp.c_fc"], coft=True,
                                          eps=0.5, num_cayley_neumann_terms=6),
               Batch(2, 7, "ends"), seed=32),
)  # fmt: skip


def _error_cases() -> list[ErrorCase]:
    def refused(when: str, config: Any, says: tuple[str, ...]) -> ErrorCase:
        return ErrorCase(when, as_is, ConfigError, says, config=config)

    return [
        refused("OFT with both r and oft_block_size zero", lambda: OFTConfig(r=0, oft_block_size=0),
                ("exactly one of r", "oft_block_size", "r=0, oft_block_size=0")),
        refused("OFT with both r and oft_block_size given", lambda: OFTConfig(r=2, oft_block_size=4),
                ("exactly one of r", "r=2, oft_block_size=4")),
        refused("OFT oft_block_size that does not divide in_features", lambda: OFTConfig(oft_block_size=3),
                ("oft_block_size=3", "does not divide in_features=8", "transformer.h.0.attn.c_attn",
                 "PEFT would switch to 2")),
        refused("OFT default oft_block_size (32) wider than the layer", OFTConfig,
                ("oft_block_size=32", "in_features=8", "switch to 8")),
        refused("OFT r that does not divide in_features", lambda: OFTConfig(r=3, oft_block_size=0),
                ("OFTConfig.r=3", "does not divide in_features=8")),
        refused("OFT blocks of size 1", lambda: OFTConfig(oft_block_size=1), ("size 1", "no rotation", "2 or more")),
        refused("OFT r negative", lambda: OFTConfig(r=-1), ("OFTConfig.r", "-1", "integer >= 0")),
        refused("OFT oft_block_size not an integer", lambda: OFTConfig(oft_block_size=4.0),
                ("oft_block_size", "4.0", "integer >= 0")),
        refused("OFT eps not positive", lambda: OFTConfig(eps=0.0), ("OFTConfig.eps", "0.0", "positive finite")),
        refused("OFT eps not finite", lambda: OFTConfig(eps=float("nan")), ("OFTConfig.eps", "nan")),
        refused("OFT module_dropout = 1", lambda: OFTConfig(module_dropout=1.0), ("module_dropout", "1.0", "[0, 1)")),
        refused("OFT bias unknown", lambda: OFTConfig(bias="lora_only"),
                ("OFTConfig.bias", "'lora_only'", "'none', 'all', 'oft_only'")),
        refused("OFT coft not a bool", lambda: OFTConfig(coft=1), ("OFTConfig.coft", "got 1", "(True, False)")),
        refused("OFT block_share not a bool", lambda: OFTConfig(block_share="no"),
                ("OFTConfig.block_share", "'no'", "(True, False)")),
        refused("OFT use_cayley_neumann not a bool", lambda: OFTConfig(use_cayley_neumann=None), ("None", "(True,")),
        refused("OFT init_weights not a bool", lambda: OFTConfig(init_weights="gaussian"),
                ("OFTConfig.init_weights", "'gaussian'", "(True, False)")),
        refused("OFT fan_in_fan_out not a bool", lambda: OFTConfig(fan_in_fan_out="yes"), ("fan_in_fan_out", "'yes'")),
        refused("OFT Neumann series of one term (the identity)", lambda: OFTConfig(num_cayley_neumann_terms=1),
                ("num_cayley_neumann_terms", "got 1", "between 2 and 100")),
        refused("OFT Neumann series past 100 terms", lambda: OFTConfig(num_cayley_neumann_terms=10**40),
                ("num_cayley_neumann_terms", "integer of 41 digits", "between 2 and 100")),
        refused("OFT option of PEFT's that tinypeft lacks", lambda: OFTConfig(layers_to_transform=[0]),
                ("layers_to_transform", "does not implement", "None")),
        refused("OFT target that does not exist", lambda: OFTConfig(oft_block_size=4, target_modules=["q_proj"]),
                ("'q_proj'", "matches no module", "'attn.c_attn'")),
    ]  # fmt: skip


COUPLED = "not flippable alone: r * oft_block_size is the layer width; the rotation's shape pins both"

register_method(MethodSpec(
    name="oft",
    help="OFT: a learned block diagonal rotation (Cayley) of --target_modules' inputs",
    default_lr=1e-2,
    build=_build,
    example=lambda cfg: OFTConfig(r=1, oft_block_size=0, target_modules=["c_attn", "c_fc"], init_weights=False,
                                  use_cayley_neumann=False),
    flags=FLAGS,
    golden_cases=GOLDEN_CASES,
    error_cases=_error_cases,
    inert_fields=inert(dropout=["module_dropout"], init=["init_weights"], linear=True, r=COUPLED,
                       oft_block_size=COUPLED,
                       peft_version="PEFT's bookkeeping of its files", **{"eps=6e-05": "read with coft only"}),
    peft_files="PEFT's OFT: base_model.model.<module>.oft_R.weight (r or 1, b(b-1)/2), .base_layer.bias (bias='all' "
    "or 'oft_only'), and PEFT's adapter_config.json fields. PEFT applies OFT to nn.Linear only: its GPT2LMHeadModel "
    "refuses it on Conv1D, so the adapter loads in PEFT on a GPT-2 whose Conv1D layers are nn.Linear (weights "
    "transposed), and PEFT's loads here",
    loads_in_peft=True,
))  # fmt: skip
