"""tinypeft: parameter-efficient fine-tuning from scratch, in NumPy, checked three ways."""

from .data import load_corpus
from .errors import (
    CheckpointError,
    ConfigError,
    InputError,
    InputTypeError,
    MergeError,
    TinyPeftError,
    TrainingError,
)
from .experiment import SHIPPED_BASE
from .methods import (
    AdapterConfig,
    BitFitConfig,
    BOFTConfig,
    IA3Config,
    LastBlocksConfig,
    LNTuningConfig,
    LoraConfig,
    OFTConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    SelectiveConfig,
    freeze,
    trainable_only,
    unfreeze,
)
from .model import GPT, GPTConfig
from .optim import SGD, AdamW
from .peft_model import PeftModel, get_peft_model
from .sites import Sites
from .train import TrainConfig, TrainResult, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "SGD",
    "SHIPPED_BASE",
    "AdamW",
    "AdapterConfig",
    "BOFTConfig",
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
    "OFTConfig",
    "PeftConfig",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "SelectiveConfig",
    "Sites",
    "TinyPeftError",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "evaluate",
    "freeze",
    "get_peft_model",
    "load_corpus",
    "train",
    "trainable_only",
    "unfreeze",
]
