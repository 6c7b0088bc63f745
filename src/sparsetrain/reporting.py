"""Where a run's logged rows go: ``metrics.jsonl`` always, TensorBoard and
Weights & Biases on request (``report_to``, Hugging Face Trainer's names:
``none``, ``tensorboard``, ``wandb``, ``all``).

The trainer hands every row (``{"kind": "train" | "eval" | ..., "step": N, ...}``)
to one :class:`RunLog`, which writes it to each sink. ``metrics.jsonl`` is the
record a resumed run trusts: :meth:`RunLog.sync` makes every row written so
far durable (written, flushed and fsynced), and the trainer calls it before
each checkpoint, so the log never lags the checkpoint; rows past a
checkpoint's step are dropped when the run resumes from it
(:func:`truncate_metrics`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Protocol

from .checkpoint import atomic_write_text, warn, write_all
from .errors import ConfigError

METRICS_NAME = "metrics.jsonl"
REPORT_TO = ("none", "tensorboard", "wandb", "all")
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_NAME = "wandb_id.txt"
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class Reporter(Protocol):
    """A sink for logged rows."""

    def log(self, row: dict[str, Any]) -> None:
        """Record one row (``kind`` and ``step`` always present)."""

    def close(self) -> None:
        """Flush and release the sink."""


def sinks(report_to: str) -> list[str]:
    """The optional sinks ``report_to`` names, checked: a missing package is refused
    with one line (:class:`ConfigError`) before anything is written."""
    if report_to not in REPORT_TO:
        raise ConfigError(f"report_to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    names = {"none": [], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])
    for name in names:
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ConfigError(f"report_to = {report_to} needs the {_PACKAGES[name]} package, which is not installed "
                              f"(pip install {_PACKAGES[name]})")
    return names


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers, flattened (``sparse24/kept``, ``mtp_losses/1``) and prefixed
    with its kind (``train/loss``, ``eval/val_loss``); strings and booleans left out."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                out[prefix] = float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value, 1):
                walk(f"{prefix}/{i}", v)

    kind = row.get("kind", "row")
    for key, value in row.items():
        if key not in ("kind", "step"):
            walk(f"{kind}/{key}", value)
    return out


class MetricsLog:
    """``metrics.jsonl``: rows appended in order; :meth:`log` hands them to the OS
    (visible to ``tail -f``), :meth:`sync` makes them durable."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(self, row: dict[str, Any]) -> None:
        write_all(self._fd, (json.dumps(row) + "\n").encode())

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1


class TensorBoardReporter:
    """Scalars under ``<run>/tensorboard`` (``torch.utils.tensorboard``). A run resumed
    at step ``s`` purges what an earlier process logged after ``s`` (the rows that
    ``metrics.jsonl`` dropped), so every step keeps one value."""

    def __init__(self, out_dir: Path, first_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / TENSORBOARD_DIR), purge_step=first_step + 1 if first_step else None)

    def log(self, row: dict[str, Any]) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, row["step"])

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """A Weights & Biases run, offline (files under ``<run>/wandb``, ``wandb sync``
    uploads them) unless an API key is set (``WANDB_API_KEY``) or ``WANDB_MODE``
    says otherwise. A resumed run continues the same W&B run (its id is kept in
    the run directory)."""

    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        id_file = out_dir / WANDB_ID_NAME
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        if not id_file.is_file():
            atomic_write_text(id_file, run_id + "\n")
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sparsetrain"), name=out_dir.name, id=run_id,
                              resume="allow", dir=str(out_dir), config=config, mode=mode)

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


class RunLog:
    """Every sink of one run behind one call per row."""

    def __init__(self, out_dir: str | Path, report_to: str = "none", config: dict[str, Any] | None = None,
                 first_step: int = 0) -> None:
        """``first_step``: the step the run starts (or resumes) from."""
        out = Path(out_dir)
        self.metrics = MetricsLog(out / METRICS_NAME)
        self.extra: list[Reporter] = []
        try:
            for name in sinks(report_to):
                self.extra.append(TensorBoardReporter(out, first_step) if name == "tensorboard" else WandbReporter(out, config or {}))
        except BaseException:
            self.close()
            raise

    def log(self, row: dict[str, Any]) -> None:
        """Write ``row`` to ``metrics.jsonl`` and every other sink."""
        self.metrics.log(row)
        for r in self.extra:
            r.log(row)

    def sync(self) -> None:
        """Make every row logged so far durable in ``metrics.jsonl``."""
        self.metrics.sync()

    def close(self) -> None:
        try:
            self.metrics.close()
        finally:
            for r in self.extra:
                r.close()


def truncate_metrics(path: str | Path, step: int, unsaved: Callable[[dict], bool] | None = None) -> int:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (those a checkpoint at
    ``step`` vouches for); returns how many were dropped. A last line cut short
    by a crash is dropped quietly; a damaged line elsewhere with a warning.

    A row at ``step`` itself for which ``unsaved`` is true is dropped too: what a
    resume announced at that step (an extended schedule) and no checkpoint kept,
    since the resume now starting announces its own."""
    p = Path(path)
    if not p.is_file():
        return 0
    text = p.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    keep, dropped, damaged = [], 0, []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row_step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            if i < len(lines) - 1:  # not a torn last write
                damaged.append(i + 1)
            dropped += 1
            continue
        if row_step < step or row_step == step and not (unsaved is not None and unsaved(row)):
            keep.append(line)
        else:
            dropped += 1
    if damaged:
        warn(f"{p}: {len(damaged)} damaged line(s) dropped (line {', '.join(map(str, damaged[:5]))}"
             f"{', ...' if len(damaged) > 5 else ''})")
    atomic_write_text(p, "".join(ln + "\n" for ln in keep))
    return dropped
