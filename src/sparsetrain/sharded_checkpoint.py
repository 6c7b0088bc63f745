"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own shards of the model and the optimizer state; a
checkpoint saved by N processes loads into M processes, sharded or not (DCP
reshards on load). Keys are parameter names (``get_state_dict``), so the
optimizer state survives a change of wrapping or world size.

Layout inside a run directory::

    ckpt_sharded/step_00000120/   DCP files (.metadata, one .distcp per rank), meta.pt, checksums.sha256
    ckpt_sharded/latest           the name of the newest complete step directory
    ckpt_sharded/previous         the name of the one before it (kept as a fallback)

The crash-safety of the single-file checkpoint (:mod:`sparsetrain.checkpoint`)
holds here too. A save writes into ``step_N.partial``; once every rank's
files are written and fsynced, rank 0 writes ``meta.pt`` (checksummed) and
verifies the directory is complete (every file the DCP metadata names is
there, as long as the metadata says); only then is it renamed to
``step_N``, ``previous`` set to the step directory ``latest`` named,
``latest`` rewritten atomically, and older step directories removed. A
crash at any point leaves ``latest`` naming a complete checkpoint (or no
checkpoint, before the first save). Loading reads the directory ``latest``
names, or ``previous`` with a warning when that one is incomplete or its
``meta.pt`` damaged. ``meta.pt`` holds what is not a tensor of the model or
optimizer (step, timings, configs, selector state). The directory must be on
a file system every rank sees.
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

from .checkpoint import (CKPT_NAME, PREVIOUS_CKPT_NAME, atomic_write_text, first_line, fsync_dir, load_checkpoint_from,
                         save_checkpoint, verify_file, warn)
from .distributed import barrier_all
from .errors import CheckpointError

SHARDED_DIR = "ckpt_sharded"
LATEST_NAME = "latest"
PREVIOUS_NAME = "previous"
META_NAME = "meta.pt"
PARTIAL_SUFFIX = ".partial"
DCP_METADATA_NAME = ".metadata"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _agree(error: str | None) -> None:
    """Raise :class:`CheckpointError` on every rank when rank 0 reports ``error``
    (collective: a step only rank 0 takes must not leave the others waiting or going on)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise CheckpointError(error)


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it assumes one process whenever no group exists; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint of ``step``."""
    return f"step_{step:08d}"


def _named(root: Path, pointer: str) -> Path | None:
    """The step directory the pointer file ``pointer`` names, if both exist."""
    try:
        name = (root / pointer).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return root / name if name and (root / name).is_dir() else None


def incomplete(step_dir: str | Path) -> str | None:
    """None when ``step_dir`` holds a complete sharded checkpoint: its ``meta.pt``
    matches its checksum and every file the DCP metadata names is there and as
    long as the metadata says. Otherwise what is wrong, as a phrase."""
    step_dir = Path(step_dir)
    problem = verify_file(step_dir / META_NAME)
    if problem is not None:
        return f"{META_NAME} {problem}"
    try:
        metadata = dcp.FileSystemReader(step_dir).read_metadata()
    except Exception as e:
        return f"its DCP metadata cannot be read ({first_line(e)})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        path = getattr(info, "relative_path", None)
        if path is not None:
            needed[path] = max(needed.get(path, 0), int(info.offset) + int(info.length))
    for name, size in sorted(needed.items()):
        f = step_dir / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size < size:
            return f"{name} is cut short ({f.stat().st_size} of {size} bytes)"
    return None


def _pick(run_dir: str | Path, announce: bool) -> Path:
    """The step directory to load: ``latest``'s, or ``previous``'s when that one is
    incomplete (with a warning on rank 0 when ``announce``)."""
    root = Path(run_dir) / SHARDED_DIR
    latest, previous = _named(root, LATEST_NAME), _named(root, PREVIOUS_NAME)
    if latest is None and previous is None:
        raise CheckpointError(f"no sharded checkpoint in {run_dir} (no {SHARDED_DIR}/{LATEST_NAME} naming a step directory)")
    why = incomplete(latest) if latest is not None else f"{LATEST_NAME} names no step directory"
    if why is None:
        return latest
    if previous is not None and previous != latest and incomplete(previous) is None:
        if announce and _rank() == 0:
            warn(f"the sharded checkpoint {latest or root / LATEST_NAME} is incomplete ({why}); "
                 f"using the previous one {previous}")
        return previous
    raise CheckpointError(f"no complete sharded checkpoint in {run_dir}: {latest or LATEST_NAME}: {why}")


def has_sharded_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a sharded checkpoint (``latest`` or ``previous``
    naming a step directory; whether it is complete is checked on loading)."""
    root = Path(run_dir) / SHARDED_DIR
    return _named(root, LATEST_NAME) is not None or _named(root, PREVIOUS_NAME) is not None


def _single_file_step(run_dir: Path) -> int | None:
    """The step of ``run_dir``'s newest readable single-file checkpoint (memory-mapped:
    only the step is read), None when there is none."""
    for name in (CKPT_NAME, PREVIOUS_CKPT_NAME):
        path = run_dir / name
        if path.is_file():
            try:
                return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
            except Exception:
                continue  # damaged: the loader falls back or names it; here it only loses the comparison
    return None


def resume_from_sharded(run_dir: str | Path) -> bool:
    """Whether resuming ``run_dir`` should read its sharded checkpoint rather than
    its single-file ``ckpt.pt``: the one with the larger step, the sharded one
    on a tie (a run that changed its number of processes or its mode leaves both)."""
    if not has_sharded_checkpoint(run_dir):
        return False
    single_step = _single_file_step(Path(run_dir))
    if single_step is None:
        return True
    return int(read_meta(_pick(run_dir, announce=False))["step"]) >= single_step


def latest_sharded_dir(run_dir: str | Path) -> Path:
    """The step directory of ``run_dir``'s newest complete sharded checkpoint."""
    return _pick(run_dir, announce=False)


def save_sharded(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any], step: int) -> Path:
    """Save ``model`` and ``optimizer`` (sharded or not) as step ``step``, in the
    order the module docstring gives. Collective: every rank calls it with its
    own model and optimizer; rank 0 writes ``meta`` (plain values and tensors,
    loadable with ``weights_only``). A failure on any rank raises
    :class:`CheckpointError` on every rank, the previous checkpoint kept.
    Returns the step directory."""
    root = Path(run_dir) / SHARDED_DIR
    # a fresh name even when this step was saved before, so that `latest` never names a directory being replaced
    final = root / step_dir_name(step)
    n = 1
    while final.exists():
        final, n = root / f"{step_dir_name(step)}_{n}", n + 1
    staging = root / (final.name + PARTIAL_SUFFIX)
    barrier_all()  # every rank has picked the name before rank 0 creates anything
    error = None
    if _rank() == 0:
        try:
            shutil.rmtree(staging, ignore_errors=True)  # left by a crash mid-save
            staging.mkdir(parents=True)
        except OSError as e:
            error = f"cannot create {staging}: {e.strerror or e}"
    _agree(error)
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        with _quiet_single_process():
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=staging, no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # DCP gathers every rank's failure and raises it on all of them
        raise CheckpointError(f"cannot write the sharded checkpoint {staging}: {_first_failure(e)}") from None
    if _rank() == 0:
        try:
            _publish(root, staging, final, meta)
        except (OSError, CheckpointError) as e:
            error = f"cannot complete the sharded checkpoint {final}: {first_line(e)}"
    _agree(error)  # no rank goes on (or exits) before the checkpoint is named
    return final


def _publish(root: Path, staging: Path, final: Path, meta: dict[str, Any]) -> None:
    """Rank 0's part of a save, once every rank's files are written: ``meta.pt``,
    the completeness check, the rename, the pointers, the clean-up."""
    save_checkpoint(staging / META_NAME, meta, keep_previous=False)
    problem = incomplete(staging)
    if problem is not None:
        raise CheckpointError(f"the written checkpoint did not verify: {problem}")
    fsync_dir(staging)
    current = _named(root, LATEST_NAME)
    staging.rename(final)
    fsync_dir(root)
    if current is not None and incomplete(current) is None:
        atomic_write_text(root / PREVIOUS_NAME, current.name + "\n")
    else:
        current = _named(root, PREVIOUS_NAME)  # a broken latest is not kept: the previous one stays
    atomic_write_text(root / LATEST_NAME, final.name + "\n")
    keep = {final.name} | ({current.name} if current is not None else set())
    for old in root.iterdir():
        if old.is_dir() and old.name.startswith("step_") and old.name not in keep:
            shutil.rmtree(old)


def read_meta(step_dir: str | Path) -> dict[str, Any]:
    """The ``meta`` saved with a sharded checkpoint (verified against its checksum)."""
    path = Path(step_dir) / META_NAME
    problem = verify_file(path)
    if problem is not None:
        raise CheckpointError(f"{path} is {problem}")
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {first_line(e)}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a sparsetrain checkpoint's metadata")
    return meta


def load_sharded(run_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load the newest sharded checkpoint of ``run_dir`` into ``model`` (and
    ``optimizer``), whatever the number of processes or the wrapping (plain,
    DDP or FSDP) now and at saving. Collective when several processes run.
    Returns the saved ``meta``."""
    step_dir = _pick(run_dir, announce=True)
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


def consolidate_sharded(run_dir: str | Path, with_optimizer: bool = True) -> dict[str, Any]:
    """The newest sharded checkpoint of ``run_dir`` as one single-file checkpoint
    state (``meta`` plus full ``model`` and, ``with_optimizer``, ``optimizer``
    state dicts, as ``save_checkpoint`` writes them), loaded in this one process."""
    step_dir = _pick(run_dir, announce=False)  # load_sharded announces a fallback
    meta = read_meta(step_dir)
    model, optimizer = _plain_model_and_optimizer(_model_config(meta, f"the sharded checkpoint of {run_dir}"),
                                                  _saved_dtype(step_dir))
    load_sharded(run_dir, model, optimizer if with_optimizer else None)
    state = {**meta, "model": model.state_dict()}
    if with_optimizer:
        state["optimizer"] = optimizer.state_dict()
    return state


def load_training_state(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path]:
    """The newest training state of a run: ``(state, run folder)``. A run directory
    whose sharded checkpoint is the newer one (:func:`resume_from_sharded`) gives
    it consolidated; otherwise the single-file checkpoint
    (:func:`~sparsetrain.checkpoint.load_checkpoint_from`: a run directory or a
    ``.pt`` file, verified, with its fallback)."""
    p = Path(path)
    if p.is_dir() and resume_from_sharded(p):
        return consolidate_sharded(p), p
    state, file = load_checkpoint_from(p, map_location)
    return state, file.parent


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
