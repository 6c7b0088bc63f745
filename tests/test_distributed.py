"""Two gloo processes on CPU: DDP gradients equal one process on the global batch
(dense, and MTP whose heads now go through DDP too), ranks stay in sync through
training, only rank 0 writes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sparsetrain.config import TrainConfig
from sparsetrain.trainer import Trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_without_teardown() -> None:
    """End a worker whose results are on disk without freeing its objects.

    Freeing the DDP reducer after ``destroy_process_group`` destroys the gloo
    process group, whose destructor joins gloo's worker threads while holding
    the GIL; a worker thread still releasing a finished all-reduce may need
    the GIL, and both wait forever (seen once in a full test run: the test hung
    in ``ProcessGroupGloo::~ProcessGroupGloo``). Reached only when the worker
    succeeded, so an exception still reaches ``mp.spawn``."""
    os._exit(0)


def _grads(t: Trainer) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient: the model's, and the MTP heads' under ``mtp.``."""
    grads = {k: p.grad.clone() for k, p in t.model.named_parameters()}
    if t.mtp is not None:
        grads.update({f"mtp.{k}": p.grad.clone() for k, p in t.mtp.named_parameters()})
    return grads


def _worker(rank: int, world: int, port: int, cfg: TrainConfig, batch: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        t = Trainer(cfg, verbose=False)
        x, y = batch
        n = x.shape[0] // world
        t.forward_backward(x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n])
        grads = _grads(t)
        t.optimizer.zero_grad(set_to_none=True)
        t.fit()
        params = {k: v.clone() for k, v in t.model.state_dict().items()}
        if t.mtp is not None:
            params.update({f"mtp.{k}": v.clone() for k, v in t.mtp.state_dict().items()})
        torch.save({"grads": grads, "params": params}, Path(out) / f"rank{rank}.pt")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    _exit_without_teardown()


def test_ddp_gloo_two_processes(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(out_dir=str(tmp_path / "ddp"), max_steps=3, eval_every=0)
    single = Trainer(make_cfg(out_dir=str(tmp_path / "single")), verbose=False)  # also builds the token cache
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randint(0, cfg.model.vocab_size, (8, cfg.model.seq_len), generator=g)
    y = torch.randint(0, cfg.model.vocab_size, (8, cfg.model.seq_len), generator=g)
    single.forward_backward(x, y)

    mp.spawn(_worker, args=(2, _free_port(), cfg, (x, y), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name, p in single.model.named_parameters():
        assert torch.allclose(r0["grads"][name], p.grad, rtol=1e-5, atol=1e-8), name
        assert torch.equal(r0["grads"][name], r1["grads"][name]), name
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    written = {p.name for p in (tmp_path / "ddp").iterdir()}
    assert {"ckpt.pt", "metrics.jsonl", "config.toml"} <= written
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "train"' in l for l in lines) == 3  # one writer, not two


def _collider_worker(rank: int, world: int, port: int, state: dict, cfg_model, batch: tuple, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparsetrain.collider import ColliderModel, filter as collider_filter, masked_cross_entropy
    from sparsetrain.model import GPT

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = GPT(cfg_model).double()
        model.load_state_dict(state)
        ddp = DDP(ColliderModel(model))
        x, y, keep = batch
        n = x.shape[0] // world
        part = slice(rank * n, (rank + 1) * n)
        logits = ddp(x[part])
        strides = []  # the logits' gradient as autograd sees it: stride 0 when the compact rows went to the engine
        logits.register_hook(lambda grad: strides.append(grad.stride()))
        loss = masked_cross_entropy(logits, y[part], keep[part])
        with collider_filter(keep[part]):
            loss.backward()
        grads = {k: p.grad for k, p in model.named_parameters()}
        torch.save({"grads": grads, "logit_grad_strides": strides}, Path(out) / f"collider{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()
    _exit_without_teardown()


def test_ddp_with_collider_averages_exact_gradients(tmp_path: Path) -> None:
    """DDP(ColliderModel): the all-reduced gradients equal the mean of each rank's
    Collider objective, computed with the float64 reference in one process, and
    the kept-rows loss still hands the engine its compact rows through DDP
    (the full-size logits gradient is never written)."""
    from sparsetrain.config import ModelConfig
    from sparsetrain.model import GPT
    from test_collider import reference_loss

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    cfg = ModelConfig(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=16, init_std=0.3)
    model = GPT(cfg).double()
    x = torch.randint(0, 300, (4, 16))
    y = torch.randint(0, 300, (4, 16))
    keep = torch.rand(4, 16) < 0.5
    keep[:, 0] = True
    mp.spawn(_collider_worker, args=(2, _free_port(), model.state_dict(), cfg, (x, y, keep), str(tmp_path)), nprocs=2, join=True)
    ref = 0.5 * (reference_loss(model, x[:2], y[:2], keep[:2]) + reference_loss(model, x[2:], y[2:], keep[2:]))
    ref.backward()
    r0 = torch.load(tmp_path / "collider0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "collider1.pt", weights_only=True)
    assert r0["logit_grad_strides"] == r1["logit_grad_strides"] == [(0, 0, 0)]
    g0, g1 = r0["grads"], r1["grads"]
    for name, p in model.named_parameters():
        assert torch.equal(g0[name], g1[name]), name
        assert torch.allclose(g0[name], p.grad, rtol=1e-6, atol=1e-12), name


@pytest.mark.parametrize("objective", ["mtp", "collider_mtp"])
def test_ddp_gloo_two_processes_with_mtp(make_cfg, tmp_path: Path, objective: str) -> None:
    """MTP through DDP: the heads live in the DDP-wrapped objective, so their
    gradients are all-reduced with the model's and equal one process's on the
    global batch (dense MTP: every rank's half has as many targets per head, so
    the mean of the ranks' means is the global mean). With Collider, whose kept
    count differs per rank, the one process accumulates the two halves' losses
    at half weight, as DDP averages them. The ranks then train in step."""
    kw = dict(use_mtp=True, mtp_n_tokens=3, mtp_weight=0.5)
    if objective == "collider_mtp":  # a fixed threshold: each token's keep decision is the same in any split
        kw.update(use_collider=True, collider_sparsity=0.0, collider_threshold=0.4)
    cfg = make_cfg(out_dir=str(tmp_path / "ddp"), max_steps=3, eval_every=0, **kw)
    single = Trainer(make_cfg(out_dir=str(tmp_path / "single"), **kw), verbose=False)
    for p in single.mtp.parameters():  # the heads start as the identity: give them gradients worth comparing
        torch.nn.init.normal_(p, 0.0, 0.3) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randint(0, cfg.model.vocab_size, (8, cfg.model.seq_len), generator=g)
    y = torch.randint(0, cfg.model.vocab_size, (8, cfg.model.seq_len), generator=g)
    if objective == "mtp":
        single.forward_backward(x, y)
    else:
        single.forward_backward(x[:4], y[:4], loss_scale=0.5)
        single.forward_backward(x[4:], y[4:], loss_scale=0.5)
    want = _grads(single)

    state = {"model": single.model.state_dict(), "mtp": single.mtp.state_dict()}
    mp.spawn(_mtp_worker, args=(2, _free_port(), cfg, state, (x, y), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["grads"].keys() == want.keys() and any(k.startswith("mtp.") for k in want)
    for name, grad in want.items():
        assert torch.allclose(r0["grads"][name], grad, rtol=1e-5, atol=1e-8), name
        assert torch.equal(r0["grads"][name], r1["grads"][name]), name
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    rows = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["mtp_losses"]) for r in rows if r["kind"] == "train"] == [3, 3, 3]


def _mtp_worker(rank: int, world: int, port: int, cfg: TrainConfig, state: dict, batch: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        t = Trainer(cfg, verbose=False)
        t.model.load_state_dict(state["model"])
        t.mtp.load_state_dict(state["mtp"])
        x, y = batch
        n = x.shape[0] // world
        t.forward_backward(x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n])
        grads = _grads(t)
        t.optimizer.zero_grad(set_to_none=True)
        t.fit()
        params = {k: v.clone() for k, v in t.model.state_dict().items()}
        params.update({f"mtp.{k}": v.clone() for k, v in t.mtp.state_dict().items()})
        torch.save({"grads": grads, "params": params}, Path(out) / f"rank{rank}.pt")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    _exit_without_teardown()
