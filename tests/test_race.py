"""Equal wall-clock races: arm parsing, interleaving, time to target, a tiny race end to end."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from sparsetrain.cli import main
from sparsetrain.errors import ConfigError
from sparsetrain.race import (Arm, budget_line, interleave_order, loss_at_step, parse_arm, race_plan, run_race, step_ms,
                              time_to_target)


def test_parse_arm() -> None:
    assert parse_arm("dense:") == Arm("dense", {})
    assert parse_arm("c50:drop_ratio=0.5, collider-method=topk") == Arm(
        "c50", {"use_collider": "true", "collider_sparsity": "0.5", "collider_method": "topk"})
    for bad, msg in [("dense", "must be NAME:KEY=VALUE"), (":lr=1", "must be NAME"), ("a b:", "must be NAME"),
                     ("x:lr", "'lr' is not KEY=VALUE"), ("x:seed=3", "the race sets seed itself"),
                     ("x:drop_ratio=0.5,,lr=1e-3", "an empty item"), ("x:lr=1e-3,", "an empty item"),
                     ("x:lr=1e-3,lr=2e-3", "lr is given twice"), ("x:lr=1,LR=2,lr=3", "lr is given twice"),
                     ("x:collider-method=a,collider_method=b", "collider_method is given twice"),
                     ("x:drop_ratio=0.5,collider_sparsity=0.3", r"collider_sparsity \(drop_ratio sets it\) is given")]:
        with pytest.raises(ConfigError, match=msg):
            parse_arm(bad)


@pytest.mark.parametrize("arm, needle", [("x:drop_ratio=0.5,,lr=1e-3", "an empty item"),
                                         ("x:lr=1e-3,", "an empty item"),
                                         ("x:lr=1e-3,lr=2e-3", "lr is given twice")])
def test_race_refuses_an_empty_item_or_a_key_given_twice(arm: str, needle: str, tmp_path: Path, capsys) -> None:
    """Both were taken silently: the empty item skipped, the last of the keys winning,
    so the arm raced a config other than the one its author meant."""
    code = main(["race", "--dry-run", "--preset", "tiny", "--seconds", "1", "--out-dir", str(tmp_path / "r"),
                 "--arm", "a:", "--arm", arm])
    err = capsys.readouterr().err
    assert code == 2 and f"{arm!r}: {needle}" in err and len(err.strip().splitlines()) == 1, err


def test_interleave_order_alternates_direction_per_seed() -> None:
    assert interleave_order(3, 3) == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0), (2, 0), (2, 1), (2, 2)]
    assert interleave_order(2, 2) == [(0, 0), (0, 1), (1, 1), (1, 0)]
    assert interleave_order(1, 2) == [(0, 0), (1, 0)]
    # every arm runs once per seed, and over two seeds each arm's mean position is the same
    order = interleave_order(4, 2)
    positions = {a: [i for i, (_, b) in enumerate(order) if b == a] for a in range(4)}
    assert {sum(p) for p in positions.values()} == {7}


@pytest.mark.parametrize("times, losses, target, want", [
    ([0, 1, 2, 3], [5.0, 4.0, 3.0, 2.5], 3.5, 1.5),        # halfway between the 2nd and 3rd evaluation
    ([0, 1, 2, 3], [5.0, 4.0, 3.0, 2.5], 2.5, 3.0),        # reached exactly at the last one
    ([0, 1, 2, 3], [5.0, 4.0, 3.0, 2.5], 2.4, None),       # never
    ([0, 10, 30], [5.0, 3.0, 4.0], 4.5, 2.5),              # the first crossing counts, not a later rise
    ([0, 2, 6], [5.0, 4.0, 2.0], 3.0, 4.0),                # 2 + 4 * (4 - 3) / (4 - 2)
    ([3, 4], [1.0, 0.5], 2.0, 3),                          # below the target from the first evaluation
])
def test_time_to_target_interpolates_linearly(times, losses, target, want) -> None:
    got = time_to_target(times, losses, target)
    assert got == (pytest.approx(want, rel=1e-12) if want is not None else None)


def test_loss_at_step_interpolates_between_evaluations() -> None:
    rng = random.Random()
    steps = sorted(rng.sample(range(1, 500), 6))
    losses = [rng.uniform(2, 9) for _ in steps]
    for i in range(1, len(steps)):  # a point inside each interval, against the line through its ends
        s = rng.randint(steps[i - 1], steps[i])
        frac = (s - steps[i - 1]) / (steps[i] - steps[i - 1])
        assert loss_at_step(steps, losses, s) == pytest.approx(losses[i - 1] * (1 - frac) + losses[i] * frac)
    assert loss_at_step(steps, losses, steps[3]) == losses[3]
    assert loss_at_step(steps, losses, steps[-1] + 1) is None
    assert loss_at_step(steps, losses, 0) == losses[0]


def test_race_arms_refuse_bad_settings(make_cfg, tmp_path: Path) -> None:
    base = dict(data=make_cfg().data, cache_dir=make_cfg().cache_dir, device="cpu")
    with pytest.raises(ConfigError, match="arm bad: unknown config key 'no_such_key'"):
        run_race([Arm("dense", {}), Arm("bad", {"no_such_key": "1"})], 1.0, 1, tmp_path / "r", "tiny", flags=base)
    with pytest.raises(ConfigError, match="arm names must differ"):
        run_race([Arm("a", {}), Arm("a", {})], 1.0, 1, tmp_path / "r", "tiny", flags=base)
    with pytest.raises(ConfigError, match="--seconds must be a positive number, got 0"):
        run_race([Arm("a", {})], 0, 1, tmp_path / "r", "tiny", flags=base)
    assert not (tmp_path / "r").exists()  # nothing ran


def _tiny_flags(make_cfg) -> dict:
    cfg = make_cfg()
    return dict(data=cfg.data, cache_dir=cfg.cache_dir, vocab_size=320, seq_len=32, n_layer=2, n_head=2, d_model=32,
                batch_size=4, warmup_steps=2, eval_batches=2, log_every=5, val_fraction=0.1, device="cpu", lr=1e-2,
                seed=11)


def test_tiny_race_end_to_end(make_cfg, tmp_path: Path, capsys) -> None:
    flags = _tiny_flags(make_cfg)
    arms = [Arm("dense", {}), Arm("random50", {"use_collider": "true", "collider_sparsity": "0.5",
                                                "collider_method": "random"})]
    seconds = 1.5
    report = run_race(arms, seconds, 2, tmp_path / "race", "tiny", flags=dict(flags), verbose=True)
    said = capsys.readouterr().out
    assert "1000000000" not in said and "for 1.5 s of training after start-up" in said  # no step limit, only time
    table = said.strip().splitlines()
    assert table[-3].startswith("arm") and table[-2].startswith("dense") and table[-1].startswith("random50")
    out = tmp_path / "race"
    on_disk = json.loads((out / "race.json").read_text())
    assert on_disk["target_val_loss"] == pytest.approx(report["target_val_loss"])
    assert (out / "race.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "race_full.png").read_bytes()[:4] == b"\x89PNG"
    assert {"device", "torch", "date", "git_commit"} <= set(on_disk["environment"])
    assert on_disk["settings"]["order"] == [["dense", 11], ["random50", 11], ["random50", 12], ["dense", 12]]
    dense = on_disk["arms"]["dense"]
    assert on_disk["target_val_loss"] == pytest.approx(sum(r["final_val_loss"] for r in dense["runs"]) / 2)
    for name, arm in on_disk["arms"].items():
        assert [r["seed"] for r in arm["runs"]] == [11, 12]
        for r in arm["runs"]:
            rows = [json.loads(l) for l in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
            train = [x for x in rows if x["kind"] == "train"]
            evals = [x for x in rows if x["kind"] == "eval"]
            # the budget: training stopped at the first step past it
            after = [e["train_seconds_after_startup"] for e in evals]
            assert after[-1] >= seconds > after[-2]
            assert r["steps"] == train[-1]["step"] >= 2
            # the mean step after the start-up step, from the last evaluation's clock
            assert r["startup_steps"] == 1
            assert step_ms(r) == pytest.approx(1000 * after[-1] / (r["steps"] - 1))
            # the lr of the last step is the time schedule's after the last evaluation before the end (a
            # step's lr is chosen for its expected end; a loaded machine can stall a step for longer, which
            # the exact fake-clock test in test_schedule.py leaves out)
            floor, peak = 1e-2 * 0.1, 1e-2
            assert floor <= r["final_lr"] <= floor + (peak - floor) * (1 + math.cos(math.pi * after[-2] / seconds)) / 2
            # evaluations each time another tenth of the budget (after start-up) has passed, and one at the end
            assert after[0] == 0 and len(evals) >= 2
            assert all(int(b / (seconds / 10) + 1e-9) > int(a / (seconds / 10) + 1e-9) for a, b in zip(after[1:-2], after[2:-1]))
            tokens_per_step = 4 * 32
            assert r["tokens_forwarded"] == r["steps"] * tokens_per_step
            kept = sum(x.get("kept_fraction", 1.0) for x in train)
            assert r["tokens_backpropagated"] == round(kept * tokens_per_step)
            if name == "dense":
                assert r["tokens_backpropagated"] == r["tokens_forwarded"]
            else:  # half of the tokens after the (absent) warmup
                assert r["tokens_backpropagated"] == pytest.approx(r["tokens_forwarded"] / 2, rel=0.02)
            # time to target recomputed from the rows
            want = time_to_target(after, [e["val_loss"] for e in evals], on_disk["target_val_loss"])
            assert r["seconds_to_target"]["after_startup"] == (pytest.approx(want) if want is not None else None)
            # the loss at the steps every arm made in this seed, from the rows
            seed_i = [11, 12].index(r["seed"])
            equal = on_disk["settings"]["equal_steps"][seed_i]
            assert equal == min(a["runs"][seed_i]["evals"][-1][4] for a in on_disk["arms"].values())
            at = [(e["step"], e["val_loss"]) for e in evals]
            hi = next(i for i, (st, _) in enumerate(at) if st >= equal)
            if at[hi][0] == equal:
                want = at[hi][1]
            else:
                (s0, l0), (s1, l1) = at[hi - 1], at[hi]
                want = l0 + (l1 - l0) * (equal - s0) / (s1 - s0)
            assert r["val_loss_at_equal_steps"] == pytest.approx(want)
    for arm in on_disk["arms"].values():
        assert arm["step_ms"]["mean"] == pytest.approx(sum(step_ms(r) for r in arm["runs"]) / 2)
    assert "ms/step (x first)" in table[-3] and "(1.00x)" in table[-2]
    spread = dense["final_val_loss"]
    losses = [r["final_val_loss"] for r in dense["runs"]]
    assert spread["mean"] == pytest.approx(sum(losses) / 2)
    assert spread["std"] == pytest.approx(abs(losses[0] - losses[1]) / math.sqrt(2))
    # a seed gives every arm the same initial weights, and another seed other ones
    start = {(name, r["seed"]): r["evals"][0][2] for name, arm in on_disk["arms"].items() for r in arm["runs"]}
    assert start["dense", 11] == start["random50", 11] != start["dense", 12] == start["random50", 12]

    # run again: every run is finished, nothing trains, the report is rebuilt the same
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("ckpt.pt")}
    again = run_race(arms, seconds, 2, out, "tiny", flags=dict(flags), verbose=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("ckpt.pt")} == mtimes
    assert again["arms"]["dense"]["final_val_loss"] == dense["final_val_loss"]
    with pytest.raises(ConfigError, match="holds a race with other seconds"):
        run_race(arms, 2.0, 2, out, "tiny", flags=dict(flags), verbose=False)


def test_a_race_refuses_step_limits_on_its_time_schedule_and_mixed_budgets(make_cfg, tmp_path: Path) -> None:
    """``max_steps`` on the race's time schedule would stop a fast arm before its lr
    decays, and arms at equal steps beside arms at equal seconds compare nothing: each
    is one line naming the arm and the value, before anything runs."""
    flags = _tiny_flags(make_cfg)
    arms = [Arm("dense", {}), Arm("random50", {"use_collider": "true", "collider_sparsity": "0.5",
                                                "collider_method": "random"})]
    with pytest.raises(ConfigError, match=r"arm dense: max_steps=7 in a race needs schedule_by = \"steps\""):
        race_plan(arms, 60.0, 1, tmp_path / "race", "tiny", flags={**flags, "max_steps": 7})
    with pytest.raises(ConfigError, match=r"arm random50: max_steps=9 in a race needs"):
        race_plan([arms[0], Arm("random50", {**arms[1].overrides, "max_steps": "9"})], 60.0, 1, tmp_path / "race",
                  "tiny", flags=flags)
    mixed = [arms[0], Arm("random50", {**arms[1].overrides, "max_steps": "9", "schedule_by": "steps"})]
    with pytest.raises(ConfigError, match="at equal seconds or at equal steps, not both: random50 set max_steps and "
                                          "dense do not"):
        race_plan(mixed, 60.0, 1, tmp_path / "race", "tiny", flags=flags)
    assert not (tmp_path / "race").exists()


def test_a_race_refuses_a_folder_holding_something_else(make_cfg, tmp_path: Path) -> None:
    """A race writes its runs, report and plots into --out-dir: a non-empty folder that
    holds no race (a data folder, a training run) is refused, before anything is written."""
    flags = _tiny_flags(make_cfg)
    other = tmp_path / "run"
    other.mkdir()
    (other / "ckpt.pt").write_bytes(b"not a race")
    with pytest.raises(ConfigError, match=f"--out-dir {other} holds other files and no race"):
        race_plan([Arm("dense", {})], 5.0, 1, other, "tiny", flags=flags)
    assert sorted(p.name for p in other.iterdir()) == ["ckpt.pt"]
    race_plan([Arm("dense", {})], 5.0, 1, tmp_path / "new", "tiny", flags=flags)  # a new folder is fine


def test_budget_line_names_the_steps_and_the_runs_the_seconds_cut_short() -> None:
    """The table's title: seconds per run; at equal steps the step count (or each arm's
    range) with the seconds as a cap, and the runs that reached the cap first."""
    def report(runs: dict[str, list[tuple[int, int]]], seconds: float = 60.0) -> dict:
        return {"settings": {"seconds": seconds, "arms": {name: {} for name in runs}, "base_config": {}},
                "arms": {name: {"runs": [{"steps": s, "max_steps": n} for s, n in rs]} for name, rs in runs.items()}}

    assert budget_line(report({"a": [(120, 0)], "b": [(80, 0)]}, 30.0)) == "30 s of training after start-up per run"
    assert budget_line(report({"a": [(6, 6), (6, 6)], "b": [(6, 6), (6, 6)]})) == "6 steps per run (at most 60 s)"
    got = budget_line(report({"a": [(1500, 1500)], "b": [(1211, 1500), (1190, 1500)]}, 45.0))
    assert got == "1500 steps per run (at most 45 s; 2 of 3 run(s) reached the 45 s first, after 1190-1211 steps)"
    assert budget_line(report({"a": [(100, 100)], "b": [(150, 150)]})) == "100-150 steps per run (at most 60 s)"
    # a report written before runs recorded their budget: the first arm's config's
    old = {"settings": {"seconds": 10.0, "arms": {"a": {}}, "base_config": {"training": {"max_steps": 40}}},
           "arms": {"a": {"runs": [{"steps": 33}]}}}
    assert budget_line(old) == "40 steps per run (at most 10 s; 1 of 1 run(s) reached the 10 s first, after 33 steps)"


def test_a_race_at_equal_steps_gives_every_arm_the_same_steps_and_schedule(make_cfg, tmp_path: Path, capsys) -> None:
    """``--max-steps N --schedule-by steps`` (flags the race leaves alone) turns the race
    into one at equal steps, for sample efficiency: every run ends at step N with its lr
    at the step schedule's floor (the formula, independently), evaluated every
    ``eval_every`` steps, whatever its step costs; ``--seconds`` is then only a cap."""
    flags = {**_tiny_flags(make_cfg), "max_steps": 6, "schedule_by": "steps", "eval_every": 2}
    arms = [Arm("dense", {}), Arm("random50", {"use_collider": "true", "collider_sparsity": "0.5",
                                                "collider_method": "random"})]
    plan = race_plan(arms, 60.0, 1, tmp_path / "race", "tiny", flags=flags)
    assert plan.splitlines()[0].endswith(f"6 steps each (at most 60 s of training after start-up), plus each run's "
                                         f"start-up and evaluations; into {tmp_path / 'race'}")
    report = run_race(arms, 60.0, 1, tmp_path / "race", "tiny", flags=flags, verbose=True)
    assert "race: 6 steps per run (at most 60 s), 1 seed(s)" in capsys.readouterr().out
    peak, floor = 1e-2, 1e-2 * 0.1
    for name, arm in report["arms"].items():
        (run,) = arm["runs"]
        rows = [json.loads(l) for l in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["kind"] == "train"]
        assert run["steps"] == train[-1]["step"] == 6, name
        assert [e[4] for e in run["evals"]] == [0, 2, 4, 6], name
        # the step schedule written out: warmup over 2 steps, then a half cosine to the floor at step 6
        # (step index 5, the last one taken, is one short of it)
        def lr(k: int) -> float:
            decay = floor + (peak - floor) * (1 + math.cos(math.pi * (k - 2) / (6 - 2))) / 2 if k >= 2 else peak
            return decay * min(1.0, (k + 1) / 2)

        assert run["final_lr"] == pytest.approx(lr(5))
        for r in train:
            assert r["lr"] == pytest.approx(lr(r["step"] - 1)), (name, r["step"])
    assert report["settings"]["equal_steps"] == [6]
    first = report["arms"]["dense"]["runs"][0]
    assert first["val_loss_at_equal_steps"] == pytest.approx(first["final_val_loss"])


def test_race_without_checkpoints_names_none(make_cfg, tmp_path: Path, capsys) -> None:
    flags = {**_tiny_flags(make_cfg), "save_checkpoints": False}
    run_race([Arm("dense", {})], 0.3, 1, tmp_path / "race", "tiny", flags=flags, verbose=True)
    done = [l for l in capsys.readouterr().out.splitlines() if l.startswith("done:")]
    assert len(done) == 1 and ", checkpoint" not in done[0] and "ckpt.pt" not in done[0]
    assert not list((tmp_path / "race").rglob("ckpt*"))


def test_killed_race_resumes_its_unfinished_run(make_cfg, tmp_path: Path) -> None:
    flags = _tiny_flags(make_cfg)
    arms = [Arm("dense", {}), Arm("wide", {"d_model": "64"})]
    out = tmp_path / "race"
    run_race(arms, 0.6, 1, out, "tiny", flags=dict(flags), verbose=False)
    dense, wide = out / "dense" / "seed11", out / "wide" / "seed11"
    # as if killed during the second run after a checkpoint: its done marker never got written
    (wide / "race_done.json").unlink()
    before = (dense / "ckpt.pt").stat().st_mtime_ns
    report = run_race(arms, 0.6, 1, out, "tiny", flags=dict(flags), verbose=False)
    assert (dense / "ckpt.pt").stat().st_mtime_ns == before  # the finished run was skipped
    assert (wide / "race_done.json").is_file()
    assert report["arms"]["wide"]["runs"][0]["train_seconds_after_startup"] >= 0.6


def test_race_cli(make_cfg, tmp_path: Path, capsys) -> None:
    cfg = make_cfg()
    common = ["race", "--preset", "tiny", "--data", cfg.data, "--cache-dir", cfg.cache_dir, "--vocab-size", "320",
              "--seq-len", "32", "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--batch-size", "2",
              "--eval-batches", "1", "--val-fraction", "0.1", "--device", "cpu", "--out-dir", str(tmp_path / "r")]
    assert main(common + ["--seconds", "0.3", "--arm", "dense:", "--arm", "lowlr:lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "race report:" in out and (tmp_path / "r" / "race.json").is_file()
    # the same seed, the same initial weights and first batch: the arms' first losses agree (lr acts after it)
    first = [next(r for r in map(json.loads, (tmp_path / "r" / arm / "seed1337" / "metrics.jsonl").read_text().splitlines())
                  if r["kind"] == "train")["loss"] for arm in ("dense", "lowlr")]
    assert first[0] == first[1]
    assert main(common + ["--seconds", "0.3", "--arm", "dense"]) == 2
    assert "must be NAME:KEY=VALUE" in capsys.readouterr().err
    assert main(common + ["--seconds", "0.3", "--arm", "x:", "--max-seconds", "4"]) == 2
    assert "a race's budget is --seconds" in capsys.readouterr().err


# ----------------------------------------------------------------------------- report from given curves


def _write_run(cfg, rng, evals: list[tuple[float, float]], startup: float) -> None:
    """A finished run's metrics.jsonl: evaluations ``(seconds after start-up, val loss)``, a step per 0.1 s."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True)
    rows = []
    for t, loss in evals:
        step = round(t * 10)
        rows += [{"kind": "train", "step": s, "loss": loss, "lr": 1e-3, "kept_fraction": rng.uniform(0.4, 1.0)}
                 for s in range(max((r["step"] for r in rows if r["kind"] == "train"), default=0) + 1, step + 1)]
        rows.append({"kind": "eval", "step": step, "val_loss": loss, "val_bpb": loss / math.log(2) / 3,
                     "train_seconds": t + startup, "startup_seconds": startup, "train_seconds_after_startup": t})
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _random_curve(rng, seconds: float, overfit: bool) -> list[tuple[float, float]]:
    """A falling loss curve evaluated every tenth of the budget; ``overfit``: it rises again after a random point."""
    times = [0.0] + sorted(rng.uniform(i, i + 1) * seconds / 10 for i in range(1, 11))
    turn = rng.randint(4, 8) if overfit else 99
    losses = [9.0]  # the loss at step 0, far above the rest
    for i in range(1, len(times)):
        losses.append(losses[-1] - rng.uniform(0.1, 1.5) / i if i <= turn else losses[-1] + rng.uniform(0.01, 0.1))
    return list(zip(times, losses))


def test_report_best_loss_and_the_best_target(make_cfg, tmp_path: Path) -> None:
    from sparsetrain.race import format_table, race_report

    rng = random.Random()  # seeded by the OS: fresh values each run
    seconds, seeds = 100.0, [3, 4, 5]
    arms = [Arm("dense", {}), Arm("other", {"lr": "1e-2"})]
    configs = {a.name: {s: make_cfg(out_dir=str(tmp_path / a.name / f"seed{s}"), seed=s) for s in seeds} for a in arms}
    curves = {(a.name, s): _random_curve(rng, seconds, overfit=True) for a in arms for s in seeds}
    startups = {(a.name, s): rng.uniform(1, 20) for a in arms for s in seeds}
    for (name, s), curve in curves.items():
        _write_run(configs[name][s], rng, curve, startups[name, s])
    report = race_report(arms, configs, seeds, seconds, interleave_order(2, 3))

    bests = {k: min(c, key=lambda e: e[1]) for k, c in curves.items()}
    best_target = sum(bests["dense", s][1] for s in seeds) / 3
    assert report["best_target_val_loss"] == pytest.approx(best_target, rel=1e-12)
    assert report["target_val_loss"] == pytest.approx(sum(curves["dense", s][-1][1] for s in seeds) / 3, rel=1e-12)
    assert "lowest val loss" in report["best_target"] and "dense" in report["best_target"]
    for a in arms:
        arm = report["arms"][a.name]
        assert arm["best_val_loss"]["mean"] == pytest.approx(sum(bests[a.name, s][1] for s in seeds) / 3, rel=1e-12)
        assert arm["best_seconds_after_startup"]["max"] == pytest.approx(max(bests[a.name, s][0] for s in seeds))
        for s, r in zip(seeds, arm["runs"]):
            t_best, l_best = bests[a.name, s]
            assert r["best_val_loss"] == l_best and r["best_step"] == round(t_best * 10)
            assert r["best_seconds"] == {"after_startup": t_best, "with_startup": pytest.approx(t_best + startups[a.name, s])}
            assert r["final_minus_best_val_loss"] == pytest.approx(curves[a.name, s][-1][1] - l_best) and \
                r["final_minus_best_val_loss"] > 0  # every curve here rises after its best
            # the time to the best target: the curve, interpolated, is at the target there and above it before
            times, losses = zip(*curves[a.name, s])
            got = r["seconds_to_best_target"]["after_startup"]
            if got is None:
                assert min(losses) > best_target
            else:
                assert float(__import__("numpy").interp(got, times, losses)) == pytest.approx(best_target, abs=1e-9) \
                    or losses[0] <= best_target
                assert all(l > best_target for t, l in zip(times, losses) if t < got - 1e-9)
                assert r["seconds_to_best_target"]["with_startup"] == pytest.approx(got + startups[a.name, s])
        per_seed = [r["seconds_to_best_target"]["after_startup"] for r in arm["runs"]]
        assert arm["seconds_to_best_target"]["after_startup"]["per_seed"] == per_seed
        assert arm["seconds_to_best_target"]["after_startup"]["reached"] == f"{sum(x is not None for x in per_seed)}/3"
    table = format_table(report)
    assert f"best target val loss {best_target:.4f}" in table and "s to best target" in table


def test_table_shows_the_worst_seeds_time_ratio(make_cfg, tmp_path: Path) -> None:
    """An arm whose curve is each seed's dense curve run f_s times faster (then
    lower still) reaches that seed's dense final in f_s of its time: the table
    gives their mean and the worst seed's."""
    import random

    from sparsetrain.race import format_table, race_report

    rng = random.Random()
    seconds, seeds = 100.0, [1, 2, 3]
    factors = {s: rng.uniform(0.4, 0.9) for s in seeds}
    arms = [Arm("dense", {}), Arm("fast", {"lr": "2e-3"})]
    configs = {a.name: {s: make_cfg(out_dir=str(tmp_path / a.name / f"seed{s}"), seed=s) for s in seeds} for a in arms}
    for s in seeds:
        dense = _random_curve(rng, seconds, overfit=False)
        _write_run(configs["dense"][s], rng, dense, 2.0)
        fast = [(t * factors[s], loss) for t, loss in dense]
        fast += [(fast[-1][0] + (seconds - fast[-1][0]) * k / 3, dense[-1][1] - 0.1 * k) for k in (1, 2, 3)]
        _write_run(configs["fast"][s], rng, fast, 2.0)
    report = race_report(arms, configs, seeds, seconds, interleave_order(2, 3))
    got = report["arms"]["fast"]["time_ratio_to_paired_target"]["per_seed"]
    assert got == pytest.approx([factors[s] for s in seeds], rel=1e-9)
    mean, worst = sum(factors.values()) / 3, max(factors.values())
    assert f"{mean:.2f} (worst {worst:.2f})" in format_table(report)


def test_race_plot_zooms_on_the_comparison(make_cfg, tmp_path: Path) -> None:
    import numpy as np

    from sparsetrain.plotting import plot_race, race_curves, race_figure
    from sparsetrain.race import race_report

    rng = random.Random()  # seeded by the OS: fresh values each run
    seconds, seeds = 50.0, [1, 2]
    arms = [Arm("dense", {}), Arm("b", {}), Arm("c", {}), Arm("worse", {})]
    configs = {a.name: {s: make_cfg(out_dir=str(tmp_path / a.name / f"seed{s}"), seed=s) for s in seeds} for a in arms}
    curves = {(a.name, s): _random_curve(rng, seconds, overfit=rng.random() < 0.5) for a in arms[:3] for s in seeds}
    for s in seeds:  # the last arm never reaches either target: its row is text only
        curves["worse", s] = [(t, loss + 1.0) for t, loss in curves["dense", s]]
    for (name, s), curve in curves.items():
        _write_run(configs[name][s], rng, curve, 2.0)
    report = race_report(arms, configs, seeds, seconds, interleave_order(4, 2))

    # the mean and band over seeds on the union of the evaluation times, recomputed point by point
    for a in arms:
        grid, mean, low, high = race_curves(report)[a.name]
        end = min(curves[a.name, s][-1][0] for s in seeds)
        assert grid[-1] == end and set(grid) == {t for s in seeds for t, _ in curves[a.name, s] if t <= end}
        for g, m, lo, hi in zip(grid, mean, low, high):
            at = [float(np.interp(g, *zip(*curves[a.name, s]))) for s in seeds]
            assert (m, lo, hi) == pytest.approx((sum(at) / 2, min(at), max(at)), rel=1e-12)
    # the y-range: the lowest plotted value to the highest arm mean at a fifth of the budget, padded 5 %
    lowest = min(min(float(np.interp(g, *zip(*curves[a.name, s]))) for s in seeds)
                 for a in arms for g in race_curves(report)[a.name][0])
    at_fifth = max(sum(float(np.interp(0.2 * seconds, *zip(*curves[a.name, s]))) for s in seeds) / 2 for a in arms)
    start = max(curve[0][1] for curve in curves.values())  # the highest step-0 loss: the worse arm's 10.0
    assert at_fifth < start  # the step-0 loss is left out
    pad = 0.05 * (at_fifth - lowest)
    fig = race_figure(report)
    assert fig.axes[0].get_ylim() == pytest.approx((lowest - pad, at_fifth + pad), rel=1e-9)
    full = race_figure(report, full=True)
    assert full.axes[0].get_ylim()[1] >= start  # the whole curve, from the start
    # the second panel: one bar per arm and target where every seed reached it, as long as its mean
    widths = sorted(p.get_width() for p in fig.axes[1].patches)
    want = sorted(d["mean"] for a in report["arms"].values() for key in ("seconds_to_target", "seconds_to_best_target")
                  for d in [a[key]["after_startup"]] if d["mean"] is not None)
    assert widths == pytest.approx(want)
    texts = [t.get_text() for t in fig.axes[1].texts]
    low, high = sorted(fig.axes[1].get_ylim())  # each "never" inside the panel, the last row's too
    assert all(low < t.get_position()[1] < high for t in fig.axes[1].texts)
    assert len(texts) == sum(a[key]["after_startup"]["mean"] is None for a in report["arms"].values()
                             for key in ("seconds_to_target", "seconds_to_best_target"))
    assert plot_race(report, tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- merging the seeds of several races


def _one_seed_reports(make_cfg, tmp_path: Path, seeds: list[int], seconds: float = 100.0):
    """A race report per seed (as one GPU call each would write), from random curves, plus the curves."""
    from sparsetrain.race import race_report

    rng = random.Random()  # seeded by the OS: fresh values each run
    arms = [Arm("dense", {}), Arm("drop", {"drop_ratio": "0.5"})]
    curves, reports = {}, []
    for s in seeds:
        configs = {a.name: {s: make_cfg(out_dir=str(tmp_path / f"race{s}" / a.name / f"seed{s}"), seed=s)} for a in arms}
        for a in arms:
            curves[a.name, s] = _random_curve(rng, seconds, overfit=False)
            _write_run(configs[a.name][s], rng, curves[a.name, s], rng.uniform(1, 20))
        reports.append(race_report(arms, configs, [s], seconds, interleave_order(2, 1)))
    return arms, curves, reports


def test_merged_seeds_recompute_target_times_and_equal_steps(make_cfg, tmp_path: Path) -> None:
    import numpy as np

    from sparsetrain.race import merge_reports

    seeds = [5, 3, 4]  # merged in seed order whatever the files' order
    arms, curves, reports = _one_seed_reports(make_cfg, tmp_path, seeds)
    merged = merge_reports(reports, [f"r{s}.json" for s in seeds])
    assert merged["settings"]["seeds"] == [3, 4, 5]
    target = sum(curves["dense", s][-1][1] for s in seeds) / 3
    assert merged["target_val_loss"] == pytest.approx(target, rel=1e-12)
    for a in arms:
        arm = merged["arms"][a.name]
        finals = [curves[a.name, s][-1][1] for s in (3, 4, 5)]
        assert arm["final_val_loss"]["mean"] == pytest.approx(np.mean(finals), rel=1e-12)
        assert arm["final_val_loss"]["std"] == pytest.approx(np.std(finals, ddof=1), rel=1e-9)
        for s, run in zip((3, 4, 5), arm["runs"]):
            assert run["seed"] == s
            times, losses = map(np.array, zip(*curves[a.name, s]))
            got = run["seconds_to_target"]["after_startup"]
            if losses.min() > target:
                assert got is None
            else:  # the first crossing of the merged target, by linear interpolation
                i = int(np.argmax(losses <= target))
                want = times[i] if i == 0 else times[i - 1] + (target - losses[i - 1]) * (times[i] - times[i - 1]) / (losses[i] - losses[i - 1])
                assert got == pytest.approx(want, rel=1e-9)
            # the same crossing counted in optimizer steps (each evaluation's step)
            steps = np.array([round(t * 10) for t in times], dtype=float)
            got_steps = run["steps_to_target"]
            if losses.min() > target:
                assert got_steps is None
            else:
                i = int(np.argmax(losses <= target))
                want = steps[i] if i == 0 else steps[i - 1] + (target - losses[i - 1]) * (steps[i] - steps[i - 1]) / (losses[i] - losses[i - 1])
                assert got_steps == pytest.approx(want, rel=1e-9)
        per_seed = [r["steps_to_target"] for r in arm["runs"]]
        assert arm["steps_to_target"]["per_seed"] == per_seed
        assert arm["steps_to_target"]["mean"] == (None if None in per_seed else pytest.approx(np.mean(per_seed)))
    # the equal steps are per seed, over the arms; the loss there interpolated on steps
    for k, s in enumerate((3, 4, 5)):
        step = min(round(curves[a.name, s][-1][0] * 10) for a in arms)
        assert merged["settings"]["equal_steps"][k] == step
        for a in arms:
            steps = [round(t * 10) for t, _ in curves[a.name, s]]
            want = float(np.interp(step, steps, [l for _, l in curves[a.name, s]]))
            assert merged["arms"][a.name]["runs"][k]["val_loss_at_equal_steps"] == pytest.approx(want, rel=1e-9)
    # paired with the first arm's run of the same seed: the final difference and the time to its final loss
    for a in arms:
        diffs, ratios = [], []
        for s in (3, 4, 5):
            times, losses = map(np.array, zip(*curves[a.name, s]))
            ref_t, ref = curves["dense", s][-1]
            diffs.append(losses[-1] - ref)
            if losses.min() > ref:
                ratios.append(None)
            else:
                i = int(np.argmax(losses <= ref))
                t = times[i] if i == 0 else times[i - 1] + (ref - losses[i - 1]) * (times[i] - times[i - 1]) / (losses[i] - losses[i - 1])
                ratios.append(t / ref_t)
        arm = merged["arms"][a.name]
        assert arm["final_minus_first_paired"]["mean"] == pytest.approx(np.mean(diffs), abs=1e-12)
        assert arm["final_minus_first_paired"]["std"] == pytest.approx(np.std(diffs, ddof=1), abs=1e-12)
        got = arm["time_ratio_to_paired_target"]["per_seed"]
        assert [g is None for g in got] == [r is None for r in ratios]
        assert [g for g in got if g is not None] == pytest.approx([r for r in ratios if r is not None], rel=1e-9)
    assert merged["arms"]["dense"]["time_ratio_to_paired_target"]["per_seed"] == pytest.approx([1.0] * 3)
    assert [m["seeds"] for m in merged["settings"]["merged_from"]] == [[5], [3], [4]]
    # a one-seed report's own target differs from the merged one, and its times are not carried over
    assert reports[0]["target_val_loss"] != merged["target_val_loss"]


def test_merge_refuses_other_races_with_one_line(make_cfg, tmp_path: Path, capsys) -> None:
    arms, _, reports = _one_seed_reports(make_cfg, tmp_path, [1, 2])
    files = []
    for i, rep in enumerate(reports):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(rep))
    out = tmp_path / "merged"
    assert main(["race-merge", *map(str, files), "--out-dir", str(out)]) == 0
    assert json.loads((out / "race.json").read_text())["settings"]["seeds"] == [1, 2]

    def bad(edit) -> Path:
        rep = json.loads(json.dumps(reports[1]))
        edit(rep)
        path = tmp_path / f"bad{len(list(tmp_path.glob('bad*')))}.json"
        path.write_text(json.dumps(rep))
        return path

    cases = [(bad(lambda r: r["settings"]["arms"].update(drop={"drop_ratio": "0.3"})), "races other arms"),
             (bad(lambda r: r["settings"].update(seconds=50.0)), "gives every run 50.0 s"),
             (bad(lambda r: r["settings"]["base_config"]["training"].update(lr=1.0)), "lr="),
             (files[0], "seed 1 is in both"),
             (tmp_path / "missing.json", "does not exist"),
             # reports of another shape: tracebacks before
             (bad(lambda r: r["settings"].pop("seeds")), "not all well-formed race reports"),
             (bad(lambda r: r.update(arms=1)), "not all well-formed race reports"),
             (bad(lambda r: [a.update(runs=[]) for a in r["arms"].values()]), "not all well-formed race reports")]
    for path, msg in cases:
        code = main(["race-merge", str(files[0]), str(path), "--out-dir", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (msg, err)
    assert main(["race-merge", str(files[0]), "--out-dir", str(tmp_path / "x")]) == 2
    assert "two or more" in capsys.readouterr().err
    assert main(["race-merge", *map(str, files), "--arms", "dense,nope", "--out-dir", str(tmp_path / "x")]) == 2
    assert "arm nope is in none of the reports" in capsys.readouterr().err
    inside = tmp_path / "race0" / "race.json"  # a race's own report, merged into its own folder
    inside.parent.mkdir()
    inside.write_bytes(files[0].read_bytes())
    assert main(["race-merge", str(inside), str(files[1]), "--out-dir", str(inside.parent)]) == 2
    assert f"would overwrite the input {inside}" in capsys.readouterr().err
    assert inside.read_bytes() == files[0].read_bytes() and sorted(inside.parent.iterdir()) == [inside]


def test_merge_refuses_another_base_value_of_a_field_a_later_arm_sets(make_cfg, tmp_path: Path) -> None:
    """The same race run again at another base lr, with an arm that sets its own lr:
    dense trained at two lrs, so the reports do not merge (the field is checked for
    the arms that do not set it)."""
    from sparsetrain.race import merge_reports, race_report

    rng = random.Random(int(torch.randint(0, 2**31 - 1, ())))

    def report(seed: int, base_lr: float) -> dict:
        arms = [Arm("dense", {}), Arm("hi", {"lr": "0.02"})]
        configs = {a.name: {seed: make_cfg(out_dir=str(tmp_path / f"r{seed}" / a.name / f"seed{seed}"), seed=seed,
                                           lr=0.02 if a.overrides else base_lr)} for a in arms}
        for a in arms:
            _write_run(configs[a.name][seed], rng, _random_curve(rng, 100.0, overfit=False), 5.0)
        return race_report(arms, configs, [seed], 100.0, interleave_order(2, 1))

    with pytest.raises(ConfigError, match=r"b has another base config than a: lr=0.0005 in b vs 0.001 in a"):
        merge_reports([report(1, 1e-3), report(2, 5e-4)], ["a", "b"])
    assert merge_reports([report(3, 1e-3), report(4, 1e-3)], ["a", "b"])["settings"]["seeds"] == [3, 4]


def test_merge_takes_an_arm_whose_value_names_its_own_seed(make_cfg, tmp_path: Path) -> None:
    """A per-seed draw (``data=.../random_seed<S>`` in the race of seed S) is one arm
    across the one-seed races, recorded with ``seed{seed}``; a value naming another
    seed than its race's, or a prefix of a longer number, is a different arm."""
    from sparsetrain.race import merge_reports

    seeds = [int(s) for s in torch.randint(10, 10_000, (2,)).unique()]
    if len(seeds) < 2:
        seeds = [seeds[0], seeds[0] + 1]
    _, _, reports = _one_seed_reports(make_cfg, tmp_path, seeds)

    def with_data(rep: dict, value: str) -> dict:
        rep = json.loads(json.dumps(rep))
        rep["settings"]["arms"]["drop"] = {**rep["settings"]["arms"]["drop"], "data": value}
        return rep

    own = [with_data(rep, f"/w/domain_random_seed{s}") for rep, s in zip(reports, seeds)]
    merged = merge_reports(own, ["a", "b"])
    assert merged["arms"]["drop"]["overrides"]["data"] == "/w/domain_random_seed{seed}"
    assert merged["arms"]["drop"]["overrides"]["drop_ratio"] == "0.5"
    assert merged["settings"]["seeds"] == sorted(seeds)
    crossed = [own[0], with_data(reports[1], f"/w/domain_random_seed{seeds[0]}")]  # seed 2's race read seed 1's draw
    with pytest.raises(ConfigError, match="races other arms"):
        merge_reports(crossed, ["a", "b"])
    longer = [with_data(rep, f"/w/domain_random_seed{s}0") for rep, s in zip(reports, seeds)]
    with pytest.raises(ConfigError, match="races other arms"):
        merge_reports(longer, ["a", "b"])


def test_merge_of_chosen_arms_when_a_seed_raced_fewer(make_cfg, tmp_path: Path) -> None:
    """A seed that raced only some arms merges with the others on those arms: the
    same numbers as a merge of reports that never had the missing arm."""
    from sparsetrain.race import merge_reports

    arms, curves, reports = _one_seed_reports(make_cfg, tmp_path, [1, 2, 3])
    short = json.loads(json.dumps(reports[2]))  # seed 3 raced "drop" only
    del short["settings"]["arms"]["dense"], short["arms"]["dense"]
    with pytest.raises(ConfigError, match="every arm needs every seed"):
        merge_reports([reports[0], reports[1], short], ["a", "b", "c"])
    merged = merge_reports([reports[0], reports[1], short], ["a", "b", "c"], arms=["drop"])
    assert list(merged["arms"]) == ["drop"] and merged["settings"]["seeds"] == [1, 2, 3]
    finals = [curves["drop", s][-1][1] for s in (1, 2, 3)]
    assert merged["target_val_loss"] == pytest.approx(sum(finals) / 3, rel=1e-12)
    # reordering makes the named first arm the target, also where the first report lacks it
    both = merge_reports(reports[:2], ["a", "b"], arms=["drop", "dense"])
    assert list(both["arms"]) == ["drop", "dense"]
    assert both["target_val_loss"] == pytest.approx(sum(finals[:2]) / 2, rel=1e-12)
    dense_only = json.loads(json.dumps(reports[0]))
    del dense_only["settings"]["arms"]["drop"], dense_only["arms"]["drop"]
    drop_only = json.loads(json.dumps(reports[0]))
    del drop_only["settings"]["arms"]["dense"], drop_only["arms"]["dense"]
    split = merge_reports([dense_only, drop_only, reports[1]], ["d", "r", "b"], arms=["drop", "dense"])
    assert list(split["arms"]) == ["drop", "dense"]
    assert split["target_val_loss"] == pytest.approx(sum(finals[:2]) / 2, rel=1e-12)
    with pytest.raises(ConfigError, match="names no arm"):
        merge_reports(reports[:2], ["a", "b"], arms=[])


def test_merge_adds_an_arm_raced_later_for_the_same_seeds(make_cfg, tmp_path: Path, capsys) -> None:
    """Two one-seed races of dense and drop, then a race of one more arm over both
    seeds: the merged report has the three arms, dense's target over both seeds,
    and the late arm's runs as they were; an arm missing a seed is refused."""
    import numpy as np

    from sparsetrain.race import merge_reports, race_report

    _, curves, reports = _one_seed_reports(make_cfg, tmp_path, [1, 2])
    rng = random.Random(int(torch.randint(0, 2**31 - 1, ())))
    # as in a real report: the late race's base config is its first arm's, the arm's fields set
    late = Arm("imp", {"use_collider": "true", "collider_sparsity": "0.5", "collider_method": "importance",
                       "collider_score": "gradnorm"})
    configs = {"imp": {s: make_cfg(out_dir=str(tmp_path / "late" / "imp" / f"seed{s}"), seed=s, use_collider=True,
                                   collider_sparsity=0.5, collider_method="importance", collider_score="gradnorm")
                       for s in (1, 2)}}
    for s in (1, 2):
        curves["imp", s] = _random_curve(rng, 100.0, overfit=False)
        _write_run(configs["imp"][s], rng, curves["imp", s], rng.uniform(1, 20))
    late_report = race_report([late], configs, [1, 2], 100.0, interleave_order(1, 2))
    merged = merge_reports([*reports, late_report], ["r1.json", "r2.json", "late.json"])
    assert list(merged["arms"]) == ["dense", "drop", "imp"] and merged["settings"]["seeds"] == [1, 2]
    assert merged["target_val_loss"] == pytest.approx(np.mean([curves["dense", s][-1][1] for s in (1, 2)]), rel=1e-12)
    imp = merged["arms"]["imp"]
    assert [r["final_val_loss"] for r in imp["runs"]] == pytest.approx([curves["imp", s][-1][1] for s in (1, 2)])
    assert imp["overrides"] == late.overrides
    assert [m["arms"] for m in merged["settings"]["merged_from"]] == [["dense", "drop"], ["dense", "drop"], ["imp"]]
    one_seed = race_report([late], {"imp": {1: configs["imp"][1]}}, [1], 100.0, interleave_order(1, 1))
    with pytest.raises(ConfigError, match=r"arm imp has seeds \[1\], the merged race \[1, 2\]"):
        merge_reports([*reports, one_seed], ["r1.json", "r2.json", "late.json"])
    # a report older than a config field ran at its default: it merges; at another value it would not
    older = json.loads(json.dumps(reports[0]))
    assert older["settings"]["base_config"]["training"].pop("init_from") == ""
    assert list(merge_reports([older, reports[1], late_report], ["r1.json", "r2.json", "late.json"])["arms"]) == \
        ["dense", "drop", "imp"]
    newer = json.loads(json.dumps(reports[1]))
    newer["settings"]["base_config"]["training"]["init_from"] = "runs/base"
    with pytest.raises(ConfigError, match="init_from"):
        merge_reports([older, newer], ["r1.json", "r2.json"])
    # a field no arm sets must still agree
    other_lr = json.loads(json.dumps(late_report))
    other_lr["settings"]["base_config"]["training"]["lr"] *= 2
    with pytest.raises(ConfigError, match="another base config"):
        merge_reports([*reports, other_lr], ["r1.json", "r2.json", "late.json"])


def test_merge_reads_steps_of_older_reports_from_the_metrics_beside_them(make_cfg, tmp_path: Path) -> None:
    """Reports written before evaluation rows carried their step: the step comes from the run's metrics."""
    import gzip
    import shutil

    from sparsetrain.race import merge_reports

    arms, curves, reports = _one_seed_reports(make_cfg, tmp_path, [1, 2])
    want = merge_reports(reports, ["a/race.json", "b/race.json"])
    folders = []
    for s, rep in zip((1, 2), reports):
        for a in arms:
            for run in rep["arms"][a.name]["runs"]:
                run["evals"] = [e[:4] for e in run["evals"]]
        folders.append(tmp_path / f"old{s}")
        folders[-1].mkdir()
        for a in arms:  # one copied out as .jsonl.gz, the other in the race's own layout
            src = tmp_path / f"race{s}" / a.name / f"seed{s}" / "metrics.jsonl"
            if s == 1:
                with gzip.open(folders[-1] / f"{a.name}_seed{s}_metrics.jsonl.gz", "wt") as fh:
                    fh.write(src.read_text())
            else:
                (folders[-1] / a.name / f"seed{s}").mkdir(parents=True)
                shutil.copy(src, folders[-1] / a.name / f"seed{s}" / "metrics.jsonl")
    got = merge_reports(reports, [str(f / "race.json") for f in folders])
    assert got["settings"]["equal_steps"] == want["settings"]["equal_steps"]
    for a in arms:
        assert got["arms"][a.name]["val_loss_at_equal_steps"] == want["arms"][a.name]["val_loss_at_equal_steps"]
    shutil.rmtree(folders[1] / "dense")
    with pytest.raises(ConfigError, match="predates evaluation steps"):
        merge_reports(reports, [str(f / "race.json") for f in folders])


def test_a_bad_commit_variable_is_refused_before_any_run(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SPARSETRAIN_GIT_COMMIT", "not-a-sha")
    out = tmp_path / "race"
    code = main(["race", "--preset", "tiny", "--seconds", "1", "--out-dir", str(out), "--arm", "dense:"])
    err = capsys.readouterr().err
    assert code == 2 and "SPARSETRAIN_GIT_COMMIT='not-a-sha' is not a commit hash" in err
    assert len(err.strip().splitlines()) == 1 and not (out / "dense").exists()


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "race"
    code = main(["race", "--preset", "tiny", "--seconds", "7", "--seeds", "2", "--seed", "5", "--out-dir", str(out),
                 "--dry-run", "--arm", "dense:", "--arm", "half:batch_size=2,eval_batches=4",
                 "--arm", "r50:drop_ratio=0.5,collider_method=random"])
    text = capsys.readouterr().out
    assert code == 0 and not out.exists()
    lines = text.strip().splitlines()
    assert lines[0].startswith("race plan: 3 arm(s) x 2 seed(s) (5, 6), 7 s of training each") and "42 s" in lines[0]
    assert lines[1] == "  dense: the target"
    assert lines[2] == "  half: batch_size=2, eval_batches=4"
    assert lines[3] == "  r50: use_collider=True, collider_sparsity=0.5, collider_method='random'"
    assert lines[4] == "  order: dense/5 half/5 r50/5 r50/6 half/6 dense/6"
    # a refused arm is refused as the race would refuse it: one line, exit 2
    code = main(["race", "--preset", "tiny", "--seconds", "7", "--out-dir", str(out), "--dry-run",
                 "--arm", "dense:", "--arm", "bad:drop_ratio=1.5"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "1.5" in err and not out.exists()
    # the race's other checks too: the seed count, and a folder that holds another race
    code = main(["race", "--preset", "tiny", "--seconds", "7", "--seeds", "0", "--out-dir", str(out), "--dry-run",
                 "--arm", "dense:"])
    assert code == 2 and "--seeds must be >= 1, got 0" in capsys.readouterr().err
    out.mkdir()
    (out / "race_spec.json").write_text(json.dumps({"seconds": 9.0, "seeds": [5], "arms": {"dense": {}}, "configs": {}}))
    code = main(["race", "--preset", "tiny", "--seconds", "7", "--seed", "5", "--out-dir", str(out), "--dry-run",
                 "--arm", "dense:"])
    err = capsys.readouterr().err
    assert code == 2 and "holds a race with other --seconds (9.0 there vs 7.0 here)" in err
    assert json.loads((out / "race_spec.json").read_text())["seconds"] == 9.0  # the plan wrote nothing


# ----------------------------------------------------------------------------- the one-time cost


def _sidecar_header(path: Path, **fields) -> Path:
    Path(str(path) + ".json").write_text(json.dumps({"format": 1, "reference": "/runs/ref/ckpt.pt", **fields}))
    return path


def test_one_time_cost_adds_up_what_made_each_arms_inputs(make_cfg, tmp_path: Path) -> None:
    """The reference's training, each sidecar's forwards and the filter, each counted once; nothing for dense;
    unknown where a record predates the timing."""
    import random

    from sparsetrain.race import one_time_cost

    rng = random.Random()
    train, fwd, fwd2, filt = (round(rng.uniform(1, 100), 3) for _ in range(4))
    sidecar = _sidecar_header(tmp_path / "ref.f16", seconds=fwd, reference_train_seconds=train)
    other = _sidecar_header(tmp_path / "ref_filtered.f16", seconds=fwd2, reference_train_seconds=train)
    filtered = tmp_path / "filtered"
    filtered.mkdir()
    (filtered / ".corpus_manifest.json").write_text(json.dumps(
        {"generated": {}, "filtered": {"reference_losses": str(sidecar), "seconds": filt}}))
    excess = dict(use_collider=True, collider_score="excess", collider_sparsity=0.5, collider_method="topk")

    assert one_time_cost(make_cfg()) == {"parts": {}, "seconds": 0.0}
    got = one_time_cost(make_cfg(reference_losses=str(sidecar), **excess))
    assert got["seconds"] == pytest.approx(train + fwd) and len(got["parts"]) == 2
    got = one_time_cost(make_cfg(data=str(filtered)))
    assert got["seconds"] == pytest.approx(train + fwd + filt)
    # the span arm on the filtered corpus with the same sidecar: the reference and its forwards once
    assert one_time_cost(make_cfg(data=str(filtered), reference_losses=str(sidecar), **excess))["seconds"] == \
        pytest.approx(train + fwd + filt)
    # with the filtered corpus's own sidecar from the same reference: its forwards too, the training once
    assert one_time_cost(make_cfg(data=str(filtered), reference_losses=str(other), **excess))["seconds"] == \
        pytest.approx(train + fwd + fwd2 + filt)
    old = _sidecar_header(tmp_path / "old.f16")  # written before the header held its seconds
    got = one_time_cost(make_cfg(reference_losses=str(old), **excess))
    assert got["seconds"] is None and None in got["parts"].values()
    # the random control: no reference made it, only the filter's seconds
    control = tmp_path / "filtered_random"
    control.mkdir()
    (control / ".corpus_manifest.json").write_text(json.dumps(
        {"generated": {}, "filtered": {"reference_losses": None, "random_seed": 3, "seconds": filt}}))
    assert one_time_cost(make_cfg(data=str(control))) == {"parts": {"corpus filter": filt}, "seconds": filt}


def test_one_time_cost_of_a_reference_that_is_the_arms_start_is_its_forwards_only(make_cfg, tmp_path: Path) -> None:
    """The base scoring the domain (reference = init_from, as a run directory or its checkpoint file) was trained
    for every arm alike: only its forwards and the filter count; another reference's training still counts."""
    import random

    from sparsetrain.race import one_time_cost

    rng = random.Random()
    train, fwd, filt = (round(rng.uniform(1, 100), 3) for _ in range(3))
    base = tmp_path / "base"
    base.mkdir()
    (base / "ckpt.pt").write_bytes(b"")
    sidecar = tmp_path / "base_losses.f16"
    Path(str(sidecar) + ".json").write_text(json.dumps(
        {"format": 1, "reference": str((base / "ckpt.pt").resolve()), "seconds": fwd, "reference_train_seconds": train}))
    filtered = tmp_path / "filtered"
    filtered.mkdir()
    (filtered / ".corpus_manifest.json").write_text(json.dumps(
        {"generated": {}, "filtered": {"reference_losses": str(sidecar), "seconds": filt}}))
    for start in (base, base / "ckpt.pt"):
        assert one_time_cost(make_cfg(data=str(filtered), init_from=str(start)))["seconds"] == pytest.approx(fwd + filt)
    assert one_time_cost(make_cfg(data=str(filtered)))["seconds"] == pytest.approx(train + fwd + filt)
    other = tmp_path / "other"
    other.mkdir()
    assert one_time_cost(make_cfg(data=str(filtered), init_from=str(other)))["seconds"] == \
        pytest.approx(train + fwd + filt)


def test_report_adds_the_one_time_cost_to_the_time_to_target(make_cfg, tmp_path: Path) -> None:
    import random

    from sparsetrain.race import format_table, race_report

    rng = random.Random()
    seconds, seeds = 100.0, [3, 4]
    sidecar = _sidecar_header(tmp_path / "ref.f16", seconds=rng.uniform(10, 50), reference_train_seconds=30.0)
    excess = {"use_collider": "true", "collider_score": "excess", "collider_sparsity": "0.5",
              "collider_method": "topk", "reference_losses": str(sidecar)}
    arms = [Arm("dense", {}), Arm("excess", excess)]
    configs = {a.name: {s: make_cfg(out_dir=str(tmp_path / a.name / f"seed{s}"), seed=s,
                                    **({k: v for k, v in excess.items()} if a.name == "excess" else {}))
                        for s in seeds} for a in arms}
    for a in arms:
        for s in seeds:
            _write_run(configs[a.name][s], rng, _random_curve(rng, seconds, overfit=False), rng.uniform(1, 5))
    report = race_report(arms, configs, seeds, seconds, interleave_order(2, 2))
    cost = 30.0 + json.loads(Path(str(sidecar) + ".json").read_text())["seconds"]
    assert report["arms"]["dense"]["one_time_seconds"]["mean"] == 0.0
    assert report["arms"]["excess"]["one_time_seconds"]["mean"] == pytest.approx(cost)
    for name, add in (("dense", 0.0), ("excess", cost)):
        for r in report["arms"][name]["runs"]:
            t = r["seconds_to_target"]
            assert (t["with_one_time"] is None) == (t["with_startup"] is None)
            if t["with_startup"] is not None:
                assert t["with_one_time"] == pytest.approx(t["with_startup"] + add)
    table = format_table(report)
    assert "one-time s" in table and f"{cost:.1f}" in table


@pytest.mark.parametrize("spec, config, needle", [
    ("{bad", "", "holds an unreadable race_spec.json"),
    ("[1, 2]", "", "holds an unreadable race_spec.json"),
    ('{"seconds": 1}', "", "holds an unreadable race_spec.json"),
    ("", '[run]\nseed = "abc"\n', "run.seed must be an integer, got 'abc'"),
    ("", "run = 5\n", "is not a table"),
])
def test_race_refuses_a_damaged_folder_or_config_in_one_line(spec: str, config: str, needle: str, tmp_path: Path,
                                                              capsys) -> None:
    out = tmp_path / "race"
    out.mkdir()
    if spec:
        (out / "race_spec.json").write_text(spec)
    argv = ["race", "--dry-run", "--preset", "tiny", "--seconds", "1", "--out-dir", str(out), "--arm", "a:"]
    if config:
        (tmp_path / "c.toml").write_text(config)
        argv += ["--config", str(tmp_path / "c.toml")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("arm, needle", [("b:preset=d20", "keeps the race's --preset"),
                                         ("b:data=/nonexistent/corpus", "arm b: data /nonexistent/corpus does not exist")])
def test_race_refuses_an_arm_preset_and_a_missing_path_before_any_run(arm: str, needle: str, tmp_path: Path,
                                                                        capsys) -> None:
    """An arm's preset was dropped in favour of the race's (the plan said 'the same config');
    a later arm's missing data was found only after the earlier arms had run their budgets."""
    code = main(["race", "--dry-run", "--preset", "tiny", "--seconds", "1", "--out-dir", str(tmp_path / "r"),
                 "--arm", "a:", "--arm", arm])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("make, arm, needle", [
    (lambda d: d.mkdir(), "b:data={d}", "{d} holds no text file"),
    (lambda d: (d.mkdir(), (d / "x.dat").write_bytes(b"\0" * 9)), "b:data={d}", "{d} holds no text file"),
    (lambda d: None, "b:data_include=*.nothing", "no file under"),
    (lambda d: (d.mkdir(), (d / "a.py").write_text(" \n\t\n"), (d / "b.py").write_text("\n")), "b:data={d}",
     "no text found in {d}"),
    # one file of one character: the cut leaves nothing to train on
    (lambda d: (d.mkdir(), (d / "a.py").write_text("x")), "b:data={d}", "{d} is too small to split"),
    (lambda d: Path(f"{d}.bin").write_bytes(b""), "b:data={d}.bin", "{d}.bin is empty: no tokens"),
    (lambda d: (d.mkdir(), (d / "a.py").write_text("x = 1\n" * 50),
                (d / ".corpus_manifest.json").write_text('{"filtered": {"val_fraction": 0.02}}')),
     "b:data={d},val_fraction=0.1", "{d} was filtered at val_fraction 0.02"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_race_refuses_an_arm_whose_data_holds_nothing_before_any_run(make, arm: str, needle: str, dry_run: bool,
                                                                     make_cfg, tmp_path: Path, capsys) -> None:
    """An empty corpus passed the plan and stopped the race only at its arm, after the
    earlier arms had trained; the race folder then refused a command without it."""
    d = tmp_path / "corpus"
    make(d)
    out = tmp_path / "r"
    code = main(["race", *["--dry-run"] * dry_run, "--preset", "tiny", "--seconds", "1", "--out-dir", str(out),
                 "--data", make_cfg().data, "--device", "cpu", "--arm", "a:", "--arm", arm.format(d=d)])
    err = capsys.readouterr().err
    assert code == 2 and "arm b: " in err and needle.format(d=d) in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "a").exists()  # the first arm never started


def test_an_arm_setting_whose_switch_is_off_is_refused_but_a_race_flag_is_not(tmp_path: Path, capsys) -> None:
    """An arm named for Collider whose items forget to turn it on would race dense under
    that name: refused before any run. A technique's setting given to the whole race
    applies to the arms that turn it on, and the dense arm beside them is fine."""
    out = tmp_path / "r"
    code = main(["race", "--dry-run", "--preset", "tiny", "--seconds", "1", "--out-dir", str(out), "--arm", "a:",
                 "--arm", "c50:collider_sparsity=0.5,collider_method=topk"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "arm c50: collider_sparsity, collider_method have no effect while use_collider is off" in err, err
    code = main(["race", "--dry-run", "--preset", "tiny", "--seconds", "1", "--out-dir", str(out),
                 "--collider-method", "topk", "--arm", "dense:", "--arm", "c50:drop_ratio=0.5"])
    assert code == 0, capsys.readouterr().err
    # the protocol's Collider arm ramps its drop with selection_warmup_steps (read by Collider too)
    code = main(["race", "--dry-run", "--preset", "tiny", "--seconds", "1", "--out-dir", str(out), "--arm", "dense:",
                 "--arm", "collider50:drop_ratio=0.5,collider_method=topk,selection_warmup_steps=200"])
    assert code == 0, capsys.readouterr().err


def test_race_checks_each_data_selection_once(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """Walking a corpus reads the head of every file: arms and seeds sharing one walk it once."""
    from sparsetrain import race

    calls = []
    real = race.discover_text_files
    monkeypatch.setattr(race, "discover_text_files", lambda *a: calls.append(a) or real(*a))
    flags = dict(data=make_cfg().data, device="cpu")
    race.race_plan([parse_arm("a:"), parse_arm("b:lr=1e-3"), parse_arm("c:data_max_bytes=100000")], 1.0, 2,
                   tmp_path / "r", preset="tiny", flags=flags)
    assert [c[3] for c in calls] == [0, 100000]


@pytest.mark.parametrize("arm, needle", [("b:optimizer=lion", "optimizer = lion needs the lion-pytorch package"),
                                         ("b:optimizer=muon,muon_fallback=lion",
                                          "training.muon_fallback = lion needs the lion-pytorch package")])
def test_race_refuses_an_arm_whose_optimizer_package_is_missing_before_any_run(arm: str, needle: str, tmp_path: Path,
                                                                              monkeypatch, capsys) -> None:
    """A race whose third arm named Lion without lion-pytorch installed ran the first two
    arms' budgets and then stopped with no race.json: the package is checked up front."""
    import sys

    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # import lion_pytorch raises ImportError
    out = tmp_path / "r"
    code = main(["race", "--preset", "tiny", "--seconds", "1", "--out-dir", str(out), "--arm", "a:", "--arm", arm])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "a").exists()  # the first arm never started


def test_a_race_stopped_midway_leaves_the_report_of_its_finished_arms(make_cfg, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """A race whose third arm failed (a missing package found late, a machine's time
    limit) left no race.json: the finished arms' figures were only in their run folders.
    After each run the report of the arms finished in every seed is written, marked
    partial; the full report has no mark."""
    import sparsetrain.race as race_mod

    flags = _tiny_flags(make_cfg)
    arms = [Arm("dense", {}), Arm("random50", {"use_collider": "true", "collider_sparsity": "0.5",
                                                "collider_method": "random"}), Arm("late", {"lr": "5e-3"})]
    real = race_mod.run_one

    def fail_on_late(cfg, verbose=True):
        if "/late/" in cfg.out_dir.replace("\\", "/"):
            raise RuntimeError("the machine's time ran out")
        return real(cfg, verbose)

    monkeypatch.setattr(race_mod, "run_one", fail_on_late)
    out = tmp_path / "race"
    with pytest.raises(RuntimeError, match="time ran out"):
        run_race(arms, 1.0, 1, out, "tiny", flags=dict(flags), verbose=False)
    partial = json.loads((out / "race.json").read_text())
    assert list(partial["arms"]) == ["dense", "random50"]
    assert partial["partial"] == {"arms_finished": ["dense", "random50"], "arms_left": ["late"]}
    assert partial["settings"]["order"] == [["dense", 11], ["random50", 11]]
    assert partial["target_val_loss"] == pytest.approx(partial["arms"]["dense"]["runs"][0]["final_val_loss"])

    monkeypatch.setattr(race_mod, "run_one", real)  # the same command again: the finished arms are skipped
    full = run_race(arms, 1.0, 1, out, "tiny", flags=dict(flags), verbose=False)
    assert "partial" not in full and "partial" not in json.loads((out / "race.json").read_text())
    assert list(full["arms"]) == ["dense", "random50", "late"]
    assert full["arms"]["dense"]["runs"][0]["final_val_loss"] == partial["arms"]["dense"]["runs"][0]["final_val_loss"]


@pytest.mark.parametrize("script", ["race_protocol.sh", "race_noisy_domain.sh", "race_optimizers.sh", "race_e3.sh"])
def test_the_bench_scripts_default_arms_pass_the_race_plan(script: str, tmp_path: Path, capsys) -> None:
    """Each bench/race_*.sh's default arms resolve and validate (a config check added
    later refused the protocol's own Collider arm). Arms naming a file the script makes
    first ($W/...) are left out; so are Lion's where lion-pytorch is missing."""
    import importlib.util
    import re

    text = (Path(__file__).resolve().parents[1] / "bench" / script).read_text()
    arms = re.search(r'ARMS=\$\{ARMS:-"([^"]*)"\}', text).group(1)
    for name, value in re.findall(r'^(\w+)="([^"$]*)"$', text, flags=re.M):
        arms = arms.replace(f"${name}", value)
    has_lion = importlib.util.find_spec("lion_pytorch") is not None
    chosen = [a for a in arms.split() if "$" not in a and (has_lion or "lion" not in a.split(":", 1)[1])]
    assert len(chosen) >= 2, arms
    argv = ["race", "--dry-run", "--preset", "tiny", "--seconds", "1", "--out-dir", str(tmp_path / "r")]
    code = main(argv + [x for a in chosen for x in ("--arm", a)])
    assert code == 0, capsys.readouterr().err
