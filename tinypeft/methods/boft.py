"""BOFT (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization"), as PEFT 0.21.2
computes it: OFT's block-diagonal rotation replaced by a product of F of them, each between butterfly
permutations, and a learned scale of each output feature.

A targeted layer y = x W + b (W: (in, out), GPT-2's layout) becomes

    y = ((x M) W) ⊙ s + b,      M = M_{F−1} ⋯ M_1 M_0,      M_f = P_f diag(R_{f,1}, ..., R_{f,D}) P_fᵀ,

D blocks of size H (D · H = in), each R_{f,d} the Cayley transform (orthogonal.py) of the skew part ½(X − Xᵀ) of
a stored square X: `boft_R` (F, D, H, H); s: `boft_s` (out, 1). P_f is PEFT's block butterfly permutation (the
identity for f = 0): it interleaves the features so that factor f mixes groups 2^f blocks apart, and the
product of F factors is a dense rotation of blocks 2^(F−1) times larger. F = 1 is OFT with a scale. `x M`
applies M_{F−1} first: PEFT builds M = M_{F−1} @ ... @ M_0 and computes x @ M.

PEFT applies BOFT to nn.Linear only, and without its CUDA extension (fbd_cuda, which needs CUDA and ninja) it
silently uses F = 1 whatever the config says; tinypeft computes the F the config asks for, which the tests
check against PEFT with the extension's block-diagonal kernel stood in for on the CPU. docs/oft.md derives it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import Array, namespace
from ..config import linear_module_names, shown
from ..errors import ConfigError
from ..ops import linear_backward, linear_forward
from ..sites import Sites
from .base import PEFT_PREFIX, Adapter, PeftConfig, match_modules, register
from .orthogonal import (
    TARGET_FLAG,
    UNSUPPORTED,
    Gather,
    butterfly_backward,
    butterfly_forward,
    butterfly_gathers,
    butterfly_matrix,
    butterfly_permutations,
    cayley_backward,
    cayley_forward,
    check_choice,
    check_count,
    check_probability,
    normalize_targets,
    refuse_unsupported,
    skew_part_backward,
    skew_part_forward,
    trained_biases,
)
from .registry import ODD_EPS, SMALL, Batch, ErrorCase, Flag, GoldenCase, MethodSpec, as_is, inert, register_method

if TYPE_CHECKING:
    from ..model import GPT


# ===================================================================== the math
def boft_rotations_forward(X: Array, drop: Array | None = None) -> tuple[Array, tuple]:
    """R_{f,d} = Cayley(½ (X − Xᵀ)) for every factor and block: X (F, D, H, H) -> R (F, D, H, H).

    drop (training only, PEFT's multiplicative dropout): (F, D, 1, 1), 1 where a block is replaced by the
    identity: R <- (1 − drop) R + drop I. Cache: the Cayley cache and drop.
    """
    xp = namespace(X)
    R, cayley_cache = cayley_forward(skew_part_forward(X))
    if drop is not None:
        R = (1 - drop) * R + drop * xp.eye(X.shape[-1], dtype=X.dtype)
    return R, (cayley_cache, drop)


def boft_rotations_backward(dR: Array, cache: tuple) -> Array:
    """dX: a dropped block gets no gradient (dR (1 − drop)), then back through Cayley and the skew part."""
    cayley_cache, drop = cache
    if drop is not None:
        dR = (1 - drop) * dR
    return skew_part_backward(cayley_backward(dR, cayley_cache))


def boft_forward(
    x: Array, weight: Array, bias: Array, R: Array, gathers: Sequence[Gather], s: Array
) -> tuple[Array, tuple]:
    """y = ((x M) W) ⊙ s + b: x (..., in), W (in, out), b (out,), R (F, D, H, H), s (out, 1) -> y (..., out).
    Cache: the butterfly's caches, the linear layer's (x M, W), z = (x M) W (for ds) and s."""
    rotated, butterfly_cache = butterfly_forward(x, R, gathers)  # [..., in]
    z, linear_cache = linear_forward(rotated, weight, None)  # [..., out]
    scale = s[:, 0]  # [out, 1] -> [out]
    return z * scale + bias, (butterfly_cache, linear_cache, z, scale)


def boft_backward(
    dy: Array, cache: tuple, gathers: Sequence[Gather], need_dx: bool = True, need_dparams: bool = True,
    need_dbias: bool = False,
) -> tuple[Array | None, Array | None, Array | None, Array | None]:  # fmt: skip
    """(dx, dR (F, D, H, H), ds, db). In the forward pass this was z = x' W, y = z ⊙ s + b, so:
    ds = Σ_positions dy ⊙ z (out, 1), db = Σ dy, dz = dy ⊙ s, dx' = dz Wᵀ, then back through the butterfly."""
    butterfly_cache, linear_cache, z, scale = cache
    n_out = z.shape[-1]
    dy2 = dy.reshape(-1, n_out)  # [N, out]
    ds = (dy2 * z.reshape(-1, n_out)).sum(axis=0)[:, None] if need_dparams else None  # [out, 1]
    db = dy2.sum(axis=0) if need_dbias else None
    dx = dR = None
    if need_dx or need_dparams:
        drotated, _, _ = linear_backward(dy * scale, linear_cache, True, False, False)  # [..., in]
        dx, dR = butterfly_backward(drotated, butterfly_cache, gathers, need_dx, need_dparams)
    return dx, dR, ds, db


# ===================================================================== config
@register
@dataclass
class BOFTConfig(PeftConfig):
    """BOFT with PEFT's field names and defaults.

    boft_block_size: H, or boft_block_num: D (exactly one non-zero; D · H = the layer's in_features);
    boft_n_butterfly_factor: F, the number of butterfly factors (1 is OFT's single block-diagonal rotation);
    target_modules: PEFT's matching (None: ["c_attn"]); boft_dropout: PEFT's multiplicative dropout, which in
    training replaces a random share of one random factor's blocks by the identity; init_weights: True (X = 0,
    s = 1: the identity) or False (X ~ N(0, 0.1²), s ~ N(1, 0.1²)); bias: "none", "all" or "boft_only".
    """

    peft_type = "BOFT"
    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: list[str] | str | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    exclude_modules: Any = None
    layers_to_transform: Any = None
    layers_pattern: Any = None
    modules_to_save: Any = None

    def __post_init__(self) -> None:
        check_count("BOFTConfig", "boft_block_size", self.boft_block_size)
        check_count("BOFTConfig", "boft_block_num", self.boft_block_num)
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ConfigError(
                "BOFTConfig: give exactly one of boft_block_size and boft_block_num, the other 0, since "
                f"boft_block_size x boft_block_num = in_features; got boft_block_size={shown(self.boft_block_size)}, "
                f"boft_block_num={shown(self.boft_block_num)}"
            )
        check_count("BOFTConfig", "boft_n_butterfly_factor", self.boft_n_butterfly_factor, minimum=1)
        for name in ("fan_in_fan_out", "init_weights"):
            check_choice("BOFTConfig", name, getattr(self, name), (True, False))
        check_choice("BOFTConfig", "bias", self.bias, ("none", "all", "boft_only"))
        check_probability("BOFTConfig", "boft_dropout", self.boft_dropout)
        self.target_modules = normalize_targets(self.target_modules)
        refuse_unsupported(self, UNSUPPORTED)

    def targets(self, base: GPT) -> list[str]:
        return match_modules(linear_module_names(base.config), self.target_modules)

    def layer_shape(self, module: str, n_in: int) -> tuple[int, int]:
        """(D, H) for a layer of n_in input features, with PEFT's conditions, or a ConfigError saying which fails."""
        size, num, doubling = self.boft_block_size, self.boft_block_num, self.boft_n_butterfly_factor - 1
        given, value = ("boft_block_size", size) if num == 0 else ("boft_block_num", num)
        where = f"in_features={n_in} of {module}"
        if n_in % value:
            raise ConfigError(f"BOFTConfig.{given}={shown(value)} does not divide {where}; choose a divisor of {n_in}")
        D, H = (n_in // size, size) if num == 0 else (num, n_in // num)
        if doubling > math.log2(D):  # 2^(F-1) blocks must fit (also keeps 2**doubling small)
            raise ConfigError(
                f"BOFTConfig.boft_n_butterfly_factor={shown(self.boft_n_butterfly_factor)} needs 2^(factor - 1) "
                f"blocks to pair up, but {where} has {D} block(s) of {H}; use at most {int(math.log2(D)) + 1}"
            )
        if doubling and (D % 2**doubling or H % 2):
            raise ConfigError(
                f"BOFTConfig: {D} block(s) of {H} at {module} (in_features={n_in}) cannot form "
                f"{self.boft_n_butterfly_factor} butterfly factors: the number of blocks must be a multiple of "
                f"2^(factor - 1) = {2**doubling} and the block size even"
            )
        if H == 1:
            raise ConfigError(
                f"BOFTConfig: blocks of size 1 at {module} ({given}={shown(value)}, in_features={n_in}) hold no "
                "rotation; use blocks of 2 or more"
            )
        return D, H

    def validate(self, base: GPT) -> None:
        for module in self.targets(base):
            self.layer_shape(module, base.params[module + ".weight"].shape[0])

    def estimated_parameters(self, base: GPT) -> int:
        total = 0
        for module in self.targets(base):
            n_in, n_out = base.params[module + ".weight"].shape
            D, H = self.layer_shape(module, n_in)
            total += self.boft_n_butterfly_factor * D * H * H + n_out + (n_out if self.bias != "none" else 0)
        return total

    def build(self, base: GPT, seed: int = 0) -> BOFTAdapter:
        return BOFTAdapter.create(self, base, seed)


# ===================================================================== adapter
@dataclass(frozen=True)
class BOFTLayer:
    """One targeted layer: module, sizes, F factors of D blocks of H, its permutations and tensor names."""

    module: str
    in_features: int
    out_features: int
    n_factors: int
    block_num: int
    block_size: int
    gathers: tuple[Gather, ...]  # per factor, (perm_f, inv_f) or None (orthogonal.butterfly_gathers)

    @property
    def weight(self) -> str:
        return self.module + ".weight"

    @property
    def bias(self) -> str:
        return self.module + ".bias"

    @property
    def boft_R(self) -> str:
        return f"{PEFT_PREFIX}{self.module}.boft_R"

    @property
    def boft_s(self) -> str:
        return f"{PEFT_PREFIX}{self.module}.boft_s"


class BOFTAdapter(Adapter):
    """`boft_R` (F, D, H, H) and `boft_s` (out, 1) for each targeted layer, and trained bias copies."""

    def __init__(self, config: BOFTConfig, base: GPT, params: dict[str, Array], overrides: Mapping[str, str],
                 layers: list[BOFTLayer], seed: int) -> None:  # fmt: skip
        super().__init__(config, base, params, overrides)
        self.config: BOFTConfig = config
        self.layers = layers
        self._dropout_keys = np.random.default_rng((seed, 1))  # one key per training forward, apart from the init

    @classmethod
    def create(cls, config: BOFTConfig, base: GPT, seed: int) -> BOFTAdapter:
        """X = 0 and s = 1 (the identity), or with init_weights=False X ~ N(0, 0.1²), s ~ N(1, 0.1²) as PEFT
        draws them (from NumPy's generator, in model order)."""
        rng = np.random.default_rng(seed)
        xp, dtype, F = base.xp, base.config.dtype, config.boft_n_butterfly_factor
        layers, params = [], {}
        for module in config.targets(base):
            n_in, n_out = base.params[module + ".weight"].shape
            D, H = config.layer_shape(module, n_in)
            layer = BOFTLayer(
                module, n_in, n_out, F, D, H, tuple(butterfly_gathers(butterfly_permutations(n_in, D, H, F)))
            )
            X = np.zeros((F, D, H, H)) if config.init_weights else rng.normal(0.0, 0.1, size=(F, D, H, H))
            s = np.ones((n_out, 1)) if config.init_weights else rng.normal(1.0, 0.1, size=(n_out, 1))
            params[layer.boft_R] = xp.asarray(X.astype(dtype))
            params[layer.boft_s] = xp.asarray(s.astype(dtype))
            layers.append(layer)
        overrides = trained_biases(config.bias, base, [layer.module for layer in layers])
        params |= {name: base.params[base_name].copy() for base_name, name in overrides.items()}
        return cls(config, base, params, overrides, layers, seed)

    def sites(self, training: bool = False) -> Sites:
        p = self.config.boft_dropout
        key = int(self._dropout_keys.integers(2**63)) if training and p > 0 else None
        site = BOFTSite(self, key)
        return Sites(linear={layer.module: site for layer in self.layers})

    def merge(self, base_params: dict[str, Array]) -> None:
        """W <- (M W) ⊙ s per output column (y = x (M W) s + b); the bias is not scaled; trained bias copies
        replace the base biases."""
        super().merge(base_params)
        for layer in self.layers:
            R, _ = boft_rotations_forward(self.params[layer.boft_R])
            M = butterfly_matrix(R, layer.gathers, layer.in_features)
            base_params[layer.weight] = (M @ base_params[layer.weight]) * self.params[layer.boft_s][:, 0]

    def unmerge(self, base_params: dict[str, Array], originals: Mapping[str, Array]) -> None:
        """Put back the very arrays the merge replaced (exact; PEFT multiplies by Mᵀ and divides by s)."""
        super().unmerge(base_params, originals)
        for layer in self.layers:
            base_params[layer.weight] = originals[layer.weight]


def dropout_blocks(key: tuple[int, int], n_factors: int, n_blocks: int, p: float, dtype: str) -> np.ndarray:
    """PEFT's MultiplicativeDropoutLayer: in one random factor, int(p · D) random blocks become the identity.
    (F, D, 1, 1), 1 where dropped; drawn from a generator seeded by `key` (the same mask on every call)."""
    rng = np.random.default_rng(key)
    drop = np.zeros((n_factors, n_blocks, 1, 1), dtype=dtype)
    factor = rng.integers(n_factors)
    drop[factor, rng.permutation(n_blocks)[: int(p * n_blocks)]] = 1
    return drop


# ===================================================================== site
class BOFTSite:
    """What stands in for each targeted layer in one forward and its backward; `dropout_key` (None: no dropout)
    seeds every layer's dropped blocks."""

    def __init__(self, adapter: BOFTAdapter, dropout_key: int | None = None) -> None:
        self.adapter = adapter
        self.dropout_key = dropout_key
        self.layers = {layer.module: layer for layer in adapter.layers}
        self.index = {layer.module: i for i, layer in enumerate(adapter.layers)}

    def forward(self, params: Mapping[str, Array], module: str, x: Array) -> tuple[Array, tuple]:
        layer, adapter = self.layers[module], self.adapter
        drop = None
        if self.dropout_key is not None:
            mask = dropout_blocks((self.dropout_key, self.index[module]), layer.n_factors, layer.block_num,
                                  adapter.config.boft_dropout, adapter.dtype)  # fmt: skip
            drop = adapter.xp.asarray(mask)
        R, rotation_cache = boft_rotations_forward(params[layer.boft_R], drop)
        y, cache = boft_forward(x, params[layer.weight], params[layer.bias], R, layer.gathers, params[layer.boft_s])
        return y, (layer, rotation_cache, cache)

    def backward(
        self, dy: Array, cache: tuple, trainable: Collection[str], need_dx: bool = True
    ) -> tuple[Array | None, dict[str, Array]]:
        layer, rotation_cache, inner = cache
        if layer.weight in trainable:
            raise ConfigError(f"{layer.weight} is trainable, but BOFT keeps the base weight frozen")
        need_dparams = not {layer.boft_R, layer.boft_s}.isdisjoint(trainable)
        dx, dR, ds, db = boft_backward(dy, inner, layer.gathers, need_dx, need_dparams, layer.bias in trainable)
        grads = {layer.bias: db} if db is not None else {}
        if need_dparams:
            grads[layer.boft_R] = boft_rotations_backward(dR, rotation_cache)
            grads[layer.boft_s] = ds
        return dx, {name: g for name, g in grads.items() if name in trainable}

    def owned(self, module: str) -> tuple[str, ...]:
        layer = self.layers[module]
        return layer.boft_R, layer.boft_s, layer.weight, layer.bias


# ===================================================================== the registry's entry
def _build(args: argparse.Namespace) -> BOFTConfig:
    return BOFTConfig(
        boft_block_size=args.boft_block_size,
        boft_block_num=args.boft_block_num,
        boft_n_butterfly_factor=args.boft_n_butterfly_factor,
        boft_dropout=args.boft_dropout,
        target_modules=None if args.target_modules is None else list(args.target_modules),
    )


FLAGS = (
    TARGET_FLAG,
    Flag(("--boft_block_size",), {"type": int, "default": 4, "help": "block size H (0: give --boft_block_num)"}),
    Flag(("--boft_block_num",), {"type": int, "default": 0, "help": "blocks per factor D (0: from the block size)"}),
    Flag(("--boft_n_butterfly_factor",), {"type": int, "default": 1, "help": "butterfly factors F (1: OFT-like)"}),
    Flag(("--boft_dropout",), {"type": float, "default": 0.0, "help": "share of one factor's blocks set to I"}),
)  # fmt: skip

GOLDEN_CASES = (
    GoldenCase("boft", "odd", "one factor, boft_block_num=1: a block of 9 on c_attn, of 13 on mlp.c_proj", ODD_EPS,
               lambda: BOFTConfig(boft_block_size=0, boft_block_num=1, target_modules=["c_attn", "mlp.c_proj"]),
               Batch(2, 7), seed=33),
    GoldenCase("boft", "butterfly", "3 butterfly factors of blocks of 2 on c_attn and mlp.c_proj; padded batch",
               SMALL, lambda: BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=3,
                                         target_modules=["c_attn", "mlp.c_proj"]),
               Batch(3, 8, "mixed"), seed=34),
    GoldenCase("boft", "block_num", "2 factors of 4 blocks on mlp.c_fc and mlp.c_proj, bias='boft_only'; padded "
               "at both ends", SMALL,
               lambda: BOFTConfig(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2,
                                  target_modules=["mlp.c_fc", "mlp.c_proj"], bias="boft_only"),
               Batch(2, 8, "ends"), seed=35),
)  # fmt: skip


def _error_cases() -> list[ErrorCase]:
    def refused(when: str, config: Any, says: tuple[str, ...]) -> ErrorCase:
        return ErrorCase(when, as_is, ConfigError, says, config=config)

    return [
        refused("BOFT with both boft_block_size and boft_block_num zero",
                lambda: BOFTConfig(boft_block_size=0, boft_block_num=0),
                ("exactly one of boft_block_size and boft_block_num", "boft_block_size=0, boft_block_num=0")),
        refused("BOFT with both boft_block_size and boft_block_num given",
                lambda: BOFTConfig(boft_block_size=2, boft_block_num=4), ("exactly one", "boft_block_num=4")),
        refused("BOFT boft_block_size that does not divide in_features", lambda: BOFTConfig(boft_block_size=3),
                ("boft_block_size=3", "does not divide in_features=8", "transformer.h.0.attn.c_attn")),
        refused("BOFT boft_block_num that does not divide in_features",
                lambda: BOFTConfig(boft_block_size=0, boft_block_num=3), ("boft_block_num=3", "in_features=8")),
        refused("BOFT blocks of size 1", lambda: BOFTConfig(boft_block_size=1), ("size 1", "no rotation")),
        refused("BOFT more butterfly factors than the blocks allow",
                lambda: BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=3),
                ("boft_n_butterfly_factor=3", "2 block(s) of 4", "at most 2")),
        refused("BOFT huge boft_n_butterfly_factor (answered at once)",
                lambda: BOFTConfig(boft_n_butterfly_factor=10**40), ("integer of 41 digits", "at most")),
        refused("BOFT butterfly with an odd block size",
                lambda: BOFTConfig(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=2),
                ("8 block(s) of 1", "2 butterfly factors", "block size even")),
        refused("BOFT boft_n_butterfly_factor zero", lambda: BOFTConfig(boft_n_butterfly_factor=0),
                ("boft_n_butterfly_factor", "got 0", "integer >= 1")),
        refused("BOFT boft_block_size negative", lambda: BOFTConfig(boft_block_size=-4),
                ("boft_block_size", "-4", "integer >= 0")),
        refused("BOFT boft_dropout = 1", lambda: BOFTConfig(boft_dropout=1.0), ("boft_dropout", "1.0", "[0, 1)")),
        refused("BOFT bias unknown", lambda: BOFTConfig(bias="oft_only"),
                ("BOFTConfig.bias", "'oft_only'", "'none', 'all', 'boft_only'")),
        refused("BOFT init_weights not a bool", lambda: BOFTConfig(init_weights=0),
                ("BOFTConfig.init_weights", "got 0", "(True, False)")),
        refused("BOFT option of PEFT's that tinypeft lacks", lambda: BOFTConfig(exclude_modules=["c_proj"]),
                ("exclude_modules", "does not implement")),
        refused("BOFT target that is not a linear layer", lambda: BOFTConfig(target_modules=["ln_1"]),
                ("'ln_1'", "matches no module", "'attn.c_attn'")),
    ]  # fmt: skip


COUPLED = "not flippable alone: block_num * block_size is the layer width; the factors' shapes pin both"

register_method(MethodSpec(
    name="boft",
    help="BOFT: butterfly products of block diagonal rotations of --target_modules' inputs, and an output scale",
    default_lr=1e-1,
    build=_build,
    example=lambda cfg: BOFTConfig(boft_block_size=0, boft_block_num=1, target_modules=["c_attn", "c_fc"],
                                   init_weights=False),
    flags=FLAGS,
    golden_cases=GOLDEN_CASES,
    error_cases=_error_cases,
    inert_fields=inert(dropout=["boft_dropout"], init=["init_weights"], linear=True, boft_block_num=COUPLED,
                       boft_block_size=COUPLED, **{"boft_n_butterfly_factor=1": "others refused by its blocks"}),
    peft_files="PEFT's BOFT: base_model.model.<module>.boft_R (F, D, H, H) and .boft_s (out, 1), .base_layer.bias "
    "(bias='all' or 'boft_only'), and PEFT's adapter_config.json fields. PEFT applies BOFT to nn.Linear only (an "
    "adapter loads in PEFT on a GPT-2 whose Conv1D layers are nn.Linear), and without its CUDA extension it makes "
    "one factor whatever boft_n_butterfly_factor says, so an adapter of 2 or more factors loads there only where "
    "the extension builds",
    loads_in_peft=True,
))  # fmt: skip
