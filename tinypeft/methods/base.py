"""What every PEFT method shares: a config that knows how to build its adapter, the adapter (its
tensors, the sites it fills, how it merges), PEFT's target matching, and the name prefix PEFT writes.

A method is one file that subclasses `PeftConfig` and `Adapter` and registers its config class
with `register`; `tinypeft/methods/__init__.py` imports each file once.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..backend import Array, to_numpy
from ..config import shown
from ..errors import CheckpointError, ConfigError, MergeError
from ..sites import NO_SITES, Sites

if TYPE_CHECKING:
    from ..model import GPT


# PEFT writes adapter tensors under the wrapped model's path, with no adapter name:
# base_model.model.transformer.h.0.attn.c_attn.lora_A.weight
PEFT_PREFIX = "base_model.model."

CONFIG_TYPES: dict[str, type[PeftConfig]] = {}


def register(cls: type[PeftConfig]) -> type[PeftConfig]:
    """Class decorator: make a config loadable from adapter_config.json by its peft_type."""
    CONFIG_TYPES[cls.peft_type] = cls
    return cls


@dataclass
class PeftConfig:
    """Base of every method's config. `peft_type` names the method in adapter_config.json."""

    peft_type: ClassVar[str] = ""

    def build(self, base: GPT, seed: int = 0) -> Adapter:
        """A fresh adapter for `base`, initialised from a generator seeded by `seed`."""
        raise NotImplementedError

    def validate(self, base: GPT) -> None:
        """Raise ConfigError if this config cannot apply to `base` (called before build)."""

    def estimated_parameters(self, base: GPT) -> int:
        """How many numbers the adapter `build` makes for `base` will hold (its tensors, and any frozen
        ones it keeps), from the config alone: checked against the memory available before it is built
        (tinypeft/memory.py). A method that does not say is not checked."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON: the fields PEFT reads, plus any tinypeft adds (summary.json, a run's identity,
        golden vectors); adapter_config.json holds `peft_dict()`."""
        d = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": None, **d}

    def peft_dict(self) -> dict[str, Any]:
        """What save_pretrained writes to adapter_config.json: `to_dict`, less any field of tinypeft's that
        only says how the tensors started (the saved tensors supersede it; PEFT warns of fields it lacks)."""
        return self.to_dict()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PeftConfig:
        """The config class named by d["peft_type"], from the keys it knows; keys PEFT adds that
        tinypeft does not use (revision, inference_mode, ...) are ignored."""
        if not isinstance(d, Mapping):
            raise CheckpointError(f"adapter_config.json must be a JSON object; got {type(d).__name__}")
        peft_type = d.get("peft_type")
        if not isinstance(peft_type, str) or peft_type not in CONFIG_TYPES:
            raise CheckpointError(
                f"adapter_config.json has peft_type {peft_type!r}; tinypeft loads {sorted(CONFIG_TYPES)}"
            )
        config_cls = CONFIG_TYPES[peft_type]
        known = {f.name for f in dataclasses.fields(config_cls)}
        try:
            return config_cls(**{k: v for k, v in d.items() if k in known})
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"adapter_config.json: {e}") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, set):
        return sorted(value)
    return value


class Adapter:
    """One adapter: its tensors by their PEFT file names, the sites it fills, and its merge rule.

    `overrides` maps a base parameter name to the adapter tensor that stands in for it (a trained
    copy of a base bias or LayerNorm), so the base model itself is never modified by training and
    `disable_adapter` still means the original base.
    """

    def __init__(self, config: PeftConfig, base: GPT, params: dict[str, Array], overrides: Mapping[str, str] = ()):
        self.config = config
        self.xp = base.xp
        self.dtype = base.config.dtype
        self.params = params
        self.overrides: dict[str, str] = dict(overrides)

    def sites(self, training: bool = False) -> Sites:
        """The sites this adapter fills. training=True asks for training-time behaviour (dropout):
        a method draws any randomness here, once per call, so that one forward and its backward, and
        a gradient check re-running the forward, all see the same dropout masks."""
        return NO_SITES

    def after_step(self, grads: Mapping[str, Array], step: int) -> None:
        """Called by the training loop after each optimizer step (`step` counts from 0), with the gradients the
        step applied: a method that adapts between steps does it here (AdaLoRA's rank allocator). None by
        default."""

    def can_merge(self) -> bool:
        return True

    def merge(self, base_params: dict[str, Array]) -> None:
        """Fold the adapter into base_params in place (the base's arrays are replaced, not written)."""
        for base_name, name in self.overrides.items():
            base_params[base_name] = self.params[name].copy()

    def unmerge(self, base_params: dict[str, Array], originals: Mapping[str, Array]) -> None:
        """Undo `merge`. `originals` holds the base arrays as they were before the merge."""
        for base_name in self.overrides:
            base_params[base_name] = originals[base_name]

    def merge_caveat(self) -> str:
        """Why a merged model's logits differ from the unmerged adapter's, or "" when they are equal (up to
        rounding). LoRA on wte: the tied head reads the merged table, while the unmerged head reads W."""
        return ""

    def merge_error(self) -> MergeError:
        return MergeError(f"{self.config.peft_type} has no merge")

    def derived(self) -> dict[str, np.ndarray]:
        """Tensors, in float64, that a port computes from the config and the base weights rather than
        reading them from the weights file (PiSSA's residual, a prompt's TEXT init): the golden vectors
        hold them, to check a port's. None by default."""
        return {}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: to_numpy(v).copy() for k, v in self.params.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the tensors, all or nothing: names must match exactly; shapes must match (after
        `normalize_loaded`); values are cast to the model's dtype."""
        if not isinstance(state, Mapping):
            raise CheckpointError(f"an adapter state dict must map tensor names to arrays; got {type(state).__name__}")
        missing = sorted(set(self.params) - set(state))
        unexpected = sorted(set(state) - set(self.params), key=repr)  # keys from a file may be of any type
        if missing or unexpected:
            raise CheckpointError(
                f"{self.config.peft_type} adapter tensors do not match this model: "
                f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''} "
                "(saved for another base model or method?)"
            )
        new = {}
        for name, current in self.params.items():
            value = state[name]
            try:
                host = to_numpy(value)
            except Exception as e:  # ragged lists, objects NumPy cannot turn into an array
                kind = type(value).__name__
                raise CheckpointError(f"adapter tensor {name!r} is not an array ({kind}: {e})") from None
            arr = self.normalize_loaded(name, host)
            if not np.issubdtype(arr.dtype, np.floating):
                raise CheckpointError(f"adapter tensor {name!r} has dtype {arr.dtype}; expected floating point")
            if tuple(arr.shape) != tuple(current.shape):
                raise CheckpointError(
                    f"adapter tensor {name!r} has shape {tuple(arr.shape)}; this adapter needs {tuple(current.shape)}"
                )
            if not np.isfinite(arr).all():
                raise CheckpointError(
                    f"adapter tensor {name!r} holds {int((~np.isfinite(arr)).sum())} non-finite value(s) (NaN or inf); "
                    "a model computed from it would give NaN logits, so it is not loaded"
                )
            new[name] = self.xp.asarray(arr.astype(self.dtype))
        self.params = new

    def normalize_loaded(self, name: str, value: np.ndarray) -> np.ndarray:
        """Hook for methods whose PEFT tensors come in another but equivalent shape."""
        return value

    # ---------------------------------------------------------------- randomness
    def _generators(self) -> dict[str, np.random.Generator]:
        """The generators this adapter draws from while training (dropout masks), found as its
        np.random.Generator attributes so that a method needs no code for its state to be saved."""
        return {name: g for name, g in vars(self).items() if isinstance(g, np.random.Generator)}

    def random_state(self) -> dict[str, Any]:
        """JSON-ready states of those generators: a training checkpoint saves them, so that a resumed
        run draws the same dropout masks as an uninterrupted one."""
        return {name: g.bit_generator.state for name, g in self._generators().items()}

    def set_random_state(self, state: Any) -> None:
        """Restore `random_state()`, all or nothing."""
        generators = self._generators()
        if not isinstance(state, Mapping) or set(state) != set(generators):
            held = sorted(state) if isinstance(state, Mapping) else state
            raise CheckpointError(
                f"{self.config.peft_type} adapter random state holds {held!r}; "
                f"this adapter draws from {sorted(generators)}"
            )
        for name, g in generators.items():
            try:  # the bit generator's own setter is the authority on what a valid state is
                type(g.bit_generator)().state = state[name]
            except Exception as e:
                raise CheckpointError(f"adapter random state {name!r} is invalid: {type(e).__name__}: {e}") from None
        for name, g in generators.items():
            g.bit_generator.state = state[name]


# ------------------------------------------------------------------ matching
def match_modules(candidates: Sequence[str], targets: str | Sequence[str], what: str = "target_modules") -> list[str]:
    """PEFT's rule: a list entry t matches module `key` if key == t or key ends with "." + t; a plain
    string is a regular expression that must match the whole name. Every list entry must match
    something; an entry that matches nothing is an error listing what exists."""
    if isinstance(targets, str):
        pattern = _compile_regex(targets, what)
        hits = [key for key in candidates if pattern.fullmatch(key)]
        if not hits:
            raise ConfigError(f"{what}={shown(targets)} matches no module; the modules are {_summarize(candidates)}")
        return hits
    if not isinstance(targets, (list, tuple, set, frozenset)) or not targets:
        raise ConfigError(f"{what} must be a regex string or a non-empty list of module names; got {shown(targets)}")
    hits = set()
    for t in targets:
        if not isinstance(t, str) or not t:
            raise ConfigError(f"{what} entries must be non-empty strings; got {shown(t)}")
        found = [key for key in candidates if key == t or key.endswith("." + t)]
        if not found:
            raise ConfigError(f"{what} entry {shown(t)} matches no module; the modules are {_summarize(candidates)}")
        hits.update(found)
    return [key for key in candidates if key in hits]


def _compile_regex(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{what}={shown(pattern)} is not a valid regular expression: {e}") from None


def _summarize(names: Sequence[str]) -> str:
    """The distinct module suffixes (`attn.c_attn`, ...) and one full name, so the list stays short."""
    suffixes = sorted({n.split(".", 3)[-1] if n.startswith("transformer.h.") else n for n in names})
    return f"{suffixes} (full names like {names[0]!r})" if names else "[] (none)"


def match_parameters(names: Iterable[str], patterns: Sequence[str] = (), regex: str | None = None) -> list[str]:
    """Parameter names matching any glob pattern (fnmatch: `*.bias`, `transformer.h.3.*`) or the
    full-match regex. A pattern that matches nothing is an error listing examples of what exists."""
    names = list(names)
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        raise ConfigError(f"patterns must be a list of glob strings (like ['*.bias']); got {shown(patterns)}")
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ConfigError(f"patterns entries must be non-empty glob strings; got {shown(p)}")
    if regex is not None and not isinstance(regex, str):
        raise ConfigError(f"regex must be a string (a full-match regular expression) or None; got {shown(regex)}")
    hits = set()
    for p in patterns:
        found = fnmatch.filter(names, p)
        if not found:
            raise ConfigError(f"pattern {shown(p)} matches no parameter; names look like {names[:3]} ... {names[-2:]}")
        hits.update(found)
    if regex is not None:
        pattern = _compile_regex(regex, "regex")
        found = [n for n in names if pattern.fullmatch(n)]
        if not found:
            raise ConfigError(
                f"regex {shown(regex)} matches no parameter; names look like {names[:3]} ... {names[-2:]}"
            )
        hits.update(found)
    return [n for n in names if n in hits]
