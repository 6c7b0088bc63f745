"""sparsetrain: cheaper language-model training, measured.

Public API::

    from sparsetrain import GPT, ModelConfig, TrainConfig, build_config, Trainer, train
"""

from .config import ModelConfig, TrainConfig, build_config, list_presets
from .data import TokenizedCorpus, load_corpus
from .errors import CheckpointError, ConfigError, DataError, SparsetrainError
from .generate import generate_text, load_model
from .model import GPT
from .tokenizer import BPETokenizer
from .trainer import Trainer, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "BPETokenizer",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "GPT",
    "ModelConfig",
    "SparsetrainError",
    "TokenizedCorpus",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_config",
    "generate_text",
    "list_presets",
    "load_corpus",
    "load_model",
    "train",
]
