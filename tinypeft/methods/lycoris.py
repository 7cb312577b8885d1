"""What LoHa and LoKr share (PEFT's tuners/lycoris_utils.py): a weight delta built from small factors,
added to a targeted linear layer, with PEFT's config fields, its two dropouts and its init draw.

Each method only says how its delta is formed from its tensors, as a forward/backward pair:

    Δᵀ = delta_t_forward(tensors)    (in, out): Δ is (out, in), PEFT's nn.Linear layout; Δᵀ is GPT-2's
    grads = delta_t_backward(dΔᵀ)    the gradient of every tensor Δ is made of

and this module does the rest. The pair hands over Δᵀ, laid out like W, rather than Δ: W + Δ.T with Δ
(out, in) reads one operand across its rows, 3.7 to 7.6 ms for one 512 x 2048 to 768 x 3072 weight on one
thread against 0.1 to 0.4 ms for a sum in one layout, and dΔ = dW_effᵀ would be such a view in every
elementwise product of the backward. A method forms Δᵀ from its factors transposed (views, free): a LoHa
step at n_embd 512 (B 8, T 128, 2 threads) 841 -> 607 ms, LoKr 564 -> 532 ms.

The layer computes with the effective weight

    y = x (W + Δᵀ) + b                W: (in, out), GPT-2's layout; Δᵀ is Δ in that layout

which is PEFT's `base_layer(x) + F.linear(x, Δ)` in one matmul (equal up to rounding, ~1e-16). Its
backward is the linear layer's at W_eff = W + Δᵀ: dx = dy W_effᵀ, and dΔ = (xᵀ dy)ᵀ = dyᵀ x, the
gradient a full fine-tune would give the weight, transposed. Unlike LoRA's, that (out, in) matmul cannot
be skipped: Δ is a full matrix, and its factors' gradients are read off it.

Training-time randomness, as PEFT's LoHaLayer/LoKrLayer.forward (which draw with torch, so the masks
differ from PEFT's draw for draw; their law is the same):
- module_dropout p_m: each layer, each forward, skips its delta with probability p_m (y = x W + b);
- rank_dropout p_r: each output feature's row of Δ is kept with probability 1 - p_r, the kept rows then
  divided by the fraction kept (LoHa always; LoKr with rank_dropout_scale).
Both draw one value per layer and forward, not per row of the batch, so row blocks of one forward share
them (the engine may split a batch: the sites are not `stochastic`). In eval mode neither applies.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..backend import Array
from ..config import linear_module_names, positive_number, shown
from ..errors import ConfigError
from ..ops import linear_backward, linear_forward
from ..sites import Sites
from .base import PEFT_PREFIX, Adapter, PeftConfig, match_modules
from .registry import ErrorCase, Flag, as_is

if TYPE_CHECKING:
    from ..model import GPT

GPT2_DEFAULT_TARGETS = ("c_attn",)  # PEFT's TRANSFORMERS_MODELS_TO_{LOHA,LOKR}_TARGET_MODULES_MAPPING["gpt2"]
UNSUPPORTED = ("rank_pattern", "alpha_pattern", "exclude_modules", "layers_to_transform", "layers_pattern",
               "modules_to_save")  # fmt: skip


def kaiming_uniform(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """torch's kaiming_uniform_(t, a=√5) on a (rows, cols) tensor, as PEFT inits LyCORIS factors: the gain
    √(2 / (1 + 5)) times √(3 / fan_in), fan_in = cols, is U(±1/√cols)."""
    bound = 1.0 / math.sqrt(shape[1])
    return rng.uniform(-bound, bound, size=shape)


# ===================================================================== config
@dataclass
class LycorisConfig(PeftConfig):
    """The fields LoHaConfig and LoKrConfig share, with PEFT's names and defaults.

    r: the factors' rank; alpha: the scale numerator, s = alpha / r; rank_dropout, module_dropout: the
    training-time dropouts above; target_modules: PEFT's matching over the linear layers (None is
    GPT-2's default, ["c_attn"]); init_weights: the method's init (see its file).
    use_effective_conv2d only concerns convolutions: accepted and unused, as PEFT does for nn.Linear.
    rank_pattern, alpha_pattern, exclude_modules, layers_to_transform, layers_pattern and modules_to_save
    are PEFT options tinypeft does not implement; they are fields so that a PEFT adapter_config.json that
    sets them is refused instead of being computed as something else.
    """

    INIT_CHOICES: ClassVar[tuple[Any, ...]] = (True, False)
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    init_weights: bool | str = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r <= 0:
            raise ConfigError(f"{name}.r must be a positive integer (the rank); got {shown(self.r)}")
        if not positive_number(self.alpha):
            raise ConfigError(f"{name}.alpha must be a positive finite number; got {shown(self.alpha)}")
        for what in ("rank_dropout", "module_dropout"):
            p = getattr(self, what)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise ConfigError(f"{name}.{what} must be a probability in [0, 1); got {shown(p)}")
        if not isinstance(self.use_effective_conv2d, bool):
            raise ConfigError(
                f"{name}.use_effective_conv2d must be True or False; got {shown(self.use_effective_conv2d)}"
            )
        init = self.init_weights
        if not any(init is c if isinstance(c, bool) else init == c for c in self.INIT_CHOICES):
            raise ConfigError(f"{name}.init_weights must be one of {self.INIT_CHOICES}; got {shown(init)}")
        if self.target_modules is None:
            self.target_modules = list(GPT2_DEFAULT_TARGETS)
        elif isinstance(self.target_modules, (set, frozenset, tuple)):  # PEFT keeps a set; JSON needs a list
            self.target_modules = sorted(self.target_modules)
        unsupported = {k: getattr(self, k) for k in UNSUPPORTED if getattr(self, k) not in (None, {}, [])}
        if unsupported:
            raise ConfigError(f"{name}: tinypeft does not implement PEFT's {shown(unsupported)}; leave them unset")

    @property
    def scaling(self) -> float:
        """s = alpha / r, as PEFT's update_layer sets it."""
        return self.alpha / self.r

    def targets(self, base: GPT) -> list[str]:
        """The targeted linear layers' module names, in model order."""
        return match_modules(linear_module_names(base.config), self.target_modules)

    def validate(self, base: GPT) -> None:
        self.targets(base)

    def estimated_parameters(self, base: GPT) -> int:
        shapes = (base.params[m + ".weight"].shape for m in self.targets(base))
        return sum(sum(math.prod(s) for s in self.tensor_shapes(n_in, n_out).values()) for n_in, n_out in shapes)

    def tensor_shapes(self, n_in: int, n_out: int) -> dict[str, tuple[int, int]]:
        """The method's tensors of one layer, by suffix, in the order they are drawn."""
        raise NotImplementedError


# ===================================================================== adapter
@dataclass(frozen=True)
class DeltaLayer:
    """One targeted linear layer: its module, sizes and its tensors' names (PEFT's file names) by suffix."""

    module: str
    in_features: int
    out_features: int
    tensors: Mapping[str, str]  # "hada_w1_a" -> "base_model.model.transformer.h.0.attn.c_attn.hada_w1_a"

    @property
    def weight(self) -> str:
        return self.module + ".weight"

    @property
    def bias(self) -> str:
        return self.module + ".bias"


class DeltaAdapter(Adapter):
    """An adapter that adds a delta Δ (out, in), formed from its tensors, to each targeted layer's weight.
    A method subclasses it with `delta_t_forward` and `delta_t_backward` (Δᵀ, in W's layout), and says
    whether rank dropout rescales the kept rows (`rescales_rank_dropout`)."""

    def __init__(self, config: LycorisConfig, base: GPT, params: dict[str, Array], layers: list[DeltaLayer], seed: int):
        super().__init__(config, base, params)
        self.config: LycorisConfig = config
        self.layers = layers
        # dropout draws: one key per sites(training=True) call, from a stream apart from the init's
        self._dropout_keys = np.random.default_rng((seed, 1))

    @classmethod
    def create(cls, config: LycorisConfig, base: GPT, seed: int) -> DeltaAdapter:
        """Fresh tensors for every targeted layer, drawn in float64 from one generator, in model order and
        in each layer in `tensor_shapes` order."""
        rng = np.random.default_rng(seed)
        layers, params = [], {}
        for module in config.targets(base):
            n_in, n_out = base.params[module + ".weight"].shape
            shapes = config.tensor_shapes(n_in, n_out)
            layer = DeltaLayer(module, n_in, n_out, {k: f"{PEFT_PREFIX}{module}.{k}" for k in shapes})
            layers.append(layer)
            for suffix, value in cls.init_tensors(config, shapes, rng).items():
                params[layer.tensors[suffix]] = base.xp.asarray(value.astype(base.config.dtype))
        return cls(config, base, params, layers, seed)

    @staticmethod
    def init_tensors(config: Any, shapes: Mapping[str, tuple[int, int]], rng: np.random.Generator) -> dict:
        """The layer's initial tensors by suffix (float64 NumPy)."""
        raise NotImplementedError

    def delta_t_forward(self, params: Mapping[str, Array], layer: DeltaLayer) -> tuple[Array, Any]:
        """(Δᵀ (in, out), C-ordered like W, cache) from the layer's tensors in `params`."""
        raise NotImplementedError

    def delta_t_backward(self, ddelta_t: Array, cache: Any, layer: DeltaLayer) -> dict[str, Array]:
        """The gradient of each of the layer's tensors, by full name, from dΔᵀ (in, out)."""
        raise NotImplementedError

    def rescales_rank_dropout(self) -> bool:
        raise NotImplementedError

    def sites(self, training: bool = False) -> Sites:
        c = self.config
        random = training and (c.rank_dropout > 0 or c.module_dropout > 0)
        site = DeltaSite(self, int(self._dropout_keys.integers(2**63)) if random else None)
        return Sites(linear={layer.module: site for layer in self.layers})

    def merge(self, base_params: dict[str, Array]) -> None:
        """W <- W + Δᵀ: the effective weight the unmerged layer computes with."""
        for layer in self.layers:
            delta_t, _ = self.delta_t_forward(self.params, layer)
            base_params[layer.weight] = base_params[layer.weight] + delta_t  # [in, out] + [in, out]

    def unmerge(self, base_params: dict[str, Array], originals: Mapping[str, Array]) -> None:
        """Put back the very arrays the merge replaced (exact; PEFT subtracts Δ again, which rounds)."""
        for layer in self.layers:
            base_params[layer.weight] = originals[layer.weight]


# ===================================================================== site
class DeltaSite:
    """What stands in for each targeted layer during one forward and its backward: y = x (W + Δᵀ) + b.

    `dropout_key` (None: no dropout, eval mode) seeds each layer's module-dropout coin and rank-dropout
    mask, so a forward, its backward, a gradient check re-running the forward and every row block of a
    batch see the same draws."""

    def __init__(self, adapter: DeltaAdapter, dropout_key: int | None) -> None:
        self.adapter = adapter
        self.dropout_key = dropout_key
        self.layers = {layer.module: layer for layer in adapter.layers}
        self.layer_index = {layer.module: i for i, layer in enumerate(adapter.layers)}

    def uniforms(self, module: str) -> tuple[float, np.ndarray]:
        """The layer's draws in [0, 1) for this forward: the module-dropout coin, and one per output feature
        for rank dropout (PEFT draws them as torch.rand(1) and torch.rand(out), in that order)."""
        rng = np.random.default_rng((self.dropout_key, self.layer_index[module]))
        return float(rng.random()), rng.random(self.layers[module].out_features)

    def draw(self, module: str) -> tuple[bool, np.ndarray | None]:
        """(whether the delta applies, the rank-dropout multiplier of Δ's rows (out,) or None), as PEFT:
        applied when coin > module_dropout; a row kept when its draw > rank_dropout, the kept rows divided by
        the fraction kept if the method rescales (all rows dropped: all zero, where PEFT's 0/0 gives NaN)."""
        config = self.adapter.config
        if self.dropout_key is None:
            return True, None
        coin, rows = self.uniforms(module)
        if config.rank_dropout == 0:
            return coin > config.module_dropout, None
        keep = (rows > config.rank_dropout).astype(np.float64)
        if self.adapter.rescales_rank_dropout() and keep.any():
            keep = keep / keep.mean()
        return coin > config.module_dropout, keep.astype(self.adapter.dtype)

    def forward(self, params: Mapping[str, Array], module: str, x: Array) -> tuple[Array, tuple]:
        layer, adapter = self.layers[module], self.adapter
        W, b = params[layer.weight], params[layer.bias]
        applied, keep = self.draw(module)
        if not applied:  # module dropout: the base layer alone
            y, linear_cache = linear_forward(x, W, b)
            return y, (layer, None, None, linear_cache)
        delta_t, delta_cache = adapter.delta_t_forward(params, layer)  # [in, out]
        if keep is not None:
            keep = adapter.xp.asarray(keep)
            delta_t = delta_t * keep  # rank dropout: whole rows (output features) of Δ, columns of Δᵀ
        y, linear_cache = linear_forward(x, W + delta_t, b)  # [..., in] @ [in, out]: W_eff = W + Δᵀ
        return y, (layer, delta_cache, keep, linear_cache)

    def backward(
        self, dy: Array, cache: tuple, trainable: Collection[str], need_dx: bool = True
    ) -> tuple[Array | None, dict[str, Array]]:
        layer, delta_cache, keep, linear_cache = cache
        if layer.weight in trainable:
            raise ConfigError(f"{layer.weight} is trainable, but {self.adapter.config.peft_type} keeps it frozen")
        own = [name for name in layer.tensors.values() if name in trainable]
        applied = delta_cache is not None
        # in the forward pass this was: y = x W_eff + b with W_eff = W + Δᵀ, so dW_eff = xᵀ dy = dΔᵀ
        dx, dW_eff, db = linear_backward(dy, linear_cache, need_dx, bool(own) and applied, layer.bias in trainable)
        grads: dict[str, Array] = {} if db is None else {layer.bias: db}
        if own and not applied:  # a skipped delta gets no gradient
            grads |= {name: self.adapter.xp.zeros_like(self.adapter.params[name]) for name in own}
        elif own:
            ddelta_t = dW_eff if keep is None else dW_eff * keep  # [in, out]
            found = self.adapter.delta_t_backward(ddelta_t, delta_cache, layer)
            grads |= {name: found[name] for name in own}
        return dx, grads

    def owned(self, module: str) -> tuple[str, ...]:
        layer = self.layers[module]
        return *layer.tensors.values(), layer.weight, layer.bias


# ===================================================================== the registry's pieces
FLAGS = (
    Flag(("--target_modules",), {"nargs": "+", "default": None, "metavar": "NAME", "help": "layers to adapt "
         "(PEFT matching: a name or a suffix such as c_attn); default: PEFT's for gpt2"}),
    Flag(("--rank", "-r"), {"dest": "rank", "type": int, "default": 8, "help": "rank r"}),
    Flag(("--alpha",), {"type": float, "default": None, "help": "scale numerator, s = alpha / r (default: the "
         "rank, s = 1, as PEFT's defaults r = alpha = 8)"}),
    Flag(("--rank_dropout",), {"type": float, "default": 0.0, "help": "dropout of the delta's rows while training"}),
    Flag(("--module_dropout",), {"type": float, "default": 0.0,
         "help": "probability of skipping a layer's delta while training"}),
)  # fmt: skip


def common_kwargs(args: Any) -> dict[str, Any]:
    """The config fields FLAGS set, from the parsed command line."""
    return {
        "r": args.rank,
        "alpha": args.alpha if args.alpha is not None else args.rank,
        "rank_dropout": args.rank_dropout,
        "module_dropout": args.module_dropout,
        "target_modules": None if args.target_modules is None else list(args.target_modules),
    }


def common_error_cases(label: str, config_cls: type[LycorisConfig]) -> list[ErrorCase]:
    """The misuses of the shared fields, for a method labelled `label` ("LoHa")."""
    name = config_cls.__name__

    def refused(when: str, kwargs: dict[str, Any], says: tuple[str, ...]) -> ErrorCase:
        return ErrorCase(f"{label} {when}", as_is, ConfigError, says, config=lambda: config_cls(**kwargs))

    return [
        refused("r = 0", {"r": 0}, (f"{name}.r", "got 0", "positive integer")),
        refused("r not an integer", {"r": 2.0}, (f"{name}.r", "got 2.0", "positive integer")),
        refused("alpha not positive", {"alpha": 0}, (f"{name}.alpha", "got 0", "positive finite number")),
        refused("rank_dropout = 1", {"rank_dropout": 1.0}, (f"{name}.rank_dropout", "1.0", "[0, 1)")),
        refused("module_dropout negative", {"module_dropout": -0.5}, (f"{name}.module_dropout", "-0.5", "[0, 1)")),
        refused("use_effective_conv2d not a bool", {"use_effective_conv2d": "no"},
                (f"{name}.use_effective_conv2d", "'no'", "True or False")),
        refused("init_weights unknown", {"init_weights": "gaussian"}, (f"{name}.init_weights", "'gaussian'")),
        refused("target that does not exist", {"target_modules": ["q_proj"]},
                ("'q_proj'", "matches no module", "'attn.c_attn'", "'mlp.c_proj'")),
        refused("target that is not a linear layer", {"target_modules": ["ln_1"]}, ("'ln_1'", "matches no module")),
        *(refused(f"{option} set (PEFT's, not implemented)", {option: value}, (option, "does not implement"))
          for option, value in (("rank_pattern", {"c_attn": 4}), ("alpha_pattern", {"c_attn": 4}),
                                ("exclude_modules", ["c_proj"]), ("layers_to_transform", [0]),
                                ("layers_pattern", "h"), ("modules_to_save", ["ln_f"]))),
    ]  # fmt: skip
