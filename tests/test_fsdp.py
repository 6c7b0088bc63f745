"""FSDP2 on CPU with gloo processes: training equals one process on the global
batch (float64, so the comparison is tight), activation checkpointing changes
nothing but memory, and sharded checkpoints resume exactly on another number
of processes."""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

from sparsetrain import distributed as D
from sparsetrain import parallel as P
from sparsetrain import sharded_checkpoint as S
from sparsetrain.checkpoint import save_checkpoint
from sparsetrain.errors import CheckpointError
from sparsetrain.config import ModelConfig
from sparsetrain.build import build_model
from sparsetrain.model import GPT
from sparsetrain.optimizers import make_adamw

if TYPE_CHECKING:
    from sparsetrain.trainer import Trainer

from test_distributed import _free_port

FULL = StateDictOptions(full_state_dict=True)
WRAPPER_PREFIX = "_checkpoint_wrapped_module."


def _entry(rank: int, world: int, port: int, fn, args: tuple) -> None:
    """A worker: join the group the way ``torchrun`` describes it, run ``fn``,
    and leave through the ordered teardown (a normal interpreter exit)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    ok = False
    try:
        fn(info, *args)
        ok = True
    finally:
        D.shutdown_distributed(synchronize=ok)


def run_workers(world: int, fn, *args) -> None:
    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=300, seq_len=16, n_layer=2, n_head=2, d_model=16, init_std=0.3)
    base.update(overrides)
    return ModelConfig(**base)


def fresh_model(cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = build_model(cfg).double()
    for p in model.parameters():  # norm gains away from 1
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    return model


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A copy of the model and optimizer state, unsharded and keyed by parameter
    name (copied: unsharded tensors, like AdamW's step counts, are returned
    by reference and change with the next step)."""
    model_state, optim_state = get_state_dict(model, optimizer, options=FULL)
    return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, {"model": model_state, "optimizer": optim_state})


def assert_states_equal(a, b, where: str) -> None:
    """Nested dicts/lists of tensors and plain values, tensors bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_states_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and b.dtype == a.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


# ----------------------------------------------------------------------------- training


def _train_worker(info: D.DistInfo, cfg: ModelConfig, state: dict, steps: list, ac: bool, out: str) -> None:
    model = build_model(cfg).double()
    model.load_state_dict(state)
    sharded = P.parallelize(model, "fsdp", info, torch.device("cpu"), activation_checkpointing=ac)
    assert P.is_sharded(sharded)
    optimizer = make_adamw(sharded, 1e-2, 0.1, (0.9, 0.95), "cpu")
    losses, norms, grads = [], [], []
    for micro_batches in steps:
        micro_batches = [(x.chunk(info.world_size)[info.rank], y.chunk(info.world_size)[info.rank]) for x, y in micro_batches]
        total = torch.zeros((), dtype=torch.float64)
        for i, (x, y) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else P.no_sync(sharded):
                _, loss = sharded(x, y)
                (loss / len(micro_batches)).backward()
            total += loss.detach() / len(micro_batches)
        losses.append(D.all_reduce_mean(total, info))
        norms.append(P.clip_grad_norm(sharded.parameters(), 0.05))
        grads.append({k.replace(WRAPPER_PREFIX, ""): p.grad.full_tensor() for k, p in sharded.named_parameters()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    params = get_model_state_dict(sharded, options=FULL)
    if info.is_main:
        torch.save({"losses": losses, "norms": norms, "grads": grads, "params": params}, Path(out) / "fsdp.pt")


@pytest.mark.parametrize("ffn,tied,ac", [("swiglu", False, True), ("relu2", True, False)])
def test_fsdp_training_equals_one_process_on_the_global_batch(ffn: str, tied: bool, ac: bool, tmp_path: Path) -> None:
    """Two optimizer steps of two accumulated micro-batches each, 2 processes
    with FSDP2 (gradient sync only on the last micro-step, clipping on the
    sharded gradients) against one process on the whole batch: same losses,
    same total gradient norms, same clipped gradients, same parameters."""
    cfg = tiny_config(ffn=ffn, tie_embeddings=tied)
    model = fresh_model(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    steps = [[(torch.randint(0, 300, (4, 16)), torch.randint(0, 300, (4, 16))) for _ in range(2)] for _ in range(2)]
    run_workers(2, _train_worker, cfg, state, steps, ac, str(tmp_path))
    got = torch.load(tmp_path / "fsdp.pt", weights_only=True)

    optimizer = make_adamw(model, 1e-2, 0.1, (0.9, 0.95), "cpu")
    for s, micro_batches in enumerate(steps):
        total = 0.0
        for x, y in micro_batches:
            _, loss = model(x, y)
            (loss / len(micro_batches)).backward()
            total += float(loss.detach()) / len(micro_batches)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        assert float(got["norms"][s]) > 0.05  # clipping was active
        torch.testing.assert_close(got["norms"][s], norm, rtol=1e-10, atol=0)
        assert abs(float(got["losses"][s]) - total) < 1e-10 * abs(total)
        named = dict(model.named_parameters())
        assert got["grads"][s].keys() == named.keys()
        for k, p in named.items():
            torch.testing.assert_close(got["grads"][s][k], p.grad, rtol=1e-8, atol=1e-13, msg=k)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert got["params"].keys() == model.state_dict().keys()
    if tied:
        assert "lm_head.weight" in got["params"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got["params"][k], v, rtol=1e-9, atol=1e-12, msg=k)


def _same_as_ddp_worker(info: D.DistInfo, configs: list, out: str) -> None:
    """For each config: one micro-batch per rank through FSDP2 and through DDP
    from the same weights; the reduced gradients must agree (methods whose
    forward depends on the batch, like 2:4 feature selection, cannot be
    compared against one process on the whole batch)."""
    results = []
    for cfg, state, x, y in configs:
        grads = {}
        for kind in ("fsdp", "ddp"):
            model = build_model(cfg).double()
            model.load_state_dict(state)
            wrapped = P.parallelize(model, kind, info, torch.device("cpu"))
            x_rank, y_rank = x.chunk(info.world_size)[info.rank], y.chunk(info.world_size)[info.rank]
            _, loss = wrapped(x_rank, y_rank)
            loss.backward()
            grads[kind] = {k: (p.grad.full_tensor() if kind == "fsdp" else p.grad.clone()) for k, p in model.named_parameters()}
            if kind == "ddp":
                D.release_ddp(wrapped)
        results.append(grads)
    if info.is_main:
        torch.save(results, Path(out) / "same_as_ddp.pt")


def test_fsdp_equals_ddp_for_the_24_sparse_ffn(tmp_path: Path) -> None:
    """2:4 activation-sparse FFN past its dense warmup (its feature selection
    depends on the batch), two methods: FSDP2's gradients equal DDP's."""
    configs = []
    for cfg in (tiny_config(ffn="relu2_24", activation_dense_warmup_steps=0),
                tiny_config(ffn="relu2_24", activation_dense_warmup_steps=0, activation_sparse_method="transposable")):
        model = fresh_model(cfg)
        configs.append((cfg, model.state_dict(), torch.randint(0, 300, (4, 16)), torch.randint(0, 300, (4, 16))))
    run_workers(2, _same_as_ddp_worker, configs, str(tmp_path))
    for grads in torch.load(tmp_path / "same_as_ddp.pt", weights_only=True):
        assert grads["fsdp"].keys() == grads["ddp"].keys()
        for k in grads["ddp"]:
            torch.testing.assert_close(grads["fsdp"][k], grads["ddp"][k], rtol=1e-9, atol=1e-13, msg=k)


@pytest.mark.parametrize("ffn_settings", [dict(ffn="swiglu"), dict(ffn="relu2_24", activation_dense_warmup_steps=0,
                                                                     activation_sparse_method="transposable")])
def test_activation_checkpointing_recomputes_blocks_and_keeps_gradients_and_keys(ffn_settings: dict) -> None:
    """One process: each block's forward runs twice per step (once more in the
    backward), gradients and state-dict keys are those of the plain model."""
    cfg = tiny_config(n_layer=3, **ffn_settings)
    plain = fresh_model(cfg)
    ckpt = build_model(cfg).double()
    ckpt.load_state_dict(plain.state_dict())
    P.apply_activation_checkpointing(ckpt)
    calls = []
    for i, block in enumerate(ckpt.blocks):  # counted in forward itself: the recomputation skips module hooks
        inner = block._checkpoint_wrapped_module
        inner.forward = lambda *args, i=i, forward=inner.forward: (calls.append(i), forward(*args))[1]
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    for m in (plain, ckpt):
        m(x, y)[1].backward()
    assert sorted(calls) == [0, 0, 1, 1, 2, 2]
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    grads = {k.replace(WRAPPER_PREFIX, ""): p.grad for k, p in ckpt.named_parameters()}
    for k, p in plain.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-12, atol=1e-15, msg=k)
    fresh = build_model(cfg).double()
    P.apply_activation_checkpointing(fresh)
    fresh.load_state_dict(plain.state_dict())  # a plain checkpoint loads into the wrapped model
    for k, v in plain.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_no_sync_and_clip_on_a_plain_model() -> None:
    """Without a wrapper, ``no_sync`` changes nothing and ``clip_grad_norm`` is
    ``clip_grad_norm_``: the norm of all gradients, float64 reference."""
    model = fresh_model(tiny_config())
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    with P.no_sync(model):
        model(x, y)[1].backward()
    expected = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
    before = {k: p.grad.clone() for k, p in model.named_parameters()}
    norm = P.clip_grad_norm(model.parameters(), float(expected) / 4)
    assert type(norm) is torch.Tensor
    torch.testing.assert_close(norm, expected, rtol=1e-12, atol=0)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, before[k] / 4, rtol=1e-6, atol=1e-15, msg=k)


def test_parallelize_refuses_an_unknown_kind_and_a_wrapper_under_fsdp() -> None:
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="'zero3'"):
        P.parallelize(model, "zero3", D.DistInfo(), torch.device("cpu"))
    with pytest.raises(ValueError, match="ModuleList"):
        P.parallelize(model, "fsdp", D.DistInfo(0, 0, 2), torch.device("cpu"), forward_module=torch.nn.ModuleList([model]))


# ----------------------------------------------------------------------------- checkpoints


def _batch(cfg: ModelConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, cfg.vocab_size, (6, cfg.seq_len), generator=g), torch.randint(0, cfg.vocab_size, (6, cfg.seq_len), generator=g)


def _step(model, optimizer, cfg: ModelConfig, step: int, info: D.DistInfo) -> None:
    x, y = _batch(cfg, step)
    part = slice(info.rank * 6 // info.world_size, (info.rank + 1) * 6 // info.world_size)
    model(x[part], y[part])[1].backward()
    P.clip_grad_norm(model.parameters(), 0.5)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _sharded_model(info: D.DistInfo, cfg: ModelConfig, state: dict | None):
    model = build_model(cfg).double()
    if state is not None:
        model.load_state_dict(state)
    model = P.parallelize(model, "fsdp", info, torch.device("cpu"))
    return model, make_adamw(model, 1e-2, 0.1, (0.9, 0.95), "cpu")


def _save_worker(info: D.DistInfo, cfg: ModelConfig, state: dict, run: str) -> None:
    """Step 0, save (as step 1), step 1: the full states around the save go to disk."""
    model, optimizer = _sharded_model(info, cfg, state)
    _step(model, optimizer, cfg, 0, info)
    S.save_sharded(run, model, optimizer, {"step": 1, "model_config": asdict(cfg), "note": "x"}, step=1)
    saved = full_state(model, optimizer)
    _step(model, optimizer, cfg, 1, info)
    after = full_state(model, optimizer)
    if info.is_main:
        torch.save({"saved": saved, "after": after}, Path(run) / "reference.pt")


def _load_worker(info: D.DistInfo, cfg: ModelConfig, run: str, tag: str) -> None:
    """Load into fresh (differently initialised) weights, record, take step 1."""
    torch.manual_seed(99)
    model, optimizer = _sharded_model(info, cfg, None)
    meta = S.load_sharded(run, model, optimizer)
    loaded = full_state(model, optimizer)
    _step(model, optimizer, cfg, 1, info)
    after = full_state(model, optimizer)
    if info.is_main:
        torch.save({"meta": meta, "loaded": loaded, "after": after}, Path(run) / f"load_{tag}.pt")


CKPT_CONFIG = tiny_config(tie_embeddings=True)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose sharded checkpoint 2 FSDP processes saved after one
    step, with the full states around the save in ``reference.pt``."""
    run = tmp_path_factory.mktemp("sharded") / "run"
    run_workers(2, _save_worker, CKPT_CONFIG, fresh_model(CKPT_CONFIG).state_dict(), str(run))
    return run


def test_sharded_checkpoint_resumes_exactly_and_on_other_world_sizes(saved_run: Path) -> None:
    """Saved by 2 FSDP processes: loaded by 2 and 3 FSDP processes and by one
    plain process, model and optimizer state equal the saved state exactly;
    the 2-process resume then continues exactly as the uninterrupted run did."""
    cfg, run = CKPT_CONFIG, saved_run
    ref = torch.load(run / "reference.pt", weights_only=True)
    assert S.latest_sharded_dir(run).name == S.step_dir_name(1)
    assert len(list((S.latest_sharded_dir(run)).glob("*.distcp"))) == 2  # one file per rank

    run_workers(2, _load_worker, cfg, str(run), "2")
    run_workers(3, _load_worker, cfg, str(run), "3")
    got2 = torch.load(run / "load_2.pt", weights_only=True)
    assert got2["meta"] == {"step": 1, "model_config": asdict(cfg), "note": "x"}
    assert_states_equal(got2["loaded"], ref["saved"], "2 processes")
    assert_states_equal(got2["after"], ref["after"], "2 processes, resumed step")
    assert_states_equal(torch.load(run / "load_3.pt", weights_only=True)["loaded"], ref["saved"], "3 processes")

    model = build_model(cfg).double()  # one process, no process group, no sharding
    optimizer = make_adamw(model, 1e-2, 0.1, (0.9, 0.95), "cpu")
    S.load_sharded(run, model, optimizer)
    assert_states_equal(full_state(model, optimizer), ref["saved"], "1 process")
    # the optimizer hyperparameters come back too (the template had others)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_consolidate_and_single_file_state_round_trip(saved_run: Path, tmp_path: Path) -> None:
    """A sharded checkpoint consolidates into the single-file format (plain
    ``state_dict``s), and that single file continues under FSDP with the same state."""
    cfg, run = CKPT_CONFIG, saved_run
    ref = torch.load(run / "reference.pt", weights_only=True)["saved"]
    single = S.consolidate_sharded(run)
    assert single["step"] == 1 and single["note"] == "x"
    model = build_model(cfg).double()
    model.load_state_dict(single["model"])
    optimizer = make_adamw(model, 1e-2, 0.1, (0.9, 0.95), "cpu")
    optimizer.load_state_dict(single["optimizer"])
    assert_states_equal(full_state(model, optimizer), ref, "consolidated")

    save_checkpoint(tmp_path / "single.pt", single)
    run_workers(2, _single_file_worker, cfg, str(tmp_path))
    assert_states_equal(torch.load(tmp_path / "from_single.pt", weights_only=True), ref, "single file under FSDP")


def _single_file_worker(info: D.DistInfo, cfg: ModelConfig, folder: str) -> None:
    model, optimizer = _sharded_model(info, cfg, None)
    S.load_single_file_state(model, optimizer, torch.load(Path(folder) / "single.pt", weights_only=True))
    state = full_state(model, optimizer)
    if info.is_main:
        torch.save(state, Path(folder) / "from_single.pt")


def test_saving_a_step_again_names_a_new_directory_and_prunes_the_rest(tmp_path: Path) -> None:
    """One process: a step saved twice (a resumed run stopping at once) gets a
    fresh directory, ``latest`` moves to it and ``previous`` to the first, a
    crashed save's ``.partial`` leftovers and older directories are removed,
    and the second state is what loads."""
    cfg = tiny_config()
    model = fresh_model(cfg)
    optimizer = make_adamw(model, 1e-2, 0.1, (0.9, 0.95), "cpu")
    info = D.DistInfo()
    _step(model, optimizer, cfg, 0, info)
    S.save_sharded(tmp_path, model, optimizer, {"step": 4}, step=4)
    first = S.save_sharded(tmp_path, model, optimizer, {"step": 5}, step=5)
    (tmp_path / S.SHARDED_DIR / "step_00000006.partial").mkdir()  # a save that crashed
    _step(model, optimizer, cfg, 1, info)
    second = S.save_sharded(tmp_path, model, optimizer, {"step": 5, "again": True}, step=5)
    assert first.name == "step_00000005" and second.name == "step_00000005_1"
    assert sorted(p.name for p in (tmp_path / S.SHARDED_DIR).iterdir()) == [
        S.LATEST_NAME, S.PREVIOUS_NAME, "step_00000005", "step_00000005_1"]
    assert (tmp_path / S.SHARDED_DIR / S.PREVIOUS_NAME).read_text().strip() == "step_00000005"
    fresh = build_model(cfg).double()
    fresh_optimizer = make_adamw(fresh, 1e-2, 0.1, (0.9, 0.95), "cpu")
    assert S.load_sharded(tmp_path, fresh, fresh_optimizer) == {"step": 5, "again": True}
    assert_states_equal(full_state(fresh, fresh_optimizer), full_state(model, optimizer), "reloaded")


class _Crash(OSError):
    """An injected failure standing for a kill at one point of a save."""


def test_a_crash_at_any_point_of_a_sharded_save_keeps_a_complete_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """One process: step 1 saved; the save of step 2 stopped at each of its file
    system operations in turn (meta.pt, the rename, each pointer, each removal)
    as a kill would stop it. Every time, the folder loads the step-1 state or,
    once ``latest`` names step 2, the step-2 state, and the next save works."""
    cfg = tiny_config()
    model = fresh_model(cfg)
    optimizer = make_adamw(model, 1e-2, 0.1, (0.9, 0.95), "cpu")
    info = D.DistInfo()
    _step(model, optimizer, cfg, 0, info)
    states = {}

    def load(run: Path) -> dict:
        fresh = build_model(cfg).double()
        fresh_optimizer = make_adamw(fresh, 1e-2, 0.1, (0.9, 0.95), "cpu")
        meta = S.load_sharded(run, fresh, fresh_optimizer)
        return {"meta": meta, "state": full_state(fresh, fresh_optimizer)}

    # everything a save does to the folder after its start (DCP's own rename of .metadata included)
    ops = [("save_checkpoint", S), ("rename", Path), ("atomic_write_text", S), ("rmtree", S.shutil)]
    crash_at = 0
    while True:
        run = tmp_path / f"run{crash_at}"
        S.save_sharded(run, model, optimizer, {"step": 1}, step=1)
        states[1] = full_state(model, optimizer)
        S.save_sharded(run, model, optimizer, {"step": 1}, step=1)  # a second directory, for a removal to crash on
        _step(model, optimizer, cfg, 1, info)
        states[2] = full_state(model, optimizer)
        calls = [0]
        with monkeypatch.context() as m:
            for name, owner in ops:
                real = getattr(owner, name)

                def counted(*args, real=real, **kwargs):
                    calls[0] += 1
                    if calls[0] == crash_at + 1:
                        raise _Crash("injected")
                    return real(*args, **kwargs)

                m.setattr(owner, name, counted)
            try:
                S.save_sharded(run, model, optimizer, {"step": 2}, step=2)
                crashed = False
            except CheckpointError as e:
                assert "injected" in str(e)
                crashed = True
        got = load(run)
        step = got["meta"]["step"]
        assert step in (1, 2), crash_at
        assert_states_equal(got["state"], states[step], f"crash at operation {crash_at}")
        S.save_sharded(run, model, optimizer, {"step": 2}, step=2)  # the next save
        assert load(run)["meta"]["step"] == 2
        if not crashed:
            break
        crash_at += 1
    assert crash_at >= 5  # meta, rename, previous, latest, a removal: each was crashed on


def test_an_incomplete_latest_falls_back_to_the_previous_checkpoint(tmp_path: Path, capsys) -> None:
    """A shard file cut short or a damaged meta.pt in the directory ``latest``
    names: loading warns and reads ``previous``; with both broken, one error."""
    cfg = tiny_config()
    model = fresh_model(cfg)
    optimizer = make_adamw(model, 1e-2, 0.1, (0.9, 0.95), "cpu")
    S.save_sharded(tmp_path, model, optimizer, {"step": 1}, step=1)
    before = full_state(model, optimizer)
    _step(model, optimizer, cfg, 0, D.DistInfo())
    latest = S.save_sharded(tmp_path, model, optimizer, {"step": 2}, step=2)
    shard = next(latest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert "cut short" in S.incomplete(latest)
    fresh = build_model(cfg).double()
    fresh_optimizer = make_adamw(fresh, 1e-2, 0.1, (0.9, 0.95), "cpu")
    assert S.load_sharded(tmp_path, fresh, fresh_optimizer)["step"] == 1
    assert_states_equal(full_state(fresh, fresh_optimizer), before, "fallback")
    err = capsys.readouterr().err
    assert "step_00000002 is incomplete" in err and "using the previous one" in err
    meta = tmp_path / S.SHARDED_DIR / "step_00000001" / S.META_NAME
    meta.write_bytes(meta.read_bytes()[:-1] + b"x")
    with pytest.raises(CheckpointError, match="no complete sharded checkpoint .*cut short"):
        S.load_sharded(tmp_path, fresh, fresh_optimizer)


def test_resume_reads_the_checkpoint_with_the_larger_step(tmp_path: Path) -> None:
    """A run directory can hold both kinds (a run that changed its number of
    processes): the newer one is resumed."""
    cfg = tiny_config()
    model = fresh_model(cfg)
    optimizer = make_adamw(model, 1e-2, 0.1, (0.9, 0.95), "cpu")
    assert not S.resume_from_sharded(tmp_path)  # nothing there
    save_checkpoint(tmp_path / "ckpt.pt", {"step": 5, "model": model.state_dict()})
    assert not S.resume_from_sharded(tmp_path)  # only the single file
    S.save_sharded(tmp_path, model, optimizer, {"step": 3}, step=3)
    assert not S.resume_from_sharded(tmp_path)  # the single file is newer
    S.save_sharded(tmp_path, model, optimizer, {"step": 5}, step=5)
    assert S.resume_from_sharded(tmp_path)  # a tie: the sharded one
    (tmp_path / "ckpt.pt").unlink()
    assert S.resume_from_sharded(tmp_path)  # only the sharded one


def test_sharded_checkpoint_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no sharded checkpoint in"):
        S.load_sharded(tmp_path, GPT(tiny_config()))
    (tmp_path / S.SHARDED_DIR / "step_00000003").mkdir(parents=True)
    (tmp_path / S.SHARDED_DIR / S.LATEST_NAME).write_text("step_00000003\n")
    with pytest.raises(CheckpointError, match="no complete sharded checkpoint in .*step_00000003: meta.pt missing"):
        S.load_sharded(tmp_path, GPT(tiny_config()))
    with pytest.raises(CheckpointError, match="meta.pt is missing"):
        S.read_meta(tmp_path / S.SHARDED_DIR / "step_00000003")


def test_a_new_run_never_writes_into_a_folder_with_a_sharded_checkpoint(make_cfg, tmp_path: Path) -> None:
    from sparsetrain.errors import ConfigError
    from sparsetrain.trainer import Trainer

    (tmp_path / "old" / S.SHARDED_DIR).mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        Trainer(make_cfg(out_dir=str(tmp_path / "old")), verbose=False)


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("overrides,named", [
    (dict(parallel="zero3"), "run.parallel must be ddp or fsdp, got 'zero3'"),
    (dict(parallel="fsdp", use_mtp=True), "parallel = fsdp with use_mtp (the MTP heads live outside the sharded model"),
    (dict(parallel="fsdp", use_collider=True, use_mtp=True), "parallel = fsdp with use_mtp"),
    (dict(parallel="fsdp", selection="batch"), "parallel = fsdp with selection = batch"),
    (dict(parallel="fsdp", fire_at_step=3), "parallel = fsdp with fire_at_step"),
    (dict(parallel="fsdp", hyper_connections=2), "parallel = fsdp with hyper_connections"),
    (dict(parallel="fsdp", arch="resnet_bk"), "parallel = fsdp with model.arch = resnet_bk"),
    (dict(parallel="fsdp", ffn="relu2_24", activation_sparse_method="soft_threshold"), "soft_threshold"),
    (dict(parallel="fsdp", compile=True, compile_mode="reduce-overhead"), "compile_mode = reduce-overhead"),
    (dict(parallel="fsdp", optimizer="muon"), "parallel = fsdp with optimizer = muon"),
    (dict(activation_checkpointing=True, use_collider=True), "activation_checkpointing with use_collider"),
    (dict(activation_checkpointing=True, ffn="relu2_24", activation_sparse_method="mvue"), "= mvue is not available"),
])
def test_config_refuses_what_fsdp_and_checkpointing_cannot_do(make_cfg, overrides: dict, named: str) -> None:
    from sparsetrain.errors import ConfigError

    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        make_cfg(**overrides)


def test_config_accepts_fsdp_with_checkpointing_and_the_deterministic_24_ffn(make_cfg) -> None:
    cfg = make_cfg(parallel="fsdp", activation_checkpointing=True, ffn="relu2_24", activation_sparse_method="transposable",
                   tie_embeddings=True)
    assert (cfg.parallel, cfg.activation_checkpointing) == ("fsdp", True)


def test_config_accepts_fsdp_with_collider_and_the_24_ffn(make_cfg) -> None:
    cfg = make_cfg(parallel="fsdp", use_collider=True, collider_method="topk", collider_sparsity=0.5, ffn="relu2_24",
                   activation_sparse_method="transposable", tie_embeddings=True)
    assert (cfg.parallel, cfg.use_collider, cfg.model.ffn) == ("fsdp", True, "relu2_24")


def test_cli_names_a_bad_parallel_value_in_one_line(capsys) -> None:
    from sparsetrain.cli import main

    assert main(["train", "--parallel", "zero3", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sparsetrain: error: --parallel must be ddp or fsdp, got 'zero3'"]  # the flag typed


# ----------------------------------------------------------------------------- the trainer under FSDP
#
# One set of runs, made once for the tests below (each multi-process launch costs start-up time):
#   straight/   2 FSDP processes, steps 0 -> 4, checkpoints at 2 and 4
#   killed/     the same, rank 0 SIGKILLed inside the step-4 save (its step directory renamed into
#               place, `latest` not yet moved); copied to killed_1/ and killed_3/, then resumed by
#               2 processes to step 4
#   killed_3/   resumed by 3 FSDP processes
#   single/     one process, steps 0 -> 2, single-file checkpoint; resumed by 3 FSDP processes

TRAINER_STEPS, TRAINER_WORLD, TRAINER_ACCUM, TRAINER_BATCH = 4, 2, 2, 2


def trainer_config(corpus: Path, cache: Path, out: Path, **overrides):
    from sparsetrain.config import build_config

    base = dict(data=str(corpus), cache_dir=str(cache), out_dir=str(out), vocab_size=320, seq_len=32, n_layer=2,
                n_head=2, d_model=32, batch_size=TRAINER_BATCH, grad_accum=TRAINER_ACCUM, max_steps=TRAINER_STEPS,
                warmup_steps=2, eval_every=2, ckpt_every=2, eval_batches=3, log_every=1, val_fraction=0.2,
                device="cpu", parallel="fsdp", eval_code_samples=2, tie_embeddings=True, grad_clip=0.5)
    base.update(overrides)
    return build_config("tiny", overrides=base)


def _kill_after_renaming_the_nth_step_dir(n: int) -> None:
    """SIGKILL this process right after the ``n``-th rename of a directory to ``step_*``."""
    import signal

    real, seen = Path.rename, [0]

    def rename(self, target):
        result = real(self, target)
        if Path(target).name.startswith("step_"):
            seen[0] += 1
            if seen[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return result

    Path.rename = rename


def _watch_code_evals(calls: list) -> None:
    """Record the weights of every model the trainer hands to ``code_compile_rate``."""
    from sparsetrain import trainer

    real = trainer.code_compile_rate

    def watched(model, *args, **kwargs):
        calls.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, *args, **kwargs)

    trainer.code_compile_rate = watched


def _trainer_worker(info: D.DistInfo, runs: list, out: str) -> None:
    """For each ``(cfg, resume, kill_at)``: build the trainer (resuming when asked),
    record the full state it loaded, train, and record the final full state and
    the weights each compile-rate evaluation sampled from (rank 0)."""
    from sparsetrain.trainer import Trainer

    records = []
    for cfg, resume, kill_at in runs:
        if kill_at and info.is_main:
            _kill_after_renaming_the_nth_step_dir(kill_at)
        code_evals: list = []
        _watch_code_evals(code_evals)
        t = Trainer(cfg, resume=resume, verbose=False)
        assert P.is_sharded(t.model) and t.train_module is t.objective
        loaded = full_state(t.model, t.optimizer) if resume is not None else None
        t.fit()
        records.append({"loaded": loaded, "final": full_state(t.model, t.optimizer), "step": t.step,
                        "code_evals": code_evals})
    if info.is_main:
        torch.save(records, Path(out))


def run_trainer_workers(world: int, runs: list, out: Path) -> list:
    run_workers(world, _trainer_worker, runs, str(out))
    return torch.load(out, weights_only=True)


def metric_rows(run: Path, kind: str) -> list[dict]:
    import json

    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import shutil

    from sparsetrain.trainer import Trainer
    from test_evaluate import write_python_corpus

    root = tmp_path_factory.mktemp("fsdp_trainer")
    corpus, cache = write_python_corpus(root / "corpus"), root / "cache"
    cfg = functools.partial(trainer_config, corpus, cache)
    single = Trainer(cfg(root / "single", parallel="ddp"), verbose=False)  # also builds the token cache
    while single.step < 2:
        single.train_step()
    single.save()
    straight = run_trainer_workers(TRAINER_WORLD, [(cfg(root / "straight"), None, 0)], root / "straight.pt")[0]

    mp_context = mp.start_processes(_entry, args=(TRAINER_WORLD, _free_port(), _trainer_worker,
                                                  ([(cfg(root / "killed"), None, 2)], str(root / "unused.pt"))),
                                    nprocs=TRAINER_WORLD, join=False, start_method="spawn")
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        while not mp_context.join(timeout=1.0):
            pass
    for p in mp_context.processes:  # the join stopped the others; wait for them to be gone
        p.join(timeout=60)
    for copy in ("killed_1", "killed_3"):
        shutil.copytree(root / "killed", root / copy)
    killed_dirs = sorted(p.name for p in (root / "killed" / S.SHARDED_DIR).iterdir())
    resumed = run_trainer_workers(TRAINER_WORLD, [(cfg(root / "killed"), root / "killed", 0)], root / "resumed.pt")[0]
    three = run_trainer_workers(3, [(cfg(root / "killed_3"), root / "killed_3", 0),
                                    (cfg(root / "single"), root / "single", 0)], root / "three.pt")
    return {"root": root, "cfg": cfg, "straight": straight, "killed_dirs": killed_dirs, "resumed": resumed,
            "three": three}


def _one_process_reference(fsdp_runs: dict) -> "Trainer":
    """One process on the global batch: each step accumulates the world x grad_accum
    micro-batches the FSDP processes drew (rank r's micro-batch m), at 1/(world x accum) each."""
    from sparsetrain.data import train_batch
    from sparsetrain.trainer import Trainer

    root = fsdp_runs["root"]
    t = Trainer(fsdp_runs["cfg"](root / "reference", grad_accum=TRAINER_WORLD * TRAINER_ACCUM), verbose=False)

    def batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rank, micro = divmod(k, TRAINER_ACCUM)
        return train_batch(t.corpus.train, TRAINER_BATCH, t.cfg.model.seq_len, seed=t.cfg.seed, step=t.step,
                           micro=micro, rank=rank, world_size=TRAINER_WORLD)

    t._batch = batch
    t.fit()
    return t


def test_fsdp_trainer_equals_one_process_on_the_global_batch(fsdp_runs: dict) -> None:
    """``--parallel fsdp``, 2 processes, grad_accum 2, clipping on: losses, gradient
    norms, val losses (3 val batches: one rank pads with a weight-0 batch) and the
    final weights equal one process accumulating the same 4 micro-batches per step.

    float32 tolerances: the two differ only in the order of the gradient sums (a
    reduce-scatter over ranks against sequential accumulation), about 1e-7 of a
    gradient; AdamW divides the moments by sqrt(v) + eps, which turns such a
    difference in a component near zero into at most lr x 1e-7 x |g| / eps per step.
    The step-0 val loss is computed from identical weights: equal to the float64
    rounding of the summation order."""
    from sparsetrain.checkpoint import load_weights

    ref = _one_process_reference(fsdp_runs)
    run = fsdp_runs["root"] / "straight"
    got, want = metric_rows(run, "train"), metric_rows(ref.out_dir, "train")
    assert [r["step"] for r in got] == list(range(1, TRAINER_STEPS + 1))
    assert all(r["grad_norm"] > 0.5 for r in got)  # the clipping (grad_clip 0.5) was active
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), a["step"]
    got_eval, want_eval = metric_rows(run, "eval"), metric_rows(ref.out_dir, "eval")
    assert [r["step"] for r in got_eval] == [0, 2, 4]
    assert abs(got_eval[0]["val_loss"] - want_eval[0]["val_loss"]) < 1e-12
    for a, b in zip(got_eval[1:], want_eval[1:]):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6), a["step"]
    weights = load_weights(run / "model.safetensors")  # gathered on rank 0 at the last save
    assert weights.step == TRAINER_STEPS
    torch.manual_seed(ref.cfg.seed)
    initial = build_model(ref.cfg.model).state_dict()  # the trainers' initialisation
    final = ref.model.state_dict()
    assert weights.tensors.keys() == final.keys()
    moved = max(float((final[k] - initial[k]).abs().max()) for k in final)
    assert moved > 1e-3  # far above the tolerance: the comparison can fail
    for k, v in final.items():
        torch.testing.assert_close(weights.tensors[k], v, rtol=0, atol=1e-6, msg=k)
    # the in-memory final state of rank 0 equals what it saved
    for k, v in fsdp_runs["straight"]["final"]["model"].items():
        assert torch.equal(weights.tensors[k], v), k
    # the compile rate sampled (on rank 0) from the weights gathered from the shards
    assert len(fsdp_runs["straight"]["code_evals"]) == 3  # evals at 0, 2, 4
    for k, v in fsdp_runs["straight"]["final"]["model"].items():
        assert torch.equal(fsdp_runs["straight"]["code_evals"][-1][k], v), k
    assert all({"code_compile_rate", "code_compile_low", "code_compile_high"} <= r.keys() for r in got_eval)


def test_a_kill_during_the_sharded_save_leaves_a_run_that_resumes_exactly(fsdp_runs: dict) -> None:
    """Rank 0 SIGKILLed inside the step-4 save, after its complete step directory
    was renamed into place but before ``latest`` moved: ``latest`` still names
    step 2, and 2 processes resume from it, finishing exactly as the straight
    run (losses, val losses, final model and AdamW state bit for bit); the
    resumed save gets a fresh directory name and prunes the unnamed one."""
    root = fsdp_runs["root"]
    assert fsdp_runs["killed_dirs"] == [S.LATEST_NAME, "step_00000002", "step_00000004"]
    assert (root / "killed_1" / S.SHARDED_DIR / S.LATEST_NAME).read_text().strip() == "step_00000002"
    killed, straight = root / "killed", root / "straight"
    assert [r["step"] for r in metric_rows(killed, "train")] == list(range(1, TRAINER_STEPS + 1))
    assert [r["step"] for r in metric_rows(killed, "eval")] == [0, 2, 4]
    for kind, key in (("train", "loss"), ("train", "grad_norm"), ("eval", "val_loss")):
        assert [r[key] for r in metric_rows(killed, kind)] == [r[key] for r in metric_rows(straight, kind)], key
    assert_states_equal(fsdp_runs["resumed"]["final"], fsdp_runs["straight"]["final"], "resumed")
    assert S.latest_sharded_dir(killed).name == "step_00000004_1"
    assert sorted(p.name for p in (killed / S.SHARDED_DIR).iterdir()) == [
        S.LATEST_NAME, S.PREVIOUS_NAME, "step_00000002", "step_00000004_1"]


def test_a_two_process_fsdp_run_resumes_with_one_and_with_three_processes(fsdp_runs: dict) -> None:
    """The checkpoint 2 FSDP processes saved loads into 3 FSDP processes and into
    one plain process with the same model and AdamW state, bit for bit; both
    then train on to the end."""
    from sparsetrain.trainer import Trainer

    root = fsdp_runs["root"]
    one = Trainer(fsdp_runs["cfg"](root / "killed_1"), resume=root / "killed_1", verbose=False)
    assert not P.is_sharded(one.model) and one.step == 2
    assert_states_equal(fsdp_runs["three"][0]["loaded"], full_state(one.model, one.optimizer), "3 processes vs 1")
    one.fit()
    for run, steps in ((root / "killed_1", one.step), (root / "killed_3", fsdp_runs["three"][0]["step"])):
        assert steps == TRAINER_STEPS
        rows = metric_rows(run, "train")
        assert [r["step"] for r in rows] == list(range(1, TRAINER_STEPS + 1))
        assert all(math.isfinite(r["loss"]) for r in rows)
    # one process saved a single file, now the newer checkpoint of the folder
    assert not S.resume_from_sharded(root / "killed_1") and (root / "killed_1" / "ckpt.pt").is_file()


def test_a_single_file_checkpoint_resumes_under_fsdp(fsdp_runs: dict) -> None:
    """A one-process run's ``ckpt.pt`` loads into 3 FSDP processes (model and AdamW
    state bit for bit, as a plain model and optimizer load it), which continue
    and save a sharded checkpoint, the newer one of the folder from then on."""
    from sparsetrain.checkpoint import load_checkpoint
    from sparsetrain.optimizers import build_optimizer

    run = fsdp_runs["root"] / "single"
    state = load_checkpoint(run / "ckpt.pt")
    cfg = fsdp_runs["cfg"](run)
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    optimizer = build_optimizer(torch.nn.ModuleList([model]), cfg, "cpu")
    optimizer.load_state_dict(state["optimizer"])
    assert state["step"] == 2
    assert_states_equal(fsdp_runs["three"][1]["loaded"], full_state(model, optimizer), "single file under FSDP")
    assert fsdp_runs["three"][1]["step"] == TRAINER_STEPS and S.resume_from_sharded(run)


def test_generate_and_fire_read_an_fsdp_run_dir(fsdp_runs: dict, tmp_path: Path, capsys) -> None:
    """An FSDP run has the weights-only ``model.safetensors`` (gathered at the save)
    that generate reads; without it generate consolidates the sharded checkpoint
    to the same weights and text. ``fire`` starts a new single-file run from it."""
    import shutil

    from sparsetrain.checkpoint import load_checkpoint, load_weights
    from sparsetrain.cli import main
    from sparsetrain.generate import generate_text, load_model

    run = fsdp_runs["root"] / "straight"
    assert not (run / "ckpt.pt").exists()
    text = generate_text(run, "def f(x):", max_new_tokens=12, temperature=0)
    copy = tmp_path / "no_weights"
    shutil.copytree(run, copy)
    (copy / "model.safetensors").unlink()
    assert generate_text(copy, "def f(x):", max_new_tokens=12, temperature=0) == text
    saved = load_weights(run / "model.safetensors").tensors
    consolidated = load_model(copy).state_dict()
    assert consolidated.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(consolidated[k], v), k

    assert main(["fire", "--ckpt", str(run), "--out", str(tmp_path / "fired")]) == 0
    fired = load_checkpoint(tmp_path / "fired")
    assert fired["step"] == TRAINER_STEPS and fired["optimizer"]["state"] == {}
    assert {p.name for p in (tmp_path / "fired").iterdir()} >= {"ckpt.pt", "model.safetensors", "config.toml"}
    assert any(not torch.equal(fired["model"][k], saved[k]) for k in saved)  # reinitialised
    capsys.readouterr()
