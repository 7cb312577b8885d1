"""The named sites where a PEFT method plugs into the base model.

The base model knows no method. It knows three places where something may stand in for, or be
added to, its own computation, and it calls whatever a method puts there:

- `linear[module]`: stands in for one linear layer y = x W + b (LoRA, DoRA, IA3, adapters);
- `embedding`: edits the input embeddings before the position embeddings are added (prompt tuning);
- `prefix`: supplies keys/values that every layer's attention sees before the real tokens
  (prefix tuning).

Every site is a forward/backward pair, like the ops. A backward returns the gradient flowing on
to the model and a dict of gradients for the parameters it owns, keyed by their full names in
the flat parameter dict, computed only for names in `trainable`. A linear site's parameters are
named under its module (`...transformer.h.0.attn.c_attn.lora_A.weight`), which tells the model's
backward which block they live in.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

Array = Any
Params = Mapping[str, Array]
Grads = dict[str, Array]


class LinearSite(Protocol):
    def forward(self, params: Params, module: str, x: Array) -> tuple[Array, Any]:
        """y for the linear layer `module` (whose base weight is params[module + ".weight"])."""
        ...

    def backward(self, dy: Array, cache: Any, trainable: Collection[str], need_dx: bool) -> tuple[Array | None, Grads]:
        """(dx or None, grads) for the layer, base weight/bias grads included when trainable."""
        ...


class EmbeddingSite(Protocol):
    param_names: Collection[str]  # the parameters it owns, so the model knows the backward must reach it

    def forward(
        self, params: Params, inputs_embeds: Array, attention_mask: Array | None
    ) -> tuple[Array, Array | None, Any]:
        """(embeddings (B, T', C), attention mask (B, T') or None, cache) from the token embeddings (B, T, C)."""
        ...

    def backward(self, dembeds: Array, cache: Any, trainable: Collection[str]) -> tuple[Array, Grads]:
        """(gradient at the token embeddings (B, T, C), grads)."""
        ...


class PrefixSite(Protocol):
    param_names: Collection[str]

    def forward(self, params: Params, batch_size: int) -> tuple[list[tuple[Array, Array]], Any]:
        """Per layer, (keys, values) of shape (B, NH, P, hs), visible to every real token."""
        ...

    def backward(self, dprefix: list[tuple[Array, Array]], cache: Any, trainable: Collection[str]) -> Grads:
        """grads from the per-layer gradients of the keys and values."""
        ...


@dataclass(frozen=True)
class Sites:
    """What stands at each site. The default, empty, is the base model alone."""

    linear: Mapping[str, LinearSite] = field(default_factory=dict)
    embedding: EmbeddingSite | None = None
    prefix: PrefixSite | None = None
    # the sites draw random masks for the shapes they are given (dropout in training): the model must
    # then compute the batch whole, not in row blocks, or two blocks of one shape would share a mask
    stochastic: bool = False

    def continuation(self) -> Sites:
        """The sites for a later step of cached generation: the input-level sites (virtual tokens,
        prefixes) already sit in the key/value cache, so only the linear sites remain."""
        return Sites(linear=self.linear, stochastic=self.stochastic)


NO_SITES = Sites()
