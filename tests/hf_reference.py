"""Shared by the Hugging Face Collider tests: tiny random Llama-family models and
the float64 reference (an ordinary autograd forward of the HF model that
detaches dropped positions' keys and values in every attention layer)."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
from conftest import fresh_seed  # noqa: F401  (the tests import it from here too)

transformers = importlib.import_module("transformers")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
REFERENCE_ATTENTION = "test_detached_kv"
_KEEP: list[torch.Tensor] = []


def _detached_kv_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA with dropped positions' keys and values detached (the mask is known up front)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv_keep = _KEEP[-1][:, None, :, None]
    key = torch.where(kv_keep, key, key.detach())
    value = torch.where(kv_keep, value, value.detach())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _wide_rms_norm(self, x: torch.Tensor) -> torch.Tensor:
    """HF's RMSNorm computing in float32 *or wider*: HF's own casts float64 to
    float32, which would make a float64 reference no better than float32."""
    wide = x if x.dtype == torch.float64 else x.float()
    return self.weight * (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


@contextlib.contextmanager
def float64_norms() -> Iterator[None]:
    """Every Llama-family RMSNorm computes float64 inputs in float64 (unchanged otherwise)."""
    classes = []
    for family in FAMILIES:
        mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        cls = getattr(mod, _CLASSES[family][1].replace("ForCausalLM", "RMSNorm"))
        classes.append((cls, cls.forward))
        cls.forward = _wide_rms_norm
    try:
        yield
    finally:
        for cls, fwd in classes:
            cls.forward = fwd


def make_model(family: str, seed: int, dtype: torch.dtype = torch.float64, **overrides) -> torch.nn.Module:
    """A tiny random model of ``family`` (grouped-query heads by default) in
    training mode, with norms and biases away from their initial values."""
    cfg_name, model_name = _CLASSES[family]
    kw = dict(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
    if family == "qwen3":
        kw["head_dim"] = 8
    kw.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**kw)).to(dtype).train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def reference_backward(model: torch.nn.Module, loss_of_logits, keep: torch.Tensor, ids: torch.Tensor) -> None:
    """Backward of ``loss_of_logits(model(ids).logits)`` with dropped keys and
    values detached in every layer (``model`` keeps the reference attention)."""
    transformers.AttentionInterface.register(REFERENCE_ATTENTION, _detached_kv_attention)
    model.set_attn_implementation(REFERENCE_ATTENTION)
    _KEEP.append(keep)
    try:
        loss_of_logits(model(ids, use_cache=False).logits).backward()
    finally:
        _KEEP.pop()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (cloned, in float64), then zeroed."""
    out = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-6) -> None:
    """Same parameters, each gradient within ``rtol`` relative (Frobenius) error."""
    assert set(got) == set(want), (set(got) ^ set(want))
    for n, w in want.items():
        err = float((got[n] - w).norm() / w.norm().clamp_min(1e-300))
        assert err <= rtol, (n, err)


def random_batch(B: int, T: int, vocab: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, targets (one ignored) and an uneven keep mask (at least one kept token per row)."""
    ids = torch.randint(0, vocab, (B, T), generator=g)
    targets = torch.randint(0, vocab, (B, T), generator=g)
    targets[0, min(3, T - 1)] = -100
    keep = torch.rand(B, T, generator=g) < torch.rand(B, 1, generator=g).clamp(0.2, 0.9)
    keep[:, 0] = True
    return ids, targets, keep


