"""The named sites where a PEFT method plugs into the base model.

The base model knows no method. It knows four places where something may stand in for, or be
added to, its own computation, and it calls whatever a method puts there:

- `tokens`: stands in for the token-embedding table wte, which both the lookup wte[ids] and the tied
  head ln_f(x) wteᵀ read (trainable tokens, LoRA on wte);
- `linear[module]`: stands in for one linear layer y = x W + b (LoRA, DoRA, IA3, adapters);
- `embedding`: edits the input embeddings before the position embeddings are added (prompt tuning);
- `prefix`: supplies keys/values that every layer's attention sees before the real tokens, as a
  KV cache's past does (prefix tuning; the engine's cached generation uses the same door).

Beside the sites, `loss_terms`: terms a method adds to the training objective that depend on its
tensors alone, not on the batch (AdaLoRA's orthogonality regulariser). Each is a forward/backward pair
over the parameters; `loss_and_grad` (and the gradient checks) include them, `loss()` (evaluation:
nats per token, comparable across methods) does not.

Every site is a forward/backward pair, like the ops. A backward returns the gradient flowing on
to the model and a dict of gradients for the parameters it owns, keyed by their full names in
the flat parameter dict, computed only for names in `trainable`.

A site also says which parameters it owns: a linear site per module, the tokens, embedding and
prefix sites for themselves. The engine places each owned parameter where the site sits (`Location`),
and from the lowest trainable location derives how far down the backward must go; nothing is
inferred from how a parameter is named.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from .backend import Array

Params = Mapping[str, Array]
Grads = dict[str, Array]

# a block's computations in forward order; a linear site sits at one of the four linear stages
BLOCK_STAGES = ("ln_1", "attn.c_attn", "attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")


class Location(NamedTuple):
    """Where in the forward a parameter is first used: `layer` -1 is the input embeddings, 0..L-1
    a block (at `stage`, one of BLOCK_STAGES), L the final LayerNorm and the head. Locations sort
    in forward order, so the lowest trainable one is where the backward may stop."""

    layer: int
    stage: str = ""

    def __lt__(self, other: tuple) -> bool:  # type: ignore[override]
        return _order(self) < _order(other)


def _order(loc: tuple) -> tuple[int, int]:
    layer, stage = loc
    return layer, BLOCK_STAGES.index(stage) if stage in BLOCK_STAGES else -1


EMBEDDING_LOCATION = Location(-1, "embedding")


class LinearSite(Protocol):
    def forward(self, params: Params, module: str, x: Array) -> tuple[Array, Any]:
        """y for the linear layer `module` (whose base weight is params[module + ".weight"])."""
        ...

    def backward(
        self, dy: Array, cache: Any, trainable: Collection[str], need_dx: bool = True
    ) -> tuple[Array | None, Grads]:
        """(dx or None, grads) for the layer, base weight/bias grads included when trainable."""
        ...

    def owned(self, module: str) -> Collection[str]:
        """The parameters this site computes gradients for at `module` (its own tensors, and any
        base weight or bias it stands in for)."""
        ...


class HeadGradient(NamedTuple):
    """What the tied head's share of a token-table gradient is made of: the head computed
    logits = x W_headᵀ, so dW_head = dlogitsᵀ x, (V, C). A site forms only the rows it needs
    (`rows`), or all of them (`full`), or none (a head that reads a frozen table)."""

    dlogits: Array  # [N, V]
    x: Array  # [N, C]: ln_f's output, which the head multiplied

    def full(self) -> Array:
        return self.dlogits.T @ self.x  # [V, N] @ [N, C] -> [V, C]

    def rows(self, idx: Array) -> Array:
        return self.dlogits[:, idx].T @ self.x  # [n, N] @ [N, C] -> [n, C]


class TokenSite(Protocol):
    """Stands in for the token-embedding table: the embeddings of the ids and the weight the tied head
    multiplies by. The base's own (`gpt.BaseTokens`) gives wte[ids] and wte itself."""

    param_names: Collection[str]  # the parameters it owns (wte included): they sit at EMBEDDING_LOCATION

    def forward(self, params: Params, input_ids: Array) -> tuple[Array, Array, Any]:
        """(token embeddings (B, T, C), the head's weight (V, C), cache)."""
        ...

    def backward(self, dembeds: Array, head: HeadGradient, cache: Any, trainable: Collection[str]) -> Grads:
        """grads from the gradient at the token embeddings (B, T, C) and the head's (`HeadGradient`)."""
        ...


class EmbeddingSite(Protocol):
    param_names: Collection[str]  # the parameters it owns: they sit at EMBEDDING_LOCATION

    def positions(self, params: Params) -> int:
        """How many positions it puts in front of the tokens (they take the first positions, and
        have no label)."""
        ...

    def forward(
        self, params: Params, inputs_embeds: Array, attention_mask: Array | None
    ) -> tuple[Array, Array | None, Any]:
        """(embeddings (B, T', C), attention mask (B, T') or None, cache) from the token embeddings (B, T, C)."""
        ...

    def backward(self, dembeds: Array, cache: Any, trainable: Collection[str]) -> tuple[Array, Grads]:
        """(gradient at the token embeddings (B, T, C), grads)."""
        ...


class PrefixSite(Protocol):
    param_names: Collection[str]  # the parameters it owns: every block's attention reads them

    def positions(self, params: Params) -> int:
        """P, the keys/values it puts in front of the tokens in every layer."""
        ...

    def forward(self, params: Params, batch_size: int) -> tuple[list[tuple[Array, Array]], Any]:
        """Per layer, (keys, values) of shape (B, NH, P, hs), visible to every real token."""
        ...

    def backward(self, dprefix: list[tuple[Array, Array]], cache: Any, trainable: Collection[str]) -> Grads:
        """grads from the per-layer gradients of the keys and values."""
        ...


class LossTerm(Protocol):
    def forward(self, params: Params) -> tuple[Any, Any]:
        """(value, a scalar array, cache): added once to the batch's mean loss."""
        ...

    def backward(self, cache: Any, trainable: Collection[str]) -> Grads:
        """The value's gradient for the names in `trainable` (the loss's weight on it is 1)."""
        ...


@dataclass(frozen=True)
class Sites:
    """What stands at each site. The default, empty, is the base model alone."""

    linear: Mapping[str, LinearSite] = field(default_factory=dict)
    tokens: TokenSite | None = None
    embedding: EmbeddingSite | None = None
    prefix: PrefixSite | None = None
    # the sites draw random masks for the shapes they are given (dropout in training): the engine must
    # then compute the batch whole, not in row blocks, or two blocks of one shape would share a mask
    stochastic: bool = False
    loss_terms: tuple[LossTerm, ...] = ()

    def owned(self, module_location: Mapping[str, Location]) -> dict[str, Location]:
        """Every parameter a site owns, at the location of the site that owns it."""
        where: dict[str, Location] = {}
        for module, site in self.linear.items():
            where |= dict.fromkeys(site.owned(module), module_location[module])
        if self.prefix is not None:
            where |= dict.fromkeys(self.prefix.param_names, Location(0, "attn"))  # block 0 reads it first
        for site in (self.tokens, self.embedding):
            if site is not None:
                where |= dict.fromkeys(site.param_names, EMBEDDING_LOCATION)
        return where


NO_SITES = Sites()
