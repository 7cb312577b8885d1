"""PEFT methods, one file each. Importing this package registers every method's config type so
adapter_config.json files of any of them load."""

from .adapter import AdapterConfig
from .base import PEFT_PREFIX, Adapter, PeftConfig, match_modules, match_parameters
from .ia3 import IA3Config
from .lora import LoraConfig
from .prefix import PrefixTuningConfig
from .prompt import PromptTuningConfig
from .selective import (
    BitFitConfig,
    LastBlocksConfig,
    LNTuningConfig,
    SelectiveConfig,
    freeze,
    trainable_only,
    unfreeze,
)

__all__ = [
    "PEFT_PREFIX",
    "Adapter",
    "AdapterConfig",
    "BitFitConfig",
    "IA3Config",
    "LNTuningConfig",
    "LastBlocksConfig",
    "LoraConfig",
    "PeftConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "SelectiveConfig",
    "freeze",
    "match_modules",
    "match_parameters",
    "trainable_only",
    "unfreeze",
]
