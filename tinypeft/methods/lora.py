"""LoRA (Hu et al. 2021) and its variants rsLoRA, DoRA and PiSSA, on GPT-2's linear layers.

A targeted linear layer y = x W + b (W: (in, out), GPT-2's Conv1D layout) gets two small factors in
PEFT's shapes, A: (r, in) and B: (out, r), and computes

    y = x W + b + s · dropout(x) Aᵀ Bᵀ,        s = lora_alpha / r   (rsLoRA: lora_alpha / √r)

so the effective weight is W + s (B A)ᵀ, a rank-r update. Only A and B train; W is never touched.

- DoRA (Liu et al. 2024) adds a magnitude m: (out,) and rescales each output feature j by
  k_j = m_j / ‖W[:, j] + s (BA)ᵀ[:, j]‖, the norm held constant in the backward (as the paper and PEFT do).
- PiSSA (Meng et al. 2024) starts A and B from the top r singular triples of W and trains them on the
  residual W − s (B A)ᵀ, which the adapter keeps as a frozen tensor of its own (see `LoraAdapter`).

The math is in the pure forward/backward pairs below; `docs/lora.md` derives them step by step and
lists where tinypeft deliberately differs from PEFT. Tensor names are PEFT's file names
(`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`), so adapters move between the two.
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import Array, to_numpy
from ..config import linear_module_names, positive_number, shown
from ..errors import ConfigError
from ..sites import Sites
from .base import PEFT_PREFIX, Adapter, PeftConfig, match_modules, register
from .embedding_lora import (
    EMBEDDING_A,
    MERGE_MOVES_THE_HEAD,
    check_token_table,
    lora_token_indices,
    merge_token_table,
    token_table_error_cases,
    token_table_site,
    token_table_tensors,
)
from .lora_variants import (
    dora_backward,
    dora_forward,
    dora_merged_weight,
    dora_weight_norm,
    lora_estimated_parameters,
    lora_init_factors,
    pissa_niter,
    residual_factors,
    splits_the_weight,
    stop_gradient,
)
from .registry import (
    ODD_EPS,
    SMALL,
    UNIMPLEMENTED,
    Batch,
    ErrorCase,
    Flag,
    GoldenCase,
    MethodSpec,
    as_is,
    register_method,
)

if TYPE_CHECKING:
    from ..model import GPT


INIT_CHOICES = (True, False, "gaussian", "pissa", "olora")
BIAS_CHOICES = ("none", "all", "lora_only")
GPT2_DEFAULT_TARGETS = ("c_attn",)  # PEFT's default for model_type "gpt2"
TOKEN_TABLE, WTE = "transformer.wte", "transformer.wte.weight"  # "wte" in target_modules: embedding_lora.py


# ===================================================================== the math
def lora_forward(
    x: Array, weight: Array, bias: Array | None, lora_A: Array, lora_B: Array, scaling: float, keep: Array | None
) -> tuple[Array, tuple]:
    """y = x W + b + s · x_d Aᵀ Bᵀ,  x_d = x ⊙ keep (dropout on the LoRA branch only; x_d = x if keep is None).

    x: (..., in), W: (in, out), b: (out,) or None, A: (r, in), B: (out, r),
    keep: None or (..., in) holding 0 (dropped) and 1/(1 - p) (kept)  ->  y: (..., out).
    Cache: x_d, h = x_d Aᵀ (N, r), W, A, B, keep and s. h is the only new array kept (N·r numbers); with
    keep None, x_d is x itself, not a copy. x is not kept: it would serve only W's gradient, and W is frozen.
    """
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in)  # [B, T, in] -> [N, in]
    keep2 = None if keep is None else keep.reshape(-1, n_in)
    x_drop = x2 if keep2 is None else x2 * keep2  # [N, in]
    h = x_drop @ lora_A.T  # [N, in] @ [in, r] -> [N, r]
    y = x2 @ weight + (scaling * h) @ lora_B.T  # [N, in] @ [in, out] + s [N, r] @ [r, out] -> [N, out]
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, weight.shape[1]), (x_drop, h, weight, lora_A, lora_B, keep2, scaling)


def lora_backward(
    dy: Array, cache: tuple, need_dx: bool = True, need_dlora: bool = True, need_dbias: bool = False
) -> tuple[Array | None, Array | None, Array | None, Array | None]:
    """(dx, dA, dB, db) for y = x W + b + s · h Bᵀ with h = x_d Aᵀ and x_d = x ⊙ keep:

        dB  = s · dyᵀ h                    (out, r)
        dh  = s · dy B                     (N, r)
        dA  = dhᵀ x_d                      (r, in)
        dx  = dy Wᵀ + (dh A) ⊙ keep        (N, in): the base path and the LoRA path join here;
                                           without dropout that is dy (W + s (B A)ᵀ)ᵀ, one matmul
        db  = Σ_positions dy

    W is frozen, so its gradient x^T dy, a matmul as large as the forward's, is never computed.
    """
    x_drop, h, weight, lora_A, lora_B, keep2, scaling = cache
    n_in, n_out = weight.shape
    # in the forward pass this was: y = x W + b + s · (x_d Aᵀ) Bᵀ, so now:
    dy2 = dy.reshape(-1, n_out)  # [N, out]
    dx = dA = dB = db = None
    dh = scaling * (dy2 @ lora_B) if (need_dx or need_dlora) else None  # [N, out] @ [out, r] -> [N, r]
    if need_dlora:
        dB = scaling * (dy2.T @ h)  # [out, N] @ [N, r] -> [out, r]
        dA = dh.T @ x_drop  # [r, N] @ [N, in] -> [r, in]
    if need_dx:
        if keep2 is None and dy2.shape[0] > n_out:
            # both paths see the same x, so dx = dy (W + s (B A)ᵀ)ᵀ: one [N, out] @ [out, in] matmul through
            # the merged weight (against the two paths apart: a wash, 406.5 vs 410.1 ms a step at n_embd 512; it
            # stays because the golden vectors' last bits were computed so). (B A)ᵀ is formed as Aᵀ Bᵀ, in W's
            # layout: W + (B A).T read one operand across its rows, 3.7 ms for a 2048 x 512 weight on one
            # thread against 0.6 ms, for bitwise the same numbers
            merged = weight + scaling * (lora_A.T @ lora_B.T)  # [in, r] @ [r, out] -> [in, out]
            dx = dy2 @ merged.T
        else:
            dx = dy2 @ weight.T  # [N, out] @ [out, in]
            lora_dx = dh @ lora_A  # [N, r] @ [r, in]: the gradient at x_d
            dx += lora_dx if keep2 is None else lora_dx * keep2  # through the dropout mask, if any
        dx = dx.reshape(*dy.shape[:-1], n_in)
    if need_dbias:
        db = dy2.sum(axis=0)
    return dx, dA, dB, db


def lora_merged_weight(weight: Array, lora_A: Array, lora_B: Array, scaling: float) -> Array:
    """W + s (B A)ᵀ: (in, out), the weight a merged LoRA layer computes with."""
    return weight + scaling * (lora_A.T @ lora_B.T)  # [in, out] + s [in, r] @ [r, out] = s (B A)ᵀ


def dropout_keep_mask(key: tuple[int, ...], shape: tuple[int, ...], p: float, dtype: str) -> np.ndarray:
    """Inverted dropout's multiplier, as torch.nn.Dropout applies it: 0 with probability p, else 1 / (1 - p).
    Drawn from a generator seeded by `key`, so the same key gives the same mask on every call."""
    kept = np.random.default_rng(key).random(shape) >= p
    return (kept / (1.0 - p)).astype(dtype)


# ===================================================================== config
@register
@dataclass
class LoraConfig(PeftConfig):
    """LoRA and its variants, with PEFT's field names and defaults.

    r: the rank; lora_alpha: the scale numerator (s = lora_alpha / r, or lora_alpha / √r with
    use_rslora); lora_dropout: dropout on the LoRA branch's input while training; target_modules: PEFT's
    matching over the linear layers and the token embedding "wte" (a list of names or suffixes, or a
    full-match regex string; None is GPT-2's default, ["c_attn"]; wte: embedding_lora.py); use_dora:
    DoRA's magnitude vector; init_lora_weights: True (A kaiming-uniform, B = 0: the adapter starts as the
    identity), "gaussian" (A ~ N(0, 1/r²), B = 0), False (A and B both random: used by tests to get a
    non-identity adapter), "pissa", "pissa_niter_K" (its randomised SVD), "olora" (QR): W split; bias:
    which base biases train too, "none", "all" or "lora_only" (targets'); trainable_token_indices: token
    ids whose rows of wte train too, a list or {"wte": ids} (PEFT's trainable tokens inside LoRA:
    trainable_tokens.py).

    fan_in_fan_out is always True for GPT-2's Conv1D layers; PEFT forces it, and so does this class.
    rank_pattern, alpha_pattern, lora_bias and ensure_weight_tying are PEFT options tinypeft does not
    implement; they are fields only so that a PEFT adapter_config.json that uses them is refused instead
    of being computed
    as something else.
    """

    peft_type = "LORA"
    estimated_parameters = lora_estimated_parameters  # A and B a layer, DoRA's m, PiSSA's residual
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    bias: str = "none"
    fan_in_fan_out: bool = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        r, alpha, p = self.r, self.lora_alpha, self.lora_dropout
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0:
            raise ConfigError(f"LoraConfig.r must be a positive integer (the rank); got {shown(r)}")
        if not positive_number(alpha):
            raise ConfigError(f"LoraConfig.lora_alpha must be a positive finite number; got {shown(alpha)}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ConfigError(f"LoraConfig.lora_dropout must be a probability in [0, 1); got {shown(p)}")
        for name in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"LoraConfig.{name} must be True or False; got {shown(getattr(self, name))}")
        init = self.init_lora_weights
        if not any(init is c if isinstance(c, bool) else init == c for c in INIT_CHOICES) and pissa_niter(init) is None:
            allowed = f"{INIT_CHOICES} or 'pissa_niter_K' (K = 0..999 iterations of the randomised SVD)"
            raise ConfigError(f"LoraConfig.init_lora_weights must be one of {allowed}; got {shown(init)}")
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"LoraConfig.bias must be one of {BIAS_CHOICES}; got {shown(self.bias)}")
        if self.target_modules is None:
            self.target_modules = list(GPT2_DEFAULT_TARGETS)
        elif isinstance(self.target_modules, (set, frozenset)):  # PEFT keeps a set; JSON needs a list
            self.target_modules = sorted(self.target_modules)
        elif isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if not self.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out=False, but GPT-2's linear layers are Conv1D (weights stored (in, out)); "
                "setting fan_in_fan_out=True, as PEFT does",
                UserWarning,
                stacklevel=3,
            )
            self.fan_in_fan_out = True
        lora_token_indices(self.trainable_token_indices)
        refused = ("rank_pattern", "alpha_pattern", "lora_bias", "ensure_weight_tying")
        unsupported = {k: getattr(self, k) for k in refused if getattr(self, k)}
        if unsupported:
            raise ConfigError(
                f"LoraConfig: tinypeft does not implement PEFT's {shown(unsupported)}; leave them at their defaults"
            )

    @property
    def scaling(self) -> float:
        """s = lora_alpha / r, or lora_alpha / √r with rsLoRA (Kalajdzievski 2023), which keeps the update's
        size stable as r grows."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def targets(self, base: GPT) -> list[str]:
        """The targeted linear layers' module names, in model order (wte aside: `adapts_wte`)."""
        return [m for m in self._matched(base) if m != TOKEN_TABLE]

    def adapts_wte(self, base: GPT) -> bool:
        """Whether target_modules takes the token embedding too ("wte": embedding_lora.py)."""
        return TOKEN_TABLE in self._matched(base)

    def _matched(self, base: GPT) -> list[str]:
        return match_modules([TOKEN_TABLE, *linear_module_names(base.config)], self.target_modules)

    def validate(self, base: GPT) -> None:
        check_token_table(self, base, self.adapts_wte(base))
        for module in self.targets(base):
            n_in, n_out = base.params[module + ".weight"].shape
            if self.r > min(n_in, n_out):
                raise ConfigError(
                    f"LoraConfig.r={shown(self.r)} exceeds min(in, out) = min({n_in}, {n_out}) of {module}: a rank-r "
                    f"update of that layer cannot have rank above {min(n_in, n_out)}; use r <= {min(n_in, n_out)}"
                )

    def build(self, base: GPT, seed: int = 0) -> LoraAdapter:
        return LoraAdapter.create(self, base, seed)


# ===================================================================== adapter
@dataclass(frozen=True)
class LoraLayer:
    """One targeted linear layer: its module name, sizes and the names of the tensors it uses."""

    module: str
    in_features: int
    out_features: int

    @property
    def weight(self) -> str:
        return self.module + ".weight"

    @property
    def bias(self) -> str:
        return self.module + ".bias"

    @property
    def lora_A(self) -> str:
        return f"{PEFT_PREFIX}{self.module}.lora_A.weight"

    @property
    def lora_B(self) -> str:
        return f"{PEFT_PREFIX}{self.module}.lora_B.weight"

    @property
    def magnitude(self) -> str:
        return f"{PEFT_PREFIX}{self.module}.lora_magnitude_vector"

    @property
    def trained_bias(self) -> str:
        """PEFT's name for this layer's bias when bias="all"/"lora_only" trains it: the LoRA layer wraps
        the original as `base_layer`."""
        return f"{PEFT_PREFIX}{self.module}.base_layer.bias"


class LoraAdapter(Adapter):
    """LoRA factors (and DoRA magnitudes) for each targeted layer, plus trained bias copies for bias="all"/
    "lora_only" (stand-ins via `overrides`, named as PEFT saves them).

    PiSSA's residual weights. PEFT overwrites the base weight with the residual W − s (B A)ᵀ. Here the
    base GPT is shared by every adapter of a PeftModel, so it is left alone: the adapter holds the
    residual as a frozen tensor of its own (`residual_weights`, not in `params`, so it is neither
    trained nor saved) and its sites compute with it in place of W. `disable_adapter()` therefore gives
    the original base (PEFT gives the residual model), other adapters see the original W, and a saved
    PiSSA adapter loads onto the original base, where the same SVD recreates the residual (as PEFT's
    from_pretrained also does).
    """

    def __init__(
        self,
        config: LoraConfig,
        base: GPT,
        params: dict[str, Array],
        overrides: Mapping[str, str],
        layers: list[LoraLayer],
        residual_weights: Mapping[str, Array],
        seed: int,
    ) -> None:
        super().__init__(config, base, params, overrides)
        self.config: LoraConfig = config
        self.layers = layers
        self.residual_weights = dict(residual_weights)
        # dropout masks: one key per sites(training=True) call, from a stream apart from the init's
        self._dropout_keys = np.random.default_rng((seed, 1))

    @classmethod
    def create(cls, config: LoraConfig, base: GPT, seed: int) -> LoraAdapter:
        """Fresh tensors for every targeted layer, drawn in float64 from one generator in model order."""
        xp, dtype, s = base.xp, base.config.dtype, config.scaling
        rng = np.random.default_rng(seed)
        layers, residuals = [], {}
        params = token_table_tensors(config, base, config.adapts_wte(base), rng)
        for module in config.targets(base):
            n_in, n_out = base.params[module + ".weight"].shape
            layer = LoraLayer(module, n_in, n_out)
            layers.append(layer)
            if splits_the_weight(config.init_lora_weights):
                W = to_numpy(base.params[layer.weight])
                A, B, residual = residual_factors(W, config.init_lora_weights, config.r, s, len(layers) - 1)
                residuals[module] = xp.asarray(residual.astype(dtype))
            else:
                A, B = lora_init_factors(config, n_in, n_out, rng)
            params[layer.lora_A] = xp.asarray(A.astype(dtype))
            params[layer.lora_B] = xp.asarray(B.astype(dtype))
            if config.use_dora:
                # m starts at the norm it divides by, so k = 1 and a zero-B adapter is still the identity
                W_used = residuals[module] if module in residuals else base.params[layer.weight]
                params[layer.magnitude] = dora_weight_norm(W_used, params[layer.lora_A], params[layer.lora_B], s)
        overrides = {}
        for name in _trained_biases(config.bias, base, layers):
            stand_in = next((lay.trained_bias for lay in layers if lay.bias == name), PEFT_PREFIX + name)
            params[stand_in] = base.params[name].copy()
            overrides[name] = stand_in
        return cls(config, base, params, overrides, layers, residuals, seed)

    def base_weight(self, layer: LoraLayer, base_params: Mapping[str, Array]) -> Array:
        """The frozen weight the layer's update adds to: PiSSA's residual, or the base's own W."""
        return self.residual_weights.get(layer.module, base_params[layer.weight])

    def derived(self) -> dict[str, np.ndarray]:
        """PiSSA's frozen residual weight of each target, which a port computes by the same SVD."""
        return {f"{m}.pissa_residual": to_numpy(w).astype(np.float64) for m, w in self.residual_weights.items()}

    def sites(self, training: bool = False) -> Sites:
        p = self.config.lora_dropout
        key = int(self._dropout_keys.integers(2**63)) if training and p > 0 else None
        site = LoraSite(self, key)
        linear = {layer.module: site for layer in self.layers}
        return Sites(linear=linear, tokens=token_table_site(self.config, self.params), stochastic=key is not None)

    def merge(self, base_params: dict[str, Array]) -> None:
        """W <- W + s (B A)ᵀ (DoRA: scaled per column to length m), PiSSA's residual in place of W; trained
        bias copies replace the base biases; wte as `merge_token_table` says (LoRA on wte: the tied head
        changes with it, as in PEFT)."""
        super().merge(base_params)
        merge_token_table(self.config, self.params, base_params)
        s = self.config.scaling
        for layer in self.layers:
            W, A, B = self.base_weight(layer, base_params), self.params[layer.lora_A], self.params[layer.lora_B]
            if self.config.use_dora:
                base_params[layer.weight] = dora_merged_weight(W, A, B, self.params[layer.magnitude], s)
            else:
                base_params[layer.weight] = lora_merged_weight(W, A, B, s)

    def merge_caveat(self) -> str:
        return MERGE_MOVES_THE_HEAD if EMBEDDING_A in self.params else ""

    def unmerge(self, base_params: dict[str, Array], originals: Mapping[str, Array]) -> None:
        """Put back the very arrays the merge replaced (exact; PEFT subtracts the update again, which
        rounds, and for DoRA divides by k)."""
        super().unmerge(base_params, originals)
        base_params[WTE] = originals.get(WTE, base_params[WTE])
        for layer in self.layers:
            base_params[layer.weight] = originals[layer.weight]


def _trained_biases(bias: str, base: GPT, layers: list[LoraLayer]) -> list[str]:
    """The base biases bias="all" (every `*.bias`, LayerNorms' included, as PEFT) or "lora_only" (those of
    the targeted layers) trains."""
    if bias == "all":
        return [n for n in base.params if n.endswith(".bias")]
    if bias == "lora_only":
        return [layer.bias for layer in layers]
    return []


# ===================================================================== site
class LoraSite:
    """What stands in for each targeted linear layer during one forward and its backward.

    `dropout_key` (None: no dropout) seeds every layer's mask, so a forward, its backward and a gradient
    check re-running the forward all see the same masks. `held_norms`, if given, replaces DoRA's weight
    norms by fixed arrays (see `holding_norms`).
    """

    def __init__(
        self, adapter: LoraAdapter, dropout_key: int | None, held_norms: Mapping[str, Array] | None = None
    ) -> None:
        self.adapter = adapter
        self.dropout_key = dropout_key
        self.held_norms = held_norms
        self.layers = {layer.module: layer for layer in adapter.layers}
        self.layer_index = {layer.module: i for i, layer in enumerate(adapter.layers)}

    def keep_mask(self, module: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The dropout multiplier for `module`'s input of this shape (None without dropout)."""
        if self.dropout_key is None:
            return None
        key = (self.dropout_key, self.layer_index[module])
        return dropout_keep_mask(key, tuple(shape), self.adapter.config.lora_dropout, self.adapter.dtype)

    def weight_norm(self, params: Mapping[str, Array], layer: LoraLayer) -> Array:
        """DoRA's ‖W + s (B A)ᵀ‖, from stopped copies of the weights, so that autograd, like PEFT's
        `.detach()` and the hand-written backward, treats it as a constant."""
        if self.held_norms is not None:
            return self.held_norms[layer.module]
        W = stop_gradient(self.adapter.base_weight(layer, params))
        A, B = stop_gradient(params[layer.lora_A]), stop_gradient(params[layer.lora_B])
        return dora_weight_norm(W, A, B, self.adapter.config.scaling)

    def holding_norms(self, params: Mapping[str, Array]) -> LoraSite:
        """This site with DoRA's norms fixed at their values at `params`. Its forward is then a function whose
        true derivative is the detached-norm gradient, which finite differences can check."""
        norms = {m: self.weight_norm(params, layer) for m, layer in self.layers.items()}
        return LoraSite(self.adapter, self.dropout_key, norms)

    def forward(self, params: Mapping[str, Array], module: str, x: Array) -> tuple[Array, tuple]:
        layer, adapter = self.layers[module], self.adapter
        W, b = adapter.base_weight(layer, params), params[layer.bias]
        A, B, s = params[layer.lora_A], params[layer.lora_B], adapter.config.scaling
        keep = self.keep_mask(module, x.shape)
        keep = None if keep is None else adapter.xp.asarray(keep)
        if adapter.config.use_dora:
            m = params[layer.magnitude]
            y, cache = dora_forward(x, W, b, A, B, m, s, self.weight_norm(params, layer), keep)
        else:
            y, cache = lora_forward(x, W, b, A, B, s, keep)
        return y, (layer, cache)

    def backward(
        self, dy: Array, cache: tuple, trainable: Collection[str], need_dx: bool = True
    ) -> tuple[Array | None, dict[str, Array]]:
        layer, inner = cache
        if layer.weight in trainable:
            raise ConfigError(f"{layer.weight} is trainable, but LoRA keeps the base weight frozen")
        need_dparams = not {layer.lora_A, layer.lora_B, layer.magnitude}.isdisjoint(trainable)
        need_dbias = layer.bias in trainable
        if self.adapter.config.use_dora:
            dx, dA, dB, dm, db = dora_backward(dy, inner, need_dx, need_dparams, need_dbias)
            candidates = {layer.lora_A: dA, layer.lora_B: dB, layer.magnitude: dm, layer.bias: db}
        else:
            dx, dA, dB, db = lora_backward(dy, inner, need_dx, need_dparams, need_dbias)
            candidates = {layer.lora_A: dA, layer.lora_B: dB, layer.bias: db}
        grads = {name: g for name, g in candidates.items() if g is not None and name in trainable}
        return dx, grads

    def owned(self, module: str) -> tuple[str, ...]:
        layer = self.layers[module]
        dora = (layer.magnitude,) if self.adapter.config.use_dora else ()
        return layer.lora_A, layer.lora_B, *dora, layer.weight, layer.bias


# ===================================================================== the registry's entry
def _build(args: argparse.Namespace) -> LoraConfig:
    init = {"true": True, "false": False}.get(args.init_lora_weights, args.init_lora_weights)
    return LoraConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.rank,
        lora_dropout=args.lora_dropout,
        target_modules=None if args.target_modules is None else list(args.target_modules),
        use_rslora=args.use_rslora,
        use_dora=args.use_dora,
        init_lora_weights=init,
        bias=args.bias,
        trainable_token_indices=None if args.trainable_token_indices is None else list(args.trainable_token_indices),
    )


FLAGS = (
    Flag(("--target_modules",), {"nargs": "+", "default": None, "metavar": "NAME", "help": "layers to adapt "
         "(PEFT matching: a name or a suffix such as c_attn); default: PEFT's for gpt2"}),
    Flag(("--rank", "-r"), {"dest": "rank", "type": int, "default": 8, "help": "rank r"}),
    Flag(("--lora_alpha",), {"type": float, "default": None, "help": "scale numerator (default 2 * rank)"}),
    Flag(("--lora_dropout",), {"type": float, "default": 0.0, "help": "dropout on the LoRA branch"}),
    Flag(("--use_rslora",), {"action": "store_true", "help": "scale by alpha / sqrt(r) (rsLoRA)"}),
    Flag(("--use_dora",), {"action": "store_true", "help": "weight-decomposed LoRA (DoRA)"}),
    Flag(("--init_lora_weights",), {"default": "true", "help": "true: B = 0, A uniform (gaussian: A normal); "
         "false: both random; pissa, pissa_niter_K (randomised SVD, K iterations), olora (QR): split W"}),
    Flag(("--bias",), {"choices": ["none", "all", "lora_only"], "default": "none", "help": "which biases train"}),
    Flag(("--trainable_token_indices",), {"nargs": "+", "type": int, "default": None, "metavar": "ID",
         "help": "token ids whose rows of wte train too (PEFT's trainable tokens inside LoRA; default: none)"}),
)  # fmt: skip

ALL_LINEAR = ["c_attn", "c_proj", "c_fc"]
GOLDEN_CASES = (
    GoldenCase("lora", "odd", "r=2 on every kind of linear layer", ODD_EPS,
               lambda: LoraConfig(r=2, lora_alpha=3, target_modules=ALL_LINEAR), Batch(2, 7), seed=6),
    GoldenCase("lora", "rank1", "r=1 on c_attn (PEFT's default target)", SMALL,
               lambda: LoraConfig(r=1, lora_alpha=2), Batch(2, 6), seed=7),
    GoldenCase("lora", "padded", "r=2, bias='all' (every bias trains too); padded batch", SMALL,
               lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "mlp.c_proj"], bias="all"),
               Batch(3, 8, "mixed"), seed=8),
    GoldenCase("rslora", "odd", "rsLoRA r=3: s = alpha / sqrt(r)", ODD_EPS,
               lambda: LoraConfig(r=3, lora_alpha=2, use_rslora=True, target_modules=["c_attn", "c_fc"]),
               Batch(2, 7), seed=9),
    GoldenCase("rslora", "rank1", "rsLoRA r=1 on both c_proj; padded batch", SMALL,
               lambda: LoraConfig(r=1, lora_alpha=3, use_rslora=True, target_modules=["c_proj"]),
               Batch(3, 8, "mixed"), seed=10),
    GoldenCase("dora", "odd", "DoRA r=2 on every kind of linear layer", ODD_EPS,
               lambda: LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=ALL_LINEAR), Batch(2, 7), seed=11),
    GoldenCase("dora", "rank1", "DoRA with rsLoRA, r=1 on c_attn", SMALL,
               lambda: LoraConfig(r=1, lora_alpha=2, use_dora=True, use_rslora=True), Batch(2, 6), seed=12),
    GoldenCase("dora", "padded", "DoRA r=2 on the MLP, bias='lora_only'; padded batch", SMALL,
               lambda: LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["mlp.c_fc", "mlp.c_proj"],
                                  bias="lora_only"),
               Batch(3, 8, "mixed"), seed=13),
    GoldenCase("pissa", "odd", "PiSSA r=2 on c_attn and both c_proj", ODD_EPS,
               lambda: LoraConfig(r=2, lora_alpha=2, init_lora_weights="pissa", target_modules=["c_attn", "c_proj"]),
               Batch(2, 7), seed=14),
    GoldenCase("pissa", "rank1", "PiSSA with DoRA, r=1 on c_attn and c_fc; padded batch", SMALL,
               lambda: LoraConfig(r=1, lora_alpha=1, init_lora_weights="pissa", use_dora=True,
                                  target_modules=["c_attn", "c_fc"]),
               Batch(3, 8, "mixed"), seed=15),
    # issue 17: each flag where it changes a formula (r >= 2: alpha / r and alpha / sqrt(r) differ)
    GoldenCase("dora", "rslora", "DoRA with rsLoRA, r=3, bias='all'; padded batch", ODD_EPS,
               lambda: LoraConfig(r=3, lora_alpha=2, use_dora=True, use_rslora=True,
                                  target_modules=["c_attn", "mlp.c_proj"], bias="all"),
               Batch(3, 8, "mixed"), seed=42),
    GoldenCase("pissa", "rslora", "PiSSA with rsLoRA, r=2 on the MLP", ODD_EPS,
               lambda: LoraConfig(r=2, lora_alpha=3, init_lora_weights="pissa", use_rslora=True,
                                  target_modules=["mlp.c_fc", "mlp.c_proj"]),
               Batch(2, 7), seed=43),
    GoldenCase("pissa", "dora", "PiSSA with DoRA and rsLoRA, r=3 on attn.c_proj and c_fc, bias='lora_only'; "
               "padded batch", SMALL,
               lambda: LoraConfig(r=3, lora_alpha=2, init_lora_weights="pissa", use_dora=True, use_rslora=True,
                                  target_modules=["attn.c_proj", "mlp.c_fc"], bias="lora_only"),
               Batch(3, 8, "mixed"), seed=44),
    GoldenCase("lora", "regex", "r=2, target_modules a regex (layer 1's c_attn and c_fc), bias='lora_only'",
               ODD_EPS,
               lambda: LoraConfig(r=2, lora_alpha=5, target_modules=r".*\.1\.(attn\.c_attn|mlp\.c_fc)",
                                  bias="lora_only"),
               Batch(2, 7), seed=45),
    GoldenCase("lora", "wte", "r=2 on wte (the lookup; the tied head reads W) and c_attn", ODD_EPS,
               lambda: LoraConfig(r=2, lora_alpha=3, target_modules=["wte", "c_attn"]), Batch(2, 7), seed=46),
    GoldenCase("lora", "tokens", "r=1 on c_fc, trainable_token_indices [3, 0, 22] (the last id); padded batch",
               SMALL, lambda: LoraConfig(r=1, lora_alpha=2, target_modules=["c_fc"],
                                         trainable_token_indices=[3, 0, 22]), Batch(3, 8, "mixed"), seed=47),
)  # fmt: skip


def _error_cases() -> list[ErrorCase]:
    def refused(when: str, config: Any, says: tuple[str, ...]) -> ErrorCase:
        return ErrorCase(when, as_is, ConfigError, says, config=config)

    return [
        refused("LoRA r = 0", lambda: LoraConfig(r=0), ("LoraConfig.r", "got 0", "positive integer")),
        refused("LoRA r not an integer", lambda: LoraConfig(r=2.0), ("got 2.0", "positive integer")),
        refused("LoRA r > min(in, out)", lambda: LoraConfig(r=9),
                ("r=9", "min(8, 24)", "transformer.h.0.attn.c_attn", "r <= 8")),
        refused("LoRA huge r (answered at once)", lambda: LoraConfig(r=10**12), ("r=1000000000000", "r <= 8")),
        refused("LoRA lora_alpha not finite", lambda: LoraConfig(lora_alpha=float("nan")),
                ("lora_alpha", "nan", "positive finite number")),
        refused("LoRA lora_dropout = 1", lambda: LoraConfig(lora_dropout=1.0), ("lora_dropout", "1.0", "[0, 1)")),
        refused("LoRA lora_dropout negative", lambda: LoraConfig(lora_dropout=-0.1),
                ("lora_dropout", "-0.1", "[0, 1)")),
        refused("LoRA target that does not exist", lambda: LoraConfig(target_modules=["q_proj"]),
                ("'q_proj'", "matches no module", "'attn.c_attn'", "'attn.c_proj'", "'mlp.c_fc'", "'mlp.c_proj'")),
        refused("LoRA target that is neither linear nor wte", lambda: LoraConfig(target_modules=["wpe"]),
                ("'wpe'", "matches no module", "'attn.c_attn'", "'transformer.wte'")),
        refused("LoRA ensure_weight_tying", lambda: LoraConfig(ensure_weight_tying=True),
                ("ensure_weight_tying", "does not implement")),
        refused("LoRA bias unknown", lambda: LoraConfig(bias="some"), ("'some'", "'none', 'all', 'lora_only'")),
        refused("LoRA init_lora_weights unknown", lambda: LoraConfig(init_lora_weights="xavier"),
                ("'xavier'", "True, False, 'gaussian', 'pissa', 'olora'", "'pissa_niter_K'")),
        refused("LoRA fast PiSSA without a count", lambda: LoraConfig(init_lora_weights="pissa_niter_x"),
                ("'pissa_niter_x'", "K = 0..999 iterations")),
        refused("LoRA use_dora not a bool", lambda: LoraConfig(use_dora="yes"), ("use_dora", "'yes'", "True or False")),
        refused("LoRA option of PEFT's that tinypeft lacks", lambda: LoraConfig(rank_pattern={"c_attn": 4}),
                ("rank_pattern", "does not implement", "defaults")),
        *token_table_error_cases(LoraConfig),
    ]  # fmt: skip


register_method(MethodSpec(
    name="lora",
    help="LoRA on --target_modules (rsLoRA, DoRA, PiSSA by flag)",
    default_lr=1e-2,
    build=_build,
    example=lambda cfg: LoraConfig(r=1, target_modules=ALL_LINEAR, init_lora_weights=False),
    flags=FLAGS,
    golden_cases=GOLDEN_CASES,
    error_cases=_error_cases,
    inert_fields={
        "lora_dropout": "dropout on the LoRA branch, off in eval: the vectors are eval-mode numbers",
        "fan_in_fan_out": "always True for GPT-2's Conv1D layers: tinypeft, as PEFT, sets False back to True",
        "rank_pattern": UNIMPLEMENTED,
        "alpha_pattern": UNIMPLEMENTED,
        "lora_bias": UNIMPLEMENTED,
        "ensure_weight_tying": UNIMPLEMENTED,
    },
    peft_files="PEFT's LORA: base_model.model.<module>.lora_A.weight (r, in) and .lora_B.weight (out, r), "
    "transformer.wte.lora_embedding_A (r, V) and lora_embedding_B (C, r) (wte targeted), "
    "transformer.wte.token_adapter.trainable_tokens_delta (trainable_token_indices), "
    ".lora_magnitude_vector (DoRA), .base_layer.bias (bias='all' or 'lora_only'), and PEFT's adapter_config.json "
    "fields, so an adapter loads in PEFT and back (PiSSA's residual is not saved: loading recomputes it from the "
    "base by the same SVD, as PEFT does)",
    loads_in_peft=True,
    default=True,
))  # fmt: skip
