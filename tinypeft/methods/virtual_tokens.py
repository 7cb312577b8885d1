"""What prompt tuning and prefix tuning share: a number of virtual tokens, the model-shape fields
PEFT's prompt-learning configs carry (`token_dim`, `num_layers`, `num_attention_heads`,
`num_transformer_submodules`), and the TEXT initialisations' checks and token rule.

PEFT fills those four fields from the base model when the adapter is made and writes them to
adapter_config.json; PEFT needs them to load the adapter. tinypeft does the same, on a copy of the
config that the adapter keeps (the caller's config object is not changed). A config loaded from a
file with other values was made for another model, which is an error here, not a silent reshape.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import shown
from ..errors import ConfigError
from .base import PeftConfig
from .registry import Flag

if TYPE_CHECKING:
    from ..model import GPT
    from ..tokenizer import Tokenizer

# the --num_virtual_tokens option of prompt and prefix tuning (one declaration, so the two agree)
NUM_VIRTUAL_TOKENS = Flag(("--num_virtual_tokens",), {"type": int, "default": 20, "help": "virtual tokens"})
# MethodSpec.inert_fields of both methods: the model-shape fields cannot change a number
SHAPE_FIELDS_INERT = {
    name: "the base model's shape, filled in from it: tinypeft refuses any other value"
    for name in ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules")
}


@dataclass
class VirtualTokenConfig(PeftConfig):
    """Base of PromptTuningConfig and PrefixTuningConfig (PEFT's PromptLearningConfig)."""

    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int | None = None

    def __post_init__(self) -> None:
        nv = self.num_virtual_tokens
        if isinstance(nv, bool) or not isinstance(nv, int) or nv < 1:
            raise ConfigError(f"{type(self).__name__}.num_virtual_tokens must be an integer >= 1; got {shown(nv)}")
        if self.num_transformer_submodules not in (None, 1):
            raise ConfigError(
                f"num_transformer_submodules={shown(self.num_transformer_submodules)}: a decoder-only GPT has one "
                "transformer stack (2 is for encoder-decoder models)"
            )

    def model_fields(self, base: GPT) -> dict[str, int]:
        cfg = base.config
        return {
            "token_dim": cfg.n_embd,
            "num_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_transformer_submodules": 1,
        }

    def validate(self, base: GPT) -> None:
        for name, value in self.model_fields(base).items():
            given = getattr(self, name)
            if given is not None and given != value:
                raise ConfigError(
                    f"{type(self).__name__}.{name}={shown(given)}, but the base model has {value} "
                    "(the adapter was made for another model shape)"
                )
        n_positions = base.config.n_positions
        if self.num_virtual_tokens >= n_positions:
            raise ConfigError(
                f"num_virtual_tokens={self.num_virtual_tokens} leaves no room for tokens: the virtual tokens take "
                f"positions 0..{self.num_virtual_tokens - 1} of n_positions={n_positions}; use at most "
                f"{n_positions - 1}"
            )

    def filled(self, base: GPT, **more: Any) -> VirtualTokenConfig:
        """A copy with the model-shape fields filled in, as PEFT writes them to adapter_config.json."""
        return dataclasses.replace(self, **self.model_fields(base), **more)


# ------------------------------------------------------------------ TEXT initialisation
def check_init_text(init: str, name: str, text: Any) -> None:
    """A TEXT init (config field `init`) needs its text (field `name`): non-empty, with a UTF-8 encoding."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{init}='TEXT' needs a non-empty {name}; got {shown(text)}")
    try:  # the byte tokenizer reads its UTF-8; a lone surrogate (a byte of argv that is not UTF-8) has none
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(
            f"{name} must be text, which tinypeft tokenizes as UTF-8 bytes; {text!r} holds "
            f"{text[e.start]!r} at {e.start}, which is no character (a byte of the command line that is not UTF-8)"
        ) from None


def init_text_ids(
    name: str, text: str, num_virtual_tokens: int, vocab_size: int, tokenizer: Tokenizer | None = None
) -> np.ndarray:
    """A TEXT init's tokens: the text's ids, repeated then truncated to num_virtual_tokens (PEFT's rule for
    prompt tuning). The tokenizer is the base folder's (`base_tokenizer`), as PEFT tokenizes with the
    model's; without one, tinypeft's UTF-8 byte tokenizer (`tinypeft.data.encode`)."""
    from ..data import encode

    ids = encode(text) if tokenizer is None else tokenizer.encode(text)
    if not ids.size:  # a tokenizer may read a text as no token at all
        raise ConfigError(f"{name} {text!r} is no token of {tokenizer.name}")
    too_big = ids[ids >= vocab_size]
    if too_big.size:
        raise ConfigError(
            f"{name} holds byte {int(too_big[0])}, which is no token of this model "
            f"(vocab_size={vocab_size}); the byte tokenizer needs vocab_size >= 256 for arbitrary text"
        )
    return np.tile(ids, math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]


def base_tokenizer(base: GPT) -> Tokenizer | None:
    """The tokenizer of the folder `base` was loaded from where it holds a tokenizer.json, else None (bytes)."""
    from ..tokenizer import TOKENIZER_FILE, load_tokenizer

    folder = base.config.name_or_path
    if folder is None or not os.path.lexists(os.path.join(folder, TOKENIZER_FILE)):
        return None
    return load_tokenizer(folder, base.config)
