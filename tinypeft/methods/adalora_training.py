"""What AdaLoRA adds to training, beside its linear sites (tinypeft/methods/adalora.py): the orthogonality
regulariser, a `Sites.loss_terms` entry every loss includes, and the rank allocator, which the training loop calls
after each optimizer step (`Adapter.after_step`). Both as PEFT 0.21.2 computes them (peft/tuners/adalora/model.py,
AdaLoraModel.forward and update_and_allocate; layer.py, RankAllocator); docs/adalora.md derives them.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import Array, namespace, to_numpy
from ..config import shown
from ..errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from .adalora import AdaLoraConfig, AdaLoraLayer

STATISTICS = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # PEFT's names: the importance and its two moving averages


# ===================================================================== the regulariser
def orthogonality_forward(pairs: list[tuple[Array, Array]], weight: float) -> tuple[Any, tuple]:
    """R = w / (2L) · Σ_layers (‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F): PEFT's regulariser over the L layers' (A, B).

    A: (r, in), B: (out, r); both Gram matrices are (r, r). Cache: each D = Gram − I and its norm.
    """
    total, cache = 0.0, []
    for A, B in pairs:
        xp = namespace(A, B)
        D_A = A @ A.T - xp.eye(A.shape[0], dtype=A.dtype)  # [r, in] @ [in, r] -> [r, r]
        D_B = B.T @ B - xp.eye(B.shape[1], dtype=B.dtype)  # [r, out] @ [out, r] -> [r, r]
        n_A, n_B = _frobenius(D_A), _frobenius(D_B)
        total = total + n_A + n_B
        cache.append((A, B, D_A, D_B, n_A, n_B))
    factor = weight / (2 * len(pairs))
    return total * factor, (cache, factor)


def _frobenius(D: Array) -> Any:
    return (D * D).sum() ** 0.5


def orthogonality_backward(cache: tuple) -> list[tuple[Array, Array]]:
    """(dA, dB) of each layer for R above. With f(D) = ‖D‖_F, df/dD = D / ‖D‖; D_A = A Aᵀ − I, so
    dD_A = dA Aᵀ + A dAᵀ and, D_A symmetric, dA = k · 2 D_A A / ‖D_A‖ (r, in); likewise D_B = Bᵀ B − I gives
    dB = k · 2 B D_B / ‖D_B‖ (out, r), k = w / (2L). At ‖D‖ = 0 the norm has no derivative; torch's is 0 there,
    and so is this."""
    layers, factor = cache
    grads = []
    for A, B, D_A, D_B, n_A, n_B in layers:
        dA = (D_A @ A) * (2 * factor / n_A) if n_A > 0 else A * 0.0  # [r, r] @ [r, in]
        dB = (B @ D_B) * (2 * factor / n_B) if n_B > 0 else B * 0.0  # [out, r] @ [r, r]
        grads.append((dA, dB))
    return grads


@dataclass(frozen=True)
class OrthogonalityTerm:
    """`orthogonality_forward` over the named (A, B) pairs, as a `Sites.loss_terms` entry."""

    pairs: tuple[tuple[str, str], ...]
    weight: float

    def forward(self, params: Mapping[str, Array]) -> tuple[Any, tuple]:
        return orthogonality_forward([(params[a], params[b]) for a, b in self.pairs], self.weight)

    def backward(self, cache: tuple, trainable: Collection[str]) -> dict[str, Array]:
        grads = {}
        for (a, b), (dA, dB) in zip(self.pairs, orthogonality_backward(cache), strict=True):
            grads |= {name: g for name, g in ((a, dA), (b, dB)) if name in trainable}
        return grads


# ===================================================================== the rank allocator
class RankAllocator:
    """PEFT's RankAllocator with AdaLoraModel.update_and_allocate around it, over tinypeft's arrays.

    Per entry of every A, E and B: importance I = |p ⊙ ∇p| (the parameter after the optimizer's step, the
    gradient it applied), its moving average Ī ← β₁ Ī + (1 − β₁) I and uncertainty Ū ← β₂ Ū + (1 − β₂) |I − Ī|,
    score s = Ī ⊙ Ū. Triplet i of a layer scores S_i = s(E_i) + (mean_in s(A_i,:) + mean_out s(B_:,i)). The budget
    b(t), a number of triplets over all layers: init_bgt for t <= tinit, then
    ⌊(init_bgt − target_bgt)(1 − (t − tinit)/(T − tfinal − tinit))³ + target_bgt⌋, masking every deltaT steps;
    a mask zeroes E_i for every S_i at or below the (init_bgt − b)-th smallest score. At t = T − tfinal the final
    mask is taken (rank_pattern) and the statistics dropped; after it, every step re-applies that pattern.
    """

    def __init__(self, config: AdaLoraConfig, layers: list[AdaLoraLayer]) -> None:
        if not 0 < config.beta1 < 1 or not 0 < config.beta2 < 1:  # PEFT asserts it too
            raise ConfigError("RankAllocator needs beta1 and beta2 in (0, 1)")
        self.config = config
        self.layers = layers
        self.init_bgt = sum(layer.rank for layer in layers)
        self.target_bgt = config.target_r * len(layers)
        self.reset_ipt()

    def state(self) -> dict[str, Any]:
        """The statistics and the rank pattern as JSON (float64 lists: Python's float repr reads back exactly), which a
        training checkpoint saves so that a resumed run allocates as an uninterrupted one."""
        stats = {what: {n: a.tolist() for n, a in getattr(self, what).items()} for what in STATISTICS}
        return stats | {"rank_pattern": self.config.rank_pattern}

    def parse_state(
        self, state: Any, like: Mapping[str, Array]
    ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, list[bool]] | None]:
        """`state()` read back and checked (each statistic names a tensor this allocator follows, in its shape and
        dtype: `like`, the adapter's tensors), for `restore`; changes nothing."""
        if not isinstance(state, Mapping) or set(state) != {*STATISTICS, "rank_pattern"}:
            raise CheckpointError(
                f"AdaLoRA allocator state must hold {[*STATISTICS, 'rank_pattern']}; got {state!r:.80}"
            )
        loaded = {}
        for what in STATISTICS:
            arrays = state[what]
            if not isinstance(arrays, Mapping) or not set(arrays) <= set(like):
                raise CheckpointError(f"AdaLoRA allocator state {what!r} names tensors this adapter lacks")
            try:
                loaded[what] = {n: np.asarray(v, dtype=like[n].dtype).reshape(like[n].shape) for n, v in arrays.items()}
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"AdaLoRA allocator state {what!r} is malformed: {e}") from None
        pattern = state["rank_pattern"]
        if pattern is not None:
            try:
                pattern = checked_rank_pattern(pattern, self.config.init_r)
            except ConfigError as e:
                raise CheckpointError(f"AdaLoRA allocator state: {e}") from None
        return loaded, pattern

    def restore(
        self, statistics: Mapping[str, dict[str, np.ndarray]], rank_pattern: dict[str, list[bool]] | None
    ) -> None:
        for what, arrays in statistics.items():
            setattr(self, what, arrays)
        self.config.rank_pattern = rank_pattern

    def reset_ipt(self) -> None:
        self.ipt: dict[str, np.ndarray] = {}
        self.exp_avg_ipt: dict[str, np.ndarray] = {}
        self.exp_avg_unc: dict[str, np.ndarray] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask at this step)."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % c.deltaT == 0

    def update_ipt(self, params: Mapping[str, Array], grads: Mapping[str, Array]) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for layer in self.layers:
            for name in (layer.lora_A, layer.lora_E, layer.lora_B):
                p, g = to_numpy(params[name]), to_numpy(grads[name])
                if name not in self.ipt:
                    self.ipt[name] = np.zeros_like(p)
                    self.exp_avg_ipt[name] = np.zeros_like(p)
                    self.exp_avg_unc[name] = np.zeros_like(p)
                self.ipt[name] = np.abs(p * g)
                self.exp_avg_ipt[name] = b1 * self.exp_avg_ipt[name] + (1 - b1) * self.ipt[name]
                self.exp_avg_unc[name] = b2 * self.exp_avg_unc[name] + (1 - b2) * np.abs(
                    self.ipt[name] - self.exp_avg_ipt[name]
                )

    def triplet_scores(self) -> dict[str, np.ndarray]:
        """S (r,) of each layer, by its E's name."""
        scores = {}
        for layer in self.layers:
            s_A, s_E, s_B = (
                self.exp_avg_ipt[n] * self.exp_avg_unc[n] for n in (layer.lora_A, layer.lora_E, layer.lora_B)
            )
            scores[layer.lora_E] = s_E.reshape(-1) + (s_A.mean(axis=1) + s_B.mean(axis=0))
        return scores

    def mask_to_budget(self, params: dict[str, Array], budget: int) -> dict[str, list[bool]]:
        """Zero E_i for the lowest-scoring triplets over all layers; returns the rank pattern (True: kept)."""
        scores = self.triplet_scores()
        every = np.concatenate(list(scores.values()))
        k = self.init_bgt - budget  # torch.kthvalue's k: the k-th smallest, from 1
        threshold = np.partition(every, k - 1)[k - 1] if k >= 1 else -math.inf
        pattern = {}
        for layer in self.layers:
            kept = ~(scores[layer.lora_E] <= threshold)
            self._mask_E(params, layer, kept)
            pattern[layer.pattern_key] = kept.tolist()
        return pattern

    def mask_using_rank_pattern(self, params: dict[str, Array]) -> None:
        for layer in self.layers:
            self._mask_E(params, layer, np.asarray(self.config.rank_pattern[layer.pattern_key], dtype=bool))

    @staticmethod
    def _mask_E(params: dict[str, Array], layer: AdaLoraLayer, kept: np.ndarray) -> None:
        """E_i = 0 where not kept, in place (the optimizer holds the array: PEFT's masked_fill_)."""
        E = params[layer.lora_E]
        E[namespace(E).asarray(~kept)] = 0.0

    def update_and_allocate(self, params: dict[str, Array], grads: Mapping[str, Array], step: int) -> None:
        """PEFT's AdaLoraModel.update_and_allocate(global_step): before T − tfinal, update and (on schedule) mask;
        at T − tfinal, the final mask, kept as config.rank_pattern; after it, that mask every step."""
        c = self.config
        final = c.total_step - c.tfinal
        if step < final:
            self.update_ipt(params, grads)
            budget, mask_now = self.budget_schedule(step)
            if mask_now:
                c.rank_pattern = self.mask_to_budget(params, budget)
        elif step == final:
            budget, _ = self.budget_schedule(step)
            c.rank_pattern = self.mask_to_budget(params, budget)
            self.reset_ipt()
        elif c.rank_pattern is not None:
            self.mask_using_rank_pattern(params)


def checked_rank_pattern(pattern: Any, init_r: int) -> dict[str, list[bool]]:
    """rank_pattern as PEFT writes it ('<module>.lora_E': init_r booleans, True: kept), keys without `.default`."""
    if not isinstance(pattern, Mapping) or not all(isinstance(k, str) and k.endswith(("lora_E", "lora_E.default"))
                                                   for k in pattern):  # fmt: skip
        raise ConfigError(
            "AdaLoraConfig.rank_pattern must map '<module>.lora_E' to a list of init_r booleans (the triplets kept); "
            f"got {shown(pattern)[:120]}"
        )
    checked = {}
    for key, kept in pattern.items():
        if not isinstance(kept, (list, tuple)) or len(kept) != init_r or not all(isinstance(b, bool) for b in kept):
            raise ConfigError(
                f"AdaLoraConfig.rank_pattern[{key!r}] must be a list of init_r = {init_r} booleans; got {shown(kept)}"
            )
        checked[key.removesuffix(".default")] = list(kept)
    return checked
