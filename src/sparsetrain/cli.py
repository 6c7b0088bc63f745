"""Command line: ``sparsetrain {train,race,race-merge,reference-losses,generate,eval,export,bench,fire,grpo,corpus,info}``.

Every config field is also a flag (``lr`` -> ``--lr``, ``use_collider`` ->
``--use-collider/--no-use-collider``), so the CLI and TOML files can never
drift apart. User errors print one line naming what the user typed (the flag,
or the TOML key) and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .config import (ARCHS, MAX_SIZE, SECTIONS, ModelConfig, TrainConfig, _valid_device, build_config, dumps_toml, field_types,
                     list_presets, read_toml, refuse_inert_settings)
from .errors import ConfigError, SparsetrainError

if TYPE_CHECKING:  # the CLI imports torch only where a command needs it
    import torch

EXIT_USAGE = 2
STEP_TOKENS_LIMIT = 16384
"""Most tokens per step that ``bench step`` picks by default (2048 x 8, the step shape the benches time)."""
STEP_REPEATS = {"cuda": 20, "cpu": 3}
STEP_WARMUP = {"cuda": 5, "cpu": 1}

DEFAULT_PRESET = TrainConfig().preset

# train --help groups, shown in this order. A field goes to the group of its TOML section whose
# prefixes it starts with, else to its section's catch-all group (prefix "").
FLAG_GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("model shape", "model", ("",)),
    ("data", "data", ("",)),
    ("optimisation and evaluation", "training", ("",)),
    ("run: output, logging, device", "run", ("",)),
    ("kernel dispatch", "kernels", ("",)),
    ("2:4 activation-sparse FFN (ffn = relu2_24)", "model", ("activation_",)),
    ("ResNet-BK (arch = resnet_bk)", "model", ("bk_",)),
    ("CGGR token selection", "training", ("selection", "keep_ratio", "router_layers", "reference_ckpt")),
    ("Collider token filtering", "training", ("use_collider", "collider_")),
    ("multi-token prediction", "training", ("use_mtp", "mtp_")),
    ("async data loader", "training", ("use_async_loader", "async_")),
    ("optimizer", "training", ("optimizer", "muon_", "galore_")),
    ("learning-rate schedule and time budget", "training", ("schedule_by", "startup_steps", "prime_startup", "max_seconds",
                                                              "min_lr_ratio", "warmup_steps", "eval_every_seconds")),
)


def _say_error(text: str) -> None:
    """One line on stderr, whatever the text holds (newlines, undecodable argv bytes)."""
    line = " ".join(text.split()).encode("utf-8", "backslashreplace").decode("utf-8")
    sys.stderr.write(line + "\n")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        _say_error(f"{self.prog}: error: {message}")
        raise SystemExit(EXIT_USAGE)


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=110)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return repr(value) if value == "" else str(value)


def _flag_group(section: str, name: str) -> str:
    matches = [(prefix != "", title) for title, sec, prefixes in FLAG_GROUPS if sec == section
               for prefix in prefixes if name.startswith(prefix)]
    return max(matches)[1]  # a specific prefix before the catch-all


def _add_config_flags(p: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """One flag per config field, grouped by topic, each with its default (the default preset's value)."""
    groups = {title: p.add_argument_group(f"{title} [{sec}]") for title, sec, _ in FLAG_GROUPS}
    defaults = build_config(DEFAULT_PRESET)
    items: list[tuple[str, dataclasses.Field, Any, Any]] = []
    mtypes = field_types(ModelConfig)
    items += [("model", f, mtypes[f.name], getattr(defaults.model, f.name)) for f in dataclasses.fields(ModelConfig)]
    ttypes = field_types(TrainConfig)
    items += [(f.metadata["section"], f, ttypes[f.name], getattr(defaults, f.name))
              for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    for section, f, typ, default in items:
        flag = "--" + f.name.replace("_", "-")
        flags = [flag, "--model"] if f.name == "arch" else [flag]
        help_text = f.metadata.get("help", "").replace("%", "%%") + f" (default: {_shown(default)})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = typ
            kwargs["metavar"] = f.name.split("_")[-1].upper() if typ is str else typ.__name__.upper()
        if f.name == "preset":
            kwargs["choices"] = list_presets()
        if f.name == "arch":
            kwargs["choices"] = ARCHS
        groups[_flag_group(section, f.name)].add_argument(*flags, **kwargs)
    return groups


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="sparsetrain", description="Cheaper LM training, measured.", formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a GPT (default: preset tiny on the Python stdlib sources)",
                       formatter_class=_HelpFormatter, usage="%(prog)s [--config FILE] [--resume RUN] [--dry-run] [--FLAG VALUE ...]",
                       description=f"Train a model. Settings layer as: defaults < --preset < --config FILE < flags; "
                                   f"the defaults shown are the {DEFAULT_PRESET} preset's. With --resume the run's "
                                   f"config.toml takes the preset's place, so --config and flags change what a "
                                   f"resume may change (max_steps, say). Every flag is also a key of the TOML table "
                                   f"named in its group's heading.")
    t.add_argument("--config", metavar="FILE", help="TOML config ([model], [data], [training], [run], [kernels])")
    t.add_argument("--resume", metavar="RUN", help="continue the run in this directory exactly where it stopped")
    t.add_argument("--dry-run", action="store_true",
                   help="check the settings and print the resolved config as TOML; load no data, write nothing")
    groups = _add_config_flags(t)
    groups["Collider token filtering"].add_argument(
        "--drop-ratio", type=float, metavar="FLOAT", default=argparse.SUPPRESS,
        help="shortcut: Collider on, holding this fraction of tokens dropped (sets use_collider, collider_sparsity)")

    rc = sub.add_parser("race", help="train several arms for the same wall-clock budget each and compare their held-out loss")
    rc.add_argument("--config", metavar="FILE", help="base TOML config, under every arm")
    rc.add_argument("--seconds", type=float, required=True, help="training seconds of every run, after its start-up")
    rc.add_argument("--seeds", type=int, default=1, help="runs per arm, seeds --seed, --seed + 1, ... (default 1)")
    rc.add_argument("--arm", action="append", required=True, metavar="NAME:KEY=VALUE,...",
                    help="an arm: a name and config overrides on the base (NAME: for the base itself); "
                         "repeat; the first arm's final loss is the target")
    rc.add_argument("--dry-run", action="store_true",
                    help="resolve and validate every arm's config, print the plan (each arm's differences from the "
                         "first, the order) and exit without training")
    _add_config_flags(rc)

    rm = sub.add_parser("race-merge", help="one report over several races of the same budget and base config: their "
                        "seeds (e.g. one seed per GPU call) and their arms (an arm raced later for the same seeds); "
                        "the target (the first file's first arm), times to it and spreads over all seeds")
    rm.add_argument("reports", nargs="+", metavar="RACE_JSON",
                    help="race.json files of the same budget and base config; every arm needs every seed once")
    rm.add_argument("--out-dir", required=True, metavar="DIR", help="where race.json, race.png and race_full.png go")
    rm.add_argument("--arms", metavar="LIST", help="comma list: merge only these arms, in this order (the first is "
                    "the target), e.g. when one seed raced fewer arms (default: every arm)")

    rl = sub.add_parser("reference-losses", help="precompute a reference run's loss of every train token (a sidecar "
                        "for the excess score: training then reads it instead of running the reference)")
    rl.add_argument("--ckpt", required=True, metavar="RUN", help="the reference run directory (or its ckpt.pt)")
    rl.add_argument("--out", required=True, metavar="FILE", help="sidecar to write (FILE and FILE.json); "
                    "train with --reference-losses FILE")
    rl.add_argument("--config", metavar="FILE", help="the training run's TOML config: its [data] picks the tokens")
    rl.add_argument("--context", type=int, metavar="C",
                    help="tokens of context each entry past the first window gets at least; windows overlap by C "
                         "(default: half the reference's seq_len; 0: each token read once, half the forwards)")
    _add_config_flags(rl)

    g = sub.add_parser("generate", help="sample text from a trained run", formatter_class=_HelpFormatter)
    g.add_argument("--ckpt", required=True, metavar="RUN",
                   help="run directory (reads its weights-only model.safetensors), or a model.safetensors or ckpt.pt file")
    g.add_argument("--prompt", default="def", help="text to continue (default: %(default)r)")
    g.add_argument("--max-new-tokens", type=int, default=200, metavar="INT", help="tokens to sample (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.8, metavar="FLOAT",
                   help="softmax temperature, >= 0; 0 = greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=50, metavar="INT",
                   help="sample among the k likeliest tokens; 0 = all (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, metavar="INT", help="sampling seed (default: %(default)s)")
    g.add_argument("--num-samples", type=int, default=1, metavar="INT",
                   help="continuations to sample, in one batch; sample i is what --seed SEED+i gives alone "
                        "(default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto (CUDA where there is one), cpu, cuda or cuda:N (default: %(default)s)")

    b = sub.add_parser("bench", help="measure speed on this machine")
    bsub = b.add_subparsers(dest="bench_kind", required=True, parser_class=_Parser)
    bs = bsub.add_parser("step", help="dense training step: tokens/s and MFU")
    bs.add_argument("--preset", default="nano-125m", choices=list_presets())
    bs.add_argument("--seq-len", type=int, default=None, help="default: the preset's seq_len")
    bs.add_argument("--batch-size", type=int, default=None,
                    help=f"default: the preset's batch_size, at most {STEP_TOKENS_LIMIT:,} tokens per step")
    bs.add_argument("--compile", action="store_true", help="torch.compile the model")
    bs.add_argument("--repeats", type=int, default=None,
                    help=f"timed steps (default {STEP_REPEATS['cuda']} on CUDA, {STEP_REPEATS['cpu']} on the CPU)")
    bs.add_argument("--json", metavar="FILE", help="also write the result as JSON")

    f = sub.add_parser("fire", help="FIRE-reinitialise a run's weights into a new run directory (for continual training)")
    f.add_argument("--ckpt", required=True, metavar="RUN", help="run directory (or its ckpt.pt)")
    f.add_argument("--out", required=True, metavar="NEW_RUN", help="new run directory; continue it with train --resume")
    f.add_argument("--tol", type=float, default=1e-4, help="orthogonality error target of Newton-Schulz")
    f.add_argument("--max-iters", type=int, default=60, help="Newton-Schulz iterations before the SVD fallback")

    _add_grpo_parser(sub)
    _add_export_parser(sub)
    _add_eval_parser(sub)
    _add_corpus_parser(sub)

    sub.add_parser("info", help="device, torch, CUDA, cuSPARSELt and Triton availability")
    return parser


def _add_grpo_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("grpo", formatter_class=_HelpFormatter,
                       help="training-free GRPO: grow an experience library, measure held-out success with and without it",
                       description="Grow an experience library from rewarded rollouts on library prompts, then sample "
                                   "every held-out prompt once without and once with library items in its context; "
                                   "report both success rates per seed (Wilson 95% intervals) and their mean and "
                                   "spread over seeds. The compile task's two prompt sets come from disjoint halves "
                                   "of the run's held-out Python files. See docs/grpo.md.")
    r.add_argument("--ckpt", required=True, metavar="RUN", help="run directory (or its ckpt.pt)")
    r.add_argument("--task", default="compile", choices=("compile", "arithmetic"),
                   help="compile: complete a block of a held-out Python file of the run's corpus so that it compiles; "
                        "arithmetic: the value of a +/- b (default: %(default)s)")
    r.add_argument("--library", default="", metavar="FILE",
                   help="experience library JSON: the starting library of every seed if present; each seed's grown "
                        "library is saved to it (--seeds 1) or to FILE with .seedN before its suffix")
    r.add_argument("--rounds", type=int, default=3, metavar="INT", help="rounds over the library prompts, >= 0 (default: %(default)s)")
    r.add_argument("--seeds", type=int, default=3, metavar="INT",
                   help="independent repetitions, seeds --seed, --seed + 1, ... (default: %(default)s)")
    r.add_argument("--seed", type=int, default=0, metavar="INT", help="first seed (default: %(default)s)")
    r.add_argument("--train-prompts", type=int, default=32, metavar="INT", help="library prompts per seed (default: %(default)s)")
    r.add_argument("--test-prompts", type=int, default=64, metavar="INT",
                   help="held-out prompts per seed, one sample each per arm (default: %(default)s)")
    r.add_argument("--group-size", type=int, default=4, metavar="INT", help="rollouts per library prompt, G (default: %(default)s)")
    r.add_argument("--context-items", type=int, default=2, metavar="INT",
                   help="library items drawn into each prompt's context (default: %(default)s)")
    r.add_argument("--max-size", type=int, default=None, metavar="INT",
                   help="library capacity (default: 64, or the --library file's own)")
    r.add_argument("--experience-lines", type=int, default=12, metavar="INT",
                   help="compile: lines of a completed block kept as an experience (default: %(default)s)")
    r.add_argument("--context-tokens", type=int, default=128, metavar="INT",
                   help="tokens of the model's window for library items (default: %(default)s)")
    r.add_argument("--prompt-tokens", type=int, default=256, metavar="INT",
                   help="tokens of the model's window for the end of the prompt, the same in both arms (default: %(default)s)")
    r.add_argument("--max-new-tokens", type=int, default=96, metavar="INT", help="tokens per completion at most (default: %(default)s)")
    r.add_argument("--temperature", type=float, default=0.8, metavar="FLOAT", help="sampling temperature, 0 = greedy (default: %(default)s)")
    r.add_argument("--top-k", type=int, default=50, metavar="INT", help="sample among the k likeliest tokens; 0 = all (default: %(default)s)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    r.add_argument("--json", metavar="FILE", help="also write the results, every held-out sample included, as JSON")


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    from .export import DTYPES, FORMATS

    e = sub.add_parser("export", help="write a run as GGUF (llama.cpp), safetensors or a Hugging Face folder")
    e.add_argument("--ckpt", required=True, metavar="RUN", help="run directory (or its ckpt.pt)")
    e.add_argument("--format", required=True, choices=FORMATS,
                   help="gguf: llama/arcee file for llama.cpp; safetensors: weights + config; hf: folder for transformers")
    e.add_argument("--out", required=True, metavar="PATH", help="output file (gguf, safetensors) or folder (hf)")
    e.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weight dtype (GGUF norm gains stay float32)")
    e.add_argument("--force", action="store_true", help="overwrite an existing output")


def _add_corpus_parser(sub: argparse._SubParsersAction) -> None:
    from .corpora import NOISE_KINDS

    c = sub.add_parser("corpus", help="build a folder corpus for a training regime (a clean domain with noise or duplicates)")
    csub = c.add_subparsers(dest="corpus_kind", required=True, parser_class=_Parser)
    b = csub.add_parser("build", formatter_class=_HelpFormatter,
                        help="copy a selection of a folder and add noise documents and duplicates to its train split",
                        description="Copy the files of --src that training would select (--include, --exclude, "
                                    "--max-bytes), under their own paths, so the train/val split is the source's; then "
                                    "add noise documents and duplicates of clean train files to the train split only. "
                                    "Deterministic given --seed. See docs/time_to_quality.md.")
    b.add_argument("--src", required=True, metavar="FOLDER", help="source folder of text files")
    b.add_argument("--out", required=True, metavar="DIR", help="the corpus folder to write (new, or empty)")
    b.add_argument("--include", default="", metavar="GLOBS", help="as data_include: comma-separated globs to keep")
    b.add_argument("--exclude", default="", metavar="GLOBS", help="as data_exclude: comma-separated globs to drop")
    b.add_argument("--max-bytes", type=int, default=0, metavar="N", help="as data_max_bytes: cap on the source selection")
    b.add_argument("--val-fraction", type=float, default=TrainConfig().val_fraction, metavar="F",
                   help="noise and duplicates are made only from files that are train under this val_fraction: "
                        "train the corpus with it or a smaller one (default: %(default)s)")
    b.add_argument("--noise-fraction", type=float, default=0.0, metavar="F",
                   help="fraction of the train bytes that are noise documents (default: %(default)s)")
    b.add_argument("--noise-kinds", default=",".join(NOISE_KINDS), metavar="K,K",
                   help="noise kinds, sharing the noise bytes equally (default: %(default)s)")
    b.add_argument("--noise-placement", default="files", metavar="WHERE",
                   help="files: each noise document a file of its own; inside: spliced into clean train files at "
                        "line boundaries, so no file is all noise (default: %(default)s)")
    b.add_argument("--duplicate-fraction", type=float, default=0.0, metavar="F",
                   help="fraction of the train bytes that are copies of clean train files (default: %(default)s)")
    b.add_argument("--seed", type=int, default=0, help="seed of everything generated (default: %(default)s)")
    b.add_argument("--disjoint-from", default="", metavar="CORPUS",
                   help="a corpus built earlier: leave out every source file it holds, before --max-bytes "
                        "(a reference's clean set from the domain's package that shares no file with the domain)")
    f = csub.add_parser("filter", formatter_class=_HelpFormatter,
                        help="copy a corpus without the train documents a reference model finds hardest",
                        description="Score each train document of --corpus by the reference's mean loss of its "
                                    "tokens (a sidecar of sparsetrain reference-losses, or computed here by --scorer "
                                    "RUN, e.g. the model you will continue) and copy the corpus without "
                                    "the highest-scoring ones, about --drop of its train tokens; val files are all "
                                    "kept, so the held-out split is the same. The static form of the excess score "
                                    "(a perplexity filter): train on the result. --random-seed leaves out the same share "
                                    "of train tokens in whole documents taken at random instead: the control. "
                                    "It pays on a corpus with noise documents; on clean text it lost as much as "
                                    "dropping random documents: race it against dense on your data first. "
                                    "See docs/time_to_quality.md.")
    f.add_argument("--corpus", required=True, metavar="FOLDER", help="the corpus folder the sidecar was computed for")
    f.add_argument("--tokenizer", metavar="FILE", help="the tokenizer.json it was tokenized with (default with "
                   "--scorer: the scorer run's)")
    f.add_argument("--reference-losses", metavar="FILE", help="the sidecar (sparsetrain reference-losses)")
    f.add_argument("--scorer", metavar="RUN", help="instead of --reference-losses: a run (e.g. the model you will "
                   "continue) that scores the corpus first, each token read once; its sidecar goes to OUT.losses.f16")
    f.add_argument("--random-seed", type=int, metavar="SEED", help="instead of scores: leave out whole documents "
                   "taken in a random order from SEED (>= 0) until --drop of the train tokens are gone (the control "
                   "of a filter: the same share of tokens, no choice); needs --tokenizer")
    f.add_argument("--batch-size", type=int, default=8, metavar="N", help="windows per forward with --scorer "
                   "(default: %(default)s)")
    f.add_argument("--device", default="auto", help="where --scorer runs: auto, cpu, cuda or cuda:N (default: auto)")
    f.add_argument("--drop", required=True, type=float, metavar="F", help="fraction of the train tokens to leave out")
    f.add_argument("--out", required=True, metavar="DIR", help="the corpus folder to write (new, or empty)")
    f.add_argument("--val-fraction", type=float, default=TrainConfig().val_fraction, metavar="F",
                   help="the val_fraction the sidecar's run used (default: %(default)s)")


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("eval", help="held-out loss, bits per byte and the compile rate of sampled code continuations")
    v.add_argument("--ckpt", required=True, metavar="RUN", help="run directory (or its ckpt.pt)")
    v.add_argument("--data", default="", metavar="PATH",
                   help="text file or folder to evaluate whole (default: the run's own val split)")
    v.add_argument("--samples", type=int, default=20, help="sampled continuations for the compile rate (0 = skip)")
    v.add_argument("--max-new-tokens", type=int, default=128, help="tokens per continuation at most")
    v.add_argument("--max-tokens", type=int, default=0, help="evaluate the loss on the first N tokens only (0 = all)")
    v.add_argument("--batch-size", type=int, default=8,
                   help="windows per forward for the loss, and held-out prompts sampled together")
    v.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    v.add_argument("--top-k", type=int, default=50)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", default="auto", help="auto (CUDA where there is one), cpu, cuda or cuda:N (default: %(default)s)")
    v.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def cmd_train(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume", "drop_ratio", "dry_run")}
    if hasattr(args, "drop_ratio"):
        overridden = ("--no-use-collider" if overrides.get("use_collider") is False
                      else "--collider-sparsity" if "collider_sparsity" in overrides else None)
        if overridden:
            raise SparsetrainError(f"--drop-ratio {args.drop_ratio} sets use_collider and collider_sparsity: "
                                   f"drop {overridden}")
        overrides.update(use_collider=True, collider_sparsity=args.drop_ratio)
    base = None
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.toml").is_file():
            raise SparsetrainError(f"cannot resume {args.resume}: no config.toml there (is it a sparsetrain run directory?)")
        base = read_toml(run / "config.toml")
        if overrides.get("out_dir") not in (None, str(run)):  # a resumed run stays in its own folder
            raise SparsetrainError(f"--out-dir {overrides['out_dir']} with --resume {args.resume}: a resumed run "
                                   "writes into its own folder (--init-from starts a new run elsewhere)")
        if overrides.get("preset") is not None:  # the run's config holds its model; a preset would only rename it
            raise SparsetrainError(f"--preset {overrides['preset']} with --resume {args.resume}: a resumed run keeps "
                                   "its model and settings (--init-from starts a new run from its weights)")
        overrides["out_dir"] = str(run)
    cfg = build_config(overrides.pop("preset", None), args.config, overrides, base=base)
    refuse_inert_settings(cfg, [k for k, v in overrides.items() if v is not None])
    if args.dry_run:
        print(dumps_toml(cfg.to_dict()), end="")
        return 0
    from .trainer import train

    result = train(cfg, resume=args.resume)
    if result.val_losses:
        print(f"final val loss {result.val_losses[max(result.val_losses)]:.4f}; sample with: sparsetrain generate --ckpt {result.out_dir}")
    return 0


def cmd_race_merge(args: argparse.Namespace) -> int:
    from .race import write_merged

    arms = [a.strip() for a in args.arms.split(",")] if args.arms else None
    if arms is not None and not all(arms):
        raise ConfigError(f"--arms {args.arms!r} has an empty item; give arm names separated by commas")
    write_merged(args.reports, args.out_dir, arms=arms)
    print(f"race report: {Path(args.out_dir) / 'race.json'}, plot: {Path(args.out_dir) / 'race.png'}")
    return 0


def cmd_race(args: argparse.Namespace) -> int:
    from datetime import datetime

    from .race import parse_arm, race_plan, run_race

    if hasattr(args, "max_seconds"):
        raise SparsetrainError("a race's budget is --seconds (an arm may set max_seconds=S of its own)")
    flags = {k: v for k, v in vars(args).items()
             if k not in ("command", "config", "seconds", "seeds", "arm", "dry_run")}
    preset = flags.pop("preset", None)
    out = flags.pop("out_dir", "") or f"runs/race-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    arms = [parse_arm(a) for a in args.arm]
    if args.dry_run:
        print(race_plan(arms, args.seconds, args.seeds, out, preset=preset, config_file=args.config, flags=flags))
        return 0
    try:
        run_race(arms, args.seconds, args.seeds, out, preset=preset, config_file=args.config, flags=flags)
    except KeyboardInterrupt as e:
        from .trainer import RunInterrupted

        where = ""
        if isinstance(e, RunInterrupted):  # the run cut short: what the race's next start continues from
            where = (f"the interrupted run in {e.out_dir} keeps its step-{e.kept_step} checkpoint; "
                     if e.kept_step is not None else f"the interrupted run in {e.out_dir} kept no checkpoint "
                                                     "(it starts again); ")
        raise KeyboardInterrupt(f"{where}the finished runs in {out} are kept; the same race with --out-dir {out} "
                                "continues it") from None
    print(f"race report: {Path(out) / 'race.json'}, plot: {Path(out) / 'race.png'}")
    return 0


def cmd_reference_losses(args: argparse.Namespace) -> int:
    from .checkpoint import refuse_overwriting_a_run
    from .generate import run_directory
    from .reference_losses import header_path
    from .trainer import load_run_corpus, resolve_device

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "ckpt", "out", "config", "context")}
    cfg = build_config(flags.pop("preset", None), args.config, flags)
    run_directory(args.ckpt)  # a missing run refused before the corpus is read
    refuse_overwriting_a_run(args.out)  # a run's own file named first: the more telling refusal
    # as corpus filter refuses an existing --out: a finished sidecar is never replaced unasked (one without
    # its header is what a killed run left, written again, as bench/race_noisy_domain.sh expects)
    if Path(args.out).is_file() and header_path(args.out).is_file():
        raise ConfigError(f"--out {args.out} exists; delete it or give a new path")
    if args.context is not None and args.context < 0:  # its upper bound (the run's seq_len) is checked with the run
        raise ConfigError(f"--context must be >= 0, got {args.context}")
    out = _write_run_losses(args.ckpt, load_run_corpus(cfg), args.out, cfg.batch_size, resolve_device(cfg.device),
                            cfg.dtype, args.context, "reference")
    print(f"train with --reference-losses {out}")
    return 0


def _write_run_losses(ckpt: str | Path, corpus: Any, out: str | Path, batch_size: int, device: torch.device,
                      dtype: str, context: int | None, role: str) -> Path:
    """The sidecar of the run at ``ckpt`` (its newest weights)'s loss of every train token of ``corpus``, with the
    run's training seconds in its header; what ``reference-losses`` and ``corpus filter --scorer`` write. A run of
    another vocabulary or tokenizer than the corpus's is refused, named by its ``role``."""
    from .checkpoint import CKPT_NAME, refuse_other_tokenizer, refuse_overwriting_a_run
    from .generate import load_model, run_directory

    refuse_overwriting_a_run(out)
    if not str(out) or Path(out).is_dir():
        raise SparsetrainError(f"--out {str(out)!r} is {'a folder' if str(out) else 'empty'}; give the sidecar's file path")
    from .plotting import read_metrics
    from .reference_losses import compute_reference_losses, header_path
    from .trainer import autocast_dtype

    run = run_directory(ckpt)
    model = load_model(ckpt, device)
    # a BPE trained on a small corpus learns fewer tokens than its run's vocab_size: every id still fits
    if model.config.vocab_size < corpus.vocab_size:
        raise SparsetrainError(f"{role} {run} has vocab_size {model.config.vocab_size}, fewer than the corpus's "
                               f"{corpus.vocab_size}")
    refuse_other_tokenizer(run, corpus.tokenizer_path, role)
    trained = [r for r in read_metrics(run / "metrics.jsonl") if "train_seconds" in r]
    out = compute_reference_losses(model, corpus.train, out, batch_size, device, autocast_dtype(dtype, device),
                                   reference=str((run / CKPT_NAME).resolve()),  # names the run (one_time_cost)
                                   reference_train_seconds=trained[-1]["train_seconds"] if trained else None,
                                   context=context)
    seconds = json.loads(header_path(out).read_text())["seconds"]
    print(f"losses of {corpus.train.size:,} train tokens by {run} in {seconds:.1f} s of forwards -> {out}")
    return out


MAX_SAMPLES = 1024  # sparsetrain generate --num-samples: continuations decoded in one batch


def _check_seed(seed: int, end: int = 2**63, flag: str = "--seed") -> None:
    """Refuse a seed torch's and numpy's generators cannot take (``[0, end)``), in one line."""
    if not 0 <= seed < end:
        raise SparsetrainError(f"{flag} must be in [0, {end}), got {seed}")


def check_output_file(flag: str, value: str | None) -> None:
    """An output file named on the command line and written after the work (``--json``,
    ``--library``): refused before the work if it is a folder or its folder cannot hold
    a new file (the folder is created where missing, as the write would)."""
    if not value:
        return
    import tempfile

    path = Path(value)
    if path.is_dir():
        raise SparsetrainError(f"{flag} {value} is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise SparsetrainError(f"{flag} {value} cannot be written: {e.strerror or e}") from None


def _check_device(device: str, name: str = "device") -> None:
    """Refuse a device name the commands cannot place a model on, in one line naming it."""
    if not _valid_device(device):
        raise ConfigError(f"{name} must be auto, cpu, cuda or cuda:N, got {device!r}")


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import check_sampling, generate_texts

    from .trainer import resolve_device

    check_sampling(args.max_new_tokens, args.temperature, args.top_k)  # before the model loads
    _check_device(args.device)
    if not 1 <= args.num_samples <= MAX_SAMPLES:  # one batch: a bound before it meets the memory
        raise SparsetrainError(f"--num-samples must be in [1, {MAX_SAMPLES}], got {args.num_samples}")
    _check_seed(args.seed, 2**63 - args.num_samples + 1)  # seeds seed .. seed + num_samples - 1
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8 (surrogate escapes)
        raise SparsetrainError("--prompt is not UTF-8 text") from None
    device = str(resolve_device(args.device))
    texts = generate_texts(args.ckpt, args.prompt, args.num_samples, args.max_new_tokens, args.temperature, args.top_k,
                           args.seed, device)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i} (seed {args.seed + i}) ---")
        print(text)
    return 0


def bench_step_shape(preset: str, seq_len: int | None = None, batch_size: int | None = None) -> tuple[int, int]:
    """``(seq_len, batch_size)`` that ``sparsetrain bench step`` times: the given
    values, else the preset's own, with the default batch cut so that a step
    holds at most ``STEP_TOKENS_LIMIT`` tokens (the step shape every bench times
    on one GPU)."""
    cfg = build_config(preset)
    seq = seq_len if seq_len is not None else cfg.model.seq_len
    batch = batch_size if batch_size is not None else max(1, min(cfg.batch_size, STEP_TOKENS_LIMIT // seq))
    return seq, batch


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench_step import bench_train_step
    from .benchmark import environment

    for name in ("seq_len", "batch_size", "repeats"):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= MAX_SIZE:
            raise SparsetrainError(f"--{name.replace('_', '-')} must be in [1, {MAX_SIZE}], got {value}")
    check_output_file("--json", args.json)
    seq, batch = bench_step_shape(args.preset, args.seq_len, args.batch_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    repeats = args.repeats if args.repeats is not None else STEP_REPEATS[device]
    warmup = STEP_WARMUP[device]
    print(f"timing {args.preset}: seq {seq} x batch {batch} ({seq * batch:,} tokens per step), "
          f"{'compiled' if args.compile else 'eager'}, on {device}: {warmup} warm-up + {repeats} timed steps", flush=True)
    result = bench_train_step(args.preset, seq, batch, args.compile, warmup=warmup, repeats=repeats, device=device)
    result = {"environment": environment(), **result}
    if args.json:
        from .checkpoint import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2))
    mfu = f", MFU {result['mfu_vs_datasheet']:.1%}" if "mfu_vs_datasheet" in result else ""
    print(f"{args.preset} seq {seq} batch {batch}: step {result['step']['median_ms']:.1f} ms, "
          f"{result['tokens_per_s']:,.0f} tokens/s, {result['achieved_tflops']:.1f} TFLOP/s{mfu}")
    return 0


def cmd_fire(args: argparse.Namespace) -> int:
    import shutil
    from dataclasses import asdict

    from .checkpoint import CKPT_NAME, WEIGHTS_NAME, save_checkpoint, save_weights
    from .fire import reinitialize
    from .generate import model_from_tensors
    from .sharded_checkpoint import load_training_state

    if not (math.isfinite(args.tol) and args.tol > 0) or args.max_iters < 1:  # nan passes "<= 0"
        raise SparsetrainError(f"--tol must be a finite number > 0 and --max-iters >= 1, got {args.tol} and {args.max_iters}")
    state, folder = load_training_state(args.ckpt)  # an FSDP run's sharded checkpoint consolidated
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SparsetrainError(f"{out} is not an empty directory; pick another --out")
    if state["model_config"].get("arch") == "resnet_bk":
        raise SparsetrainError(f"{args.ckpt} is a model.arch = resnet_bk run: FIRE reinitialises nn.Linear weights, "
                               "and its [E, out, in] expert stacks would silently keep theirs; not available")
    if (folder / "config.toml").is_file():  # copied into the new run, whose --resume must read it
        read_toml(folder / "config.toml")
    model = model_from_tensors(state["model_config"], state["model"], str(folder), "cpu")
    stats = reinitialize(model, args.tol, args.max_iters)
    state["model"] = model.state_dict()
    optimizer = state["optimizer"]
    for part in optimizer["combined"].values() if "combined" in optimizer else [optimizer]:
        part["state"] = {}  # the moments described the old weights (every part of Muon's combined optimizer)
    out.mkdir(parents=True, exist_ok=True)
    # config.toml names no out_dir: the new run's is its own folder; data.json: what eval compares with
    for name in ("config.toml", "tokenizer.json", "data.json"):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
    save_checkpoint(out / CKPT_NAME, state)  # the checkpoint first, as the trainer saves
    save_weights(out / WEIGHTS_NAME, state["model"], asdict(model.config), int(state["step"]))
    worst = max(s["orthogonality_error"] for s in stats)
    print(f"FIRE: {len(stats)} layers reinitialised (max orthogonality error {worst:.2e}, "
          f"{sum(s['method'] == 'svd' for s in stats)} SVD fallbacks) -> {out}; continue with: "
          f"sparsetrain train --resume {out} --data NEW_DATA --tokenizer {out / 'tokenizer.json'}")
    return 0


def cmd_grpo(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .evaluate import held_out_code_files, load_run
    from .generate import check_sampling
    from .grpo import (ArithmeticTask, CompileTask, ExperienceLibrary, GRPOSettings, Task, measure_seed, model_generate,
                       summarize)
    from .trainer import autocast_dtype, resolve_device

    for name in ("seeds", "max_size", "experience_lines"):  # the rest is checked where it is used, by its name
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SparsetrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    # seed s samples from streams 2 s and 2 s + 1: every seed of the run below 2**62
    _check_seed(args.seed, 2**62 - args.seeds + 1)
    settings = GRPOSettings(args.rounds, args.train_prompts, args.test_prompts, args.group_size, args.context_items)
    settings.validate()  # before the model loads
    check_sampling(args.max_new_tokens, args.temperature, args.top_k)
    _check_device(args.device)
    for flag, value in (("--library", args.library), ("--json", args.json)):  # written at the end: checked first
        check_output_file(flag, value)
    lib_path = Path(args.library) if args.library else None
    if lib_path and lib_path.is_file():
        start = ExperienceLibrary.load(lib_path)
        if args.max_size is not None and args.max_size != start.max_size:  # the file's capacity is the library's
            raise SparsetrainError(f"--max-size {args.max_size} differs from the capacity {start.max_size} of the "
                                   f"existing library {lib_path}; drop the flag or use a new --library file")
    else:
        start = ExperienceLibrary(64 if args.max_size is None else args.max_size)

    device = resolve_device(args.device)
    run = load_run(args.ckpt, str(device))
    if run.tokenizer is None:
        raise SparsetrainError(f"no tokenizer.json in {run.tokenizer_path.parent}: the run's text cannot be sampled")
    cfg = run.cfg
    task: Task
    if args.task == "compile":
        files = held_out_code_files(cfg.data, cfg.val_fraction, cfg.data_include, cfg.data_exclude, cfg.data_max_bytes)
        task = CompileTask(files, args.experience_lines)
    else:
        task = ArithmeticTask()
    make_generate = model_generate(run.model, run.tokenizer, context_tokens=args.context_tokens,
                                   prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_k=args.top_k,
                                   autocast_dtype=autocast_dtype(cfg.dtype, device))

    def write_json(results: list, partial: bool) -> None:
        """The report of the seeds measured so far: after each seed (``partial`` until the
        last), so a run stopped midway keeps its finished seeds."""
        from .benchmark import environment
        from .checkpoint import atomic_write_text

        report = {"environment": environment(), "checkpoint": str(args.ckpt), "task": args.task,
                  "settings": {k: v for k, v in vars(args).items() if k not in ("json", "command")},
                  "seeds": [{**asdict(r), "difference": r.difference} for r in results], "summary": summarize(results)}
        if partial:
            report["partial"] = {"seeds_finished": len(results), "seeds": args.seeds}
        atomic_write_text(args.json, json.dumps(report, indent=2))

    results = []
    for k in range(args.seeds):
        seed = args.seed + k
        library = start.copy()
        result = measure_seed(task, make_generate, library, seed, settings, on_round=lambda r: print(
            f"seed {seed} round {r['round']}: mean reward {r['mean_reward']:.3f}, library size {r['library_size']}",
            flush=True))
        results.append(result)
        if lib_path:
            library.save(lib_path if args.seeds == 1 else lib_path.with_name(f"{lib_path.stem}.seed{seed}{lib_path.suffix}"))
        w, o = result.with_library, result.without_library
        print(f"seed {seed}: held-out success without the library {o.rate:.3f} ({o.successes}/{o.n}, Wilson 95% "
              f"[{o.low:.3f}, {o.high:.3f}]), with it {w.rate:.3f} ({w.successes}/{w.n}, [{w.low:.3f}, {w.high:.3f}]); "
              f"{result.library_size} library items", flush=True)
        if args.json:
            write_json(results, partial=k < args.seeds - 1)
    summary = summarize(results)
    o, w, d = summary["without_library"], summary["with_library"], summary["difference"]
    print(f"{args.task} over {len(results)} seed(s), mean +- std: without the library {o['mean']:.3f} +- {o['std']:.3f}, "
          f"with it {w['mean']:.3f} +- {w['std']:.3f}, difference {d['mean']:+.3f} +- {d['std']:.3f} "
          f"(min {d['min']:+.3f}, max {d['max']:+.3f})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    out = export_run(args.ckpt, args.format, args.out, force=args.force, dtype=args.dtype)
    print(f"exported {args.ckpt} as {args.format} ({args.dtype}) -> {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run

    for name in ("samples", "max_tokens"):
        if getattr(args, name) < 0:
            raise SparsetrainError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise SparsetrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    _check_seed(args.seed)
    _check_device(args.device)
    check_output_file("--json", args.json)
    from .trainer import resolve_device

    device = str(resolve_device(args.device))  # cuda on a machine without it: one line, before the model loads
    report = evaluate_run(args.ckpt, data=args.data, samples=args.samples, max_new_tokens=args.max_new_tokens,
                          max_tokens=args.max_tokens, batch_size=args.batch_size, temperature=args.temperature,
                          top_k=args.top_k, seed=args.seed, device=device)
    print(report.summary())
    if args.json:
        from .benchmark import environment

        from .checkpoint import atomic_write_text

        atomic_write_text(args.json, json.dumps({"environment": environment(), "checkpoint": str(args.ckpt),
                                                 "settings": {k: v for k, v in vars(args).items() if k != "json"},
                                                 **report.to_dict()}, indent=2))
    return 0


def cmd_corpus(args: argparse.Namespace) -> int:
    from .corpora import CorpusSpec, build_corpus

    if args.corpus_kind == "filter":
        return _corpus_filter(args)

    kinds = tuple(k.strip() for k in args.noise_kinds.split(",") if k.strip())
    build_corpus(CorpusSpec(src=args.src, out=args.out, include=args.include, exclude=args.exclude,
                            max_bytes=args.max_bytes, val_fraction=args.val_fraction, noise_fraction=args.noise_fraction,
                            noise_kinds=kinds, noise_placement=args.noise_placement,
                            duplicate_fraction=args.duplicate_fraction, seed=args.seed,
                            disjoint_from=args.disjoint_from))
    return 0


def _corpus_filter(args: argparse.Namespace) -> int:
    from .corpus_filter import check_drop, check_out, check_random_seed, filter_corpus
    from .data import load_corpus
    from .tokenizer import BPETokenizer

    check_drop(args.drop)  # the checks of the arguments first, before the corpus is tokenized
    if args.random_seed is not None:
        check_random_seed(args.random_seed)
    if sum(map(bool, (args.reference_losses, args.scorer, args.random_seed is not None))) != 1:
        raise ConfigError("give one of --reference-losses FILE (a sidecar of sparsetrain reference-losses), "
                          "--scorer RUN (a run that scores the corpus first) and --random-seed SEED (the control)")
    ckpt = None
    if args.scorer:
        from .generate import run_directory

        ckpt = run_directory(args.scorer)
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
        _check_device(args.device, "--device")
    tokenizer = args.tokenizer or (str(ckpt / "tokenizer.json") if ckpt is not None else None)
    if tokenizer is None:
        needs = "--reference-losses" if args.reference_losses else "--random-seed"
        raise ConfigError(f"{needs} needs --tokenizer, the tokenizer.json the corpus is tokenized with")
    if not Path(tokenizer).is_file():
        raise ConfigError(f"--tokenizer {tokenizer} is not a file")
    if not args.corpus:  # Path("") is the current folder, and data "" the Python standard library
        raise ConfigError("--corpus must not be empty (give the corpus folder; . for the current one)")
    if not Path(args.corpus).is_dir():
        raise ConfigError(f"--corpus {args.corpus} is not a folder")
    check_out(Path(args.corpus), args.out)
    cfg = build_config(None, None, {"data": args.corpus, "tokenizer": tokenizer, "val_fraction": args.val_fraction})
    corpus = load_corpus(args.corpus, BPETokenizer.load(tokenizer).vocab_size, args.val_fraction, cfg.cache_dir,
                         cfg.token_dtype, tokenizer)
    sidecar = args.reference_losses
    if ckpt is not None:
        from .trainer import resolve_device

        sidecar = _write_run_losses(args.scorer, corpus, str(Path(args.out)) + ".losses.f16", args.batch_size,
                                    resolve_device(args.device), cfg.dtype, 0, "scorer")
    filter_corpus(corpus, sidecar, args.drop, args.out, random_seed=args.random_seed, val_fraction=args.val_fraction)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .benchmark import environment

    env = environment()
    import tokenizers

    env["tokenizers"] = tokenizers.__version__
    env["presets"] = ", ".join(list_presets())
    width = max(map(len, env))
    for k, v in env.items():
        print(f"{k:<{width}}  {v}")
    return 0


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser that handled ``argv``: follows the subcommand names in it."""
    for token in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs and token in subs[0].choices:
            parser = subs[0].choices[token]
    return parser


def typed_flags(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, str]:
    """``{config key: the flag the user typed for it}`` for the flags in ``argv``
    (abbreviations expanded; ``--drop-ratio`` stands for the two keys it sets)."""
    options = _command_parser(parser, argv)._option_string_actions
    typed: dict[str, str] = {}
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        if name not in options:  # an abbreviation argparse accepted
            full = [o for o in options if o.startswith(name)]
            if len(full) != 1:
                continue
            name = full[0]
        typed[options[name].dest] = name
    if "drop_ratio" in typed:
        typed["collider_sparsity"] = typed["use_collider"] = typed.pop("drop_ratio")
    return typed


def name_typed(message: str, typed: dict[str, str]) -> str:
    """Write the config keys a message names (``lr``, ``training.lr``) as the flags the
    user typed for them (``--lr``); keys set elsewhere (a TOML file) stay as they are."""
    sections = "|".join(SECTIONS)
    for key, flag in sorted(typed.items(), key=lambda kv: -len(kv[0])):
        # not inside a longer name: a file such as data.json, a folder of a path (/tmp/data/x) or an item of
        # a race arm quoted back ('x:out_dir=...') is not the key as typed
        pattern = rf"(?<![\w.'\"/\\:,=-])(?:(?:{sections})\.)?{re.escape(key)}(?![\w/\\-]|\.\w)"
        message = re.sub(pattern + " = ", lambda _: flag + " ", message)  # "ffn = relu2_24" -> "--ffn relu2_24"
        message = re.sub(pattern, lambda _: flag, message)
    return message


def _error(message: str) -> int:
    _say_error(f"sparsetrain: error: {message}")
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # the flags' defaults resolve the default preset, which reads SPARSETRAIN_* variables
        parser = build_parser()
    except SparsetrainError as e:
        return _error(str(e))
    args = parser.parse_args(argv)
    handler = {"train": cmd_train, "race": cmd_race, "race-merge": cmd_race_merge, "reference-losses": cmd_reference_losses, "generate": cmd_generate,
               "eval": cmd_eval, "export": cmd_export, "bench": cmd_bench, "fire": cmd_fire, "grpo": cmd_grpo,
               "corpus": cmd_corpus, "info": cmd_info}[args.command]
    try:
        return handler(args)
    except ConfigError as e:  # names a setting: the flag where the user typed one
        return _error(name_typed(str(e), typed_flags(parser, argv)))
    except SparsetrainError as e:
        return _error(str(e))
    except OSError as e:  # a full disk, a read-only or vanished folder: the user's to fix
        where = f": {e.filename}" if e.filename else ""
        return _error(f"{e.strerror or e}{where}")
    except (MemoryError, RuntimeError, ValueError) as e:  # torch.OutOfMemoryError is a RuntimeError
        from .data import allocation_asked, out_of_memory

        if not out_of_memory(e):
            raise
        asked = allocation_asked(e)  # outside the batch's own check (data.memory_named_by_batch)
        return _error(f"out of memory{f' (an allocation of {asked} failed)' if asked else ''}")
    except KeyboardInterrupt as e:  # train and race say what is kept and how to go on
        sys.stderr.write(f"sparsetrain: interrupted{f' ({e})' if str(e) else ''}\n")
        return 130
