"""The model's shape: GPTConfig (transformers' GPT2Config names), its config.json translation, the
parameters it implies (names and shapes in GPT-2's state-dict order), GPT-2's initialisation, and
where each parameter and linear module sits in the forward (`Location`s, for the engine)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .backend import DTYPES
from .errors import CheckpointError, ConfigError
from .sites import Location

LINEAR_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LAYERNORMS = ("ln_1", "ln_2")


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT-2 model; field names are transformers' `GPT2Config` names.

    dtype is "float32" (training) or "float64" (gradient checks and reference numbers).
    n_inner is the MLP width, 4 * n_embd when None, as in GPT-2. bos_token_id and eos_token_id are
    the special tokens' ids, None where the vocabulary has none (the byte vocabulary). name_or_path
    is where the model was loaded from (transformers' name): not part of the shape, not compared.
    """

    vocab_size: int = 256
    n_positions: int = 256
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    dtype: str = "float32"
    layer_norm_epsilon: float = 1e-5
    n_inner: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name_or_path: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer; got {shown(value)}")
            object.__setattr__(self, name, int(value))  # a NumPy integer would not go into config.json
        n_inner = self.n_inner
        if n_inner is not None and (
            isinstance(n_inner, bool) or not isinstance(n_inner, (int, np.integer)) or n_inner <= 0
        ):
            raise ConfigError(f"GPTConfig.n_inner must be a positive integer or None; got {shown(n_inner)}")
        if n_inner is not None:
            object.__setattr__(self, "n_inner", int(n_inner))
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"GPTConfig: n_embd={shown(self.n_embd)} is not divisible by n_head={shown(self.n_head)}; "
                f"n_head must divide n_embd (for example n_head in {_divisors(self.n_embd)})"
            )
        if self.dtype not in DTYPES:
            half = self.dtype in ("float16", "bfloat16")
            hint = "; to store weights in half precision and compute in float32, see tinypeft.precision" if half else ""
            raise ConfigError(f"GPTConfig.dtype must be one of {DTYPES}; got {shown(self.dtype)}{hint}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < self.vocab_size
            ):
                raise ConfigError(
                    f"GPTConfig.{name} must be None or a token id in 0..{shown(self.vocab_size - 1)}; "
                    f"got {shown(value)}"
                )
            if value is not None:
                object.__setattr__(self, name, int(value))
        eps = self.layer_norm_epsilon
        if not positive_number(eps):
            raise ConfigError(f"GPTConfig.layer_norm_epsilon must be a positive number; got {shown(eps)}")

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
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
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
                **{k: _special_token(d.get(k), d["vocab_size"]) for k in ("bos_token_id", "eos_token_id")},
            )
        except ConfigError as e:
            raise CheckpointError(f"config.json describes an impossible model: {e}") from None


def positive_number(value: Any) -> bool:
    """Whether `value` is an int or float (not a bool) > 0 that a float holds: not nan or inf, and not an
    integer past float's range (10**400, which float() refuses with OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:
        return False


def shown(value: Any) -> str:
    """`value` as an error message shows it: its repr, but an integer of 30 digits or more by its sign and
    its number of digits (Python refuses to print one of over 4,300 digits, and no reader counts 400)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and abs(int(value)) >= 10**30:
        magnitude = abs(int(value))
        digits = len(str(magnitude)) if magnitude.bit_length() < 14_000 else f"about {int(math.log10(magnitude)) + 1}"
        return f"{'a negative' if value < 0 else 'an'} integer of {digits} digits"
    try:
        return repr(value)
    except ValueError:  # a container holding such an integer
        return f"a {type(value).__name__} holding an integer too long to print"


def _special_token(value: Any, vocab_size: Any) -> int | None:
    """A special token's id from config.json, None where it is absent or names no token of the
    vocabulary (tinypeft once wrote GPT2Config's default 50256 for its 256-byte vocabulary)."""
    in_vocabulary = isinstance(vocab_size, int) and isinstance(value, int) and not isinstance(value, bool)
    return value if in_vocabulary and 0 <= value < vocab_size else None


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


def module_locations(cfg: GPTConfig) -> dict[str, Location]:
    """Each linear module's place in the forward: `transformer.h.2.mlp.c_fc` -> Location(2, "mlp.c_fc")."""
    return {f"transformer.h.{i}.{m}": Location(i, m) for i in range(cfg.n_layer) for m in LINEAR_MODULES}


def parameter_locations(cfg: GPTConfig) -> dict[str, Location]:
    """Each base parameter's place in the forward, from the same table as `parameter_shapes`."""
    where = {"transformer.wte.weight": Location(-1, "embedding"), "transformer.wpe.weight": Location(-1, "embedding")}
    for i in range(cfg.n_layer):
        for stage in (*LAYERNORMS, *LINEAR_MODULES):
            for kind in ("weight", "bias"):
                where[f"transformer.h.{i}.{stage}.{kind}"] = Location(i, stage)
    where |= dict.fromkeys(("transformer.ln_f.weight", "transformer.ln_f.bias"), Location(cfg.n_layer))
    return where


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
