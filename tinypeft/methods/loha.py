"""LoHa (Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning"; as LyCORIS and PEFT's tuners/loha apply it to fine-tuning): a weight delta that is the
Hadamard (elementwise) product of two rank-r products,

    Δ = s · (W1a W1b) ⊙ (W2a W2b),      s = alpha / r,      W1a, W2a: (out, r),  W1b, W2b: (r, in)

in PEFT's nn.Linear layout (out, in), added to a targeted layer as y = x (W + Δᵀ) + b (lycoris.py). Each
product has rank ≤ r, their Hadamard product rank ≤ r²: a rank-r² update for 2r(in + out) numbers, twice
LoRA's at the same r.

PEFT's LoHa accepts only nn.Linear (and convolutions), not GPT-2's Conv1D; tinypeft keeps PEFT's tensor
names and shapes for a Linear of the same sizes, so an adapter saved here loads in PEFT on a GPT-2 whose
Conv1D layers are replaced by equivalent nn.Linear layers (docs/loha.md). Init (PEFT's
reset_adapter_parameters): W1a, W1b, W2a ~ kaiming_uniform(a=√5), W2b = 0, so Δ = 0 and the adapter starts
as the base model; init_weights=False draws W2b likewise (tests use it).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import Array
from .base import register
from .lycoris import FLAGS, DeltaAdapter, DeltaLayer, LycorisConfig, common_error_cases, common_kwargs, kaiming_uniform
from .registry import ODD_EPS, SMALL, Batch, GoldenCase, MethodSpec, inert, register_method

TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


# ===================================================================== the math
def loha_delta_forward(w1a: Array, w1b: Array, w2a: Array, w2b: Array, scale: float) -> tuple[Array, tuple]:
    """Δ = s · (W1a W1b) ⊙ (W2a W2b): (out, in).

    W1a, W2a: (out, r), W1b, W2b: (r, in). Cache: the four factors, both products P1 = W1a W1b and
    P2 = W2a W2b (each (out, in), the size of Δ; recomputing them would cost two more matmuls), and s.
    """
    P1 = w1a @ w1b  # [out, r] @ [r, in] -> [out, in]
    P2 = w2a @ w2b  # [out, r] @ [r, in] -> [out, in]
    return scale * P1 * P2, (w1a, w1b, w2a, w2b, P1, P2, scale)


def loha_delta_backward(ddelta: Array, cache: tuple) -> tuple[Array, Array, Array, Array]:
    """(dW1a, dW1b, dW2a, dW2b) from dΔ (out, in).

    In the forward pass this was Δ = s P1 ⊙ P2 with P1 = W1a W1b, P2 = W2a W2b, so:
        dP1 = s dΔ ⊙ P2,        dP2 = s dΔ ⊙ P1                       (out, in)
        dW1a = dP1 W1bᵀ (out, r),    dW1b = W1aᵀ dP1 (r, in)           (a matmul's rule, for each product)
        dW2a = dP2 W2bᵀ (out, r),    dW2b = W2aᵀ dP2 (r, in)
    """
    w1a, w1b, w2a, w2b, P1, P2, scale = cache
    dP1 = scale * ddelta * P2  # [out, in]
    dP2 = scale * ddelta * P1  # [out, in]
    return dP1 @ w1b.T, w1a.T @ dP1, dP2 @ w2b.T, w2a.T @ dP2  # [out, r], [r, in], [out, r], [r, in]


# ===================================================================== config and adapter
@register
@dataclass
class LoHaConfig(LycorisConfig):
    """PEFT's LoHaConfig: r, alpha (s = alpha / r), rank_dropout, module_dropout, target_modules (None:
    GPT-2's ["c_attn"]), init_weights (True: W2b = 0, the identity; False: every factor random), and the
    shared fields of LycorisConfig."""

    peft_type = "LOHA"

    def tensor_shapes(self, n_in: int, n_out: int) -> dict[str, tuple[int, int]]:
        r = self.r
        return {"hada_w1_a": (n_out, r), "hada_w1_b": (r, n_in), "hada_w2_a": (n_out, r), "hada_w2_b": (r, n_in)}

    def build(self, base: Any, seed: int = 0) -> LoHaAdapter:
        return LoHaAdapter.create(self, base, seed)


class LoHaAdapter(DeltaAdapter):
    """hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b for each targeted layer, under PEFT's file names
    (`base_model.model.transformer.h.0.attn.c_attn.hada_w1_a`)."""

    @staticmethod
    def init_tensors(config: Any, shapes: Mapping[str, tuple[int, int]], rng: np.random.Generator) -> dict:
        """PEFT's reset_adapter_parameters (init_weights=True): W2b = 0, the rest kaiming-uniform; its
        reset_adapter_parameters_random (False): all four kaiming-uniform. Drawn in PEFT's order."""
        tensors = {name: kaiming_uniform(rng, shapes[name]) for name in TENSORS[:3]}
        w2b = shapes["hada_w2_b"]
        tensors["hada_w2_b"] = np.zeros(w2b) if config.init_weights else kaiming_uniform(rng, w2b)
        return tensors

    def delta_t_forward(self, params: Mapping[str, Array], layer: DeltaLayer) -> tuple[Array, tuple]:
        """Δᵀ = s (W1bᵀ W1aᵀ) ⊙ (W2bᵀ W2aᵀ): the same pair on the factors transposed (views), in W's layout."""
        w1a, w1b, w2a, w2b = (params[layer.tensors[name]] for name in TENSORS)
        return loha_delta_forward(w1b.T, w1a.T, w2b.T, w2a.T, self.config.scaling)

    def delta_t_backward(self, ddelta_t: Array, cache: tuple, layer: DeltaLayer) -> dict[str, Array]:
        # the gradients of the transposed factors: W1bᵀ (in, r), W1aᵀ (r, out), W2bᵀ, W2aᵀ; each goes back transposed
        dw1b_t, dw1a_t, dw2b_t, dw2a_t = loha_delta_backward(ddelta_t, cache)
        grads = (dw1a_t, dw1b_t, dw2a_t, dw2b_t)
        return {layer.tensors[name]: g.T.copy() for name, g in zip(TENSORS, grads, strict=True)}

    def rescales_rank_dropout(self) -> bool:
        return True  # PEFT's LoHa always divides the kept rows by their mean


# ===================================================================== the registry's entry
def _build(args: argparse.Namespace) -> LoHaConfig:
    return LoHaConfig(**common_kwargs(args))


ALL_LINEAR = ["c_attn", "c_proj", "c_fc"]
GOLDEN_CASES = (
    GoldenCase("loha", "odd", "LoHa r=2, alpha 3 on every kind of linear layer", ODD_EPS,
               lambda: LoHaConfig(r=2, alpha=3, target_modules=ALL_LINEAR), Batch(2, 7), seed=41),
    GoldenCase("loha", "rank1_padded", "LoHa r=1 on c_attn (PEFT's default target); padded batch", SMALL,
               lambda: LoHaConfig(r=1, alpha=2), Batch(3, 8, "mixed"), seed=42),
    GoldenCase("loha", "rank3_mlp", "LoHa r=3 > in/out ratio, alpha 1, on the MLP only; padded at both ends",
               ODD_EPS, lambda: LoHaConfig(r=3, alpha=1, target_modules=["mlp.c_fc", "mlp.c_proj"]),
               Batch(2, 7, "ends"), seed=43),
)  # fmt: skip


register_method(MethodSpec(
    name="loha",
    help="LoHa: a Hadamard product of two rank-r updates on --target_modules; its rate was picked by a sweep "
    "(docs/loha.md)",
    default_lr=3e-2,
    build=_build,
    example=lambda cfg: LoHaConfig(r=2, alpha=3, target_modules=ALL_LINEAR, init_weights=False),
    flags=FLAGS,
    golden_cases=GOLDEN_CASES,
    error_cases=lambda: common_error_cases("LoHa", LoHaConfig),
    inert_fields=inert(also_unimplemented=["rank_pattern", "alpha_pattern"], dropout=["rank_dropout", "module_dropout"],
                       init=["init_weights"], use_effective_conv2d="for convolutions; GPT-2 has none"),
    peft_files="PEFT's LOHA: base_model.model.<module>.hada_w1_a (out, r), .hada_w1_b (r, in), .hada_w2_a, "
    ".hada_w2_b, and PEFT's adapter_config.json fields; PEFT's LoHa takes nn.Linear layers only, so the "
    "adapter loads in PEFT on GPT-2 with its Conv1D layers made nn.Linear (weights transposed; same module "
    "names), and back",
    loads_in_peft=True,
))  # fmt: skip
