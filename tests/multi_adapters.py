"""Helpers for the tests of several LoRA adapters at once: a tinypeft model holding several named adapters
pushed off their init, and PEFT's model holding exactly the same adapters (float64, eval mode)."""

from __future__ import annotations

import numpy as np
import peft
import torch
from hf_utils import hf_twin
from strategies import perturbed_model

import tinypeft as tp

SHAPE = {"vocab_size": 31, "n_positions": 16, "n_embd": 8, "n_layer": 2, "n_head": 2, "dtype": "float64"}


def small_base(seed: int = 0, **changes) -> tp.GPT:
    return perturbed_model(tp.GPTConfig(**(SHAPE | changes)), seed)


def peft_config(config: tp.LoraConfig, **changes) -> peft.LoraConfig:
    """PEFT's LoraConfig from our adapter_config.json dict."""
    d = config.to_dict() | changes
    return peft.LoraConfig(**{k: v for k, v in d.items() if k not in ("peft_type", "base_model_name_or_path")})


def perturb(model: tp.PeftModel, name: str, seed: int, scale: float = 0.3) -> None:
    """Move every tensor of adapter `name` off its init (B != 0), keeping s B A about the size of W's entries."""
    adapter = model.adapters[name]
    rng = np.random.default_rng(seed)
    shrink = max(1.0, getattr(adapter.config, "scaling", 1.0))
    for key, value in adapter.params.items():
        noise = scale * rng.standard_normal(value.shape).astype(value.dtype)
        if key.endswith("lora_magnitude_vector"):
            adapter.params[key] = value * (1 + noise)
        elif key.endswith("lora_B.weight"):
            adapter.params[key] = (value + noise) / shrink
        else:
            adapter.params[key] = value + noise


def with_adapters(base: tp.GPT, configs: dict[str, tp.LoraConfig], seed: int = 0) -> tp.PeftModel:
    """A PeftModel holding one perturbed adapter per entry of `configs`, the first active."""
    names = list(configs)
    model = tp.get_peft_model(base, configs[names[0]], adapter_name=names[0], seed=seed)
    for i, name in enumerate(names[1:], 1):
        model.add_adapter(name, configs[name], seed=seed + i)
    for i, name in enumerate(names):
        perturb(model, name, seed + 100 + i)
    return model


def peft_twin(model: tp.PeftModel, names: list[str] | None = None) -> peft.PeftModel:
    """PEFT's model of `model`'s base holding its adapters `names` (all, by default) with exactly our tensors."""
    names = list(model.adapters) if names is None else names
    first = names[0]
    twin = peft.get_peft_model(hf_twin(model.base_model), peft_config(model.adapters[first].config), adapter_name=first)
    for name in names[1:]:
        twin.add_adapter(name, peft_config(model.adapters[name].config))
    for name in names:
        state = {k: torch.tensor(np.asarray(v)) for k, v in model.adapter_state_dict(name).items()}
        result = peft.set_peft_model_state_dict(twin, state, adapter_name=name)
        assert not result.unexpected_keys, result.unexpected_keys
    twin.set_adapter(first)
    return twin.eval()


def peft_delta(twin: peft.PeftModel, module: str, name: str) -> np.ndarray:
    """PEFT's update of `module` by adapter `name`: s (B A)ᵀ, (in, out) for GPT-2's Conv1D."""
    layer = twin.base_model.model.get_submodule(module)
    if name not in layer.lora_A:
        return np.zeros(layer.base_layer.weight.shape)
    return layer.get_delta_weight(name).detach().numpy()
