"""`get_peft_model` and `PeftModel`: a frozen base GPT plus named adapters, one of them active.

The base model is never changed by training: the active adapter's tensors join the base's in one
flat parameter dict, its sites plug into the base's forward, and only its tensors are trainable.
Names follow what PEFT writes to adapter_model.safetensors (`base_model.model.transformer.h.0.
attn.c_attn.lora_A.weight`), for the tensors, the gradients and the optimizer state alike.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from . import engine, generation, memory
from .backend import Array
from .checkpoint import pickle_hint
from .checks import check_seed, check_token_ids
from .config import linear_module_names
from .errors import CheckpointError, ConfigError, MergeError
from .io import load_json, load_safetensors, save_json, save_safetensors
from .methods.base import Adapter, PeftConfig
from .methods.lora_combine import CombineOptions, check_adapters, combine
from .methods.lora_multi import check_several, in_memory_name, several_lora_parts
from .mixed_batch import mixed_view
from .model import GPT, ComputeView, LanguageModel, trainable_parameters_line
from .sites import NO_SITES

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def get_peft_model(base: GPT, config: PeftConfig, adapter_name: str = "default", seed: int = 0) -> PeftModel:
    """Wrap `base` with a new adapter built from `config` (initialised from `seed`)."""
    return PeftModel(base, config, adapter_name, seed)


class PeftModel(LanguageModel):
    """A base GPT and its adapters. Call it like the base; train what `trainable_parameters()` returns.

    Calling, loss, loss_and_grad and generate are the GPT's (`LanguageModel`), on what `view()` gives:
    gradients are keyed by the active adapter's tensor names (PEFT's file names). Several LoRA adapters may be
    active at once (`set_adapter([...])`): their updates add, and their tensors take PEFT's in-memory names,
    which hold the adapter's name (tinypeft/methods/lora_multi.py)."""

    def __init__(self, base: GPT, config: PeftConfig, adapter_name: str = "default", seed: int = 0) -> None:
        if not isinstance(base, GPT):
            raise ConfigError(f"get_peft_model needs a tinypeft GPT as its base; got {type(base).__name__}")
        self.base_model = base
        self.adapters: dict[str, Adapter] = {}
        self.active_adapters: list[str] = [adapter_name]
        self._disabled = False
        self._merged: dict[str, Array] | None = None  # the base arrays a merge replaced
        self.training = False  # dropout only in training mode, as torch modules after .train()
        self.add_adapter(adapter_name, config, seed)

    # ----------------------------------------------------------- adapters
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return {name: a.config for name, a in self.adapters.items()}

    @property
    def active_adapter(self) -> str:
        """The active adapter's name (the first, when several are active: PEFT's `active_adapter`)."""
        return self.active_adapters[0]

    @property
    def active(self) -> Adapter:
        """The active adapter (an error when several are active: name the one you mean)."""
        if len(self.active_adapters) > 1:
            raise ConfigError(
                f"several adapters are active ({self.active_adapters}); take one from model.adapters by name"
            )
        return self.adapters[self.active_adapter]

    def _actives(self) -> list[Adapter]:
        return [self.adapters[n] for n in self.active_adapters]

    def add_adapter(self, adapter_name: str, config: PeftConfig, seed: int = 0) -> None:
        """Add a new adapter (not made active, as in PEFT, unless it is the first)."""
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ConfigError(f"adapter_name must be a non-empty string; got {adapter_name!r}")
        if adapter_name in self.adapters:
            raise ConfigError(f"an adapter named {adapter_name!r} exists; names in use: {sorted(self.adapters)}")
        if not isinstance(config, PeftConfig):
            raise ConfigError(f"expected a PEFT config (LoraConfig, ...); got {type(config).__name__}")
        check_seed(seed, error=ConfigError)
        config.validate(self.base_model)
        memory.check_adapter(config, self.base_model)  # before building: an adapter that cannot fit is refused
        self.adapters[adapter_name] = config.build(self.base_model, seed)

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        seed: int = 0,
    ) -> None:
        """Add `adapter_name`, a LoRA adapter combining the LoRA `adapters` with `weights` (not made active), as
        PEFT's add_weighted_adapter: `combination_type` is one of lora_combine.COMBINATIONS, defined there and in
        docs/combining.md. `seed` seeds DARE's random drop (PEFT draws from torch's global generator).

        Unlike PEFT, a name in use is an error (PEFT returns silently), the new adapter's scaling is 1 whatever
        the first adapter's use_rslora (peft #3761), and DoRA, PiSSA and bias-training adapters are refused."""
        options = CombineOptions(combination_type, svd_rank, svd_clamp, density, majority_sign_method, seed)
        if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
            raise ConfigError(f"adapters must be a non-empty list of adapter names; got {adapters!r}")
        named = {name: self._adapter(name) for name in adapters}
        if len(named) < len(adapters):
            raise ConfigError(f"adapters lists a name twice: {list(adapters)}; give each adapter once, its weight once")
        if isinstance(adapter_name, str) and adapter_name in self.adapters:
            raise ConfigError(f"an adapter named {adapter_name!r} exists; names in use: {sorted(self.adapters)}")
        values = check_adapters(named, weights, combination_type)
        config, tensors = combine(named, values, linear_module_names(self.base_model.config), options)
        self.add_adapter(adapter_name, config)
        try:
            self.adapters[adapter_name].load_state_dict(tensors)
        except BaseException:
            del self.adapters[adapter_name]
            raise

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make `adapter_name` the active adapter, or a list of LoRA adapters active together (their updates add)."""
        self._require_unmerged("switch adapters")
        names = adapter_name if isinstance(adapter_name, (list, tuple)) else [adapter_name]
        if not names or len(set(map(repr, names))) < len(names):
            raise ConfigError(f"set_adapter needs a name or a list of distinct names; got {adapter_name!r}")
        chosen = {name: self._adapter(name) for name in names}
        if len(names) > 1:
            check_several(chosen)
        self.active_adapters = list(names)

    def delete_adapter(self, adapter_name: str) -> None:
        self._adapter(adapter_name)
        if len(self.adapters) == 1:
            raise ConfigError(f"{adapter_name!r} is the only adapter; use unload() to get the base model back")
        if adapter_name in self.active_adapters:
            self._require_unmerged("delete the active adapter")
        del self.adapters[adapter_name]
        if adapter_name in self.active_adapters:
            rest = [n for n in self.active_adapters if n != adapter_name]
            self.active_adapters = rest or [next(iter(self.adapters))]

    def train(self, mode: bool = True) -> PeftModel:
        """Training mode: methods with dropout apply it (a fresh mask per forward)."""
        self.training = bool(mode)
        return self

    def eval(self) -> PeftModel:
        return self.train(False)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside this block the model computes the base model alone."""
        was = self._disabled
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = was

    # ----------------------------------------------------------- compute
    def view(self) -> ComputeView:
        """The flat parameter dict, sites and trainable names one forward uses. A base parameter the
        adapter stands in for appears under its base name (the forward's naming) and is reported
        under the adapter's name (`public_names`)."""
        base = self.base_model
        if self._disabled or self._merged is not None:
            return ComputeView(base.config, base.xp, base.params, NO_SITES, frozenset())
        if len(self.active_adapters) > 1:
            tensors, sites = several_lora_parts(
                dict(zip(self.active_adapters, self._actives(), strict=True)), self.training
            )
            return ComputeView(base.config, base.xp, {**base.params, **tensors}, sites, frozenset(tensors))
        a = self.active
        params = {**base.params, **a.params}
        for base_name, name in a.overrides.items():
            params[base_name] = a.params[name]
        stand_ins = set(a.overrides.values())
        trainable = frozenset((set(a.params) - stand_ins) | set(a.overrides))
        return ComputeView(base.config, base.xp, params, a.sites(self.training), trainable, dict(a.overrides))

    def __call__(self, input_ids: Any, attention_mask: Any = None, adapter_names: list[str] | None = None) -> Array:
        """logits (B, T', V). adapter_names: a mixed batch, row b computed with adapter adapter_names[b] (or the
        base, for "__base__"), as PEFT's `adapter_names` (tinypeft/mixed_batch.py)."""
        if adapter_names is None:
            return super().__call__(input_ids, attention_mask)
        return engine.logits(self._mixed_view(adapter_names, input_ids), input_ids, attention_mask)

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
        adapter_names: list[str] | None = None,
    ) -> np.ndarray:
        """`LanguageModel.generate`; with adapter_names, each row continued by its own adapter (a mixed batch)."""
        view = self.view() if adapter_names is None else self._mixed_view(adapter_names, input_ids)
        return generation.generate(view, input_ids, max_new_tokens, temperature, top_k, seed)

    def _mixed_view(self, adapter_names: Any, input_ids: Any) -> ComputeView:
        self._require_unmerged("run a mixed batch (adapter_names)")
        if self.training:
            raise ConfigError("adapter_names (a mixed batch) is for inference, as in PEFT; call model.eval() first")
        if self._disabled:
            raise ConfigError("adapter_names inside disable_adapter(): the adapters are off; leave the block first")
        rows = check_token_ids(input_ids, self.base_model.config.vocab_size).shape[0]
        return mixed_view(self.base_model.view(), self.adapters, adapter_names, rows)

    def _check_can_train(self) -> None:
        self._require_unmerged("compute adapter gradients")
        if self._disabled:
            raise ConfigError("the adapter is disabled (inside disable_adapter()); there is nothing to train")

    def after_step(self, grads: Mapping[str, Array], step: int) -> None:
        """Each active adapter's `after_step` (AdaLoRA's rank allocator; nothing for most methods)."""
        for a in self._actives():
            a.after_step(grads, step)

    def trainable_parameters(self) -> dict[str, Array]:
        """The active adapter's tensors by name: what an optimizer updates (in place). With several active, every
        active adapter's tensors under their in-memory names (the same arrays)."""
        if len(self.active_adapters) > 1:
            return {in_memory_name(k, n): v for n, a in zip(self.active_adapters, self._actives(), strict=True)
                    for k, v in a.params.items()}  # fmt: skip
        return self.active.params

    def random_state(self) -> dict[str, Any]:
        """The active adapter's random-generator states (dropout), which a training checkpoint saves (with
        several active, each adapter's under its name)."""
        if len(self.active_adapters) > 1:
            return {n: a.random_state() for n, a in zip(self.active_adapters, self._actives(), strict=True)}
        return self.active.random_state()

    def set_random_state(self, state: Any) -> None:
        if len(self.active_adapters) == 1:
            return self.active.set_random_state(state)
        if not isinstance(state, Mapping) or set(state) != set(self.active_adapters):
            raise CheckpointError(f"random state for {state!r}; the active adapters are {self.active_adapters}")
        for n in self.active_adapters:
            self.adapters[n].set_random_state(state[n])
        return None

    def trainable_parameters_line(self) -> str:
        """A tensor that stands in for a base parameter (a selective method's trained copy) counts
        once, as the parameter it replaces. (PEFT's LN tuning, which keeps both, counts it twice.)"""
        everything = dict(self.base_model.params)
        for name, adapter in self.adapters.items():
            stand_ins = set(adapter.overrides.values())
            everything |= {f"{name}/{k}": v for k, v in adapter.params.items() if k not in stand_ins}
        trainable = set()
        for name, active in zip(self.active_adapters, self._actives(), strict=True):
            stand_ins = set(active.overrides.values())
            trainable |= set(active.overrides) | {f"{name}/{k}" for k in active.params if k not in stand_ins}
        return trainable_parameters_line(everything, trainable)

    # ----------------------------------------------------------- merging
    def _require_unmerged(self, action: str) -> None:
        if self._merged is not None:
            raise MergeError(f"cannot {action} while the adapter is merged into the base; call unmerge_adapter() first")

    def merge_adapter(self, safe_merge: bool = False) -> None:
        """Fold the active adapter into the base weights; the model then computes the merged base alone.

        Merging twice warns and does nothing, as in PEFT. safe_merge computes on copies first and
        raises MergeError, changing nothing, if any merged weight is not finite.
        """
        if self._merged is not None:
            warnings.warn("the adapter is already merged; nothing to do", UserWarning, stacklevel=2)
            return
        merged = self._merged_params(safe_merge)
        base = self.base_model.params
        self._merged = {k: base[k] for k in merged if merged[k] is not base[k]}
        base.update(merged)

    def unmerge_adapter(self) -> None:
        """Take a merged adapter back out of the base weights (unmerging twice warns, as in PEFT)."""
        if self._merged is None:
            warnings.warn("the adapter is not merged; nothing to do", UserWarning, stacklevel=2)
            return
        for a in self._actives():
            a.unmerge(self.base_model.params, self._merged)
        self._merged = None

    def _merged_params(self, safe_merge: bool) -> dict[str, Array]:
        """The base's parameters with the active adapter merged in (several: one after the other, so their
        updates add)."""
        merged = dict(self.base_model.params)
        for a in self._actives():
            if not a.can_merge():
                raise a.merge_error()
            a.merge(merged)
        if safe_merge:
            xp = self.base_model.xp
            for name, value in merged.items():
                if value is not self.base_model.params[name] and not bool(xp.isfinite(value).all()):
                    raise MergeError(
                        f"safe_merge: merging adapter {self.active_adapter!r} makes {name} non-finite "
                        "(NaN or inf); the base was left unchanged"
                    )
        return merged

    def merge_and_unload(self, safe_merge: bool = False) -> GPT:
        """A plain GPT whose weights are the base with the active adapter merged in.

        Unlike PEFT, which edits the wrapped model in place, this returns a new GPT and leaves this
        PeftModel (and its base) as they were; the merged tensors are new arrays, the rest shared.
        """
        params = self.base_model.params if self._merged is not None else self._merged_params(safe_merge)
        return GPT.with_params(self.base_model.config, self.base_model.xp, params)

    def unload(self) -> GPT:
        """The base model without any adapter (unmerging first if merged)."""
        if self._merged is not None:
            self.unmerge_adapter()
        return GPT.with_params(self.base_model.config, self.base_model.xp, self.base_model.params)

    # ----------------------------------------------------------- state and files
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, np.ndarray]:
        """Host copies of an adapter's tensors under PEFT's file names."""
        return self._adapter(adapter_name).state_dict()

    def load_adapter_state_dict(self, state: Mapping[str, Any], adapter_name: str | None = None) -> None:
        """Load tensors by PEFT's file names (a dict from peft.get_peft_model_state_dict works as is)."""
        self._adapter(adapter_name).load_state_dict(state)

    def _adapter(self, adapter_name: str | None) -> Adapter:
        name = self.active_adapter if adapter_name is None else adapter_name
        if not isinstance(name, str) or name not in self.adapters:
            raise ConfigError(f"no adapter named {name!r}; the adapters are {sorted(self.adapters)}")
        return self.adapters[name]

    def save_pretrained(self, folder: str | os.PathLike, adapter_name: str | None = None) -> None:
        """adapter_model.safetensors and adapter_config.json, as PEFT writes them (each written atomically)."""
        adapter = self._adapter(adapter_name)
        os.makedirs(folder, exist_ok=True)
        save_safetensors(os.path.join(folder, ADAPTER_WEIGHTS_NAME), adapter.state_dict())
        # where the base came from, so that PEFT's AutoPeftModel can load it (None for a base made in memory)
        config = adapter.config.peft_dict() | {"base_model_name_or_path": self.base_model.config.name_or_path}
        save_json(os.path.join(folder, ADAPTER_CONFIG_NAME), config)

    def save_changed_tensors(self, path: str | os.PathLike, adapter_name: str | None = None) -> None:
        """The base tensors a selective adapter (BitFit, LN tuning, last blocks, by-name patterns, LoRA's
        trained biases) retrained, under their GPT-2 names, as one safetensors file: what a transformers
        user loads with `model.load_state_dict(safetensors.torch.load_file(path), strict=False)`, for
        methods PEFT has no format for. An adapter that adds tensors of its own (LoRA's factors, IA3's
        vectors) changes more than base tensors: merge it (merge_and_unload) instead."""
        adapter = self._adapter(adapter_name)
        if not adapter.overrides:
            raise ConfigError(
                f"the {adapter.config.peft_type} adapter trains no copies of base tensors, so there are none to save "
                "under GPT-2's names; save_pretrained writes it for PEFT, or merge_and_unload() gives a plain GPT"
            )
        own = set(adapter.params) - set(adapter.overrides.values())
        if own:
            raise ConfigError(
                f"the {adapter.config.peft_type} adapter also has tensors of its own ({sorted(own)[:2]} ...), which no "
                "GPT-2 tensor holds; merge_and_unload() folds them into a plain GPT instead"
            )
        save_safetensors(path, {base: adapter.params[copy] for base, copy in adapter.overrides.items()})

    @classmethod
    def from_pretrained(cls, base: GPT, folder: str | os.PathLike, adapter_name: str = "default") -> PeftModel:
        """Wrap `base` with the adapter saved in `folder` (by tinypeft or by PEFT)."""
        config, state = read_adapter(folder)
        model = cls(base, config, adapter_name)
        model.load_adapter_state_dict(state)
        return model

    def load_adapter(self, folder: str | os.PathLike, adapter_name: str) -> None:
        """Add the adapter saved in `folder` under `adapter_name` (not made active)."""
        config, state = read_adapter(folder)
        self.add_adapter(adapter_name, config)
        try:
            self.adapters[adapter_name].load_state_dict(state)
        except BaseException:
            del self.adapters[adapter_name]  # a failed load adds nothing
            raise


def read_adapter(folder: str | os.PathLike) -> tuple[PeftConfig, dict[str, np.ndarray]]:
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(
            f"{folder} is not a folder; expected one holding {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}"
        )
    config = PeftConfig.from_dict(load_json(os.path.join(folder, ADAPTER_CONFIG_NAME)))
    weights_path = os.path.join(folder, ADAPTER_WEIGHTS_NAME)
    if not os.path.exists(weights_path):
        raise CheckpointError(f"{weights_path} does not exist{pickle_hint(folder)}")
    return config, load_safetensors(weights_path)
