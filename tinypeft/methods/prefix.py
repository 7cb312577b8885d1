"""Prefix tuning (Li & Liang 2021): trainable keys and values for NV "virtual" positions in front of the
real tokens, in every layer's attention. The base model is frozen; only the prefixes learn.

As PEFT does it (PeftModel.get_prompt, PeftModelForCausalLM.forward):
- one table of shape (NV, n_layer * 2 * C); row j holds virtual position j's keys and values for
  every layer, laid out [layer][key/value][head][head_dim] (PEFT views it as
  (B, NV, 2L, NH, hs) and permutes to (2L, B, NH, NV, hs); entries 2i and 2i+1 are layer i's
  keys and values);
- in layer i, attention sees concat(prefix_keys_i, own keys) and concat(prefix_values_i, own
  values); the prefix entries get no LayerNorm, no projection and no position embedding: they are
  keys and values already, the "past" of a KV cache;
- every real token attends to all NV prefix entries (the attention mask gets NV ones in front);
  real tokens take positions NV..NV+T-1 (the base model offsets positions by the past's length);
- labels are not padded and the logits have T positions.

With prefix_projection=True the table is not a parameter but the output of a small MLP over a
trainable (NV, C) embedding: table = tanh(E W1^T + b1) W2^T + b2, W1 (H, C), W2 (2LC, H) in
torch.nn.Linear's (out, in) layout (PEFT's `prompt_encoder.transform`). The MLP is a training-time
reparametrisation: PEFT saves only its output, the (NV, 2LC) table, under `prompt_embeddings`, and
loads that back as a plain table. tinypeft does the same; see docs/prefix_tuning.md.

Initialisation: N(0, 1) (torch.nn.Embedding's default), or zeros with init_weights="zero" (with the
projection, the last Linear is zeroed, so the table starts at zero). Zero keys and values are not
the identity: every query gives the NV prefix entries the score 0, so they take a share of the
attention weight (their values are 0, so the output shrinks). No finite prefix is the identity.
tinypeft adds prefix_init="TEXT" (Li & Liang's initialisation from real words): the table starts as the
base model's own keys and values for prefix_init_text's tokens (the base folder's tokenizer, else bytes;
repeated/truncated to NV): the model starts as the base reading that text first (with the projection, its
last Linear is solved so that the MLP computes that table). PEFT has no such init; its files are the same.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import Array, namespace, to_numpy
from ..config import shown
from ..errors import CheckpointError, ConfigError, InputError, MergeError
from ..sites import Sites
from .base import Adapter, register
from .registry import ODD_EPS, SMALL, Batch, ErrorCase, Flag, GoldenCase, MethodSpec, as_is, register_method
from .virtual_tokens import (
    NUM_VIRTUAL_TOKENS,
    SHAPE_FIELDS_INERT,
    VirtualTokenConfig,
    base_tokenizer,
    check_init_text,
    init_text_ids,
)

if TYPE_CHECKING:
    from ..model import GPT

Params = Mapping[str, Array]

PROMPT_EMBEDDINGS = "prompt_embeddings"  # the (NV, 2LC) table: the parameter, or what the MLP computes
# the projection's tensors, named like PEFT's in-memory prompt encoder without the adapter name
EMBEDDING = "prompt_encoder.embedding.weight"  # (NV, C)
W1, B1 = "prompt_encoder.transform.0.weight", "prompt_encoder.transform.0.bias"  # (H, C), (H,)
W2, B2 = "prompt_encoder.transform.2.weight", "prompt_encoder.transform.2.bias"  # (2LC, H), (2LC,)
PROJECTION_NAMES = (EMBEDDING, W1, B1, W2, B2)
INIT_WEIGHTS = (None, "zero")
PREFIX_INITS = ("RANDOM", "TEXT")  # tinypeft's prefix_init; RANDOM is PEFT's (with init_weights)
DEFAULT_INIT_TEXT = "The quick brown fox jumps over the lazy dog. "  # real words, about no task in particular
TINYPEFT_FIELDS = ("prefix_init", "prefix_init_text")  # not PEFT's: left out of adapter_config.json


# ------------------------------------------------------------------ forward / backward
def prefix_projection_forward(E: Array, W1: Array, b1: Array, W2: Array, b2: Array) -> tuple[Array, tuple]:
    """table = tanh(E W1^T + b1) W2^T + b2 (PEFT: Embedding -> Linear -> Tanh -> Linear).

    E (NV, C), W1 (H, C), b1 (H,), W2 (2LC, H), b2 (2LC,)  ->  table (NV, 2LC).
    Embedding(arange(NV)) is E itself, so the lookup is left out.
    Cache: E, W1, W2 and the tanh output t (tanh' = 1 - t^2 needs nothing else).
    """
    xp = namespace(E, W1, b1, W2, b2)
    t = xp.tanh(E @ W1.T + b1)  # [NV, C] @ [C, H] -> [NV, H]
    table = t @ W2.T + b2  # [NV, H] @ [H, 2LC] -> [NV, 2LC]
    return table, (E, W1, W2, t)


def prefix_projection_backward(dtable: Array, cache: tuple, need: Collection[str] = PROJECTION_NAMES) -> dict:
    """Gradients of the projection, for the names (EMBEDDING, W1, B1, W2, B2) in `need`.

    in the forward pass this was: h = E W1^T + b1, t = tanh(h), table = t W2^T + b2, so:
        dW2 = dtable^T t    db2 = sum_rows dtable    dt = dtable W2
        dh = dt (1 - t^2)
        dW1 = dh^T E        db1 = sum_rows dh        dE = dh W1
    """
    E, W1_, W2_, t = cache
    grads = {}
    if W2 in need:
        grads[W2] = dtable.T @ t  # [2LC, NV] @ [NV, H] -> [2LC, H]
    if B2 in need:
        grads[B2] = dtable.sum(axis=0)  # [2LC]
    if not {EMBEDDING, W1, B1} & set(need):
        return grads
    dt = dtable @ W2_  # [NV, 2LC] @ [2LC, H] -> [NV, H]
    dh = dt * (1.0 - t * t)  # tanh' = 1 - tanh^2
    if W1 in need:
        grads[W1] = dh.T @ E  # [H, NV] @ [NV, C] -> [H, C]
    if B1 in need:
        grads[B1] = dh.sum(axis=0)  # [H]
    if EMBEDDING in need:
        grads[EMBEDDING] = dh @ W1_  # [NV, H] @ [H, C] -> [NV, C]
    return grads


def prefix_keys_values_forward(table: Array, batch_size: int, n_layer: int, n_head: int) -> tuple[list, tuple]:
    """Per layer, (keys, values) of shape (B, NH, NV, hs) from the table (NV, 2 L C).

    Row j of the table is [layer][key/value][head][head_dim]: view it as (NV, 2L, NH, hs), move the
    2L axis first -> (2L, NH, NV, hs); layer i's keys are entry 2i and its values 2i + 1, the same
    for every row of the batch. Cache: the table's shape.
    """
    xp = namespace(table)
    NV, width = table.shape
    hs = width // (2 * n_layer * n_head)
    kv = table.reshape(NV, 2 * n_layer, n_head, hs).transpose((1, 2, 0, 3))  # [NV, 2L, NH, hs] -> [2L, NH, NV, hs]
    shape = (batch_size, n_head, NV, hs)
    layers = [
        (xp.broadcast_to(kv[2 * i][None], shape), xp.broadcast_to(kv[2 * i + 1][None], shape))  # [B, NH, NV, hs]
        for i in range(n_layer)
    ]
    return layers, table.shape


def prefix_keys_values_backward(dprefix: list[tuple[Array, Array]], table_shape: tuple[int, int]) -> Array:
    """dtable (NV, 2LC) from the per-layer (dkeys, dvalues), each (B, NH, NV, hs).

    in the forward pass this was: keys_i = broadcast_B(kv[2i]), values_i = broadcast_B(kv[2i+1]),
    kv = table viewed (NV, 2L, NH, hs) and transposed to (2L, NH, NV, hs), so: sum each gradient over
    the batch, stack them in the order 2i, 2i+1, and undo the transpose and the view.
    """
    xp = namespace(*(d for pair in dprefix for d in pair))
    dkv = xp.stack([d.sum(axis=0) for pair in dprefix for d in pair])  # [2L, NH, NV, hs]
    return dkv.transpose((2, 0, 1, 3)).reshape(table_shape)  # [NV, 2L, NH, hs] -> [NV, 2LC]


@dataclass(frozen=True)
class PrefixSite:
    """The prefix site: keys and values for every layer, from the table or from the projection."""

    n_layer: int
    n_head: int
    projection: bool

    @property
    def param_names(self) -> tuple[str, ...]:
        return PROJECTION_NAMES if self.projection else (PROMPT_EMBEDDINGS,)

    def positions(self, params: Params) -> int:
        return params[EMBEDDING if self.projection else PROMPT_EMBEDDINGS].shape[0]  # NV

    def forward(self, params: Params, batch_size: int) -> tuple[list[tuple[Array, Array]], tuple]:
        projection_cache = None
        if self.projection:
            table, projection_cache = prefix_projection_forward(*(params[n] for n in PROJECTION_NAMES))
        else:
            table = params[PROMPT_EMBEDDINGS]
        layers, table_shape = prefix_keys_values_forward(table, batch_size, self.n_layer, self.n_head)
        return layers, (table_shape, projection_cache)

    def backward(self, dprefix: list[tuple[Array, Array]], cache: tuple, trainable: Collection[str]) -> dict:
        table_shape, projection_cache = cache
        need = [n for n in self.param_names if n in trainable]
        if not need:
            return {}
        dtable = prefix_keys_values_backward(dprefix, table_shape)
        if not self.projection:
            return {PROMPT_EMBEDDINGS: dtable}
        return prefix_projection_backward(dtable, projection_cache, need)


# ------------------------------------------------------------------ config and adapter
@register
@dataclass
class PrefixTuningConfig(VirtualTokenConfig):
    """Prefix tuning: trainable keys and values for num_virtual_tokens positions in every layer.

    prefix_projection=True computes them with PEFT's MLP (Embedding -> Linear(C, H) -> tanh ->
    Linear(H, 2LC)), H = encoder_hidden_size (default: n_embd; PEFT has no default). init_weights:
    None for N(0, 1), "zero" for an all-zero start (see the module docstring: not the identity).
    prefix_init="TEXT" (tinypeft's; PEFT has no such field) starts from the base model's keys and values
    of prefix_init_text's bytes, repeated/truncated to num_virtual_tokens.
    """

    peft_type = "PREFIX_TUNING"
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None
    prefix_init: str = "RANDOM"
    prefix_init_text: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(f"prefix_projection must be True or False; got {shown(self.prefix_projection)}")
        h = self.encoder_hidden_size
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise ConfigError(f"encoder_hidden_size must be a positive integer or None (= n_embd); got {shown(h)}")
        if self.init_weights not in INIT_WEIGHTS:
            raise ConfigError(f"init_weights must be one of {INIT_WEIGHTS}; got {shown(self.init_weights)}")
        if self.prefix_init not in PREFIX_INITS:
            raise ConfigError(f"prefix_init must be one of {PREFIX_INITS}; got {shown(self.prefix_init)}")
        if self.prefix_init == "TEXT":
            check_init_text("prefix_init", "prefix_init_text", self.prefix_init_text)
            if self.init_weights is not None:
                raise ConfigError(
                    f"prefix_init='TEXT' and init_weights={self.init_weights!r} are two initialisations; "
                    "choose one (init_weights=None with TEXT)"
                )

    def text_ids(self, base: GPT) -> np.ndarray:
        """The TEXT init's tokens (the base folder's tokenizer, else bytes), tiled or cut to NV."""
        args = (self.prefix_init_text, self.num_virtual_tokens, base.config.vocab_size, base_tokenizer(base))
        return init_text_ids("prefix_init_text", *args)

    def validate(self, base: GPT) -> None:
        super().validate(base)
        if self.prefix_init != "TEXT":
            return
        self.text_ids(base)
        hidden = self.encoder_hidden_size or base.config.n_embd
        if self.prefix_projection and hidden < self.num_virtual_tokens:
            raise ConfigError(
                f"prefix_init='TEXT' with prefix_projection needs encoder_hidden_size >= num_virtual_tokens "
                f"(the MLP's last Linear is solved to give the text's {self.num_virtual_tokens} rows of keys and "
                f"values); got {hidden} < {self.num_virtual_tokens}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config's fields; tinypeft's prefix_init and prefix_init_text only when they say TEXT."""
        d = super().to_dict()
        if self.prefix_init == "RANDOM" and self.prefix_init_text is None:
            for name in TINYPEFT_FIELDS:
                del d[name]
        return d

    def peft_dict(self) -> dict[str, Any]:
        """adapter_config.json: PEFT's fields alone (PEFT warns of any other; the init is in the saved table)."""
        return {k: v for k, v in self.to_dict().items() if k not in TINYPEFT_FIELDS}

    def estimated_parameters(self, base: GPT) -> int:
        NV, C, width = self.num_virtual_tokens, base.config.n_embd, 2 * base.config.n_layer * base.config.n_embd
        if not self.prefix_projection:
            return NV * width  # the table (NV, 2LC)
        hidden = self.encoder_hidden_size or C
        return NV * C + (C + 1) * hidden + (hidden + 1) * width  # embedding, Linear(C, H), Linear(H, 2LC)

    def build(self, base: GPT, seed: int = 0) -> Adapter:
        """Draws like torch's defaults: Embedding N(0, 1); Linear(in, out) weight and bias U(-k, k), k = 1/sqrt(in).
        TEXT: the table is the base's keys and values of the text (with the projection, W2 solves for it)."""
        rng = np.random.default_rng(seed)
        cfg = base.config
        NV, C, width = self.num_virtual_tokens, cfg.n_embd, 2 * cfg.n_layer * cfg.n_embd
        zero = self.init_weights == "zero"
        hidden = self.encoder_hidden_size or C
        text = None
        if self.prefix_init == "TEXT":
            text = text_table(base, self.text_ids(base))
        if self.prefix_projection:
            k1, k2 = 1 / np.sqrt(C), 1 / np.sqrt(hidden)
            params = {
                EMBEDDING: rng.standard_normal((NV, C)),
                W1: rng.uniform(-k1, k1, size=(hidden, C)),
                B1: rng.uniform(-k1, k1, size=hidden),
                W2: np.zeros((width, hidden)) if zero else rng.uniform(-k2, k2, size=(width, hidden)),
                B2: np.zeros(width) if zero else rng.uniform(-k2, k2, size=width),
            }
            if text is not None:
                params[W2] = projection_solving_for(text, params)
        elif text is not None:
            params = {PROMPT_EMBEDDINGS: text}
        else:
            params = {PROMPT_EMBEDDINGS: np.zeros((NV, width)) if zero else rng.standard_normal((NV, width))}
        params = {k: base.xp.asarray(v.astype(cfg.dtype)) for k, v in params.items()}
        config = self.filled(base, encoder_hidden_size=hidden if self.prefix_projection else self.encoder_hidden_size)
        return PrefixTuningAdapter(config, base, params)


def text_table(base: GPT, ids: np.ndarray) -> np.ndarray:
    """The (NV, 2LC) table holding the base model's keys and values for the tokens `ids` (NV,): the KV
    cache after reading them, in the table's layout. prefix_keys_values_backward with a batch of one is
    that layout's inverse (summing over one row is the row itself; the transpose and view are undone)."""
    layers = base.keys_values(ids[None])  # per layer ([1, NH, NV, hs], [1, NH, NV, hs])
    width = 2 * base.config.n_layer * base.config.n_embd
    return to_numpy(prefix_keys_values_backward(layers, (len(ids), width))).astype(np.float64)


def projection_solving_for(table: np.ndarray, params: Mapping[str, np.ndarray]) -> np.ndarray:
    """W2 (2LC, H) such that tanh(E W1^T + b1) W2^T + b2 = table: the least-squares solution of smallest norm,
    exact when the NV rows of tanh(...) are independent (H >= NV; drawn at random, they are)."""
    t = np.tanh(params[EMBEDDING] @ params[W1].T + params[B1])  # [NV, H]
    solution, *_ = np.linalg.lstsq(t, table - params[B2], rcond=None)  # [H, 2LC]
    return solution.T


class PrefixTuningAdapter(Adapter):
    """The prefix table `prompt_embeddings` (NV, 2LC), or the projection that computes it.

    With the projection, `state_dict()` is what PEFT saves: the computed table alone. Loading a
    state with only `prompt_embeddings` into a projection adapter replaces the projection by that
    table (as PEFT does when it loads such an adapter); from then on the table is the parameter.
    Loading the projection's own tensors (names in PROJECTION_NAMES) keeps the projection.
    """

    def __init__(self, config: PrefixTuningConfig, base: GPT, params: dict[str, Array]) -> None:
        super().__init__(config, base, params)
        self.n_layer, self.n_head = base.config.n_layer, base.config.n_head
        self.table_shape = (config.num_virtual_tokens, 2 * base.config.n_layer * base.config.n_embd)

    @property
    def projection(self) -> bool:
        return PROMPT_EMBEDDINGS not in self.params

    def sites(self, training: bool = False) -> Sites:
        return Sites(prefix=PrefixSite(self.n_layer, self.n_head, self.projection))

    def table(self) -> Array:
        """The (NV, 2LC) prefix table this adapter computes with."""
        if not self.projection:
            return self.params[PROMPT_EMBEDDINGS]
        return prefix_projection_forward(*(self.params[n] for n in PROJECTION_NAMES))[0]

    def state_dict(self) -> dict[str, np.ndarray]:
        """What PEFT saves: {"prompt_embeddings": the table}, computed by the projection if there is one."""
        return {PROMPT_EMBEDDINGS: to_numpy(self.table()).copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) == {PROMPT_EMBEDDINGS}:
            table = to_numpy(state[PROMPT_EMBEDDINGS])
            if not np.issubdtype(table.dtype, np.floating):
                raise CheckpointError(f"adapter tensor {PROMPT_EMBEDDINGS!r} has dtype {table.dtype}; expected floats")
            if tuple(table.shape) != self.table_shape:
                raise CheckpointError(
                    f"adapter tensor {PROMPT_EMBEDDINGS!r} has shape {tuple(table.shape)}; this model needs "
                    f"{self.table_shape} (num_virtual_tokens, n_layer * 2 * n_embd)"
                )
            if not np.isfinite(table).all():
                raise CheckpointError(
                    f"adapter tensor {PROMPT_EMBEDDINGS!r} holds non-finite values (NaN or inf); not loaded"
                )
            self.params = {PROMPT_EMBEDDINGS: self.xp.asarray(table.astype(self.dtype))}
            return
        if set(state) != set(PROJECTION_NAMES) or not self.projection:
            allowed = f"[{PROMPT_EMBEDDINGS!r}]" + (f" or {list(PROJECTION_NAMES)}" if self.projection else "")
            raise CheckpointError(f"PREFIX_TUNING adapter state holds {sorted(state)}; expected {allowed}")
        super().load_state_dict(state)

    def can_merge(self) -> bool:
        return False

    def merge_error(self) -> MergeError:
        return MergeError(
            "prefix tuning cannot be merged: its prefixes are extra keys and values every attention layer "
            "attends to, not a change to any weight, so there is nothing to fold into the base model; keep the "
            "PeftModel (or save the adapter) to use them"
        )


# ------------------------------------------------------------------ the registry's entry
def _build(args: argparse.Namespace) -> PrefixTuningConfig:
    return PrefixTuningConfig(
        num_virtual_tokens=args.num_virtual_tokens,
        prefix_projection=args.prefix_projection,
        encoder_hidden_size=args.encoder_hidden_size,
        prefix_init=args.prefix_init,
        prefix_init_text=args.prefix_init_text if args.prefix_init == "TEXT" else None,
    )


def _prefix(**kw: Any) -> Any:
    """A factory of a PrefixTuningConfig with 4 virtual tokens, or what `kw` says."""
    return lambda: PrefixTuningConfig(**{"num_virtual_tokens": 4, **kw})


def _error_cases() -> list[ErrorCase]:
    return [
        ErrorCase("prefix tuning: NV + T > n_positions", lambda model: model(np.zeros((1, 10), int)), InputError,
                  ("20 positions", "n_positions=16", "at most 6 tokens"), config=_prefix(num_virtual_tokens=10)),
        ErrorCase("virtual-token adapter for another model shape", as_is, ConfigError,
                  ("token_dim=16", "base model has 8"), config=_prefix(token_dim=16)),
        ErrorCase("prefix_projection not a bool", as_is, ConfigError, ("prefix_projection", "'yes'", "True or False"),
                  config=_prefix(prefix_projection="yes")),
        ErrorCase("prefix encoder_hidden_size 0", as_is, ConfigError,
                  ("encoder_hidden_size", "got 0", "positive integer"), config=_prefix(encoder_hidden_size=0)),
        ErrorCase("prefix init_weights unknown", as_is, ConfigError, ("'ones'", "(None, 'zero')"),
                  config=_prefix(init_weights="ones")),
        ErrorCase("prefix_init unknown", as_is, ConfigError, ("prefix_init", "'WORDS'", "('RANDOM', 'TEXT')"),
                  config=_prefix(prefix_init="WORDS")),
        ErrorCase("prefix_init TEXT without text", as_is, ConfigError, ("prefix_init_text", "non-empty", "None"),
                  config=_prefix(prefix_init="TEXT")),
        ErrorCase("prefix_init TEXT and init_weights zero", as_is, ConfigError,
                  ("prefix_init='TEXT' and init_weights='zero'", "choose one"),
                  config=_prefix(prefix_init="TEXT", prefix_init_text="a", init_weights="zero")),
        ErrorCase("prefix_init_text outside the vocabulary", as_is, ConfigError, ("byte 104", "vocab_size=32"),
                  config=_prefix(prefix_init="TEXT", prefix_init_text="hello")),
        ErrorCase("prefix_init TEXT through a projection narrower than the prefix", as_is, ConfigError,
                  ("encoder_hidden_size >= num_virtual_tokens", "got 8 < 10"),
                  config=_prefix(num_virtual_tokens=10, prefix_projection=True, prefix_init="TEXT",
                                 prefix_init_text="\x01")),
        ErrorCase("merging prefix tuning", lambda model: model.merge_adapter(), MergeError,
                  ("prefix tuning cannot be merged",), config=_prefix()),
    ]  # fmt: skip


register_method(MethodSpec(
    name="prefix",
    help="prefix tuning: trainable keys/values in every layer",
    default_lr=1e-1,
    build=_build,
    example=lambda cfg: PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=5),
    flags=(
        NUM_VIRTUAL_TOKENS,
        Flag(("--prefix_projection",), {"action": "store_true", "help": "reparameterise through a tanh MLP"}),
        Flag(("--encoder_hidden_size",), {"type": int, "default": None, "help": "MLP width (default n_embd)"}),
        Flag(("--prefix_init",), {"choices": list(PREFIX_INITS), "default": "TEXT",
             "help": "initialise the keys and values from N(0,1) (PEFT's default), or as the base model's own "
             "keys and values of --prefix_init_text, which starts the model as the base reading that text; TEXT "
             "trains better and forgets far less here: see docs/experiments.md"}),
        Flag(("--prefix_init_text",), {"default": DEFAULT_INIT_TEXT, "help": "text for TEXT initialisation"}),
    ),
    golden_cases=(
        GoldenCase("prefix_tuning", "table", "the (NV, 2LC) table, 3 virtual tokens", ODD_EPS,
                   lambda: PrefixTuningConfig(num_virtual_tokens=3), Batch(2, 7), seed=19),
        GoldenCase("prefix_tuning", "table_limit", "the table; NV + T = n_positions; padded batch", SMALL,
                   lambda: PrefixTuningConfig(num_virtual_tokens=4), Batch(2, 8, "ends"), seed=20),
        GoldenCase("prefix_tuning", "projection", "prefix_projection=True, hidden size 5", ODD_EPS,
                   lambda: PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=5),
                   Batch(2, 7), seed=21),
        GoldenCase("prefix_tuning", "projection_padded", "prefix_projection=True, hidden size n_embd; padded batch",
                   SMALL, lambda: PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True),
                   Batch(3, 8, "mixed"), seed=22),
    ),
    error_cases=_error_cases,
    inert_fields={
        **SHAPE_FIELDS_INERT,
        "init_weights": "an init (N(0, 1) or zero): the vectors store the tensors, moved off it",
        "encoder_hidden_size=null": "read with prefix_projection=True only (where tinypeft fills in n_embd)",
    },
    peft_files="PEFT's PREFIX_TUNING: the (NV, 2LC) table as prompt_embeddings (with prefix_projection, the table "
    "the MLP computes, as PEFT saves it) and PEFT's adapter_config.json fields, so an adapter loads in PEFT and back",
    loads_in_peft=True,
))  # fmt: skip
