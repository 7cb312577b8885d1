"""Hypothesis strategies and helpers shared by the LoRA tests: random LoRA configs for a model, adapters
pushed away from their init, and DoRA's held-norm view."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from hypothesis import strategies as st
from strategies import cases

import tinypeft as tp
from tinypeft.sites import Sites

# every linear layer, each c_proj alone, and "c_proj", which hits both
TARGET_CHOICES = ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "c_proj")


@st.composite
def lora_configs(
    draw,
    cfg: tp.GPTConfig,
    inits=(False,),
    dora=None,
    dropout: bool = True,
    biases=("none", "all", "lora_only"),
) -> tp.LoraConfig:
    """A random LoraConfig valid for `cfg`: rank 1..min(in, out) (= n_embd for every GPT-2 layer), alpha,
    a target subset, DoRA and rsLoRA on or off, sometimes dropout, a bias option and an init.

    alpha is drawn through the scaling s it gives (alpha / r, or alpha / √r with rsLoRA), s in 1/4..8:
    at s = 32 the loss along B is so curved that the fourth-order finite difference itself errs by ~1e-5
    (seen), which would test the difference, not the code."""
    targets = draw(st.lists(st.sampled_from(TARGET_CHOICES), min_size=1, max_size=3, unique=True))
    r, use_rslora = draw(st.integers(1, cfg.n_embd)), draw(st.booleans())
    scaling = draw(st.sampled_from([0.25, 0.5, 1, 2, 4, 8]))
    return tp.LoraConfig(
        r=r,
        lora_alpha=scaling * (math.sqrt(r) if use_rslora else r),
        lora_dropout=draw(st.sampled_from([0.0, 0.0, 0.25, 0.5])) if dropout else 0.0,
        target_modules=targets,
        use_rslora=use_rslora,
        use_dora=draw(st.booleans()) if dora is None else dora,
        init_lora_weights=draw(st.sampled_from(inits)),
        bias=draw(st.sampled_from(biases)),
    )


def well_conditioned_cases(**kwargs):
    """tests/strategies.py's cases with n_embd >= 4. A LayerNorm over 2 or 3 features is nearly a sign
    function: its backward is an almost total cancellation, every gradient below ln_f inherits it, and a
    1e-10 comparison of two correct gradients then measures that conditioning instead of the code (seen:
    1e-6 relative between hand and autograd at n_embd = 2). The base model's own tests cover those sizes."""
    return cases(**kwargs).filter(lambda case: case.model.config.n_embd >= 4)


@st.composite
def lora_cases(draw, case_kwargs=None, **config_kwargs):
    """(case, config): a random float64 model and batch (tests/strategies.py) and a LoRA config for it."""
    case = draw(well_conditioned_cases(**(case_kwargs or {})))
    return case, draw(lora_configs(case.model.config, **config_kwargs))


def perturb_adapter(model: tp.PeftModel, seed: int, scale: float = 0.3) -> None:
    """Move every tensor of the active adapter off its init (B != 0, DoRA's k != 1, trained biases != the
    base's), so that no gradient is zero by construction and a stand-in that is ignored shows.

    B is then divided by the scaling s when s > 1, so that s B A stays the size of W's entries rather
    than s times it (a huge update makes the loss so curved along A that finite differences err)."""
    rng = np.random.default_rng(seed)
    params = model.active.params
    shrink = max(1.0, model.active.config.scaling)
    for name, value in params.items():
        noise = scale * rng.standard_normal(value.shape).astype(value.dtype)
        if name.endswith("lora_magnitude_vector"):
            params[name] = value * (1 + noise)
        elif name.endswith("lora_B.weight"):
            params[name] = (value + noise) / value.dtype.type(shrink)
        else:
            params[name] = value + noise


def lora_model(case, config: tp.LoraConfig, train: bool = False) -> tp.PeftModel:
    model = tp.get_peft_model(case.model, config, seed=case.seed)
    perturb_adapter(model, case.seed)
    return model.train(train)


def held_norm_view(view):
    """The view with DoRA's weight norms fixed at their current values: a forward whose true derivative is
    the detached-norm gradient, so finite differences can check it."""
    sites = view.sites.linear
    if not sites:
        return view
    held = next(iter(sites.values())).holding_norms(view.params)
    return dataclasses.replace(view, sites=Sites(linear=dict.fromkeys(sites, held)))
