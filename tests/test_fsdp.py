"""FSDP2 on CPU with gloo processes: training equals one process on the global
batch (float64, so the comparison is tight), activation checkpointing changes
nothing but memory, and sharded checkpoints resume exactly on another number
of processes."""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

from sparsetrain import distributed as D
from sparsetrain import parallel as P
from sparsetrain import sharded_checkpoint as S
from sparsetrain.checkpoint import save_checkpoint
from sparsetrain.config import ModelConfig
from sparsetrain.build import build_model
from sparsetrain.model import GPT
from sparsetrain.optimizers import make_adamw

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
    fresh directory, ``latest`` moves to it, the older one and a crashed save's
    ``.partial`` leftovers are removed, and the second state is what loads."""
    cfg = tiny_config()
    model = fresh_model(cfg)
    optimizer = make_adamw(model, 1e-2, 0.1, (0.9, 0.95), "cpu")
    info = D.DistInfo()
    _step(model, optimizer, cfg, 0, info)
    first = S.save_sharded(tmp_path, model, optimizer, {"step": 5}, step=5)
    (tmp_path / S.SHARDED_DIR / "step_00000006.partial").mkdir()  # a save that crashed
    _step(model, optimizer, cfg, 1, info)
    second = S.save_sharded(tmp_path, model, optimizer, {"step": 5, "again": True}, step=5)
    assert first.name == "step_00000005" and second.name == "step_00000005_1"
    assert sorted(p.name for p in (tmp_path / S.SHARDED_DIR).iterdir()) == [S.LATEST_NAME, "step_00000005_1"]
    fresh = build_model(cfg).double()
    fresh_optimizer = make_adamw(fresh, 1e-2, 0.1, (0.9, 0.95), "cpu")
    assert S.load_sharded(tmp_path, fresh, fresh_optimizer) == {"step": 5, "again": True}
    assert_states_equal(full_state(fresh, fresh_optimizer), full_state(model, optimizer), "reloaded")


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
    from sparsetrain.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no sharded checkpoint in"):
        S.load_sharded(tmp_path, GPT(tiny_config()))
    (tmp_path / S.SHARDED_DIR / "step_00000003").mkdir(parents=True)
    (tmp_path / S.SHARDED_DIR / S.LATEST_NAME).write_text("step_00000003\n")
    with pytest.raises(CheckpointError, match="cannot load the sharded checkpoint"):
        S.load_sharded(tmp_path, GPT(tiny_config()))
    with pytest.raises(CheckpointError, match="meta.pt"):
        S.read_meta(tmp_path / S.SHARDED_DIR / "step_00000003")


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("overrides,named", [
    (dict(parallel="zero3"), "run.parallel must be ddp or fsdp, got 'zero3'"),
    (dict(parallel="fsdp", use_collider=True), "parallel = fsdp with use_collider"),
    (dict(parallel="fsdp", selection="batch"), "parallel = fsdp with selection = batch"),
    (dict(parallel="fsdp", fire_at_step=3), "parallel = fsdp with fire_at_step"),
    (dict(parallel="fsdp", hyper_connections=2), "parallel = fsdp with hyper_connections"),
    (dict(parallel="fsdp", arch="resnet_bk"), "parallel = fsdp with model.arch = resnet_bk"),
    (dict(parallel="fsdp", ffn="relu2_24", activation_sparse_method="soft_threshold"), "soft_threshold"),
    (dict(parallel="fsdp", compile=True, compile_mode="reduce-overhead"), "compile_mode = reduce-overhead"),
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


def test_cli_names_a_bad_parallel_value_in_one_line(capsys) -> None:
    from sparsetrain.cli import main

    assert main(["train", "--parallel", "zero3", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sparsetrain: error: --parallel must be ddp or fsdp, got 'zero3'"]  # the flag typed
