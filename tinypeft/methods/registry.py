"""The method registry: one `MethodSpec` per `tinypeft finetune --method` choice, which the rest of
the program iterates. The CLI builds its flags and defaults from it, the golden vectors take their
cases from it, the error catalogue its cases, and the shared gradient harness its example configs;
none of them names a method.

A method's file ends with `register_method(MethodSpec(...))`; `tinypeft/methods/__init__.py` imports
each file once. A method defined outside the package (see docs/write_a_method.md) registers itself
the same way, in one line.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import GPTConfig
    from ..errors import TinyPeftError
    from ..model import GPT
    from .base import PeftConfig


@dataclass(frozen=True)
class Flag:
    """One `tinypeft finetune` option a method reads: argparse's option strings and keyword arguments.
    Two methods may declare the same option (lora and ia3 both read --target_modules) if they agree on
    everything but the help, which the CLI then joins."""

    names: tuple[str, ...]  # ("--rank", "-r")
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest", self.names[0].lstrip("-").replace("-", "_"))


@dataclass(frozen=True)
class Batch:
    """B rows of T tokens. padding: "none", "mixed" (a full row, a right-padded row and a left-padded
    row) or "ends" (a full row, and a row padded one token at the left and two at the right)."""

    B: int
    T: int
    padding: str = "none"


@dataclass(frozen=True)
class GoldenCase:
    """One golden-vector case of a method before it is computed: its label in the vector files (the
    method's name unless a variant of it, like rslora, is labelled apart), a variant, the model
    shape, the config (a factory: configs are mutable), the batch, and whether the adapter's tensors
    are moved off their init."""

    label: str
    variant: str
    description: str
    model: Mapping[str, Any]
    config: Callable[[], PeftConfig | None]
    batch: Batch
    perturb_adapter: bool = True
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.label}-{self.variant}"


@dataclass(frozen=True)
class ErrorCase:
    """One config a method refuses: `call(base)` must raise `error` with every string of `says` in its
    one-line message. The error catalogue (tests/errors, docs/errors.md) lists every method's."""

    when: str
    call: Callable[[GPT], object]
    error: type[TinyPeftError]
    says: tuple[str, ...]


@dataclass(frozen=True)
class MethodSpec:
    """Everything the program needs to know about a method besides its math.

    name: the `--method` choice; help: one line for --help; default_lr: the learning rate
    `finetune` uses unless told (each chosen by a measured sweep, see docs/experiments.md);
    build: the config from the parsed flags (None: train the base model itself);
    flags: the options it reads; example: a config for a small model with every tensor off its
    identity init, which the shared gradient harness checks three ways (and its merge);
    golden_cases, error_cases: see above; peft_files: how its files map to PEFT's (or that PEFT
    has no such method, and what to use instead); loads_in_peft: whether PEFT reads its adapter.
    """

    name: str
    help: str
    default_lr: float
    build: Callable[[argparse.Namespace], PeftConfig | None]
    example: Callable[[GPTConfig], PeftConfig | None]
    flags: Sequence[Flag] = ()
    golden_cases: Sequence[GoldenCase] = ()
    error_cases: Callable[[], Sequence[ErrorCase]] = tuple
    peft_files: str = ""
    loads_in_peft: bool = False


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (a name may be registered once)."""
    if not isinstance(spec, MethodSpec):
        raise ConfigError(f"register_method needs a MethodSpec; got {type(spec).__name__}")
    if spec.name in METHODS and METHODS[spec.name] is not spec:
        raise ConfigError(f"a method named {spec.name!r} is registered already; the methods are {sorted(METHODS)}")
    METHODS[spec.name] = spec
    return spec


def method(name: str) -> MethodSpec:
    """The registered method `name`, or a ConfigError listing the choices."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]
