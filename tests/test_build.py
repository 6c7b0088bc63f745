"""Building networks: the architecture, then the converters (2:4 FFN,
hyper-connections), each owning its config checks. Checkpoints keep loading:
the state-dict keys of every converted network are the ones its module
structure had when the converters' modules were built inside the GPT."""

from __future__ import annotations

import pytest
import torch

from sparsetrain.build import build_model
from sparsetrain.config import ModelConfig, build_config, registered_checks
from sparsetrain.errors import ConfigError
from sparsetrain.model import GPT

SHAPE = dict(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=32)


def _gpt_keys(n_layer: int, ffn: list[str], block_extra: list[str] = (), model_extra: list[str] = ()) -> set[str]:
    """State-dict keys of a GPT: embedding, blocks (attention, FFN ``ffn`` entries, ``block_extra``), final norm, head."""
    keys = {"embed.weight", "norm.weight", "lm_head.weight", *model_extra}
    for i in range(n_layer):
        keys |= {f"blocks.{i}.{k}" for k in ["attn_norm.weight", "attn.qkv.weight", "attn.proj.weight", "ffn_norm.weight"]}
        keys |= {f"blocks.{i}.ffn.{k}" for k in ffn}
        keys |= {f"blocks.{i}.{k}" for k in block_extra}
    return keys


HYPER = [f"{hc}.{p}" for hc in ("hc_attn", "hc_ffn") for p in ("res_logits", "pre_logits", "post_logits")]


@pytest.mark.parametrize("overrides, keys", [
    ({}, _gpt_keys(2, ["up.weight", "down.weight"])),
    ({"ffn": "swiglu"}, _gpt_keys(2, ["up.weight", "gate.weight", "down.weight"])),
    ({"ffn": "relu2_24"}, _gpt_keys(2, ["up.weight", "down.weight", "steps", "scale"])),
    ({"hyper_connections": 2}, _gpt_keys(2, ["up.weight", "down.weight"], HYPER, ["hyper_in", "hyper_out"])),
    ({"ffn": "relu2_24", "hyper_connections": 4},
     _gpt_keys(2, ["up.weight", "down.weight", "steps", "scale"], HYPER, ["hyper_in", "hyper_out"])),
])
def test_converted_networks_keep_their_state_dict_keys(overrides: dict, keys: set[str]) -> None:
    model = build_model(ModelConfig(**SHAPE, **overrides))
    assert set(model.state_dict()) == keys
    assert model.config == ModelConfig(**SHAPE, **overrides)


BK_LAYER = ["bk_scale", "feature_proj.weight", "feature_proj.bias", "v_proj.weight", "v_proj.bias",
            "moe.router.weight", "moe.up", "moe.down"]
BK_SPARSE = ["interp.weight", "interp.bias", "predictor.0.weight", "predictor.0.bias", "predictor.2.weight",
             "predictor.2.bias", "steps_done"]


@pytest.mark.parametrize("sparsity, layer", [(0.0, BK_LAYER), (0.5, BK_LAYER + BK_SPARSE)])
def test_resnet_bk_keeps_its_state_dict_keys(sparsity: float, layer: list[str]) -> None:
    model = build_model(ModelConfig(**SHAPE, arch="resnet_bk", bk_num_experts=2, bk_sparsity=sparsity))
    want = {"embed.weight", "norm.weight", "lm_head.weight"}
    want |= {f"blocks.{i}.{k}" for i in range(2) for k in ["norm.weight", *(f"layer.{n}" for n in layer)]}
    assert set(model.state_dict()) == want


def test_relu2_24_conversion_keeps_the_dense_weights_and_output() -> None:
    """During the dense warmup the converted 2:4 model is the plain relu2 GPT with
    the same weights (float64, exactly), and the conversion drew nothing random."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    state = torch.random.get_rng_state()
    converted = build_model(ModelConfig(**SHAPE, ffn="relu2_24", activation_dense_warmup_steps=5)).double()
    after_converted = torch.random.get_rng_state()
    torch.random.set_rng_state(state)
    plain = GPT(ModelConfig(**SHAPE)).double()
    assert torch.equal(torch.random.get_rng_state(), after_converted)
    for k, v in plain.state_dict().items():
        assert torch.equal(converted.state_dict()[k], v), k
    idx = torch.randint(0, 300, (2, 16))
    assert torch.equal(converted(idx)[0], plain(idx)[0])


def test_gpt_refuses_what_only_build_model_applies() -> None:
    for overrides, name in (({"ffn": "relu2_24"}, "relu2_24"), ({"hyper_connections": 2}, "hyper_connections")):
        with pytest.raises(ConfigError, match=f"{name} is applied by sparsetrain.build.build_model"):
            GPT(ModelConfig(**SHAPE, **overrides))


@pytest.mark.parametrize("overrides, message", [
    ({"hyper_connections": 3}, "model.hyper_connections must be 0, 2 or 4, got 3"),
    ({"activation_sparse_method": "best"}, "model.activation_sparse_method must be one of naive"),
    ({"ffn": "relu2_24", "ffn_hidden": 130}, "multiple of 4 for relu2_24, got 130"),
    ({"bk_tau": 0.0}, "model.bk_tau must be > 0"),
    ({"arch": "resnet_bk", "ffn": "swiglu"}, "model.ffn must be relu2"),
])
def test_each_technique_checks_its_own_fields(overrides: dict, message: str) -> None:
    assert {"relu2_24", "hyper_connections", "resnet_bk"} <= set(registered_checks()["model"])
    assert {"selection", "collider", "mtp", "reference", "optimizer"} <= set(registered_checks()["training"])
    with pytest.raises(ConfigError, match=message):
        build_config("tiny", overrides=overrides)
    with pytest.raises(ConfigError, match=message):
        build_model(ModelConfig(**SHAPE, **overrides))
