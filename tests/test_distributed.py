"""Two gloo processes on CPU: DDP gradients equal one process on the global batch
(dense, and MTP whose heads go through DDP too), ranks stay in sync through
training, each Trainer optimizer step (AdamW, Muon, Lion) is one process's on
the reduced gradients, only rank 0 writes, and processes leave through the
ordered teardown and a normal interpreter exit."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sparsetrain import distributed as D
from sparsetrain import parallel as P
from sparsetrain.config import TrainConfig
from sparsetrain.optim import lr_at
from sparsetrain.trainer import Trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainable(t: Trainer) -> dict[str, torch.nn.Parameter]:
    """Every trainable parameter by name: the model's, and the MTP heads' under ``mtp.``."""
    params = dict(t.model.named_parameters())
    if t.mtp is not None:
        params.update({f"mtp.{k}": p for k, p in t.mtp.named_parameters()})
    return params


def _grads(t: Trainer) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient: the model's, and the MTP heads' under ``mtp.``."""
    return {k: p.grad.clone() for k, p in _trainable(t).items()}


def _record_steps(t: Trainer) -> list[dict]:
    """Record every optimizer step ``t`` runs from now on, through two public
    attributes wrapped on the instance (``forward_backward`` and the optimizer's
    ``step``): the step's micro-batches, the learning rates of its groups and the
    gradients the optimizer is handed (reduced over the ranks and clipped), and
    the parameters after it."""
    steps: list[dict] = []
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    forward_backward, optimizer_step = t.forward_backward, t.optimizer.step

    def recording_forward_backward(x, y, *args, **kwargs):
        batches.append((x.clone(), y.clone()))
        return forward_backward(x, y, *args, **kwargs)

    def recording_step(*args, **kwargs):
        steps.append({"batches": list(batches), "lrs": [float(g["lr"]) for g in t.optimizer.param_groups],
                      "grads": _grads(t)})
        batches.clear()
        out = optimizer_step(*args, **kwargs)
        steps[-1]["params"] = {k: p.detach().clone() for k, p in _trainable(t).items()}
        return out

    t.forward_backward, t.optimizer.step = recording_forward_backward, recording_step
    return steps


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
        del t  # its DDP reducer goes while the process group still has its Python owners
    finally:
        D.shutdown_distributed()


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
    from sparsetrain.collider import ColliderModel, filter as collider_filter, masked_cross_entropy
    from sparsetrain.model import GPT

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = GPT(cfg_model).double()
        model.load_state_dict(state)
        ddp = P.wrap_ddp(ColliderModel(model), torch.device("cpu"))
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
        D.shutdown_distributed()


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


@contextlib.contextmanager
def _one_thread():
    """Run as the workers do (``torch.set_num_threads(1)``): a CPU matmul's sums
    (Muon's Newton-Schulz) may be split differently with more threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_steps_against_one_process(single: Trainer, cfg: TrainConfig, ranks: list[dict], objective: str) -> None:
    """Replay the ranks' recorded optimizer steps (:func:`_record_steps`, a run
    of ``cfg``) in ``single``, one process, from the same starting weights and
    optimizer (same optimizer settings; its lr schedule is ``cfg``'s). Each step: the
    global batch (both ranks' micro-batches) gives the one process's gradients,
    clipped as the trainer clips, which equal those the ranks' optimizer was
    handed to the tolerance of the gradient checks above; the ranks' learning
    rates are the schedule's (``lr_at`` times each group's ``lr_scale``); and the
    one process's optimizer, stepping on those same gradients, lands bitwise on
    the ranks' parameters. So the optimizer under DDP (its groups and roles, the
    MTP heads inside the DDP-wrapped objective, its state, the lr it is given)
    runs exactly the one-process step on the reduced gradients."""
    params = _trainable(single)
    steps0, steps1 = ranks[0]["steps"], ranks[1]["steps"]
    assert len(steps0) == len(steps1) == cfg.max_steps
    single.optimizer.zero_grad(set_to_none=True)
    with _one_thread():
        for k, (s0, s1) in enumerate(zip(steps0, steps1)):
            assert len(s0["batches"]) == len(s1["batches"]) == 1
            (x0, y0), (x1, y1) = s0["batches"][0], s1["batches"][0]
            single.objective.set_step(k)
            if objective == "mtp":
                single.forward_backward(torch.cat([x0, x1]), torch.cat([y0, y1]))
            else:
                single.forward_backward(x0, y0, loss_scale=0.5)
                single.forward_backward(x1, y1, loss_scale=0.5)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
            lrs = [lr_at(k, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio) * g.get("lr_scale", 1.0)
                   for g in single.optimizer.param_groups]
            assert s0["lrs"] == s1["lrs"] == lrs, k
            for g, lr in zip(single.optimizer.param_groups, lrs):
                g["lr"] = lr
            for name, p in params.items():
                assert torch.allclose(s0["grads"][name], p.grad, rtol=1e-5, atol=1e-8), (k, name)
                assert torch.equal(s0["grads"][name], s1["grads"][name]), (k, name)
                p.grad = s0["grads"][name].clone()
            single.optimizer.step()
            single.optimizer.zero_grad(set_to_none=True)
            for name, p in params.items():
                assert torch.equal(p.detach(), s0["params"][name]), (k, name)
                assert torch.equal(s0["params"][name], s1["params"][name]), (k, name)
    for name, p in params.items():  # the steps moved every parameter
        assert not torch.equal(p.detach(), ranks[0]["start"][name]), name


@pytest.mark.parametrize("objective,optimizer", [
    ("mtp", "adamw"), ("collider_mtp", "adamw"),
    ("mtp", "muon"), ("collider_mtp", "muon"),
    ("mtp", "lion"),
])
def test_ddp_gloo_two_processes_with_mtp(make_cfg, tmp_path: Path, objective: str, optimizer: str) -> None:
    """MTP through DDP: the heads live in the DDP-wrapped objective, so their
    gradients are all-reduced with the model's and equal one process's on the
    global batch (dense MTP: every rank's half has as many targets per head, so
    the mean of the ranks' means is the global mean). With Collider, whose kept
    count differs per rank, the one process accumulates the two halves' losses
    at half weight, as DDP averages them. The ranks then train in step, and
    each of their optimizer steps (AdamW, Muon with its AdamW fallback, Lion)
    is the one process's on the global batch
    (:func:`_check_steps_against_one_process`)."""
    if optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        pytest.skip("needs torch >= 2.9 (torch.optim.Muon)")
    if optimizer == "lion":
        pytest.importorskip("lion_pytorch")
    kw = dict(use_mtp=True, mtp_n_tokens=3, mtp_weight=0.5, optimizer=optimizer)
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
    _check_steps_against_one_process(single, cfg, [r0, r1], objective)


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
        start = {k: p.detach().clone() for k, p in _trainable(t).items()}
        steps = _record_steps(t)
        t.fit()
        params = {k: v.clone() for k, v in t.model.state_dict().items()}
        params.update({f"mtp.{k}": v.clone() for k, v in t.mtp.state_dict().items()})
        torch.save({"grads": grads, "params": params, "start": start, "steps": steps}, Path(out) / f"rank{rank}.pt")
        del t  # its DDP reducer goes while the process group still has its Python owners
    finally:
        D.shutdown_distributed()


# ----------------------------------------------------------------------------- teardown

GLOO_THREAD_PREFIXES = ("pt_gloo", "gloo", "pt_tcpstore")


def _thread_names() -> list[str]:
    """Names of this process's threads (Linux)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except FileNotFoundError:  # ended meanwhile
            pass
    return names


def _gloo_threads() -> list[str]:
    return sorted(n for n in _thread_names() if n.startswith(GLOO_THREAD_PREFIXES))


def _teardown_worker(rank: int, world: int, port: int, cfg_model, state: dict, batch: tuple, out: str) -> None:
    from sparsetrain.model import GPT

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    model = GPT(cfg_model).double()
    model.load_state_dict(state)
    ddp = P.parallelize(model, "ddp", info, torch.device("cpu"))
    x, y = (t.chunk(world)[rank] for t in batch)
    with P.no_sync(ddp):
        (ddp(x[:1], y[:1])[1] / 2).backward()
    (ddp(x[1:], y[1:])[1] / 2).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    during = _gloo_threads()
    D.shutdown_distributed()
    after = _gloo_threads()
    torch.save({"during": during, "after": after, "grads": grads}, Path(out) / f"teardown{rank}.pt")
    # returns normally with ``ddp`` alive until here: nothing is left for the exit to destroy


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_shutdown_destroys_the_gloo_group_while_a_ddp_wrapper_lives(tmp_path: Path) -> None:
    """The ordered teardown destroys the process group (gloo's worker threads
    are gone) inside ``shutdown_distributed``, through its Python owner, even
    though the caller still holds the DDP wrapper whose C++ reducer would
    otherwise destroy it later while holding the GIL. DDP's ``no_sync``
    accumulation gives the global-batch gradients."""
    from sparsetrain.config import ModelConfig
    from sparsetrain.model import GPT

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    cfg = ModelConfig(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=16, init_std=0.3)
    model = GPT(cfg).double()
    x, y = torch.randint(0, 300, (4, 16)), torch.randint(0, 300, (4, 16))
    mp.spawn(_teardown_worker, args=(2, _free_port(), cfg, model.state_dict(), (x, y), str(tmp_path)), nprocs=2, join=True)
    model(x, y)[1].backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"teardown{rank}.pt", weights_only=True)
        assert got["during"], "no gloo threads seen while the group was up: the check cannot see them"
        assert got["after"] == [], f"rank {rank}: threads of a destroyed process group still run: {got['after']}"
        for k, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][k], p.grad, rtol=1e-10, atol=1e-14, msg=k)


def _cli_worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    from sparsetrain.cli import main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rc = main(argv)
    if rc:
        raise SystemExit(rc)


RUNS = 10
RUN_LIMIT_S = 60.0


def test_two_process_cli_runs_exit_cleanly_every_time(make_cfg, tmp_path: Path) -> None:
    """Ten 2-process ``sparsetrain train`` runs, each in fresh interpreters that
    exit normally (no ``os._exit``): every process exits 0 within the limit."""
    cfg = make_cfg()
    Trainer(make_cfg(out_dir=str(tmp_path / "warm")), verbose=False)  # builds the token cache once
    base = ["train", "--data", cfg.data, "--cache-dir", cfg.cache_dir, "--vocab-size", "320", "--seq-len", "32",
            "--n-layer", "2", "--n-head", "2", "--d-model", "32", "--batch-size", "2", "--max-steps", "2",
            "--warmup-steps", "1", "--eval-every", "0", "--eval-batches", "1", "--log-every", "1",
            "--val-fraction", "0.1", "--device", "cpu"]
    for run in range(RUNS):
        out = tmp_path / f"run{run}"
        ctx = mp.start_processes(_cli_worker, args=(2, _free_port(), base + ["--out-dir", str(out)]), nprocs=2,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + RUN_LIMIT_S
        while not ctx.join(timeout=0.5):  # raises if a process fails
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"run {run}: the processes did not exit within {RUN_LIMIT_S:.0f} s")
        assert [p.exitcode for p in ctx.processes] == [0, 0], f"run {run}"
        assert (out / "ckpt.pt").is_file(), f"run {run}"
