"""Equal wall-clock races: several arms, each trained for the same training seconds.

A race is a base config (preset, ``--config``, flags) and arms, each a name and
config overrides (``collider50:drop_ratio=0.5,collider_method=topk``). Every arm
runs once per seed for ``seconds`` of training after its start-up
(:mod:`sparsetrain.train_clock`), with the learning rate decaying to its floor at
that budget (``schedule_by = "time"``) and held-out evaluations every
``eval_every_seconds``. Arms of one seed share the initialisation and the data
order (both are functions of the seed). The runs are interleaved, ``A B C`` for
the first seed, ``C B A`` for the next, and so on, so that a device warming up or
drifting over the race weighs on every arm alike.

Each run is an ordinary run directory, ``<race>/<arm>/seed<seed>``: a killed race
run again with the same settings skips the finished runs (they hold
``race_done.json``), resumes the interrupted one from its checkpoint, and starts
the rest. The report (``race.json``, ``race.png``, ``race_full.png`` and a table)
gives per arm the final held-out loss and bits per byte with their spread over
seeds; the best (lowest) held-out loss and when it happened (a run that overfits
repeated data peaks before its end); the training seconds each run needed to reach
two targets, the first arm's mean final loss and its mean best loss (linear
interpolation on its evaluation curve, with and without start-up; None where
never reached); paired with the first arm's run of the same seed (same initial
weights and batches), the final loss minus the first arm's and the time to the
first arm's final loss as a fraction of its training seconds; the steps; the
tokens forwarded and back-propagated; and, for
token-filtering arms on a ``corpus build`` corpus, the share of each kind of
document's tokens the selector kept (``kept_share``, the mean over the logged
steps of metrics.jsonl's ``kept_share/<kind>``) and each kind's share of the
batches (``batch_share``).

An arm whose inputs a reference model made (a ``reference_losses`` sidecar, or
``data`` that ``sparsetrain corpus filter`` wrote) carries a one-time cost paid
before any of its runs: the reference's training, its forwards over the corpus
and the filter, read from the records those steps leave (:func:`one_time_cost`).
The report gives it per arm and the time to the target with it added; dense
pays none.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import CKPT_NAME, atomic_write_text
from .config import TrainConfig, build_config, preset_dict, read_toml, refuse_inert_settings
from .corpora import MANIFEST_NAME
from .data import check_filtered_split, discover_text_files, read_documents, split_text_corpus
from .errors import ConfigError, DataError
from .optimizers import require_packages
from .plotting import read_metrics

SPEC_NAME = "race_spec.json"
REPORT_NAME = "race.json"
PLOT_NAME = "race.png"
FULL_PLOT_NAME = "race_full.png"  # the same with the whole y-range, from the start-up loss down
DONE_NAME = "race_done.json"
# the race's own settings, applied unless the config file, a flag or an arm sets them
RACE_DEFAULTS = ("max_steps", "schedule_by", "eval_every", "eval_every_seconds")
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# per kind of document, metrics.jsonl's kept_share/<kind> and batch_share/<kind> (sparsetrain.token_labels)
SHARE_PREFIXES = ("kept_share", "batch_share")


@dataclass(frozen=True)
class Arm:
    """One contestant: a name (its folder) and config overrides on the base config."""

    name: str
    overrides: dict[str, str]


def parse_arm(spec: str) -> Arm:
    """``NAME:KEY=VALUE,KEY=VALUE`` (``NAME:`` for the base config unchanged). Keys are
    config fields (``-`` or ``_``); ``drop_ratio=R`` is the train command's shortcut
    for ``use_collider=true,collider_sparsity=R``. A field set twice is refused, also
    through ``drop_ratio``."""
    name, sep, rest = spec.partition(":")
    if not sep or not ARM_NAME.match(name):
        raise ConfigError(f"--arm {spec!r} must be NAME:KEY=VALUE,... with a NAME of letters, digits, _ . + -")
    overrides: dict[str, str] = {}
    set_by: dict[str, str] = {}  # field -> the key that set it (drop_ratio sets two)
    # an empty item (``a,,b``, a trailing comma) or a key given twice is refused, not
    # skipped or settled by the last: either is a typo whose arm would race another config
    for item in (s.strip() for s in rest.split(",")) if rest.strip() else ():
        if not item:
            raise ConfigError(f"--arm {spec!r}: an empty item (two commas, or a comma at the end)")
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--arm {spec!r}: {item!r} is not KEY=VALUE")
        key = key.strip().replace("-", "_")
        if key in ("out_dir", "seed"):
            raise ConfigError(f"--arm {spec!r}: the race sets {key} itself")
        if key == "preset":  # build_config takes the race's preset over it
            raise ConfigError(f"--arm {spec!r}: an arm keeps the race's --preset; set the fields it changes "
                              "(n_layer=..., d_model=...) instead")
        value = value.strip()
        sets = {"use_collider": "true", "collider_sparsity": value} if key == "drop_ratio" else {key: value}
        for field in sorted(sets.keys() & overrides.keys()):
            twice = key if set_by[field] == key else f"{field} (drop_ratio sets it)"  # the field and the shortcut
            raise ConfigError(f"--arm {spec!r}: {twice} is given twice")
        overrides.update(sets)
        set_by.update(dict.fromkeys(sets, key))
    return Arm(name, overrides)


def interleave_order(n_arms: int, n_seeds: int) -> list[tuple[int, int]]:
    """``(seed index, arm index)`` in running order: arms forward for even seed
    indices, backward for odd ones (A B C, C B A, A B C, ...)."""
    order = []
    for s in range(n_seeds):
        arms = range(n_arms) if s % 2 == 0 else range(n_arms - 1, -1, -1)
        order += [(s, a) for a in arms]
    return order


def time_to_target(times: list[float], losses: list[float], target: float) -> float | None:
    """The first time the curve ``losses(times)`` reaches ``target`` or below, linearly
    interpolated between the two evaluations around the crossing; None if it never does."""
    for i, (t, loss) in enumerate(zip(times, losses)):
        if loss <= target:
            if i == 0:
                return t
            t0, l0 = times[i - 1], losses[i - 1]
            return t0 + (t - t0) * (l0 - target) / (l0 - loss)
    return None


def loss_at_step(steps: list[int], losses: list[float], step: int) -> float | None:
    """The curve ``losses(steps)`` at ``step``, linearly interpolated between the two
    evaluations around it; None past the last evaluation."""
    for i, (s, loss) in enumerate(zip(steps, losses)):
        if s >= step:
            if s == step or i == 0:
                return loss
            s0, l0 = steps[i - 1], losses[i - 1]
            return l0 + (loss - l0) * (step - s0) / (s - s0)
    return None


def arm_configs(arms: list[Arm], seconds: float, seeds: list[int], out_dir: Path, preset: str | None,
                config_file: str | None, flags: dict[str, Any]) -> dict[str, dict[int, TrainConfig]]:
    """Resolve every run's config: defaults < preset < config file < the race's settings
    (:data:`RACE_DEFAULTS`, where the file, a flag or the arm does not set them) < flags
    < the arm's overrides; then the run's seed and folder. Every arm is validated
    before anything runs."""
    if seconds <= 0 or not math.isfinite(seconds):
        raise ConfigError(f"--seconds must be a positive number, got {seconds}")
    if not arms:
        raise ConfigError("a race needs at least one --arm")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"arm names must differ, got {', '.join(names)}")
    in_file = {k for table in (read_toml(config_file) if config_file else {}).values() if isinstance(table, dict)
               for k in table}
    race = {"max_seconds": seconds, "max_steps": 0, "schedule_by": "time", "eval_every": 0,
            "eval_every_seconds": seconds / 10}
    out: dict[str, dict[int, TrainConfig]] = {}
    checked: set[tuple] = set()  # the data selections found to hold something to train on
    for arm in arms:
        given = in_file | set(flags) | set(arm.overrides)
        layers = {k: v for k, v in race.items() if k == "max_seconds" or k not in given}
        out[arm.name] = {}
        for seed in seeds:
            overrides = {**layers, **flags, **arm.overrides, "seed": seed,
                         "out_dir": str(out_dir / arm.name / f"seed{seed}")}
            try:
                out[arm.name][seed] = build_config(preset, config_file, overrides)
                # the arm's own items only: the race's flags may hold one technique's settings for the arms that use it
                refuse_inert_settings(out[arm.name][seed], arm.overrides)
                _refuse_steps_on_the_clock(out[arm.name][seed])
            except ConfigError as e:
                raise ConfigError(f"arm {arm.name}: {e}") from None
        # the files and packages an arm needs, found before the first arm runs (not after the earlier arms' budgets)
        for cfg in out[arm.name].values():
            try:
                require_packages(cfg)
            except ConfigError as e:
                raise ConfigError(f"arm {arm.name}: {e}") from None
            for name in ("data", "tokenizer", "init_from", "reference_losses", "reference_ckpt"):
                path = getattr(cfg, name)
                if path and not Path(path).exists():
                    raise ConfigError(f"arm {arm.name}: {name} {path} does not exist")
            selection = (cfg.data, cfg.data_include, cfg.data_exclude, cfg.data_max_bytes, cfg.val_fraction)
            if selection not in checked:  # arms and seeds sharing a corpus scan it once
                try:
                    _check_data(cfg)
                except DataError as e:
                    raise ConfigError(f"arm {arm.name}: {e}") from None
                checked.add(selection)
    by_steps = {name: any(c.max_steps > 0 for c in runs.values()) for name, runs in out.items()}
    if len(set(by_steps.values())) > 1:
        steps_arms = ", ".join(n for n, s in by_steps.items() if s)
        time_arms = ", ".join(n for n, s in by_steps.items() if not s)
        raise ConfigError(f"a race is at equal seconds or at equal steps, not both: {steps_arms} set max_steps and "
                          f"{time_arms} do not (give every arm max_steps, or none)")
    return out


def _refuse_steps_on_the_clock(cfg: TrainConfig) -> None:
    """A step limit needs the step schedule: on the race's time schedule a run that
    reaches its steps first stops before its lr has decayed."""
    if cfg.max_steps > 0 and cfg.schedule_by != "steps":
        raise ConfigError(f"max_steps={cfg.max_steps} in a race needs schedule_by = \"steps\" (--schedule-by steps): "
                          "on the race's time schedule a run that reaches its steps first stops before its lr has "
                          "decayed; for a race in time, give --seconds alone")


def _check_data(cfg: TrainConfig) -> None:
    """Refuse a corpus the run would find empty, before any arm trains: a race stopped
    there would strand the arms trained before it (the folder refuses other arms).
    No tokenizing (the files are read once per distinct selection, as the trainer
    reads them at every start): a ``.bin`` must hold bytes, a text selection (``data``,
    ``data_include``, ``data_exclude``, ``data_max_bytes``) at least one text file, and
    a folder built or filtered at a val_fraction must be read at one no larger
    (:func:`~sparsetrain.data.check_filtered_split`), and the text must split into a
    train and a held-out side (:func:`~sparsetrain.data.split_text_corpus`: files of
    whitespace only, or too little text, are refused). The files are read but not
    tokenized, so a split too short for a sequence is still found when its arm starts."""
    if cfg.data.endswith(".bin"):  # as load_corpus tells them apart
        path = Path(cfg.data)
        if not path.is_file():
            raise DataError(f"data {cfg.data} is not a file of tokens")
        if path.stat().st_size == 0:
            raise DataError(f"data {cfg.data} is empty: no tokens to train on")
        return
    if not (cfg.data or cfg.data_include or cfg.data_exclude or cfg.data_max_bytes):
        return  # the whole standard library: never empty, and thousands of files to walk
    root, files = discover_text_files(cfg.data or None, cfg.data_include, cfg.data_exclude, cfg.data_max_bytes)
    if not files:
        raise DataError(f"data {cfg.data or root} holds no text file (a hidden or binary file does not count)")
    if root.is_dir():
        check_filtered_split(root, cfg.val_fraction)
    split_text_corpus(read_documents(root, files), cfg.val_fraction, cfg.data or str(root))


def _base_seed(preset: str | None, config_file: str | None) -> int:
    """The seed the base config sets (config file over preset over the default)."""
    for layer in ((read_toml(config_file) if config_file else {}), (preset_dict(preset) if preset else {})):
        run = layer.get("run", {})
        if not isinstance(run, dict):
            raise ConfigError(f"[run] of {config_file or preset} is not a table")
        if "seed" in run:
            seed = run["seed"]
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ConfigError(f"run.seed must be an integer, got {seed!r}")
            return seed
    return TrainConfig().seed


def git_commit() -> str | None:
    """The sparsetrain source's commit as one string (``+dirty`` with uncommitted
    changes), or None: :func:`sparsetrain.benchmark.git_commit_label`, a bad
    ``$SPARSETRAIN_GIT_COMMIT`` refused as a :class:`ConfigError`."""
    from .benchmark import git_commit_label

    try:
        return git_commit_label()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_spec(out_dir: Path, spec: dict) -> None:
    """A race folder holds one race: refuse to mix settings into it (reads only)."""
    path = out_dir / SPEC_NAME
    if not path.is_file() and out_dir.is_dir() and any(out_dir.iterdir()):
        raise ConfigError(f"--out-dir {out_dir} holds other files and no race; give a new or empty folder "
                          "(or the folder of the same race, to continue it)")
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if not isinstance(old, dict) or not isinstance(old.get("configs"), dict):
                raise ValueError("no configs")
        except (ValueError, UnicodeDecodeError):
            raise ConfigError(f"race folder {out_dir} holds an unreadable {SPEC_NAME}; pick another --out-dir") from None
        for key in ("seconds", "seeds", "arms"):
            if old.get(key) != spec[key]:
                raise ConfigError(f"race folder {out_dir} holds a race with other {key} "
                                  f"({old.get(key)!r} there vs {spec[key]!r} here); pick another --out-dir")
        for name, cfg in spec["configs"].items():
            if old["configs"].get(name) != cfg:
                diff = _first_difference(old["configs"].get(name) or {}, cfg)
                raise ConfigError(f"race folder {out_dir} holds arm {name} with another config ({diff}); "
                                  "pick another --out-dir")


def _write_spec(out_dir: Path, spec: dict) -> None:
    """Record the race's settings in its folder (what :func:`_check_spec` compares)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / SPEC_NAME, json.dumps(spec, indent=2))


def _first_difference(old: dict, new: dict, where: tuple[str, str] = ("there", "here")) -> str:
    """The first setting that differs between two configs' dicts, as ``key=OLD <where[0]>
    vs NEW <where[1]>``."""
    for sec in sorted(set(old) | set(new)):
        for key in sorted(set(old.get(sec, {})) | set(new.get(sec, {}))):
            a, b = old.get(sec, {}).get(key), new.get(sec, {}).get(key)
            if a != b:
                return f"{key}={a!r} {where[0]} vs {b!r} {where[1]}"
    return "none"


def _config_for_spec(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    d["run"] = {k: v for k, v in d["run"].items() if k not in ("out_dir", "seed")}
    return d


def run_one(cfg: TrainConfig, verbose: bool = True) -> str:
    """Run (or resume, or skip) one race run in ``cfg.out_dir``. Returns what it did."""
    import torch

    from .trainer import Trainer

    run = Path(cfg.out_dir)
    if (run / DONE_NAME).is_file():
        return "done before"
    resume = run if (run / CKPT_NAME).is_file() else None
    if resume is None and run.exists():
        shutil.rmtree(run)  # a start killed before its first checkpoint: its rows would mix in
    trainer = Trainer(cfg, resume=resume, verbose=verbose)
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        raise trainer.interrupted() from None  # names the checkpoint the race's next start continues from
    atomic_write_text(run / DONE_NAME, json.dumps({"steps": result.steps_done, "train_seconds": result.train_seconds,
                                                   "startup_seconds": result.startup_seconds}))
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # every arm traces afresh (the on-disk inductor and Triton caches persist)
    return "resumed" if resume is not None else "ran"


def _prepare_race(arms: list[Arm], seconds: float, n_seeds: int, out: Path, preset: str | None,
                  config_file: str | None, flags: dict[str, Any] | None) -> tuple[list[int], dict, dict]:
    """Everything a race checks before its first run, for the race and its plan alike:
    one process, a seed count, the commit variable, every arm's config resolved and
    validated, and the folder holding no other race (nothing written). Returns the
    seeds, the configs and the spec the race records."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("sparsetrain race runs in one process; start it without torchrun")
    if n_seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {n_seeds}")
    git_commit()  # a bad SPARSETRAIN_GIT_COMMIT is refused before any run, not at the report
    flags = dict(flags or {})
    base_seed = int(flags.pop("seed", _base_seed(preset, config_file)))
    seeds = [base_seed + i for i in range(n_seeds)]
    configs = arm_configs(arms, seconds, seeds, out, preset, config_file, flags)
    spec = {"seconds": seconds, "seeds": seeds, "arms": {a.name: a.overrides for a in arms},
            "configs": {a.name: _config_for_spec(configs[a.name][seeds[0]]) for a in arms}}
    _check_spec(out, spec)
    return seeds, configs, spec


def race_plan(arms: list[Arm], seconds: float, n_seeds: int, out_dir: str | Path, preset: str | None = None,
              config_file: str | None = None, flags: dict[str, Any] | None = None) -> str:
    """What :func:`run_race` with the same arguments would run, without running it:
    the race's checks made (a refusal is raised as the race would raise it), each
    arm's resolved differences from the first arm's, the seeds, the running order
    and the training seconds (start-up and evaluations come on top)."""
    seeds, configs, _ = _prepare_race(arms, seconds, n_seeds, Path(out_dir), preset, config_file, flags)
    first = _config_for_spec(configs[arms[0].name][seeds[0]])
    head = f"race plan: {len(arms)} arm(s) x {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), "
    steps = sorted({c.max_steps for runs in configs.values() for c in runs.values()})
    if steps[0] > 0:  # a race at equal steps: the step limit ends every run, the seconds only cap it
        each = f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
        head += (f"{each} steps each (at most {seconds:g} s of training after start-up), plus each run's start-up "
                 f"and evaluations; into {out_dir}")
    else:
        head += (f"{seconds:g} s of training each after start-up: {len(arms) * len(seeds) * seconds:g} s of training "
                 f"in all, plus each run's start-up and evaluations; into {out_dir}")
    lines = [head]
    for arm in arms:
        mine = _config_for_spec(configs[arm.name][seeds[0]])
        diffs = [f"{key}={mine[sec][key]!r}" for sec in mine for key in mine[sec]
                 if first.get(sec, {}).get(key) != mine[sec][key]]
        what = ", ".join(diffs) if diffs else ("the target" if arm is arms[0] else "the same config as the target")
        lines.append(f"  {arm.name}: {what}")
    order = " ".join(f"{arms[a].name}/{seeds[s]}" for s, a in interleave_order(len(arms), len(seeds)))
    lines.append(f"  order: {order}")
    return "\n".join(lines)


def run_race(arms: list[Arm], seconds: float, n_seeds: int, out_dir: str | Path, preset: str | None = None,
             config_file: str | None = None, flags: dict[str, Any] | None = None, verbose: bool = True) -> dict:
    """Run every arm for every seed in interleaved order, then write and return the
    report (``race.json``, ``race.png`` in ``out_dir``)."""
    out = Path(out_dir)
    seeds, configs, spec = _prepare_race(arms, seconds, n_seeds, out, preset, config_file, flags)
    _write_spec(out, spec)
    order = interleave_order(len(arms), len(seeds))
    for i, (s, a) in enumerate(order, 1):
        name, seed = arms[a].name, seeds[s]
        if verbose:
            print(f"race {i}/{len(order)}: arm {name}, seed {seed}", flush=True)
        did = run_one(configs[name][seed], verbose)
        if verbose and did == "done before":
            print("  finished in an earlier start of this race: skipped", flush=True)
        if i < len(order):  # a race stopped later (a crash, a machine's time limit) keeps what it finished
            _write_partial_report(arms, configs, seeds, seconds, order[:i], out)
    return write_report(race_report(arms, configs, seeds, seconds, order), out, verbose)


def _write_partial_report(arms: list[Arm], configs: dict[str, dict[int, TrainConfig]], seeds: list[int],
                          seconds: float, done: list[tuple[int, int]], out: Path) -> None:
    """Write the report of the arms finished in every seed (marked ``partial``), once
    the first arm, the target, is among them, and only when the last run (``done[-1]``)
    finished an arm: the report changes then only; the full report replaces it."""
    finished = set(done)
    complete = [a for a in range(len(arms)) if all((s, a) in finished for s in range(len(seeds)))]
    if not complete or complete[0] != 0 or done[-1][1] not in complete:
        return
    index = {a: i for i, a in enumerate(complete)}
    report = race_report([arms[a] for a in complete], configs, seeds, seconds,
                         [(s, index[a]) for s, a in done if a in index])
    report["partial"] = {"arms_finished": [arms[a].name for a in complete],
                         "arms_left": [arm.name for a, arm in enumerate(arms) if a not in index]}
    write_report(report, out, verbose=False)


# ----------------------------------------------------------------------------- report


def one_time_cost(cfg: TrainConfig) -> dict:
    """What ``cfg``'s inputs cost once, before training: ``parts`` (seconds of the
    reference's training, its forwards over each sidecar, the corpus filter) and
    ``seconds``, their sum (0 where no reference made the inputs; None where a
    record predates the timing, so the cost is unknown). A reference counts once
    however many of the inputs it made, and its training not at all when it is
    the run the arms start from (``init_from``: the base scoring its own data)."""
    from .reference_losses import header_path
    from .reference_losses import one_time_cost as sidecar_cost

    sidecars, filtered = [], None
    if cfg.reference_losses:
        sidecars.append(Path(cfg.reference_losses))
    manifest = Path(cfg.data) / MANIFEST_NAME if cfg.data else None
    if manifest is not None and manifest.is_file():
        filtered = json.loads(manifest.read_text()).get("filtered")
        if filtered and filtered.get("reference_losses"):  # none for the random control
            sidecars.append(Path(filtered["reference_losses"]))
    parts: dict[str, float | None] = {}
    references = set()
    # a reference that is the arms' own starting run (init_from) was trained for every arm alike: no cost of its own
    start = Path(cfg.init_from).resolve() if cfg.init_from else None
    start = start.parent if start is not None and start.is_file() else start
    for path in dict.fromkeys(p.resolve() for p in sidecars):
        if not header_path(path).is_file():
            parts[f"reference losses {path.name}"] = None
            continue
        cost = sidecar_cost(path)
        reference = cost["reference"]
        if reference not in references:
            references.add(reference)
            shared = start is not None and bool(reference) and Path(reference).parent == start
            parts[f"reference training {Path(reference).parent.name or reference}"] = \
                0.0 if shared else cost["reference_training"]
        parts[f"reference losses {path.name}"] = cost["reference_losses"]
    if filtered:
        parts["corpus filter"] = filtered.get("seconds")
    known = all(v is not None for v in parts.values())
    return {"parts": parts, "seconds": float(sum(parts.values())) if known else None}


def run_summary(cfg: TrainConfig) -> dict:
    """What one finished run did, read from its metrics.jsonl."""
    rows = read_metrics(Path(cfg.out_dir) / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    if not train or not evals:
        raise ConfigError(f"run {cfg.out_dir} has no training or evaluation rows; delete it and run the race again")
    tokens_per_step = cfg.batch_size * cfg.model.seq_len * cfg.grad_accum
    last = evals[-1]
    best = min(evals, key=lambda r: r["val_loss"])  # the first of equal minima
    shares = {prefix: _mean_shares(train, prefix) for prefix in SHARE_PREFIXES}
    return {
        "seed": cfg.seed,
        "run_dir": cfg.out_dir,
        "steps": train[-1]["step"],
        "max_steps": cfg.max_steps,  # 0: the run's budget was seconds
        "train_seconds": last["train_seconds"],
        "startup_seconds": last.get("startup_seconds", 0.0),
        "train_seconds_after_startup": _after_startup(last),
        "startup_steps": cfg.startup_steps,
        "final_val_loss": last["val_loss"],
        "final_val_bpb": last.get("val_bpb"),
        # the lowest evaluation, where a run that overfits (repeated data) peaks before its end
        "best_val_loss": best["val_loss"],
        "best_val_bpb": best.get("val_bpb"),
        "best_step": best["step"],
        "best_seconds": {"after_startup": _after_startup(best), "with_startup": best["train_seconds"]},
        "final_minus_best_val_loss": last["val_loss"] - best["val_loss"],
        "final_lr": train[-1]["lr"],
        "floor_lr": cfg.lr * cfg.min_lr_ratio,
        "tokens_forwarded": train[-1]["step"] * tokens_per_step,
        "tokens_backpropagated": round(sum(r.get("kept_fraction", 1.0) for r in train) * tokens_per_step),
        "one_time": one_time_cost(cfg),
        **{prefix: v for prefix, v in shares.items() if v},
        # [seconds after start-up, seconds with start-up, val loss, val bits per byte, step]
        "evals": [[_after_startup(r), r["train_seconds"], r["val_loss"], r.get("val_bpb"), r["step"]] for r in evals],
    }


def _mean_shares(rows: list[dict], prefix: str) -> dict[str, float | None]:
    """Per kind, the mean over ``rows`` of their ``<prefix>/<kind>`` values (the rows
    without a value, a window that held no token of that kind, left out; None where
    none has one); empty where no row has such a key."""
    kinds: list[str] = []
    for r in rows:
        kinds += [k.split("/", 1)[1] for k in r if k.startswith(prefix + "/") and k.split("/", 1)[1] not in kinds]
    out: dict[str, float | None] = {}
    for kind in kinds:
        values = [r[f"{prefix}/{kind}"] for r in rows if r.get(f"{prefix}/{kind}") is not None]
        out[kind] = statistics.fmean(values) if values else None
    return out


def _mean_over_runs(runs: list[dict], key: str) -> dict[str, float | None] | None:
    """Per kind, the mean over ``runs`` of their ``key`` dicts (None for a kind some run
    has no value of); None where a run has no such dict."""
    if not runs or any(key not in r for r in runs):
        return None
    kinds = list(runs[0][key])
    return {k: statistics.fmean(r[key][k] for r in runs) if all(r[key].get(k) is not None for r in runs) else None
            for k in kinds}


def _after_startup(row: dict) -> float:
    return row.get("train_seconds_after_startup", row["train_seconds"])


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values or any(v is None for v in values):
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def step_ms(run: dict) -> float | None:
    """A run's mean step time after start-up, in ms (its training seconds after
    start-up over the steps taken after it): what tells whether a method's speed
    held on the machine it raced on. Runs summarised before ``startup_steps`` was
    recorded had the default, 1."""
    after = run["steps"] - run.get("startup_steps", 1)
    return 1000.0 * run["train_seconds_after_startup"] / after if after > 0 else None


def _times_to(runs: list[dict], target: float, key: str) -> dict[str, dict]:
    """Each run's seconds to ``target`` (after start-up, with it, and with start-up
    and the one-time cost where every run's is known), stored in the run under
    ``key``, and per clock their mean where every seed reached it and ``reached`` (k/n)."""
    costs = [one_time_seconds(r) for r in runs]
    times: dict[str, list[float | None]] = {"after_startup": [], "with_startup": []}
    if None not in costs:
        times["with_one_time"] = []
    for r, cost in zip(runs, costs):
        losses = [e[2] for e in r["evals"]]
        times["after_startup"].append(time_to_target([e[0] for e in r["evals"]], losses, target))
        times["with_startup"].append(time_to_target([e[1] for e in r["evals"]], losses, target))
        if "with_one_time" in times:
            t = times["with_startup"][-1]
            times["with_one_time"].append(None if t is None else t + cost)
        r[key] = {k: v[-1] for k, v in times.items()}
    return {k: _reached(v) for k, v in times.items()}


def one_time_seconds(run: dict) -> float | None:
    """A run's one-time cost in seconds (:func:`one_time_cost`); None where unknown,
    as for runs summarised before it was recorded."""
    return (run.get("one_time") or {}).get("seconds")


def _reached(per_seed: list[float | None]) -> dict:
    """Seeds' values to a target (None: never reached): their mean where every seed
    reached it, ``reached`` (k/n) and the values."""
    return {"mean": statistics.fmean(per_seed) if None not in per_seed else None,
            "reached": f"{sum(x is not None for x in per_seed)}/{len(per_seed)}", "per_seed": per_seed}


def _steps_to(runs: list[dict], target: float) -> dict:
    """Each run's optimizer steps to ``target`` (interpolated on its evaluations'
    steps, stored in the run as ``steps_to_target``), their mean where every seed
    reached it and ``reached`` (k/n): sample efficiency, apart from step speed."""
    steps: list[float | None] = []
    for r in runs:
        steps.append(time_to_target([e[4] for e in r["evals"]], [e[2] for e in r["evals"]], target))
        r["steps_to_target"] = steps[-1]
    return _reached(steps)


def _paired(runs: list[dict], first: list[dict]) -> dict[str, dict]:
    """Per seed, against the first arm's run of the same seed (same initial weights
    and batches, so much of the seed-to-seed spread cancels): the final loss minus
    the first arm's, and the seconds (after start-up) to reach the first arm's
    final loss over the first arm's own training seconds, stored in each run."""
    diffs, ratios = [], []
    for r, f in zip(runs, first):
        diffs.append(r["final_val_loss"] - f["final_val_loss"])
        t = time_to_target([e[0] for e in r["evals"]], [e[2] for e in r["evals"]], f["final_val_loss"])
        ratios.append(None if t is None else t / f["evals"][-1][0])
        r["final_minus_first_paired"], r["time_ratio_to_paired_target"] = diffs[-1], ratios[-1]
    return {"final_minus_first_paired": _spread(diffs), "time_ratio_to_paired_target": _reached(ratios)}


def race_report(arms: list[Arm], configs: dict[str, dict[int, TrainConfig]], seeds: list[int], seconds: float,
                order: list[tuple[int, int]]) -> dict:
    """The race's JSON report (see the module docstring)."""
    from .benchmark import environment

    runs = {a.name: [run_summary(configs[a.name][s]) for s in seeds] for a in arms}
    env = environment()  # its git_commit: the variable was checked before the first run (_prepare_race)
    settings = {"order": [[arms[a].name, seeds[s]] for s, a in order],
                "base_config": configs[arms[0].name][seeds[0]].to_dict()}
    return summarize({a.name: a.overrides for a in arms}, runs, seeds, seconds, env, settings)


# what summarize() adds to each run, recomputed when seeds are merged (the target moves)
_DERIVED_RUN_KEYS = ("seconds_to_target", "seconds_to_best_target", "steps_to_target", "val_loss_at_equal_steps",
                     "final_minus_first_paired", "time_ratio_to_paired_target")


def summarize(overrides: dict[str, dict[str, str]], runs: dict[str, list[dict]], seeds: list[int], seconds: float,
              env: dict, settings: dict) -> dict:
    """The report over ``runs`` (per arm, one :func:`run_summary` per seed, in the
    order of ``seeds``; the first arm is the target). ``settings`` adds to the
    report's settings (order, base config)."""
    first = next(iter(overrides))
    target = statistics.fmean(r["final_val_loss"] for r in runs[first])
    best_target = statistics.fmean(r["best_val_loss"] for r in runs[first])
    # per seed, the steps every arm made: the loss there compares what the arms learn
    # per update, apart from how fast each update is
    equal_steps = [min(runs[a][i]["evals"][-1][4] for a in overrides) for i in range(len(seeds))]
    report_arms = {}
    for name, arm_overrides in overrides.items():
        rs = runs[name]
        for r, step in zip(rs, equal_steps):
            r["val_loss_at_equal_steps"] = loss_at_step([e[4] for e in r["evals"]], [e[2] for e in r["evals"]], step)
        report_arms[name] = {
            "overrides": arm_overrides,
            "final_val_loss": _spread([r["final_val_loss"] for r in rs]),
            "final_val_bpb": _spread([r["final_val_bpb"] for r in rs]),
            "best_val_loss": _spread([r["best_val_loss"] for r in rs]),
            "best_val_bpb": _spread([r["best_val_bpb"] for r in rs]),
            "best_seconds_after_startup": _spread([r["best_seconds"]["after_startup"] for r in rs]),
            "final_minus_best_val_loss": _spread([r["final_minus_best_val_loss"] for r in rs]),
            "val_loss_at_equal_steps": _spread([r["val_loss_at_equal_steps"] for r in rs]),
            # the mean only where every seed reached the target
            "seconds_to_target": _times_to(rs, target, "seconds_to_target"),
            "steps_to_target": _steps_to(rs, target),
            "seconds_to_best_target": _times_to(rs, best_target, "seconds_to_best_target"),
            "steps": _spread([r["steps"] for r in rs]),
            "step_ms": _spread([step_ms(r) for r in rs]),
            "startup_seconds": _spread([r["startup_seconds"] for r in rs]),
            "one_time_seconds": _spread([one_time_seconds(r) for r in rs]),  # None where any is unknown
            "tokens_forwarded": _spread([r["tokens_forwarded"] for r in rs]),
            "tokens_backpropagated": _spread([r["tokens_backpropagated"] for r in rs]),
            **_paired(rs, runs[first]),
            **{prefix: v for prefix in SHARE_PREFIXES if (v := _mean_over_runs(rs, prefix)) is not None},
            "runs": rs,
        }
    return {
        "environment": env,
        "settings": {"seconds": seconds, "seeds": seeds, "arms": overrides, "equal_steps": equal_steps, **settings},
        "target_val_loss": target,
        "target": f"the mean final val loss of the first arm, {first}",
        "best_target_val_loss": best_target,
        "best_target": f"the mean over seeds of the lowest val loss (any evaluation) of the first arm, {first}",
        "arms": report_arms,
    }


def _comparable_config(config: dict, arm_fields: set[str] = frozenset()) -> dict:
    """A base config without what differs between the seeds of one race (the seed and
    the run folder) and without ``arm_fields``, the fields some arm sets (a race's
    base config is its first arm's, overrides included); a field it lacks (added
    to the config since) at its default."""
    # a field added to the config after a race ran is absent from its report: it ran at the default
    out = TrainConfig().to_dict()
    for section, values in json.loads(json.dumps(config)).items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    out.get("run", {}).pop("seed", None)
    out.get("run", {}).pop("out_dir", None)
    for section in out.values():
        if isinstance(section, dict):
            for name in arm_fields & set(section):
                section.pop(name)
    return out


def _seed_as_placeholder(overrides: dict, seeds: list[int]) -> dict:
    """``overrides`` with ``seed<S>`` written ``seed{seed}`` in each string value,
    where ``seeds`` is the one seed S of its race (several seeds share one value)."""
    if len(seeds) != 1:
        return overrides
    own = re.compile(rf"seed{seeds[0]}(?!\d)")
    return {k: own.sub("seed{seed}", v) if isinstance(v, str) else v for k, v in overrides.items()}


def merge_reports(reports: list[dict], sources: list[str], arms: list[str] | None = None) -> dict:
    """One report over several races of the same budget and base config (up to the
    seed): their seeds side by side (e.g. one seed per GPU call), and their arms
    side by side (an arm raced later, in another call, for the same seeds), the
    target, times to it and equal-step losses recomputed over everything.

    The target arm is the first report's first arm. An arm raced in several
    reports must have the same overrides in each, up to its race's own seed: in a
    one-seed race of seed S, ``seed<S>`` within a value (e.g. ``data=.../random_seed1337``,
    a draw of its own per seed) reads as ``seed{seed}``, and the merged arm records
    that. Every arm must cover every seed once. Each race's environment, order and arms are kept under
    ``settings.merged_from``: arms from different calls did not share the
    interleaved order that cancels GPU drift within a call. ``arms`` keeps only
    those arms, in that order (the first is the target): for seeds that raced
    fewer arms than others.
    Raises :class:`ConfigError` naming the first difference."""
    from .benchmark import environment

    if len(reports) < 2:
        raise ConfigError("race merge needs two or more race.json files")
    first, src0 = reports[0], sources[0]
    # a race's base config is its first arm's, overrides included: the fields a first arm sets are
    # compared through the arms' overrides; every other field is each arm's that does not set it
    arm_fields = {key for rep in reports for key in next(iter(rep["settings"]["arms"].values()), {})}
    if arms is not None:
        if not arms:
            raise ConfigError("race merge --arms names no arm")
        raced = {name for rep in reports for name in rep["settings"]["arms"]}
        for name in arms:
            if name not in raced:
                raise ConfigError(f"arm {name} is in none of the reports (they race {', '.join(sorted(raced))})")
        if len(set(arms)) != len(arms):
            raise ConfigError(f"race merge --arms names an arm twice: {','.join(arms)}")
        reports = [_only_arms(rep, arms) for rep in reports]
    base = _comparable_config(first["settings"]["base_config"], arm_fields)
    overrides: dict[str, dict] = {}  # arm -> its overrides, in order of first appearance
    arm_source: dict[str, str] = {}
    found: dict[tuple[str, int], tuple[dict, str]] = {}  # (arm, seed) -> (run, source)
    for rep, src in zip(reports, sources):
        st = rep["settings"]
        for name, ov in st["arms"].items():
            ov = _seed_as_placeholder(ov, st["seeds"])
            if name in overrides and overrides[name] != ov:
                raise ConfigError(f"{src} races other arms than {arm_source[name]}: {name} is {ov} there, "
                                  f"{overrides[name]} in {arm_source[name]}")
            overrides.setdefault(name, ov)
            arm_source.setdefault(name, src)
        if st["seconds"] != first["settings"]["seconds"]:
            raise ConfigError(f"{src} gives every run {st['seconds']} s, {src0} {first['settings']['seconds']} s")
        other = _comparable_config(st["base_config"], arm_fields)
        if other != base:
            raise ConfigError(f"{src} has another base config than {src0}: "
                              f"{_first_difference(other, base, (f'in {src}', f'in {src0}'))}")
        for i, seed in enumerate(st["seeds"]):
            for name in st["arms"]:
                if (name, seed) in found:
                    raise ConfigError(f"seed {seed} is in both {found[name, seed][1]} and {src} (arm {name})")
                run = {k: v for k, v in rep["arms"][name]["runs"][i].items() if k not in _DERIVED_RUN_KEYS}
                if any(len(e) < 5 for e in run["evals"]):
                    run["evals"] = _evals_with_steps(run["evals"], Path(src).parent, name, seed)
                found[name, seed] = (run, src)
    if arms is not None:  # the order asked for, whichever report raced each arm first
        overrides = {name: overrides[name] for name in arms}
    seeds = sorted({seed for _, seed in found})
    for name in overrides:
        have = sorted(seed for arm, seed in found if arm == name)
        if have != seeds:
            raise ConfigError(f"arm {name} has seeds {have}, the merged race {seeds}: every arm needs every seed")
    runs = {name: [found[name, seed][0] for seed in seeds] for name in overrides}
    # the runs' environment (where the races agree; "mixed" lists what differs), and where the merge ran
    envs = [rep.get("environment") or {} for rep in reports]
    env: dict[str, Any] = {}
    for key in envs[0]:
        values = [e.get(key) for e in envs]
        env[key] = values[0] if all(v == values[0] for v in values) else {"mixed": values}
    here = environment()
    env["merge"] = {"date": here.get("date"), "git_commit": git_commit(), "device": here.get("device")}
    settings = {"base_config": first["settings"]["base_config"],
                "merged_from": [{"file": src, "seeds": rep["settings"]["seeds"], "arms": list(rep["settings"]["arms"]),
                                 "order": rep["settings"].get("order"), "environment": rep.get("environment")}
                                for rep, src in zip(reports, sources)]}
    return summarize(overrides, runs, seeds, first["settings"]["seconds"], env, settings)


def _only_arms(report: dict, arms: list[str]) -> dict:
    """``report`` with the arms of ``arms`` only, in that order (the runs' list per
    arm is untouched: it is indexed by the report's seeds)."""
    st = report["settings"]
    kept = [name for name in arms if name in st["arms"]]
    return {**report, "settings": {**st, "arms": {name: st["arms"][name] for name in kept}},
            "arms": {name: report["arms"][name] for name in kept}}


def _evals_with_steps(evals: list[list], folder: Path, arm: str, seed: int) -> list[list]:
    """Evaluation rows of a report written before they carried their step, given it
    from the run's metrics beside the report: ``<arm>/seed<seed>/metrics.jsonl`` (the
    race's own layout) or ``<arm>_seed<seed>_metrics.jsonl.gz`` (a copied-out run)."""
    import gzip

    for path in (folder / arm / f"seed{seed}" / "metrics.jsonl", folder / f"{arm}_seed{seed}_metrics.jsonl.gz"):
        if path.is_file():
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt") as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
            steps = [r["step"] for r in rows if r.get("kind") == "eval"]
            if len(steps) != len(evals):
                raise ConfigError(f"{path} has {len(steps)} evaluations, its race report {len(evals)}")
            return [list(e[:4]) + [step] for e, step in zip(evals, steps)]
    raise ConfigError(f"the report in {folder} predates evaluation steps and the metrics of {arm}, seed {seed}, "
                      "are not beside it")


def write_merged(files: list[str], out_dir: str | Path, verbose: bool = True, arms: list[str] | None = None) -> dict:
    """Read ``files`` (race.json), merge them (:func:`merge_reports`, only ``arms`` if
    given) and write the report, its plots and print its table into ``out_dir``."""
    reports = []
    for f in files:
        try:
            reports.append(json.loads(Path(f).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"race report {f} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"race report {f} is not JSON ({e})") from None
        if not isinstance(reports[-1], dict) or "arms" not in reports[-1] or "settings" not in reports[-1]:
            raise ConfigError(f"{f} is not a race report (no arms and settings)")
    try:
        merged = merge_reports(reports, [str(f) for f in files], arms)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:  # a report of another shape
        raise ConfigError(f"the race reports {', '.join(map(str, files))} are not all well-formed race reports "
                          f"({type(e).__name__}: {e})") from None
    out = Path(out_dir)
    written = {(out / name).resolve() for name in (REPORT_NAME, PLOT_NAME, FULL_PLOT_NAME)}
    for f in files:
        if Path(f).resolve() in written:
            raise ConfigError(f"--out-dir {out_dir} would overwrite the input {f}; merge into another folder")
    out.mkdir(parents=True, exist_ok=True)
    return write_report(merged, out, verbose)


def write_report(report: dict, out: Path, verbose: bool = True) -> dict:
    """Write ``report`` as ``out``/race.json with its two plots, print its table, return it."""
    atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=2))
    from .plotting import plot_race

    plot_race(report, out / PLOT_NAME)
    plot_race(report, out / FULL_PLOT_NAME, full=True)
    if verbose:
        print(format_table(report), flush=True)
    return report


def format_table(report: dict) -> str:
    """The report as a fixed-width table, one arm a line: final and best held-out loss,
    seconds to each target (after start-up; the final target also with start-up and
    with the one-time cost), and the held-out loss at the steps every arm made."""
    head = ["arm", "val loss", "val bpb", "minus first (paired)", "best loss", "best at s", "s to target",
            "(w/ start-up)", "one-time s", "(w/ one-time)", "x time to own seed's first", "s to best target", "steps",
            "ms/step (x first)", "steps to target", "loss at equal steps", "start-up s", "tokens fwd", "tokens bwd"]
    lines = []
    first_ms = next(iter(report["arms"].values())).get("step_ms")

    def ms(d: dict | None) -> str:
        if d is None:
            return "-"
        ratio = f" ({d['mean'] / first_ms['mean']:.2f}x)" if first_ms else ""
        return f"{d['mean']:.1f}{ratio}"

    def secs(d: dict) -> str:
        return f"{d['mean']:.1f}" if d["mean"] is not None else f"never ({d['reached']})"

    def secs_or_never(d: dict | None, fmt: str) -> str:
        if d is None:  # a report from before the key existed
            return "-"
        return fmt.format(d["mean"]) if d["mean"] is not None else f"never ({d['reached']})"

    def paired(a: dict, first_arm: bool) -> tuple[str, str]:
        d, r = a.get("final_minus_first_paired"), a.get("time_ratio_to_paired_target")
        if first_arm or d is None or r is None:  # the first arm itself, or a report from before the keys existed
            return "-", "-"
        ratio = secs_or_never(r, "{:.2f}")
        if r["mean"] is not None and len(r["per_seed"]) > 1:  # a bar is met only if every seed meets it
            ratio += f" (worst {max(r['per_seed']):.2f})"
        return f"{d['mean']:+.4f} ± {d['std']:.4f}", ratio

    for i, (name, a) in enumerate(report["arms"].items()):
        loss, bpb, best = a["final_val_loss"], a["final_val_bpb"], a["best_val_loss"]
        tt, tb, at = a["seconds_to_target"], a["seconds_to_best_target"], a["val_loss_at_equal_steps"]
        diff, ratio = paired(a, i == 0)
        lines.append([name, f"{loss['mean']:.4f} ± {loss['std']:.4f}", f"{bpb['mean']:.4f}" if bpb else "-", diff,
                      f"{best['mean']:.4f} ± {best['std']:.4f}", f"{a['best_seconds_after_startup']['mean']:.1f}",
                      secs(tt["after_startup"]), secs(tt["with_startup"]),
                      f"{a['one_time_seconds']['mean']:.1f}" if a.get("one_time_seconds") else "-",
                      secs(tt["with_one_time"]) if "with_one_time" in tt else "-", ratio, secs(tb["after_startup"]),
                      f"{a['steps']['mean']:.0f}", ms(a.get("step_ms")), secs_or_never(a.get("steps_to_target"), "{:.0f}"),
                      f"{at['mean']:.4f} ± {at['std']:.4f}",
                      f"{a['startup_seconds']['mean']:.1f}",
                      f"{a['tokens_forwarded']['mean']:,.0f}", f"{a['tokens_backpropagated']['mean']:,.0f}"])
    widths = [max(len(row[i]) for row in [head] + lines) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    seeds = report["settings"]["seeds"]
    title = (f"race: {budget_line(report)}, {len(seeds)} seed(s); "
             "± is the standard deviation over seeds\n"
             f"target val loss {report['target_val_loss']:.4f} ({report['target']})\n"
             f"best target val loss {report['best_target_val_loss']:.4f} ({report['best_target']})")
    return "\n".join([title, fmt(head)] + [fmt(r) for r in lines] + _shares_table(report))


def budget_line(report: dict) -> str:
    """The race's budget as its table's title gives it: seconds per run, or, at equal
    steps, each arm's step count (the base config's ``max_steps`` or the arm's own) with
    the seconds as a cap, and the runs that reached the cap before their steps."""
    seconds = report["settings"]["seconds"]
    # reports written before runs recorded max_steps: the first arm's config stands for all
    base = int(report["settings"].get("base_config", {}).get("training", {}).get("max_steps", 0) or 0)
    runs = [r for arm in report["arms"].values() for r in arm["runs"]]
    budgets = [int(r.get("max_steps", base)) for r in runs]
    if not any(budgets):
        return f"{seconds:g} s of training after start-up per run"
    lo, hi = min(budgets), max(budgets)
    short = [r["steps"] for r, n in zip(runs, budgets) if r["steps"] < n]
    cap = f"at most {seconds:g} s"
    if short:
        cap += (f"; {len(short)} of {len(runs)} run(s) reached the {seconds:g} s first, after "
                + (f"{min(short)}" if min(short) == max(short) else f"{min(short)}-{max(short)}") + " steps")
    return f"{lo if lo == hi else f'{lo}-{hi}'} steps per run ({cap})"


def _shares_table(report: dict) -> list[str]:
    """Lines of a second table, for the arms with ``kept_share``: per kind of document,
    the share of its tokens kept (mean over logged steps and seeds), with the kind's
    share of the batch tokens in brackets; no lines where no arm has it."""
    arms = {name: a for name, a in report["arms"].items() if "kept_share" in a}
    if not arms:
        return []
    kinds: list[str] = []
    for a in arms.values():
        kinds += [k for k in a["kept_share"] if k not in kinds]

    def cell(a: dict, kind: str) -> str:
        kept, share = a["kept_share"].get(kind), a.get("batch_share", {}).get(kind)
        return "-" if kept is None else f"{kept:.3f}" + (f" ({share:.3f})" if share is not None else "")

    head = ["arm", *kinds]
    lines = [[name, *(cell(a, k) for k in kinds)] for name, a in arms.items()]
    widths = [max(len(row[i]) for row in [head] + lines) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    return ["", "share of each kind's tokens kept (its share of the batch tokens in brackets), mean over logged steps "
            "and seeds", fmt(head)] + [fmt(r) for r in lines]
