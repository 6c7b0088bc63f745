"""Collider under FSDP2 on CPU with gloo processes: the sharded model's Collider
losses and (gathered) gradients equal one process on the global batch, with the
float64 reference of tests/test_collider.py; the 2:4 FFN's token-pruned path
equals DDP's.

Normalisation: each rank's loss is the mean over its kept tokens, and the
reduce-scatter averages the ranks' gradients (as DDP's all-reduce does). With a
fixed kept count per rank (``topk``, ``random``) that is the mean over the
global batch's kept tokens; with counts that differ between ranks
(``threshold``) each rank's mean weighs the same, as each micro-batch's does in
gradient accumulation."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from sparsetrain import distributed as D
from sparsetrain import parallel as P
from sparsetrain.build import build_model
from sparsetrain.config import ModelConfig

from gradient_magnitudes import assert_within_rounding, recording
from test_collider import reference_loss
from test_fsdp import run_workers

LR = 0.05  # SGD: each step's update is the gradient, scaled; the next step's gradients see the new weights


def collider_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=16, init_std=0.3,
                activation_dense_warmup_steps=0)
    base.update(overrides)
    return ModelConfig(**base)


def fresh_model(cfg: ModelConfig, token_prune: bool = True) -> torch.nn.Module:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = build_model(cfg).double()
    for p in model.parameters():  # norm gains away from 1
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    set_token_prune(model, token_prune)
    return model


def set_token_prune(model: torch.nn.Module, on: bool) -> None:
    """relu2_24's token-wise 2:4 pruning of its weight gradients on or off (off: the FFN is position-wise)."""
    for m in model.modules():
        if hasattr(m, "token_prune"):
            m.token_prune = on


def keep_mask(B: int, T: int, world: int, counts: str, g: torch.Generator) -> torch.Tensor:
    """A keep mask over the global batch ``[B, T]``. ``counts = "fixed"``: every
    rank's rows keep the same number of tokens, at random places (what topk
    gives); ``"uneven"``: each sequence keeps its own random fraction."""
    if counts == "uneven":
        keep = torch.rand(B, T, generator=g) < torch.rand(B, 1, generator=g).clamp(0.2, 0.9)
        keep[:, 0] |= ~keep.any(-1)
        return keep
    rows = B // world
    k = int(0.4 * rows * T)
    keep = torch.zeros(world, rows * T, dtype=torch.bool)
    for r in range(world):
        keep[r, torch.randperm(rows * T, generator=g)[:k]] = True
    return keep.view(B, T)


def make_steps(cfg: ModelConfig, world: int, counts: str, n_steps: int = 2, n_micro: int = 2, B: int = 6
               ) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """``n_steps`` optimizer steps of ``n_micro`` global micro-batches ``(x, y, keep)`` each."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    T = cfg.seq_len
    return [[(torch.randint(0, cfg.vocab_size, (B, T), generator=g), torch.randint(0, cfg.vocab_size, (B, T), generator=g),
              keep_mask(B, T, world, counts, g)) for _ in range(n_micro)] for _ in range(n_steps)]


def _shard(t: torch.Tensor, info: D.DistInfo) -> torch.Tensor:
    return t.chunk(info.world_size)[info.rank]


def _collider_worker(info: D.DistInfo, cases: list, out: str) -> None:
    """For each ``(cfg, state, token_prune, steps, kind)``: the model sharded with
    FSDP2 (``kind = "fsdp"``) or wrapped in DDP, under ``ColliderModel``; each
    step accumulates its micro-batches (gradient sync on the last only), records
    the loss averaged over ranks and every gathered gradient, and takes an SGD step."""
    from sparsetrain.collider import ColliderModel, masked_cross_entropy

    records = []
    for cfg, state, token_prune, steps, kind in cases:
        model = build_model(cfg).double()
        model.load_state_dict(state)
        set_token_prune(model, token_prune)
        if kind == "fsdp":
            sync_module = P.parallelize(model, "fsdp", info, torch.device("cpu"))
            assert P.is_sharded(sync_module)
            net = ColliderModel(model)
        else:
            sync_module = net = P.parallelize(model, "ddp", info, torch.device("cpu"), forward_module=ColliderModel(model))
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        losses, grads = [], []
        for micro_batches in steps:
            total = torch.zeros((), dtype=torch.float64)
            for i, (x, y, keep) in enumerate(micro_batches):
                last = i == len(micro_batches) - 1
                with contextlib.nullcontext() if last else P.no_sync(sync_module):
                    loss = masked_cross_entropy(net(_shard(x, info)), _shard(y, info), _shard(keep, info))
                    (loss / len(micro_batches)).backward()
                total += loss.detach() / len(micro_batches)
            losses.append(D.all_reduce_mean(total, info))
            grads.append({k: (p.grad.full_tensor() if kind == "fsdp" else p.grad.clone())
                          for k, p in model.named_parameters()})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if kind == "ddp":
            D.release_ddp(net)
        records.append({"losses": losses, "grads": grads})
    if info.is_main:
        torch.save(records, Path(out))


def one_process_steps(model: torch.nn.Module, steps: list, world: int, counts: str) -> list[dict]:
    """The same steps in one process, float64 reference objective (tests/test_collider.py):
    with fixed counts the mean over the global batch's kept tokens, with uneven
    counts the mean of the ranks' means. Each step's loss, gradients and the
    sum of each gradient's |terms| (its rounding scale)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    out = []
    for micro_batches in steps:
        total = 0.0
        with recording(model) as magnitudes:
            for x, y, keep in micro_batches:
                if counts == "fixed":
                    loss = reference_loss(model, x, y, keep)
                else:
                    parts = zip(x.chunk(world), y.chunk(world), keep.chunk(world))
                    loss = sum(reference_loss(model, *part) for part in parts) / world
                (loss / len(micro_batches)).backward()
                total += float(loss.detach()) / len(micro_batches)
        out.append({"loss": total, "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
                    "magnitudes": magnitudes})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return out


# name -> (model config overrides, relu2_24 token pruning, kept counts)
EXACT_CASES = {
    "relu2-fixed": ({}, True, "fixed"),
    "swiglu-tied-fixed": ({"ffn": "swiglu", "tie_embeddings": True}, True, "fixed"),
    "relu2_24-noprune-fixed": ({"ffn": "relu2_24"}, False, "fixed"),
    "relu2-uneven": ({}, True, "uneven"),
}


@pytest.mark.parametrize("world,names", [(2, list(EXACT_CASES)), (3, ["swiglu-tied-fixed"])])
def test_fsdp_collider_equals_one_process_on_the_global_batch(world: int, names: list[str], tmp_path: Path) -> None:
    """FSDP2 with ColliderModel, 2 and 3 processes, two SGD steps of two accumulated
    micro-batches: each step's loss and every gathered gradient equal one process
    running the float64 reference objective on the global batch (the compact
    path: relu2, SwiGLU with tied embeddings; the composed path: relu2_24 with a
    position-wise backward). Fixed kept counts per rank give the global kept
    mean; uneven counts the mean of the ranks' means, as under DDP.

    Tolerance: float64 sums in another order (per-rank sums then the
    reduce-scatter's, against one sum; the engine's kept-row GEMMs against the
    reference's autograd), bounded by the sum of each gradient's |terms|
    (tests/gradient_magnitudes.py); relu2_24's own weights within 1e-10 of their norm."""
    cases, refs = [], []
    for name in names:
        overrides, token_prune, counts = EXACT_CASES[name]
        cfg = collider_config(**overrides)
        model = fresh_model(cfg, token_prune)
        steps = make_steps(cfg, world, counts)
        cases.append((cfg, {k: v.clone() for k, v in model.state_dict().items()}, token_prune, steps, "fsdp"))
        refs.append(one_process_steps(model, steps, world, counts))
    run_workers(world, _collider_worker, cases, str(tmp_path / "fsdp.pt"))
    got = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    for name, record, ref in zip(names, got, refs):
        for s, want in enumerate(ref):
            assert abs(float(record["losses"][s]) - want["loss"]) <= 1e-12 * abs(want["loss"]), (name, s)
            assert_within_rounding(record["grads"][s], want["grads"], want["magnitudes"], torch.float64, rtol=1e-10)


def test_fsdp_collider_with_the_token_pruned_24_ffn_equals_ddp(tmp_path: Path) -> None:
    """relu2_24 with token-wise pruning under Collider: its weight gradients group
    the kept rows of each rank's batch, so one process on the global batch is
    another objective; FSDP2 and DDP on the same per-rank batches (two methods,
    uneven kept counts) give the same losses and gradients."""
    cases = []
    for method in ("naive", "transposable"):
        cfg = collider_config(ffn="relu2_24", activation_sparse_method=method)
        model = fresh_model(cfg, token_prune=True)
        steps = make_steps(cfg, 2, "uneven")
        for kind in ("fsdp", "ddp"):
            cases.append((cfg, {k: v.clone() for k, v in model.state_dict().items()}, True, steps, kind))
    run_workers(2, _collider_worker, cases, str(tmp_path / "runs.pt"))
    got = torch.load(tmp_path / "runs.pt", weights_only=True)
    for fsdp, ddp in zip(got[0::2], got[1::2]):
        for s in range(len(ddp["losses"])):
            torch.testing.assert_close(fsdp["losses"][s], ddp["losses"][s], rtol=1e-12, atol=0)
            assert fsdp["grads"][s].keys() == ddp["grads"][s].keys()
            for k, want in ddp["grads"][s].items():  # the same float64 sums, reduced in another order
                torch.testing.assert_close(fsdp["grads"][s][k], want, rtol=1e-9, atol=1e-13, msg=k)

