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

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..config import shown
from ..errors import CheckpointError, ConfigError
from .base import PEFT_PREFIX, Adapter, PeftConfig, match_modules, match_parameters, register
from .registry import ODD_EPS, SMALL, Batch, ErrorCase, Flag, GoldenCase, MethodSpec, as_is, register_method

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

    def estimated_parameters(self, base: GPT) -> int:
        return sum(int(base.params[n].size) for n in self.selected(base))  # a copy of each selected one

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
            raise ConfigError(f"LastBlocksConfig.num_blocks must be an integer in 1..n_layer={n_layer}; got {shown(k)}")
        prefixes = (*(f"transformer.h.{i}." for i in range(n_layer - k, n_layer)), "transformer.ln_f.")
        return [n for n in base.params if n.startswith(prefixes)]


# ------------------------------------------------------------------ the registry's entries
def _selective(args: argparse.Namespace) -> SelectiveConfig:
    if not args.trainable:
        raise ConfigError("--method selective needs --trainable PATTERN [PATTERN ...] (globs over parameter names)")
    return SelectiveConfig(patterns=args.trainable)


def _selective_errors() -> list[ErrorCase]:
    return [
        ErrorCase("selective pattern matching nothing", as_is, ConfigError,
                  ("'*.nothing'", "names look like", "transformer.wte.weight"),
                  config=lambda: SelectiveConfig(["*.nothing"])),
        ErrorCase("selective patterns not a list", as_is, ConfigError, ("'*.bias'", "list of glob strings"),
                  config=lambda: SelectiveConfig("*.bias")),
        ErrorCase("selective pattern not a string", as_is, ConfigError, ("5", "non-empty glob strings"),
                  config=lambda: SelectiveConfig([5])),
        ErrorCase("selective regex invalid", as_is, ConfigError, ("'('", "not a valid regular expression"),
                  config=lambda: SelectiveConfig(regex="(")),
        ErrorCase("selective regex not a string", as_is, ConfigError, ("5", "regex must be a string"),
                  config=lambda: SelectiveConfig(regex=5)),
        ErrorCase("selective regex matching nothing", as_is, ConfigError,
                  ("'x'", "matches no parameter", "names look like"), config=lambda: SelectiveConfig(regex="x")),
        ErrorCase("selective with nothing selected", as_is, ConfigError, ("patterns or a regex",),
                  config=SelectiveConfig),
        ErrorCase("unfreeze with an invalid regex", lambda base: unfreeze(base, regex="[a"), ConfigError,
                  ("'[a'", "not a valid regular expression")),
        ErrorCase("finetune --method selective without --trainable",
                  lambda base: _selective(argparse.Namespace(trainable=None)), ConfigError, ("--trainable",)),
    ]  # fmt: skip


def _ln_tuning_errors() -> list[ErrorCase]:
    return [
        ErrorCase("LN tuning target that does not exist", as_is, ConfigError,
                  ("'ln_3'", "matches no module", "'ln_1'", "'ln_2'", "'transformer.ln_f'"),
                  config=lambda: LNTuningConfig(target_modules=["ln_3"])),
        ErrorCase("LN tuning targets empty", as_is, ConfigError, ("[]", "non-empty list"),
                  config=lambda: LNTuningConfig(target_modules=[])),
        ErrorCase("LN tuning target regex matching nothing", as_is, ConfigError,
                  ("'attn.*'", "matches no module", "'ln_1'"), config=lambda: LNTuningConfig(target_modules="attn.*")),
    ]  # fmt: skip


def _last_blocks_errors() -> list[ErrorCase]:
    return [
        ErrorCase("last_blocks num_blocks 0", as_is, ConfigError, ("num_blocks", "0", "1..n_layer=2"),
                  config=lambda: LastBlocksConfig(num_blocks=0)),
        ErrorCase("last_blocks num_blocks > n_layer", as_is, ConfigError, ("num_blocks", "3", "1..n_layer=2"),
                  config=lambda: LastBlocksConfig(num_blocks=3)),
    ]  # fmt: skip


def _other_shape(base: GPT) -> dict[str, np.ndarray]:
    """The base's state dict with one weight of another width: what a full fine-tune of another model holds."""
    return {**base.state_dict(), "transformer.h.0.attn.c_attn.weight": np.zeros((8, 12), np.float32)}


NO_PEFT = "PEFT has no such method: "
MERGE = (
    "; `PeftModel.save_changed_tensors` writes the retrained tensors under GPT-2's names, which transformers' "
    "`load_state_dict(..., strict=False)` takes, and `tinypeft merge` folds them into a plain GPT-2 folder"
)

register_method(MethodSpec(
    name="full", help="full fine-tuning: every parameter", default_lr=3e-4,
    build=lambda args: None, example=lambda cfg: None,
    golden_cases=(
        GoldenCase("full", "odd", "every parameter trains; odd sizes, n_inner 13, eps 1e-6", ODD_EPS, lambda: None,
                   Batch(2, 7)),
        GoldenCase("full", "padded", "every parameter trains; T = n_positions; a left-padded row", SMALL,
                   lambda: None, Batch(3, 12, "mixed"), seed=1),
    ),
    error_cases=lambda: [
        ErrorCase("full fine-tuning: weights of another model shape loaded", lambda base: base.load_state_dict(
            _other_shape(base)), CheckpointError, ("'transformer.h.0.attn.c_attn.weight'", "(8, 12)", "(8, 24)")),
    ],
    peft_files="no adapter: finetune trains the base itself and writes OUT/model, a GPT-2 folder (config.json, "
    "model.safetensors) that transformers' GPT2LMHeadModel loads; PEFT is not involved",
))  # fmt: skip
register_method(MethodSpec(
    name="bitfit", help="BitFit: only the bias vectors", default_lr=3e-3,
    build=lambda args: BitFitConfig(), example=lambda cfg: BitFitConfig(),
    golden_cases=(
        GoldenCase("bitfit", "odd", "every bias trains", ODD_EPS, BitFitConfig, Batch(2, 7), seed=2),
        GoldenCase("bitfit", "padded", "every bias trains; padded batch", SMALL, BitFitConfig, Batch(3, 8, "mixed"),
                   seed=3),
    ),
    error_cases=lambda: [
        ErrorCase("BitFit state dict without its biases", lambda model: model.load_adapter_state_dict({}),
                  CheckpointError, ("BITFIT adapter tensors do not match", "missing", "attn.c_attn.bias"),
                  config=BitFitConfig),
    ],
    peft_files=NO_PEFT + "BITFIT saves each trained bias as base_model.model.<parameter name>, which only tinypeft "
    "loads" + MERGE,
))  # fmt: skip
register_method(MethodSpec(
    name="lntuning", help="LayerNorm tuning: ln_1, ln_2, ln_f", default_lr=3e-3,
    build=lambda args: LNTuningConfig(), example=lambda cfg: LNTuningConfig(),
    golden_cases=(
        GoldenCase("ln_tuning", "odd", "ln_1, ln_2, ln_f train", ODD_EPS, LNTuningConfig, Batch(2, 7), seed=4),
        GoldenCase("ln_tuning", "padded", "ln_1 and ln_f train; padded batch", SMALL,
                   lambda: LNTuningConfig(target_modules=["ln_1", "ln_f"]), Batch(3, 8, "mixed"), seed=5),
    ),
    error_cases=_ln_tuning_errors,
    peft_files="PEFT's LN_TUNING: base_model.model.<layernorm>.ln_tuning_layers.{weight,bias} and PEFT's "
    "adapter_config.json fields, so an adapter loads in PEFT and back",
    loads_in_peft=True,
))  # fmt: skip
register_method(MethodSpec(
    name="last_blocks", help="the last --num_blocks blocks and ln_f", default_lr=3e-4,
    build=lambda args: LastBlocksConfig(num_blocks=args.num_blocks),
    example=lambda cfg: LastBlocksConfig(num_blocks=1),
    flags=(Flag(("--num_blocks",), {"type": int, "default": 1, "help": "how many blocks to train"}),),
    error_cases=_last_blocks_errors, golden_cases_of="full",
    peft_files=NO_PEFT + "LAST_BLOCKS saves the trained copies as base_model.model.<parameter name>, which only "
    "tinypeft loads" + MERGE,
))  # fmt: skip
register_method(MethodSpec(
    name="selective", help="the parameters matching --trainable globs", default_lr=1e-3,
    build=_selective,
    example=lambda cfg: SelectiveConfig(patterns=[f"transformer.h.{cfg.n_layer - 1}.mlp.*"]),
    flags=(Flag(("--trainable",), {"nargs": "+", "default": None, "metavar": "GLOB",
                                   "help": "parameter name globs (required)"}),),
    error_cases=_selective_errors, golden_cases_of="full",
    peft_files=NO_PEFT + "SELECTIVE saves the trained copies as base_model.model.<parameter name>, which only "
    "tinypeft loads" + MERGE,
))  # fmt: skip
