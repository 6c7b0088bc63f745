"""Trainer: exact resume, grad accumulation, LR schedule, atomic checkpoints."""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import pytest
import torch

from sparsetrain import checkpoint
from sparsetrain.data import train_batch
from sparsetrain.errors import CheckpointError, ConfigError
from sparsetrain.optim import lr_at
from sparsetrain.trainer import Trainer, train


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def interrupted_run_matches(make_cfg, tmp_path: Path, stop_at: int, **kw) -> tuple:
    """Train straight to ``max_steps`` in ``a``; in ``b`` stop after ``stop_at`` steps
    (checkpoint, as a killed job leaves it), resume and finish. Asserts the
    resumed losses equal the straight ones; returns (straight, resumed) results."""
    straight = train(make_cfg(out_dir=str(tmp_path / "a"), **kw), verbose=False)
    t = Trainer(make_cfg(out_dir=str(tmp_path / "b"), **kw), verbose=False)
    while t.step < stop_at:
        t.train_step()
    t.save()
    resumed = Trainer(make_cfg(out_dir=str(tmp_path / "b"), **kw), resume=tmp_path / "b", verbose=False)
    assert resumed.step == stop_at
    rest = resumed.fit()
    for s in range(stop_at + 1, kw["max_steps"] + 1):
        assert rest.train_losses[s] == pytest.approx(straight.train_losses[s], rel=1e-6, abs=1e-7)
    return straight, rest


def test_save_checkpoints_false_writes_no_checkpoint(make_cfg) -> None:
    cfg = make_cfg(max_steps=4, eval_every=2, save_checkpoints=False)
    train(cfg, verbose=False)
    names = {p.name for p in Path(cfg.out_dir).iterdir()}
    assert "metrics.jsonl" in names and not any(n.startswith("ckpt") for n in names), names


def test_training_reduces_loss_and_writes_run(make_cfg) -> None:
    cfg = make_cfg(max_steps=30, lr=1e-2, eval_every=10)
    result = train(cfg, verbose=False)
    out = Path(cfg.out_dir)
    assert {"ckpt.pt", "config.toml", "metrics.jsonl", "loss.png", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert result.val_losses[30] < result.val_losses[0] - 1.0  # from ~ln(320) = 5.8
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 31))
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 10, 20, 30]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_continues_exactly(make_cfg, tmp_path: Path) -> None:
    interrupted_run_matches(make_cfg, tmp_path, stop_at=4, max_steps=8)
    final_a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    final_b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    for k in final_a:
        assert torch.allclose(final_a[k], final_b[k], rtol=1e-5, atol=1e-7), k


def test_resume_drops_metric_rows_after_checkpoint(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(out_dir=str(tmp_path / "r"), max_steps=6, eval_every=3)
    train(cfg, verbose=False)  # checkpoint at 6
    state = checkpoint.load_checkpoint(tmp_path / "r")
    state["step"] = 3  # pretend the last checkpoint was at step 3
    checkpoint.save_checkpoint(tmp_path / "r" / "ckpt.pt", state)
    Trainer(make_cfg(out_dir=str(tmp_path / "r"), max_steps=6), resume=tmp_path / "r", verbose=False)
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 3


def test_resume_refuses_another_model(make_cfg, tmp_path: Path) -> None:
    train(make_cfg(out_dir=str(tmp_path / "m"), max_steps=2), verbose=False)
    with pytest.raises(CheckpointError, match="another model: d_model=32 there vs 64 here"):
        Trainer(make_cfg(out_dir=str(tmp_path / "m"), d_model=64), resume=tmp_path / "m", verbose=False)


def test_existing_run_is_never_overwritten(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(out_dir=str(tmp_path / "keep"), max_steps=2)
    train(cfg, verbose=False)
    before = (tmp_path / "keep" / "ckpt.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        Trainer(make_cfg(out_dir=str(tmp_path / "keep")), verbose=False)
    assert (tmp_path / "keep" / "ckpt.pt").read_bytes() == before


def test_grad_accumulation_equals_one_big_batch(make_cfg) -> None:
    t = Trainer(make_cfg(), verbose=False)
    x, y = train_batch(t.corpus.train, 8, 32, seed=1, step=0)
    t.forward_backward(x, y)
    big = {n: p.grad.clone() for n, p in t.model.named_parameters()}
    t.optimizer.zero_grad(set_to_none=True)
    for half in (slice(0, 4), slice(4, 8)):
        t.forward_backward(x[half], y[half], loss_scale=0.5)
    for n, p in t.model.named_parameters():
        assert torch.allclose(p.grad, big[n], rtol=1e-4, atol=1e-7), n


def test_lr_schedule_formula() -> None:
    peak, warm, total, floor = 1e-3, 10, 110, 0.1
    assert lr_at(0, peak, warm, total, floor) == pytest.approx(1e-4)
    assert lr_at(9, peak, warm, total, floor) == pytest.approx(1e-3)
    assert lr_at(10, peak, warm, total, floor) == pytest.approx(1e-3)
    assert lr_at(60, peak, warm, total, floor) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(110, peak, warm, total, floor) == pytest.approx(1e-4)
    assert lr_at(500, peak, warm, total, floor) == pytest.approx(1e-4)
    for s in range(10, 110):
        assert lr_at(s, peak, warm, total, floor) >= lr_at(s + 1, peak, warm, total, floor)
    assert lr_at(35, peak, 0, 100, 0.0) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.35)))


def test_max_seconds_stops_and_checkpoints(make_cfg) -> None:
    cfg = make_cfg(max_steps=10_000, max_seconds=0.5, eval_every=0)
    result = train(cfg, verbose=False)
    assert 0 < result.steps_done < 10_000
    assert result.train_seconds >= 0.5
    assert checkpoint.load_checkpoint(cfg.out_dir)["step"] == result.steps_done


def test_no_step_limit_under_a_time_budget(make_cfg, capsys) -> None:
    """max_steps = 0: the time budget alone ends the run, and the progress lines count seconds."""
    cfg = make_cfg(max_steps=0, max_seconds=0.5, eval_every=0, log_every=2, schedule_by="time")
    result = train(cfg, verbose=True)
    assert result.steps_done > 0 and result.train_seconds >= 0.5
    out = capsys.readouterr().out
    assert "for 0.5 s of training after start-up" in out and "->" not in out
    progress = [l for l in out.splitlines() if l.startswith("step ") and "tok/s" in l]
    assert progress and all(re.search(r"/0\.5 s  ETA \d+s$", l) and not re.match(r"step \d+/", l) for l in progress)
    both = make_cfg(out_dir=cfg.out_dir + "2", max_steps=3, max_seconds=30.0, eval_every=0, log_every=1)
    train(both, verbose=True)
    out = capsys.readouterr().out
    assert "steps 0 -> 3 or 30 s of training after start-up, whichever comes first" in out
    assert re.search(r"^step 3/3  .*/30 s  ETA 0s$", out, re.M)


def test_no_step_limit_needs_a_time_budget(make_cfg) -> None:
    with pytest.raises(ConfigError, match="max_steps = 0 .no step limit. needs max_seconds > 0"):
        make_cfg(max_steps=0)
    with pytest.raises(ConfigError, match="schedule_by = steps decays the lr to its floor at max_steps"):
        make_cfg(max_steps=0, max_seconds=2.0)
    with pytest.raises(ConfigError, match="max_steps must be >= 0, got -1"):
        make_cfg(max_steps=-1, max_seconds=2.0, schedule_by="time")


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "model_config": {}})
    good = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "model_config": {}})
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checksums.sha256", "ckpt.pt"]  # no temp file left behind
    assert torch.equal(checkpoint.load_checkpoint(path)["model"]["w"], torch.ones(3))  # and it still verifies


def test_bad_checkpoint_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load_checkpoint(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a sparsetrain checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "other.pt")


@pytest.mark.parametrize("mode, method", [("loss", "topk"), ("loss", "stratified"), ("batch", "topk")])
def test_training_with_token_selection(make_cfg, mode: str, method: str) -> None:
    cfg = make_cfg(max_steps=4, selection=mode, selection_method=method, keep_ratio=0.5, selection_score="loss",
                   router_layers=1)
    train(cfg, verbose=False)
    rows = [json.loads(l) for l in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    kept = [r["kept_fraction"] for r in rows if r["kind"] == "train"]
    assert len(kept) == 4 and all(0.45 <= k <= 0.56 for k in kept), kept


def test_selection_resume_is_exact_with_random_selection(make_cfg, tmp_path: Path) -> None:
    interrupted_run_matches(make_cfg, tmp_path, stop_at=3, max_steps=6, selection="loss", selection_method="random",
                            keep_ratio=0.4)


def test_excess_score_uses_reference_run(make_cfg, tmp_path: Path) -> None:
    ref = make_cfg(out_dir=str(tmp_path / "ref"), max_steps=3)
    train(ref, verbose=False)
    cfg = make_cfg(out_dir=str(tmp_path / "ex"), max_steps=2, selection="loss", selection_score="excess",
                   reference_ckpt=str(tmp_path / "ref"), keep_ratio=0.3)
    t = Trainer(cfg, verbose=False)
    x, y = train_batch(t.corpus.train, 4, 32, seed=0, step=0)
    t.forward_backward(x, y)
    # the kept tokens are those whose loss exceeds the reference's the most
    with torch.no_grad():
        logits, _ = t.model(x)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        excess = nll - t._reference_nll(x, y)
    k = t.selector.last_stats.kept
    assert k == math.ceil(0.3 * y.numel())
    kept = t.selector.last_mask
    assert excess[kept].min() >= excess[~kept].max() - 1e-5
    with pytest.raises(ConfigError, match="reference_ckpt"):
        make_cfg(selection="loss", selection_score="excess")


@pytest.mark.parametrize("method", ["threshold", "topk", "random"])
def test_training_with_collider(make_cfg, method: str) -> None:
    cfg = make_cfg(max_steps=12, use_collider=True, collider_sparsity=0.4, collider_method=method)
    result = train(cfg, verbose=False)
    rows = [json.loads(l) for l in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    kept = [r["kept_fraction"] for r in rows if r["kind"] == "train"]
    assert all("backward_ms" in r for r in rows if r["kind"] == "train")
    if method == "threshold":  # the adaptive controller converges towards 60% kept
        assert abs(sum(kept[-6:]) / 6 - 0.6) < 0.12, kept
    else:
        assert all(abs(k - 0.6) < 0.01 for k in kept), kept
    assert result.val_losses[12] < result.val_losses[0]


def test_collider_step_matches_reference_gradients(make_cfg) -> None:
    """The trainer's Collider step produces the gradients of the detached-K/V objective."""
    from test_collider import reference_loss

    t = Trainer(make_cfg(use_collider=True, collider_sparsity=0.5, collider_method="topk"), verbose=False)
    x, y = train_batch(t.corpus.train, 4, 32, seed=2, step=0)
    t.forward_backward(x, y)
    got = {n: p.grad.clone() for n, p in t.model.named_parameters()}
    keep = t.selector.last_mask
    t.optimizer.zero_grad(set_to_none=True)
    reference_loss(t.model, x, y, keep).backward()
    for n, p in t.model.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-4, atol=1e-6), n


def test_collider_config_errors(make_cfg) -> None:
    with pytest.raises(ConfigError, match="needs collider_sparsity"):
        make_cfg(use_collider=True, collider_method="topk")
    with pytest.raises(ConfigError, match="exclusive"):
        make_cfg(use_collider=True, selection="loss")


def test_time_limited_run_logs_every_step(make_cfg) -> None:
    cfg = make_cfg(max_steps=10_000, max_seconds=0.3, log_every=1000, eval_every=0)
    result = train(cfg, verbose=False)
    rows = [json.loads(l) for l in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, result.steps_done + 1))


def test_async_loader_trains_identically(make_cfg, tmp_path: Path) -> None:
    sync = train(make_cfg(out_dir=str(tmp_path / "s"), max_steps=5, grad_accum=2), verbose=False)
    asyn = train(make_cfg(out_dir=str(tmp_path / "a"), max_steps=5, grad_accum=2, use_async_loader=True,
                          async_n_workers=2, async_prefetch_size=2), verbose=False)
    assert asyn.train_losses == sync.train_losses
    import multiprocessing as mp

    assert not [p for p in mp.active_children() if p.is_alive()]


def test_on_the_fly_tokenization_sync_async_and_resume(make_cfg, tmp_path: Path) -> None:
    # raw train files read and tokenized per batch: the async workers give the sync loader's losses,
    # and an interrupted run resumes exactly
    sync = train(make_cfg(out_dir=str(tmp_path / "s"), max_steps=4, data_on_the_fly=True), verbose=False)
    asyn = train(make_cfg(out_dir=str(tmp_path / "as"), max_steps=4, data_on_the_fly=True, use_async_loader=True,
                          async_n_workers=2, async_prefetch_size=1), verbose=False)
    cached = train(make_cfg(out_dir=str(tmp_path / "c"), max_steps=4), verbose=False)
    assert asyn.train_losses == sync.train_losses
    assert sync.train_losses != cached.train_losses  # really another batch source
    interrupted_run_matches(make_cfg, tmp_path, stop_at=2, max_steps=4, data_on_the_fly=True)
    import multiprocessing as mp

    assert not [p for p in mp.active_children() if p.is_alive()]


def test_training_with_mtp_saves_heads_and_resumes(make_cfg, tmp_path: Path) -> None:
    from sparsetrain.generate import generate_text

    interrupted_run_matches(make_cfg, tmp_path, stop_at=3, max_steps=6, use_mtp=True, mtp_n_tokens=3, eval_every=3)
    rows = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["mtp_losses"]) == 3 for r in rows if r["kind"] == "train")
    state = checkpoint.load_checkpoint(tmp_path / "a")
    assert state["mtp"] is not None and len(state["mtp"]) == 3 * 2  # norm gain + proj per head
    assert isinstance(generate_text(tmp_path / "a", "def", max_new_tokens=5), str)  # heads ignored


def test_relu2_24_ffn_switches_after_warmup_and_resumes_exactly(make_cfg, tmp_path: Path) -> None:
    from sparsetrain.sparse24.ffn import Sparse24FFN

    kw = dict(max_steps=6, ffn="relu2_24", activation_dense_warmup_steps=3)
    interrupted_run_matches(make_cfg, tmp_path, stop_at=2, **kw)
    t = Trainer(make_cfg(out_dir=str(tmp_path / "c"), **kw), verbose=False)
    ffns = [m for m in t.model.modules() if isinstance(m, Sparse24FFN)]
    assert len(ffns) == t.cfg.model.n_layer
    for step in range(5):
        assert all(f.sparse == (step >= 3) for f in ffns), step
        t.train_step()


@pytest.mark.parametrize("network", [dict(ffn="relu2_24", activation_sparse_method="naive", activation_dense_warmup_steps=1),
                                     dict(hyper_connections=2)])
def test_collider_trains_with_converted_networks(make_cfg, network) -> None:
    """Collider composes with the 2:4 FFN (dense, then sparse after its warmup) and with
    hyper-connections in the trainer: every logged step kept exactly half of its tokens
    and every parameter the loss reaches got a finite gradient."""
    cfg = make_cfg(max_steps=3, eval_every=0, use_collider=True, collider_sparsity=0.5, collider_method="topk", **network)
    t = Trainer(cfg, verbose=False)
    t.fit()
    rows = [json.loads(l) for l in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["kept_fraction"] for r in train_rows] == [0.5] * 3
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in train_rows)
    x, y = t._batch(0)
    t.forward_backward(x, y)
    grads = [p.grad for p in t.model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_hyper_connections_train_and_report(make_cfg) -> None:
    cfg = make_cfg(max_steps=6, hyper_connections=2, eval_every=3)
    train(cfg, verbose=False)
    rows = [json.loads(l) for l in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    hyper_rows = [r for r in rows if r["kind"] == "hyper"]
    assert [r["step"] for r in hyper_rows] == [3, 6]
    layers = hyper_rows[-1]["layers"]
    assert len(layers) == 2 * cfg.model.n_layer
    assert all(l["grad_norm"]["res"] > 0 and "stream_divergence" in l for l in layers)
    assert hyper_rows[-1]["composed_res_gain"] == pytest.approx(1.0, abs=1e-5)


def test_2_4_statistics_reach_the_logged_rows(make_cfg) -> None:
    """The relu2_24 layers' statistics, kept as tensors until the step is logged,
    land in metrics.jsonl as floats for the logged sparse steps only."""
    cfg = make_cfg(ffn="relu2_24", activation_sparse_method="naive", activation_dense_warmup_steps=2,
                   log_every=2, max_steps=6, eval_every=0)
    train(cfg, verbose=False)
    rows = [json.loads(l) for l in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r.get("sparse24") for r in rows if r["kind"] == "train"}
    assert logged[2] is None  # still dense at the step logged after the warmup's two steps
    for step in (4, 6):
        st = logged[step]
        assert st["backend"] == "masked_dense"
        assert all(0.0 <= st[k] <= 1.0 for k in ("activation_sparsity", "groups_already_24", "pruned_beyond_relu"))
        assert st["pruned_beyond_relu"] > 0  # naive 2:4 on a dense-ish ReLU^2 prunes something
    assert logged[3] is None and logged[5] is None  # not logged steps: no statistics computed


def test_2_4_statistics_are_not_counted_in_evaluation(make_cfg) -> None:
    """Statistics are asked for on the logged training step only: an evaluation
    right after it (same step) runs without them."""
    from sparsetrain.sparse24.ffn import Sparse24FFN

    t = Trainer(make_cfg(ffn="relu2_24", activation_sparse_method="naive", activation_dense_warmup_steps=0,
                         log_every=2, eval_every=0), verbose=False)
    ffns = [m for m in t.model.modules() if isinstance(m, Sparse24FFN)]
    t.train_step()
    assert not any(f.last_stats for f in ffns)
    t.train_step()  # logged
    logged = [f.last_stats for f in ffns]
    assert all(logged) and not any(f.track_stats for f in ffns)
    t.evaluate()
    assert all(f.last_stats is s for f, s in zip(ffns, logged))


@pytest.mark.parametrize("mode", ["loss", "batch"])
def test_selection_warmup_counts_optimizer_steps_with_grad_accum(make_cfg, mode: str) -> None:
    """The keep ratio in force during optimizer step ``s`` is the warmup formula at
    ``s``, however many micro-batches a step has: the kept fraction logged for
    every step equals the budget that ratio gives (tokens for ``loss``,
    sequences for ``batch``)."""
    from sparsetrain.selection import budget, warmup_keep_ratio

    accum, warm, target = 2, 6, 0.25
    cfg = make_cfg(max_steps=9, selection=mode, selection_method="topk", keep_ratio=target, selection_score="loss",
                   selection_warmup_steps=warm, grad_accum=accum, router_layers=1, eval_every=0)
    train(cfg, verbose=False)
    rows = [json.loads(l) for l in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    kept = {r["step"]: r["kept_fraction"] for r in rows if r["kind"] == "train"}
    n_tokens, n_seqs = cfg.batch_size * cfg.model.seq_len, cfg.batch_size
    for s in range(cfg.max_steps):
        ratio = warmup_keep_ratio(s, target, warm)
        want = budget(n_tokens, ratio) / n_tokens if mode == "loss" else budget(n_seqs, ratio) / n_seqs
        assert kept[s + 1] == pytest.approx(want, abs=1e-4), (s, kept)


@pytest.mark.parametrize("fails", [False, True])
def test_train_tears_down_with_a_barrier_only_after_a_normal_end(make_cfg, monkeypatch: pytest.MonkeyPatch,
                                                                  fails: bool) -> None:
    """``train`` leaves through ``shutdown_distributed(synchronize=True)`` when the run
    ended normally and with ``synchronize=False`` when it leaves on an exception
    (a peer that failed never reaches the barrier)."""
    from sparsetrain import trainer

    seen = []
    monkeypatch.setattr(trainer.D, "shutdown_distributed", lambda synchronize=True: seen.append(synchronize))
    if fails:
        def broken_step(self):
            raise RuntimeError("a step that fails")

        monkeypatch.setattr(Trainer, "train_step", broken_step)
        with pytest.raises(RuntimeError, match="a step that fails"):
            train(make_cfg(max_steps=1), verbose=False)
    else:
        train(make_cfg(max_steps=1), verbose=False)
    assert seen == [not fails]


@pytest.fixture(scope="module")
def python_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_evaluate import write_python_corpus

    return write_python_corpus(tmp_path_factory.mktemp("pycorpus"))


SAMPLING_SECONDS = 2.0


def test_eval_code_samples_logs_the_compile_rate_of_the_current_weights(make_cfg, python_corpus: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``eval_code_samples`` each eval row holds the compile rate and its Wilson
    bounds, from ``code_compile_rate`` called with the trainer's weights of that
    step, the held-out .py files, the sample count and the run's seed; the
    sampling time (stretched here) stays out of the training time."""
    from sparsetrain import trainer
    from sparsetrain.evaluate import held_out_code_files

    calls = []
    real = trainer.code_compile_rate

    def watched(model, tokenizer, files, n, **kwargs):
        time.sleep(SAMPLING_SECONDS)
        result = real(model, tokenizer, files, n, **kwargs)
        calls.append({"weights": {k: v.clone() for k, v in model.state_dict().items()}, "files": files, "n": n,
                      "kwargs": kwargs, "result": result})
        return result

    monkeypatch.setattr(trainer, "code_compile_rate", watched)
    cfg = make_cfg(data=str(python_corpus), val_fraction=0.2, eval_code_samples=3, max_steps=2, eval_every=1)
    t = Trainer(cfg, verbose=False)
    result = t.fit()
    files = held_out_code_files(cfg.data, cfg.val_fraction)
    assert files and all(f.suffix == ".py" for f in files)
    assert [c["n"] for c in calls] == [3, 3, 3] and all(c["files"] == files for c in calls)
    assert all(c["kwargs"] == {"seed": cfg.seed} for c in calls)
    for k, v in t.model.state_dict().items():
        assert torch.equal(calls[-1]["weights"][k], v), k
    rows = [json.loads(l) for l in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2]
    for r, c in zip(evals, calls):
        assert (r["code_compile_rate"], r["code_compile_low"], r["code_compile_high"]) == (
            c["result"].rate, c["result"].low, c["result"].high)
    assert result.train_seconds < SAMPLING_SECONDS  # three samplings took 3 x that


def test_eval_code_samples_without_a_usable_held_out_python_file_is_one_line(make_cfg, tmp_path: Path) -> None:
    """Refused at set-up, before the run folder exists: held-out .py files that
    have nothing to complete (the synthetic corpus's lines do not compile), and a
    corpus without .py files."""
    with pytest.raises(ConfigError, match=r"eval_code_samples = 2 .* has no usable \.py file"):
        Trainer(make_cfg(out_dir=str(tmp_path / "a"), eval_code_samples=2), verbose=False)
    text = tmp_path / "text"
    text.mkdir()
    for i in range(20):
        (text / f"doc{i}.txt").write_text(f"plain text number {i}, nothing to compile here.\n" * 20)
    with pytest.raises(ConfigError, match=r"eval_code_samples = 2 .* holds no \.py file"):
        Trainer(make_cfg(out_dir=str(tmp_path / "b"), data=str(text), eval_code_samples=2), verbose=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("network", [dict(ffn="relu2_24", activation_sparse_method="mvue", activation_dense_warmup_steps=1),
                                     dict(ffn="relu2_24", activation_sparse_method="transposable_random",
                                          activation_dense_warmup_steps=1),
                                     dict(arch="resnet_bk", bk_sparsity=0.5, bk_num_experts=2)])
def test_networks_drawing_random_numbers_resume_exactly(make_cfg, tmp_path: Path, network) -> None:
    """Random 2:4 patterns and ResNet-BK's routing noise draw from the torch RNGs and the
    modules' own generators: the checkpoint holds their states, so a resumed run draws
    what the uninterrupted one drew, and ends with the same weights."""
    interrupted_run_matches(make_cfg, tmp_path, stop_at=3, max_steps=6, **network)
    final_a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    final_b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    for k in final_a:
        assert torch.equal(final_a[k], final_b[k]), k


@pytest.mark.parametrize("code_samples", [0, 2])
def test_evaluation_does_not_move_the_training_rngs(make_cfg, python_corpus: Path, tmp_path: Path,
                                                    code_samples: int) -> None:
    """mvue 2:4 patterns are drawn in evaluation too (the val loss, the sampled code
    continuations); an evaluation puts the RNGs back, so the training losses are the
    same whatever the eval cadence."""
    kw = dict(max_steps=5, ffn="relu2_24", activation_sparse_method="mvue", activation_dense_warmup_steps=1,
              data=str(python_corpus), val_fraction=0.2)
    often = train(make_cfg(out_dir=str(tmp_path / "often"), eval_every=1, eval_code_samples=code_samples, **kw),
                  verbose=False)
    never = train(make_cfg(out_dir=str(tmp_path / "never"), eval_every=0, **kw), verbose=False)
    assert len(often.val_losses) >= 5
    assert often.train_losses == never.train_losses
