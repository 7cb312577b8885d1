"""Mixed-batch inference: each row of a batch computed with an adapter of its own (PEFT's `adapter_names`).

Row b with adapter a_b computes exactly what the model with a_b alone computes for it; "__base__" (PEFT's
name) is the base model. The base model's computation is shared: only the linear layers differ between
rows, so one forward serves the whole batch with, at every linear layer the adapters touch, a site that
splits the rows by adapter, runs each group through its adapter's own site (or the base layer), and puts
the rows back in order:

    y[rows of a] = site_a(x[rows of a])        for each adapter a in the batch

PEFT computes the base layer once for the whole batch and adds each group's LoRA term to its rows; for
LoRA that is the same sum, y = x W + b + s x Aᵀ Bᵀ, in another grouping. Here any adapter that acts only
through its linear layers can take part (LoRA with its variants, IA3, bottleneck adapters); an adapter that
puts tokens or keys in front (prompt, prefix tuning) changes the sequence, and one that retrains other base
tensors (LayerNorms, embeddings) changes more than linear layers: both are refused. The mixed batch is for
inference: there is no backward (PEFT refuses it in training mode too).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from .backend import Array
from .engine import ComputeView
from .errors import ConfigError, InputError
from .gpt import BASE_LINEAR
from .methods.base import Adapter
from .sites import Params, Sites

BASE_NAME = "__base__"  # PEFT's name for the rows that use no adapter


class MixedLinear:
    """The site at one linear module for a mixed batch: `groups` holds, per adapter, its rows (an index array),
    its site at this module (or the base layer, for "__base__" and adapters that do not target it) and the
    parameters that site reads."""

    def __init__(self, groups: Sequence[tuple[np.ndarray, Any, Params]], xp: Any) -> None:
        self.groups = [(xp.asarray(rows), site, group_params) for rows, site, group_params in groups]
        self.xp = xp
        self.order = xp.asarray(np.argsort(np.concatenate([rows for rows, _, _ in groups]), kind="stable"))

    def forward(self, params: Params, module: str, x: Array) -> tuple[Array, None]:
        parts = [site.forward(group_params, module, x[rows])[0] for rows, site, group_params in self.groups]
        return self.xp.concatenate(parts, axis=0)[self.order], None  # [rows of each group] -> [batch order]

    def backward(self, dy: Array, cache: None, trainable: Collection[str], need_dx: bool = True) -> Any:
        raise ConfigError("a mixed batch (adapter_names) is for inference only; it has no backward")

    def owned(self, module: str) -> tuple[str, ...]:
        return ()


def check_mixable(name: str, adapter: Adapter) -> Sites:
    """The adapter's sites, if it acts only through linear layers, and its trained base tensors, if any, belong
    to those layers."""
    sites = adapter.sites(training=False)
    if sites.tokens is not None:
        raise ConfigError(
            f"adapter {name!r} ({adapter.config.peft_type}) changes the token table, which the tied head reads for "
            "every row; a mixed batch (adapter_names) takes adapters of linear layers only"
        )
    if sites.embedding is not None or sites.prefix is not None:
        raise ConfigError(
            f"adapter {name!r} ({adapter.config.peft_type}) puts positions in front of the tokens, which would change "
            "the sequence of its rows alone; a mixed batch (adapter_names) takes adapters of linear layers only"
        )
    outside = [b for b in adapter.overrides if b.rpartition(".")[0] not in sites.linear]
    if outside:
        raise ConfigError(
            f"adapter {name!r} retrains {outside[0]}, outside the linear layers it adapts; a mixed batch "
            "(adapter_names) can give each row its own linear layers only"
        )
    return sites


def mixed_view(base_view: ComputeView, adapters: Mapping[str, Adapter], names: Any, batch_size: int) -> ComputeView:
    """A view of the base whose linear layers give row b the adapter names[b] (or the base, for "__base__")."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise InputError(f"adapter_names must be a list of adapter names, one per row; got {names!r}")
    if len(names) != batch_size:
        raise InputError(
            f"adapter_names has {len(names)} name(s) for a batch of {batch_size} row(s); give one per row "
            f"(an adapter's name or {BASE_NAME!r})"
        )
    unknown = sorted({n for n in names if n != BASE_NAME and n not in adapters})
    if unknown:
        raise InputError(
            f"adapter_names holds unknown adapter(s) {unknown}; the adapters are {sorted(adapters)} "
            f"(and {BASE_NAME!r} for the base model)"
        )
    used = list(dict.fromkeys(names))  # in order of first use
    rows = {n: np.flatnonzero(np.array([m == n for m in names])) for n in used}
    sites, params = {}, {}
    for n in used:
        if n != BASE_NAME:
            a = adapters[n]
            sites[n] = check_mixable(n, a).linear
            params[n] = {**base_view.params, **a.params, **{b: a.params[k] for b, k in a.overrides.items()}}
    modules = dict.fromkeys(m for n in sites for m in sites[n])
    linear = {}
    for module in modules:
        groups = [
            (rows[n], sites[n][module], params[n])
            if n in sites and module in sites[n]
            else (rows[n], BASE_LINEAR, base_view.params)
            for n in used
        ]
        linear[module] = MixedLinear(groups, base_view.xp)
    return ComputeView(base_view.config, base_view.xp, base_view.params, Sites(linear=linear), frozenset())
