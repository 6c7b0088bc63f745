"""Collider under FSDP2 on CPU with gloo processes: the sharded model's Collider
losses and (gathered) gradients equal one process on the global batch, with the
float64 reference of tests/test_collider.py; the 2:4 FFN's token-pruned path
equals DDP's; the trainer trains, checkpoints and resumes exactly.

Normalisation: each rank's loss is the mean over its kept tokens, and the
reduce-scatter averages the ranks' gradients (as DDP's all-reduce does). With a
fixed kept count per rank (``topk``, ``random``) that is the mean over the
global batch's kept tokens; with counts that differ between ranks
(``threshold``) each rank's mean weighs the same, as each micro-batch's does in
gradient accumulation."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import pytest
import torch

from sparsetrain import distributed as D
from sparsetrain import parallel as P
from sparsetrain import sharded_checkpoint as S
from sparsetrain.build import build_model
from sparsetrain.config import ModelConfig

from gradient_magnitudes import assert_within_rounding, recording
from test_collider import reference_loss
from test_fsdp import (TRAINER_STEPS, TRAINER_WORLD, assert_states_equal, full_state, metric_rows, run_workers,
                       trainer_config)

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


def _mixed_precision_worker(info: D.DistInfo, cfg: ModelConfig, state: dict, batch: tuple, out: str) -> None:
    """One Collider step with FSDP2's mixed precision as the trainer sets it on CUDA
    (blocks gathered and computed in bfloat16, gradients reduced in float32),
    under bfloat16 autocast."""
    from sparsetrain.collider import ColliderModel, masked_cross_entropy

    model = build_model(cfg)
    model.load_state_dict(state)
    P.parallelize(model, "fsdp", info, torch.device("cpu"), param_dtype=torch.bfloat16)
    x, y, keep = (_shard(t, info) for t in batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ColliderModel(model)(x)
    masked_cross_entropy(logits, y, keep).backward()
    grads = {k: p.grad.full_tensor() for k, p in model.named_parameters()}
    if info.is_main:
        torch.save(grads, Path(out))


def test_fsdp_collider_in_mixed_precision_is_close_to_the_float64_reference(tmp_path: Path) -> None:
    """bfloat16 weights gathered by FSDP2 (the engine's compute dtype is then the
    weights' own: no cast, the saved weights are the gathered parameters whose
    storage FSDP2 frees after the forward and refills for the backward):
    float32 sharded gradients within 5e-2 of the float64 reference's norm, the
    bound of test_collider's CUDA bfloat16 test (bfloat16 keeps 8 bits; its
    rounding in the residual stream, the GEMMs and the weight gradients adds up
    to about 1e-2 here, as for the dense model under the same policy)."""
    from test_collider import assert_close

    cfg = collider_config(d_model=32, init_std=0.1)
    model = fresh_model(cfg).float()
    batch = make_steps(cfg, 2, "fixed", n_steps=1, n_micro=1, B=4)[0][0]
    run_workers(2, _mixed_precision_worker, cfg, model.state_dict(), batch, str(tmp_path / "grads.pt"))
    got = torch.load(tmp_path / "grads.pt", weights_only=True)
    assert {g.dtype for g in got.values()} == {torch.float32}
    model = model.double()
    reference_loss(model, *batch).backward()
    assert_close(got, {k: p.grad.float() for k, p in model.named_parameters()}, rtol=5e-2)

# ----------------------------------------------------------------------------- the trainer
#
# One launch of 2 FSDP processes with use_collider (topk, half the tokens dropped):
#   straight/  steps 0 -> 4, checkpoints at 2 and 4
#   stopped/   steps 0 -> 2 and a checkpoint, then a new Trainer resumes it to step 4

COLLIDER_TRAINING = dict(use_collider=True, collider_method="topk", collider_sparsity=0.5)


def _collider_trainer_worker(info: D.DistInfo, make_cfg, root: str) -> None:
    from sparsetrain.collider import ColliderModel
    from sparsetrain.objectives import ColliderLoss
    from sparsetrain.trainer import Trainer

    root_path = Path(root)
    compiled = Trainer(make_cfg(root_path / "compiled", compile=True), verbose=False)
    # Collider compiles its own pieces; a compiled block would trace the node the engine calls it with
    assert isinstance(compiled.objective.net, ColliderModel) and compiled.objective.net.compile
    assert all(block._compiled_call_impl is None for block in compiled.model.blocks)
    del compiled
    straight = Trainer(make_cfg(root_path / "straight"), verbose=False)
    assert P.is_sharded(straight.model) and straight.train_module is straight.objective
    assert isinstance(straight.objective, ColliderLoss) and straight.objective.net.model is straight.model
    straight.fit()
    stopped = Trainer(make_cfg(root_path / "stopped"), verbose=False)
    while stopped.step < 2:
        stopped.train_step()
    stopped.save()
    saved = full_state(stopped.model, stopped.optimizer)
    resumed = Trainer(make_cfg(root_path / "stopped"), resume=root_path / "stopped", verbose=False)
    loaded = full_state(resumed.model, resumed.optimizer)
    resumed.fit()
    record = {"straight": full_state(straight.model, straight.optimizer), "saved": saved, "loaded": loaded,
              "resumed": full_state(resumed.model, resumed.optimizer), "steps": (straight.step, resumed.step)}
    if info.is_main:
        torch.save(record, root_path / "collider.pt")


@pytest.fixture(scope="module")
def collider_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from test_evaluate import write_python_corpus

    root = tmp_path_factory.mktemp("fsdp_collider_trainer")
    corpus, cache = write_python_corpus(root / "corpus"), root / "cache"
    make_cfg = functools.partial(trainer_config, corpus, cache, eval_code_samples=0, **COLLIDER_TRAINING)
    run_workers(TRAINER_WORLD, _collider_trainer_worker, make_cfg, str(root))
    return {"root": root, "cfg": make_cfg, "record": torch.load(root / "collider.pt", weights_only=True)}


def test_fsdp_collider_trainer_resumes_exactly(collider_runs: dict) -> None:
    """``parallel = fsdp`` with ``use_collider`` (topk): a run stopped after its
    step-2 checkpoint and resumed by a new trainer loads the saved model and
    AdamW state bit for bit and finishes with the uninterrupted run's losses,
    val losses and final state, bit for bit."""
    root, record = collider_runs["root"], collider_runs["record"]
    assert record["steps"] == (TRAINER_STEPS, TRAINER_STEPS)
    assert_states_equal(record["loaded"], record["saved"], "loaded")
    assert_states_equal(record["resumed"], record["straight"], "resumed")
    assert S.latest_sharded_dir(root / "stopped").name == S.step_dir_name(TRAINER_STEPS)
    straight, resumed = metric_rows(root / "straight", "train"), metric_rows(root / "stopped", "train")
    assert [r["step"] for r in resumed] == [3, 4]  # the stopped trainer wrote no rows (train_step alone)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[2:]]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight[2:]]
    assert metric_rows(root / "stopped", "eval")[-1]["val_loss"] == metric_rows(root / "straight", "eval")[-1]["val_loss"]


def test_fsdp_collider_trainer_equals_one_process_on_the_global_batch(collider_runs: dict) -> None:
    """The straight run against one process accumulating the 2 x 2 micro-batches
    the FSDP processes drew: every micro-batch keeps its top half (the same count
    on every rank, so the ranks' mean is the global kept mean), and the losses,
    gradient norms and final weights agree to float32 rounding (the tolerances
    of test_fsdp.test_fsdp_trainer_equals_one_process_on_the_global_batch, whose
    comment says why); the kept fraction logged is the one asked for."""
    from sparsetrain.checkpoint import load_weights
    from test_fsdp import _one_process_reference

    root = collider_runs["root"]
    ref = _one_process_reference(collider_runs)
    got, want = metric_rows(root / "straight", "train"), metric_rows(ref.out_dir, "train")
    assert [r["step"] for r in got] == list(range(1, TRAINER_STEPS + 1))
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), a["step"]
        assert a["kept_fraction"] == b["kept_fraction"] == 0.5, a["step"]
    weights = load_weights(root / "straight" / "model.safetensors")
    final = ref.model.state_dict()
    torch.manual_seed(ref.cfg.seed)
    initial = build_model(ref.cfg.model).state_dict()
    assert max(float((final[k] - initial[k]).abs().max()) for k in final) > 1e-3  # it trained
    for k, v in final.items():
        torch.testing.assert_close(weights.tensors[k], v, rtol=0, atol=1e-6, msg=k)
