"""``model.ffn = relu2_24``: converts a built GPT's squared-ReLU FFNs into
:class:`~sparsetrain.sparse24.ffn.Sparse24FFN` modules, and owns the config
fields of the technique (:func:`check_model_config`).

The converted FFN takes over the dense FFN's ``up`` and ``down`` projections
(the same parameters, no new random draws), so a model converted here has the
weights and the state-dict keys a model built with the 2:4 FFN in place had:
``up.weight``, ``down.weight`` and the buffers ``steps`` and ``scale``.
"""

from __future__ import annotations

from ..config import ModelConfig, require
from ..kernels import KernelPolicy
from ..model import GPT, FeedForward
from .ffn import Sparse24FFN
from .sparsify import METHODS


def check_model_config(cfg: ModelConfig) -> None:
    """The config fields this technique owns (``model.activation_*``, and the hidden
    size a 2:4 FFN needs)."""
    require(cfg.activation_sparse_method in METHODS,
            f"model.activation_sparse_method must be one of {', '.join(METHODS)}, got {cfg.activation_sparse_method!r}")
    require(cfg.activation_dense_warmup_steps >= 0,
            f"model.activation_dense_warmup_steps must be >= 0, got {cfg.activation_dense_warmup_steps}")
    require(0 <= cfg.activation_dense_fraction <= 1,
            f"model.activation_dense_fraction must be in [0, 1], got {cfg.activation_dense_fraction}")
    if cfg.ffn == "relu2_24":
        require(cfg.hidden_size % 4 == 0, f"model.ffn_hidden must be a multiple of 4 for relu2_24, got {cfg.hidden_size}")


def convert_ffns(model: GPT, cfg: ModelConfig, policy: KernelPolicy | None = None) -> GPT:
    """Replace every block's squared-ReLU :class:`~sparsetrain.model.FeedForward` by a
    :class:`Sparse24FFN` with ``cfg``'s method, dense warmup and dense fraction,
    dispatching by ``policy`` (default: the current one at each call). In place;
    returns ``model``."""
    for block in model.blocks:
        ffn = block.ffn
        if not isinstance(ffn, FeedForward) or ffn.gate is not None:
            raise ValueError(f"relu2_24 converts squared-ReLU FFNs, got {type(ffn).__name__}"
                             f"{' with a SwiGLU gate' if isinstance(ffn, FeedForward) else ''}")
        hidden, d_model = ffn.up.weight.shape
        block.ffn = Sparse24FFN(d_model, hidden, cfg.activation_sparse_method, cfg.activation_dense_warmup_steps,
                                cfg.activation_dense_fraction, policy=policy, up=ffn.up, down=ffn.down)
    return model
