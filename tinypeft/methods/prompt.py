"""Prompt tuning (Lester et al. 2021): a trainable table of NV "virtual token" embeddings, prepended to
every sequence's token embeddings. The base model is frozen; only the (NV, C) table learns.

As PEFT does it (PeftModelForCausalLM.forward, prompt-learning branch):
- the input embeddings become concat(P, wte[ids]): (B, NV + T, C), the same table P in every row;
- the virtual tokens take positions 0..NV-1 and the real tokens shift to NV..NV+T-1 (the positions
  simply run over the longer sequence; the base model adds wpe[0 : NV + T]);
- the attention mask, if any, gets NV ones in front (virtual tokens are never padding);
- the labels get NV entries of -100 in front, so the logits have NV + T positions and the loss reads
  the last virtual position's prediction of token 0 (the base model's loss starts at token 1).
The model core does the position offset, the label padding and the length check; this file owns
the table, its initialisation and the site that prepends it.

Initialisations (PEFT's PromptTuningInit):
- RANDOM: N(0, 1) entries (torch.nn.Embedding's default);
- SAMPLE_VOCAB: NV rows of wte at ids drawn uniformly from the vocabulary;
- TEXT: the wte rows of the init text's tokens, the token list repeated until it is long enough and
  truncated to NV. The tokenizer is the base folder's own (its tokenizer.json, as PEFT tokenizes with
  the model's tokenizer), else tinypeft's UTF-8 byte tokenizer (`tinypeft.data.encode`).
PEFT casts SAMPLE_VOCAB and TEXT copies to float32; tinypeft keeps the model's dtype (an exact copy
of the rows in float64). In float32 the two are identical. See docs/prompt_tuning.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import Array, namespace, to_numpy
from ..config import shown
from ..errors import ConfigError, InputError, MergeError
from ..sites import Sites
from .base import Adapter, register
from .registry import BYTES, ODD_EPS, SMALL, Batch, ErrorCase, Flag, GoldenCase, MethodSpec, as_is, register_method
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
    from ..tokenizer import Tokenizer


PROMPT_EMBEDDINGS = "prompt_embeddings"  # the one tensor PEFT writes for prompt tuning
PROMPT_TUNING_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")
# what tinypeft writes as tokenizer_name_or_path for TEXT init: PEFT requires the field to be set for
# TEXT, though it never reads the tokenizer when it loads a saved adapter
BYTE_TOKENIZER = "tinypeft-utf8-bytes"


# ------------------------------------------------------------------ forward / backward
def prompt_forward(prompt: Array, token_embeds: Array, attention_mask: Array | None) -> tuple[Array, Array | None, int]:
    """x = concat(P, E) along the sequence, the same P for every row of the batch.

    prompt P: (NV, C); token_embeds E: (B, T, C); attention_mask: (B, T) or None.
    Returns x (B, NV + T, C), the mask with NV ones in front (or None), and the cache: NV alone
    (the backward only needs to know where to cut).
    """
    xp = namespace(prompt, token_embeds)
    B = token_embeds.shape[0]
    NV, C = prompt.shape
    prompts = xp.broadcast_to(prompt[None], (B, NV, C))  # [NV, C] -> [B, NV, C]
    x = xp.concatenate([prompts, token_embeds], axis=1)  # [B, NV + T, C]
    if attention_mask is not None:
        virtual = xp.ones((B, NV), dtype=attention_mask.dtype)  # virtual tokens are never padding
        attention_mask = xp.concatenate([virtual, attention_mask], axis=1)  # [B, NV + T]
    return x, attention_mask, NV


def prompt_backward(dx: Array, NV: int, need_dprompt: bool = True) -> tuple[Array, Array | None]:
    """(dE, dP) from dx (B, NV + T, C).

    in the forward pass this was: x = concat(broadcast_B(P), E), so the first NV positions of each row
    came from P (one table used B times: its gradient sums over the batch) and the rest from E:
        dP = sum_b dx[b, :NV]   (NV, C)        dE = dx[:, NV:]   (B, T, C)
    """
    dtoken_embeds = dx[:, NV:]  # [B, T, C]
    dprompt = dx[:, :NV].sum(axis=0) if need_dprompt else None  # [B, NV, C] -> [NV, C]
    return dtoken_embeds, dprompt


@dataclass(frozen=True)
class PromptEmbeddingSite:
    """The embedding site: prepends params[name] to the token embeddings."""

    name: str = PROMPT_EMBEDDINGS

    @property
    def param_names(self) -> tuple[str, ...]:
        return (self.name,)

    def positions(self, params: Mapping[str, Array]) -> int:
        return params[self.name].shape[0]  # NV

    def forward(
        self, params: Mapping[str, Array], inputs_embeds: Array, attention_mask: Array | None
    ) -> tuple[Array, Array | None, int]:
        return prompt_forward(params[self.name], inputs_embeds, attention_mask)

    def backward(self, dembeds: Array, cache: int, trainable: Collection[str]) -> tuple[Array, dict[str, Array]]:
        dtoken_embeds, dprompt = prompt_backward(dembeds, cache, self.name in trainable)
        return dtoken_embeds, ({} if dprompt is None else {self.name: dprompt})


# ------------------------------------------------------------------ config and adapter
@register
@dataclass
class PromptTuningConfig(VirtualTokenConfig):
    """Prompt tuning: num_virtual_tokens trainable input embeddings, prepended to every sequence.

    prompt_tuning_init: "RANDOM" (N(0, 1)), "SAMPLE_VOCAB" (rows of wte at random ids) or "TEXT"
    (rows of wte for prompt_tuning_init_text's bytes, repeated/truncated to num_virtual_tokens).
    tokenizer_name_or_path is written for PEFT's sake: the base's folder where it holds a tokenizer.json,
    which TEXT init tokenizes with, else "tinypeft-utf8-bytes" (UTF-8 bytes).
    """

    peft_type = "PROMPT_TUNING"
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)  # PEFT's enum works too
        if init not in PROMPT_TUNING_INITS:
            raise ConfigError(f"prompt_tuning_init must be one of {PROMPT_TUNING_INITS}; got {shown(init)}")
        self.prompt_tuning_init = init
        if init == "TEXT":
            check_init_text("prompt_tuning_init", "prompt_tuning_init_text", self.prompt_tuning_init_text)

    def init_token_ids(self, vocab_size: int, tokenizer: Tokenizer | None = None) -> np.ndarray:
        """TEXT init: the text's token ids (byte ids without a tokenizer), repeated then truncated to
        num_virtual_tokens (PEFT's rule)."""
        text = self.prompt_tuning_init_text
        return init_text_ids("prompt_tuning_init_text", text, self.num_virtual_tokens, vocab_size, tokenizer)

    def validate(self, base: GPT) -> None:
        super().validate(base)
        if self.prompt_tuning_init == "TEXT":
            self.init_token_ids(base.config.vocab_size, base_tokenizer(base))

    def estimated_parameters(self, base: GPT) -> int:
        return self.num_virtual_tokens * base.config.n_embd  # the table (NV, C)

    def build(self, base: GPT, seed: int = 0) -> Adapter:
        rng = np.random.default_rng(seed)
        NV, C, V = self.num_virtual_tokens, base.config.n_embd, base.config.vocab_size
        wte = to_numpy(base.params["transformer.wte.weight"])
        if self.prompt_tuning_init == "RANDOM":
            table = rng.standard_normal((NV, C))
        elif self.prompt_tuning_init == "SAMPLE_VOCAB":
            table = wte[rng.integers(0, V, size=NV)]
        else:
            table = wte[self.init_token_ids(V, base_tokenizer(base))]
        tokenizer = self.tokenizer_name_or_path
        if self.prompt_tuning_init == "TEXT" and not tokenizer:
            tokenizer = BYTE_TOKENIZER if base_tokenizer(base) is None else base.config.name_or_path
        config = self.filled(base, tokenizer_name_or_path=tokenizer)
        return PromptTuningAdapter(config, base, {PROMPT_EMBEDDINGS: base.xp.asarray(table.astype(base.config.dtype))})


class PromptTuningAdapter(Adapter):
    """One (NV, C) table, `prompt_embeddings`, at the embedding site."""

    def sites(self, training: bool = False) -> Sites:
        return Sites(embedding=PromptEmbeddingSite())

    def derived(self) -> dict[str, np.ndarray]:
        """A TEXT-initialised table: the wte rows of the text's bytes, which a port computes from the base."""
        if self.config.prompt_tuning_init != "TEXT":
            return {}
        return {PROMPT_EMBEDDINGS: to_numpy(self.params[PROMPT_EMBEDDINGS]).astype(np.float64)}

    def can_merge(self) -> bool:
        return False

    def merge_error(self) -> MergeError:
        return MergeError(
            "prompt tuning cannot be merged: its virtual tokens are extra inputs prepended to every sequence, "
            "not a change to any weight, so there is nothing to fold into the base model; keep the PeftModel "
            "(or save the adapter) to use them"
        )


# ------------------------------------------------------------------ the registry's entry
def _build(args: argparse.Namespace) -> PromptTuningConfig:
    return PromptTuningConfig(
        num_virtual_tokens=args.num_virtual_tokens,
        prompt_tuning_init=args.prompt_tuning_init,
        prompt_tuning_init_text=args.prompt_tuning_init_text,
    )


def _prompt(**kw: Any) -> Any:
    """A factory of a PromptTuningConfig with 4 virtual tokens, or what `kw` says."""
    return lambda: PromptTuningConfig(**{"num_virtual_tokens": 4, **kw})


def _error_cases() -> list[ErrorCase]:
    return [
        ErrorCase("num_virtual_tokens 0", as_is, ConfigError, ("num_virtual_tokens", "got 0", ">= 1"),
                  config=_prompt(num_virtual_tokens=0)),
        ErrorCase("num_virtual_tokens True", as_is, ConfigError, ("got True", ">= 1"),
                  config=_prompt(num_virtual_tokens=True)),
        ErrorCase("num_virtual_tokens filling n_positions", as_is, ConfigError,
                  ("num_virtual_tokens=16", "n_positions=16", "at most 15"), config=_prompt(num_virtual_tokens=16)),
        ErrorCase("prompt tuning: NV + T > n_positions", lambda model: model(np.zeros((1, 10), int)), InputError,
                  ("20 positions", "10 past/prefix/virtual + 10 tokens", "n_positions=16", "at most 6 tokens"),
                  config=_prompt(num_virtual_tokens=10)),
        ErrorCase("prompt tuning: generating past n_positions", lambda model: model.generate(np.zeros((1, 4), int), 5),
                  InputError, ("5 tokens after 14 positions", "n_positions=16"), config=_prompt(num_virtual_tokens=10)),
        ErrorCase("num_transformer_submodules 2", as_is, ConfigError,
                  ("num_transformer_submodules=2", "one transformer stack"),
                  config=_prompt(num_transformer_submodules=2)),
        ErrorCase("prompt_tuning_init unknown", as_is, ConfigError, ("'WORDS'", "'RANDOM', 'SAMPLE_VOCAB', 'TEXT'"),
                  config=_prompt(prompt_tuning_init="WORDS")),
        ErrorCase("prompt_tuning_init TEXT without text", as_is, ConfigError,
                  ("prompt_tuning_init_text", "non-empty", "None"), config=_prompt(prompt_tuning_init="TEXT")),
        ErrorCase("prompt_tuning_init_text outside the vocabulary", as_is, ConfigError, ("byte 104", "vocab_size=32"),
                  config=_prompt(prompt_tuning_init="TEXT", prompt_tuning_init_text="hello")),
        ErrorCase("merging prompt tuning", lambda model: model.merge_and_unload(), MergeError,
                  ("prompt tuning cannot be merged", "nothing to fold"), config=_prompt()),
    ]  # fmt: skip


register_method(MethodSpec(
    name="prompt",
    help="prompt tuning: --num_virtual_tokens trainable input embeddings",
    default_lr=3e-2,
    build=_build,
    example=lambda cfg: PromptTuningConfig(num_virtual_tokens=2),
    flags=(
        NUM_VIRTUAL_TOKENS,
        Flag(("--prompt_tuning_init",), {"choices": list(PROMPT_TUNING_INITS), "default": "SAMPLE_VOCAB",
             "help": "initialise from N(0,1), random vocabulary rows, or the bytes of --prompt_tuning_init_text "
             "(PEFT's default is RANDOM; vocabulary rows start the prompt at the scale of real inputs; RANDOM "
             "trains a little better at --lr 0.1 than at the default rate: see docs/experiments.md)"}),
        Flag(("--prompt_tuning_init_text",), {"default": None,
             "help": "text for TEXT initialisation (required by TEXT)"}),
    ),
    golden_cases=(
        GoldenCase("prompt_tuning", "random", "RANDOM init, 3 virtual tokens", ODD_EPS,
                   lambda: PromptTuningConfig(num_virtual_tokens=3), Batch(2, 7), perturb_adapter=False, seed=16),
        GoldenCase("prompt_tuning", "sample_vocab", "SAMPLE_VOCAB init; NV + T = n_positions; padded batch", SMALL,
                   lambda: PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"),
                   Batch(3, 8, "mixed"), perturb_adapter=False, seed=17),
        GoldenCase("prompt_tuning", "text", "TEXT init from 'Hi!' (tiled to 5 rows); NV + T = n_positions", BYTES,
                   lambda: PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                              prompt_tuning_init_text="Hi!"),
                   Batch(2, 7, "ends"), perturb_adapter=False, seed=18),
    ),
    error_cases=_error_cases,
    inert_fields={
        **SHAPE_FIELDS_INERT,
        "tokenizer_name_or_path": "written for PEFT; tinypeft tokenizes the TEXT init as UTF-8 bytes whatever it names",
        'prompt_tuning_init="RANDOM"': "a random init, as SAMPLE_VOCAB: the vectors store the table it drew",
        'prompt_tuning_init="SAMPLE_VOCAB"': "a random init, as RANDOM: the vectors store the table it drew",
        "prompt_tuning_init_text=null": "read by the TEXT init only",
    },
    peft_files="PEFT's PROMPT_TUNING: the (NV, C) table as prompt_embeddings and PEFT's adapter_config.json fields "
    "(TEXT init writes tokenizer_name_or_path, which PEFT requires and never reads on loading: the base's folder "
    "where its tokenizer.json tokenized the text, else 'tinypeft-utf8-bytes'), so an adapter loads in PEFT and back",
    loads_in_peft=True,
))  # fmt: skip
