"""sparsetrain.collider.apply on Hugging Face Llama / Qwen2: gradients equal a
float64 reference that detaches dropped positions' keys and values up front."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsetrain.collider import apply, filter as collider_filter, masked_cross_entropy

transformers = pytest.importorskip("transformers")

_REFERENCE_KEEP: list[torch.Tensor] = []


def _detached_kv_attention(module, query, key, value, attention_mask, **kwargs):
    """Reference: the mask is known before the forward; dropped K/V detached in it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv_keep = _REFERENCE_KEEP[-1][:, None, :, None]
    key = torch.where(kv_keep, key, key.detach())
    value = torch.where(kv_keep, value, value.detach())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _model(family: str) -> torch.nn.Module:
    common = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    if family == "llama":
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))  # q/k/v biases
    return m.double().train()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_apply_matches_detached_kv_reference(family: str) -> None:
    ref = _model(family)
    model = apply(copy.deepcopy(ref))
    transformers.AttentionInterface.register("test_detached_kv", _detached_kv_attention)
    ref.set_attn_implementation("test_detached_kv")
    B, T = 3, 16
    ids = torch.randint(0, 120, (B, T))
    targets = torch.randint(0, 120, (B, T))
    keep = torch.rand(B, T) < torch.rand(B, 1).clamp(0.2, 0.9)  # uneven per sequence
    keep[:, 0] = True
    targets[0, 3] = -100  # an ignored target is never learned from

    _REFERENCE_KEEP.append(keep)
    try:
        masked_cross_entropy(ref(ids, use_cache=False).logits, targets, keep).backward()
    finally:
        _REFERENCE_KEEP.pop()
    want = _grads(ref)
    logits = model(ids, use_cache=False).logits
    with collider_filter(keep):
        masked_cross_entropy(logits, targets, keep).backward()
    got = _grads(model)
    assert set(got) == set(want)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-6, atol=1e-12), n
    # the embedding rows of tokens seen only at dropped positions get no gradient
    only_dropped = set(ids[~keep].tolist()) - set(ids[keep].tolist())
    emb = got["model.embed_tokens.weight"]
    assert all(emb[t].abs().max() == 0 for t in only_dropped)


def test_apply_outside_filter_is_dense_and_keeps_the_state_dict() -> None:
    ref = _model("llama")
    model = apply(copy.deepcopy(ref))
    assert model.state_dict().keys() == ref.state_dict().keys()
    ids = torch.randint(0, 120, (2, 12))
    for m in (ref, model):
        m(ids, labels=ids, use_cache=False).loss.backward()
    want, got = _grads(ref), _grads(model)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-9, atol=1e-12), n
