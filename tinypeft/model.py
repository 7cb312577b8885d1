"""A GPT-2 style transformer in NumPy with a hand-written backward pass.

Parameter names, shapes and layout are GPT-2's in transformers (`transformer.h.0.attn.c_attn.weight`
is (n_embd, 3*n_embd), y = x W + b), so a GPT-2 checkpoint loads with no transposes. The language-model
head is tied to the token embedding `transformer.wte.weight`.

The forward is a pure function of a flat parameter dict, `GPT.forward(params, ...)`, so the autograd
oracle can differentiate exactly this code, and a PEFT method can add its own parameters to the dict
and plug into a site (see `sites.py`) without this file knowing it exists.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import checks, parallel
from .backend import DTYPES, device_of, get_backend, to_numpy
from .errors import CheckpointError, ConfigError, InputError, TrainingError
from .ops import (
    attention_backward,
    attention_forward,
    attention_visibility,
    embedding_backward,
    embedding_forward,
    gelu_tanh_backward,
    gelu_tanh_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)
from .ops.cross_entropy import causal_lm_loss_backward, causal_lm_loss_forward
from .sites import NO_SITES, Sites

Array = Any
Params = dict[str, Array]

LINEAR_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LAYERNORMS = ("ln_1", "ln_2")
# a block's steps in the order its backward visits them
BLOCK_STAGES = ("mlp.c_proj", "mlp.c_fc", "ln_2", "attn.c_proj", "attn", "attn.c_attn", "ln_1")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT-2 model; field names are transformers' `GPT2Config` names.

    dtype is "float32" (training) or "float64" (gradient checks and reference numbers).
    n_inner is the MLP width, 4 * n_embd when None, as in GPT-2.
    """

    vocab_size: int = 256
    n_positions: int = 256
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    dtype: str = "float32"
    layer_norm_epsilon: float = 1e-5
    n_inner: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer; got {value!r}")
            object.__setattr__(self, name, int(value))  # a NumPy integer would not go into config.json
        n_inner = self.n_inner
        if n_inner is not None and (
            isinstance(n_inner, bool) or not isinstance(n_inner, (int, np.integer)) or n_inner <= 0
        ):
            raise ConfigError(f"GPTConfig.n_inner must be a positive integer or None; got {n_inner!r}")
        if n_inner is not None:
            object.__setattr__(self, "n_inner", int(n_inner))
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"n_head must divide n_embd (for example n_head in {_divisors(self.n_embd)})"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"GPTConfig.dtype must be one of {DTYPES}; got {self.dtype!r}")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
            raise ConfigError(f"GPTConfig.layer_norm_epsilon must be a positive number; got {eps!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def replace(self, **changes: Any) -> GPTConfig:
        return GPTConfig(**{**asdict(self), **changes})

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as transformers writes it for GPT-2 (dropout 0: tinypeft's model has none)."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
            "dtype": self.dtype,
        }

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], dtype: str | None = None) -> GPTConfig:
        """Read a transformers GPT-2 config.json, refusing the variants this model does not compute.

        Dropout rates are accepted and ignored: tinypeft's base model has no dropout, which matches
        a transformers model in eval mode.
        """
        if not isinstance(d, Mapping):
            raise CheckpointError(f"config.json must be a JSON object; got {type(d).__name__}")
        if d.get("model_type", "gpt2") != "gpt2":
            raise CheckpointError(f"config.json is for model_type {d.get('model_type')!r}; only 'gpt2' loads here")
        rules = {
            "activation_function": ("gelu_new", ("gelu_new", "gelu_pytorch_tanh")),
            "scale_attn_weights": (True, (True,)),
            "scale_attn_by_inverse_layer_idx": (False, (False,)),
            "reorder_and_upcast_attn": (False, (False,)),
            "tie_word_embeddings": (True, (True,)),
            "add_cross_attention": (False, (False,)),
        }
        for key, (default, allowed) in rules.items():
            if d.get(key, default) not in allowed:
                raise CheckpointError(f"config.json has {key}={d[key]!r}; tinypeft computes only {allowed}")
        required = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        missing = [k for k in required if k not in d]
        if missing:
            raise CheckpointError(f"config.json lacks {missing}; a GPT-2 config needs {list(required)}")
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"dtype must be None (use the saved one) or one of {DTYPES}; got {dtype!r}")
        saved_dtype = d.get("dtype", d.get("torch_dtype", "float32"))
        if dtype is None:
            dtype = saved_dtype if saved_dtype in DTYPES else "float32"
        try:
            return cls(
                **{k: d[k] for k in required},
                dtype=dtype,
                layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
                n_inner=d.get("n_inner"),
            )
        except ConfigError as e:
            raise CheckpointError(f"config.json describes an impossible model: {e}") from None


def _divisors(n: int, up_to: int = 1024) -> list[int]:
    """The divisors of n up to `up_to`: examples for an error message, bounded so that a huge n
    (from a corrupt config.json) cannot stall the error it is reported in."""
    return [k for k in range(1, min(n, up_to) + 1) if n % k == 0]


def parameter_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in GPT-2's state-dict order (the tied lm_head not repeated)."""
    C, F = cfg.n_embd, cfg.inner_dim
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (cfg.vocab_size, C),
        "transformer.wpe.weight": (cfg.n_positions, C),
    }
    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}"
        shapes |= {
            f"{h}.ln_1.weight": (C,),
            f"{h}.ln_1.bias": (C,),
            f"{h}.attn.c_attn.weight": (C, 3 * C),
            f"{h}.attn.c_attn.bias": (3 * C,),
            f"{h}.attn.c_proj.weight": (C, C),
            f"{h}.attn.c_proj.bias": (C,),
            f"{h}.ln_2.weight": (C,),
            f"{h}.ln_2.bias": (C,),
            f"{h}.mlp.c_fc.weight": (C, F),
            f"{h}.mlp.c_fc.bias": (F,),
            f"{h}.mlp.c_proj.weight": (F, C),
            f"{h}.mlp.c_proj.bias": (C,),
        }
    shapes |= {"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    return shapes


def linear_module_names(cfg: GPTConfig) -> list[str]:
    """The linear layers (GPT-2 Conv1D modules) by full module name: where LoRA, IA3 and adapters attach."""
    return [f"transformer.h.{i}.{m}" for i in range(cfg.n_layer) for m in LINEAR_MODULES]


def layer_of(name: str) -> int | None:
    """The block index a parameter lives in (`...transformer.h.3.attn...` -> 3), None outside the blocks."""
    marker = "transformer.h."
    at = name.find(marker)
    if at < 0:
        return None
    rest = name[at + len(marker) :]
    digits = rest.split(".", 1)[0]
    # ASCII digits only (str.isdigit accepts "²", which int() refuses), and a bounded count, since a
    # name may come from a corrupt file
    return int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 9 else None


def init_params(cfg: GPTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2's initialisation: weights and embeddings N(0, 0.02), the two residual output projections
    (attn.c_proj, mlp.c_proj) N(0, 0.02 / sqrt(2 n_layer)), biases 0, LayerNorm weights 1.

    Drawn in float64 from one seeded generator in state-dict order, then cast, so a float32 and a
    float64 model with the same seed hold the same numbers up to rounding.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in parameter_shapes(cfg).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            value = np.ones(shape)
        elif name.endswith(".bias"):
            value = np.zeros(shape)
        else:
            std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
            value = rng.normal(0.0, std, size=shape)
        params[name] = value.astype(cfg.dtype)
    return params


@dataclass(frozen=True)
class ComputeView:
    """What a model computes with: the flat parameter dict, the sites, the trainable names (in the
    dict's naming), and `public_names`, the name loss_and_grad reports for a trainable entry when it
    differs (a PEFT model's stand-in for a base parameter). Gradient checks differentiate this."""

    model: GPT
    params: Mapping[str, Array]
    sites: Sites
    trainable: frozenset[str]
    public_names: Mapping[str, str] = field(default_factory=dict)

    def public(self, grads: Mapping[str, Array]) -> dict[str, Array]:
        return {self.public_names.get(k, k): g for k, g in grads.items()}


class GPT:
    """A GPT-2 language model: `logits = model(input_ids)`, `loss, grads = model.loss_and_grad(ids, labels)`.

    `params` maps GPT-2 names to arrays; `trainable` is the set of names that get gradients
    (everything, until a selective method or a PEFT wrapper freezes some).
    """

    def __init__(self, config: GPTConfig, seed: int = 0, device: str | None = None) -> None:
        if not isinstance(config, GPTConfig):
            raise ConfigError(f"GPT needs a GPTConfig; got {type(config).__name__}")
        checks.check_seed(seed, error=ConfigError)
        self.config = config
        self.xp = get_backend(device)
        self.params: Params = {k: self.xp.asarray(v) for k, v in init_params(config, seed).items()}
        self.trainable: set[str] = set(self.params)

    @property
    def device(self) -> str:
        return device_of(self.xp)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        params: Mapping[str, Array],
        input_ids: Array,
        attention_mask: Array | None = None,
        sites: Sites = NO_SITES,
        past_key_values: list[tuple[Array, Array]] | None = None,
    ) -> tuple[Array, dict]:
        """logits (B, T', V) and the cache for `backward`, as a pure function of `params`.

        input_ids (B, T) must already be valid (see `checks`); T' = T plus any virtual tokens an
        embedding site adds. attention_mask is (B, T) over the real tokens, or, with an explicit
        `past_key_values` (a KV cache), (B, P + T) over past and current tokens as in transformers.
        Prefix keys/values from a prefix site are visible to every token.
        """
        cfg, xp = self.config, self.xp
        wte, wpe = params["transformer.wte.weight"], params["transformer.wpe.weight"]
        B = input_ids.shape[0]
        x, tok_cache = embedding_forward(wte, input_ids)  # [B, T] -> [B, T, C]
        embedding_cache = None
        if sites.embedding is not None:
            x, attention_mask, embedding_cache = sites.embedding.forward(params, x, attention_mask)
        T = x.shape[1]

        prefix_cache = None
        if past_key_values is None and sites.prefix is not None:
            past_key_values, prefix_cache = sites.prefix.forward(params, B)
            if attention_mask is not None:  # prefix entries are always visible
                P = past_key_values[0][0].shape[2]
                attention_mask = xp.concatenate([xp.ones((B, P), dtype=bool), xp.asarray(attention_mask)], 1)
        P = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if P + T > cfg.n_positions:
            extra = P + T - input_ids.shape[1]  # positions taken by the past, prefixes or virtual tokens
            raise InputError(
                f"sequence of {P + T} positions ({extra} past/prefix/virtual + {input_ids.shape[1]} tokens) exceeds "
                f"n_positions={cfg.n_positions}; give at most {cfg.n_positions - extra} tokens"
            )
        positions = xp.arange(P, P + T)
        pos_emb, pos_cache = embedding_forward(wpe, positions)  # [T, C]
        x = x + pos_emb  # [B, T, C] + [T, C]
        visible = attention_visibility(xp, T, P, attention_mask)

        layers = []
        presents = []
        for i in range(cfg.n_layer):
            past = None if past_key_values is None else past_key_values[i]
            x, layer_cache = self._block_forward(params, i, x, visible, past, sites)
            layers.append(layer_cache)
            presents.append(layer_cache["attn"][1][1:3])  # keys and values incl. the past: the KV cache
        x, lnf_cache = layernorm_forward(
            x, params["transformer.ln_f.weight"], params["transformer.ln_f.bias"], cfg.layer_norm_epsilon
        )
        logits = (x.reshape(-1, cfg.n_embd) @ wte.T).reshape(B, T, cfg.vocab_size)  # tied head: [B*T, C] @ [C, V]
        cache = {
            "tok": tok_cache,
            "pos": pos_cache,
            "embedding_site": embedding_cache,
            "prefix_site": prefix_cache,
            "layers": layers,
            "ln_f": lnf_cache,
            "x_final": x,
            "wte": wte,
            "sites": sites,
            "presents": presents,
        }
        return logits, cache

    def _block_forward(
        self, params: Mapping[str, Array], i: int, x: Array, visible: Array, past: tuple | None, sites: Sites
    ) -> tuple[Array, dict]:
        """x + attn(ln_1(x)), then + mlp(ln_2(.)): GPT-2's pre-LayerNorm residual block."""
        h, eps = f"transformer.h.{i}", self.config.layer_norm_epsilon
        a, ln1 = layernorm_forward(x, params[f"{h}.ln_1.weight"], params[f"{h}.ln_1.bias"], eps)
        qkv, c_attn = self._linear_forward(params, f"{h}.attn.c_attn", a, sites)  # [B, T, C] -> [B, T, 3C]
        past_k, past_v = (None, None) if past is None else past
        a, attn = attention_forward(qkv, self.config.n_head, visible, past_k, past_v)  # -> [B, T, C]
        a, attn_proj = self._linear_forward(params, f"{h}.attn.c_proj", a, sites)
        x = x + a
        m, ln2 = layernorm_forward(x, params[f"{h}.ln_2.weight"], params[f"{h}.ln_2.bias"], eps)
        m, fc = self._linear_forward(params, f"{h}.mlp.c_fc", m, sites)  # [B, T, C] -> [B, T, 4C]
        m, gelu = gelu_tanh_forward(m)
        m, mlp_proj = self._linear_forward(params, f"{h}.mlp.c_proj", m, sites)  # [B, T, 4C] -> [B, T, C]
        x = x + m
        cache = {
            "ln_1": ln1,
            "attn.c_attn": c_attn,
            "attn": (past is not None, attn),
            "attn.c_proj": attn_proj,
            "ln_2": ln2,
            "mlp.c_fc": fc,
            "gelu": gelu,
            "mlp.c_proj": mlp_proj,
        }
        return x, cache

    @staticmethod
    def _linear_forward(params: Mapping[str, Array], module: str, x: Array, sites: Sites) -> tuple[Array, tuple]:
        site = sites.linear.get(module)
        if site is not None:
            y, cache = site.forward(params, module, x)
            return y, (site, cache)
        y, cache = linear_forward(x, params[module + ".weight"], params[module + ".bias"])
        return y, (None, cache)

    # ----------------------------------------------------------------- backward
    def backward(self, dlogits: Array, cache: dict, trainable: Collection[str]) -> dict[str, Array]:
        """Gradients of the parameters in `trainable` given dlogits (B, T', V), the output gradient.

        Gradients are fresh arrays; where a parameter is used twice (the tied wte, in the embedding
        and the head) the two contributions are summed here, explicitly. A frozen weight's
        gradient matmul is never computed, and the backward stops at the lowest block below which
        nothing is trainable.
        """
        cfg = self.config
        trainable = frozenset(trainable)
        sites: Sites = cache["sites"]
        need_embedding_grad, lowest_layer = _backward_extent(cfg.n_layer, trainable, sites)
        prefix_trainable = sites.prefix is not None and not trainable.isdisjoint(sites.prefix.param_names)
        grads: dict[str, Array] = {}
        if not trainable:
            return grads

        B, T, V = dlogits.shape
        x_final = cache["x_final"]
        dlogits2 = dlogits.reshape(-1, V)
        # in the forward pass this was: logits = x_final @ wte^T, so:
        dx = (dlogits2 @ cache["wte"]).reshape(B, T, cfg.n_embd)  # [B*T, V] @ [V, C]
        dwte_head = None
        if "transformer.wte.weight" in trainable:
            dwte_head = dlogits2.T @ x_final.reshape(-1, cfg.n_embd)  # [V, B*T] @ [B*T, C]
        need_lnf = "transformer.ln_f.weight" in trainable or "transformer.ln_f.bias" in trainable
        need_dx_below_head = lowest_layer is not None or need_embedding_grad
        dx, dw, db = layernorm_backward(dx, cache["ln_f"], need_dx=need_dx_below_head, need_dparams=need_lnf)
        _put(grads, trainable, "transformer.ln_f.weight", dw)
        _put(grads, trainable, "transformer.ln_f.bias", db)

        dprefix: list[tuple[Array, Array]] = []
        if lowest_layer is not None:
            for i in reversed(range(lowest_layer, cfg.n_layer)):
                need_dx = need_embedding_grad or i > lowest_layer
                dx, dpast = self._block_backward(i, dx, cache["layers"][i], trainable, need_dx, prefix_trainable, grads)
                dprefix.append(dpast)
            dprefix.reverse()

        if sites.prefix is not None and cache["prefix_site"] is not None:
            grads |= sites.prefix.backward(dprefix, cache["prefix_site"], trainable)

        if need_embedding_grad:
            # in the forward pass this was: x = tok_emb + wpe[positions]; both get the full dx
            if "transformer.wpe.weight" in trainable:
                grads["transformer.wpe.weight"] = embedding_backward(dx.sum(axis=0), cache["pos"])
            if sites.embedding is not None:
                dx, site_grads = sites.embedding.backward(dx, cache["embedding_site"], trainable)
                grads |= site_grads
            if "transformer.wte.weight" in trainable:
                grads["transformer.wte.weight"] = embedding_backward(dx, cache["tok"]) + dwte_head
        return grads

    def _block_backward(
        self,
        i: int,
        dx: Array,
        cache: dict,
        trainable: frozenset[str],
        need_dx: bool,
        prefix_trainable: bool,
        grads: dict[str, Array],
    ) -> tuple[Array | None, tuple[Array, Array] | None]:
        """Back through block i: returns (dx into the block or None, (dkeys, dvalues) of its past or None).

        The backward visits the block's stages in BLOCK_STAGES order; the gradient flows into a stage
        only if that stage or one visited after it owns something trainable, or dx is needed below
        the block. Past the last stage reached, nothing is computed.
        """
        h = f"transformer.h.{i}"
        owns = [s != "attn" and any(f"{h}.{s}." in name for name in trainable) for s in BLOCK_STAGES]
        owns[BLOCK_STAGES.index("attn")] = prefix_trainable  # attention owns the layer's prefix keys/values
        reach = [need_dx or any(owns[k:]) for k in range(len(BLOCK_STAGES))]
        mlp_fc, ln_2, attn_proj, attn, attn_qkv, ln_1 = reach[1:]

        # in the forward pass this was: x_out = x_mid + mlp_proj(gelu(mlp_fc(ln_2(x_mid)))), so the
        # residual passes dx straight through to x_mid and the branch adds its share
        dm = self._linear_backward(f"{h}.mlp.c_proj", dx, cache["mlp.c_proj"], trainable, mlp_fc, grads)
        if mlp_fc:
            dm = gelu_tanh_backward(dm, cache["gelu"])
            dm = self._linear_backward(f"{h}.mlp.c_fc", dm, cache["mlp.c_fc"], trainable, ln_2, grads)
        if ln_2:
            dm, dw, db = layernorm_backward(dm, cache["ln_2"], need_dx=attn_proj, need_dparams=owns[2])
            _put(grads, trainable, f"{h}.ln_2.weight", dw)
            _put(grads, trainable, f"{h}.ln_2.bias", db)
        if not attn_proj:
            return None, None
        dx = dx + dm
        # x_mid = x_in + attn_proj(attention(attn_qkv(ln_1(x_in))))
        da = self._linear_backward(f"{h}.attn.c_proj", dx, cache["attn.c_proj"], trainable, attn, grads)
        has_past, attn_cache = cache["attn"]
        dpast = None
        if attn:
            dqkv, dpast_k, dpast_v = attention_backward(da, attn_cache)
            dpast = (dpast_k, dpast_v) if has_past else None
        if attn_qkv:
            da = self._linear_backward(f"{h}.attn.c_attn", dqkv, cache["attn.c_attn"], trainable, ln_1, grads)
        if ln_1:
            da, dw, db = layernorm_backward(da, cache["ln_1"], need_dx=need_dx, need_dparams=owns[6])
            _put(grads, trainable, f"{h}.ln_1.weight", dw)
            _put(grads, trainable, f"{h}.ln_1.bias", db)
        return (dx + da if need_dx else None), dpast

    @staticmethod
    def _linear_backward(
        module: str,
        dy: Array,
        cache: tuple,
        trainable: frozenset[str],
        need_dx: bool,
        grads: dict[str, Array],
    ) -> Array | None:
        site, inner = cache
        if site is not None:
            dx, site_grads = site.backward(dy, inner, trainable, need_dx)
            grads |= site_grads
            return dx
        w, b = module + ".weight", module + ".bias"
        dx, dw, db = linear_backward(dy, inner, need_dx, w in trainable, b in trainable)
        _put(grads, trainable, w, dw)
        _put(grads, trainable, b, db)
        return dx

    # --------------------------------------------------------------- public API
    def __call__(self, input_ids: Any, attention_mask: Any = None) -> Array:
        """logits (B, T, V) for token ids (B, T) and an optional 0/1 padding mask (B, T)."""
        return self.run_forward(self.params, NO_SITES, input_ids, attention_mask)

    def loss(self, input_ids: Any, labels: Any, attention_mask: Any = None) -> float:
        """The shifted, -100-ignoring mean cross-entropy, without gradients."""
        return self.run_loss_and_grad(self.params, NO_SITES, frozenset(), input_ids, labels, attention_mask)[0]

    def loss_and_grad(self, input_ids: Any, labels: Any, attention_mask: Any = None) -> tuple[float, dict[str, Array]]:
        """(loss, grads): grads maps each trainable parameter's name to its gradient; frozen ones are absent.

        The tied embedding's gradient, under "transformer.wte.weight", includes the head's share.
        """
        return self.run_loss_and_grad(self.params, NO_SITES, self.trainable, input_ids, labels, attention_mask)

    def run_forward(self, params: Mapping[str, Array], sites: Sites, input_ids: Any, attention_mask: Any) -> Array:
        ids, mask = self.check_inputs(input_ids, attention_mask)
        return self.forward(params, ids, mask, sites)[0]

    def run_loss_and_grad(
        self,
        params: Mapping[str, Array],
        sites: Sites,
        trainable: Collection[str],
        input_ids: Any,
        labels: Any,
        attention_mask: Any = None,
    ) -> tuple[float, dict[str, Array]]:
        """Validated loss and gradients for any parameter dict and sites (what a PEFT model calls).

        Positions that an embedding site puts in front of the tokens (virtual tokens) get label -100,
        as PEFT does for prompt tuning.

        On the CPU a large batch is computed as row blocks on parallel threads (`parallel.py`): block i
        with n_i targets contributes its mean loss with weight n_i / n, and its gradient is taken of that
        weighted loss, so the sums are the mean over all n targets and its gradient, up to rounding.
        Sites that draw random masks per forward (dropout) keep the batch whole: their masks are drawn
        for the shape they see.
        """
        ids, mask = self.check_inputs(input_ids, attention_mask)
        # an embedding site may put positions in front of the tokens, and then label 0 is a target too:
        # whether anything is predicted is known once the forward says how many positions it added
        leading = 0 if sites.embedding is None else None
        host_labels = checks.check_labels(labels, ids.shape, self.config.vocab_size, leading)
        B, T = ids.shape
        whole = self.xp is not np or sites.stochastic
        blocks = [slice(0, B)] if whole else parallel.row_blocks(B, T * self.config.n_embd)

        def forward_block(rows: slice) -> tuple:
            block_mask = None if mask is None else mask[rows]
            logits, cache = self.forward(params, ids[rows], block_mask, sites)
            added = logits.shape[1] - T
            block_labels = self.xp.asarray(host_labels[rows])
            if added:
                pad = self.xp.full((block_labels.shape[0], added), checks.IGNORE_INDEX, dtype=block_labels.dtype)
                block_labels = self.xp.concatenate([pad, block_labels], axis=1)
            n_targets = int((block_labels[:, 1:] != checks.IGNORE_INDEX).sum())
            if n_targets == 0:  # a block of padding: it adds nothing to the loss or the gradient
                return 0.0, 0, None, None, added
            loss, loss_cache = causal_lm_loss_forward(logits, block_labels)
            return float(loss), n_targets, loss_cache, cache, added

        parts = parallel.map_blocks(forward_block, blocks)
        if leading is None:
            checks.check_has_target(host_labels, parts[0][4])
        n_total = sum(part[1] for part in parts)
        loss = sum(part[0] * part[1] for part in parts) / n_total
        if not trainable:
            return loss, {}

        def backward_block(index: int) -> dict[str, Array]:
            _, n_targets, loss_cache, cache, _ = parts[index]
            dlogits = causal_lm_loss_backward(n_targets / n_total, loss_cache)
            return self.backward(dlogits, cache, trainable)

        used = [i for i, part in enumerate(parts) if part[1]]
        block_grads = parallel.map_blocks(backward_block, used)
        grads = block_grads[0]
        for more in block_grads[1:]:  # in block order: the sum does not depend on thread timing
            grads = {k: g + more[k] for k, g in grads.items()}
        return loss, grads

    def check_inputs(self, input_ids: Any, attention_mask: Any = None) -> tuple[Array, Array | None]:
        """Validated (ids, mask) on this model's device, or an InputError/InputTypeError saying what is wrong."""
        ids = checks.check_token_ids(input_ids, self.config.vocab_size)
        if ids.shape[1] > self.config.n_positions:
            raise InputError(
                f"input_ids has {ids.shape[1]} tokens; this model takes at most n_positions={self.config.n_positions}"
            )
        mask = checks.check_attention_mask(attention_mask, ids.shape)
        return self.xp.asarray(ids), None if mask is None else self.xp.asarray(mask)

    def view(self) -> ComputeView:
        return ComputeView(self, self.params, NO_SITES, frozenset(self.trainable))

    def train(self, mode: bool = True) -> GPT:
        """Nothing to switch: the base model has no dropout (it computes what transformers does in
        eval mode). Here so a GPT and a PeftModel train through the same loop."""
        return self

    def eval(self) -> GPT:
        return self

    def trainable_parameters(self) -> dict[str, Array]:
        """The trainable tensors by name (the model's own arrays: an optimizer updates them in place)."""
        return {k: v for k, v in self.params.items() if k in self.trainable}

    def num_parameters(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.params.values())

    def print_trainable_parameters(self) -> None:
        print(self.trainable_parameters_line())

    def trainable_parameters_line(self) -> str:
        return trainable_parameters_line(self.params, self.trainable)

    # --------------------------------------------------------------- generation
    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        """Continue each row of input_ids (B, T) by max_new_tokens tokens; returns (B, T + new) on the host.

        temperature 0 is greedy (argmax); above 0, sample from softmax(logits / temperature),
        restricted to the top_k most likely tokens if top_k is given, from a generator seeded by seed.
        Keys and values are cached, so each new token costs one position's forward.
        """
        return self.run_generate(self.params, NO_SITES, input_ids, max_new_tokens, temperature, top_k, seed)

    def run_generate(
        self,
        params: Mapping[str, Array],
        sites: Sites,
        input_ids: Any,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        seed: int,
    ) -> np.ndarray:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be an integer >= 0; got {max_new_tokens!r}")
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float, np.integer, np.floating))
            or not (temperature >= 0 and math.isfinite(temperature))
        ):
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy); got {temperature!r}")
        V = self.config.vocab_size
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= V
        ):
            raise InputError(f"top_k must be None or an integer in 1..{V}; got {top_k!r}")
        checks.check_seed(seed)
        ids, _ = self.check_inputs(input_ids)
        out = [to_numpy(ids)]
        if max_new_tokens == 0:
            return out[0]
        rng = np.random.default_rng(seed)
        logits, cache = self.forward(params, ids, None, sites)
        used = cache["presents"][0][0].shape[2]  # positions in the cache: virtual + prefix + tokens
        if used + max_new_tokens - 1 > self.config.n_positions:
            raise InputError(
                f"generating {max_new_tokens} tokens after {used} positions needs {used + max_new_tokens - 1} "
                f"positions; this model has n_positions={self.config.n_positions}"
            )
        for step in range(max_new_tokens):
            next_ids = _pick_next(to_numpy(logits[:, -1]), temperature, top_k, rng)  # [B]
            out.append(next_ids[:, None])
            if step + 1 == max_new_tokens:
                break
            logits, cache = self.forward(
                params, self.xp.asarray(next_ids[:, None]), None, sites.continuation(), cache["presents"]
            )
        return np.concatenate(out, axis=1)

    # ------------------------------------------------------------ state and files
    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of every parameter under its GPT-2 name (the tied lm_head is not repeated)."""
        return {k: to_numpy(v).copy() for k, v in self.params.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load GPT-2 weights by name. Names may lack the "transformer." prefix (GPT2Model checkpoints);
        "lm_head.weight" is accepted when it equals wte (tied); attention-mask buffers are skipped.
        Every parameter must be present with its exact shape; nothing is loaded if anything is wrong."""
        if not isinstance(state, Mapping):
            raise CheckpointError(f"a state dict must map tensor names to arrays; got {type(state).__name__}")
        bad_keys = [k for k in state if not isinstance(k, str)]
        if bad_keys:
            raise CheckpointError(f"tensor names must be strings; got {bad_keys[0]!r}")
        # compare the block count first: it is cheap, says what is wrong in one line, and keeps a
        # corrupt config's huge n_layer from costing a huge table of expected names
        full_names = {k: k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k for k in state}
        blocks = {layer_of(name) for name in full_names.values()} - {None}
        n_blocks = max(blocks) + 1 if blocks else 0
        if n_blocks != self.config.n_layer:
            held = f"{n_blocks} transformer block(s), transformer.h.0 to h.{n_blocks - 1}" if n_blocks else "no blocks"
            raise CheckpointError(f"the checkpoint holds {held}; this GPTConfig has n_layer={self.config.n_layer}")
        expected = parameter_shapes(self.config)
        loaded: dict[str, np.ndarray] = {}
        lm_head = None
        for key, value in state.items():
            name = full_names[key]
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # causal-mask buffers old transformers versions saved; not parameters
            if name == "lm_head.weight":
                lm_head = _as_host_array(key, value)
                continue
            if name not in expected:
                raise CheckpointError(
                    f"unexpected tensor {key!r} for this GPTConfig; expected names like {next(iter(expected))!r} "
                    f"(n_layer={self.config.n_layer})"
                )
            if name in loaded:
                raise CheckpointError(f"tensor {name!r} appears twice (with and without the 'transformer.' prefix)")
            arr = _as_host_array(key, value)
            if not (np.issubdtype(arr.dtype, np.floating)):
                raise CheckpointError(f"tensor {key!r} has dtype {arr.dtype}; weights must be floating point")
            if tuple(arr.shape) != expected[name]:
                raise CheckpointError(
                    f"tensor {key!r} has shape {tuple(arr.shape)}; this GPTConfig needs {expected[name]}"
                )
            loaded[name] = arr.astype(self.config.dtype)
            if name == "transformer.wte.weight":
                saved_wte = arr  # as saved, before the cast, to compare with a saved lm_head
        missing = [k for k in expected if k not in loaded]
        if missing:
            raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s), first {missing[:3]}")
        if lm_head is not None and not np.array_equal(lm_head, saved_wte):
            raise CheckpointError("lm_head.weight differs from wte.weight; tinypeft's GPT ties them (GPT-2 does)")
        self.params = {k: self.xp.asarray(loaded[k]) for k in expected}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """config.json and model.safetensors, the files transformers writes for a GPT2LMHeadModel."""
        from .io import save_json, save_safetensors

        os.makedirs(folder, exist_ok=True)
        save_safetensors(os.path.join(folder, WEIGHTS_NAME), self.params)
        save_json(os.path.join(folder, CONFIG_NAME), self.config.to_hf_dict())

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | None = None, dtype: str | None = None) -> GPT:
        """Load a folder written by `save_pretrained` here or by transformers' GPT2LMHeadModel."""
        from .io import load_json, load_safetensors

        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder} is not a folder; expected one holding {CONFIG_NAME} and {WEIGHTS_NAME}")
        config = GPTConfig.from_hf_dict(load_json(os.path.join(folder, CONFIG_NAME)), dtype=dtype)
        weights_path = os.path.join(folder, WEIGHTS_NAME)
        if not os.path.exists(weights_path):
            others = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
            hint = f"; found {others}, which are pickles and are never loaded" if others else ""
            raise CheckpointError(f"{weights_path} does not exist{hint}")
        model = cls.__new__(cls)
        model.config = config
        model.xp = get_backend(device)
        model.params = {}
        model.load_state_dict(load_safetensors(weights_path))
        model.trainable = set(model.params)
        return model


def _as_host_array(name: str, value: Any) -> np.ndarray:
    """A host array from a state-dict value, or a CheckpointError naming the tensor."""
    try:
        return to_numpy(value)
    except Exception as e:  # ragged lists and objects NumPy cannot turn into an array
        raise CheckpointError(f"tensor {name!r} is not an array ({type(value).__name__}: {e})") from None


def _pick_next(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> np.ndarray:
    """Next token per row from last-position logits (B, V): argmax, or a sample at the given temperature."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64)
    if not np.isfinite(z).all():
        raise TrainingError(
            "the model's logits are not finite (NaN or inf), so there is no distribution to sample from; "
            "its weights probably hold non-finite values"
        )
    # shift before dividing: z - max <= 0, so a tiny temperature gives -inf (probability 0), never inf - inf
    with np.errstate(over="ignore"):  # overflowing to -inf is the intended result
        z = (z - z.max(axis=-1, keepdims=True)) / temperature
    if top_k is not None:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in p])


def _backward_extent(n_layer: int, trainable: frozenset[str], sites: Sites) -> tuple[bool, int | None]:
    """(whether the gradient must reach the embeddings, the lowest block that must be back-propagated).

    A block is visited if it, or anything feeding it from below, owns a trainable parameter: its
    own parameters and a linear site's (named under their module, so `layer_of` finds the block),
    every block for a trainable prefix site, and all of them for a trainable input embedding.
    Below the lowest such block no dx is computed.
    """
    need_embedding = (
        "transformer.wte.weight" in trainable
        or "transformer.wpe.weight" in trainable
        or (sites.embedding is not None and not trainable.isdisjoint(sites.embedding.param_names))
    )
    if need_embedding:
        return True, 0
    layers = {layer_of(n) for n in trainable} - {None}
    if sites.prefix is not None and not trainable.isdisjoint(sites.prefix.param_names):
        layers.add(0)
    return False, (min(layers) if layers else None)


def _put(grads: dict[str, Array], trainable: frozenset[str], name: str, value: Array | None) -> None:
    if value is not None and name in trainable:
        grads[name] = value


def trainable_parameters_line(params: Mapping[str, Array], trainable: Iterable[str]) -> str:
    """PEFT's format: `trainable params: 1,024 || all params: 30,144 || trainable%: 3.3970`."""
    trainable = set(trainable)
    total = sum(int(np.prod(p.shape)) for p in params.values())
    n = sum(int(np.prod(p.shape)) for k, p in params.items() if k in trainable)
    return f"trainable params: {n:,d} || all params: {total:,d} || trainable%: {100 * n / total:.4f}"
