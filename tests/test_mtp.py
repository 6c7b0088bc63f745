"""Multi-token prediction: the sequential loss's gradients == the naive summed
loss's (float64), per-head targets, and lower peak memory for the sequential path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sparsetrain.config import ModelConfig
from sparsetrain.model import GPT
from sparsetrain.mtp import MTPHeads, head_targets, naive_loss, sequential_backward, sequential_loss


def _setup(n: int, tie: bool = False):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = GPT(ModelConfig(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=32, init_std=0.2,
                            tie_embeddings=tie)).double()
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


@pytest.mark.parametrize("n, tie", [(2, False), (3, False), (4, False), (3, True)])
def test_sequential_loss_gradients_equal_naive(n: int, tie: bool) -> None:
    """The head-by-head loss is one differentiable function of the trunk output:
    back-propagated like any loss, it gives the naive loss's value, per-head
    losses and gradients for every parameter (a tied LM head included, whose
    gradient sums the trunk's and the heads' uses)."""
    model, heads, idx, targets = _setup(n, tie)
    total, losses = naive_loss(model, heads, idx, targets)
    total.backward()
    ref = _grads(model, heads)
    seq_total, seq_losses = sequential_loss(model, heads, model.trunk(idx), targets)
    assert seq_total.requires_grad and not seq_losses.requires_grad
    (2.5 * seq_total).backward()  # the incoming gradient scales every gradient
    got = _grads(model, heads)
    assert torch.allclose(seq_total, total.detach(), rtol=1e-12)
    assert seq_losses.tolist() == pytest.approx(losses, rel=1e-12)
    assert ref.keys() == got.keys() and len(ref) == len(list(model.parameters())) + len(list(heads.parameters()))
    for k in ref:
        assert torch.allclose(got[k], 2.5 * ref[k], rtol=1e-9, atol=1e-14), k
    # loss = main + w * sum_k decay^(k-1) L_k
    assert float(total.detach()) == pytest.approx(losses[0] + sum(0.3 * 0.5 ** (k - 1) * losses[k] for k in range(1, n + 1)))
    # the convenience wrapper: the same backward, host floats back
    wrapped_total, wrapped_losses = sequential_backward(model, heads, idx, targets, scale=2.5)
    assert wrapped_losses == pytest.approx(losses, rel=1e-12)
    for k, g in _grads(model, heads).items():
        assert torch.allclose(g, 2.5 * ref[k], rtol=1e-9, atol=1e-14), k


def test_sequential_loss_compiled_trunk_equals_naive() -> None:
    """The head loss under torch.compile: the trunk compiles, the head-by-head
    node runs eagerly (a clean break), and the gradients are the naive loss's."""
    model, heads, idx, targets = _setup(2)
    naive_loss(model, heads, idx, targets)[0].backward()
    ref = _grads(model, heads)
    torch._dynamo.reset()
    compiled = torch.compile(lambda i, t: sequential_loss(model, heads, model.trunk(i), t)[0], backend="aot_eager")
    compiled(idx, targets).backward()
    torch._dynamo.reset()
    for k, g in _grads(model, heads).items():
        assert torch.allclose(g, ref[k], rtol=1e-9, atol=1e-14), k


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
from sparsetrain.mtp import MTPHeads, naive_loss, sequential_loss
torch.manual_seed(0)
model = GPT(ModelConfig(vocab_size=32768, seq_len=512, n_layer=1, n_head=2, d_model=64))
heads = MTPHeads(model, 4)
idx = torch.randint(0, 32768, (8, 512)); tgt = torch.randint(0, 32768, (8, 512))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "naive":
    naive_loss(model, heads, idx, tgt)[0].backward()
else:
    sequential_loss(model, heads, model.trunk(idx), tgt)[0].backward()
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


def test_mtp_with_collider_matches_detached_reference_and_skips_dropped_rows() -> None:
    """Collider + MTP: every head uses the primary keep mask on kept rows only; the
    gradients equal the plain autograd reference (dropped K/V detached, all heads'
    losses on kept rows), in float64, and dropped rows get no gradient through any head."""
    from sparsetrain.collider import ColliderModel, filter as collider_filter, masked_cross_entropy
    from sparsetrain.mtp import head_targets, kept_rows_loss
    from test_collider import make, random_keep, reference_trunk

    model = make(n_layer=2)
    heads = MTPHeads(model, 3, weight=0.3, decay=0.5).double()
    for p in heads.parameters():  # the zero init would make the heads trivial
        p.data.normal_(0.0, 0.2)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    B, T = 3, 24
    idx = torch.randint(0, 300, (B, T), generator=g)
    targets = torch.randint(0, 300, (B, T), generator=g)
    keep = random_keep(B, T, g)

    logits, trunk = ColliderModel(model)(idx, return_trunk=True)
    extra, _ = kept_rows_loss(model, heads, trunk, targets, keep)
    trunk.retain_grad()
    with collider_filter(keep):
        (masked_cross_entropy(logits, targets, keep) + extra).backward()
    got = {n: p.grad.clone() for n, p in [*model.named_parameters(), *heads.named_parameters()]}
    assert torch.count_nonzero(trunk.grad[~keep]) == 0  # no head sends gradient to a dropped row
    model.zero_grad(set_to_none=True)
    heads.zero_grad(set_to_none=True)

    x = reference_trunk(model, idx, keep)
    sel = keep & (targets != -100)
    ref = torch.nn.functional.cross_entropy(model.lm_head(model.norm(x))[sel], targets[sel])
    for k in range(1, 4):
        t = head_targets(targets, k)
        m = keep & (t != -100)
        if m.any():
            ref = ref + heads.head_weight(k) * torch.nn.functional.cross_entropy(
                model.lm_head(model.norm(heads.heads[k - 1](x)))[m], t[m])
    ref.backward()
    for n, p in [*model.named_parameters(), *heads.named_parameters()]:
        assert torch.allclose(got[n], p.grad, rtol=1e-6, atol=1e-10), n


def test_trainer_runs_collider_with_mtp(make_cfg) -> None:
    import json

    from sparsetrain.trainer import train

    cfg = make_cfg(use_collider=True, collider_sparsity=0.5, collider_method="topk", use_mtp=True, mtp_n_tokens=2,
                   max_steps=3, eval_every=3)
    result = train(cfg, verbose=False)
    rows = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert all(len(r["mtp_losses"]) == 2 and 0.4 <= r["kept_fraction"] <= 0.6 for r in train_rows)
