"""LoRA on the token embedding (LoraConfig with "wte" among target_modules), and LoRA's
`trainable_token_indices`: the two ways a LoraConfig reaches GPT-2's token table, wte (V, C).

LoRA on wte adds a rank-r update to the lookup only, in PEFT's shapes A: (r, V) and B: (C, r):

    embeds = W[ids] + s · Aᵀ[ids] Bᵀ                 (B, T, C);  s = lora_alpha / r (rsLoRA: / √r)

so the lookup reads the table W + s (B A)ᵀ. GPT-2's head is tied to wte, but PEFT's LoRA wraps the
embedding module, not the weight: the unmerged head still multiplies by the base W. Merging writes
W + s (B A)ᵀ into wte, which the tied head then reads too, so a merged model's logits differ from the
unmerged adapter's (the head changes): PEFT's merge does exactly the same, and tests pin both facts.
There is no dropout on this path (PEFT applies none to embeddings) and the init is the reverse of a
linear layer's: A = 0 and B ~ N(0, 1) (init_lora_weights True or "gaussian"), both N(0, 1) for False.

`trainable_token_indices` trains rows of wte as TrainableTokensConfig does (trainable_tokens.py): the
head reads the same rows. PEFT saves Δ as `wte.token_adapter.trainable_tokens_delta`, once.

The two cannot be combined on one adapter (PEFT has no order for them either); docs/lora.md derives
the backward.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import Array, namespace
from ..config import shown
from ..errors import ConfigError
from ..ops import embedding_backward, embedding_forward
from ..sites import HeadGradient, TokenSite
from .base import PEFT_PREFIX, match_modules
from .registry import ErrorCase, as_is
from .token_table import (
    TOKEN_TABLE,
    WTE,
    TrainableTokensSite,
    check_token_indices,
    check_token_range,
    initial_delta,
    token_source,
    trainable_tokens_table,
)

if TYPE_CHECKING:
    from ..model import GPT

EMBEDDING_A = f"{PEFT_PREFIX}transformer.wte.lora_embedding_A"
EMBEDDING_B = f"{PEFT_PREFIX}transformer.wte.lora_embedding_B"
TOKEN_DELTA = f"{PEFT_PREFIX}transformer.wte.token_adapter.trainable_tokens_delta"
MERGE_MOVES_THE_HEAD = (
    "LoRA on wte changes the lookup only, but merging writes W + s (B A)ᵀ into wte, which GPT-2's tied head reads "
    "too: the merged model's logits differ from the adapter's (as PEFT's merge_and_unload does)"
)


# ===================================================================== the math
def embedding_lora_forward(
    weight: Array, lora_A: Array, lora_B: Array, scaling: float, ids: Array
) -> tuple[Array, tuple]:
    """embeds = W[ids] + s · Aᵀ[ids] Bᵀ:  weight (V, C), A (r, V), B (C, r), ids (B, T) -> (B, T, C).

    Aᵀ[ids] is a lookup in the (V, r) table Aᵀ (PEFT's F.embedding(ids, Aᵀ)), h (N, r). Cache: the ids'
    lookup, h, B and s; W is frozen and not needed."""
    x, lookup = embedding_forward(weight, ids)  # [B, T] -> [B, T, C]
    h, _ = embedding_forward(lora_A.T, ids)  # [B, T] -> [B, T, r]
    embeds = x + scaling * (h @ lora_B.T)  # [B, T, C] + s [B, T, r] @ [r, C]
    return embeds, (lookup, h, lora_B, scaling)


def embedding_lora_backward(dembeds: Array, cache: tuple) -> tuple[Array, Array]:
    """(dA (r, V), dB (C, r)) for embeds = W[ids] + s · h Bᵀ with h = Aᵀ[ids]:

        dB   = s · dembedsᵀ h                      (C, r)
        dh   = s · dembeds B                       (N, r)
        dAᵀ  = scatter_add(ids, dh)                (V, r): an id repeated in the batch adds every
                                                   occurrence; ids never seen get 0
        dA   = (dAᵀ)ᵀ                              (r, V)

    The head reads the base W, so nothing flows to A or B from it; W is frozen.
    """
    lookup, h, lora_B, scaling = cache
    r = h.shape[-1]
    C = dembeds.shape[-1]
    d2, h2 = dembeds.reshape(-1, C), h.reshape(-1, r)  # [N, C], [N, r]
    # in the forward this was: embeds = W[ids] + s (Aᵀ[ids]) Bᵀ, so:
    dB = scaling * (d2.T @ h2)  # [C, N] @ [N, r] -> [C, r]
    dh = scaling * (d2 @ lora_B)  # [N, C] @ [C, r] -> [N, r]
    dA = embedding_backward(dh, lookup).T  # scatter-add [N, r] -> [V, r], then [r, V]
    return dA, dB


def embedding_lora_merged_weight(weight: Array, lora_A: Array, lora_B: Array, scaling: float) -> Array:
    """W + s (B A)ᵀ: (V, C), the table a merged model looks up and (tied) multiplies its head by."""
    return weight + scaling * (lora_A.T @ lora_B.T)  # [V, C] + s [V, r] @ [r, C]: (B A)ᵀ formed in W's layout


# ===================================================================== the config's fields
def lora_token_indices(value: Any) -> list[int] | None:
    """LoraConfig.trainable_token_indices as a list of ids: PEFT's list, or a dict {module: ids} whose one
    key must name the token table ("wte" or "transformer.wte")."""
    if value is None:
        return None
    what = "LoraConfig.trainable_token_indices"
    if isinstance(value, Mapping):
        if len(value) != 1:
            raise ConfigError(f"{what} as a dict maps the embedding to its ids; GPT-2 has one, wte; got {shown(value)}")
        ((module, ids),) = value.items()
        match_modules([TOKEN_TABLE], [module], f"{what} key")
        return check_token_indices(ids, f"{what}[{module!r}]")
    return check_token_indices(value, what)


def check_token_table(config: Any, base: GPT, adapts_wte: bool) -> None:
    """Refuse what LoRA cannot do on the token table, before anything is built."""
    indices = lora_token_indices(config.trainable_token_indices)
    V, C = base.config.vocab_size, base.config.n_embd
    if indices is not None:
        check_token_range(indices, V, "LoraConfig.trainable_token_indices")
        if adapts_wte:
            raise ConfigError(
                "LoraConfig targets wte and trains rows of it (trainable_token_indices): give one or the other; "
                "both on one table have no defined order"
            )
    if not adapts_wte:
        return
    if config.use_dora or config.init_lora_weights not in (True, False, "gaussian"):
        what = "use_dora=True" if config.use_dora else f"init_lora_weights={shown(config.init_lora_weights)}"
        raise ConfigError(f"LoRA on wte (the token embedding) is plain LoRA; {what} applies to the linear layers only")
    if config.r > min(V, C):
        raise ConfigError(
            f"LoraConfig.r={shown(config.r)} exceeds min(V, C) = min({V}, {C}) of transformer.wte: a rank-r update "
            f"of the table cannot have rank above {min(V, C)}; use r <= {min(V, C)}"
        )


def token_table_parameters(config: Any, base: GPT, adapts_wte: bool) -> int:
    """How many numbers `token_table_tensors` makes: Δ (n, C), or A (r, V) and B (C, r)."""
    indices = lora_token_indices(config.trainable_token_indices)
    if indices is not None:
        return len(indices) * base.config.n_embd
    return adapts_wte * config.r * (base.config.vocab_size + base.config.n_embd)


# ===================================================================== building, the site, the merge
def token_table_tensors(config: Any, base: GPT, adapts_wte: bool, rng: np.random.Generator) -> dict[str, Array]:
    """The tensors LoRA adds on wte, drawn first (wte comes first in the model): A = 0, B ~ N(0, 1) (True or
    "gaussian"), both N(0, 1) (False); or Δ = W[idx] for trainable_token_indices."""
    indices = lora_token_indices(config.trainable_token_indices)
    if indices is not None:
        return {TOKEN_DELTA: initial_delta(base, indices, True, rng)}
    if not adapts_wte:
        return {}
    V, C, r, xp, dtype = base.config.vocab_size, base.config.n_embd, config.r, base.xp, base.config.dtype
    A = rng.standard_normal((r, V)) if config.init_lora_weights is False else np.zeros((r, V))
    B = rng.standard_normal((C, r))
    return {EMBEDDING_A: xp.asarray(A.astype(dtype)), EMBEDDING_B: xp.asarray(B.astype(dtype))}


def token_table_site(config: Any, params: Mapping[str, Array]) -> TokenSite | None:
    """What stands at the tokens site for these tensors (None: LoRA leaves wte alone)."""
    if TOKEN_DELTA in params:
        return TrainableTokensSite(TOKEN_DELTA, lora_token_indices(config.trainable_token_indices))
    if EMBEDDING_A in params:
        return EmbeddingLoraSite(config.scaling)
    return None


def merge_token_table(config: Any, params: Mapping[str, Array], base_params: dict[str, Array]) -> None:
    """wte <- W + s (B A)ᵀ (the tied head changes with it, as in PEFT), or W.index_copy(idx, Δ)."""
    W = base_params[WTE]
    if TOKEN_DELTA in params:
        indices = lora_token_indices(config.trainable_token_indices)
        source = namespace(W).asarray(token_source(W.shape[0], indices))
        base_params[WTE] = trainable_tokens_table(W, params[TOKEN_DELTA], source)
    elif EMBEDDING_A in params:
        base_params[WTE] = embedding_lora_merged_weight(W, params[EMBEDDING_A], params[EMBEDDING_B], config.scaling)


class EmbeddingLoraSite:
    """The token table with LoRA's update on the lookup: embeds = W[ids] + s Aᵀ[ids] Bᵀ; the tied head
    reads the base W."""

    param_names = (EMBEDDING_A, EMBEDDING_B, WTE)

    def __init__(self, scaling: float) -> None:
        self.scaling = scaling

    def forward(self, params: Mapping[str, Array], input_ids: Array) -> tuple[Array, Array, tuple]:
        W = params[WTE]
        embeds, cache = embedding_lora_forward(W, params[EMBEDDING_A], params[EMBEDDING_B], self.scaling, input_ids)
        return embeds, W, cache

    def backward(
        self, dembeds: Array, head: HeadGradient, cache: tuple, trainable: Collection[str]
    ) -> dict[str, Array]:
        if WTE in trainable:
            raise ConfigError(f"{WTE} is trainable, but LoRA keeps the base weight frozen")
        if EMBEDDING_A not in trainable and EMBEDDING_B not in trainable:
            return {}
        dA, dB = embedding_lora_backward(dembeds, cache)
        return {name: g for name, g in ((EMBEDDING_A, dA), (EMBEDDING_B, dB)) if name in trainable}


def token_table_error_cases(lora_config: Any) -> list[ErrorCase]:
    """LoRA's error cases on the token table (lora.py lists them with its own); `lora_config` is LoraConfig."""

    def refused(when: str, config: Any, says: tuple[str, ...]) -> ErrorCase:
        return ErrorCase(when, as_is, ConfigError, says, config=config)

    LoraConfig = lora_config
    return [
        refused("LoRA on wte and trainable tokens at once",
                lambda: LoraConfig(target_modules=["wte"], trainable_token_indices=[1]),
                ("targets wte and trains rows of it", "one or the other")),
        refused("LoRA on wte with DoRA", lambda: LoraConfig(target_modules=["wte", "c_attn"], use_dora=True),
                ("LoRA on wte", "use_dora=True", "linear layers only")),
        refused("LoRA trainable_token_indices out of range", lambda: LoraConfig(trainable_token_indices=[0, 40]),
                ("trainable_token_indices", "token id 40", "0..31")),
        refused("LoRA trainable_token_indices repeated", lambda: LoraConfig(trainable_token_indices=[2, 2]),
                ("token 2 more than once",)),
        refused("LoRA trainable_token_indices for another module",
                lambda: LoraConfig(trainable_token_indices={"lm_head": [2]}),
                ("'lm_head'", "matches no module", "transformer.wte")),
    ]  # fmt: skip
