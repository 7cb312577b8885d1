"""LoKr (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation"; LyCORIS's `lokr`, PEFT's tuners/lokr): a weight delta that is the Kronecker product of two
small matrices, either of them a full matrix or a rank-r product,

    Δ = s · W1 ⊗ W2,    s = alpha / r,    W1: (a, c),  W2: (b, d),  out = a·b,  in = c·d

in PEFT's nn.Linear layout (out, in), added to a targeted layer as y = x (W + Δᵀ) + b (lycoris.py).
The sizes come from PEFT's `factorization`: in = c·d = factorization(in, decompose_factor), out = a·b =
factorization(out, decompose_factor). W2 is the product W2a W2b (b, r)(r, d) when r < max(b, d) / 2, else a
full matrix; W1 likewise (W1a W1b, (a, r)(r, c)) when decompose_both and r < max(a, c) / 2. A full factor
is PEFT's choice too: r then only enters through s.

As for LoHa, tinypeft keeps PEFT's tensor names and Linear shapes, so an adapter saved here loads in PEFT on
a GPT-2 whose Conv1D layers are nn.Linear (docs/lokr.md). Init (PEFT's init_weights): True: W1 = 0 (or
W1a = 0, W1b kaiming-uniform), W2 (or W2a, W2b) kaiming-uniform, so Δ = 0; "lycoris": W1 kaiming, W2 = 0
(or W2b = 0, W2a kaiming); False: every factor kaiming-uniform.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..backend import Array
from ..config import shown
from ..errors import ConfigError
from .base import register
from .lycoris import FLAGS, DeltaAdapter, DeltaLayer, LycorisConfig, common_error_cases, common_kwargs, kaiming_uniform
from .registry import ODD_EPS, SMALL, Batch, ErrorCase, Flag, GoldenCase, MethodSpec, as_is, inert, register_method


# ===================================================================== the math
def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (and LyCORIS's) split of a dimension into m · n, m <= n unless `factor` divides it.

    factor > 0 dividing the dimension: (factor, dimension // factor), in that order. Otherwise a walk up the
    divisors m of the dimension while m < n = dimension / m and m <= factor (-1: no limit), then the pair
    sorted: m ends as the largest divisor with m <= √dimension (and <= factor). 128 -> (8, 16), 127 -> (1, 127),
    128 with factor 4 -> (4, 32), 9 with factor 2 -> (1, 9). The walk is PEFT's statement for statement: its
    test of m + n against `length`, which stays 1 + dimension, never stops it.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def kron(A: Array, B: Array) -> Array:
    """The Kronecker product: A (a, c), B (b, d) -> (a·b, c·d), entry [i·b + k, j·d + l] = A[i, j] B[k, l].
    Written with broadcasting and a reshape, so that autograd and CuPy follow it."""
    (a, c), (b, d) = A.shape, B.shape
    return (A[:, None, :, None] * B[None, :, None, :]).reshape(a * b, c * d)  # [a, b, c, d] -> [a·b, c·d]


def lokr_delta_forward(w1: Array, w2: Array, scale: float) -> tuple[Array, tuple]:
    """Δ = s · W1 ⊗ W2: (out, in) = (a·b, c·d) from W1 (a, c) and W2 (b, d). Cache: W1, W2 and s."""
    return scale * kron(w1, w2), (w1, w2, scale)


def lokr_delta_backward(ddelta: Array, cache: tuple) -> tuple[Array, Array]:
    """(dW1, dW2) from dΔ (a·b, c·d).

    In the forward pass this was Δ[i·b + k, j·d + l] = s W1[i, j] W2[k, l]. Read dΔ as blocks: dΔ reshaped to
    (a, b, c, d) and moved to G = (a, c, b, d), G[i, j] is the (b, d) block that W1[i, j] multiplied W2 into:
        dW1[i, j] = s Σ_kl G[i, j, k, l] W2[k, l]       (a, c): each block's inner product with W2
        dW2[k, l] = s Σ_ij W1[i, j] G[i, j, k, l]       (b, d): the blocks summed, weighted by W1
    both one matmul once G is (a·c, b·d).
    """
    w1, w2, scale = cache
    (a, c), (b, d) = w1.shape, w2.shape
    G = ddelta.reshape(a, b, c, d).transpose(0, 2, 1, 3).reshape(a * c, b * d)  # block (i, j) is row i·c + j
    dw1 = scale * (G @ w2.reshape(b * d)).reshape(a, c)  # [a·c, b·d] @ [b·d] -> [a, c]
    dw2 = scale * (w1.reshape(a * c) @ G).reshape(b, d)  # [a·c] @ [a·c, b·d] -> [b, d]
    return dw1, dw2


def factor_forward(params: Mapping[str, Array], tensors: Mapping[str, str], which: str) -> tuple[Array, Any]:
    """W1 or W2 (`which` "w1"/"w2"): the full matrix lokr_<which>, or the product lokr_<which>_a @ lokr_<which>_b.
    Cache: None for a full matrix, else the two factors."""
    if f"lokr_{which}" in tensors:
        return params[tensors[f"lokr_{which}"]], None
    A, B = params[tensors[f"lokr_{which}_a"]], params[tensors[f"lokr_{which}_b"]]
    return A @ B, (A, B)  # [rows, r] @ [r, cols]


def factor_backward(dW: Array, cache: Any, tensors: Mapping[str, str], which: str) -> dict[str, Array]:
    """In the forward pass this was W = A B (or W itself), so dA = dW Bᵀ, dB = Aᵀ dW."""
    if cache is None:
        return {tensors[f"lokr_{which}"]: dW}
    A, B = cache
    return {tensors[f"lokr_{which}_a"]: dW @ B.T, tensors[f"lokr_{which}_b"]: A.T @ dW}


# ===================================================================== config and adapter
@register
@dataclass
class LoKrConfig(LycorisConfig):
    """PEFT's LoKrConfig: LycorisConfig's fields, and decompose_both (W1 low-rank too, when r is small
    enough), decompose_factor (-1: split each dimension near its square root; f > 0: f · (dim / f) where f
    divides it, else the best split with its smaller part <= f), rank_dropout_scale (divide the kept rows by
    the fraction kept), init_weights True, False or "lycoris"."""

    peft_type = "LOKR"
    INIT_CHOICES: ClassVar[tuple[Any, ...]] = (True, False, "lycoris")
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"LoKrConfig.{name} must be True or False; got {shown(getattr(self, name))}")
        f = self.decompose_factor
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not (f == -1 or f > 0):
            raise ConfigError(
                f"LoKrConfig.decompose_factor must be -1 (no preference) or a positive integer; got {shown(f)}"
            )

    def tensor_shapes(self, n_in: int, n_out: int) -> dict[str, tuple[int, int]]:
        """PEFT's LoKrLayer.update_layer for a Linear: out = a·b, in = c·d; W1 (a, c), W2 (b, d), each a full
        matrix or (rows, r) and (r, cols) factors."""
        r = self.r
        c, d = factorization(n_in, self.decompose_factor)
        a, b = factorization(n_out, self.decompose_factor)
        shapes: dict[str, tuple[int, int]] = {}
        if self.decompose_both and r < max(a, c) / 2:
            shapes |= {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
        else:
            shapes["lokr_w1"] = (a, c)
        if r < max(b, d) / 2:
            shapes |= {"lokr_w2_a": (b, r), "lokr_w2_b": (r, d)}
        else:
            shapes["lokr_w2"] = (b, d)
        return shapes

    def build(self, base: Any, seed: int = 0) -> LoKrAdapter:
        return LoKrAdapter.create(self, base, seed)


# which tensors each init sets to zero (the rest are kaiming-uniform): PEFT's reset_adapter_parameters (True),
# reset_adapter_parameters_lycoris_way ("lycoris") and reset_adapter_parameters_random (False)
ZEROS = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}


class LoKrAdapter(DeltaAdapter):
    """lokr_w1 (or lokr_w1_a, lokr_w1_b) and lokr_w2 (or lokr_w2_a, lokr_w2_b) for each targeted layer, under
    PEFT's file names (`base_model.model.transformer.h.0.attn.c_attn.lokr_w1`)."""

    @staticmethod
    def init_tensors(config: Any, shapes: Mapping[str, tuple[int, int]], rng: np.random.Generator) -> dict:
        zeros = ZEROS[config.init_weights]
        return {k: np.zeros(shape) if k in zeros else kaiming_uniform(rng, shape) for k, shape in shapes.items()}

    def delta_t_forward(self, params: Mapping[str, Array], layer: DeltaLayer) -> tuple[Array, tuple]:
        """Δᵀ = s · W1ᵀ ⊗ W2ᵀ ((A ⊗ B)ᵀ = Aᵀ ⊗ Bᵀ): the same pair on the factors transposed, in W's layout."""
        w1, cache1 = factor_forward(params, layer.tensors, "w1")  # [a, c]
        w2, cache2 = factor_forward(params, layer.tensors, "w2")  # [b, d]
        delta_t, cache = lokr_delta_forward(w1.T, w2.T, self.config.scaling)  # [c·d, a·b] = [in, out]
        return delta_t, (cache, cache1, cache2)

    def delta_t_backward(self, ddelta_t: Array, cache: tuple, layer: DeltaLayer) -> dict[str, Array]:
        inner, cache1, cache2 = cache
        dw1_t, dw2_t = lokr_delta_backward(ddelta_t, inner)  # [c, a], [d, b]
        dw1, dw2 = dw1_t.T.copy(), dw2_t.T.copy()  # C-ordered, as the factors are
        return factor_backward(dw1, cache1, layer.tensors, "w1") | factor_backward(dw2, cache2, layer.tensors, "w2")

    def rescales_rank_dropout(self) -> bool:
        return self.config.rank_dropout_scale


# ===================================================================== the registry's entry
def _build(args: argparse.Namespace) -> LoKrConfig:
    return LoKrConfig(
        **common_kwargs(args),
        decompose_both=args.decompose_both,
        decompose_factor=args.decompose_factor,
        rank_dropout_scale=args.rank_dropout_scale,
    )


def _error_cases() -> list[ErrorCase]:
    def refused(when: str, kwargs: dict[str, Any], says: tuple[str, ...]) -> ErrorCase:
        return ErrorCase(f"LoKr {when}", as_is, ConfigError, says, config=lambda: LoKrConfig(**kwargs))

    return [
        *common_error_cases("LoKr", LoKrConfig),
        refused("decompose_factor 0", {"decompose_factor": 0}, ("LoKrConfig.decompose_factor", "got 0", "-1")),
        refused("decompose_factor not an integer", {"decompose_factor": 2.5}, ("decompose_factor", "got 2.5")),
        refused("decompose_both not a bool", {"decompose_both": 1}, ("LoKrConfig.decompose_both", "got 1")),
        refused("rank_dropout_scale not a bool", {"rank_dropout_scale": "yes"}, ("rank_dropout_scale", "'yes'")),
    ]


ALL_LINEAR = ["c_attn", "c_proj", "c_fc"]
GOLDEN_CASES = (
    GoldenCase("lokr", "odd", "LoKr r=1, alpha 2 on every kind of linear layer: W2 low-rank, 13 = 1·13", ODD_EPS,
               lambda: LoKrConfig(r=1, alpha=2, target_modules=ALL_LINEAR), Batch(2, 7), seed=49),
    GoldenCase("lokr", "decompose_both", "LoKr r=1, decompose_both: W1 and W2 both low-rank; padded batch", SMALL,
               lambda: LoKrConfig(r=1, alpha=3, decompose_both=True), Batch(3, 8, "mixed"), seed=45),
    GoldenCase("lokr", "factor4_full", "LoKr decompose_factor 4, r=4: W1 and W2 full matrices, on c_fc and c_proj",
               SMALL, lambda: LoKrConfig(r=4, alpha=2, decompose_factor=4, target_modules=["c_fc", "c_proj"]),
               Batch(2, 6), seed=46),
    GoldenCase("lokr", "factor2_odd", "LoKr decompose_factor 2 on odd sizes (9 = 1·9: 2 does not divide it); "
               "padded at both ends", ODD_EPS, lambda: LoKrConfig(r=2, alpha=1, decompose_factor=2,
               target_modules=["c_attn", "mlp.c_proj"]), Batch(2, 7, "ends"), seed=47),
)  # fmt: skip


register_method(MethodSpec(
    name="lokr",
    help="LoKr: a Kronecker product of two small factors on --target_modules; its rate was picked by a sweep "
    "(docs/lokr.md)",
    default_lr=3e-2,
    build=_build,
    example=lambda cfg: LoKrConfig(r=1, alpha=2, decompose_both=True, target_modules=ALL_LINEAR, init_weights=False),
    flags=(
        *FLAGS,
        Flag(("--decompose_both",), {"action": "store_true", "help": "make W1 low-rank too (when r is small enough)"}),
        Flag(("--decompose_factor",), {"type": int, "default": -1,
             "help": "split each dimension as f x dim/f (-1: near its square root)"}),
        Flag(("--rank_dropout_scale",), {"action": "store_true", "help": "divide the rows rank dropout keeps by "
             "the fraction kept"}),
    ),
    golden_cases=GOLDEN_CASES,
    error_cases=_error_cases,
    inert_fields=inert(also_unimplemented=["rank_pattern", "alpha_pattern"], init=["init_weights"],
                       dropout=["rank_dropout", "module_dropout", "rank_dropout_scale"],
                       use_effective_conv2d="for convolutions; GPT-2 has none"),
    peft_files="PEFT's LOKR: base_model.model.<module>.lokr_w1 (a, c) or .lokr_w1_a/.lokr_w1_b, and .lokr_w2 "
    "(b, d) or .lokr_w2_a/.lokr_w2_b, out = a·b and in = c·d, and PEFT's adapter_config.json fields; PEFT's LoKr "
    "takes nn.Linear layers only, so the adapter loads in PEFT on GPT-2 with its Conv1D layers made nn.Linear "
    "(weights transposed; same module names), and back",
    loads_in_peft=True,
))  # fmt: skip
