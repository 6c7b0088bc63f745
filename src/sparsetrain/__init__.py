"""sparsetrain: cheaper language-model training, measured.

Public API::

    from sparsetrain import GPT, ModelConfig, TrainConfig, build_config, build_model, Trainer, train

Importing the package registers every technique's config checks with
``sparsetrain.config`` (``build`` for the network converters, ``objectives``
for the training objectives), so a config validated anywhere meets all of them.
"""

from . import build, objectives, optimizers  # noqa: F401  (registers the techniques' config checks)
from .build import build_model
from .config import ModelConfig, TrainConfig, build_config, list_presets
from .data import TokenizedCorpus, load_corpus
from .errors import CheckpointError, ConfigError, DataError, SparsetrainError
from .generate import generate_text, generate_texts, load_model
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
    "build_model",
    "generate_text",
    "generate_texts",
    "list_presets",
    "load_corpus",
    "load_model",
    "train",
]
