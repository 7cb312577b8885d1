"""Selective fine-tuning: train a chosen subset of the base model's own parameters, freeze the rest.

- by name: glob patterns (`*.bias`, `transformer.h.3.*`) or a full-match regex;
- BitFit (Ben Zaken et al. 2021): every bias vector;
- LayerNorm tuning (PEFT's LN_TUNING): the weights and biases of the targeted LayerNorms;
- the last k blocks (and the final LayerNorm).

Nothing is added to the forward: a selected parameter is the same tensor in the same place. Frozen
parameters get no gradient, no optimizer state and no weight-gradient matmul (see `GPT.backward`).

Two ways to use it. On a `GPT` directly, `freeze(model)` then `unfreeze(model, patterns)` edits
`model.trainable`, and training updates the base in place (full fine-tuning of a subset). Through
`get_peft_model(base, BitFitConfig())`, the selected tensors are trained as copies, so the base stays
untouched, `disable_adapter()` gives it back, and the adapter saves as just those tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import PEFT_PREFIX, Adapter, PeftConfig, match_modules, match_parameters, register

if TYPE_CHECKING:
    from ..model import GPT


def freeze(model: GPT) -> None:
    """Mark every parameter of a GPT frozen."""
    model.trainable = set()


def unfreeze(model: GPT, patterns: Sequence[str] = (), regex: str | None = None) -> list[str]:
    """Make the parameters matching any glob pattern or the full-match regex trainable; returns them."""
    names = match_parameters(model.params, patterns, regex)
    model.trainable |= set(names)
    return names


def trainable_only(model: GPT, patterns: Sequence[str] = (), regex: str | None = None) -> list[str]:
    """freeze + unfreeze: exactly the matching parameters are trainable."""
    names = match_parameters(model.params, patterns, regex)
    model.trainable = set(names)
    return names


class SelectiveAdapter(Adapter):
    """Trained copies of selected base parameters, named `base_model.model.<base name>`."""


class SelectingConfig(PeftConfig):
    """A config that selects base parameters by `selected(base)`; builds their trainable copies."""

    def selected(self, base: GPT) -> list[str]:
        raise NotImplementedError

    def validate(self, base: GPT) -> None:
        self.selected(base)

    def adapter_name(self, base_name: str) -> str:
        """The name of the trained copy of a base parameter (in the saved file and the gradients)."""
        return PEFT_PREFIX + base_name

    def build(self, base: GPT, seed: int = 0) -> Adapter:
        overrides = {n: self.adapter_name(n) for n in self.selected(base)}
        params = {name: base.params[n].copy() for n, name in overrides.items()}
        return SelectiveAdapter(self, base, params, overrides=overrides)


@register
@dataclass
class SelectiveConfig(SelectingConfig):
    """Train the base parameters whose names match `patterns` (globs) or `regex` (full match)."""

    peft_type = "SELECTIVE"
    patterns: list[str] = field(default_factory=list)
    regex: str | None = None

    def selected(self, base: GPT) -> list[str]:
        if not self.patterns and self.regex is None:
            raise ConfigError("SelectiveConfig needs patterns or a regex naming the parameters to train")
        return match_parameters(base.params, self.patterns, self.regex)


@register
@dataclass
class BitFitConfig(SelectingConfig):
    """BitFit: train every bias, nothing else."""

    peft_type = "BITFIT"

    def selected(self, base: GPT) -> list[str]:
        return match_parameters(base.params, ["*.bias"])


@register
@dataclass
class LNTuningConfig(SelectingConfig):
    """LayerNorm tuning: train the weight and bias of the LayerNorms matched by target_modules
    (PEFT's matching; its GPT-2 default is ln_1, ln_2 and ln_f). Saved under PEFT's names, so an
    adapter written here loads in PEFT's LN tuning and back."""

    peft_type = "LN_TUNING"
    target_modules: list[str] | str = field(default_factory=lambda: ["ln_1", "ln_2", "ln_f"])

    def adapter_name(self, base_name: str) -> str:
        """PEFT's name for the trained copy: `...ln_1.ln_tuning_layers.weight`, so files interchange."""
        module, leaf = base_name.rsplit(".", 1)
        return f"{PEFT_PREFIX}{module}.ln_tuning_layers.{leaf}"

    def selected(self, base: GPT) -> list[str]:
        layernorms = sorted({n.rsplit(".", 1)[0] for n in base.params if ".ln_" in n})
        modules = set(match_modules(layernorms, self.target_modules))
        return [n for n in base.params if n.rsplit(".", 1)[0] in modules]


@register
@dataclass
class LastBlocksConfig(SelectingConfig):
    """Train the last `num_blocks` transformer blocks whole, plus the final LayerNorm."""

    peft_type = "LAST_BLOCKS"
    num_blocks: int = 1

    def selected(self, base: GPT) -> list[str]:
        n_layer = base.config.n_layer
        k = self.num_blocks
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_layer:
            raise ConfigError(f"LastBlocksConfig.num_blocks must be an integer in 1..n_layer={n_layer}; got {k!r}")
        prefixes = (*(f"transformer.h.{i}." for i in range(n_layer - k, n_layer)), "transformer.ln_f.")
        return [n for n in base.params if n.startswith(prefixes)]
