"""PEFT methods, one file each. Importing a file registers its config types (so adapter_config.json files
of the method load) and its `MethodSpec` (tinypeft/methods/registry.py), one line per method below.

The order of those lines is the order the program lists the methods in: the golden vectors' index
and the CLI's method options. A new method appends its line.
"""

# isort: off
from .selective import BitFitConfig, LastBlocksConfig, LNTuningConfig, SelectiveConfig, freeze, trainable_only, unfreeze
from .lora import LoraConfig
from .prompt import PromptTuningConfig
from .prefix import PrefixTuningConfig
from .ia3 import IA3Config
from .adapter import AdapterConfig
from .ptuning import PromptEncoderConfig
from .vera import VeraConfig
from .loha import LoHaConfig
from .lokr import LoKrConfig
from .oft import OFTConfig
from .boft import BOFTConfig
from .adalora import AdaLoraConfig
from .trainable_tokens import TrainableTokensConfig

# isort: on
from .base import PEFT_PREFIX, Adapter, PeftConfig, match_modules, match_parameters
from .registry import METHODS, MethodSpec, method

__all__ = [
    "METHODS",
    "PEFT_PREFIX",
    "AdaLoraConfig",
    "Adapter",
    "AdapterConfig",
    "BOFTConfig",
    "BitFitConfig",
    "IA3Config",
    "LNTuningConfig",
    "LastBlocksConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "MethodSpec",
    "OFTConfig",
    "PeftConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "SelectiveConfig",
    "TrainableTokensConfig",
    "VeraConfig",
    "freeze",
    "match_modules",
    "match_parameters",
    "method",
    "trainable_only",
    "unfreeze",
]
