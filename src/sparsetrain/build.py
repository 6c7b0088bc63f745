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
        hyper.add_hyper_connections(model, cfg.hyper_connections, cfg.hyper_write_init, cfg.hyper_stream_dtype)
    model.config = cfg
    return model


# The fields that decide what a network's weights are: their names and shapes, and
# what each one holds (n_head splits the same qkv matrix into other heads; a tied
# embedding is one tensor where an untied model has two). seq_len, rope_theta,
# norm_eps, init_std and the training schedules of the 2:4 FFN and the BK layers
# shape no weight (the RoPE tables are rebuilt from the config, not saved).
WEIGHT_FIELDS = ("arch", "vocab_size", "n_layer", "n_head", "d_model", "ffn", "ffn_hidden", "tie_embeddings",
                 "hyper_connections")


def _weight_layout(cfg: ModelConfig) -> dict[str, object]:
    layout: dict[str, object] = {name: getattr(cfg, name) for name in WEIGHT_FIELDS}
    layout["ffn_hidden"] = cfg.hidden_size  # resolved: 0 stands for a size derived from d_model and ffn
    if cfg.arch == "resnet_bk":
        layout["bk_num_experts"] = cfg.bk_num_experts
        layout["bk_sparsity"] = cfg.bk_sparsity > 0  # only sparse BK layers have the skip predictor
    return layout


def weights_differences(saved: ModelConfig, wanted: ModelConfig) -> list[str]:
    """``"name=X there vs Y here"`` for each field that makes weights saved by a
    ``saved`` network mean something else in a ``wanted`` one (empty: they load
    as they are, whatever the fields that shape no weight say)."""
    a, b = _weight_layout(saved), _weight_layout(wanted)

    def shown(cfg: ModelConfig, name: str) -> str:
        value = getattr(cfg, name)
        return f"0 (= {cfg.hidden_size})" if name == "ffn_hidden" and not value else repr(value)

    # A field one architecture lacks is not compared: the arch difference says it all. Nor is an
    # ffn_hidden set alike on both sides: its resolved sizes differ by a d_model or ffn named already.
    return [f"{name}={shown(saved, name)} there vs {shown(wanted, name)} here" for name in a
            if name in b and a[name] != b[name] and getattr(saved, name) != getattr(wanted, name)]
