"""Kernel dispatch policy: read from the environment once, changed only as a
whole (a new frozen object), and what the dispatching modules follow."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import requires_cuda
from sparsetrain import cross_entropy as ce
from sparsetrain import kernels
from sparsetrain.errors import ConfigError
from sparsetrain.kernels import KernelPolicy


def test_policy_reads_the_environment_it_is_given() -> None:
    assert KernelPolicy.from_env({}) == KernelPolicy()
    p = KernelPolicy.from_env({"SPARSETRAIN_CSLT_PLANS": "0", "SPARSETRAIN_ATTENTION_IMPL": "flash"})
    assert (p.cached_cslt_plans, p.attention_impl) == (False, "flash")
    assert KernelPolicy.from_env({"SPARSETRAIN_CSLT_PLANS": "1"}).cached_cslt_plans
    with pytest.raises(ConfigError, match="attention implementation must be one of auto, cudnn, flash, recompute, got 'fast'"):
        KernelPolicy.from_env({"SPARSETRAIN_ATTENTION_IMPL": "fast"})
    with pytest.raises(ConfigError, match="kept_kernel_max_keep must be in"):
        KernelPolicy(kept_kernel_max_keep=1.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.attention_impl = "cudnn"  # type: ignore[misc]


def test_environment_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process policy comes from the environment at its first use; later changes
    of the environment do not reach running code (set the policy instead)."""
    monkeypatch.setattr(kernels, "_current", None)
    monkeypatch.setenv("SPARSETRAIN_ATTENTION_IMPL", "recompute")
    assert kernels.current().attention_impl == "recompute"
    monkeypatch.setenv("SPARSETRAIN_ATTENTION_IMPL", "flash")
    assert kernels.current().attention_impl == "recompute"


def test_using_scopes_a_change_and_restores_the_previous_policy() -> None:
    before = kernels.current()
    with kernels.using(fused_cross_entropy=False, cusparselt_min_width=0) as inside:
        assert kernels.current() is inside
        assert (inside.fused_cross_entropy, inside.cusparselt_min_width) == (False, 0)
        assert inside.attention_impl == before.attention_impl  # the rest unchanged
        assert ce.FUSED is False  # the old flag's read-only accessor follows the policy
    assert kernels.current() is before and ce.FUSED is before.fused_cross_entropy
    with pytest.raises(RuntimeError), kernels.using(KernelPolicy(attention_impl="flash")):
        raise RuntimeError("restored even so")
    assert kernels.current() is before


def test_availability_is_decided_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    assert kernels.triton_available() == (importlib.util.find_spec("triton") is not None)
    if not torch.cuda.is_available():
        assert not kernels.cusparselt_available() and not kernels.cudnn_attention_available()
    calls = []
    monkeypatch.setattr(kernels, "_AVAILABLE", {})
    monkeypatch.setattr(kernels, "_probe_cusparselt", lambda: calls.append(1) or True)
    assert kernels.cusparselt_available() and kernels.cusparselt_available() and calls == [1]


@requires_cuda
def test_cross_entropy_follows_the_policy_on_cuda() -> None:
    """Fused kernels by default; the plain-torch reference with ``fused_cross_entropy``
    off, process-wide or for one call."""
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    logits = torch.randn(64, 1000, device="cuda", generator=g).bfloat16()
    targets = torch.randint(0, 1000, (64,), device="cuda", generator=g)
    ref = ce.cross_entropy_reference(logits, targets)
    calls = []
    real = ce.fused_cross_entropy
    try:
        ce.fused_cross_entropy = lambda *a: calls.append(1) or real(*a)
        assert torch.allclose(ce.cross_entropy(logits, targets), ref, rtol=1e-5) and calls == [1]
        with kernels.using(fused_cross_entropy=False):
            assert torch.equal(ce.cross_entropy(logits, targets), ref) and calls == [1]
        assert torch.equal(ce.cross_entropy(logits, targets, KernelPolicy(fused_cross_entropy=False)), ref)
        assert calls == [1]
    finally:
        ce.fused_cross_entropy = real
