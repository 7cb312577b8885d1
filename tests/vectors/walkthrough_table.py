"""docs/walkthrough.md's table of which modules a config touches, computed by tinypeft itself (each config's
own matching: LoRA's targets, IA3's targets and feed-forward rule, the adapters' placement, the selected base
tensors), so that the table cannot say what the code does not do. test_vectors_page.py checks the page holds
what `render` gives; `PYTHONPATH=.:tests python tests/vectors/vectors_page.py` rewrites it.
"""

from __future__ import annotations

from collections import defaultdict

from tinypeft.methods import (
    AdapterConfig,
    BitFitConfig,
    IA3Config,
    LNTuningConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from tinypeft.model import GPT, GPTConfig
from tinypeft.peft_model import get_peft_model

ORDER = ("ln_1", "attn", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")  # a block's, in order

# (config as written in the table, the config): PEFT's defaults and the corners of each matching rule
CONFIGS: list[tuple[str, PeftConfig]] = [
    ("LoraConfig()", LoraConfig()),
    ('LoraConfig(target_modules=["c_proj"])', LoraConfig(target_modules=["c_proj"])),
    (
        'LoraConfig(target_modules=["c_attn", "mlp.c_fc"], use_dora=True, bias="lora_only")',
        LoraConfig(target_modules=["c_attn", "mlp.c_fc"], use_dora=True, bias="lora_only"),
    ),
    ('LoraConfig(target_modules=r"transformer\\.h\\.1\\.mlp\\..*", bias="all")',
     LoraConfig(target_modules=r"transformer\.h\.1\.mlp\..*", bias="all")),
    ("IA3Config()", IA3Config()),
    ('IA3Config(target_modules=["c_attn"])', IA3Config(target_modules=["c_attn"])),
    (
        'IA3Config(target_modules=["c_attn", "c_proj", "c_fc"], feedforward_modules=["c_proj"])',
        IA3Config(target_modules=["c_attn", "c_proj", "c_fc"], feedforward_modules=["c_proj"]),
    ),
    ('IA3Config(target_modules=".*", feedforward_modules=["_fc"])',
     IA3Config(target_modules=".*", feedforward_modules=["_fc"])),
    ("AdapterConfig()", AdapterConfig()),
    ('AdapterConfig(placement="attn")', AdapterConfig(placement="attn")),
    ('AdapterConfig(placement="mlp")', AdapterConfig(placement="mlp")),
    ("BitFitConfig()", BitFitConfig()),
    ("LNTuningConfig()", LNTuningConfig()),
    ('LNTuningConfig(target_modules=["ln_f"])', LNTuningConfig(target_modules=["ln_f"])),
    ("PromptTuningConfig(num_virtual_tokens=4)", PromptTuningConfig(num_virtual_tokens=4)),
    ("PrefixTuningConfig(num_virtual_tokens=4)", PrefixTuningConfig(num_virtual_tokens=4)),
]  # fmt: skip


def touched(config: PeftConfig, base: GPT) -> dict[str, list[str]]:
    """module -> what the config does there, for every module it touches."""
    where: dict[str, list[str]] = defaultdict(list)
    if isinstance(config, LoraConfig):
        for module in config.targets(base):
            where[module].append("DoRA" if config.use_dora else "LoRA")
    elif isinstance(config, IA3Config):
        for module, feedforward in config.targets(base).items():
            where[module].append("$\\ell$ scales its input" if feedforward else "$\\ell$ scales its output")
    elif isinstance(config, AdapterConfig):
        for module in config.modules(base):
            where[module].append("adapter on its output")
    elif isinstance(config, PromptTuningConfig):
        where["transformer.wte"].append("$N_V$ rows in front of the token embeddings")
    elif isinstance(config, PrefixTuningConfig):
        for i in range(base.config.n_layer):
            where[f"transformer.h.{i}.attn"].append("$N_V$ keys and values in front")
    adapter = get_peft_model(base, config).active
    for name in adapter.overrides:  # base tensors that train (as copies)
        module, leaf = name.rsplit(".", 1)
        where[module].append(f"{leaf} trains")
    return where


def describe(where: dict[str, list[str]], n_layer: int) -> str:
    """One line: the modules of every block when the blocks agree, else block by block; then the rest."""
    blocks = [
        {m: where[f"transformer.h.{i}.{m}"] for m in ORDER if f"transformer.h.{i}.{m}" in where} for i in range(n_layer)
    ]
    rest = {m.removeprefix("transformer."): v for m, v in where.items() if not m.startswith("transformer.h.")}

    def items(d: dict[str, list[str]]) -> str:
        return "; ".join(f"`{m}`: {', '.join(v)}" for m, v in d.items())

    parts = []
    if all(b == blocks[0] for b in blocks) and blocks[0]:
        parts.append(f"every block: {items(blocks[0])}")
    else:
        parts += [f"block {i}: {items(b)}" for i, b in enumerate(blocks) if b]
    if rest:
        parts.append(items(rest))
    return "<br>".join(parts)


def render() -> str:
    base = GPT(GPTConfig(vocab_size=32, n_positions=16, n_embd=8, n_layer=2, n_head=2), device="cpu")
    rows = ["| config | what it touches (a model of 2 blocks) |", "|---|---|"]
    for text, config in CONFIGS:
        rows.append(f"| `{text}` | {describe(touched(config, base), base.config.n_layer)} |")
    return "\n".join(rows)
