"""Multi-token prediction: sequential backward == naive summed loss (float64),
per-head targets, and lower peak memory for the sequential path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sparsetrain.config import ModelConfig
from sparsetrain.model import GPT
from sparsetrain.mtp import MTPHeads, head_targets, naive_loss, sequential_backward


def _setup(n: int):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = GPT(ModelConfig(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=32, init_std=0.2)).double()
    heads = MTPHeads(model, n, weight=0.3, decay=0.5).double()
    for p in heads.parameters():
        p.data.normal_(0, 0.2) if p.dim() > 1 else p.data.uniform_(0.5, 1.5)
    idx = torch.randint(0, 300, (3, 16))
    targets = torch.randint(0, 300, (3, 16))
    targets[1, 4] = -100
    return model, heads, idx, targets


def _grads(*mods):
    out = {f"{i}.{n}": p.grad.clone() for i, m in enumerate(mods) for n, p in m.named_parameters() if p.grad is not None}
    for m in mods:
        m.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("n", [2, 3, 4])
def test_sequential_backward_equals_naive(n: int) -> None:
    model, heads, idx, targets = _setup(n)
    total, losses = naive_loss(model, heads, idx, targets)
    total.backward()
    ref = _grads(model, heads)
    seq_total, seq_losses = sequential_backward(model, heads, idx, targets)
    got = _grads(model, heads)
    assert torch.allclose(seq_total, total.detach(), rtol=1e-12)
    assert seq_losses == pytest.approx(losses, rel=1e-12)
    assert ref.keys() == got.keys() and len(ref) == len(list(model.parameters())) + len(list(heads.parameters()))
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=1e-9, atol=1e-14), k
    # loss = main + w * sum_k decay^(k-1) L_k
    assert float(total) == pytest.approx(losses[0] + sum(0.3 * 0.5 ** (k - 1) * losses[k] for k in range(1, n + 1)))


def test_head_targets_and_sequence_end() -> None:
    y = torch.arange(10).view(1, 10)  # y[t] = the main head's target x[t+1]
    for k in (1, 2, 3):
        t = head_targets(y, k)
        assert t[0, : 10 - k].tolist() == list(range(k, 10))  # head k predicts x[t+1+k] = y[t+k]
        assert (t[0, 10 - k :] == -100).all()
    assert (head_targets(y, 12) == -100).all()


def test_heads_start_as_the_main_head() -> None:
    model, heads, idx, targets = _setup(2)
    for h in heads.heads:
        torch.nn.init.zeros_(h.proj.weight)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    assert torch.equal(heads.heads[0](x), x)


PEAK = r"""
import json, resource, sys, torch
from sparsetrain.config import ModelConfig
from sparsetrain.model import GPT
from sparsetrain.mtp import MTPHeads, naive_loss, sequential_backward
torch.manual_seed(0)
model = GPT(ModelConfig(vocab_size=32768, seq_len=512, n_layer=1, n_head=2, d_model=64))
heads = MTPHeads(model, 4)
idx = torch.randint(0, 32768, (8, 512)); tgt = torch.randint(0, 32768, (8, 512))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "naive":
    naive_loss(model, heads, idx, tgt)[0].backward()
else:
    sequential_backward(model, heads, idx, tgt)
print(json.dumps({"peak_growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
"""


def test_sequential_peak_memory_below_naive() -> None:
    """Peak resident memory of each path in its own process (4 heads, 4096 tokens, V = 32768:
    one float32 logits tensor is 512 MiB)."""
    peaks = {}
    for mode in ("naive", "sequential"):
        out = subprocess.run([sys.executable, "-c", PEAK, mode], capture_output=True, text=True, timeout=300, check=True)
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_kib"]
    assert peaks["sequential"] < 0.6 * peaks["naive"], peaks
