"""Durable, verified checkpoint and file writes.

Every file is written to a temporary name in the same folder, flushed to disk,
then renamed over the target: a crash mid-write leaves the previous version
intact, never a truncated file.

Checkpoints carry a checksum. A run folder holds ``checksums.sha256`` (the
format ``sha256sum -c`` reads: one ``<hex>  <name>`` line per file) with the
SHA-256 of ``ckpt.pt``, of the checkpoint before it (``ckpt.prev.pt``) and of
the weights-only ``model.safetensors``. A new checkpoint is written and read
back before anything is renamed; only then does the current one become the
previous one. Every step of that sequence leaves at least one checkpoint whose
hash the checksum file lists, so loading a run folder verifies the latest
checkpoint and falls back to the previous one (with a one-line warning) when
the latest is damaged or missing.

A file counts as verified when its hash is one the checksum file lists (under
any name): between the two renames of a save the file list and the names are
briefly out of step, the hashes never are. A folder without a checksum file
(written before checksums existed) loads unverified.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import CheckpointError

CKPT_NAME = "ckpt.pt"
PREVIOUS_CKPT_NAME = "ckpt.prev.pt"
WEIGHTS_NAME = "model.safetensors"
CHECKSUMS_NAME = "checksums.sha256"
TMP_SUFFIX = ".tmp"
WRITE_CHUNK = 1 << 20  # bytes per os.write call; a large write is never one syscall anyway
_CHECKSUM_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
# files this process wrote or verified: (size, mtime_ns, inode) -> sha256, so a save need not
# re-read the checkpoint it is about to demote to ckpt.prev.pt
_known_hashes: dict[tuple[str, int, int, int], str] = {}


def module_generators(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Generator]:
    """The ``torch.Generator`` attributes of every submodule of ``modules``, named
    ``<prefix>/<module path>.<attribute>``: the random streams a module owns (a 2:4
    FFN's random patterns on the CPU), which a checkpoint must hold for an exact resume."""
    found: dict[str, torch.Generator] = {}
    for prefix, root in modules.items():
        for path, m in root.named_modules():
            for attr, value in vars(m).items():
                if isinstance(value, torch.Generator):
                    found[f"{prefix}/{path}.{attr}"] = value
    return found


def capture_rng_state(device: torch.device, generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """The states of the torch RNGs a training step may draw from: the CPU's, ``device``'s
    (CUDA) and the given named generators', all as CPU byte tensors."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "generators": {name: g.get_state() for name, g in generators.items()}}


def restore_rng_state(state: dict[str, Any], device: torch.device, generators: dict[str, torch.Generator]) -> None:
    """Set the RNGs :func:`capture_rng_state` saved. A generator the state does not name
    (a module added since) keeps its seeded state; the CUDA state is set only on a CUDA
    device (a run saved on the CPU and resumed on a GPU keeps the device's seeded one)."""
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    for name, g in generators.items():
        if name in state.get("generators", {}):
            g.set_state(state["generators"][name].cpu())


@contextlib.contextmanager
def rng_untouched(device: torch.device, generators: dict[str, torch.Generator]) -> Iterator[None]:
    """Whatever runs inside draws from the torch RNGs and ``generators`` without moving
    them: their states are put back on exit (an evaluation that draws random 2:4
    patterns leaves the training stream as it found it)."""
    state = capture_rng_state(device, generators)
    try:
        yield
    finally:
        restore_rng_state(state, device, generators)


# what a run folder holds, its sharded checkpoints' folder (sharded_checkpoint.SHARDED_DIR) and its
# record of its tokens (data.DATA_RECORD_NAME) included: spelled here, as neither module can be imported
RUN_FILES = (CKPT_NAME, PREVIOUS_CKPT_NAME, WEIGHTS_NAME, CHECKSUMS_NAME, "config.toml", "metrics.jsonl",
             "tokenizer.json", "loss.png", "ckpt_sharded", "data.json")


def refuse_overwriting_a_run(out: str | Path, flag: str = "--out") -> None:
    """Refuse an output path that is a run folder or one of a run folder's own files (a
    folder holding ``config.toml``): writing there would destroy the run's checkpoint or
    record. Another name inside a run folder (a sidecar beside its checkpoint) is fine."""
    p = Path(out)
    if p.is_dir() and (p / "config.toml").is_file():
        raise CheckpointError(f"{flag} {out} is a run folder: writing there would replace the run's files; "
                              "give a path outside it or a new name in it")
    if (p.parent / "config.toml").is_file() and p.name in RUN_FILES:
        raise CheckpointError(f"{flag} {out} is a file of the run in {p.parent}: writing it would destroy the "
                              "run's own; give another name")


def warn(message: str) -> None:
    """One warning line on stderr (the CLI's format)."""
    sys.stderr.write(f"sparsetrain: warning: {message}\n")
    sys.stderr.flush()


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters), for one-line errors;
    an exception with an empty message gives its type alone."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


# ----------------------------------------------------------------------------- writing


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` to the file descriptor ``fd`` (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view[:WRITE_CHUNK])
        view = view[n:]


def fsync_file(path: str | Path) -> None:
    """Flush a file written without :func:`write_all` (``np.ndarray.tofile``, say) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | Path) -> None:
    """Make renames in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a fresh temporary file next to ``path``, on disk (fsynced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    os.close(fd)
    return Path(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (tmp file + fsync + rename)."""
    path = Path(path)
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` as UTF-8."""
    atomic_write_bytes(path, text.encode())


def remove_durably(path: str | Path) -> None:
    """Delete ``path`` if it exists, the removal made durable (the folder fsynced)."""
    path = Path(path)
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)


def remove_partial_writes(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed process left in ``folder`` (the names
    :func:`atomic_write_bytes` gives them: ``<name>.<8 random characters>.tmp``); returns them."""
    pattern = re.compile(r".+\.[a-z0-9_]{8}" + re.escape(TMP_SUFFIX))
    left = [p for p in Path(folder).iterdir() if pattern.fullmatch(p.name) and p.is_file()]
    for p in left:
        p.unlink(missing_ok=True)
    return left


# ----------------------------------------------------------------------------- checksums


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(WRITE_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_checksums(folder: str | Path) -> dict[str, str] | None:
    """``{name: sha256}`` from ``folder/checksums.sha256``; None when there is no such file.
    Lines that do not parse (a damaged file) are skipped: the files they vouched for then
    fail verification instead of passing it."""
    p = Path(folder) / CHECKSUMS_NAME
    if not p.is_file():
        return None
    out = {}
    for line in p.read_bytes().decode("utf-8", errors="replace").splitlines():
        m = _CHECKSUM_LINE.match(line.strip())
        if m:
            out[m.group(2)] = m.group(1)
    return out


def _write_checksums(folder: Path, entries: dict[str, str]) -> None:
    atomic_write_text(folder / CHECKSUMS_NAME, "".join(f"{h}  {name}\n" for name, h in sorted(entries.items())))


def verify_file(path: str | Path) -> str | None:
    """None when ``path`` is intact (its SHA-256 is one its folder's checksum file lists,
    or the folder has no checksum file); otherwise what is wrong, as a phrase."""
    p = Path(path)
    if not p.is_file():
        return "missing"
    listed = read_checksums(p.parent)
    if listed is None:
        return None
    if p.stat().st_size == 0:
        return "empty (0 bytes)"
    digest = file_sha256(p)
    if digest not in listed.values():
        return f"checksum mismatch (sha256 {digest[:12]}... is not in {CHECKSUMS_NAME})"
    _known_hashes[_stat_key(p)] = digest
    return None


def _intact_sha256(path: Path, listed: dict[str, str] | None) -> str | None:
    """The SHA-256 of ``path`` when it is intact (see :func:`verify_file`), else None."""
    if not path.is_file():
        return None
    key = _stat_key(path)
    digest = _known_hashes.get(key) or file_sha256(path)
    if listed is not None and digest not in listed.values():
        return None
    _known_hashes[key] = digest
    return digest


def _save_verified(path: Path, data: bytes, keep_previous: bool) -> None:
    """Write ``data`` to ``path`` durably, with its hash in the checksum file.

    The order keeps a verified file at every instant: (1) the new bytes go to a
    temporary file and are read back and hashed; (2) the checksum file lists the
    new hash and the current file's hash (under the previous name); (3) the
    current file becomes the previous one; (4) the new one takes its place. A
    damaged current file is not kept as the previous one: the previous stays."""
    folder = path.parent
    digest = hashlib.sha256(data).hexdigest()
    tmp = _write_temp(path, data)
    try:
        if file_sha256(tmp) != digest:
            raise CheckpointError(f"writing {path} did not verify (the bytes read back differ); the previous file is kept")
        listed = read_checksums(folder)
        entries = dict(listed or {})
        entries[path.name] = digest
        previous = path.with_name(path.stem + ".prev" + path.suffix)
        current = _intact_sha256(path, listed) if keep_previous else None
        if current is not None:
            entries[previous.name] = current
        _write_checksums(folder, entries)
        if current is not None:
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    _known_hashes[_stat_key(path)] = digest


# ----------------------------------------------------------------------------- full checkpoints


def save_checkpoint(path: str | Path, state: dict[str, Any], keep_previous: bool = True) -> None:
    """``torch.save`` ``state`` to ``path`` atomically and verified; with ``keep_previous``
    the checkpoint it replaces stays as ``<stem>.prev.pt`` (``ckpt.prev.pt``)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    _save_verified(Path(path), buf.getbuffer().tobytes(), keep_previous)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run directory or a checkpoint file; the path of the checkpoint to load.
    A run directory whose ``ckpt.pt`` is gone (a crash between two renames) gives
    ``ckpt.prev.pt``."""
    p = Path(path)
    if p.is_dir():
        if not (p / CKPT_NAME).is_file() and (p / PREVIOUS_CKPT_NAME).is_file():
            return p / PREVIOUS_CKPT_NAME
        p = p / CKPT_NAME
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return p


def _read_checkpoint(p: Path, map_location: str | torch.device) -> dict[str, Any]:
    problem = verify_file(p)
    if problem is not None:
        raise CheckpointError(f"checkpoint {p} is damaged: {problem}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {p}: {first_line(e)}") from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise CheckpointError(f"{p} is not a sparsetrain checkpoint")
    return state


def load_checkpoint_from(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path]:
    """Load a sparsetrain checkpoint; returns ``(state, file it came from)``.

    ``path`` is a checkpoint file (loaded as is, verified) or a run directory:
    its ``ckpt.pt``, or, when that one is missing or damaged, ``ckpt.prev.pt``
    with a one-line warning. Raises :class:`CheckpointError` (one line) when
    nothing loads."""
    p = Path(path)
    if not p.is_dir():
        file = resolve_checkpoint(p)
        return _read_checkpoint(file, map_location), file
    latest, previous = p / CKPT_NAME, p / PREVIOUS_CKPT_NAME
    if not latest.is_file() and not previous.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return _read_checkpoint(latest, map_location), latest
    except CheckpointError as e:
        why = "missing" if not latest.exists() else str(e).removeprefix(f"checkpoint {latest} is ")
        if not previous.is_file():
            raise
        try:
            state = _read_checkpoint(previous, map_location)
        except CheckpointError as e2:
            raise CheckpointError(f"no intact checkpoint in {p}: {CKPT_NAME} {why}; {PREVIOUS_CKPT_NAME}: "
                                  f"{str(e2).removeprefix(f'checkpoint {previous} is ')}") from None
        warn(f"{latest} is {why}; using the previous checkpoint {previous} (step {state.get('step', '?')})")
        return state, previous


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a sparsetrain checkpoint (a run directory or a ``.pt`` file), verified;
    see :func:`load_checkpoint_from`."""
    return load_checkpoint_from(path, map_location)[0]


def refuse_other_tokenizer(run_dir: str | Path, tokenizer_path: str | Path | None, who: str) -> None:
    """Raise :class:`CheckpointError` when the run in ``run_dir`` was trained with
    another tokenizer than ``tokenizer_path`` (the one that made this run's tokens):
    its weights would read the same ids as other text. The run's ``tokenizer.json``
    is compared byte for byte; a run without one, or tokens without a tokenizer (a
    ``.bin`` corpus given none), leave nothing to compare and pass."""
    theirs = Path(run_dir) / "tokenizer.json"
    if theirs.is_file() and tokenizer_path is not None and theirs.read_bytes() != Path(tokenizer_path).read_bytes():
        raise CheckpointError(f"{who} {run_dir} was trained with another tokenizer than this corpus's "
                              f"({tokenizer_path}): its token ids would mean other text; tokenize with its own "
                              f"(--tokenizer {theirs})")


# ----------------------------------------------------------------------------- weights only


@dataclass
class Weights:
    """A weights-only file: the model's tensors and the config it was built from."""

    tensors: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    step: int


def save_weights(path: str | Path, model_state: dict[str, torch.Tensor], model_config: dict[str, Any], step: int) -> None:
    """Write the model's tensors as safetensors (CPU, contiguous, shared storage
    copied apart), with the model config and step as metadata, verified like a
    checkpoint; inference needs nothing else."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model_state.items() if isinstance(v, torch.Tensor)}
    meta = {"format": "pt", "model_config": json.dumps(model_config), "step": str(step)}
    _save_verified(Path(path), save(tensors, metadata=meta), keep_previous=False)


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> Weights:
    """Read (and verify) a file written by :func:`save_weights`."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    problem = verify_file(p)
    if problem == "missing":
        raise CheckpointError(f"no weights file at {p}")
    if problem is not None:
        raise CheckpointError(f"weights file {p} is damaged: {problem}")
    try:
        with safe_open(str(p), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config, step = json.loads(meta["model_config"]), int(meta["step"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read weights file {p}: {first_line(e)}") from None
    return Weights(tensors, config, step)
