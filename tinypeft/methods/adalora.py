"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning") on GPT-2's
linear layers, as PEFT's AdaLoraModel computes it (peft/tuners/adalora/layer.py and model.py).

A targeted linear layer y = x W + b (W: (in, out), GPT-2's Conv1D layout) gets an update in SVD form, P Λ Q:
A: (r, in) the right singular vectors (Q), E: (r, 1) the singular values (Λ), B: (out, r) the left ones (P),
and computes, with x_d = dropout(x) and r = init_r,

    y = x W + b + c · (x_d (A ⊙ E)ᵀ) Bᵀ,      c = lora_alpha / (ranknum + 1e-5),   ranknum = init_r

(A ⊙ E scales row i of A by E_i), so the effective weight is W + c (B (A ⊙ E))ᵀ. ranknum stays init_r even
after the allocator prunes triplets, as in PEFT, so pruning changes no scale. Two more things train it:

- the orthogonality regulariser, R = w · mean over the 2L factors of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F, which
  every loss adds (PEFT's AdaLoraModel.forward adds it to every loss it computes): `OrthogonalityTerm`, a
  `Sites.loss_terms` entry with its hand gradient;
- the rank allocator (`RankAllocator`), which after every optimizer step (`Adapter.after_step`) updates each
  entry's importance |p ⊙ ∇p| and its two moving averages, and on a cubic budget schedule zeroes the E_i of
  the triplets (A_i, E_i, B_:,i) that score lowest, step for step as PEFT's `update_and_allocate`.

docs/adalora.md derives the backward, the regulariser's gradient and the allocator.
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import Array
from ..config import linear_module_names, positive_number, shown
from ..errors import CheckpointError, ConfigError
from ..sites import Sites
from .adalora_training import OrthogonalityTerm, RankAllocator, checked_rank_pattern
from .base import PEFT_PREFIX, Adapter, PeftConfig, match_modules, register
from .lora import dropout_keep_mask
from .registry import (
    ODD_EPS,
    SMALL,
    UNIMPLEMENTED_FIELDS,
    Batch,
    ErrorCase,
    Flag,
    GoldenCase,
    MethodSpec,
    as_is,
    inert,
    register_method,
)

if TYPE_CHECKING:
    from ..model import GPT

GPT2_DEFAULT_TARGETS = ("c_attn",)  # PEFT's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING["gpt2"]
RANKNUM_EPS = 1e-5  # PEFT's `self.ranknum[adapter] + 1e-5`


# ===================================================================== the math
def adalora_forward(
    x: Array, weight: Array, bias: Array | None, A: Array, E: Array, B: Array, scale: float, keep: Array | None
) -> tuple[Array, tuple]:
    """y = x W + b + c · (x_d (A ⊙ E)ᵀ) Bᵀ,  x_d = x ⊙ keep (dropout on the AdaLoRA branch only).

    x: (..., in), W: (in, out), b: (out,) or None, A: (r, in), E: (r, 1), B: (out, r), c = scale,
    keep: None or (..., in) holding 0 and 1/(1 - p) -> y: (..., out).
    Cache: x_d, AE = A ⊙ E (r, in), h = x_d AEᵀ (N, r), and the inputs; h is the only new array of N rows.
    """
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in)  # [B, T, in] -> [N, in]
    keep2 = None if keep is None else keep.reshape(-1, n_in)
    x_drop = x2 if keep2 is None else x2 * keep2
    AE = A * E  # [r, in] * [r, 1]: row i scaled by E_i
    h = x_drop @ AE.T  # [N, in] @ [in, r] -> [N, r]
    y = x2 @ weight + (h @ B.T) * scale  # [N, out] + ([N, r] @ [r, out]) c
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, weight.shape[1]), (x_drop, h, AE, weight, A, E, B, scale, keep2)


def adalora_backward(
    dy: Array, cache: tuple, need_dx: bool = True, need_dfactors: bool = True, need_dbias: bool = False
) -> tuple[Array | None, Array | None, Array | None, Array | None, Array | None]:
    """(dx, dA, dE, dB, db) for y = x W + b + c · h Bᵀ, h = x_d AEᵀ, AE = A ⊙ E, x_d = x ⊙ keep:

        dB   = c · dyᵀ h                    (out, r)
        dh   = c · dy B                     (N, r)
        dAE  = dhᵀ x_d                      (r, in)
        dA   = dAE ⊙ E                      (r, in)   E broadcast along in
        dE   = Σ_in dAE ⊙ A                 (r, 1)    the sum over the broadcast axis
        dx   = dy Wᵀ + (dh AE) ⊙ keep       (N, in)
        db   = Σ_n dy

    W is frozen: its xᵀ dy matmul is never computed.
    """
    x_drop, h, AE, weight, A, E, B, scale, keep2 = cache
    n_in, n_out = weight.shape
    # in the forward pass this was: y = x W + b + c · (x_d (A ⊙ E)ᵀ) Bᵀ, so now:
    dy2 = dy.reshape(-1, n_out)  # [N, out]
    dx = dA = dE = dB = db = None
    dh = (dy2 @ B) * scale if (need_dx or need_dfactors) else None  # [N, out] @ [out, r] -> [N, r]
    if need_dfactors:
        dB = (dy2.T @ h) * scale  # [out, N] @ [N, r] -> [out, r]
        dAE = dh.T @ x_drop  # [r, N] @ [N, in] -> [r, in]
        dA = dAE * E  # [r, in] * [r, 1]
        dE = (dAE * A).sum(axis=1, keepdims=True)  # [r, in] -> [r, 1]
    if need_dx:
        branch = dh @ AE  # [N, r] @ [r, in]: the gradient at x_d
        dx = dy2 @ weight.T + (branch if keep2 is None else branch * keep2)  # [N, out] @ [out, in]
        dx = dx.reshape(*dy.shape[:-1], n_in)
    if need_dbias:
        db = dy2.sum(axis=0)
    return dx, dA, dE, dB, db


def adalora_delta_weight(A: Array, E: Array, B: Array, scale: float) -> Array:
    """c (B (A ⊙ E))ᵀ: (in, out), what a merge adds to W."""
    return (B @ (A * E)).T * scale  # ([out, r] @ [r, in])ᵀ


# ===================================================================== config
@register
@dataclass
class AdaLoraConfig(PeftConfig):
    """AdaLoRA with PEFT's field names and defaults.

    init_r: each layer's starting rank; target_r: the average rank the allocator prunes to; tinit: steps before
    the pruning starts; tfinal: steps of training at the final ranks at the end; deltaT: steps between two
    allocations; beta1, beta2: the moving averages of importance and of its uncertainty; orth_reg_weight: the
    regulariser's weight; total_step: the run's length (the budget schedule's end; `tinypeft finetune` gives its
    --steps); rank_pattern: which triplets each layer keeps (set by the allocator, saved for PEFT; a config that
    has one builds its layers at those ranks, as PEFT's loader does); lora_alpha, lora_dropout, target_modules,
    init_lora_weights (True: E = 0, A, B ~ N(0, 0.02²); False: all N(0, 1)) as LoRA's. fan_in_fan_out is forced
    True for GPT-2's Conv1D, as PEFT does. bias, exclude_modules, modules_to_save, layers_to_transform and
    layers_pattern are PEFT options tinypeft does not implement: fields only so that a file using them is refused.
    """

    peft_type = "ADALORA"
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (PEFT's name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    init_lora_weights: bool = True
    fan_in_fan_out: bool = True
    bias: str = "none"
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        name = "AdaLoraConfig."
        for field_name, least in (("init_r", 1), ("target_r", 0), ("tinit", 0), ("tfinal", 0), ("deltaT", 1)):
            value = getattr(self, field_name)
            if not _integer(value) or value < least:
                raise ConfigError(f"{name}{field_name} must be an integer >= {least}; got {shown(value)}")
        if self.target_r >= self.init_r:
            raise ConfigError(
                f"{name}target_r={shown(self.target_r)} must be below init_r={shown(self.init_r)}: AdaLoRA prunes "
                "from init_r down to target_r (PEFT fails at its final allocation when nothing is to be pruned)"
            )
        total = self.total_step
        if not _integer(total) or total <= 0:
            raise ConfigError(
                f"{name}total_step must be a positive integer (the run's steps: the budget schedule ends there; "
                f"PEFT requires it too); got {shown(total)}"
            )
        if self.tinit >= total - self.tfinal:
            raise ConfigError(
                f"{name}tinit={self.tinit} must be below total_step - tfinal = {total} - {self.tfinal}: the schedule "
                "leaves no step to prune in; decrease tinit or tfinal, or increase total_step"
            )
        for field_name in ("beta1", "beta2"):
            value = getattr(self, field_name)
            if not positive_number(value) or not value < 1:
                raise ConfigError(
                    f"{name}{field_name} must be a number in (0, 1) (a moving average); got {shown(value)}"
                )
        w = self.orth_reg_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w >= 0):
            raise ConfigError(f"{name}orth_reg_weight must be a finite number >= 0; got {shown(w)}")
        if not positive_number(self.lora_alpha):
            raise ConfigError(f"{name}lora_alpha must be a positive finite number; got {shown(self.lora_alpha)}")
        p = self.lora_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ConfigError(f"{name}lora_dropout must be a probability in [0, 1); got {shown(p)}")
        for field_name in ("init_lora_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, field_name), bool):
                raise ConfigError(f"{name}{field_name} must be True or False; got {shown(getattr(self, field_name))}")
        targets = self.target_modules
        if targets is None or isinstance(targets, (set, frozenset, tuple)):  # PEFT keeps a set; JSON needs a list
            self.target_modules = list(GPT2_DEFAULT_TARGETS) if targets is None else sorted(targets, key=str)
        if not self.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=False, but GPT-2's linear layers are Conv1D (weights stored (in, out)); "
                          "setting fan_in_fan_out=True, as PEFT does", UserWarning, stacklevel=3)  # fmt: skip
            self.fan_in_fan_out = True
        unsupported = {k: getattr(self, k) for k in UNIMPLEMENTED_FIELDS}
        if self.bias != "none":
            unsupported["bias"] = self.bias
        if any(v is not None and v != [] and v != "none" for v in unsupported.values()):
            raise ConfigError(
                f"{name[:-1]}: tinypeft does not implement PEFT's {shown(unsupported)}; leave them at their defaults"
            )
        if self.rank_pattern is not None:
            self.rank_pattern = checked_rank_pattern(self.rank_pattern, self.init_r)

    @property
    def scale(self) -> float:
        """c = lora_alpha / (ranknum + 1e-5), ranknum = init_r: the branch's factor (PEFT's scaling / ranknum)."""
        return self.lora_alpha / (float(self.init_r) + RANKNUM_EPS)

    def targets(self, base: GPT) -> list[str]:
        return match_modules(linear_module_names(base.config), self.target_modules)

    def ranks(self, base: GPT) -> dict[str, int]:
        """Each target's rank: init_r, or the number of triplets rank_pattern keeps there."""
        targets = self.targets(base)
        if self.rank_pattern is None:
            return dict.fromkeys(targets, self.init_r)
        pattern = {_pattern_module(k): v for k, v in self.rank_pattern.items()}
        if set(pattern) != set(targets):
            raise ConfigError(
                f"AdaLoraConfig.rank_pattern names {sorted(pattern)[:3]} ...; it must name every target "
                f"({targets[:3]} ...) and nothing else"
            )
        return {m: int(sum(pattern[m])) for m in targets}

    def validate(self, base: GPT) -> None:
        self.ranks(base)

    def estimated_parameters(self, base: GPT) -> int:
        """A, E and B a layer."""
        total = 0
        for module, r in self.ranks(base).items():
            n_in, n_out = base.params[module + ".weight"].shape
            total += r * (n_in + 1 + n_out)
        return total

    def build(self, base: GPT, seed: int = 0) -> AdaLoraAdapter:
        return AdaLoraAdapter.create(self, base, seed)


def _integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _pattern_module(key: str) -> str:
    """rank_pattern's key (PEFT's `transformer.h.0.attn.c_attn.lora_E`, `.default` in memory) -> the module."""
    key = key.removesuffix(".default")
    return key.removesuffix(".lora_E")


# ===================================================================== adapter
@dataclass(frozen=True)
class AdaLoraLayer:
    """One targeted linear layer: its module name, sizes, rank, and the names of its tensors (PEFT's file names:
    base_model.model.<module>.lora_A, .lora_E, .lora_B)."""

    module: str
    in_features: int
    out_features: int
    rank: int

    @property
    def weight(self) -> str:
        return self.module + ".weight"

    @property
    def bias(self) -> str:
        return self.module + ".bias"

    @property
    def lora_A(self) -> str:
        return f"{PEFT_PREFIX}{self.module}.lora_A"

    @property
    def lora_E(self) -> str:
        return f"{PEFT_PREFIX}{self.module}.lora_E"

    @property
    def lora_B(self) -> str:
        return f"{PEFT_PREFIX}{self.module}.lora_B"

    @property
    def pattern_key(self) -> str:
        """The layer's key in rank_pattern, as PEFT saves it."""
        return f"{self.module}.lora_E"


class AdaLoraAdapter(Adapter):
    """A, E and B for each targeted layer, the rank allocator's state, and the regulariser."""

    def __init__(
        self, config: AdaLoraConfig, base: GPT, params: dict[str, Array], layers: list[AdaLoraLayer], seed: int
    ) -> None:
        super().__init__(config, base, params)
        self.config: AdaLoraConfig = config
        self.layers = layers
        self.allocator = RankAllocator(config, layers)
        # dropout masks: one key per sites(training=True) call, from a stream apart from the init's
        self._dropout_keys = np.random.default_rng((seed, 1))

    @classmethod
    def create(cls, config: AdaLoraConfig, base: GPT, seed: int) -> AdaLoraAdapter:
        """init_lora_weights=True: E = 0, A and B ~ N(0, 0.02²) (PEFT's reset_lora_parameters); False: all three
        ~ N(0, 1) (PEFT's torch.randn); drawn in float64 from one generator, layer by layer in model order."""
        xp, dtype = base.xp, base.config.dtype
        rng = np.random.default_rng(seed)
        layers, params = [], {}
        for module, r in config.ranks(base).items():
            layer = AdaLoraLayer(module, *base.params[module + ".weight"].shape, r)
            layers.append(layer)
            std = 0.02 if config.init_lora_weights else 1.0
            A = rng.normal(0.0, std, (r, layer.in_features))
            B = rng.normal(0.0, std, (layer.out_features, r))
            E = np.zeros((r, 1)) if config.init_lora_weights else rng.standard_normal((r, 1))
            for name, value in ((layer.lora_A, A), (layer.lora_E, E), (layer.lora_B, B)):
                params[name] = xp.asarray(value.astype(dtype))
        return cls(config, base, params, layers, seed)

    def sites(self, training: bool = False) -> Sites:
        p = self.config.lora_dropout
        key = int(self._dropout_keys.integers(2**63)) if training and p > 0 else None
        site = AdaLoraSite(self, key)
        terms = (
            OrthogonalityTerm(tuple((lay.lora_A, lay.lora_B) for lay in self.layers), self.config.orth_reg_weight),
        )
        return Sites(
            linear={layer.module: site for layer in self.layers},
            stochastic=key is not None,
            loss_terms=terms if self.config.orth_reg_weight > 0 else (),
        )

    def after_step(self, grads: Mapping[str, Array], step: int) -> None:
        """The rank allocator's step (PEFT's `update_and_allocate(global_step)`, called after the optimizer's
        step with the gradients it applied); `step` counts from 0."""
        self.allocator.update_and_allocate(self.params, grads, step)

    def random_state(self) -> dict[str, Any]:
        """The dropout generator's state and, under "allocator", the rank allocator's (its statistics and the rank
        pattern): what a training checkpoint keeps besides the tensors, so that a resumed run continues exactly."""
        return super().random_state() | {"allocator": self.allocator.state()}

    def set_random_state(self, state: Any) -> None:
        if not isinstance(state, Mapping) or "allocator" not in state:
            raise CheckpointError(f"AdaLoRA adapter random state must hold the allocator's; got {shown(state)[:80]}")
        allocator_state = self.allocator.parse_state(state["allocator"], self.params)  # checked before anything changes
        super().set_random_state({k: v for k, v in state.items() if k != "allocator"})
        self.allocator.restore(*allocator_state)

    def merge(self, base_params: dict[str, Array]) -> None:
        """W <- W + c (B (A ⊙ E))ᵀ for every target."""
        for layer in self.layers:
            A, E, B = (self.params[n] for n in (layer.lora_A, layer.lora_E, layer.lora_B))
            base_params[layer.weight] = base_params[layer.weight] + adalora_delta_weight(A, E, B, self.config.scale)

    def unmerge(self, base_params: dict[str, Array], originals: Mapping[str, Array]) -> None:
        """Put back the very arrays the merge replaced (exact; PEFT subtracts the update again, which rounds)."""
        for layer in self.layers:
            base_params[layer.weight] = originals[layer.weight]

    # ---------------------------------------------------------------- files
    def state_dict(self) -> dict[str, np.ndarray]:
        """A, E, B of each layer; with a rank_pattern, only the kept triplets' rows (columns of B), as PEFT's
        `resize_state_dict_by_rank_pattern` writes them (a layer already at its pattern's rank is kept as is)."""
        state = super().state_dict()
        pattern = self.config.rank_pattern
        if pattern is None:
            return state
        for layer in self.layers:
            kept = np.asarray(pattern[layer.pattern_key], dtype=bool)
            if int(kept.sum()) == state[layer.lora_A].shape[0]:
                continue
            state[layer.lora_A], state[layer.lora_E] = state[layer.lora_A][kept], state[layer.lora_E][kept]
            state[layer.lora_B] = state[layer.lora_B][:, kept]
        return state


# ===================================================================== site
class AdaLoraSite:
    """What stands in for each targeted linear layer during one forward and its backward. `dropout_key` (None:
    no dropout) seeds every layer's mask, so a forward, its backward and a gradient check agree on them."""

    def __init__(self, adapter: AdaLoraAdapter, dropout_key: int | None) -> None:
        self.adapter = adapter
        self.dropout_key = dropout_key
        self.layers = {layer.module: layer for layer in adapter.layers}
        self.layer_index = {layer.module: i for i, layer in enumerate(adapter.layers)}

    def keep_mask(self, module: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The dropout multiplier for `module`'s input of this shape (None without dropout)."""
        if self.dropout_key is None:
            return None
        key = (self.dropout_key, self.layer_index[module])
        return dropout_keep_mask(key, tuple(shape), self.adapter.config.lora_dropout, self.adapter.dtype)

    def forward(self, params: Mapping[str, Array], module: str, x: Array) -> tuple[Array, tuple]:
        layer, adapter = self.layers[module], self.adapter
        keep = self.keep_mask(module, x.shape)
        keep = None if keep is None else adapter.xp.asarray(keep)
        A, E, B = params[layer.lora_A], params[layer.lora_E], params[layer.lora_B]
        y, cache = adalora_forward(x, params[layer.weight], params[layer.bias], A, E, B, adapter.config.scale, keep)
        return y, (layer, cache)

    def backward(
        self, dy: Array, cache: tuple, trainable: Collection[str], need_dx: bool = True
    ) -> tuple[Array | None, dict[str, Array]]:
        layer, inner = cache
        if layer.weight in trainable:
            raise ConfigError(f"{layer.weight} is trainable, but AdaLoRA keeps the base weight frozen")
        need_factors = not {layer.lora_A, layer.lora_E, layer.lora_B}.isdisjoint(trainable)
        dx, dA, dE, dB, db = adalora_backward(dy, inner, need_dx, need_factors, layer.bias in trainable)
        candidates = {layer.lora_A: dA, layer.lora_E: dE, layer.lora_B: dB, layer.bias: db}
        return dx, {name: g for name, g in candidates.items() if g is not None and name in trainable}

    def owned(self, module: str) -> tuple[str, ...]:
        layer = self.layers[module]
        return layer.lora_A, layer.lora_E, layer.lora_B, layer.weight, layer.bias


# ===================================================================== the registry's entry
def _build(args: argparse.Namespace) -> AdaLoraConfig:
    return AdaLoraConfig(
        init_r=args.init_r,
        target_r=args.target_r,
        tinit=args.tinit,
        tfinal=args.tfinal,
        deltaT=args.deltaT,
        beta1=args.beta1,
        beta2=args.beta2,
        orth_reg_weight=args.orth_reg_weight,
        total_step=args.steps,  # the schedule spans the run
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 8,
        lora_dropout=args.lora_dropout,
        target_modules=None if args.target_modules is None else list(args.target_modules),
    )


ALL_LINEAR = ["c_attn", "c_proj", "c_fc"]
GOLDEN_CASES = (
    GoldenCase("adalora", "odd", "init_r=3 on every kind of linear layer, orth_reg_weight 0.5", ODD_EPS,
               lambda: AdaLoraConfig(init_r=3, target_r=1, lora_alpha=3, total_step=10, target_modules=ALL_LINEAR,
                                     init_lora_weights=False),
               Batch(2, 7), seed=47),
    GoldenCase("adalora", "padded", "init_r=3 on mlp.c_fc, orth_reg_weight 2; padded batch", SMALL,
               lambda: AdaLoraConfig(init_r=3, target_r=0, lora_alpha=5, orth_reg_weight=2.0, total_step=10,
                                     target_modules=["c_fc"], init_lora_weights=False),
               Batch(3, 8, "mixed"), seed=48),
    GoldenCase("adalora", "pruned", "a rank_pattern (ranks 1 and 2 of init_r 3; ranknum stays 3), no regulariser",
               SMALL,
               lambda: AdaLoraConfig(init_r=3, target_r=1, total_step=10, orth_reg_weight=0.0, target_modules=["c_fc"],
                                     init_lora_weights=False,
                                     rank_pattern={"transformer.h.0.mlp.c_fc.lora_E": [False, True, False],
                                                   "transformer.h.1.mlp.c_fc.lora_E": [True, False, True]}),
               Batch(2, 6), seed=49),
)  # fmt: skip


def _refused(when: str, kw: dict[str, Any], says: tuple[str, ...]) -> ErrorCase:
    return ErrorCase(when, as_is, ConfigError, says, config=lambda: AdaLoraConfig(**({"total_step": 10} | kw)))


def _error_cases() -> list[ErrorCase]:
    return [
        _refused("AdaLoRA init_r = 0", {"init_r": 0}, ("AdaLoraConfig.init_r", "integer >= 1", "got 0")),
        _refused("AdaLoRA target_r negative", {"target_r": -1}, ("AdaLoraConfig.target_r", "integer >= 0", "got -1")),
        _refused("AdaLoRA target_r not below init_r", {"target_r": 4, "init_r": 4},
                 ("target_r=4", "below init_r=4", "prunes")),
        _refused("AdaLoRA tinit not an integer", {"tinit": 1.5}, ("AdaLoraConfig.tinit", "got 1.5")),
        _refused("AdaLoRA tfinal negative", {"tfinal": -2}, ("AdaLoraConfig.tfinal", "integer >= 0", "got -2")),
        _refused("AdaLoRA schedule with no step to prune in", {"tinit": 6, "tfinal": 4},
                 ("tinit=6", "total_step - tfinal = 10 - 4", "no step to prune")),
        _refused("AdaLoRA deltaT = 0", {"deltaT": 0}, ("AdaLoraConfig.deltaT", "integer >= 1", "got 0")),
        _refused("AdaLoRA beta1 = 1", {"beta1": 1.0}, ("AdaLoraConfig.beta1", "(0, 1)", "got 1.0")),
        _refused("AdaLoRA beta2 = 0", {"beta2": 0}, ("AdaLoraConfig.beta2", "(0, 1)", "got 0")),
        _refused("AdaLoRA orth_reg_weight negative", {"orth_reg_weight": -0.1},
                 ("orth_reg_weight", ">= 0", "got -0.1")),
        _refused("AdaLoRA total_step missing", {"total_step": None},
                 ("total_step", "positive integer", "got None", "PEFT requires it too")),
        _refused("AdaLoRA lora_alpha = 0", {"lora_alpha": 0}, ("AdaLoraConfig.lora_alpha", "positive finite", "got 0")),
        _refused("AdaLoRA lora_dropout = 1", {"lora_dropout": 1.0}, ("AdaLoraConfig.lora_dropout", "[0, 1)")),
        _refused("AdaLoRA init_lora_weights not a bool", {"init_lora_weights": "gaussian"},
                 ("init_lora_weights", "'gaussian'", "True or False")),
        _refused("AdaLoRA target that does not exist", {"target_modules": ["q_proj"]},
                 ("'q_proj'", "matches no module", "'attn.c_attn'")),
        _refused("AdaLoRA bias (a PEFT option tinypeft lacks)", {"bias": "all"},
                 ("AdaLoraConfig", "does not implement", "'bias': 'all'")),
        _refused("AdaLoRA exclude_modules (a PEFT option tinypeft lacks)", {"exclude_modules": ["c_proj"]},
                 ("AdaLoraConfig", "does not implement", "'exclude_modules': ['c_proj']")),
        _refused("AdaLoRA rank_pattern of the wrong length", {"init_r": 3, "target_r": 1, "rank_pattern": {
                 "transformer.h.0.attn.c_attn.lora_E": [True, False]}},
                 ("rank_pattern['transformer.h.0.attn.c_attn.lora_E']", "init_r = 3 booleans")),
        _refused("AdaLoRA rank_pattern missing a target", {"init_r": 2, "target_r": 1, "rank_pattern": {
                 "transformer.h.0.attn.c_attn.lora_E": [True, False]}},
                 ("rank_pattern names", "every target", "transformer.h.1.attn.c_attn")),
    ]  # fmt: skip


register_method(MethodSpec(
    name="adalora",
    help="AdaLoRA: LoRA as P Λ Q on --target_modules, ranks pruned from --init_r to --target_r over the run",
    default_lr=1e-1,  # the best of 3e-3, 1e-2, 3e-2, 1e-1, 3e-1 at finetune's 200 steps (docs/adalora.md)
    build=_build,
    example=lambda cfg: AdaLoraConfig(init_r=2, target_r=1, total_step=10, target_modules=ALL_LINEAR,
                                      init_lora_weights=False),
    flags=(
        Flag(("--target_modules",), {"nargs": "+", "default": None, "metavar": "NAME", "help": "layers to adapt "
             "(PEFT matching: a name or a suffix such as c_attn); default: PEFT's for gpt2"}),
        Flag(("--lora_alpha",), {"type": float, "default": None, "help": "scale numerator (default 8: the "
             "branch's factor is lora_alpha / init_r)"}),
        Flag(("--lora_dropout",), {"type": float, "default": 0.0, "help": "dropout on the AdaLoRA branch"}),
        Flag(("--init_r",), {"type": int, "default": 12, "help": "each layer's starting rank"}),
        Flag(("--target_r",), {"type": int, "default": 8, "help": "the average rank the allocator prunes to"}),
        Flag(("--tinit",), {"type": int, "default": 0, "help": "steps before pruning starts"}),
        Flag(("--tfinal",), {"type": int, "default": 0, "help": "steps at the final ranks at the end"}),
        Flag(("--deltaT",), {"type": int, "default": 1, "help": "steps between two rank allocations"}),
        Flag(("--beta1",), {"type": float, "default": 0.85, "help": "moving average of the importance"}),
        Flag(("--beta2",), {"type": float, "default": 0.85, "help": "moving average of its uncertainty"}),
        Flag(("--orth_reg_weight",), {"type": float, "default": 0.5, "help": "weight of the orthogonality "
             "regulariser"}),
    ),
    golden_cases=GOLDEN_CASES,
    error_cases=_error_cases,
    inert_fields=inert(UNIMPLEMENTED_FIELDS, ("bias",), ["lora_dropout"],
                       ["init_lora_weights"], linear=True,
                       **{f: "the rank allocator's schedule: it acts between training steps, not in one forward"
                          for f in ("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "total_step")}),
    peft_files="PEFT's ADALORA: base_model.model.<module>.lora_A (r, in), .lora_E (r, 1), .lora_B (out, r), rows of "
    "pruned triplets left out as rank_pattern says, and PEFT's adapter_config.json fields (rank_pattern included), "
    "so an adapter loads in PEFT and back",
    loads_in_peft=True,
))  # fmt: skip
