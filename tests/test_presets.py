"""The shipped presets: d20-e3-full turns every E3 technique on at the d20 shape,
each combination of them validates, a tiny override of it trains end to end
through the CLI with every technique live, and --dry-run prints its config."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest

from sparsetrain.cli import main
from sparsetrain.config import build_config, preset_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

E3 = "d20-e3-full"
E3_SWITCHES = {"use_mtp": True, "use_collider": True, "use_async_loader": True, "optimizer": "muon"}
OFF = {"use_mtp": False, "use_collider": False, "use_async_loader": False, "optimizer": "adamw"}
TINY = ["--n-layer", "2", "--d-model", "64", "--n-head", "4", "--seq-len", "32", "--batch-size", "2",
        "--vocab-size", "320", "--max-steps", "3"]


def test_e3_preset_is_d20_with_every_e3_technique_on() -> None:
    cfg = build_config(E3)
    d20 = build_config("d20")
    assert cfg.model == d20.model  # the d20 shape, untouched
    for key, value in E3_SWITCHES.items():
        assert getattr(cfg, key) == value, key
    assert (cfg.collider_sparsity, cfg.collider_method) == (0.5, "topk")
    assert cfg.preset == E3


@pytest.mark.parametrize("subset", [s for n in range(1, 5) for s in itertools.combinations(sorted(E3_SWITCHES), n)])
def test_every_combination_of_the_e3_techniques_validates(subset: tuple[str, ...]) -> None:
    """Each subset of the four switches, on the d20 base, passes validation with
    the switches it names on and the others off."""
    overrides = {**OFF, **{k: E3_SWITCHES[k] for k in subset}}
    if "use_collider" in subset:
        overrides.update(collider_sparsity=0.5, collider_method="topk")
    cfg = build_config("d20", overrides=overrides)
    for key in E3_SWITCHES:
        assert getattr(cfg, key) == overrides[key]


def test_e3_preset_tiny_override_trains_with_every_technique_live(corpus_dir: Path, cache_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Three steps through ``sparsetrain train --preset d20-e3-full``: the trainer
    builds Collider's objective with MTP heads, an async loader and the Muon
    optimizer over every trainable parameter (model and heads); every train row
    shows half the tokens kept and one loss per MTP head."""
    import sparsetrain.trainer as trainer_module
    from sparsetrain.loader import AsyncLoader
    from sparsetrain.objectives import ColliderLoss

    built: dict[str, object] = {}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            built[name] = out
            built[name + "_args"] = args
            return out
        monkeypatch.setattr(trainer_module, name, wrapped)

    spy("build_objective", trainer_module.build_objective)
    spy("make_loader", trainer_module.make_loader)
    spy("build_optimizer", trainer_module.build_optimizer)

    out = tmp_path / "run"
    code = main(["train", "--preset", E3, *TINY, "--data", str(corpus_dir), "--cache-dir", str(cache_dir),
                 "--val-fraction", "0.1", "--device", "cpu", "--out-dir", str(out), "--log-every", "1"])
    assert code == 0

    objective = built["build_objective"]
    assert isinstance(objective, ColliderLoss) and objective.heads is not None
    assert isinstance(built["make_loader"], AsyncLoader)
    optimizer = built["build_optimizer"]
    assert set(optimizer.parts) == {"adamw", "muon"}
    optimized = {id(p) for opt in optimizer.parts.values() for g in opt.param_groups for p in g["params"]}
    trained = built["build_optimizer_args"][0]  # the model with its MTP heads
    assert optimized == {id(p) for p in trained.parameters() if p.requires_grad}
    assert any(id(p) in optimized for p in objective.heads.parameters())

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    n_heads = build_config(E3).mtp_n_tokens
    for r in train_rows:
        assert r["kept_fraction"] == pytest.approx(0.5)  # topk keeps exactly 1 - collider_sparsity
        assert len(r["mtp_losses"]) == n_heads and all(0 < v < 20 for v in r["mtp_losses"])
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["training"]["optimizer"] == "muon" and saved["training"]["use_async_loader"] is True


def test_e3_preset_dry_run_prints_the_resolved_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--preset", E3, "--dry-run"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed == build_config(E3).to_dict()
    for section, table in preset_dict(E3).items():  # what the preset file sets, as it sets it
        for key, value in table.items():
            assert printed[section][key] == value, f"{section}.{key}"
    assert printed["run"]["preset"] == E3


def test_every_preset_validates_and_is_in_the_config_reference() -> None:
    from sparsetrain.config import list_presets

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    for name in list_presets():
        assert build_config(name).preset == name
        assert f"| `{name}` |" in doc, name


def test_the_e3_race_arm_is_the_e3_preset_spelled_as_overrides() -> None:
    """bench/race_e3.sh races d20-e3-full as d20 plus an arm's overrides (a race keeps
    one preset): those overrides must give exactly the preset's config."""
    import dataclasses
    import re

    script = (Path(__file__).resolve().parents[1] / "bench" / "race_e3.sh").read_text()
    spelled = re.search(r'^E3="([^"]+)"$', script, re.M).group(1)
    overrides = dict(pair.split("=", 1) for pair in spelled.split(","))
    via_arm = dataclasses.asdict(build_config("d20", overrides=overrides))
    preset = dataclasses.asdict(build_config(E3))
    via_arm.pop("preset"), preset.pop("preset")
    assert via_arm == preset
