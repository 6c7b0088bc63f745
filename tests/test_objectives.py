"""Training objectives behind one interface, their metrics through one channel,
and a step that reads nothing back from the device."""

from __future__ import annotations

import math
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsetrain.config import ModelConfig
from sparsetrain.metrics import MetricWindow, to_host
from sparsetrain.model import GPT
from sparsetrain.objectives import (AuxiliaryLoss, BatchSplitLoss, ColliderLoss, MultiTokenLoss, NextTokenLoss,
                                    SelectiveLoss, build_objective)
from sparsetrain.selection import TokenSelector
from sparsetrain.trainer import Trainer


def _gpt() -> GPT:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    return GPT(ModelConfig(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=32, init_std=0.2)).double()


def _batch(B: int = 4, T: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    return torch.randint(0, 300, (B, T), generator=g), torch.randint(0, 300, (B, T), generator=g)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_next_token_and_selective_loss_gradients_equal_float64_references() -> None:
    model = _gpt()
    x, y = _batch()
    out = NextTokenLoss(model)(x, y, y.numel())
    out.loss.backward()
    got = _grads(model)
    F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).backward()
    for n, g in _grads(model).items():
        assert torch.allclose(got[n], g, rtol=1e-10, atol=1e-14), n
    assert out.metrics == {} and torch.equal(out.lm_loss, out.loss.detach())

    # CGGR selective loss: the kept tokens are the 40% with the highest loss, the
    # loss their mean cross-entropy; the selector's warmup is the caller's to set
    sel = TokenSelector(score="loss", method="topk", keep_ratio=0.4, warmup_steps=4)
    objective = SelectiveLoss(model, sel)
    objective.set_step(4)
    out = objective(x, y, y.numel())
    out.loss.backward()
    got = _grads(model)
    logits = model(x)[0]
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    kept = nll.detach().topk(math.ceil(0.4 * y.numel())).indices
    nll[kept].mean().backward()
    for n, g in _grads(model).items():
        assert torch.allclose(got[n], g, rtol=1e-10, atol=1e-14), n
    assert (out.metrics["kept"], out.metrics["total"]) == (kept.numel(), y.numel())
    assert sel.step_count == 4


def test_auxiliary_loss_adds_the_networks_own_and_reports_the_lm_loss() -> None:
    from sparsetrain.build import build_model

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = build_model(ModelConfig(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=32, arch="resnet_bk",
                                    bk_num_experts=2, bk_sparsity=0.5)).double()
    x, y = _batch()
    torch.manual_seed(1)  # the Gumbel noise of the skip mask
    out = AuxiliaryLoss(NextTokenLoss(model), model)(x, y, y.numel())
    out.loss.backward()
    got = _grads(model)
    torch.manual_seed(1)
    _, lm = model(x, y)
    aux = model.aux_loss()
    (lm + aux).backward()
    assert torch.equal(out.lm_loss, lm.detach()) and float(aux.detach()) != 0.0
    for n, g in _grads(model).items():
        assert torch.allclose(got[n], g, rtol=1e-10, atol=1e-14), n
    assert set(out.metrics["bk_sparsity"]) >= {"sparsity_ratio", "target_sparsity"}


@pytest.mark.parametrize("overrides, kind", [
    ({}, NextTokenLoss), ({"selection": "loss"}, SelectiveLoss), ({"selection": "batch", "router_layers": 1}, BatchSplitLoss),
    ({"use_collider": True, "collider_sparsity": 0.5}, ColliderLoss), ({"use_mtp": True}, MultiTokenLoss),
    ({"use_collider": True, "collider_sparsity": 0.5, "use_mtp": True}, ColliderLoss),
    ({"arch": "resnet_bk", "bk_sparsity": 0.5}, AuxiliaryLoss),
])
def test_the_trainer_builds_the_objective_the_config_names(make_cfg, overrides: dict, kind: type) -> None:
    t = Trainer(make_cfg(**overrides), verbose=False)
    assert type(t.objective) is kind and t.train_module is t.objective
    trainable = {id(p) for p in t.objective.parameters()}
    assert all(id(p) in trainable for group in t.optimizer.param_groups for p in group["params"])  # DDP sees them all
    if overrides.get("use_mtp"):
        with pytest.raises(ValueError, match="MTP heads exactly"):
            build_objective(t.cfg, t.model, None, t.selector)


def test_metric_window_reduces_as_documented() -> None:
    """Per-step sums for kept/total, the step's own extras on its row, window
    means for the rest; device values read in one go, rounded as metrics.jsonl has them."""
    w = MetricWindow()
    w.add({"kept": 3, "total": torch.tensor(8), "backward_ms": 1.0, "mtp_losses": torch.tensor([1.0, 2.0])})
    w.add({"kept": torch.tensor(1), "total": 8, "backward_ms": 2.0, "mtp_losses": torch.tensor([3.0, 4.0])})
    w.end_step(1, torch.tensor(2.5), torch.tensor(0.5), 1e-3, {"sparse24": {"a": torch.tensor(0.25), "backend": "x"}})
    w.add({"kept": 2, "total": 8, "backward_ms": 4.5, "mtp_losses": torch.tensor([5.0, 9.0]),
           "bk_sparsity": {"r": torch.tensor(0.123456)}})
    w.end_step(2, 2.25, 0.25, 2e-3)
    rows = w.rows(tokens_per_step=16, tokens_per_s=1234.56)
    assert rows == [
        {"kind": "train", "step": 1, "loss": 2.5, "grad_norm": 0.5, "lr": 1e-3, "tokens": 16, "tokens_per_s": 1234.6,
         "kept_fraction": 0.25, "backward_ms": 2.5, "sparse24": {"a": 0.25, "backend": "x"},
         "mtp_losses": [3.0, 5.0], "bk_sparsity": {"r": 0.1235}},
        {"kind": "train", "step": 2, "loss": 2.25, "grad_norm": 0.25, "lr": 2e-3, "tokens": 32, "tokens_per_s": 1234.6,
         "kept_fraction": 0.25, "backward_ms": 2.5, "mtp_losses": [3.0, 5.0], "bk_sparsity": {"r": 0.1235}},
    ]
    assert len(w) == 0 and w.rows(16, 1.0) == []
    assert to_host({"a": [torch.tensor(1.5), torch.tensor([2.0, 3.0])], "b": "s"}) == {"a": [1.5, [2.0, 3.0]], "b": "s"}


# A read of a tensor's value on the host; on a GPU each is a sync that stalls the step.
READS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist")
# What may read in a step: the trainer counts the targets of the batch while it is still on
# the CPU; CPU AdamW keeps its step counts in CPU tensors (the fused CUDA AdamW does not read
# them); a ResNet-BK MoE layer reads its expert counts once per layer, by design.
ALLOWED = {("sparsetrain/trainer.py", "return int((y != IGNORE_INDEX).sum())"),
           ("torch/optim/optimizer.py", ""), ("sparsetrain/bk/layers.py", "counts = torch.bincount("),
           # CPU tensors only: a CUDA selection defers its NaN/Inf count to the log step's read
           ("sparsetrain/selection/scores.py", "n = int(stats.nonfinite)")}


@pytest.mark.parametrize("overrides", [
    {}, {"selection": "loss", "selection_method": "topk"}, {"selection": "batch", "router_layers": 1},
    {"use_collider": True, "collider_sparsity": 0.5, "collider_method": "topk"}, {"use_mtp": True},
    {"use_collider": True, "collider_sparsity": 0.5, "collider_method": "topk", "use_mtp": True},
    {"use_collider": True, "collider_sparsity": 0.5, "collider_method": "importance", "collider_score": "gradnorm"},
    {"selection": "loss", "selection_method": "importance"},
    {"ffn": "relu2_24", "activation_dense_warmup_steps": 0}, {"arch": "resnet_bk", "bk_sparsity": 0.5},
])
def test_training_steps_read_nothing_back(make_cfg, monkeypatch: pytest.MonkeyPatch, overrides: dict) -> None:
    """Between log steps nothing reads a tensor's value on the host: every read
    in two training steps (after a first) comes from the allowed places above."""
    t = Trainer(make_cfg(log_every=2, grad_accum=2, selection_score="loss", **overrides), verbose=False)
    assert_two_steps_read_nothing_back(t, monkeypatch)


def assert_two_steps_read_nothing_back(t: Trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a first step, two more training steps read no tensor on the host outside
    :data:`ALLOWED`, and their metrics wait unread in the window (with the first's)."""
    t.train_step()
    reads: list[tuple[str, str]] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def recording(name):
        def read(self, *args, **kwargs):
            frames = traceback.extract_stack()[:-1]
            ours = [f for f in frames if "sparsetrain" in f.filename or "torch/optim" in f.filename]
            site = ours[-1] if ours else frames[-1]
            reads.append((str(Path(site.filename).as_posix()), site.line or ""))
            return originals[name](self, *args, **kwargs)
        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, recording(name))
    t.train_step()
    t.train_step()
    for name, original in originals.items():
        monkeypatch.setattr(torch.Tensor, name, original)
    unexpected = [(f, line) for f, line in reads
                  if not any(f.endswith(where) and line.startswith(code) for where, code in ALLOWED)]
    assert not unexpected, unexpected
    assert len(t.metric_window) == 3  # the steps wait, unread, for the log step


def test_mtp_trains_through_the_compiled_trunk(make_cfg, tmp_path: Path) -> None:
    """compile = true with MTP: the objective compiles the trunk (the head-by-head
    loss runs eagerly beside it) and one micro-step's gradients equal the eager trainer's."""
    from sparsetrain.data import train_batch

    eager = Trainer(make_cfg(out_dir=str(tmp_path / "e"), use_mtp=True, mtp_n_tokens=2), verbose=False)
    compiled = Trainer(make_cfg(out_dir=str(tmp_path / "c"), use_mtp=True, mtp_n_tokens=2, compile=True), verbose=False)
    compiled.model.load_state_dict(eager.model.state_dict())
    for t in (eager, compiled):
        for p in t.mtp.parameters():  # the same non-trivial heads in both
            torch.nn.init.constant_(p, 0.05) if p.dim() > 1 else torch.nn.init.ones_(p)
    assert isinstance(compiled.objective.net, torch._dynamo.eval_frame.OptimizedModule)
    x, y = train_batch(eager.corpus.train, 4, 32, seed=3, step=0)
    torch._dynamo.reset()
    losses = [t.forward_backward(x, y) for t in (eager, compiled)]
    torch._dynamo.reset()
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    for (n, a), b in zip([*eager.model.named_parameters(), *eager.mtp.named_parameters()],
                         [*compiled.model.parameters(), *compiled.mtp.parameters()]):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), n
