"""The GPT object: parameters by GPT-2's names, which of them train, the public API, and files.

Parameter names, shapes and layout are GPT-2's in transformers (`transformer.h.0.attn.c_attn.weight`
is (n_embd, 3*n_embd), y = x W + b), so a GPT-2 checkpoint loads with no transposes. The language-model
head is tied to the token embedding `transformer.wte.weight`.

The math is in `gpt.py` (the reference forward and backward) and runs through `engine.py`; this
file holds state. `LanguageModel` is the public API a GPT and a PeftModel share: each says what it
computes with (`view()`), and calling, losses, gradients and generation follow from that.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from . import checks, engine, generation, memory
from .backend import Array, device_of, get_backend, to_numpy
from .checkpoint import load_folder, load_state, save_folder
from .config import (
    LAYERNORMS,
    LINEAR_MODULES,
    GPTConfig,
    init_params,
    layer_of,
    linear_module_names,
    parameter_shapes,
)
from .engine import ComputeView
from .errors import ConfigError
from .sites import NO_SITES

Params = dict[str, Array]

__all__ = [
    "GPT",
    "LAYERNORMS",
    "LINEAR_MODULES",
    "ComputeView",
    "GPTConfig",
    "LanguageModel",
    "layer_of",
    "linear_module_names",
    "parameter_shapes",
    "trainable_parameters_line",
]


class LanguageModel:
    """What a GPT and a PeftModel both offer, computed from `view()`: the parameters, sites and
    trainable names one forward uses."""

    def view(self) -> ComputeView:
        raise NotImplementedError

    def _check_can_train(self) -> None:
        """Raise if gradients make no sense in the model's current state (a PeftModel merged, say)."""

    def __call__(self, input_ids: Any, attention_mask: Any = None) -> Array:
        """logits (B, T', V) for token ids (B, T) and an optional 0/1 padding mask (B, T)."""
        return engine.logits(self.view(), input_ids, attention_mask)

    def loss(self, input_ids: Any, labels: Any, attention_mask: Any = None) -> float:
        """The shifted, -100-ignoring mean cross-entropy, without gradients (and without any regulariser a method
        adds to the training objective, which `loss_and_grad` includes)."""
        return engine.loss_and_grad(self.view(), input_ids, labels, attention_mask, need_grads=False)[0]

    def loss_and_grad(self, input_ids: Any, labels: Any, attention_mask: Any = None) -> tuple[float, dict[str, Array]]:
        """(loss, grads): grads maps each trainable parameter's name to its gradient; frozen ones are absent. The loss
        is the training objective: the mean cross-entropy plus the sites' loss terms (AdaLoRA's regulariser), if any.

        The tied embedding's gradient, under "transformer.wte.weight", includes the head's share.
        """
        self._check_can_train()
        view = self.view()
        loss, grads = engine.loss_and_grad(view, input_ids, labels, attention_mask)
        return loss, view.public(grads)

    def after_step(self, grads: Mapping[str, Array], step: int) -> None:
        """What the training loop calls after each optimizer step (`step` from 0) with the gradients it applied:
        nothing for a GPT; a PeftModel passes it to its adapters (`Adapter.after_step`)."""

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        """Continue each row of input_ids (B, T) by max_new_tokens tokens (greedy at temperature 0, else
        sampled, top_k if given), with a KV cache; returns (B, T + new) on the host. See `generation.generate`."""
        return generation.generate(self.view(), input_ids, max_new_tokens, temperature, top_k, seed)

    def keys_values(self, input_ids: Any) -> list[tuple[Array, Array]]:
        """Per layer, the attention's (keys, values) for token ids (B, T), each (B, n_head, T, head_dim): the
        KV cache after reading them, which prefix tuning's TEXT init copies. See `generation.keys_values`."""
        return generation.keys_values(self.view(), input_ids)

    def check_inputs(self, input_ids: Any, attention_mask: Any = None) -> tuple[Array, Array | None]:
        """Validated (ids, mask) on this model's device, or an InputError/InputTypeError saying what is wrong."""
        return self.view().check_inputs(input_ids, attention_mask)

    def print_trainable_parameters(self) -> None:
        print(self.trainable_parameters_line())

    def trainable_parameters_line(self) -> str:
        raise NotImplementedError


class GPT(LanguageModel):
    """A GPT-2 language model: `logits = model(input_ids)`, `loss, grads = model.loss_and_grad(ids, labels)`.

    `params` maps GPT-2 names to arrays; `trainable` is the set of names that get gradients
    (everything, until a selective method or a PEFT wrapper freezes some).
    """

    def __init__(self, config: GPTConfig, seed: int = 0, device: str | None = None) -> None:
        if not isinstance(config, GPTConfig):
            raise ConfigError(f"GPT needs a GPTConfig; got {type(config).__name__}")
        checks.check_seed(seed, error=ConfigError)
        self.config = config
        self.xp = get_backend(device)
        memory.check_parameters(config, self.xp)  # before drawing them: a size that cannot fit is refused
        self.params: Params = {k: self.xp.asarray(v) for k, v in init_params(config, seed).items()}
        self.trainable: set[str] = set(self.params)

    @classmethod
    def with_params(cls, config: GPTConfig, xp: Any, params: Mapping[str, Array]) -> GPT:
        """A GPT around existing arrays (not copied), every parameter trainable."""
        model = cls.__new__(cls)
        model.config, model.xp = config, xp
        model.params = dict(params)
        model.trainable = set(model.params)
        return model

    @property
    def device(self) -> str:
        return device_of(self.xp)

    def view(self) -> ComputeView:
        return ComputeView(self.config, self.xp, self.params, NO_SITES, frozenset(self.trainable))

    def train(self, mode: bool = True) -> GPT:
        """Nothing to switch: the base model has no dropout (it computes what transformers does in
        eval mode). Here so a GPT and a PeftModel train through the same loop."""
        return self

    def eval(self) -> GPT:
        return self

    def trainable_parameters(self) -> dict[str, Array]:
        """The trainable tensors by name (the model's own arrays: an optimizer updates them in place)."""
        return {k: v for k, v in self.params.items() if k in self.trainable}

    def num_parameters(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.params.values())

    def trainable_parameters_line(self) -> str:
        return trainable_parameters_line(self.params, self.trainable)

    # ------------------------------------------------------------ state and files
    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of every parameter under its GPT-2 name (the tied lm_head is not repeated)."""
        return {k: to_numpy(v).copy() for k, v in self.params.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load GPT-2 weights by name. Names may lack the "transformer." prefix (GPT2Model checkpoints);
        "lm_head.weight" is accepted when it equals wte (tied); attention-mask buffers are skipped.
        Every parameter must be present with its exact shape; nothing is loaded if anything is wrong."""
        self.params = {k: self.xp.asarray(v) for k, v in load_state(self.config, state).items()}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """config.json and model.safetensors, the files transformers writes for a GPT2LMHeadModel."""
        save_folder(folder, self.config, self.params)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | None = None, dtype: str | None = None) -> GPT:
        """Load a folder written by `save_pretrained` here or by transformers' GPT2LMHeadModel."""
        memory.check_saved_model(folder)  # before the weights are read
        config, params = load_folder(folder, dtype)
        xp = get_backend(device)
        memory.check_parameters(config, xp, host=False)  # before they are copied to a GPU
        return cls.with_params(config, xp, {k: xp.asarray(v) for k, v in params.items()})


def trainable_parameters_line(params: Mapping[str, Array], trainable: Iterable[str]) -> str:
    """PEFT's format: `trainable params: 1,024 || all params: 30,144 || trainable%: 3.3970`."""
    trainable = set(trainable)
    total = sum(int(np.prod(p.shape)) for p in params.values())
    n = sum(int(np.prod(p.shape)) for k, p in params.items() if k in trainable)
    return f"trainable params: {n:,d} || all params: {total:,d} || trainable%: {100 * n / total:.4f}"
