"""Atomic checkpoint and file writes.

Every file is written to a temporary name in the same folder, flushed to disk,
then renamed over the target: a crash mid-write leaves the previous version
intact, never a truncated file.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

CKPT_NAME = "ckpt.pt"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (tmp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run directory or a checkpoint file."""
    p = Path(path)
    if p.is_dir():
        p = p / CKPT_NAME
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return p


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a sparsetrain checkpoint (a run directory or a ``.pt`` file)."""
    p = resolve_checkpoint(path)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {p}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise CheckpointError(f"{p} is not a sparsetrain checkpoint")
    return state
