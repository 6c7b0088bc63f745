"""Two gloo processes on CPU: DDP gradients equal one process on the global batch,
ranks stay in sync through training, only rank 0 writes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from sparsetrain.config import TrainConfig
from sparsetrain.trainer import Trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: TrainConfig, batch: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        t = Trainer(cfg, verbose=False)
        x, y = batch
        n = x.shape[0] // world
        t.forward_backward(x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n])
        grads = {k: p.grad.clone() for k, p in t.model.named_parameters()}
        t.optimizer.zero_grad(set_to_none=True)
        t.fit()
        params = {k: v.clone() for k, v in t.model.state_dict().items()}
        torch.save({"grads": grads, "params": params}, Path(out) / f"rank{rank}.pt")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


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
