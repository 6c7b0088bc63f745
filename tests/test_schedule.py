"""The learning-rate schedule: by steps, by training seconds, and across resumes."""

from __future__ import annotations

import json
import re
import math
from pathlib import Path

import pytest

from sparsetrain.trainer import Trainer, train


def _lrs(run: Path) -> dict[int, float]:
    """step -> lr of that step's update, from metrics.jsonl (row ``step`` is the count after it)."""
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"] - 1: r["lr"] for r in rows if r["kind"] == "train"}


def _cosine(progress: float, start: float, floor: float) -> float:
    """The textbook half-cosine from ``start`` to ``floor``."""
    p = min(1.0, max(0.0, progress))
    return floor + (start - floor) * (1 + math.cos(math.pi * p)) / 2


def test_resume_with_more_steps_continues_the_lr_where_it_stopped(make_cfg, tmp_path: Path) -> None:
    # the reported bug: --resume RUN --max-steps N restarted the cosine over the new length
    lr, floor = 1e-2, 1e-3
    kw = dict(out_dir=str(tmp_path / "r"), lr=lr, min_lr_ratio=0.1, warmup_steps=2, eval_every=0)
    train(make_cfg(max_steps=8, **kw), verbose=False)
    first = _lrs(tmp_path / "r")
    assert first[7] == pytest.approx(_cosine(5 / 6, lr, floor), rel=1e-12)
    train(make_cfg(max_steps=12, **kw), resume=tmp_path / "r", verbose=False)
    lrs = _lrs(tmp_path / "r")
    assert all(lrs[s] == first[s] for s in range(8))  # the saved part is untouched
    # the extension decays from the lr the next step had under the old schedule (its floor:
    # the run had finished) to the floor over the added steps: here it stays at the floor
    for s in range(8, 12):
        assert lrs[s] == pytest.approx(floor, rel=1e-12), s


def test_resume_of_an_unfinished_run_with_more_steps_decays_from_where_it_stopped(make_cfg, tmp_path: Path) -> None:
    lr, floor = 1e-2, 1e-3
    kw = dict(out_dir=str(tmp_path / "r"), lr=lr, min_lr_ratio=0.1, warmup_steps=2, eval_every=0)
    t = Trainer(make_cfg(max_steps=12, **kw), verbose=False)
    while t.step < 5:
        t.train_step()
    t.save()  # killed after step 5 of 12
    train(make_cfg(max_steps=20, **kw), resume=tmp_path / "r", verbose=False)
    lrs = _lrs(tmp_path / "r")
    at_stop = _cosine((5 - 2) / (12 - 2), lr, floor)  # what step 5 had under the 12-step schedule
    for s in range(5, 20):
        assert lrs[s] == pytest.approx(_cosine((s - 5) / (20 - 5), at_stop, floor), rel=1e-12), s


def test_lr_schedule_extension_is_continuous_on_random_settings() -> None:
    from sparsetrain.optim import LRSchedule

    rng = __import__("random").Random(7)
    for _ in range(200):
        by = rng.choice(["steps", "time"])
        peak, ratio, warmup = 10 ** rng.uniform(-4, -2), rng.uniform(0, 0.5), rng.randint(0, 20)
        end = rng.uniform(30, 200) if by == "time" else rng.randint(30, 200)
        s = LRSchedule.from_settings(by, peak, warmup, ratio, end)
        at = rng.uniform(0, end * 1.2) if by == "time" else rng.randint(0, int(end * 1.2))
        step = int(at) if by == "steps" else rng.randint(warmup, 10 * warmup + 10)
        before = s.lr(step, at)
        new_end = at + rng.uniform(1, 300)
        assert s.extend(at, new_end) is not None
        assert s.lr(step, at) == pytest.approx(before, rel=1e-12)  # no jump where it continues
        floor = peak * ratio
        assert s.lr(10**6, new_end) == pytest.approx(floor, rel=1e-12, abs=1e-18)  # the floor at the new end
        # monotone non-increasing after the warmup
        xs = [at + (new_end - at) * k / 50 for k in range(51)]
        lrs = [s.decay(x) for x in xs]
        assert all(a >= b - 1e-15 for a, b in zip(lrs, lrs[1:]))
        # round trip through the checkpoint form
        assert LRSchedule.from_state_dict(s.state_dict()).lr(step, at + 1.0) == s.lr(step, at + 1.0)


def test_extending_a_run_shorter_than_its_warmup_says_the_lr_keeps_warming_up() -> None:
    """By steps with the end inside the warmup, an extension that still ends inside it
    says so (not a decay "from step 30 to step 6"), and every lr is the warmup's
    ``peak * (step + 1) / warmup``, as a fresh schedule to the new end gives."""
    from sparsetrain.optim import LRSchedule

    s = LRSchedule.from_settings("steps", 3e-3, 30, 0.1, 4)
    said = s.extend(2, 6)
    assert said == ("lr schedule extended: the end moves to step 6 (was step 4), still inside the 30-step warmup: "
                    "the lr keeps warming up")
    fresh = LRSchedule.from_settings("steps", 3e-3, 30, 0.1, 6)
    for step in range(6):
        assert s.lr(step, 0.0) == fresh.lr(step, 0.0) == pytest.approx(3e-3 * (step + 1) / 30, rel=1e-12)
    assert s.extend(5, 100).startswith("lr schedule extended: from 0.003 at 30 step to the floor 0.0003 at 100 step")


def test_lr_schedule_by_time_is_warmup_times_cosine_over_seconds() -> None:
    from sparsetrain.optim import LRSchedule

    s = LRSchedule.from_settings("time", 3e-3, 10, 0.1, 60.0)
    for step, seconds in [(0, 0.0), (4, 1.5), (9, 3.0), (10, 3.3), (50, 30.0), (90, 59.0), (91, 60.0), (200, 75.0)]:
        want = min(1.0, (step + 1) / 10) * _cosine(seconds / 60.0, 3e-3, 3e-4)
        assert s.lr(step, seconds) == pytest.approx(want, rel=1e-12), (step, seconds)


def test_train_clock_excludes_pauses_and_times_startup_apart() -> None:
    from sparsetrain.train_clock import TrainClock

    t, syncs = [50.0], []
    clock = TrainClock(startup_steps=2, sync=lambda: syncs.append(t[0]), now=lambda: t[0])
    clock.run()
    t[0] += 4.0
    assert not clock.step_done() and clock.seconds == 4.0 and clock.seconds_after_startup == 0.0
    t[0] += 1.0
    assert clock.step_done() and syncs == [55.0]  # start-up ends with one device sync
    assert clock.startup_seconds == 5.0 and clock.seconds_after_startup == 0.0
    for _ in range(3):
        t[0] += 0.25
        clock.step_done()
    assert clock.seconds_after_startup == 0.75 and len(syncs) == 1  # no sync per step
    assert clock.expected_after_next_step() == 1.0  # the host's pace until a window is measured
    clock.pause()
    assert len(syncs) == 2
    t[0] += 100.0  # an evaluation
    assert clock.seconds == 5.75
    clock.run()
    t[0] += 0.5
    clock.step_done()
    clock.synced()
    assert clock.seconds == 6.25 and clock.expected_after_next_step() == 1.25 + 0.5
    # a new process (a resume) times its own start-up and adds it
    again = TrainClock(startup_steps=1, sync=lambda: None, now=lambda: t[0])
    again.seconds, again.startup_seconds = clock.seconds, clock.startup_seconds
    again.run()
    t[0] += 7.0
    assert again.seconds_after_startup == 1.25  # still in start-up: it stands still
    again.step_done()
    assert again.startup_seconds == 12.0 and again.seconds_after_startup == 1.25


def _fake_clock_trainer(make_cfg, startup: float, step_seconds: float, resume: Path | None = None,
                        **kw) -> Trainer:
    """A Trainer whose clock reads a fake time that advances ``startup`` seconds in its
    process's first step and ``step_seconds`` in every later one (after the step chose its lr)."""
    t = Trainer(make_cfg(**kw), resume=resume, verbose=False)
    fake = [1000.0]
    t.clock.now = lambda: fake[0]
    real_step, first = t.train_step, t.step

    def step():
        out = real_step()
        fake[0] += startup if t.step == first + 1 else step_seconds
        return out

    t.train_step = step
    return t


def test_time_schedule_reaches_its_floor_at_the_budget_with_a_fake_clock(make_cfg, tmp_path: Path) -> None:
    lr, floor, budget = 1e-2, 1e-3, 5.0
    t = _fake_clock_trainer(make_cfg, 3.0, 0.5, out_dir=str(tmp_path / "r"), max_steps=10**6, schedule_by="time",
                            max_seconds=budget, lr=lr, min_lr_ratio=0.1, warmup_steps=3, eval_every=0,
                            eval_every_seconds=2.0, log_every=3)
    result = t.fit()
    # step 0 is the start-up (3 s, outside the budget); step s >= 1 ends at 0.5 s after start-up
    assert result.steps_done == 11 and result.startup_seconds == 3.0 and result.train_seconds == 8.0
    lrs = _lrs(tmp_path / "r")
    warm = lambda s: min(1.0, (s + 1) / 3)
    assert lrs[0] == pytest.approx(lr * warm(0), rel=1e-12)
    # step 1 has no measured pace yet and takes the time of its start; from step 2 on, the end of the step
    assert lrs[1] == pytest.approx(lr * warm(1), rel=1e-12)
    for s in range(2, 11):
        assert lrs[s] == pytest.approx(warm(s) * _cosine(0.5 * s / budget, lr, floor), rel=1e-12), s
    assert lrs[10] == pytest.approx(floor, rel=1e-12)
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["train_seconds_after_startup"], r["train_seconds"]) for r in rows if r["kind"] == "eval"]
    assert evals == [(0, 0.0, 0.0), (5, 2.0, 5.0), (9, 4.0, 7.0), (11, 5.0, 8.0)]
    assert [r["startup_seconds"] for r in rows if r["kind"] == "startup"] == [3.0]


def test_time_schedule_resumes_with_its_clock_and_extends_with_max_seconds(make_cfg, tmp_path: Path) -> None:
    lr, floor = 1e-2, 1e-3
    kw = dict(out_dir=str(tmp_path / "r"), schedule_by="time", lr=lr, min_lr_ratio=0.1, warmup_steps=0,
              eval_every=0, log_every=1)
    # stopped by steps after 5 (a start-up of 2 s, then 4 steps of 1 s) of an 8 s budget
    _fake_clock_trainer(make_cfg, 2.0, 1.0, max_steps=5, max_seconds=8.0, **kw).fit()
    first = _lrs(tmp_path / "r")
    for s in range(2, 5):
        assert first[s] == pytest.approx(_cosine(s / 8.0, lr, floor), rel=1e-12), s
    # resumed with a 10 s budget: its own start-up (2 s, outside the budget), then the decay goes on
    # from where it stood at 4 s to the floor at 10 s
    r = _fake_clock_trainer(make_cfg, 2.0, 1.0, resume=tmp_path / "r", max_steps=10**6, max_seconds=10.0, **kw)
    r.fit()
    assert r.clock.startup_seconds == 4.0 and r.step == 12 and r.train_seconds == 14.0
    lrs = _lrs(tmp_path / "r")
    at_stop = _cosine(4.0 / 8.0, lr, floor)
    assert lrs[5] == lrs[6] == pytest.approx(at_stop, rel=1e-12)  # the start-up step; then one with no pace yet
    for s in range(7, 12):
        assert lrs[s] == pytest.approx(_cosine((s - 1 - 4.0) / (10.0 - 4.0), at_stop, floor), rel=1e-12), s
    assert lrs[11] == pytest.approx(floor, rel=1e-12)
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    (change,) = [r for r in rows if r["kind"] == "lr_schedule"]
    assert change["step"] == 5 and change["schedule"]["segments"][-1] == [4.0, 10.0, pytest.approx(at_stop, rel=1e-12)]


def test_resume_refuses_another_schedule_shape(make_cfg, tmp_path: Path) -> None:
    from sparsetrain.errors import CheckpointError

    train(make_cfg(out_dir=str(tmp_path / "r"), max_steps=2), verbose=False)
    with pytest.raises(CheckpointError, match=r"another lr schedule: lr=0.003 there vs 0.001 here"):
        Trainer(make_cfg(out_dir=str(tmp_path / "r"), max_steps=4, lr=1e-3), resume=tmp_path / "r", verbose=False)


def test_resume_refuses_to_shorten_a_run_and_leaves_its_config(make_cfg, tmp_path: Path) -> None:
    """A max_steps below the step reached is refused in one line before the run's
    files are rewritten or its metrics trimmed; the same max_steps (a finished run)
    still resumes."""
    from sparsetrain.errors import ConfigError

    run = tmp_path / "r"
    train(make_cfg(out_dir=str(run), max_steps=4), verbose=False)
    config, metrics = (run / "config.toml").read_text(), (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"at step 4 with max_steps 3: .* --max-steps 4 or more"):
        Trainer(make_cfg(out_dir=str(run), max_steps=3), resume=run, verbose=False)
    assert (run / "config.toml").read_text() == config and (run / "metrics.jsonl").read_text() == metrics
    assert Trainer(make_cfg(out_dir=str(run), max_steps=4), resume=run, verbose=False).step == 4


@pytest.mark.parametrize("optimizer, change, refused", [
    ("adamw", dict(weight_decay=0.5), "weight_decay=0.5: it trained with 0.1"),
    ("adamw", dict(beta2=0.99), "beta2=0.99: it trained with 0.95"),
    ("muon", dict(muon_momentum=0.8), "muon_momentum=0.8: it trained with 0.95"),
    ("adamw", dict(optimizer="lion"), "optimizer state is adamw, this run's optimizer is lion"),
    ("adamw", dict(muon_lr=0.05), None),  # not an AdamW setting: nothing of it is saved
    ("adamw", dict(seed=7), "seed=7: it trained with seed 1337, which sets its data order"),
])
def test_resume_refuses_optimizer_settings_its_state_would_override(make_cfg, tmp_path: Path, optimizer: str,
                                                                  change: dict, refused: str | None) -> None:
    """The optimizer's param groups come back from the checkpoint: a resumed config
    that changes what they hold is refused naming it (not trained with the old value
    under a config that records the new); a setting of another optimizer is not."""
    from sparsetrain.errors import CheckpointError

    train(make_cfg(out_dir=str(tmp_path / "r"), max_steps=2, optimizer=optimizer), verbose=False)
    cfg = make_cfg(out_dir=str(tmp_path / "r"), max_steps=4, **{"optimizer": optimizer, **change})
    if refused is None:
        assert Trainer(cfg, resume=tmp_path / "r", verbose=False).step == 2
        return
    with pytest.raises(CheckpointError, match=re.escape(refused)) as e:
        Trainer(cfg, resume=tmp_path / "r", verbose=False)
    assert "\n" not in str(e.value)


def test_time_schedule_needs_a_budget(make_cfg) -> None:
    from sparsetrain.errors import ConfigError

    with pytest.raises(ConfigError, match="schedule_by = time .* set max_seconds > 0"):
        make_cfg(schedule_by="time")
    with pytest.raises(ConfigError, match="schedule_by must be one of steps, time, got 'tokens'"):
        make_cfg(schedule_by="tokens", max_seconds=1.0)


def _fit_until_interrupted(t: Trainer, step: int, monkeypatch) -> None:
    """``t.fit()`` with Ctrl-C as it starts step ``step`` + 1 (no checkpoint on the way)."""
    steps = t.train_step

    def train_step() -> None:
        if t.step == step:
            raise KeyboardInterrupt
        steps()

    monkeypatch.setattr(t, "train_step", train_step)
    with pytest.raises(KeyboardInterrupt):
        t.fit()


def test_a_resume_killed_before_its_first_checkpoint_leaves_one_schedule_row(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """A resume that extends the schedule logs an ``lr_schedule`` row at its first step; killed
    before it saves, the next resume announces the extension again: the log keeps one row
    (the extension that the checkpoints carry), with the step of the checkpoint."""
    kw = dict(out_dir=str(tmp_path / "r"), eval_every=0, max_steps=4)
    train(make_cfg(**kw), verbose=False)
    _fit_until_interrupted(Trainer(make_cfg(**{**kw, "max_steps": 12}), resume=tmp_path / "r", verbose=False), 6,
                           monkeypatch)
    train(make_cfg(**{**kw, "max_steps": 12}), resume=tmp_path / "r", verbose=False)
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    schedule_rows = [r for r in rows if r["kind"] == "lr_schedule"]
    assert len(schedule_rows) == 1 and schedule_rows[0]["step"] == 4, schedule_rows
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 13))
    # a further resume with a longer budget announces its own extension beside the first
    train(make_cfg(**{**kw, "max_steps": 16}), resume=tmp_path / "r", verbose=False)
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "lr_schedule"] == [4, 12]


def test_a_resume_that_changes_the_batch_is_announced_once(make_cfg, tmp_path: Path, monkeypatch, capsys) -> None:
    """A batch-size ramp at a resume (grad_accum 1 -> 2) is logged as one ``resume_change``
    row and said on stdout; a kill before its first checkpoint does not leave a second row."""
    kw = dict(out_dir=str(tmp_path / "r"), eval_every=0)
    train(make_cfg(max_steps=3, **kw), verbose=False)
    t = Trainer(make_cfg(max_steps=8, grad_accum=2, **kw), resume=tmp_path / "r", verbose=True)
    assert "step 3: grad_accum 1 -> 2" in capsys.readouterr().out
    _fit_until_interrupted(t, 4, monkeypatch)
    train(make_cfg(max_steps=8, grad_accum=2, **kw), resume=tmp_path / "r", verbose=False)
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["changes"]) for r in rows if r["kind"] == "resume_change"] == [(3, {"grad_accum": [1, 2]})]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 9))
    train(make_cfg(max_steps=9, grad_accum=2, **kw), resume=tmp_path / "r", verbose=False)  # no change: no row
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r["kind"] == "resume_change"]) == 1
