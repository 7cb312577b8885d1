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
    AdaLoraConfig,
    AdapterConfig,
    BitFitConfig,
    BOFTConfig,
    IA3Config,
    LastBlocksConfig,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    SelectiveConfig,
    TrainableTokensConfig,
    VeraConfig,
    freeze,
    trainable_only,
    unfreeze,
)
from .model import GPT, GPTConfig
from .optim import SGD, AdamW
from .peft_model import PeftModel, get_peft_model
from .sites import Sites
from .tokenizer import Tokenizer, load_tokenizer
from .train import TrainConfig, TrainResult, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "SGD",
    "SHIPPED_BASE",
    "AdaLoraConfig",
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
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "MergeError",
    "OFTConfig",
    "PeftConfig",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "SelectiveConfig",
    "Sites",
    "TinyPeftError",
    "Tokenizer",
    "TrainConfig",
    "TrainResult",
    "TrainableTokensConfig",
    "TrainingError",
    "VeraConfig",
    "evaluate",
    "freeze",
    "get_peft_model",
    "load_corpus",
    "load_tokenizer",
    "train",
    "trainable_only",
    "unfreeze",
]
