"""Weighted combination of LoRA adapters: PEFT's `add_weighted_adapter`, each combination type as its definition.

Adapter i updates a targeted layer by the task vector ΔW_i = s_i (B_i A_i)ᵀ  (in, out), s_i its scaling. Given
weights w_i, a combination type makes one new LoRA adapter:

- `cat`: the weighted sum Σ w_i ΔW_i exactly, at rank Σ r_i: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...] stacked
  by rows, B = [B_1, B_2, ...] by columns, so B A = Σ w_i s_i B_i A_i.
- `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: a merge of the task vectors
  (`merge_task_tensors`: task arithmetic, TIES, DARE, magnitude pruning), then its best rank-k approximation
  (the truncated SVD: B = U_k S_k, A = V_kᵀ, Eckart–Young), k = svd_rank or the largest r_i; `svd_clamp` q
  clips U_k S_k and V_kᵀ to ±(the q-quantile of their entries).
- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: the same merges applied to the factors
  apart, at the common rank r, with c_i = w_i s_i split as A weights sgn(c_i)·√|c_i| and B weights √|c_i|:
  A = merge(A_i), B = merge(B_i). That is not a merge of the ΔW_i: for `linear`
      B A = Σ_i c_i B_i A_i  +  Σ_{i≠j} √|c_i| √|c_j| sgn(c_j) B_i A_j,
  cross terms PEFT's own docs call "a very rough approximation" (huggingface/peft #3004). tinypeft computes
  what PEFT computes there; `cat` is the exact sum, `svd` its best approximation at a given rank.

The new adapter has scaling 1 (lora_alpha = r, no rsLoRA): every s_i is inside its A and B already. PEFT
copies use_rslora from the first adapter, which makes its scaling √r (#3761); tinypeft does not. Adapters
whose update is not s·(BA)ᵀ are refused (DoRA, PiSSA, trained biases), where PEFT drops the extra part.
docs/combining.md shows each with numbers; tests/methods/lora/test_lora_combine.py proves them.

DARE's random drop uses NumPy's `np.random.default_rng(seed)`: a tensor t keeps each entry where
`rng.random(t.shape) < density`, one draw per tensor, in model order of the layers, and within a layer the
adapters' A tensors then their B tensors (factor types) or their ΔW_i (SVD types), in the order given (PEFT's
order of `torch.bernoulli` calls). A density of 1 draws nothing: nothing is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import to_numpy
from ..config import shown
from ..errors import ConfigError
from .base import Adapter
from .lora import LoraAdapter, LoraConfig, LoraLayer

# combination type -> (the merge of the task tensors, where it applies)
COMBINATIONS = {
    "svd": ("task_arithmetic", "delta"),
    "linear": ("task_arithmetic", "factors"),
    "cat": ("cat", "factors"),
    "ties": ("ties", "factors"),
    "ties_svd": ("ties", "delta"),
    "dare_linear": ("dare_linear", "factors"),
    "dare_ties": ("dare_ties", "factors"),
    "dare_linear_svd": ("dare_linear", "delta"),
    "dare_ties_svd": ("dare_ties", "delta"),
    "magnitude_prune": ("magnitude_prune", "factors"),
    "magnitude_prune_svd": ("magnitude_prune", "delta"),
}
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # the merges that take a density
SIGN_ELECTING = ("ties", "dare_ties")  # the merges that take majority_sign_method
SIGN_METHODS = ("total", "frequency")


# ===================================================================== the merges (PEFT's merge_utils)
def prune_by_magnitude(t: np.ndarray, density: float) -> np.ndarray:
    """Keep the k = ⌊density · size⌋ entries of largest |t| (equal magnitudes: the first in C order), zero the rest."""
    k = int(density * t.size)
    keep = np.zeros(t.size, dtype=bool)
    keep[np.argsort(-np.abs(t).ravel(), kind="stable")[:k]] = True
    return t * keep.reshape(t.shape)


def prune_at_random(t: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """DARE's drop and rescale: each entry kept with probability `density` and divided by it, so E[result] = t."""
    keep = rng.random(t.shape) < density
    return t * keep / density


def majority_sign_mask(stacked: np.ndarray, method: str) -> np.ndarray:
    """TIES' elected sign per entry over the n task tensors stacked on axis 0: the sign of their sum ("total") or
    of their signs' sum ("frequency"), + where it is 0; True where a tensor's entry has that sign (never a 0)."""
    signs = np.sign(stacked)
    votes = stacked.sum(axis=0) if method == "total" else signs.sum(axis=0)
    return signs == np.where(votes >= 0, 1.0, -1.0)


def disjoint_merge(weighted: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the entries that agree with the elected sign (0 where none does)."""
    return (weighted * mask).sum(axis=0) / np.maximum(mask.sum(axis=0), 1)


def merge_task_tensors(
    merge: str,
    tensors: Sequence[np.ndarray],
    weights: Sequence[float],
    density: float | None,
    sign_method: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """One merge of task tensors t_i with weights w_i, as PEFT's merge_utils computes it:

    task_arithmetic  Σ w_i t_i
    magnitude_prune  Σ w_i prune_by_magnitude(t_i)
    dare_linear      Σ w_i prune_at_random(t_i)
    ties             disjoint_merge(w_i t'_i) over the entries whose sign agrees with the majority of the
                     (unweighted) t'_i = prune_by_magnitude(t_i): trim, elect sign, disjoint mean
    dare_ties        the same with t'_i = prune_at_random(t_i)
    """
    if merge in PRUNING and density < 1:
        if merge in ("dare_linear", "dare_ties"):
            tensors = [prune_at_random(t, density, rng) for t in tensors]
        else:
            tensors = [prune_by_magnitude(t, density) for t in tensors]
    stacked = np.stack(tensors)  # [n, ...]
    weighted = stacked * np.asarray(weights, dtype=np.float64).reshape(-1, *([1] * (stacked.ndim - 1)))
    if merge in SIGN_ELECTING:
        return disjoint_merge(weighted, majority_sign_mask(stacked, sign_method))
    return weighted.sum(axis=0)


# ===================================================================== one layer
def lora_delta(adapter: LoraAdapter, layer: LoraLayer) -> np.ndarray:
    """The task vector ΔW = s (B A)ᵀ: (in, out), in float64."""
    A, B = (to_numpy(adapter.params[n]).astype(np.float64) for n in (layer.lora_A, layer.lora_B))
    return adapter.config.scaling * (B @ A).T


def truncated_svd(delta: np.ndarray, rank: int, clamp: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with B A the best rank-`rank` approximation of Δᵀ (out, in): B = U_k S_k, A = V_kᵀ; with `clamp` q,
    both clipped to ±(the q-quantile of their entries together, signed), as PEFT (after kohya-ss's svd_merge_lora).
    The signed quantile depends on the sign of each singular pair, which LAPACK leaves open (PEFT's clamp then
    depends on the build): here each pair's sign is fixed."""
    U, S, Vh = np.linalg.svd(delta.T, full_matrices=False)  # [out, k] [k] [k, in]
    # each singular pair (u_j, v_j) may be negated without changing B A, but not the clamp's signed quantile: fix
    # the sign that makes the largest |entry| of u_j positive (scikit-learn's svd_flip), not LAPACK's choice
    largest = U[np.argmax(np.abs(U), axis=0), np.arange(U.shape[1])]
    signs = np.where(largest < 0, -1.0, 1.0)
    U, Vh = U * signs, Vh * signs[:, None]
    # past Δ's numerical rank (np.linalg.matrix_rank's threshold) the singular vectors are any basis of the null
    # space: zero them, so that a rank above Δ's gives zero rows (B A is the same) and the clamp a defined input
    null = S <= S.max(initial=0.0) * max(delta.shape) * np.finfo(np.float64).eps
    S, Vh = np.where(null, 0.0, S), np.where(null[:, None], 0.0, Vh)
    B, A = U[:, :rank] * S[:rank], Vh[:rank]
    if clamp is not None:
        high = np.quantile(np.concatenate([B.ravel(), A.ravel()]), clamp)
        B, A = np.clip(B, -high, high), np.clip(A, -high, high)
    return A, B


def combine_layer(
    parts: Sequence[tuple[LoraAdapter, LoraLayer, float]], options: CombineOptions, rank: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(A (rank, in), B (out, rank)) for one layer from the (adapter, its layer, weight) that target it."""
    merge, where = COMBINATIONS[options.combination_type]
    density, method = options.density, options.majority_sign_method
    if where == "delta":
        deltas = [lora_delta(a, layer) for a, layer, _ in parts]
        merged = merge_task_tensors(merge, deltas, [w for _, _, w in parts], density, method, rng)
        return truncated_svd(merged, rank, options.svd_clamp)
    As = [to_numpy(a.params[layer.lora_A]).astype(np.float64) for a, layer, _ in parts]
    Bs = [to_numpy(a.params[layer.lora_B]).astype(np.float64) for a, layer, _ in parts]
    c = [w * a.config.scaling for a, _, w in parts]  # each adapter's weight times its scaling
    if merge == "cat":
        A = np.concatenate([ci * Ai for ci, Ai in zip(c, As, strict=True)], axis=0)  # [Σ r_i, in]
        B = np.concatenate(Bs, axis=1)  # [out, Σ r_i]
        pad = rank - A.shape[0]  # adapters that do not target this layer leave their rows at 0, as in PEFT
        return np.pad(A, ((0, pad), (0, 0))), np.pad(B, ((0, 0), (0, pad)))
    root = [math.sqrt(abs(ci)) for ci in c]
    a_weights = [r if ci >= 0 else -r for r, ci in zip(root, c, strict=True)]  # the sign goes to A only
    A = merge_task_tensors(merge, As, a_weights, density, method, rng)
    B = merge_task_tensors(merge, Bs, root, density, method, rng)
    return A, B


# ===================================================================== the combination
@dataclass(frozen=True)
class CombineOptions:
    combination_type: str = "svd"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    density: float | None = None
    majority_sign_method: str = "total"
    seed: int = 0

    def __post_init__(self) -> None:
        kind = self.combination_type
        if not isinstance(kind, str) or kind not in COMBINATIONS:
            raise ConfigError(f"combination_type must be one of {list(COMBINATIONS)}; got {shown(kind)}")
        merge, where = COMBINATIONS[kind]
        _only_for("svd_rank", self.svd_rank, where == "delta", "the svd types", kind)
        _only_for("svd_clamp", self.svd_clamp, where == "delta", "the svd types", kind)
        _only_for("density", self.density, merge in PRUNING, "the ties, dare and magnitude_prune types", kind)
        if self.svd_rank is not None and (not _is_int(self.svd_rank) or self.svd_rank <= 0):
            raise ConfigError(f"svd_rank must be a positive integer or None; got {shown(self.svd_rank)}")
        if self.svd_clamp is not None and not (_is_number(self.svd_clamp) and 0 <= self.svd_clamp <= 1):
            raise ConfigError(f"svd_clamp must be a quantile in [0, 1] or None; got {shown(self.svd_clamp)}")
        if merge in PRUNING and not (_is_number(self.density) and 0 < self.density <= 1):
            raise ConfigError(
                f"combination_type={kind!r} needs density, the fraction of entries kept, in (0, 1]; "
                f"got {shown(self.density)}"
            )
        if self.majority_sign_method not in SIGN_METHODS:
            raise ConfigError(
                f"majority_sign_method must be one of {SIGN_METHODS}; got {shown(self.majority_sign_method)}"
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0 (DARE's generator); got {shown(self.seed)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _only_for(name: str, value: Any, allowed: bool, which: str, kind: str) -> None:
    if value is not None and not allowed:
        raise ConfigError(f"{name}={shown(value)} applies only to {which}, not to {kind!r}; leave it None")


def check_adapters(named: Mapping[str, Adapter], weights: Any, kind: str) -> list[float]:
    """The weights as floats, once the adapters are known to combine (LoRA, of an update s·(BA)ᵀ; one rank for
    the factor types)."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or not all(map(_is_number, weights)):
        raise ConfigError(f"weights must be a list of finite numbers, one per adapter; got {shown(weights)}")
    if len(weights) != len(named):
        raise ConfigError(
            f"weights has {len(weights)} value(s) for {len(named)} adapters {list(named)}; give one weight each"
        )
    for name, adapter in named.items():
        if not isinstance(adapter, LoraAdapter):
            raise ConfigError(
                f"add_weighted_adapter combines LoRA adapters (as PEFT's); {name!r} is {adapter.config.peft_type}"
            )
        _check_plain_update(name, adapter.config)
        if adapter.sites().tokens is not None:
            raise ConfigError(
                f"adapter {name!r} changes the token table (wte or trainable_token_indices); add_weighted_adapter "
                "combines the updates of linear layers only"
            )
    ranks = {name: a.config.r for name, a in named.items()}
    if COMBINATIONS[kind][1] == "factors" and kind != "cat" and len(named) > 1 and len(set(ranks.values())) > 1:
        raise ConfigError(
            f"combination_type={kind!r} adds the factors A and B, so the adapters must share one rank; "
            f"got r = {ranks}; use 'cat' or an svd type for adapters of different ranks"
        )
    return [float(w) for w in weights]


def _check_plain_update(name: str, config: LoraConfig) -> None:
    """Refuse adapters whose update is not s·(BA)ᵀ alone: combining their A and B would drop the rest."""
    if config.use_dora:
        raise ConfigError(
            f"adapter {name!r} is DoRA: its update m/‖W + sBA‖ ⊙ (W + sBA) - W is not a low-rank product, so no "
            "combination of A and B carries it (PEFT drops the magnitudes: huggingface/peft #3761); "
            "merge_and_unload() folds it"
        )
    if config.init_lora_weights == "pissa":
        raise ConfigError(
            f"adapter {name!r} is PiSSA: its A and B update the residual W - s B₀A₀, not W, so its update of W is "
            "s(BA - B₀A₀), which its A and B alone do not carry; merge_and_unload() folds it"
        )
    if config.bias != "none":
        raise ConfigError(
            f"adapter {name!r} trains biases too (bias={config.bias!r}), which a combination of A and B would drop; "
            "combine adapters trained with bias='none'"
        )


def combine(
    named: Mapping[str, LoraAdapter], weights: Sequence[float], modules: Sequence[str], options: CombineOptions
) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """(the new adapter's config, its tensors by PEFT's file names, float64) for the adapters `named` (checked by
    `check_adapters`) and their weights; `modules` lists the model's linear modules in model order."""
    merge, where = COMBINATIONS[options.combination_type]
    ranks = [a.config.r for a in named.values()]
    if len(named) == 1:  # PEFT's rule: one adapter is always combined linearly (exact for one)
        options = CombineOptions("linear", seed=options.seed)
        rank = ranks[0]
    elif merge == "cat":
        rank = sum(ranks)
    else:
        rank = (options.svd_rank or max(ranks)) if where == "delta" else ranks[0]
    by_module = {m: [] for m in modules}
    for adapter, w in zip(named.values(), weights, strict=True):
        for layer in adapter.layers:
            by_module[layer.module].append((adapter, layer, w))
    targets = [m for m in modules if by_module[m]]
    for m in targets:
        layer = by_module[m][0][1]
        if rank > min(layer.in_features, layer.out_features):
            raise ConfigError(
                f"combination_type={options.combination_type!r} gives rank {rank}, above min(in, out) = "
                f"{min(layer.in_features, layer.out_features)} of {m}; use an svd type with svd_rank <= that"
            )
    first = next(iter(named.values())).config
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=first.lora_dropout, target_modules=targets)
    rng = np.random.default_rng(options.seed)
    tensors = {}
    for m in targets:
        A, B = combine_layer(by_module[m], options, rank, rng)
        layer = by_module[m][0][1]
        tensors[layer.lora_A], tensors[layer.lora_B] = A, B
    return config, tensors
