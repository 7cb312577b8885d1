"""Golden vectors: small cases of every method, with tinypeft's logits, loss and gradients, for ports.

`export_vectors(folder)` (the command `tinypeft export-vectors DIR`) writes, for the base model and
every method, a few small cases (an odd-sized config, rank 1, a padded batch, virtual tokens that fill
the position table), each in float64 and in float32: the configs, the weights, the inputs, and the
expected logits, loss and gradient of every trainable tensor, with the tolerance a correct port must
meet. `check_vectors(folder, run_case)` (the command `tinypeft check-vectors DIR --impl MODULE`) runs an
implementation on every case and reports each tensor's error against its tolerance. VECTORS.md at the
repository root describes the files precisely enough to write a checker in any language.

The expected values are always computed in float64. A float32 case holds float32 weights, and its
expected values are the float64 computation from exactly those weights: the error a port makes is then
its own float32 rounding, which the per-tensor tolerances bound.

The files are deterministic: the same command writes the same bytes (JSON with sorted keys and Python's
shortest round-trip floats; safetensors with one metadata key, since the library writes a map of
several in an order that changes from run to run).
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import __version__, checks, engine
from .errors import CheckpointError, ConfigError, TinyPeftError
from .io import load_json, load_safetensors, save_json, save_safetensors
from .methods import (
    AdapterConfig,
    BitFitConfig,
    IA3Config,
    LNTuningConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from .methods.lora import LoraAdapter
from .methods.prompt import PROMPT_EMBEDDINGS
from .model import GPT, GPTConfig, layer_of, parameter_shapes
from .peft_model import get_peft_model

FORMAT = "tinypeft-golden-vectors"
VERSION = 1
INDEX_NAME = "index.json"
CASE_NAME = "case.json"
WEIGHTS_NAME = "weights.safetensors"
EXPECTED_NAME = "expected.safetensors"
DTYPES = ("float64", "float32")
GRAD_PREFIX = "grad/"  # expected.safetensors: "logits", "grad/<name>", "derived/<name>"
DERIVED_PREFIX = "derived/"
MODEL_CONFIG_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "layer_norm_epsilon")

# How far from its init every tensor is moved before the expected values are computed: GPT-2's init is
# symmetric (LayerNorm weights 1, biases 0) and LoRA's B = 0 makes dA vanish, so a gradient computed
# there checks little. 0.3 gives O(1) pre-activations and attention far from uniform in these widths.
PERTURBATION = 0.3

Array = np.ndarray
RunCase = Callable[[dict[str, Any]], Mapping[str, Any]]


# ===================================================================== tolerances
FLOAT64_TOLERANCE = 1e-10
# float32, per kind of tensor: the unit roundoff is 6e-8, and what a correct float32 implementation loses
# grows with the depth of the computation and with sums of many terms that cancel. Measured on these cases
# (tinypeft in float32 and the torch port, VECTORS.md): loss and logits <= 4e-7, gradients <= 2.1e-6, LayerNorm
# weight gradients <= 1.9e-6 (few rows here: their error grows with B*T). The tolerances are 25 to 150 times
# that. Telling a wrong formula from rounding is the float64 cases' job (1e-10).
FLOAT32_TOLERANCES = {
    "loss": 1e-5,  # a mean of log-softmax terms: rounding of the logits, barely amplified
    "logits": 1e-5,  # two blocks of matmuls, LayerNorms and softmaxes
    "gradient": 1e-4,  # the backward is twice as deep as the forward, and differences of softmax terms
    "layernorm_weight": 3e-4,  # sum over B*T rows of dy * xhat, whose terms cancel (llm.c #228)
    "derived": 1e-4,  # PiSSA's residual: 3e-8 with the SVD in float64, 1.5e-6 with it in float32 (as PEFT)
}
TOLERANCE_NOTES = {
    "metric": "error = ||got - want||_2 / ||want||_2 over all elements (|got - want| / |want| for the loss); "
    "a tensor passes when error <= its tolerance",
    "float64": "1e-10 for everything: tinypeft, autograd and PEFT agree to ~1e-14 on these computations, so a "
    "correct float64 port lands near 1e-14; 1e-10 leaves room for another order of summation and nothing else",
    "float32": "the expected values are exact (float64) for the stored float32 weights, so the error is the "
    "port's own float32 rounding: logits and loss 1e-5, gradients 1e-4, LayerNorm weight gradients 3e-4 (a "
    "sum over every position of terms that cancel: the most fragile tensor in float32), PiSSA's residual 1e-4",
}


def tolerance_for(dtype: str, kind: str, name: str = "") -> float:
    """The tolerance of a tensor: kind is "loss", "logits", "gradient" or "derived"."""
    if dtype == "float64":
        return FLOAT64_TOLERANCE
    if kind == "gradient" and name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
        return FLOAT32_TOLERANCES["layernorm_weight"]
    return FLOAT32_TOLERANCES[kind]


# ===================================================================== the cases
@dataclass(frozen=True)
class Batch:
    """B rows of T tokens. padding: "none", "mixed" (a full row, a right-padded row and a left-padded
    row) or "ends" (a full row, and a row padded one token at the left and two at the right)."""

    B: int
    T: int
    padding: str = "none"


@dataclass(frozen=True)
class Spec:
    """One case before it is computed: a method (a label), a variant, the model, the method's config
    (a factory: configs are mutable), the batch, and whether the adapter's tensors are moved off their init."""

    method: str
    variant: str
    description: str
    model: Mapping[str, Any]
    config: Callable[[], PeftConfig | None]
    batch: Batch
    perturb_adapter: bool = True
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.method}-{self.variant}"


ODD = {"vocab_size": 19, "n_positions": 11, "n_embd": 9, "n_layer": 2, "n_head": 3, "n_inner": 13}
ODD_EPS = {**ODD, "layer_norm_epsilon": 1e-6}  # a config that is not GPT-2's default anywhere it can be
SMALL = {"vocab_size": 23, "n_positions": 12, "n_embd": 8, "n_layer": 2, "n_head": 2}
BYTES = {"vocab_size": 128, "n_positions": 12, "n_embd": 8, "n_layer": 2, "n_head": 2}  # room for ASCII text


def _none() -> None:
    return None


SPECS: tuple[Spec, ...] = (
    Spec("full", "odd", "every parameter trains; odd sizes, n_inner 13, eps 1e-6", ODD_EPS, _none, Batch(2, 7)),
    Spec("full", "padded", "every parameter trains; T = n_positions; a left-padded row", SMALL, _none,
         Batch(3, 12, "mixed"), seed=1),
    Spec("bitfit", "odd", "every bias trains", ODD_EPS, BitFitConfig, Batch(2, 7), seed=2),
    Spec("bitfit", "padded", "every bias trains; padded batch", SMALL, BitFitConfig, Batch(3, 8, "mixed"), seed=3),
    Spec("ln_tuning", "odd", "ln_1, ln_2, ln_f train", ODD_EPS, LNTuningConfig, Batch(2, 7), seed=4),
    Spec("ln_tuning", "padded", "ln_1 and ln_f train; padded batch", SMALL,
         lambda: LNTuningConfig(target_modules=["ln_1", "ln_f"]), Batch(3, 8, "mixed"), seed=5),
    Spec("lora", "odd", "r=2 on every kind of linear layer", ODD_EPS,
         lambda: LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_proj", "c_fc"]), Batch(2, 7), seed=6),
    Spec("lora", "rank1", "r=1 on c_attn (PEFT's default target)", SMALL,
         lambda: LoraConfig(r=1, lora_alpha=2), Batch(2, 6), seed=7),
    Spec("lora", "padded", "r=2, bias='all' (every bias trains too); padded batch", SMALL,
         lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "mlp.c_proj"], bias="all"),
         Batch(3, 8, "mixed"), seed=8),
    Spec("rslora", "odd", "rsLoRA r=3: s = alpha / sqrt(r)", ODD_EPS,
         lambda: LoraConfig(r=3, lora_alpha=2, use_rslora=True, target_modules=["c_attn", "c_fc"]),
         Batch(2, 7), seed=9),
    Spec("rslora", "rank1", "rsLoRA r=1 on both c_proj; padded batch", SMALL,
         lambda: LoraConfig(r=1, lora_alpha=3, use_rslora=True, target_modules=["c_proj"]),
         Batch(3, 8, "mixed"), seed=10),
    Spec("dora", "odd", "DoRA r=2 on every kind of linear layer", ODD_EPS,
         lambda: LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=["c_attn", "c_proj", "c_fc"]),
         Batch(2, 7), seed=11),
    Spec("dora", "rank1", "DoRA with rsLoRA, r=1 on c_attn", SMALL,
         lambda: LoraConfig(r=1, lora_alpha=2, use_dora=True, use_rslora=True), Batch(2, 6), seed=12),
    Spec("dora", "padded", "DoRA r=2 on the MLP, bias='lora_only'; padded batch", SMALL,
         lambda: LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["mlp.c_fc", "mlp.c_proj"],
                            bias="lora_only"),
         Batch(3, 8, "mixed"), seed=13),
    Spec("pissa", "odd", "PiSSA r=2 on c_attn and both c_proj", ODD_EPS,
         lambda: LoraConfig(r=2, lora_alpha=2, init_lora_weights="pissa", target_modules=["c_attn", "c_proj"]),
         Batch(2, 7), seed=14),
    Spec("pissa", "rank1", "PiSSA with DoRA, r=1 on c_attn and c_fc; padded batch", SMALL,
         lambda: LoraConfig(r=1, lora_alpha=1, init_lora_weights="pissa", use_dora=True,
                            target_modules=["c_attn", "c_fc"]),
         Batch(3, 8, "mixed"), seed=15),
    Spec("prompt_tuning", "random", "RANDOM init, 3 virtual tokens", ODD_EPS,
         lambda: PromptTuningConfig(num_virtual_tokens=3), Batch(2, 7), perturb_adapter=False, seed=16),
    Spec("prompt_tuning", "sample_vocab", "SAMPLE_VOCAB init; NV + T = n_positions; padded batch", SMALL,
         lambda: PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"),
         Batch(3, 8, "mixed"), perturb_adapter=False, seed=17),
    Spec("prompt_tuning", "text", "TEXT init from 'Hi!' (tiled to 5 rows); NV + T = n_positions", BYTES,
         lambda: PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT", prompt_tuning_init_text="Hi!"),
         Batch(2, 7, "ends"), perturb_adapter=False, seed=18),
    Spec("prefix_tuning", "table", "the (NV, 2LC) table, 3 virtual tokens", ODD_EPS,
         lambda: PrefixTuningConfig(num_virtual_tokens=3), Batch(2, 7), seed=19),
    Spec("prefix_tuning", "table_limit", "the table; NV + T = n_positions; padded batch", SMALL,
         lambda: PrefixTuningConfig(num_virtual_tokens=4), Batch(2, 8, "ends"), seed=20),
    Spec("prefix_tuning", "projection", "prefix_projection=True, hidden size 5", ODD_EPS,
         lambda: PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=5),
         Batch(2, 7), seed=21),
    Spec("prefix_tuning", "projection_padded", "prefix_projection=True, hidden size n_embd; padded batch", SMALL,
         lambda: PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True), Batch(3, 8, "mixed"), seed=22),
    Spec("ia3", "odd", "PEFT's gpt2 defaults: c_attn scaled on its output, mlp.c_proj on its input", ODD_EPS,
         IA3Config, Batch(2, 7), seed=23),
    Spec("ia3", "padded", "every linear layer; both MLP layers scaled on their input; padded batch", SMALL,
         lambda: IA3Config(target_modules=["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
                           feedforward_modules=["mlp.c_fc", "mlp.c_proj"]),
         Batch(3, 8, "mixed"), seed=24),
    Spec("bottleneck_adapter", "relu", "relu, size 3, after attn.c_proj and mlp.c_proj", ODD_EPS,
         lambda: AdapterConfig(bottleneck_size=3, non_linearity="relu"), Batch(2, 7), seed=30),
    Spec("bottleneck_adapter", "gelu_attn", "gelu_tanh, size 4, after attn.c_proj only; padded batch", SMALL,
         lambda: AdapterConfig(bottleneck_size=4, non_linearity="gelu_tanh", placement="attn"),
         Batch(3, 8, "mixed"), seed=26),
    Spec("bottleneck_adapter", "silu_rank1", "silu, size 1, after mlp.c_proj only", SMALL,
         lambda: AdapterConfig(bottleneck_size=1, non_linearity="silu", placement="mlp"), Batch(2, 6), seed=27),
    Spec("bottleneck_adapter", "tanh", "tanh, size 2, both places; padded batch", ODD_EPS,
         lambda: AdapterConfig(bottleneck_size=2, non_linearity="tanh"), Batch(3, 8, "mixed"), seed=28),
)  # fmt: skip


def make_batch(batch: Batch, vocab_size: int, rng: np.random.Generator) -> tuple[Array, Array, Array | None]:
    """(input_ids, labels, attention_mask) for a Batch. Labels are the ids with -100 where the mask is 0
    (so a left-padded row's last pad predicts its first token, as transformers' usual labels do), and
    one -100 in the first row when there is no padding, so that ignoring is exercised everywhere."""
    B, T = batch.B, batch.T
    ids = rng.integers(0, vocab_size, size=(B, T))
    mask = np.ones((B, T), dtype=np.int64)
    if batch.padding == "mixed":
        mask[1, T - 3 :] = 0  # right padding
        mask[2, :2] = 0  # left padding: the first two queries see no key at all
    elif batch.padding == "ends":
        mask[1, :1] = 0
        mask[1, T - 2 :] = 0
    labels = np.where(mask == 1, ids, checks.IGNORE_INDEX)
    if batch.padding == "none":
        labels[0, 3] = checks.IGNORE_INDEX
        return ids, labels, None
    return ids, labels, mask


# ===================================================================== a computed case
@dataclass
class Case:
    """A golden case: what a port is given (`port_input()`) and what it must reproduce."""

    name: str
    method: str
    variant: str
    description: str
    dtype: str
    model_config: dict[str, Any]
    method_config: dict[str, Any] | None
    trainable: list[str]
    weights: dict[str, Array]
    input_ids: Array
    labels: Array
    attention_mask: Array | None
    logits: Array
    loss: float
    grads: dict[str, Array]
    derived: dict[str, Array] = field(default_factory=dict)
    tolerances: dict[str, Any] = field(default_factory=dict)

    def port_input(self) -> dict[str, Any]:
        """What `run_case` gets: everything but the expected values (copies, so a port cannot edit the case)."""
        return {
            "name": self.name,
            "method": self.method,
            "dtype": self.dtype,
            "model_config": dict(self.model_config),
            "method_config": None if self.method_config is None else dict(self.method_config),
            "trainable": list(self.trainable),
            "weights": {k: v.copy() for k, v in self.weights.items()},
            "input_ids": self.input_ids.copy(),
            "labels": self.labels.copy(),
            "attention_mask": None if self.attention_mask is None else self.attention_mask.copy(),
        }


def _rounded(value: Array, dtype: str) -> Array:
    """value in float64, rounded to dtype's precision: the float32 cases compute exactly what is stored."""
    return np.asarray(value, dtype=np.float64).astype(dtype).astype(np.float64)


def compute_case(spec: Spec, dtype: str) -> Case:
    """Build the spec's model in float64, move every tensor off its init, round it to `dtype`, and compute
    logits, loss and the gradients of the trainable tensors in float64."""
    rng = np.random.default_rng((spec.seed, 7))
    config = GPTConfig(**spec.model, dtype="float64")
    base = GPT(config, seed=spec.seed)
    base.params = {k: _rounded(v + PERTURBATION * rng.standard_normal(v.shape), dtype) for k, v in base.params.items()}
    method_config = spec.config()
    model: Any = base
    derived: dict[str, Array] = {}
    if method_config is not None:
        model = get_peft_model(base, method_config, seed=spec.seed)
        adapter = model.active
        for name, value in adapter.params.items():
            moved = value + PERTURBATION * rng.standard_normal(value.shape) if spec.perturb_adapter else value
            adapter.params[name] = _rounded(moved, dtype)
        derived = _derived(adapter)
    ids, labels, mask = make_batch(spec.batch, config.vocab_size, rng)
    view = model.view()
    logits = engine.logits(view, ids, mask)
    loss, grads = engine.loss_and_grad(view, ids, labels, mask)
    weight_names = [*base.params, *(n for n in view.params if n not in base.params and n not in _stand_ins(model))]
    weights = {n: np.asarray(view.params[n]).astype(dtype) for n in weight_names}
    trainable = sorted(view.trainable)
    for name in trainable:  # every gradient must say something: a zero one checks nothing
        if not np.linalg.norm(grads[name]) > 0:
            raise AssertionError(f"{spec.name}: the gradient of {name} is zero; the case would check nothing")
    case = Case(
        name=f"{spec.name}-{dtype}",
        method=spec.method,
        variant=spec.variant,
        description=spec.description,
        dtype=dtype,
        model_config={k: getattr(config, k) for k in MODEL_CONFIG_FIELDS},
        method_config=None if method_config is None else model.active.config.to_dict(),
        trainable=trainable,
        weights=weights,
        input_ids=ids.astype(np.int64),
        labels=labels.astype(np.int64),
        attention_mask=None if mask is None else mask.astype(np.int64),
        logits=np.asarray(logits, dtype=np.float64),
        loss=float(loss),
        grads={n: np.asarray(grads[n], dtype=np.float64) for n in trainable},
        derived=derived,
    )
    case.tolerances = tolerances(case)
    return case


def _stand_ins(model: Any) -> set[str]:
    """Adapter tensors that stand in for a base parameter (trained bias copies, LN tuning's copies): in the
    vectors they appear under the base parameter's name, as the forward uses them."""
    return set(model.active.overrides.values()) if hasattr(model, "active") else set()


def _derived(adapter: Any) -> dict[str, Array]:
    """Tensors a port can compute from the config and the base weights, beside the stored ones:
    PiSSA's frozen residual weight per target, and prompt tuning's TEXT-initialised table."""
    if isinstance(adapter, LoraAdapter):
        return {f"{m}.pissa_residual": np.asarray(w, dtype=np.float64) for m, w in adapter.residual_weights.items()}
    config = adapter.config
    if isinstance(config, PromptTuningConfig) and config.prompt_tuning_init == "TEXT":
        return {PROMPT_EMBEDDINGS: np.asarray(adapter.params[PROMPT_EMBEDDINGS], dtype=np.float64)}
    return {}


def tolerances(case: Case) -> dict[str, Any]:
    return {
        "loss": tolerance_for(case.dtype, "loss"),
        "logits": tolerance_for(case.dtype, "logits"),
        "grads": {n: tolerance_for(case.dtype, "gradient", n) for n in case.grads},
        "derived": {n: tolerance_for(case.dtype, "derived", n) for n in case.derived},
    }


# ===================================================================== files
def _case_json(case: Case) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "name": case.name,
        "method": case.method,
        "variant": case.variant,
        "description": case.description,
        "dtype": case.dtype,
        "model_config": case.model_config,
        "method_config": case.method_config,
        "trainable": case.trainable,
        "inputs": {
            "input_ids": case.input_ids.tolist(),
            "labels": case.labels.tolist(),
            "attention_mask": None if case.attention_mask is None else case.attention_mask.tolist(),
        },
        "expected": {
            "loss": case.loss,
            "logits_shape": list(case.logits.shape),
            "grads": sorted(case.grads),
            "derived": sorted(case.derived),
        },
        "tolerance": case.tolerances,
    }


def write_case(folder: str | os.PathLike, case: Case) -> None:
    """case.json, weights.safetensors (the case's dtype) and expected.safetensors (float64), each atomically."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    save_safetensors(os.path.join(folder, WEIGHTS_NAME), case.weights)
    expected = {"logits": case.logits}
    expected |= {GRAD_PREFIX + n: g for n, g in case.grads.items()}
    expected |= {DERIVED_PREFIX + n: d for n, d in case.derived.items()}
    save_safetensors(os.path.join(folder, EXPECTED_NAME), expected)
    save_json(os.path.join(folder, CASE_NAME), _case_json(case))


def export_vectors(
    folder: str | os.PathLike, patterns: Sequence[str] = ("*",), dtypes: Sequence[str] = DTYPES
) -> list[str]:
    """Compute and write every case whose name (`lora-rank1-float32`) matches a glob in `patterns`, one
    folder each, and index.json listing them. Returns the case names."""
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r}: golden vectors come in {list(DTYPES)}")
    names = []
    for spec in SPECS:
        for dtype in dtypes:
            name = f"{spec.name}-{dtype}"
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                write_case(os.path.join(os.fspath(folder), name), compute_case(spec, dtype))
                names.append(name)
    if not names:
        known = [f"{s.name}-{d}" for s in SPECS for d in DTYPES]
        raise ConfigError(f"no case matches {list(patterns)}; the cases are named like {known[:3]} ...")
    index = {
        "format": FORMAT,
        "version": VERSION,
        "generated_by": f"tinypeft {__version__} export-vectors",
        "cases": names,
        "tolerance_notes": TOLERANCE_NOTES,
    }
    save_json(os.path.join(os.fspath(folder), INDEX_NAME), index)
    return names


# ===================================================================== loading
def load_vectors(folder: str | os.PathLike, patterns: Sequence[str] = ("*",)) -> list[Case]:
    """Every case listed in folder/index.json whose name matches a glob in `patterns`, loaded and validated."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder} is not a folder; expected golden vectors written by `tinypeft export-vectors`")
    path = os.path.join(folder, INDEX_NAME)
    index = load_json(path)
    _check_header(index, path)
    names = index.get("cases")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise CheckpointError(f"{path}: 'cases' must be a non-empty list of case names; got {_short(names)}")
    for n in names:
        if n in (".", "..") or "/" in n or "\\" in n or "\0" in n:
            raise CheckpointError(f"{path}: case name {n!r} is not a plain folder name")
    if len(set(names)) != len(names):
        raise CheckpointError(f"{path}: 'cases' lists a case twice")
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ConfigError(f"no case of {folder} matches {list(patterns)}; its cases are {names[:4]} ...")
    cases = [load_case(os.path.join(folder, n)) for n in chosen]
    for n, case in zip(chosen, cases, strict=True):
        if case.name != n:
            raise CheckpointError(f"{os.path.join(folder, n, CASE_NAME)} is named {case.name!r}, not {n!r}")
    return cases


def load_case(folder: str | os.PathLike) -> Case:
    """One case folder, validated: anything missing, malformed or inconsistent is a CheckpointError that
    names the file and what is wrong."""
    folder = os.fspath(folder)
    path = os.path.join(folder, CASE_NAME)
    doc = load_json(path)
    _check_header(doc, path)
    strings = {k: doc.get(k) for k in ("name", "method", "variant", "description", "dtype")}
    for key, value in strings.items():
        if not isinstance(value, str):
            raise CheckpointError(f"{path}: {key!r} must be a string; got {_short(value)}")
    dtype = strings["dtype"]
    if dtype not in DTYPES:
        raise CheckpointError(f"{path}: dtype {dtype!r}; golden vectors come in {list(DTYPES)}")
    model_config = _model_config(doc.get("model_config"), path)
    config = _gpt_config(model_config, dtype, path)
    method_config = doc.get("method_config")
    if method_config is not None:
        if not isinstance(method_config, dict):
            raise CheckpointError(f"{path}: 'method_config' must be an object or null; got {_short(method_config)}")
        PeftConfig.from_dict(method_config)  # a config tinypeft cannot read is refused here, with its reason
    trainable = doc.get("trainable")
    if not isinstance(trainable, list) or not trainable or not all(isinstance(n, str) for n in trainable):
        raise CheckpointError(f"{path}: 'trainable' must be a non-empty list of tensor names; got {_short(trainable)}")
    if len(set(trainable)) != len(trainable):
        raise CheckpointError(f"{path}: 'trainable' names a tensor twice")

    weights_path = os.path.join(folder, WEIGHTS_NAME)
    weights = load_safetensors(weights_path)
    _check_weights(weights, config, dtype, weights_path)
    missing = [n for n in trainable if n not in weights]
    if missing:
        raise CheckpointError(f"{path}: trainable tensor {missing[0]!r} is not in {WEIGHTS_NAME}")

    input_ids, labels, attention_mask = _inputs(doc.get("inputs"), config, path)
    expected = doc.get("expected")
    if not isinstance(expected, dict):
        raise CheckpointError(f"{path}: 'expected' must be an object; got {_short(expected)}")
    loss = expected.get("loss")
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not (math.isfinite(loss) and loss != 0):
        raise CheckpointError(f"{path}: expected 'loss' must be a finite non-zero number; got {_short(loss)}")

    expected_path = os.path.join(folder, EXPECTED_NAME)
    tensors = load_safetensors(expected_path)
    logits, grads, derived = _expected_tensors(tensors, expected, trainable, weights, input_ids, config, expected_path)
    tolerance = _tolerances(doc.get("tolerance"), grads, derived, path)
    return Case(
        name=strings["name"],
        method=strings["method"],
        variant=strings["variant"],
        description=strings["description"],
        dtype=dtype,
        model_config=model_config,
        method_config=method_config,
        trainable=trainable,
        weights=weights,
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        logits=logits,
        loss=float(loss),
        grads=grads,
        derived=derived,
        tolerances=tolerance,
    )


def _short(value: Any) -> str:
    """A value for an error message, cut short: a damaged file may hold a huge one."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_header(doc: Any, path: str) -> None:
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} must hold a JSON object; got {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: 'format' is {_short(doc.get('format'))}; expected {FORMAT!r}")
    version = doc.get("version")
    if version != VERSION or isinstance(version, bool):
        raise CheckpointError(f"{path}: version {_short(version)}; this tinypeft reads version {VERSION}")


def _model_config(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != set(MODEL_CONFIG_FIELDS):
        raise CheckpointError(
            f"{path}: 'model_config' must be an object with exactly the keys {list(MODEL_CONFIG_FIELDS)}; "
            f"got {_short(value)}"
        )
    return {k: value[k] for k in MODEL_CONFIG_FIELDS}


def _gpt_config(model_config: Mapping[str, Any], dtype: str, path: str) -> GPTConfig:
    try:
        return GPTConfig(**model_config, dtype=dtype)
    except ConfigError as e:
        raise CheckpointError(f"{path}: 'model_config' describes an impossible model: {e}") from None


def _check_weights(weights: Mapping[str, Array], config: GPTConfig, dtype: str, path: str) -> None:
    """Every base parameter with its exact shape, every tensor of the case's dtype and finite."""
    blocks = {layer_of(n) for n in weights} - {None}
    if max(blocks, default=-1) + 1 != config.n_layer:  # cheap, and bounds the table built next
        raise CheckpointError(
            f"{path} holds {max(blocks, default=-1) + 1} blocks; model_config has n_layer={config.n_layer}"
        )
    for name, shape in parameter_shapes(config).items():
        if name not in weights:
            raise CheckpointError(f"{path} lacks the base parameter {name!r}")
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(
                f"{path}: {name!r} has shape {tuple(weights[name].shape)}; model_config needs {shape}"
            )
    for name, value in weights.items():
        if value.dtype != np.dtype(dtype):
            raise CheckpointError(f"{path}: {name!r} is {value.dtype}; this is a {dtype} case")
        if not np.isfinite(value).all():
            raise CheckpointError(f"{path}: {name!r} holds non-finite values")


def _int_matrix(value: Any, what: str, path: str) -> Array:
    """A rectangular (B, T) list of JSON integers as an int64 array."""
    if not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value):
        raise CheckpointError(f"{path}: {what} must be a non-empty list of rows; got {_short(value)}")
    width = len(value[0])
    for row in value:
        if len(row) != width or not all(isinstance(v, int) and not isinstance(v, bool) for v in row):
            raise CheckpointError(f"{path}: {what} must be rows of equal length holding integers; got {_short(row)}")
        if any(not -(2**62) < v < 2**62 for v in row):
            raise CheckpointError(f"{path}: {what} holds an integer out of range: {_short(row)}")
    return np.array(value, dtype=np.int64)


def _inputs(value: Any, config: GPTConfig, path: str) -> tuple[Array, Array, Array | None]:
    if not isinstance(value, dict) or set(value) != {"input_ids", "labels", "attention_mask"}:
        raise CheckpointError(
            f"{path}: 'inputs' must be an object with input_ids, labels and attention_mask; got {_short(value)}"
        )
    ids = _int_matrix(value["input_ids"], "input_ids", path)
    labels = _int_matrix(value["labels"], "labels", path)
    mask = None if value["attention_mask"] is None else _int_matrix(value["attention_mask"], "attention_mask", path)
    try:
        checks.check_token_ids(ids, config.vocab_size)
        checks.check_labels(labels, ids.shape, config.vocab_size, leading_positions=None)
        checks.check_attention_mask(mask, ids.shape)
    except TinyPeftError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if ids.shape[1] > config.n_positions:
        raise CheckpointError(f"{path}: {ids.shape[1]} tokens do not fit n_positions={config.n_positions}")
    return ids, labels, mask


def _expected_tensors(
    tensors: Mapping[str, Array],
    expected: Mapping[str, Any],
    trainable: Sequence[str],
    weights: Mapping[str, Array],
    input_ids: Array,
    config: GPTConfig,
    path: str,
) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    """logits, grads (one per trainable tensor, its shape) and derived tensors, all float64 and finite."""
    derived_names = expected.get("derived")
    if not isinstance(derived_names, list) or not all(isinstance(n, str) for n in derived_names):
        raise CheckpointError(f"{path}: expected 'derived' must be a list of names; got {_short(derived_names)}")
    if expected.get("grads") != sorted(trainable):
        raise CheckpointError(f"{path}: expected 'grads' must list the trainable tensors, sorted")
    wanted = {"logits", *(GRAD_PREFIX + n for n in trainable), *(DERIVED_PREFIX + n for n in derived_names)}
    if set(tensors) != wanted:
        extra, lacking = sorted(set(tensors) - wanted), sorted(wanted - set(tensors))
        raise CheckpointError(
            f"{path} does not hold the expected tensors: missing {lacking[:3]}, unexpected {extra[:3]}"
        )
    for name, value in tensors.items():
        if value.dtype != np.float64:
            raise CheckpointError(f"{path}: {name!r} is {value.dtype}; expected values are float64")
        if not np.isfinite(value).all() or not np.linalg.norm(value) > 0:
            raise CheckpointError(f"{path}: {name!r} must be finite and not all zero")
    logits = tensors["logits"]
    B, T = input_ids.shape
    shape = expected.get("logits_shape")
    if (
        logits.ndim != 3
        or shape != list(logits.shape)
        or logits.shape[0] != B
        or logits.shape[2] != config.vocab_size
        or not T <= logits.shape[1] <= config.n_positions
    ):
        raise CheckpointError(
            f"{path}: logits have shape {tuple(logits.shape)} (logits_shape {_short(shape)}); "
            f"expected ({B}, T', {config.vocab_size}) with {T} <= T' <= n_positions={config.n_positions}"
        )
    grads = {n: tensors[GRAD_PREFIX + n] for n in trainable}
    for name, g in grads.items():
        if g.shape != weights[name].shape:
            raise CheckpointError(
                f"{path}: the gradient of {name!r} has shape {g.shape}; the weight has {weights[name].shape}"
            )
    derived = {n: tensors[DERIVED_PREFIX + n] for n in derived_names}
    return logits, grads, derived


def _tolerances(value: Any, grads: Mapping[str, Array], derived: Mapping[str, Array], path: str) -> dict[str, Any]:
    def positive(x: Any, what: str) -> float:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not (math.isfinite(x) and 0 < x < 1):
            raise CheckpointError(f"{path}: the tolerance of {what} must be a number in (0, 1); got {_short(x)}")
        return float(x)

    if not isinstance(value, dict) or set(value) != {"loss", "logits", "grads", "derived"}:
        raise CheckpointError(f"{path}: 'tolerance' must hold loss, logits, grads and derived; got {_short(value)}")
    result: dict[str, Any] = {
        "loss": positive(value["loss"], "the loss"),
        "logits": positive(value["logits"], "logits"),
    }
    for key, names in (("grads", grads), ("derived", derived)):
        table = value[key]
        if not isinstance(table, dict) or set(table) != set(names):
            raise CheckpointError(f"{path}: tolerance {key!r} must have one entry per tensor, {sorted(names)[:3]} ...")
        result[key] = {n: positive(table[n], n) for n in names}
    return result


# ===================================================================== checking
@dataclass(frozen=True)
class TensorCheck:
    """One compared tensor: its error, its tolerance, and whether it passed (None: not checked)."""

    tensor: str
    error: float
    tolerance: float
    passed: bool | None
    note: str = ""


@dataclass
class CaseReport:
    name: str
    method: str
    dtype: str
    checks: list[TensorCheck] = field(default_factory=list)
    failure: str = ""  # the implementation raised, or returned something unusable

    @property
    def passed(self) -> bool:
        return not self.failure and all(c.passed is not False for c in self.checks)

    def worst(self) -> TensorCheck | None:
        """The compared tensor furthest over, or closest to, its tolerance (a failure before any pass)."""
        compared = [c for c in self.checks if c.passed is not None]
        return max(
            compared, key=lambda c: (not c.passed, c.error / c.tolerance if c.tolerance else math.inf), default=None
        )


def relative_error(got: Any, want: Array) -> float:
    """||got - want|| / ||want|| over all elements, inf if got is not finite (want is never zero)."""
    got = np.asarray(got, dtype=np.float64)
    if not np.isfinite(got).all():
        return math.inf
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def compare(case: Case, result: Any) -> CaseReport:
    """Check what an implementation returned for `case` against the expected values and tolerances."""
    report = CaseReport(case.name, case.method, case.dtype)
    if not isinstance(result, Mapping) or not {"logits", "loss", "grads"} <= set(result):
        report.failure = f"run_case must return a dict with logits, loss and grads; got {_short(result)}"
        return report

    def check(tensor: str, got: Any, want: Array, tolerance: float) -> None:
        try:
            got = np.asarray(got, dtype=np.float64)
        except (TypeError, ValueError) as e:
            report.checks.append(TensorCheck(tensor, math.inf, tolerance, False, f"not an array: {e}"))
            return
        if got.shape != want.shape:
            note = f"shape {got.shape}, expected {want.shape}"
            report.checks.append(TensorCheck(tensor, math.inf, tolerance, False, note))
            return
        error = relative_error(got, want)
        report.checks.append(TensorCheck(tensor, error, tolerance, error <= tolerance))

    check("loss", result["loss"], np.asarray(case.loss), case.tolerances["loss"])
    check("logits", result["logits"], case.logits, case.tolerances["logits"])
    grads = result["grads"]
    if not isinstance(grads, Mapping):
        report.failure = f"grads must be a dict of tensor name -> array; got {type(grads).__name__}"
        return report
    for name, want in case.grads.items():
        if name in grads:
            check(name, grads[name], want, case.tolerances["grads"][name])
        else:
            report.checks.append(TensorCheck(name, math.inf, case.tolerances["grads"][name], False, "gradient missing"))
    for name in sorted(set(grads) - set(case.grads), key=repr):
        report.checks.append(TensorCheck(str(name), math.inf, 0.0, False, "a gradient of a tensor that does not train"))
    derived = result.get("derived") or {}
    if not isinstance(derived, Mapping):
        report.failure = f"derived must be a dict of tensor name -> array; got {type(derived).__name__}"
        return report
    for name, want in case.derived.items():
        tolerance = case.tolerances["derived"][name]
        if name in derived:
            check(f"derived {name}", derived[name], want, tolerance)
        else:
            report.checks.append(TensorCheck(f"derived {name}", math.nan, tolerance, None, "not returned (optional)"))
    for name in sorted(set(derived) - set(case.derived), key=repr):
        report.checks.append(TensorCheck(f"derived {name}", math.inf, 0.0, False, "not a derived tensor of this case"))
    return report


def check_vectors(folder: str | os.PathLike, run_case: RunCase, patterns: Sequence[str] = ("*",)) -> list[CaseReport]:
    """Run an implementation on every case (matching a glob in `patterns`) and compare. An exception the
    implementation raises fails its case; it does not stop the others."""
    reports = []
    for case in load_vectors(folder, patterns):
        try:
            with np.errstate(all="ignore"):
                result = run_case(case.port_input())
        except Exception as e:
            report = CaseReport(case.name, case.method, case.dtype, failure=f"run_case raised {type(e).__name__}: {e}")
        else:
            with np.errstate(all="ignore"):
                report = compare(case, result)
        reports.append(report)
    return reports


def load_impl(spec: str) -> RunCase:
    """`run_case` from an implementation: a dotted module name importable from the current folder, or the
    path of a .py file or of a package folder."""
    path = os.path.abspath(spec)
    try:
        if spec.endswith(".py") or os.path.isdir(path):
            location = os.path.join(path, "__init__.py") if os.path.isdir(path) else path
            if not os.path.isfile(location):
                raise ConfigError(f"--impl {spec}: {location} does not exist")
            name = "golden_vector_impl_" + os.path.splitext(os.path.basename(path))[0]
            search = [path] if os.path.isdir(path) else None
            module_spec = importlib.util.spec_from_file_location(name, location, submodule_search_locations=search)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(spec)
    except TinyPeftError:
        raise
    except Exception as e:  # the implementation's own import failing: say so in one line
        raise ConfigError(f"--impl {spec}: importing it raised {type(e).__name__}: {e}") from None
    run = getattr(module, "run_case", None)
    if not callable(run):
        raise ConfigError(f"--impl {spec}: the module has no function run_case(case) -> dict (see VECTORS.md)")
    return run


# ===================================================================== tinypeft as an implementation
def run_case(case: Mapping[str, Any]) -> dict[str, Any]:
    """tinypeft itself behind the interface every port implements: builds the model and adapter from the
    case's configs, loads its weights, and computes in the case's dtype."""
    dtype = case["dtype"]
    config = GPTConfig(**case["model_config"], dtype=dtype)
    weights = dict(case["weights"])
    base = GPT(config)
    base.load_state_dict({n: weights.pop(n) for n in parameter_shapes(config)})
    method_config = case["method_config"]
    model: Any = base
    derived: dict[str, Array] = {}
    if method_config is None:
        base.trainable = set(case["trainable"])
    else:
        model = get_peft_model(base, PeftConfig.from_dict(method_config))
        adapter = model.active
        derived = _derived(adapter)  # from the fresh adapter: what the init computes from the base weights
        stands_in_for = {v: k for k, v in adapter.overrides.items()}
        state = {}
        for name in adapter.params:
            if name in stands_in_for:  # a trained copy of a base tensor: the case holds it under the base name
                state[name] = base.params[stands_in_for[name]]
            elif name in weights:
                state[name] = weights.pop(name)
            else:
                raise CheckpointError(f"case {case['name']}: the weights lack the adapter tensor {name!r}")
        adapter.load_state_dict(state)
    if weights:
        raise CheckpointError(f"case {case['name']}: weights this method does not use: {sorted(weights)[:3]}")
    view = model.view()
    if set(view.trainable) != set(case["trainable"]):
        raise CheckpointError(f"case {case['name']}: 'trainable' is not what its method trains")
    ids, labels, mask = case["input_ids"], case["labels"], case["attention_mask"]
    logits = engine.logits(view, ids, mask)
    loss, grads = engine.loss_and_grad(view, ids, labels, mask)
    return {"logits": logits, "loss": loss, "grads": grads, "derived": derived}
