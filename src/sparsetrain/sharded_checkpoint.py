"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own shards of the model and the optimizer state; a
checkpoint saved by N processes loads into M processes, sharded or not (DCP
reshards on load). Keys are parameter names (``get_state_dict``), so the
optimizer state survives a change of wrapping or world size.

Layout inside a run directory::

    ckpt_sharded/step_00000120/   DCP files (.metadata, one .distcp per rank) and meta.pt
    ckpt_sharded/latest           the name of the newest complete step directory

``latest`` is rewritten atomically only after the step directory is complete,
and older step directories are removed only after that: a crash mid-save
leaves the previous checkpoint intact and named. ``meta.pt`` holds what is not
a tensor of the model or optimizer (step, timings, configs, selector state).
The directory must be on a file system every rank sees.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .checkpoint import CKPT_NAME, atomic_write_text, save_checkpoint
from .distributed import barrier_all
from .errors import CheckpointError

SHARDED_DIR = "ckpt_sharded"
LATEST_NAME = "latest"
META_NAME = "meta.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it assumes one process whenever no group exists; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint of ``step``."""
    return f"step_{step:08d}"


def has_sharded_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a complete sharded checkpoint."""
    root = Path(run_dir) / SHARDED_DIR
    latest = root / LATEST_NAME
    return latest.is_file() and (root / latest.read_text().strip()).is_dir()


def resume_from_sharded(run_dir: str | Path) -> bool:
    """Whether resuming ``run_dir`` should read its sharded checkpoint rather than
    its single-file ``ckpt.pt``: the one with the larger step, the sharded one
    on a tie (a run that changed its number of processes or its mode leaves both)."""
    if not has_sharded_checkpoint(run_dir):
        return False
    single = Path(run_dir) / CKPT_NAME
    if not single.is_file():
        return True
    try:  # memory-mapped: only the step is read
        single_step = int(torch.load(single, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception as e:
        raise CheckpointError(f"cannot read the step of {single}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return int(read_meta(latest_sharded_dir(run_dir))["step"]) >= single_step


def latest_sharded_dir(run_dir: str | Path) -> Path:
    """The newest complete step directory of ``run_dir``'s sharded checkpoint."""
    root = Path(run_dir) / SHARDED_DIR
    if not has_sharded_checkpoint(run_dir):
        raise CheckpointError(f"no sharded checkpoint in {run_dir} (no {SHARDED_DIR}/{LATEST_NAME} naming a step directory)")
    return root / (root / LATEST_NAME).read_text().strip()


def save_sharded(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any], step: int) -> Path:
    """Save ``model`` and ``optimizer`` (sharded or not) as step ``step``.

    Collective: every rank calls it with its own model and optimizer; rank 0
    writes ``meta`` (plain values and tensors, loadable with
    ``weights_only``). Returns the step directory."""
    root = Path(run_dir) / SHARDED_DIR
    # a fresh name even when this step was saved before, so that `latest` never names a directory being replaced
    final = root / step_dir_name(step)
    n = 1
    while final.exists():
        final, n = root / f"{step_dir_name(step)}_{n}", n + 1
    staging = root / (final.name + ".partial")
    barrier_all()  # every rank has picked the name before rank 0 creates anything
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash mid-save
        staging.mkdir(parents=True)
    barrier_all()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _quiet_single_process():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=staging, no_dist=not dist.is_initialized())
    if _rank() == 0:
        save_checkpoint(staging / META_NAME, meta)
        staging.rename(final)
        atomic_write_text(root / LATEST_NAME, final.name + "\n")
        for old in root.iterdir():
            if old.is_dir() and old.name != final.name and old.name.startswith("step_"):
                shutil.rmtree(old)
    barrier_all()  # no rank goes on (or exits) before the checkpoint is named
    return final


def read_meta(step_dir: str | Path) -> dict[str, Any]:
    """The ``meta`` saved with a sharded checkpoint."""
    path = Path(step_dir) / META_NAME
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a sparsetrain checkpoint's metadata")
    return meta


def load_sharded(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load the newest sharded checkpoint of ``run_dir`` into ``model`` (and
    ``optimizer``), whatever the number of processes or the wrapping (plain,
    DDP or FSDP) now and at saving. Collective when several processes run.
    Returns the saved ``meta``."""
    step_dir = latest_sharded_dir(run_dir)
    if optimizer is None:
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=step_dir, no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"cannot load the sharded checkpoint {step_dir}: {_first_failure(e)}") from None
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return read_meta(step_dir)


def _first_failure(e: BaseException) -> str:
    """One line naming what went wrong (DCP wraps each rank's exception)."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _plain_model_and_optimizer(model_config: dict[str, Any], dtype: torch.dtype) -> tuple[nn.Module, torch.optim.Optimizer]:
    """An unsharded CPU model of ``model_config`` in ``dtype`` and its AdamW with
    the trainer's parameter groups; the hyperparameters come from the state
    loaded into it."""
    from .config import ModelConfig
    from .build import build_model
    from .optimizers import make_adamw

    model = build_model(ModelConfig(**model_config)).to(dtype)
    return model, make_adamw(model, 0.0, 0.0, (0.9, 0.95), "cpu")


def _saved_dtype(step_dir: Path) -> torch.dtype:
    """The dtype of the saved model weights (the embedding's)."""
    metadata = dcp.FileSystemReader(step_dir).read_metadata().state_dict_metadata
    return metadata["model.embed.weight"].properties.dtype


def _model_config(state: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(state.get("model_config"), dict):
        raise CheckpointError(f"{where} has no model_config: not a sparsetrain training checkpoint")
    return state["model_config"]


def consolidate_sharded(run_dir: str | Path) -> dict[str, Any]:
    """The newest sharded checkpoint of ``run_dir`` as one single-file checkpoint
    state (``meta`` plus full ``model`` and ``optimizer`` state dicts, as
    ``save_checkpoint`` writes them), loaded in this one process."""
    step_dir = latest_sharded_dir(run_dir)
    meta = read_meta(step_dir)
    model, optimizer = _plain_model_and_optimizer(_model_config(meta, f"the sharded checkpoint of {run_dir}"),
                                                  _saved_dtype(step_dir))
    load_sharded(run_dir, model, optimizer)
    return {**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict()}


def load_single_file_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
    """Load a single-file checkpoint's ``model`` and ``optimizer`` state into a
    model that may be sharded (every rank passes the same full ``state``):
    how a run saved by one process continues under FSDP. The optimizer state
    is matched by parameter name, so ``optimizer`` must group the parameters
    as the trainer's AdamW does."""
    plain, plain_optimizer = _plain_model_and_optimizer(_model_config(state, "the checkpoint"), state["model"]["embed.weight"].dtype)
    plain.load_state_dict(state["model"])
    full = StateDictOptions(full_state_dict=True)
    if optimizer is None:
        set_model_state_dict(model, get_model_state_dict(plain, options=full), options=full)
        return
    plain_optimizer.load_state_dict(state["optimizer"])
    model_state, optim_state = get_state_dict(plain, plain_optimizer, options=full)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=full)
