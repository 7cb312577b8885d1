"""Trainable tokens (PEFT's TrainableTokensConfig): a few rows of the token-embedding table train, the
rest stay frozen.

The rows idx = token_indices (n of them, in the order given) are stood in for by a trainable
Δ: (n, C), initialised to a copy of W[idx] (so the adapter starts as the identity). The model computes
with the table

    W' = W.index_copy(idx, Δ):   W'[v] = Δ_j if v = idx_j, else W[v]          (V, C)

and GPT-2's head is tied to the table, so both the lookup W'[ids] and the head ln_f(x) W'ᵀ read W'.
A new token's embedding and its output row therefore train together, as in PEFT, where the tied
lm_head wraps the same Δ.

The math and the site are in token_table.py, which LoRA's `trainable_token_indices` shares (PEFT saves
that Δ under `wte.token_adapter.trainable_tokens_delta`). `docs/trainable_tokens.md` derives the
backward and lists the differences from PEFT.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import Array, to_numpy
from ..config import shown
from ..errors import CheckpointError, ConfigError
from ..sites import Sites
from .base import PEFT_PREFIX, Adapter, PeftConfig, match_modules, register
from .registry import ODD_EPS, SMALL, Batch, ErrorCase, Flag, GoldenCase, MethodSpec, as_is, register_method
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

DELTA = f"{PEFT_PREFIX}transformer.wte.trainable_tokens_delta"
# PEFT wraps the tied lm_head too, sharing Δ, and saves it a second time under the head's name
TIED_DELTA = f"{PEFT_PREFIX}lm_head.trainable_tokens_delta"


@register
@dataclass
class TrainableTokensConfig(PeftConfig):
    """PEFT's TrainableTokensConfig: token_indices, the rows of wte that train (each once, in the order
    their Δ rows are saved); target_modules: the embedding to target, None (the input embedding) or
    "wte", which is all GPT-2 has; init_weights: True starts Δ at W[idx] (the identity), False at
    N(0, 1) draws (used by tests)."""

    peft_type = "TRAINABLE_TOKENS"
    token_indices: list[int] | None = None
    target_modules: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        self.token_indices = check_token_indices(self.token_indices, "TrainableTokensConfig.token_indices")
        if not isinstance(self.init_weights, bool):
            got = shown(self.init_weights)
            raise ConfigError(f"TrainableTokensConfig.init_weights must be True or False; got {got}")
        if self.target_modules is None:
            self.target_modules = ["wte"]
        elif isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)

    def validate(self, base: GPT) -> None:
        match_modules([TOKEN_TABLE], self.target_modules)
        check_token_range(self.token_indices, base.config.vocab_size, "TrainableTokensConfig.token_indices")

    def estimated_parameters(self, base: GPT) -> int:
        return len(self.token_indices) * base.config.n_embd  # Δ (n, C)

    def build(self, base: GPT, seed: int = 0) -> TrainableTokensAdapter:
        delta = initial_delta(base, self.token_indices, self.init_weights, np.random.default_rng(seed))
        return TrainableTokensAdapter(self, base, {DELTA: delta})


# ===================================================================== adapter
class TrainableTokensAdapter(Adapter):
    """Δ, one (n, C) tensor, at the tokens site. Saved as PEFT saves it: under the embedding's name and,
    again, the tied head's."""

    def sites(self, training: bool = False) -> Sites:
        return Sites(tokens=TrainableTokensSite(DELTA, self.config.token_indices))

    def merge(self, base_params: dict[str, Array]) -> None:
        """W <- W.index_copy(idx, Δ): the head reads the same table, so the merged model computes exactly
        what the adapter did."""
        source = token_source(base_params[WTE].shape[0], self.config.token_indices)
        base_params[WTE] = trainable_tokens_table(base_params[WTE], self.params[DELTA], self.xp.asarray(source))

    def unmerge(self, base_params: dict[str, Array], originals: Mapping[str, Array]) -> None:
        base_params[WTE] = originals[WTE]

    def state_dict(self) -> dict[str, np.ndarray]:
        state = super().state_dict()
        return state | {TIED_DELTA: state[DELTA].copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Δ from a file, which may hold the tied head's copy too (PEFT writes it): it must then equal
        the embedding's, the one tensor both read."""
        if isinstance(state, Mapping) and TIED_DELTA in state and DELTA in state:
            tied, own = to_numpy(state[TIED_DELTA]), to_numpy(state[DELTA])
            if tied.shape != own.shape or not np.array_equal(tied, own):
                raise CheckpointError(
                    f"{TIED_DELTA} differs from {DELTA}; the tied head reads the embedding's Δ, so the two must be "
                    "equal (PEFT saves one tensor twice)"
                )
            state = {k: v for k, v in state.items() if k != TIED_DELTA}
        super().load_state_dict(state)


# ===================================================================== the registry's entry
def _build(args: argparse.Namespace) -> TrainableTokensConfig:
    if not args.token_indices:
        raise ConfigError(
            "--method trainable_tokens trains the rows of wte that --token_indices names; give at least one id"
        )
    return TrainableTokensConfig(token_indices=list(args.token_indices))


def _tokens(**kw: Any) -> Any:
    """A factory of a TrainableTokensConfig training tokens 3 and 5, or what `kw` says."""
    return lambda: TrainableTokensConfig(**{"token_indices": [3, 5], **kw})


def _error_cases() -> list[ErrorCase]:
    def refused(when: str, config: Any, says: tuple[str, ...]) -> ErrorCase:
        return ErrorCase(when, as_is, ConfigError, says, config=config)

    return [
        refused("trainable tokens: no token_indices", _tokens(token_indices=[]),
                ("token_indices", "non-empty list of token ids", "[]")),
        refused("trainable tokens: a token id out of range", _tokens(token_indices=[3, 32]),
                ("token id 32", "outside the vocabulary", "0..31")),
        refused("trainable tokens: a negative token id", _tokens(token_indices=[-1]),
                ("non-negative integer token ids", "-1")),
        refused("trainable tokens: a token id twice", _tokens(token_indices=[3, 5, 3]),
                ("token 3 more than once", "may appear once")),
        refused("trainable tokens: a target that is not the embedding", _tokens(target_modules=["c_attn"]),
                ("'c_attn'", "matches no module", "transformer.wte")),
    ]  # fmt: skip


register_method(MethodSpec(
    name="trainable_tokens",
    help="the rows of wte that --token_indices names (and the tied head's)",
    default_lr=1e-2,
    build=_build,
    example=lambda cfg: TrainableTokensConfig(token_indices=[1, 0, cfg.vocab_size - 1], init_weights=False),
    flags=(
        Flag(("--token_indices",), {"nargs": "+", "type": int, "default": None, "metavar": "ID",
             "help": "token ids whose embeddings train (required)"}),
    ),
    golden_cases=(
        GoldenCase("trainable_tokens", "odd", "tokens 4, 0 and 18 (the last id), in that order", ODD_EPS,
                   _tokens(token_indices=[4, 0, 18]), Batch(2, 7), seed=60),
        GoldenCase("trainable_tokens", "padded", "tokens 7, 2 and 9 (9 read in the left-padded row); padded batch",
                   SMALL, _tokens(token_indices=[7, 2, 9]), Batch(3, 8, "mixed"), seed=61),
    ),
    error_cases=_error_cases,
    inert_fields={
        "init_weights": "an init: the vectors store the tensor it made",
        "target_modules": "GPT-2 has one token table, wte: every accepted value targets it",
    },
    peft_files="PEFT's TRAINABLE_TOKENS: base_model.model.transformer.wte.trainable_tokens_delta (n, C), and the "
    "tied head's copy of it, base_model.model.lm_head.trainable_tokens_delta, so an adapter loads in PEFT and back",
    loads_in_peft=True,
))  # fmt: skip
