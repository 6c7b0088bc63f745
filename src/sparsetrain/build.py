"""The network a :class:`~sparsetrain.config.ModelConfig` names: its
architecture (the GPT decoder, or ResNet-BK), then the converters that change
a built GPT (``ffn = relu2_24``: the 2:4 FFN; ``hyper_connections``: residual
streams).

Each technique owns its config checks; importing this module registers them
with :mod:`sparsetrain.config`, so :meth:`ModelConfig.validate` runs them.
"""

from __future__ import annotations

import dataclasses

from . import hyper
from .bk.model import ResNetBK
from .bk.model import check_model_config as check_resnet_bk
from .config import ModelConfig, register_model_check
from .kernels import KernelPolicy
from .model import GPT, CausalLM
from .sparse24.convert import check_model_config as check_sparse24
from .sparse24.convert import convert_ffns

register_model_check("relu2_24", check_sparse24)
register_model_check("hyper_connections", hyper.check_model_config)
register_model_check("resnet_bk", check_resnet_bk)


def build_model(cfg: ModelConfig, policy: KernelPolicy | None = None) -> CausalLM:
    """The network ``cfg`` describes: :class:`~sparsetrain.bk.ResNetBK` for
    ``arch = resnet_bk``; otherwise the plain :class:`~sparsetrain.model.GPT`
    with ``cfg``'s converters applied. ``policy``: the kernel policy the 2:4
    FFNs dispatch by (default: :func:`sparsetrain.kernels.current` at each call).

    The converters take over the dense modules' parameters and draw nothing
    random, so the weights and state-dict keys are those of a GPT that built the
    converted modules itself."""
    cfg.validate()
    if cfg.arch == "resnet_bk":
        return ResNetBK(cfg)
    plain = dataclasses.replace(cfg, ffn="relu2" if cfg.ffn == "relu2_24" else cfg.ffn, hyper_connections=0)
    model = GPT(plain)
    if cfg.ffn == "relu2_24":
        convert_ffns(model, cfg, policy)
    if cfg.hyper_connections:
        hyper.add_hyper_connections(model, cfg.hyper_connections)
    model.config = cfg
    return model
