"""Start-up priming (``Trainer._prime_objective``): a run whose kept count changes
runs its objective once more at the kept counts it reaches later, inside its
start-up, and trains exactly as without it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from sparsetrain.selection import TokenSelector, budget
from sparsetrain.trainer import Trainer, train

PRIMED = "start-up: primed the objective"
TIMING_KEYS = ("tokens_per_s", "backward_ms")  # wall-clock measurements, different in every run
COLLIDER = dict(use_collider=True, collider_sparsity=0.5, selection_warmup_steps=4, eval_every=3)


def _rows(run: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows if r["kind"] == kind]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "ckpt.pt", weights_only=True)
    return {**state["model"], **{f"mtp.{k}": v for k, v in (state["mtp"] or {}).items()}}


def _assert_same_training(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert _rows(a) == _rows(b)
    assert [(r["step"], r["val_loss"]) for r in _rows(a, "eval")] == [(r["step"], r["val_loss"]) for r in _rows(b, "eval")]
    ca, cb = torch.load(a / "ckpt.pt", weights_only=True), torch.load(b / "ckpt.pt", weights_only=True)
    opt_a, opt_b = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    sel_a, sel_b = ca["selector"], cb["selector"]  # step count, generators, threshold controller
    assert sel_a["step_count"] == sel_b["step_count"] and sel_a["controller"] == sel_b["controller"]
    assert sel_a["generators"].keys() == sel_b["generators"].keys()
    assert all(torch.equal(sel_a["generators"][d], sel_b["generators"][d]) for d in sel_a["generators"])


@pytest.mark.parametrize("setting", [
    dict(collider_method="topk", grad_accum=1),
    dict(collider_method="topk", grad_accum=2),
    dict(collider_method="random", grad_accum=1),
    dict(collider_method="random", grad_accum=2),
    # the 2:4 FFN draws its mvue patterns from its own generator, and MTP heads get gradients
    dict(collider_method="random", grad_accum=2, use_mtp=True, ffn="relu2_24", activation_sparse_method="mvue",
         activation_dense_warmup_steps=0),
    # the adaptive threshold's controller, ramping its target sparsity
    dict(collider_method="threshold"),
], ids=["topk", "topk-accum2", "random", "random-accum2", "random-mtp-2:4", "adaptive-threshold"])
def test_priming_does_not_change_training(make_cfg, tmp_path: Path, capsys, setting: dict) -> None:
    """The key property: with priming on and off, the same seed trains the same
    weights, optimizer state, losses and kept fractions, bit for bit."""
    kw = {**COLLIDER, "max_steps": 6, **setting}
    train(make_cfg(out_dir=str(tmp_path / "on"), prime_startup=True, **kw), verbose=True)
    assert capsys.readouterr().out.count(PRIMED) == 1
    train(make_cfg(out_dir=str(tmp_path / "off"), prime_startup=False, **kw), verbose=True)
    assert PRIMED not in capsys.readouterr().out
    _assert_same_training(tmp_path / "on", tmp_path / "off")
    kept = [r["kept_fraction"] for r in _rows(tmp_path / "on")]
    if setting["collider_method"] != "threshold":
        assert kept == [1.0, 0.875, 0.75, 0.625, 0.5, 0.5]  # the warmup, untouched


def test_priming_does_not_change_batch_splitting(make_cfg, tmp_path: Path) -> None:
    """CGGR batch splitting: the kept sequences are the network's batch, so it primes too."""
    kw = dict(selection="batch", selection_method="topk", keep_ratio=0.5, selection_score="loss", router_layers=1,
              selection_warmup_steps=2, max_steps=4, eval_every=0)
    on = Trainer(make_cfg(out_dir=str(tmp_path / "on"), **kw), verbose=False)
    assert on._priming_ratios() == (0.75, 0.5)
    on.fit()
    train(make_cfg(out_dir=str(tmp_path / "off"), prime_startup=False, **kw), verbose=False)
    _assert_same_training(tmp_path / "on", tmp_path / "off")


def _record_selections(t: Trainer) -> list[tuple]:
    """Every selection the selector makes, as (step count, keep ratio, kept), and every
    optimizer step, as ("optimizer step", steps done before it)."""
    events: list[tuple] = []
    select = t.selector.select_from_scores

    def recorded(*args, **kwargs):
        mask, stats = select(*args, **kwargs)
        events.append((t.selector.step_count, stats.keep_ratio, stats.kept))
        return mask, stats

    t.selector.select_from_scores = recorded
    opt_step = t.optimizer.step

    def counted(*args, **kwargs):
        events.append(("optimizer step", t.step))
        return opt_step(*args, **kwargs)

    t.optimizer.step = counted
    return events


@pytest.mark.parametrize("accum", [1, 2])
def test_priming_runs_at_the_next_and_the_final_kept_count_in_the_first_step(make_cfg, accum: int) -> None:
    """In the first step, after its own forwards and optimizer step and before the next
    step, the objective runs once at the next step's ratio (a new kept count) and
    once at the final one, each with a full backward; the selector stays at step 0."""
    t = Trainer(make_cfg(**COLLIDER, collider_method="random", grad_accum=accum), verbose=False)
    events = _record_selections(t)
    backwards = []
    t.model.lm_head.weight.register_hook(lambda g: backwards.append(t.selector.current_ratio()))
    t.train_step()
    n = t.cfg.batch_size * t.cfg.model.seq_len
    step_1 = [(0, 1.0, n)] * accum + [("optimizer step", 0)]
    priming = [(0, 0.875, budget(n, 0.875)), (0, 0.5, budget(n, 0.5))]
    assert events == step_1 + priming
    assert backwards == [1.0] * accum + [0.875, 0.5]
    # priming left no gradient behind, and the selector where the step put it
    assert all(p.grad is None for p in t.train_module.parameters())
    assert t.selector.step_count == 1 and t.selector.last_stats.keep_ratio == 1.0
    events.clear()
    t.train_step()  # the second step: no priming
    assert events == [(1, 0.875, budget(n, 0.875))] * accum + [("optimizer step", 1)]


def test_forced_ratio_leaves_the_selector_as_it_was() -> None:
    """Inside ``forced_ratio`` a random or adaptive-threshold selector keeps the top-k
    at the forced ratio; afterwards its generator, controller, step count, last mask
    and last stats are those of before (the next selection is the same as without it)."""
    logits, targets = torch.randn(2, 16, 11), torch.randint(0, 11, (2, 16))
    for kw in (dict(method="random", keep_ratio=0.5, warmup_steps=3),
               dict(method="threshold", target_sparsity=0.4, warmup_steps=3)):
        a, b = TokenSelector(score="loss", seed=3, **kw), TokenSelector(score="loss", seed=3, **kw)
        for s in (a, b):
            s(logits, targets)
            s.step()
        mask, stats = a.last_mask, a.last_stats
        with a.forced_ratio(0.25):
            forced, fstats = a(logits, targets)
            assert a.current_ratio() == 0.25 and fstats.kept == budget(32, 0.25)
        assert a.last_mask is mask and a.last_stats is stats and a.step_count == b.step_count == 1
        assert torch.equal(a(logits, targets)[0], b(logits, targets)[0])
        assert a.state_dict()["controller"] == b.state_dict()["controller"]


@pytest.mark.parametrize("kw, ratios", [
    (dict(method="topk", keep_ratio=0.5, warmup_steps=4), (0.875, 0.5)),
    (dict(method="random", keep_ratio=0.5, warmup_steps=1), (0.5,)),  # the count changes once, to the final one
    (dict(method="topk", keep_ratio=0.5, warmup_steps=0), ()),  # one kept count from the first step
    (dict(method="topk", keep_ratio=1.0, warmup_steps=4), ()),
    (dict(method="threshold", target_sparsity=0.4), (0.8, 0.6)),  # batch-dependent count: two other counts
    (dict(method="threshold", target_sparsity=0.4, warmup_steps=4), (0.9, 0.6)),
    (dict(method="threshold", threshold=0.5), ()),  # a fixed threshold: no target to prime at
    (dict(method="topk", keep_ratio=0.5, dynamic=True), (0.75, 0.5)),
])
def test_priming_ratios(kw: dict, ratios: tuple) -> None:
    assert TokenSelector(**kw).priming_ratios() == pytest.approx(ratios)


def test_priming_ratios_of_a_resumed_warmup() -> None:
    s = TokenSelector(method="topk", keep_ratio=0.5, warmup_steps=4)
    s.set_step(2)  # the first step of this process ran at 0.75
    assert s.priming_ratios() == (0.625, 0.5)
    s.set_step(3)
    assert s.priming_ratios() == (0.5,)
    s.set_step(4)
    assert s.priming_ratios() == ()


def test_priming_time_is_start_up_time(make_cfg, tmp_path: Path) -> None:
    """A fake clock that advances 1 s a step and 2.5 s in each priming pass: the
    passes' 5 s count in startup_seconds, not in the training seconds after start-up."""
    results = {}
    for prime in (True, False):
        t = Trainer(make_cfg(out_dir=str(tmp_path / str(prime)), **COLLIDER, collider_method="topk", max_steps=4,
                             prime_startup=prime), verbose=False)
        fake = [100.0]
        t.clock.now = lambda: fake[0]
        step, forced = t.train_step, t.selector.forced_ratio

        def timed_step():
            out = step()
            fake[0] += 1.0
            return out

        @contextlib.contextmanager
        def slow_priming(ratio):
            with forced(ratio):
                yield
            fake[0] += 2.5

        t.train_step, t.selector.forced_ratio = timed_step, slow_priming
        results[prime] = t.fit()
        evals = _rows(tmp_path / str(prime), "eval")
        assert evals[-1]["startup_seconds"] == results[prime].startup_seconds
        assert evals[-1]["train_seconds_after_startup"] == 3.0  # steps 2 to 4
    assert results[True].startup_seconds == 6.0 and results[False].startup_seconds == 1.0
    assert results[True].train_seconds == 9.0 and results[False].train_seconds == 4.0
    assert [r["startup_seconds"] for r in _rows(tmp_path / "True", "startup")] == [6.0]


@pytest.mark.parametrize("kw", [
    dict(),  # dense
    dict(use_collider=True, collider_sparsity=0.5, collider_method="topk"),  # no warmup: one kept count
    dict(**COLLIDER, collider_method="topk", prime_startup=False),
    dict(**COLLIDER, collider_method="topk", startup_steps=0),  # no start-up to prime in
    dict(selection="loss", selection_method="topk", keep_ratio=0.5, selection_warmup_steps=4),  # the dense network's loss
], ids=["dense", "collider-no-warmup", "off", "no-startup", "cggr-loss"])
def test_no_priming_where_it_is_not_needed(make_cfg, capsys, kw: dict) -> None:
    t = Trainer(make_cfg(max_steps=3, **kw), verbose=True)
    forwards = []
    t.train_module.register_forward_hook(lambda *_: forwards.append(t.step))
    t.fit()
    assert PRIMED not in capsys.readouterr().out
    assert forwards == [0, 1, 2]  # one forward per step (grad_accum 1), none more


def test_resumed_run_primes_again_and_matches_an_uninterrupted_one(make_cfg, tmp_path: Path, capsys) -> None:
    """A resumed process compiles again, so it primes again (at the ratios from its own
    step on), and the resumed run ends exactly where an uninterrupted one does."""
    kw = dict(**COLLIDER, collider_method="random", max_steps=6, grad_accum=2)
    train(make_cfg(out_dir=str(tmp_path / "a"), **kw), verbose=True)
    assert "primed the objective at keep ratios 0.875, 0.5" in capsys.readouterr().out
    first = Trainer(make_cfg(out_dir=str(tmp_path / "b"), **kw), verbose=True)
    while first.step < 2:
        first.train_step()
    first.save()
    assert capsys.readouterr().out.count(PRIMED) == 1
    resumed = Trainer(make_cfg(out_dir=str(tmp_path / "b"), **kw), resume=tmp_path / "b", verbose=True)
    events = _record_selections(resumed)
    resumed.fit()
    assert "primed the objective at keep ratios 0.625, 0.5" in capsys.readouterr().out
    n = resumed.cfg.batch_size * resumed.cfg.model.seq_len
    assert events[3:5] == [(2, 0.625, budget(n, 0.625)), (2, 0.5, budget(n, 0.5))]  # after step 3's two and its update
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r for r in _rows(tmp_path / "a") if r["step"] > 2] == _rows(tmp_path / "b")  # steps 3 to 6


def _two_process_worker(info, make_cfg, root: str) -> None:
    from test_fsdp import full_state

    record = {}
    for prime in (True, False):
        t = Trainer(make_cfg(Path(root) / str(prime), prime_startup=prime), verbose=False)
        t.fit()
        record[prime] = full_state(t.model, t.optimizer)  # a collective under FSDP
        del t
    if info.is_main:
        torch.save(record, Path(root) / "record.pt")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_priming_does_not_change_two_process_training(tmp_path: Path, parallel: str) -> None:
    """Two gloo processes: under DDP the priming's gradients stay local (no_sync), under
    FSDP they are reduced as usual; either way they are dropped and the run trains
    bit for bit as without priming."""
    import functools

    from test_evaluate import write_python_corpus
    from test_fsdp import assert_states_equal, metric_rows, run_workers, trainer_config

    corpus, cache = write_python_corpus(tmp_path / "corpus"), tmp_path / "cache"
    make_cfg = functools.partial(trainer_config, corpus, cache, parallel=parallel, eval_code_samples=0,
                                 use_collider=True, collider_method="random", collider_sparsity=0.5,
                                 selection_warmup_steps=3)
    run_workers(2, _two_process_worker, make_cfg, str(tmp_path))
    record = torch.load(tmp_path / "record.pt", weights_only=True)
    assert_states_equal(record[True], record[False], "primed")
    on, off = metric_rows(tmp_path / "True", "train"), metric_rows(tmp_path / "False", "train")
    assert [(r["loss"], r["grad_norm"], r["kept_fraction"]) for r in on] == \
        [(r["loss"], r["grad_norm"], r["kept_fraction"]) for r in off]


def test_other_specialization_count_against_brute_force() -> None:
    """The nearest count above ``kept`` whose divisibility by 16 differs (Triton compiles
    integer arguments apart on it), or None where it exceeds ``total``."""
    from sparsetrain.collider.triton_attention import other_specialization_count

    for kept in range(1, 200):
        for total in (kept, kept + 1, kept + 15, kept + 16, 10_000):
            want = next((c for c in range(kept + 1, total + 1) if (c % 16 == 0) != (kept % 16 == 0)), None)
            assert other_specialization_count(kept, total) == want, (kept, total)


def test_priming_adds_the_kept_kernels_other_specialization_where_they_run(make_cfg, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """Where the kept-query kernels can run (CUDA and Triton; forced here), priming adds
    a kept count of the other divisibility by 16 than the final one, after it, and
    training is still unchanged; elsewhere (CPU) it adds nothing."""
    t = Trainer(make_cfg(**COLLIDER, collider_method="topk"), verbose=False)
    n = t.cfg.batch_size * t.cfg.model.seq_len
    assert t._priming_ratios(n) == (0.875, 0.5)  # on the CPU: no kept kernels, no third count
    monkeypatch.setattr(Trainer, "_kept_kernels_may_run", lambda self: True)
    ratios = t._priming_ratios(n)
    final = budget(n, 0.5)
    assert ratios[:2] == (0.875, 0.5) and len(ratios) == 3
    assert budget(n, ratios[2]) > final and (budget(n, ratios[2]) % 16 == 0) != (final % 16 == 0)
    events = _record_selections(t)
    t.train_step()
    assert [e[2] for e in events[-3:]] == [budget(n, 0.875), final, budget(n, ratios[2])]
    # above the run's kept_kernel_max_keep ([kernels]) the kernels never run: no third count
    low = Trainer(make_cfg(out_dir=str(tmp_path / "low"), **COLLIDER, collider_method="topk", kept_kernel_max_keep=0.4),
                  verbose=False)
    assert low._priming_ratios(n) == (0.875, 0.5)
    kw = {**COLLIDER, "collider_method": "topk", "max_steps": 6}
    train(make_cfg(out_dir=str(tmp_path / "on"), prime_startup=True, **kw), verbose=False)
    train(make_cfg(out_dir=str(tmp_path / "off"), prime_startup=False, **kw), verbose=False)
    _assert_same_training(tmp_path / "on", tmp_path / "off")
