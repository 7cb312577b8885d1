"""VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation") on GPT-2's linear layers.

One pair of frozen random matrices, A: (r, max_in) and B: (max_out, r), is shared by every targeted layer;
each layer uses the top-left block its sizes need, A_s = A[:, :in] and B_s = B[:out, :]. What trains is two
vectors per layer, λ_d: (r,) and λ_b: (out,). In GPT-2's (in, out) layout, with x_d = dropout(x):

    y = x W + b + λ_b ⊙ ((λ_d ⊙ (x_d A_sᵀ)) B_sᵀ)          (the paper's h = W₀x + Λ_b B Λ_d A x)

so the effective weight is W + (Λ_b B_s Λ_d A_s)ᵀ. Init: λ_b = 0 (the adapter starts as the identity),
λ_d = d_initial. A and B are drawn as PEFT draws them (peft/tuners/vera/model.py, `_kaiming_init`): one
torch.Generator seeded with projection_prng_key, A then B, kaiming-uniform with gain √2. `torch_kaiming_uniform`
reproduces that draw bit for bit in NumPy, so tinypeft needs no torch to rebuild PEFT's matrices from the key
(save_projection=False) and a test checks it against torch itself. docs/vera.md derives the backward.
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import Array, to_numpy
from ..config import linear_module_names, shown
from ..errors import CheckpointError, ConfigError
from ..sites import Sites
from .base import PEFT_PREFIX, Adapter, PeftConfig, match_modules, register
from .lora import dropout_keep_mask
from .registry import ODD_EPS, SMALL, Batch, ErrorCase, Flag, GoldenCase, MethodSpec, as_is, inert, register_method

if TYPE_CHECKING:
    from ..model import GPT

GPT2_DEFAULT_TARGETS = ("c_attn",)  # PEFT's TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING["gpt2"]
BIAS_CHOICES = ("none", "all", "vera_only")
# where PEFT saves the shared projections: under the tuner, not under a module, and with no adapter name
VERA_A, VERA_B = "base_model.vera_A", "base_model.vera_B"
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


# ===================================================================== the shared random projections
def torch_kaiming_uniform(key: int, shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """PEFT's `_kaiming_init` of each shape in turn, from one `torch.Generator("cpu").manual_seed(key)`,
    reproduced bit for bit in NumPy (float32 arrays):

    - torch's CPU generator is MT19937 seeded by init_genrand(key mod 2³²), NumPy's legacy seeding too;
    - `uniform_(lo, hi)` on float32 takes one 32-bit output per element, in memory order, keeps its low 24
      bits v and returns v·2⁻²⁴·(hi − lo) + lo rounded once to float32 (torch's kernel is a fused multiply-
      add; in float64 the product and the sum are exact, so one rounding of the float64 result is the same);
    - the bound is kaiming_uniform's with gain √2 over fan_in = shape[1]: √3 · √2 / √fan_in.
    """
    state = np.random.RandomState(key % 2**32).get_state(legacy=False)  # init_genrand, as torch seeds
    bits = np.random.MT19937()
    bits.state = state
    arrays = []
    for shape in shapes:
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
        lo, hi = np.float32(-bound), np.float32(bound)
        low24 = (bits.random_raw(math.prod(shape)) & 0xFFFFFF).astype(np.float64)  # one draw per element
        u = low24 * 2.0**-24 * np.float64(hi - lo) + np.float64(lo)  # exact in float64
        arrays.append(u.astype(np.float32).reshape(shape))  # the one rounding
    return arrays


# ===================================================================== the math
def vera_forward(
    x: Array,
    weight: Array,
    bias: Array | None,
    A: Array,
    B: Array,
    lambda_d: Array,
    lambda_b: Array,
    keep: Array | None,
) -> tuple[Array, tuple]:
    """y = x W + b + λ_b ⊙ ((λ_d ⊙ (x_d Aᵀ)) Bᵀ),  x_d = x ⊙ keep (dropout on the VeRA branch only).

    x: (..., in), W: (in, out), b: (out,) or None, A: (r, in) and B: (out, r) (this layer's slices of the
    shared projections), λ_d: (r,), λ_b: (out,), keep: None or (..., in) holding 0 and 1/(1 - p) -> y: (..., out).
    Cache: h = x_d Aᵀ (N, r), the only new array kept (N·r numbers), and the inputs; u = (h ⊙ λ_d) Bᵀ is not
    kept (N·out numbers): the backward recomputes it. x is not kept: only W's frozen gradient would use it.
    """
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in)  # [B, T, in] -> [N, in]
    keep2 = None if keep is None else keep.reshape(-1, n_in)
    x_drop = x2 if keep2 is None else x2 * keep2
    h = x_drop @ A.T  # [N, in] @ [in, r] -> [N, r]
    u = (h * lambda_d) @ B.T  # ([N, r] * [r]) @ [r, out] -> [N, out]
    y = x2 @ weight + u * lambda_b  # [N, out] + [N, out] * [out]
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, weight.shape[1]), (h, weight, A, B, lambda_d, lambda_b, keep2)


def vera_backward(
    dy: Array, cache: tuple, need_dx: bool = True, need_dlambda: bool = True, need_dbias: bool = False
) -> tuple[Array | None, Array | None, Array | None, Array | None]:
    """(dx, dλ_d, dλ_b, db) for y = x W + b + u ⊙ λ_b, u = g Bᵀ, g = h ⊙ λ_d, h = x_d Aᵀ:

        dλ_b = Σ_n dy ⊙ u                  (out,)   u recomputed as (h ⊙ λ_d) Bᵀ
        du   = dy ⊙ λ_b                    (N, out)
        dg   = du B                        (N, r)
        dλ_d = Σ_n dg ⊙ h                  (r,)
        dh   = dg ⊙ λ_d                    (N, r)
        dx   = dy Wᵀ + (dh A) ⊙ keep       (N, in): the base path and the VeRA path join here
        db   = Σ_n dy

    A and B are frozen (no gradient, ever), and so is W: its x^T dy matmul is never computed.
    """
    h, weight, A, B, lambda_d, lambda_b, keep2 = cache
    n_in, n_out = weight.shape
    # in the forward pass this was: y = x W + b + λ_b ⊙ ((λ_d ⊙ (x_d Aᵀ)) Bᵀ), so now:
    dy2 = dy.reshape(-1, n_out)  # [N, out]
    dx = dlambda_d = dlambda_b = db = None
    dg = (dy2 * lambda_b) @ B if (need_dx or need_dlambda) else None  # [N, out] @ [out, r] -> [N, r]
    if need_dlambda:
        u = (h * lambda_d) @ B.T  # [N, r] @ [r, out] -> [N, out], as in the forward
        dlambda_b = (dy2 * u).sum(axis=0)  # [N, out] -> [out]
        dlambda_d = (dg * h).sum(axis=0)  # [N, r] -> [r]
    if need_dx:
        vera_dx = (dg * lambda_d) @ A  # [N, r] @ [r, in]: the gradient at x_d
        dx = dy2 @ weight.T + (vera_dx if keep2 is None else vera_dx * keep2)  # [N, out] @ [out, in]
        dx = dx.reshape(*dy.shape[:-1], n_in)
    if need_dbias:
        db = dy2.sum(axis=0)
    return dx, dlambda_d, dlambda_b, db


def vera_delta_weight(A: Array, B: Array, lambda_d: Array, lambda_b: Array) -> Array:
    """(Λ_b B Λ_d A)ᵀ: (in, out), what a merge adds to W (A, B: the layer's slices)."""
    return ((lambda_b[:, None] * B) @ (lambda_d[:, None] * A)).T  # ([out, r] @ [r, in])ᵀ


# ===================================================================== config
@register
@dataclass
class VeraConfig(PeftConfig):
    """VeRA with PEFT's field names and defaults.

    r: the projections' inner size (PEFT's default 256: VeRA trains r + out numbers a layer, so r can be large);
    target_modules: PEFT's matching over the linear layers (None: GPT-2's default, ["c_attn"]);
    projection_prng_key: the seed of A and B; save_projection: whether adapter_model.safetensors holds A and B
    (False: a loader redraws them from the key); vera_dropout: dropout on the VeRA branch's input while
    training; d_initial: λ_d's init; bias: which base biases train too, "none", "all" or "vera_only" (the
    targeted layers'); init_weights: True (λ_b = 0, λ_d = d_initial), False (λ_b = 1, λ_d ~ N(0, 1): tests use it
    to get a non-identity adapter). fan_in_fan_out is forced True for GPT-2's Conv1D, as PEFT does.
    modules_to_save, layers_to_transform and layers_pattern are PEFT options tinypeft does not implement; they
    are fields only so that an adapter_config.json using them is refused, not computed as something else.
    """

    peft_type = "VERA"
    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = True
    bias: str = "none"
    init_weights: bool = True
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        r, p, d, key, targets = self.r, self.vera_dropout, self.d_initial, self.projection_prng_key, self.target_modules
        if not _integer(r) or r <= 0:
            raise ConfigError(f"VeraConfig.r must be a positive integer (the projections' rank); got {shown(r)}")
        if not _integer(key) or not SEED_RANGE[0] <= key < SEED_RANGE[1]:
            raise ConfigError(f"VeraConfig.projection_prng_key must be an integer in [-2**63, 2**64) (a "
                              f"torch.Generator seed); got {shown(key)}")  # fmt: skip
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ConfigError(f"VeraConfig.vera_dropout must be a probability in [0, 1); got {shown(p)}")
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not -math.inf < d < math.inf:
            raise ConfigError(f"VeraConfig.d_initial must be a finite number (λ_d's init); got {shown(d)}")
        for name in ("save_projection", "fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"VeraConfig.{name} must be True or False; got {shown(getattr(self, name))}")
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"VeraConfig.bias must be one of {BIAS_CHOICES}; got {shown(self.bias)}")
        if targets is None or isinstance(targets, (set, frozenset, tuple)):  # PEFT keeps a set; JSON needs a list
            self.target_modules = list(GPT2_DEFAULT_TARGETS) if targets is None else sorted(targets, key=str)
        if not self.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=False, but GPT-2's linear layers are Conv1D (weights stored (in, out)); "
                          "setting fan_in_fan_out=True, as PEFT does", UserWarning, stacklevel=3)  # fmt: skip
            self.fan_in_fan_out = True
        unsupported = {k: getattr(self, k) for k in ("modules_to_save", "layers_to_transform", "layers_pattern")}
        if any(v is not None and v != [] for v in unsupported.values()):
            raise ConfigError(
                f"VeraConfig: tinypeft does not implement PEFT's {shown(unsupported)}; leave them at None"
            )

    def targets(self, base: GPT) -> list[str]:
        """The targeted linear layers' module names, in model order."""
        return match_modules(linear_module_names(base.config), self.target_modules)

    def projection_shapes(self, base: GPT) -> tuple[tuple[int, int], tuple[int, int]]:
        """A's (r, max in) and B's (max out, r) over the targets, as PEFT's `_find_dim`."""
        sizes = [base.params[module + ".weight"].shape for module in self.targets(base)]
        return (self.r, max(n_in for n_in, _ in sizes)), (max(n_out for _, n_out in sizes), self.r)

    def validate(self, base: GPT) -> None:
        self.targets(base)

    def estimated_parameters(self, base: GPT) -> int:
        """A and B, λ_d and λ_b a layer, and the trained bias copies."""
        (r, n_in), (n_out, _) = self.projection_shapes(base)
        n = r * (n_in + n_out) + sum(r + base.params[m + ".weight"].shape[1] for m in self.targets(base))
        return n + sum(int(base.params[name].size) for name in _trained_biases(self.bias, base, self.targets(base)))

    def build(self, base: GPT, seed: int = 0) -> VeraAdapter:
        return VeraAdapter.create(self, base, seed)


def _integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _trained_biases(bias: str, base: GPT, modules: list[str]) -> list[str]:
    """The base biases bias="all" (every `*.bias`, LayerNorms' included, as PEFT) or "vera_only" (those of the
    targeted layers) trains."""
    if bias == "all":
        return [n for n in base.params if n.endswith(".bias")]
    return [module + ".bias" for module in modules] if bias == "vera_only" else []


# ===================================================================== adapter
@dataclass(frozen=True)
class VeraLayer:
    """One targeted linear layer: its module name, sizes, and the names of the tensors it uses. trained_bias is
    PEFT's name for its bias when bias="all"/"vera_only" trains it (the VeRA layer wraps the original as base_layer)."""

    module: str
    in_features: int
    out_features: int
    weight: str = ""
    bias: str = ""
    lambda_d: str = ""
    lambda_b: str = ""
    trained_bias: str = ""

    @classmethod
    def of(cls, module: str, in_features: int, out_features: int) -> VeraLayer:
        p = PEFT_PREFIX + module
        names = (".weight", ".bias", ".vera_lambda_d", ".vera_lambda_b", ".base_layer.bias")
        return cls(module, in_features, out_features, module + names[0], module + names[1], *(p + n for n in names[2:]))


class VeraAdapter(Adapter):
    """λ_d and λ_b for each targeted layer (in `params`: trained and saved), trained bias copies for bias="all"/
    "vera_only", and the frozen projections A and B, held beside `params` (never trained; saved only with
    save_projection, under PEFT's names `base_model.vera_A` / `base_model.vera_B`). Each adapter of a PeftModel
    holds its own pair; PEFT shares one pair between adapters and so requires them all to have one key."""

    def __init__(
        self,
        config: VeraConfig,
        base: GPT,
        params: dict[str, Array],
        overrides: Mapping[str, str],
        layers: list[VeraLayer],
        seed: int,
    ) -> None:
        super().__init__(config, base, params, overrides)
        self.config: VeraConfig = config
        self.layers = layers
        A, B = torch_kaiming_uniform(config.projection_prng_key, config.projection_shapes(base))
        self.vera_A, self.vera_B = (base.xp.asarray(m.astype(base.config.dtype)) for m in (A, B))
        # dropout masks: one key per sites(training=True) call, from a stream apart from the init's
        self._dropout_keys = np.random.default_rng((seed, 1))

    @classmethod
    def create(cls, config: VeraConfig, base: GPT, seed: int) -> VeraAdapter:
        """λ_b = 0 and λ_d = d_initial for every target (init_weights=False: λ_b = 1, λ_d ~ N(0, 1) from `seed`)."""
        xp, dtype = base.xp, base.config.dtype
        rng = np.random.default_rng(seed)
        layers, params = [], {}
        for module in config.targets(base):
            layer = VeraLayer.of(module, *base.params[module + ".weight"].shape)
            layers.append(layer)
            if config.init_weights:
                d, b = np.full(config.r, float(config.d_initial)), np.zeros(layer.out_features)
            else:
                d, b = rng.standard_normal(config.r), np.ones(layer.out_features)
            params[layer.lambda_d] = xp.asarray(d.astype(dtype))
            params[layer.lambda_b] = xp.asarray(b.astype(dtype))
        overrides = {}
        for name in _trained_biases(config.bias, base, [layer.module for layer in layers]):
            stand_in = next((lay.trained_bias for lay in layers if lay.bias == name), PEFT_PREFIX + name)
            params[stand_in] = base.params[name].copy()
            overrides[name] = stand_in
        return cls(config, base, params, overrides, layers, seed)

    def projections(self, layer: VeraLayer) -> tuple[Array, Array]:
        """A[:, :in] (r, in) and B[:out, :] (out, r): the blocks of the shared pair this layer uses."""
        return self.vera_A[:, : layer.in_features], self.vera_B[: layer.out_features, :]

    def derived(self) -> dict[str, np.ndarray]:
        """A and B, which a port draws from projection_prng_key (docs/vera.md says how)."""
        return {VERA_A: to_numpy(self.vera_A).astype(np.float64), VERA_B: to_numpy(self.vera_B).astype(np.float64)}

    def sites(self, training: bool = False) -> Sites:
        p = self.config.vera_dropout
        key = int(self._dropout_keys.integers(2**63)) if training and p > 0 else None
        site = VeraSite(self, key)
        return Sites(linear={layer.module: site for layer in self.layers}, stochastic=key is not None)

    def merge(self, base_params: dict[str, Array]) -> None:
        """W <- W + (Λ_b B_s Λ_d A_s)ᵀ for every target; trained bias copies replace the base biases."""
        super().merge(base_params)
        for layer in self.layers:
            A, B = self.projections(layer)
            delta = vera_delta_weight(A, B, self.params[layer.lambda_d], self.params[layer.lambda_b])
            base_params[layer.weight] = base_params[layer.weight] + delta

    def unmerge(self, base_params: dict[str, Array], originals: Mapping[str, Array]) -> None:
        """Put back the very arrays the merge replaced (exact; PEFT subtracts ΔW again, which rounds)."""
        super().unmerge(base_params, originals)
        for layer in self.layers:
            base_params[layer.weight] = originals[layer.weight]

    # ---------------------------------------------------------------- files
    def state_dict(self) -> dict[str, np.ndarray]:
        """λ_d, λ_b (and trained biases); with save_projection, A and B too, as PEFT saves them."""
        state = super().state_dict()
        if self.config.save_projection:
            state |= {VERA_A: to_numpy(self.vera_A).copy(), VERA_B: to_numpy(self.vera_B).copy()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """With save_projection, A and B come from `state`, checked as every tensor is (PEFT refuses a file without
        them, and so does this); without, they stay as drawn from the key, and any in `state` are ignored with a
        warning, as PEFT does."""
        if not isinstance(state, Mapping):
            return super().load_state_dict(state)  # which refuses it
        if not self.config.save_projection:
            if VERA_A in state or VERA_B in state:
                warnings.warn(
                    "save_projection=False, so vera_A and vera_B are redrawn from projection_prng_key; those in the "
                    "state dict are ignored (as PEFT does)",
                    UserWarning,
                    stacklevel=3,
                )
            return super().load_state_dict({k: v for k, v in state.items() if k not in (VERA_A, VERA_B)})
        if VERA_A not in state or VERA_B not in state:
            raise CheckpointError(
                f"VERA adapter with save_projection=True, but the state dict lacks "
                f"{sorted({VERA_A, VERA_B} - set(state))} (PEFT refuses it too); a file saved with "
                "save_projection=False needs that setting in its adapter_config.json"
            )
        trained = self.params
        self.params = {**trained, VERA_A: self.vera_A, VERA_B: self.vera_B}  # checked and loaded with the rest
        try:
            super().load_state_dict(state)
        finally:
            loaded, self.params = self.params, trained
        self.vera_A, self.vera_B = loaded.pop(VERA_A), loaded.pop(VERA_B)
        self.params = loaded


# ===================================================================== site
class VeraSite:
    """What stands in for each targeted linear layer during one forward and its backward. `dropout_key` (None:
    no dropout) seeds every layer's mask, so a forward, its backward and a gradient check agree on them."""

    def __init__(self, adapter: VeraAdapter, dropout_key: int | None) -> None:
        self.adapter = adapter
        self.dropout_key = dropout_key
        self.layers = {layer.module: layer for layer in adapter.layers}
        self.layer_index = {layer.module: i for i, layer in enumerate(adapter.layers)}

    def keep_mask(self, module: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The dropout multiplier for `module`'s input of this shape (None without dropout)."""
        if self.dropout_key is None:
            return None
        key = (self.dropout_key, self.layer_index[module])
        return dropout_keep_mask(key, tuple(shape), self.adapter.config.vera_dropout, self.adapter.dtype)

    def forward(self, params: Mapping[str, Array], module: str, x: Array) -> tuple[Array, tuple]:
        layer, adapter = self.layers[module], self.adapter
        A, B = adapter.projections(layer)
        keep = self.keep_mask(module, x.shape)
        keep = None if keep is None else adapter.xp.asarray(keep)
        W, b = params[layer.weight], params[layer.bias]
        y, cache = vera_forward(x, W, b, A, B, params[layer.lambda_d], params[layer.lambda_b], keep)
        return y, (layer, cache)

    def backward(
        self, dy: Array, cache: tuple, trainable: Collection[str], need_dx: bool = True
    ) -> tuple[Array | None, dict[str, Array]]:
        layer, inner = cache
        if layer.weight in trainable:
            raise ConfigError(f"{layer.weight} is trainable, but VeRA keeps the base weight frozen")
        need_dlambda = not {layer.lambda_d, layer.lambda_b}.isdisjoint(trainable)
        dx, dd, db_vec, db = vera_backward(dy, inner, need_dx, need_dlambda, layer.bias in trainable)
        candidates = {layer.lambda_d: dd, layer.lambda_b: db_vec, layer.bias: db}
        return dx, {name: g for name, g in candidates.items() if g is not None and name in trainable}

    def owned(self, module: str) -> tuple[str, ...]:
        layer = self.layers[module]
        return layer.lambda_d, layer.lambda_b, layer.weight, layer.bias


# ===================================================================== the registry's entry
def _build(args: argparse.Namespace) -> VeraConfig:
    return VeraConfig(
        r=args.vera_rank,
        target_modules=None if args.target_modules is None else list(args.target_modules),
        projection_prng_key=args.projection_prng_key,
        save_projection=args.save_projection,
        vera_dropout=args.vera_dropout,
        d_initial=args.d_initial,
    )


ALL_LINEAR = ["c_attn", "c_proj", "c_fc"]
GOLDEN_CASES = (
    GoldenCase("vera", "odd", "r=5 on every kind of linear layer: A and B sliced per layer", ODD_EPS,
               lambda: VeraConfig(r=5, target_modules=ALL_LINEAR), Batch(2, 7), seed=41),
    GoldenCase("vera", "padded", "r=3 on c_attn and mlp.c_fc, key 7, bias='vera_only'; padded batch", SMALL,
               lambda: VeraConfig(r=3, target_modules=["c_attn", "mlp.c_fc"], projection_prng_key=7,
                                  bias="vera_only", save_projection=False),
               Batch(3, 8, "mixed"), seed=42),
    GoldenCase("vera", "rank1", "r=1 on both c_proj (B's rows sliced to 8 for attn.c_proj)", SMALL,
               lambda: VeraConfig(r=1, target_modules=["c_proj"], projection_prng_key=2**40 + 3),
               Batch(2, 6), seed=46),
)  # fmt: skip


REFUSED = (  # (when, VeraConfig's keyword arguments, what its one-line ConfigError says)
    ("VeRA r = 0", {"r": 0}, ("VeraConfig.r", "got 0", "positive integer")),
    ("VeRA r not an integer", {"r": 4.0}, ("VeraConfig.r", "got 4.0", "positive integer")),
    ("VeRA target that does not exist", {"target_modules": ["q_proj"]},
     ("'q_proj'", "matches no module", "'attn.c_attn'", "'mlp.c_proj'")),
    ("VeRA target_modules empty", {"target_modules": []}, ("target_modules", "non-empty")),
    ("VeRA projection_prng_key not an integer", {"projection_prng_key": 1.5}, ("projection_prng_key", "1.5")),
    ("VeRA projection_prng_key past torch's seeds", {"projection_prng_key": 2**64},
     ("projection_prng_key", "18446744073709551616", "[-2**63, 2**64)", "torch.Generator seed")),
    ("VeRA save_projection not a bool", {"save_projection": "no"}, ("save_projection", "'no'", "True or False")),
    ("VeRA vera_dropout = 1", {"vera_dropout": 1.0}, ("vera_dropout", "1.0", "[0, 1)")),
    ("VeRA d_initial not finite", {"d_initial": float("inf")}, ("d_initial", "inf", "finite number")),
    ("VeRA fan_in_fan_out not a bool", {"fan_in_fan_out": None}, ("fan_in_fan_out", "None", "True or False")),
    ("VeRA bias unknown", {"bias": "lora_only"}, ("'lora_only'", "'none', 'all', 'vera_only'")),
    ("VeRA init_weights not a bool", {"init_weights": 1}, ("init_weights", "got 1", "True or False")),
    ("VeRA modules_to_save (a PEFT option tinypeft lacks)", {"modules_to_save": ["wte"]},
     ("modules_to_save", "does not implement", "None")),
    ("VeRA layers_to_transform (a PEFT option tinypeft lacks)", {"layers_to_transform": 0},
     ("layers_to_transform", "does not implement")),
    ("VeRA layers_pattern (a PEFT option tinypeft lacks)", {"layers_pattern": "h"},
     ("layers_pattern", "does not implement")),
)  # fmt: skip


def _error_cases() -> list[ErrorCase]:
    refused = [ErrorCase(when, as_is, ConfigError, says, config=lambda kw=kw: VeraConfig(**kw))
               for when, kw, says in REFUSED]  # fmt: skip
    return [
        *refused,
        ErrorCase("VeRA file saved with save_projection=True but without A and B",
                  lambda model: model.load_adapter_state_dict(
                      {k: v for k, v in model.adapter_state_dict().items() if k != VERA_A}),
                  CheckpointError, ("save_projection=True", "base_model.vera_A", "PEFT refuses it too"),
                  config=lambda: VeraConfig(r=2)),
        ErrorCase("VeRA saved projection of the wrong shape",
                  lambda model: model.load_adapter_state_dict({**model.adapter_state_dict(), VERA_B: np.zeros((3, 2))}),
                  CheckpointError, ("base_model.vera_B", "(3, 2)", "(24, 2)"), config=lambda: VeraConfig(r=2)),
    ]  # fmt: skip


register_method(MethodSpec(
    name="vera",
    help="VeRA: frozen shared random A and B, trained scaling vectors d and b per layer on --target_modules",
    default_lr=1e-1,  # the best of 1e-2, 3e-2, 1e-1, 3e-1 at finetune's 200 steps (docs/vera.md)
    build=_build,
    example=lambda cfg: VeraConfig(r=3, target_modules=ALL_LINEAR, init_weights=False),
    flags=(
        Flag(("--target_modules",), {"nargs": "+", "default": None, "metavar": "NAME", "help": "layers to adapt "
             "(PEFT matching: a name or a suffix such as c_attn); default: PEFT's for gpt2"}),
        Flag(("--vera_rank",), {"type": int, "default": 256, "help": "rank r of the shared projections"}),
        Flag(("--projection_prng_key",), {"type": int, "default": 0, "help": "seed of the shared projections"}),
        Flag(("--no_save_projection",), {"dest": "save_projection", "action": "store_false",
             "help": "leave A and B out of the adapter file (loaders redraw them from the key)"}),
        Flag(("--vera_dropout",), {"type": float, "default": 0.0, "help": "dropout on the VeRA branch"}),
        Flag(("--d_initial",), {"type": float, "default": 0.1, "help": "initial value of every d"}),
    ),
    golden_cases=GOLDEN_CASES,
    error_cases=_error_cases,
    inert_fields=inert(("layers_pattern", "layers_to_transform", "modules_to_save"), (), ["vera_dropout"],
                       ["init_weights", "d_initial"], linear=True,
                       save_projection="whether the file holds A and B: the vectors hold them as derived tensors"),
    peft_files="PEFT's VERA: base_model.model.<module>.vera_lambda_d (r,) and .vera_lambda_b (out,), the shared "
    "base_model.vera_A (r, max in) and base_model.vera_B (max out, r) unless save_projection is False (loaders then "
    "redraw them from projection_prng_key, bit for bit as torch does), .base_layer.bias (bias='all' or 'vera_only'), "
    "and PEFT's adapter_config.json fields, so an adapter loads in PEFT and back",
    loads_in_peft=True,
))  # fmt: skip
