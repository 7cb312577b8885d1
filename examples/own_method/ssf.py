"""SSF, a PEFT method written outside tinypeft: scale and shift each feature a linear layer outputs.

Lian et al. 2022, "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning". SSF
follows an operation of the frozen model with a learned per-feature scale and shift. Here the
operation is a linear layer, the site this toy plugs into:

    y = (x W + b) ⊙ γ + β        x (N, in), W (in, out), b, γ, β (out,); γ and β broadcast over N = B·T rows

This file is the whole method, and docs/write_a_method.md builds it step by step: the forward/backward
pair, the site that puts it in the model, the config that builds it (and loads it from
adapter_config.json), the adapter that holds its tensors and merges them, and the one line that
registers it. Nothing else in the repository changes. `python examples/own_method/check.py` runs the
shared gradient harness (`tinypeft.harness`) on it: hand-written gradients = autograd's = finite
differences, the engine equal to the reference GPT, and the merge equal to the unmerged model.

Init: γ = 1, β = 0, so the wrapped model starts as the base model bit for bit (z · 1 + 0 = z exactly).
SSF's own code starts a small random distance from there; `init_ssf_weights=False` draws γ ~ N(1, 1)
and β ~ N(0, 1), far from the identity, which is what a gradient check wants.

Merge: (x W + b) ⊙ γ + β = x (W diag(γ)) + (b ⊙ γ + β), so W' = W diag(γ) (in the (in, out) layout:
scale W's columns) and b' = b ⊙ γ + β. The base model is then plain GPT-2 again, with no cost at
inference. Unmerge puts back the exact arrays the merge replaced (dividing by γ would be inexact, and
wrong where γ = 0).

PEFT has no SSF, so its files load in tinypeft only (peft_type "SSF").
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinypeft import GPT, ConfigError, GPTConfig
from tinypeft.config import linear_module_names
from tinypeft.methods.base import PEFT_PREFIX, Adapter, PeftConfig, match_modules, register
from tinypeft.methods.registry import Batch, ErrorCase, GoldenCase, MethodSpec, as_is, register_method
from tinypeft.ops import linear_backward, linear_forward
from tinypeft.sites import Sites

Array = Any
Params = Mapping[str, Array]


# ------------------------------------------------------------------ 1. the math: a forward/backward pair
def ssf_forward(x: Array, W: Array, b: Array, gamma: Array, beta: Array) -> tuple[Array, tuple]:
    """y = (x W + b) ⊙ γ + β.

    x (..., in), W (in, out), b, γ, β (out,) -> y (..., out). No in-place writes, so autograd can
    differentiate this very function. Cache: the linear layer's cache (x and W), γ, and z = x W + b,
    which dγ needs (recomputing z in the backward would cost a second matmul).
    """
    z, linear_cache = linear_forward(x, W, b)  # [..., in] @ [in, out] + [out] -> [..., out]
    y = z * gamma + beta  # [..., out] * [out] + [out] -> [..., out]
    return y, (linear_cache, gamma, z)


def ssf_backward(
    dy: Array,
    cache: tuple,
    need_dx: bool = True,
    need_dgamma: bool = True,
    need_dbeta: bool = True,
    need_dW: bool = False,
    need_db: bool = False,
) -> tuple[Array | None, Array | None, Array | None, Array | None, Array | None]:
    """(dx, dγ, dβ, dW, db), each None unless asked for; W and b are frozen by default.

    In the forward pass this was z = x W + b, y = z ⊙ γ + β. Each of the N rows used the same γ and β,
    so their gradients sum over the rows:

        dγ = Σ_n dy_n ⊙ z_n    (out,)          dβ = Σ_n dy_n    (out,)
        dz = dy ⊙ γ            (..., out)      then dx = dz Wᵀ, dW = xᵀ dz, db = Σ_n dz_n from the linear layer
    """
    linear_cache, gamma, z = cache
    n_out = z.shape[-1]
    dgamma = (dy * z).reshape(-1, n_out).sum(axis=0) if need_dgamma else None  # [N, out] -> [out]
    dbeta = dy.reshape(-1, n_out).sum(axis=0) if need_dbeta else None  # [N, out] -> [out]
    dx = dW = db = None
    if need_dx or need_dW or need_db:
        dz = dy * gamma  # [..., out] * [out]
        dx, dW, db = linear_backward(dz, linear_cache, need_dx, need_dW, need_db)  # dx: [..., in]
    return dx, dgamma, dbeta, dW, db


# ------------------------------------------------------------------ 2. the site: where the model calls it
@dataclass(frozen=True)
class SSFSite:
    """A linear site (tinypeft/sites.py, `LinearSite`) for every targeted module: module -> (γ name, β name).

    The model calls `forward` in place of the layer, and `backward` with the layer's output gradient;
    `owned` tells the engine which parameters this site computes gradients for, so it knows how far
    down the backward must go.
    """

    tensors: Mapping[str, tuple[str, str]]

    def forward(self, params: Params, module: str, x: Array) -> tuple[Array, tuple]:
        gamma, beta = self.tensors[module]
        W, b = params[module + ".weight"], params[module + ".bias"]
        y, cache = ssf_forward(x, W, b, params[gamma], params[beta])
        return y, (module, cache)

    def backward(
        self, dy: Array, cache: tuple, trainable: Collection[str], need_dx: bool = True
    ) -> tuple[Array | None, dict[str, Array]]:
        module, inner = cache
        gamma, beta = self.tensors[module]
        w, b = module + ".weight", module + ".bias"
        # a frozen tensor's gradient is never computed: ask only for the trainable ones
        need = (gamma in trainable, beta in trainable, w in trainable, b in trainable)
        dx, dgamma, dbeta, dW, db = ssf_backward(dy, inner, need_dx, *need)
        grads = {gamma: dgamma, beta: dbeta, w: dW, b: db}
        return dx, {name: g for name, g in grads.items() if g is not None}

    def owned(self, module: str) -> tuple[str, str, str, str]:
        """Its own γ and β, and the base weight and bias it stands in for."""
        gamma, beta = self.tensors[module]
        return gamma, beta, module + ".weight", module + ".bias"


# ------------------------------------------------------------------ 3. the config: what to build, as JSON
@register  # adapter_config.json with "peft_type": "SSF" now loads as an SSFConfig
@dataclass
class SSFConfig(PeftConfig):
    """SSF on `target_modules` (PEFT's matching rules: a list entry matches a module name or its ending
    after a ".", a string is a regex over the whole name). Default: every linear layer."""

    peft_type = "SSF"
    target_modules: list[str] | str = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])
    init_ssf_weights: bool = True

    def __post_init__(self) -> None:
        targets = self.target_modules
        if not isinstance(targets, (str, list)) or (isinstance(targets, list) and not targets):
            raise ConfigError(f"SSFConfig.target_modules must be a non-empty list of names or a regex; got {targets!r}")
        if not isinstance(self.init_ssf_weights, bool):
            raise ConfigError(f"SSFConfig.init_ssf_weights must be True or False; got {self.init_ssf_weights!r}")

    def targets(self, base: GPT) -> list[str]:
        """The targeted linear modules; an entry that matches none is a ConfigError listing what exists."""
        return match_modules(linear_module_names(base.config), self.target_modules)

    def validate(self, base: GPT) -> None:
        self.targets(base)

    def build(self, base: GPT, seed: int = 0) -> Adapter:
        rng = np.random.default_rng(seed)
        params, tensors = {}, {}
        for module in self.targets(base):
            n_out = base.params[module + ".weight"].shape[1]
            gamma, beta = f"{PEFT_PREFIX}{module}.ssf_scale", f"{PEFT_PREFIX}{module}.ssf_shift"
            if self.init_ssf_weights:
                gamma_value, beta_value = np.ones(n_out), np.zeros(n_out)
            else:
                gamma_value, beta_value = rng.normal(1.0, 1.0, n_out), rng.normal(0.0, 1.0, n_out)
            params[gamma] = base.xp.asarray(gamma_value.astype(base.config.dtype))
            params[beta] = base.xp.asarray(beta_value.astype(base.config.dtype))
            tensors[module] = (gamma, beta)
        return SSFAdapter(self, base, params, tensors)


# ------------------------------------------------------------------ 4. the adapter: tensors, sites, merge
class SSFAdapter(Adapter):
    """Tensors `base_model.model.<module>.ssf_scale` and `.ssf_shift`, both (out,), per targeted module."""

    def __init__(self, config: SSFConfig, base: GPT, params: dict[str, Array], tensors: dict[str, tuple[str, str]]):
        super().__init__(config, base, params)
        self.tensors = tensors  # module -> (γ name, β name)

    def sites(self, training: bool = False) -> Sites:
        site = SSFSite(self.tensors)
        return Sites(linear=dict.fromkeys(self.tensors, site))

    def merge(self, base_params: dict[str, Array]) -> None:
        """W <- W diag(γ) (scale W's output columns), b <- b ⊙ γ + β; new arrays, the base's are not written."""
        for module, (gamma, beta) in self.tensors.items():
            w, b = module + ".weight", module + ".bias"
            base_params[w] = base_params[w] * self.params[gamma][None, :]  # [in, out] * [1, out]
            base_params[b] = base_params[b] * self.params[gamma] + self.params[beta]  # [out]

    def unmerge(self, base_params: dict[str, Array], originals: Mapping[str, Array]) -> None:
        """Put back the arrays the merge replaced: exact."""
        for module in self.tensors:
            for key in (module + ".weight", module + ".bias"):
                if key in originals:
                    base_params[key] = originals[key]


# ------------------------------------------------------------------ 5. the spec, registered in one line
def example(cfg: GPTConfig) -> SSFConfig:
    """The config the shared gradient harness checks, on a small model of shape `cfg`: every tensor off its
    identity init (γ = 1, β = 0 would still be checked, but a method whose init zeroes a gradient would not)."""
    return SSFConfig(target_modules=["c_attn", "mlp.c_proj"], init_ssf_weights=False)


SMALL = {"vocab_size": 23, "n_positions": 12, "n_embd": 8, "n_layer": 2, "n_head": 2}  # GPTConfig(**SMALL)

# golden vectors for ports (VECTORS.md): exported by tinypeft.vectors.export_vectors once this file is imported
GOLDEN_CASES = (
    GoldenCase("ssf", "all", "SSF on every linear layer, padded batch", SMALL,
               lambda: SSFConfig(init_ssf_weights=False), Batch(3, 8, "mixed"), seed=40),
)  # fmt: skip


def error_cases() -> tuple[ErrorCase, ...]:
    """The misuses SSF refuses. Each is made (`config`) and wrapped around a small GPT, then `call`ed with it
    (`as_is`: making and wrapping the config is the misuse); it must raise the error, with every string in
    its one-line message."""
    return (
        ErrorCase(
            "SSF target_modules that match no linear layer",
            as_is,
            ConfigError,
            ("c_nope", "matches no module", "transformer.h.0.attn.c_attn"),
            config=lambda: SSFConfig(target_modules=["c_nope"]),
        ),
        ErrorCase(
            "SSF with an empty target_modules",
            as_is,
            ConfigError,
            ("SSFConfig.target_modules", "non-empty"),
            config=lambda: SSFConfig(target_modules=[]),
        ),
    )


SPEC = register_method(
    MethodSpec(
        name="ssf",
        help="SSF: a learned scale and shift of every linear layer's output",
        default_lr=1e-2,
        build=lambda args: SSFConfig(),
        example=example,
        golden_cases=GOLDEN_CASES,
        error_cases=error_cases,
        peft_files="PEFT has no SSF: its adapter loads in tinypeft only",
        inert_fields={"init_ssf_weights": "an init (identity or random): the vectors store the tensors"},
    )
)
