"""Hypothesis strategies and helpers shared by the LoHa and LoKr tests: random configs (ranks, scales,
target lists and regexes, LoKr's decomposition), adapters moved off their init, and a torch.rand that
hands PEFT the very draws tinypeft's dropouts made."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from hypothesis import strategies as st

import tinypeft as tp

# each linear layer, "c_proj" (both projections), lists of them, and full-match regexes
TARGET_CHOICES = ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "c_proj")
REGEX_TARGETS = (
    r"transformer\.h\.0\..*c_\w+",
    r".*\.mlp\.c_\w+",
    r".*c_(attn|fc)",
)  # linear layers only, as PEFT needs


@st.composite
def targets(draw) -> list[str] | str:
    if draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(REGEX_TARGETS))
    return draw(st.lists(st.sampled_from(TARGET_CHOICES), min_size=1, max_size=3, unique=True))


@st.composite
def dropouts(draw, dropout: bool) -> dict[str, float]:
    if not dropout:
        return {}
    return {
        "rank_dropout": draw(st.sampled_from([0.0, 0.25, 0.5])),
        "module_dropout": draw(st.sampled_from([0.0, 0.25, 0.5])),
    }


@st.composite
def loha_configs(draw, dropout: bool = False, inits=(False, True)) -> tp.LoHaConfig:
    """A LoHaConfig: r in 1..5 (r may exceed a layer's in or out: LoHa allows it), s = alpha / r in 1/2..2
    (5/3 among them: no float32 holds it), targets, an init (the adapter is perturbed after, so True's W2b = 0
    is left), maybe dropouts."""
    r = draw(st.integers(1, 5))
    s = draw(st.sampled_from([0.5, 1.0, 5 / 3, 2.0]))
    return tp.LoHaConfig(
        r=r, alpha=s * r, target_modules=draw(targets()), init_weights=draw(st.sampled_from(inits)),
        **draw(dropouts(dropout)),
    )  # fmt: skip


def perturb_adapter(model: tp.PeftModel, seed: int, scale: float = 0.3) -> None:
    """Move every tensor of the active adapter off its init (LoHa's W2b = 0, LoKr's W1 = 0), so that no
    gradient is zero by construction."""
    rng = np.random.default_rng(seed)
    params = model.active.params
    for name, value in params.items():
        params[name] = value + scale * rng.standard_normal(value.shape).astype(value.dtype)


def peft_draws(site) -> Iterator[torch.Tensor]:
    """The uniforms tinypeft's `DeltaSite` drew for one forward, in the order PEFT's LoHa/LoKr layers call
    torch.rand in theirs: layer by layer in model order, the module-dropout coin torch.rand(1), then, if the
    layer is applied and rank dropout is on, torch.rand(out). With both dropouts 0 tinypeft draws nothing
    (`dropout_key` None) and PEFT still tosses the coin: any value applies the layer."""
    config = site.adapter.config
    for layer in site.adapter.layers:
        coin, rows = site.uniforms(layer.module) if site.dropout_key is not None else (1.0, None)
        yield torch.tensor([coin], dtype=torch.float64)
        if coin > config.module_dropout and config.rank_dropout > 0:
            yield torch.tensor(rows, dtype=torch.float64)


class FixedRand:
    """Stands in for the `torch` module inside peft's LoHa/LoKr layer file: `rand` returns the given draws
    in order (checking the shape asked for), everything else is torch's."""

    def __init__(self, draws: Iterator[torch.Tensor]) -> None:
        self.draws = list(draws)

    def rand(self, *shape: int) -> torch.Tensor:
        value = self.draws.pop(0)
        assert tuple(value.shape) == tuple(shape), (value.shape, shape)
        return value

    def __getattr__(self, name: str):
        return getattr(torch, name)


@st.composite
def lokr_configs(draw, dropout: bool = False, inits=(False, True, "lycoris")) -> tp.LoKrConfig:
    """A LoKrConfig: r in 1..6 (small r: W2 (and with decompose_both W1) low-rank; large r: full matrices),
    s = alpha / r in 1/2..2, targets, decompose_both, a decompose_factor (-1, one that divides many sizes, or
    one that divides few), an init, maybe dropouts and rank_dropout_scale."""
    r = draw(st.integers(1, 6))
    s = draw(st.sampled_from([0.5, 1.0, 5 / 3, 2.0]))
    return tp.LoKrConfig(
        r=r, alpha=s * r, target_modules=draw(targets()), init_weights=draw(st.sampled_from(inits)),
        decompose_both=draw(st.booleans()), decompose_factor=draw(st.sampled_from([-1, -1, 1, 2, 3, 4, 5])),
        rank_dropout_scale=draw(st.booleans()), **draw(dropouts(dropout)),
    )  # fmt: skip
