"""tinypeft: parameter-efficient fine-tuning from scratch, in NumPy, checked three ways."""

from .errors import (
    CheckpointError,
    ConfigError,
    InputError,
    InputTypeError,
    MergeError,
    TinyPeftError,
    TrainingError,
)
from .methods import (
    AdapterConfig,
    BitFitConfig,
    IA3Config,
    LastBlocksConfig,
    LNTuningConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    SelectiveConfig,
    freeze,
    trainable_only,
    unfreeze,
)
from .model import GPT, GPTConfig
from .peft_model import PeftModel, get_peft_model
from .sites import Sites

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "AdapterConfig",
    "BitFitConfig",
    "CheckpointError",
    "ConfigError",
    "GPTConfig",
    "IA3Config",
    "InputError",
    "InputTypeError",
    "LNTuningConfig",
    "LastBlocksConfig",
    "LoraConfig",
    "MergeError",
    "PeftConfig",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "SelectiveConfig",
    "Sites",
    "TinyPeftError",
    "TrainingError",
    "freeze",
    "get_peft_model",
    "trainable_only",
    "unfreeze",
]
