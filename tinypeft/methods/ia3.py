"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"): learned vectors that rescale activations, one per targeted linear layer.

As PEFT computes it (peft/tuners/ia3/layer.py, Linear.forward), in GPT-2's (in, out) layout:
- a non-feedforward target (c_attn by default): y = (x W + b) * l, l of shape (out,); the bias is
  scaled too, and on the fused c_attn one vector scales q, k and v;
- a feedforward target (mlp.c_proj by default): y = (x * l) W + b, l of shape (in,); the bias is not.
PEFT's gpt2 defaults: target_modules ["c_attn", "mlp.c_proj"], feedforward_modules ["mlp.c_proj"].
A module is feedforward when it ends with one of the feedforward_modules strings (PEFT's rule:
plain `endswith`, no "." boundary) or fully matches it when it is a regex string.

Init: ones (the identity); init_ia3_weights=False draws N(0, 1) as PEFT does (tests use it).
Merge: W <- W * l on its output columns (and b <- b * l) for non-feedforward targets, W <- l * W on its
input rows for feedforward ones; unmerge puts back the exact original arrays (PEFT divides by l + 1e-8,
which is inexact and warns so).

PEFT stores l as (out, 1) or (1, in) (a Linear's broadcasting shape) and saves it so; tinypeft keeps
the vector (n,) for the math, saves PEFT's shapes and loads either.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import Array
from ..config import linear_module_names, shown
from ..errors import CheckpointError, ConfigError
from ..ops import linear_backward, linear_forward
from ..sites import Sites
from .base import PEFT_PREFIX, Adapter, PeftConfig, _compile_regex, match_modules, register
from .registry import ODD_EPS, SMALL, Batch, ErrorCase, Flag, GoldenCase, MethodSpec, as_is, register_method

if TYPE_CHECKING:
    from ..model import GPT

Params = Mapping[str, Array]

GPT2_TARGET_MODULES = ["c_attn", "mlp.c_proj"]  # PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING["gpt2"]
GPT2_FEEDFORWARD_MODULES = ["mlp.c_proj"]  # ... _IA3_FEEDFORWARD_MODULES_MAPPING["gpt2"]


# ------------------------------------------------------------------ forward / backward
def ia3_forward(x: Array, W: Array, b: Array, l: Array, feedforward: bool) -> tuple[Array, tuple]:
    """y = (x W + b) * l (l: (out,)), or, for a feedforward target, y = (x * l) W + b (l: (in,)).

    x (..., in), W (in, out), b (out,). Cache: the linear layer's cache, l, and the array l multiplied:
    the layer's output z = x W + b (non-feedforward) or its input x (feedforward).
    """
    if feedforward:
        y, linear_cache = linear_forward(x * l, W, b)  # [..., in] * [in] -> [..., in] -> [..., out]
        return y, (linear_cache, l, x, True)
    z, linear_cache = linear_forward(x, W, b)  # [..., in] -> [..., out]
    return z * l, (linear_cache, l, z, False)  # [..., out] * [out]


def ia3_backward(
    dy: Array,
    cache: tuple,
    need_dx: bool = True,
    need_dl: bool = True,
    need_dW: bool = False,
    need_db: bool = False,
) -> tuple[Array | None, Array | None, Array | None, Array | None]:
    """(dx, dl, dW, db), each None unless asked for; W and b are frozen by default.

    non-feedforward, in the forward pass this was: z = x W + b, y = z * l, so:
        dl = sum over positions of dy * z        dz = dy * l     then dx, dW, db from the linear layer at dz
    feedforward, in the forward pass this was: u = x * l, y = u W + b, so:
        du, dW, db from the linear layer at dy   dl = sum over positions of du * x     dx = du * l
    """
    linear_cache, l, saved, feedforward = cache
    dx = dl = dW = db = None
    if feedforward:
        x = saved
        need_du = need_dx or need_dl
        du, dW, db = linear_backward(dy, linear_cache, need_du, need_dW, need_db)  # du: [..., in]
        if need_dl:
            dl = (du * x).reshape(-1, x.shape[-1]).sum(axis=0)  # [N, in] -> [in]
        if need_dx:
            dx = du * l
        return dx, dl, dW, db
    z = saved
    if need_dl:
        dl = (dy * z).reshape(-1, z.shape[-1]).sum(axis=0)  # [N, out] -> [out]
    if need_dx or need_dW or need_db:
        dz = dy * l  # [..., out]
        dx, dW, db = linear_backward(dz, linear_cache, need_dx, need_dW, need_db)
    return dx, dl, dW, db


@dataclass(frozen=True)
class IA3Site:
    """A linear site for every targeted module: module -> (vector name, feedforward)."""

    vectors: Mapping[str, tuple[str, bool]]

    def forward(self, params: Params, module: str, x: Array) -> tuple[Array, tuple]:
        name, feedforward = self.vectors[module]
        y, cache = ia3_forward(x, params[module + ".weight"], params[module + ".bias"], params[name], feedforward)
        return y, (module, cache)

    def backward(
        self, dy: Array, cache: tuple, trainable: Collection[str], need_dx: bool = True
    ) -> tuple[Array | None, dict[str, Array]]:
        module, inner = cache
        name, _ = self.vectors[module]
        w, b = module + ".weight", module + ".bias"
        dx, dl, dW, db = ia3_backward(dy, inner, need_dx, name in trainable, w in trainable, b in trainable)
        grads = {k: g for k, g in ((name, dl), (w, dW), (b, db)) if g is not None}
        return dx, grads

    def owned(self, module: str) -> tuple[str, str, str]:
        return self.vectors[module][0], module + ".weight", module + ".bias"


# ------------------------------------------------------------------ config and adapter
@register
@dataclass
class IA3Config(PeftConfig):
    """(IA)^3 on target_modules, scaling the inputs of feedforward_modules and the outputs of the rest.

    Both default (None) to PEFT's gpt2 choice. feedforward_modules given as a list must be a subset
    of target_modules given as a list, as PEFT requires.
    """

    peft_type = "IA3"
    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        for field_name in ("target_modules", "feedforward_modules"):
            value = getattr(self, field_name)
            if isinstance(value, (set, tuple)):
                setattr(self, field_name, value := sorted(value))
            if value is not None and not isinstance(value, (str, list)):
                raise ConfigError(
                    f"IA3Config.{field_name} must be a list of names or a regex string; got {shown(value)}"
                )
            if isinstance(value, list) and not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"IA3Config.{field_name} entries must be non-empty module names; got {shown(value)}")
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ConfigError(
                    f"IA3Config: feedforward_modules must be a subset of target_modules (PEFT's rule); "
                    f"{extra} are not in target_modules={self.target_modules}"
                )
        if self.target_modules is None:
            self.target_modules = list(GPT2_TARGET_MODULES)
        if self.feedforward_modules is None:
            self.feedforward_modules = list(GPT2_FEEDFORWARD_MODULES)
        if isinstance(self.feedforward_modules, str):  # matched lazily, module by module: refuse a bad one now
            _compile_regex(self.feedforward_modules, "IA3Config.feedforward_modules")
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"init_ia3_weights must be True or False; got {shown(self.init_ia3_weights)}")

    def to_dict(self) -> dict[str, Any]:
        # PEFT forces fan_in_fan_out=True for GPT-2's Conv1D (with a warning if it is False): write it
        return {**super().to_dict(), "fan_in_fan_out": True}

    def is_feedforward(self, module: str) -> bool:
        """PEFT's `_check_target_module_feedforward`: regex full match, or a plain endswith per entry."""
        ff = self.feedforward_modules
        if isinstance(ff, str):
            return re.fullmatch(ff, module) is not None
        return any(module.endswith(entry) for entry in ff)

    def targets(self, base: GPT) -> dict[str, bool]:
        """Targeted linear modules -> whether each is feedforward."""
        modules = match_modules(linear_module_names(base.config), self.target_modules)
        return {m: self.is_feedforward(m) for m in modules}

    def validate(self, base: GPT) -> None:
        self.targets(base)

    def estimated_parameters(self, base: GPT) -> int:
        shapes = {module: base.params[module + ".weight"].shape for module in self.targets(base)}
        return sum(n_in if self.is_feedforward(module) else n_out for module, (n_in, n_out) in shapes.items())

    def build(self, base: GPT, seed: int = 0) -> Adapter:
        rng = np.random.default_rng(seed)
        params, vectors = {}, {}
        for module, feedforward in self.targets(base).items():
            n_in, n_out = base.params[module + ".weight"].shape
            n = n_in if feedforward else n_out
            name = f"{PEFT_PREFIX}{module}.ia3_l"
            value = np.ones(n) if self.init_ia3_weights else rng.standard_normal(n)
            params[name] = base.xp.asarray(value.astype(base.config.dtype))
            vectors[module] = (name, feedforward)
        return IA3Adapter(self, base, params, vectors)


class IA3Adapter(Adapter):
    """Vectors `base_model.model.<module>.ia3_l`: (out,) or, for feedforward modules, (in,)."""

    def __init__(self, config: IA3Config, base: GPT, params: dict[str, Array], vectors: dict[str, tuple[str, bool]]):
        super().__init__(config, base, params)
        self.vectors = vectors  # module -> (vector name, feedforward)

    def sites(self, training: bool = False) -> Sites:
        site = IA3Site(self.vectors)
        return Sites(linear={module: site for module in self.vectors})

    def merge(self, base_params: dict[str, Array]) -> None:
        """W <- W * l per output column and b <- b * l, or, feedforward, W <- l * W per input row."""
        for module, (name, feedforward) in self.vectors.items():
            l = self.params[name]
            w, b = module + ".weight", module + ".bias"
            if feedforward:
                base_params[w] = base_params[w] * l[:, None]  # [in, out] * [in, 1]
            else:
                base_params[w] = base_params[w] * l[None, :]  # [in, out] * [1, out]
                base_params[b] = base_params[b] * l

    def unmerge(self, base_params: dict[str, Array], originals: Mapping[str, Array]) -> None:
        """Put back the arrays the merge replaced (exact, unlike dividing by l, which fails where l = 0)."""
        for module in self.vectors:
            for key in (module + ".weight", module + ".bias"):
                if key in originals:
                    base_params[key] = originals[key]

    def state_dict(self) -> dict[str, np.ndarray]:
        """PEFT's saved shapes: (out, 1) for non-feedforward targets, (1, in) for feedforward ones."""
        state = super().state_dict()
        for name, feedforward in self.vectors.values():
            state[name] = state[name].reshape((1, -1) if feedforward else (-1, 1))
        return state

    def normalize_loaded(self, name: str, value: np.ndarray) -> np.ndarray:
        """Accept PEFT's (out, 1) / (1, in) and the plain vector; anything else fails the shape check."""
        feedforward = next((ff for n, ff in self.vectors.values() if n == name), False)
        peft_shape = (1, value.size) if feedforward else (value.size, 1)
        return value.reshape(-1) if value.shape == peft_shape else value


# ------------------------------------------------------------------ the registry's entry
def _build(args: argparse.Namespace) -> IA3Config:
    def names(value: list[str] | None) -> list[str] | None:
        return None if value is None else list(value)

    return IA3Config(target_modules=names(args.target_modules), feedforward_modules=names(args.feedforward_modules))


def _error_cases() -> list[ErrorCase]:
    return [
        ErrorCase("IA3 target_modules not names", as_is, ConfigError,
                  ("target_modules", "got 5", "list of names or a regex"), config=lambda: IA3Config(target_modules=5)),
        ErrorCase("IA3 feedforward_modules not among the targets", as_is, ConfigError,
                  ("['mlp.c_proj']", "subset of target_modules", "['c_attn']"),
                  config=lambda: IA3Config(target_modules=["c_attn"], feedforward_modules=["mlp.c_proj"])),
        ErrorCase("IA3 target that does not exist", as_is, ConfigError,
                  ("'c_nothing'", "matches no module", "'attn.c_attn'", "'mlp.c_proj'"),
                  config=lambda: IA3Config(target_modules=["c_nothing"], feedforward_modules=[])),
        ErrorCase("IA3 target that is not a linear layer", as_is, ConfigError,
                  ("'ln_1'", "matches no module", "'attn.c_attn'"),
                  config=lambda: IA3Config(target_modules=["ln_1"], feedforward_modules=[])),
        ErrorCase("IA3 feedforward_modules an invalid regex", as_is, ConfigError,
                  ("IA3Config.feedforward_modules", "'(c_proj'", "not a valid regular expression"),
                  config=lambda: IA3Config(target_modules=".*c_proj", feedforward_modules="(c_proj")),
        ErrorCase("IA3 init_ia3_weights not a bool", as_is, ConfigError, ("init_ia3_weights", "'yes'", "True or False"),
                  config=lambda: IA3Config(init_ia3_weights="yes")),
        ErrorCase("IA3 feedforward_modules entry not a string (adapter_config.json)",
                  lambda base: PeftConfig.from_dict({"peft_type": "IA3", "feedforward_modules": [None]}),
                  CheckpointError, ("adapter_config.json", "feedforward_modules", "[None]", "non-empty module names")),
    ]  # fmt: skip


register_method(MethodSpec(
    name="ia3",
    help="IA3: learned scaling of c_attn outputs and mlp.c_proj inputs",
    default_lr=2e-2,
    build=_build,
    example=lambda cfg: IA3Config(init_ia3_weights=False),
    flags=(
        Flag(("--target_modules",), {"nargs": "+", "default": None, "metavar": "NAME", "help": "layers to adapt "
             "(PEFT matching: a name or a suffix such as c_attn); default: PEFT's for gpt2"}),
        Flag(("--feedforward_modules",), {"nargs": "+", "default": None, "metavar": "NAME",
             "help": "targets scaled on input; default: PEFT's for gpt2 (mlp.c_proj)"}),
    ),
    golden_cases=(
        GoldenCase("ia3", "odd", "PEFT's gpt2 defaults: c_attn scaled on its output, mlp.c_proj on its input",
                   ODD_EPS, IA3Config, Batch(2, 7), seed=23),
        GoldenCase("ia3", "padded", "every linear layer; both MLP layers scaled on their input; padded batch", SMALL,
                   lambda: IA3Config(target_modules=["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
                                     feedforward_modules=["mlp.c_fc", "mlp.c_proj"]),
                   Batch(3, 8, "mixed"), seed=24),
        # issue 17: the feed-forward rule, pinned where a flip keeps the shapes (attn.c_proj is square)
        GoldenCase("ia3", "suffix", "target_modules a regex (every linear layer); feedforward_modules ['_proj'], "
                   "a suffix without a '.': both c_proj scaled on their input", ODD_EPS,
                   lambda: IA3Config(target_modules=r".*\.(c_attn|c_proj|c_fc)", feedforward_modules=["_proj"]),
                   Batch(3, 8, "mixed"), seed=40),
        GoldenCase("ia3", "regex_ff", "feedforward_modules a regex (layer 1's attn.c_proj and mlp.c_fc on their "
                   "input)", SMALL,
                   lambda: IA3Config(target_modules=["c_attn", "c_proj", "c_fc"],
                                     feedforward_modules=r"transformer\.h\.1\.(attn\.c_proj|mlp\.c_fc)"),
                   Batch(2, 6), seed=41),
    ),
    error_cases=_error_cases,
    inert_fields={
        "init_ia3_weights": "an init (ones or random): the vectors store the vectors, moved off it",
        "fan_in_fan_out": "written for PEFT, always True for GPT-2's Conv1D layers; IA3Config has no such field",
    },
    peft_files="PEFT's IA3: base_model.model.<module>.ia3_l in PEFT's shapes, (out, 1), or (1, in) for a "
    "feedforward module, and PEFT's adapter_config.json fields, so an adapter loads in PEFT and back",
    loads_in_peft=True,
))  # fmt: skip
