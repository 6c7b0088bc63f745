"""Config layering (defaults < preset < file < flags), TOML round trip, validation."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from sparsetrain.config import TrainConfig, build_config, dumps_toml, list_presets, preset_dict
from sparsetrain.errors import ConfigError
from sparsetrain.model import GPT


def test_presets_parse_and_layer() -> None:
    assert set(list_presets()) >= {"tiny", "nano-125m", "d20"}
    cfg = build_config("nano-125m")
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head) == (12, 768, 12)
    assert cfg.batch_size == preset_dict("nano-125m")["training"]["batch_size"]
    assert build_config("tiny").preset == "tiny"


def test_d20_matches_nanochat_size() -> None:
    cfg = build_config("d20").model
    import torch

    with torch.device("meta"):
        n = GPT(cfg).num_params()
    assert 555e6 < n < 565e6  # nanochat d20: 561M


def test_file_then_flags_override(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[model]\nn_layer = 3\n[training]\nlr = 0.01\nuse_mtp = false\n[run]\nseed = 7\n')
    cfg = build_config("tiny", f, {"lr": 0.02})
    assert cfg.model.n_layer == 3 and cfg.seed == 7 and cfg.lr == 0.02
    assert cfg.model.d_model == preset_dict("tiny")["model"]["d_model"]


def test_round_trip_through_toml() -> None:
    cfg = build_config("tiny", overrides={"data": 'a "quoted" \\ path', "max_seconds": 1.5})
    again = TrainConfig()
    from sparsetrain.config import apply_dict

    apply_dict(again, tomllib.loads(dumps_toml(cfg.to_dict())), "round trip")
    assert again == cfg


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[training]\nbogus = 1\n", "unknown config key 'training.bogus'"),
        ("[training]\nseed = 1\n", "belongs in [run]"),
        ("[optim]\nlr = 1\n", "unknown config section"),
        ("lr = 1\n", "did you mean [training] lr"),
        ("[training]\nlr = \"fast\"\n", "training.lr must be a number"),
        ("[training]\nuse_mtp = 3\n", "training.use_mtp must be true or false"),
        ("[model]\nn_layer = 1.5\n", "model.n_layer must be an integer"),
        ("[training]\nlr = \n", "not valid TOML"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, toml: str, message: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        build_config("tiny", f)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lr": -1.0}, "training.lr must be a positive number, got -1.0"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"d_model": 30, "n_head": 4}, "must be divisible"),
        ({"ffn": "gelu"}, "model.ffn must be one of"),
        ({"vocab_size": 100}, "vocab_size must be >= 257"),
        ({"vocab_size": 99999999999}, "vocab_size must be <= 16777216, got 99999999999"),
        ({"val_fraction": 0.7}, "val_fraction must be in"),
        ({"device": "tpu"}, "run.device must be"),
        ({"mtp_n_tokens": 5}, "mtp_n_tokens must be 2, 3 or 4"),
        ({"use_mtp": True, "selection": "loss"}, "not available yet"),
        ({"data": "tokens.bin", "data_on_the_fly": True}, "data_on_the_fly"),
        ({"nonsense": 1}, "unknown config key 'nonsense'"),
        ({"compile_mode": "fast"}, "run.compile_mode must be one of default, reduce-overhead"),
        ({"use_collider": True, "compile_mode": "reduce-overhead"}, "compile_mode other than default is not available"),
        ({"use_collider": True, "collider_sparsity": 0.5, "collider_method": "importance"},
         "collider_score must be one of loss, gradnorm, got 'collider'"),
        ({"use_collider": True, "collider_sparsity": 0.5, "collider_method": "importance", "collider_score": "loss",
          "use_mtp": True}, "use topk or random with use_mtp"),
        ({"selection": "batch", "selection_method": "importance", "selection_score": "loss"}, "needs selection = loss"),
        ({"collider_span": 0}, "training.collider_span must be >= 1, got 0"),
        ({"selection": "loss", "selection_method": "importance"}, "selection_score must be one of loss, gradnorm, got 'combined'"),
    ],
)
def test_out_of_range_values(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        build_config("tiny", overrides=overrides)


def test_unknown_preset_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        build_config("huge")
    with pytest.raises(ConfigError, match="config file not found"):
        build_config("tiny", tmp_path / "none.toml")


def test_docs_config_reference_is_current() -> None:
    from sparsetrain.config import reference_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == reference_markdown(), "regenerate docs/config.md (command at its top)"


@pytest.mark.parametrize(
    "toml, message",
    [
        ('[model]\nd_model = "128"\n', 'model.d_model must be an integer, got "128" (a string)'),
        ("[model]\nn_layer = true\n", "model.n_layer must be an integer, got true (a boolean)"),
        ("[training]\nbatch_size = 16.0\n", "training.batch_size must be an integer, got 16.0 (a float)"),
        ('[training]\nlr = "0.01"\n', 'training.lr must be a number, got "0.01" (a string)'),
        ("[training]\nlr = false\n", "training.lr must be a number, got false (a boolean)"),
        ('[training]\nuse_mtp = "true"\n', 'training.use_mtp must be true or false, got "true" (a string)'),
        ("[training]\nuse_mtp = 1\n", "training.use_mtp must be true or false, got 1 (an integer)"),
        ("[data]\ndata = 5\n", "data.data must be a string, got 5 (an integer)"),
        ("[run]\ndevice = 0.5\n", "run.device must be a string, got 0.5 (a float)"),
        ('[run]\ndevice = ["cpu"]\n', "run.device must be a string, got ['cpu'] (an array)"),
        ("[kernels]\nfused_cross_entropy = 0\n", "kernels.fused_cross_entropy must be true or false, got 0 (an integer)"),
    ],
)
def test_toml_values_of_the_wrong_type_are_refused(tmp_path: Path, toml: str, message: str, capsys) -> None:
    """A TOML value is taken as written: no string is read as a number or a switch, no number as text."""
    from sparsetrain.cli import main

    f = tmp_path / "typed.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as e:
        build_config("tiny", f)
    assert message in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert main(["train", "--dry-run", "--config", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err


def test_toml_ints_are_numbers_and_flags_keep_their_types(tmp_path: Path, capsys) -> None:
    from sparsetrain.cli import main

    f = tmp_path / "ok.toml"
    f.write_text("[model]\nrope_theta = 10000\n[training]\nlr = 1\nmax_seconds = 0\n")
    cfg = build_config("tiny", f)
    assert (cfg.model.rope_theta, cfg.lr, cfg.max_seconds) == (10000.0, 1.0, 0.0)
    assert all(type(v) is float for v in (cfg.model.rope_theta, cfg.lr, cfg.max_seconds))
    # flags: argparse has typed them; the file's values under them
    assert main(["train", "--dry-run", "--config", str(f), "--d-model", "64", "--n-head", "2", "--lr", "0.01",
                 "--use-mtp", "--no-fused-cross-entropy", "--data", "corpus/", "--max-seconds", "5"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert (printed["model"]["d_model"], printed["model"]["n_head"], printed["training"]["lr"]) == (64, 2, 0.01)
    assert (printed["training"]["use_mtp"], printed["kernels"]["fused_cross_entropy"]) == (True, False)
    assert (printed["data"]["data"], printed["training"]["max_seconds"]) == ("corpus/", 5.0)
    # race arms (KEY=VALUE) hand their values over as text: overrides still parse them
    cfg = build_config("tiny", overrides={"n_layer": "2", "lr": "0.01", "use_mtp": "false", "seed": "3"})
    assert (cfg.model.n_layer, cfg.lr, cfg.use_mtp, cfg.seed) == (2, 0.01, False, 3)


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_as_a_preset_and_as_a_config_file(name: str, capsys) -> None:
    from importlib import resources

    from sparsetrain.cli import main

    cfg = build_config(name)
    assert cfg.preset == name
    path = Path(str(resources.files("sparsetrain") / "presets" / f"{name}.toml"))
    assert build_config(name, path) == cfg  # every value in it of its field's type
    assert main(["train", "--dry-run", "--preset", name, "--config", str(path)]) == 0
    assert tomllib.loads(capsys.readouterr().out) == cfg.to_dict()
