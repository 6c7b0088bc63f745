"""Fault injection: kill the trainer (SIGKILL) at durable-write events, inside
checkpoint and log writes too; fill the disk (ENOSPC) at each; damage files
(truncate, zero a block, flip bits). After every fault the run either resumes
or is refused with one line; a resumed run ends exactly where an uninterrupted
one does (same losses, same weights), no row up to the restored checkpoint is
lost, and the log matches the checkpoint.

The normal suite runs a short selection (well under 30 s on 2 cores);
``SPARSETRAIN_FAULTS=full`` runs every event with every action and more
damage seeds, and prints how many faults were survived (``pytest -s``).

A durable-write event is an ``os.write``, ``os.fsync`` or ``os.replace`` on a
file in the run folder. Kills run in processes forked from one warm helper
process (imports done once, no torch work before the fork), so each costs a
training run, not an interpreter start.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from sparsetrain import checkpoint
from test_cli import SMALL, run_main

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")

FULL = os.environ.get("SPARSETRAIN_FAULTS") == "full"
REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 12
SCHEDULE = ["--max-steps", str(MAX_STEPS), "--ckpt-every", "3", "--eval-every", "4", "--log-every", "2"]
EVAL_STEPS = [0, 4, 8, 12]

# Shared by this process (counting, ENOSPC) and the forked children (kills).
INJECTOR = r'''
import errno as _errno, os as _os, random as _random, signal as _signal


class Injector:
    """Counts os.write / os.fsync / os.replace calls on files under ``folder``; at call
    number ``at`` (1-based) does ``action``: kill (SIGKILL before the call), kill-after
    (after it), tear (write a random prefix of the bytes, then SIGKILL), enospc (raise
    ENOSPC), enospc-partial (write a prefix, then raise ENOSPC)."""

    def __init__(self, folder, at=0, action="count", seed=0):
        self.folder, self.at, self.action = _os.path.realpath(folder), at, action
        self.rng = _random.Random(seed)
        self.events = []  # (kind, file name)

    def _mine(self, path):
        path = _os.path.realpath(path)
        return path == self.folder or path.startswith(self.folder + "/")

    def _fd_path(self, fd):
        try:
            return _os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return ""

    def _event(self, kind, path, real, args, data=None):
        if not self._mine(path):
            return real(*args)
        self.events.append((kind, _os.path.basename(path)))
        if len(self.events) != self.at:
            return real(*args)
        if self.action == "kill":
            _os.kill(_os.getpid(), _signal.SIGKILL)
        if self.action in ("tear", "enospc-partial") and data is not None and len(data) > 1:
            real(args[0], bytes(data)[: self.rng.randrange(1, len(data))])
            if self.action == "tear":
                _os.kill(_os.getpid(), _signal.SIGKILL)
        if self.action.startswith("enospc"):
            raise OSError(_errno.ENOSPC, _os.strerror(_errno.ENOSPC))
        if self.action == "tear":  # nothing to tear (fsync, replace): a plain kill
            _os.kill(_os.getpid(), _signal.SIGKILL)
        out = real(*args)
        if self.action == "kill-after":
            _os.kill(_os.getpid(), _signal.SIGKILL)
        return out

    def install(self):
        self.saved = (_os.write, _os.fsync, _os.replace)
        w, f, r = self.saved
        _os.write = lambda fd, data: self._event("write", self._fd_path(fd), w, (fd, data), data)
        _os.fsync = lambda fd: self._event("fsync", self._fd_path(fd if isinstance(fd, int) else fd.fileno()), f, (fd,))
        _os.replace = lambda src, dst, **k: self._event("replace", _os.fspath(dst), lambda a, b: r(a, b, **k), (src, dst))
        return self

    def uninstall(self):
        _os.write, _os.fsync, _os.replace = self.saved
'''

# A warm process: imports sparsetrain once, then forks one child per case read from stdin
ZYGOTE = INJECTOR + r'''
import json, sys
import sparsetrain.cli

for line in sys.stdin:
    case = json.loads(line)
    sys.stdout.flush()
    pid = _os.fork()
    if pid == 0:
        code = 99
        try:
            log = _os.open(case["log"], _os.O_WRONLY | _os.O_CREAT | _os.O_TRUNC)
            _os.dup2(log, 1)
            _os.dup2(log, 2)
            Injector(case["folder"], case["at"], case["action"], case["seed"]).install()
            code = sparsetrain.cli.main(case["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 98
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            _os._exit(code)
    _, status = _os.waitpid(pid, 0)
    print(json.dumps({"code": _os.waitstatus_to_exitcode(status)}), flush=True)
'''


class Zygote:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def run(self, argv: list[str], folder: Path, at: int, action: str, seed: int, log: Path) -> int:
        self.proc.stdin.write(json.dumps({"argv": argv, "folder": str(folder), "at": at, "action": action,
                                          "seed": seed, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["code"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


namespace: dict = {}
exec(INJECTOR, namespace)
Injector = namespace["Injector"]


@dataclass
class Tally:
    """Faults injected and survived, by kind."""

    counts: dict[str, list[int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, kind: str, ok: bool, what: str) -> None:
        c = self.counts.setdefault(kind, [0, 0])
        c[0] += 1
        c[1] += ok
        if not ok:
            self.failures.append(what)

    def summary(self) -> str:
        return "; ".join(f"{k}: survived {s} of {n}" for k, (n, s) in self.counts.items())


@dataclass
class Reference:
    """An uninterrupted run: its rows, final weights and durable-write events."""

    run: Path
    train: dict[int, float]
    evals: dict[int, float]
    weights: dict[str, torch.Tensor]
    events: list[tuple[str, str]]


def read_rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def one_line_error(code: int, err: str) -> bool:
    lines = err.strip().splitlines()
    return code == 2 and len(lines) == 1 and lines[0].startswith("sparsetrain: error:") and "Traceback" not in err


@pytest.fixture(scope="module")
def flags(corpus_dir: Path, cache_dir: Path) -> list[str]:
    return SMALL + ["--data", str(corpus_dir), "--cache-dir", str(cache_dir)] + SCHEDULE


@pytest.fixture(scope="module")
def reference(flags: list[str], tmp_path_factory: pytest.TempPathFactory) -> Reference:
    run = tmp_path_factory.mktemp("faults") / "reference"
    inj = Injector(str(run)).install()
    try:
        code = main_quiet(["train", *flags, "--out-dir", str(run)])
    finally:
        inj.uninstall()
    assert code == 0
    rows = read_rows(run)
    return Reference(run, {r["step"]: r["loss"] for r in rows if r["kind"] == "train"},
                     {r["step"]: r["val_loss"] for r in rows if r["kind"] == "eval"},
                     checkpoint.load_checkpoint(run)["model"], inj.events)


def main_quiet(argv: list[str]) -> int:
    """The CLI in this process with its output captured: (exit code)."""
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    from sparsetrain.cli import main

    with redirect_stdout(StringIO()), redirect_stderr(StringIO()):
        try:
            return main(argv)
        except SystemExit as e:
            return e.code


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def check_recovered(run: Path, ref: Reference, before: list[dict], restored: int, capsys, log_intact: bool = True) -> str | None:
    """Resume ``run`` (restored from step ``restored``) and check it against the reference;
    None when all holds, else what failed. With a damaged log (``log_intact`` false) only
    the rows after the checkpoint are checked."""
    code, out, err = run_main(["train", "--resume", str(run)], capsys)
    if code != 0:
        return f"resume exit {code}: {err.strip()[-300:]}"
    if "Traceback" in err or len([ln for ln in err.splitlines() if ln.strip()]) > 1:
        return f"resume printed more than one line: {err[-300:]}"
    rows = read_rows(run)
    first = 1 if log_intact else restored + 1
    train = [r["step"] for r in rows if r.get("kind") == "train" and r["step"] >= first]
    if train != list(range(first, MAX_STEPS + 1)):
        return f"train rows {train}"
    evals = [r["step"] for r in rows if r.get("kind") == "eval" and (log_intact or r["step"] > restored)]
    if evals != [s for s in EVAL_STEPS if log_intact or s > restored]:
        return f"eval rows {evals}"
    got = {r["step"]: r["loss"] for r in rows if r.get("kind") == "train" and r["step"] >= first}
    if any(abs(got[s] - ref.train[s]) > 1e-5 * abs(ref.train[s]) for s in got):
        return "losses differ from the uninterrupted run"
    # every well-formed row up to the checkpoint (a damaged log: those the damage left well-formed)
    kept = [r for r in before if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= restored]
    if any(r not in rows for r in kept):
        return "a row up to the restored checkpoint was lost"
    if list(run.glob("*.tmp")):
        return f"temporary files left: {[p.name for p in run.glob('*.tmp')]}"
    state = checkpoint.load_checkpoint(run)
    if state["step"] != MAX_STEPS or checkpoint.verify_file(run / "ckpt.pt") is not None:
        return f"final checkpoint step {state['step']}"
    if any(not torch.allclose(state["model"][k], v, rtol=1e-5, atol=1e-7) for k, v in ref.weights.items()):
        return "final weights differ from the uninterrupted run"
    return None


def snapshot(run: Path) -> tuple[list[dict], int | None]:
    """The rows (torn last line left out) and the step of the checkpoint a resume would load."""
    rows = []
    if (run / "metrics.jsonl").is_file():
        for ln in (run / "metrics.jsonl").read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(ln))
            except ValueError:
                pass
    try:
        state, _ = checkpoint.load_checkpoint_from(run)
        return rows, int(state["step"])
    except checkpoint.CheckpointError:
        return rows, None


def stale_weights(run: Path, restored: int | None) -> str | None:
    """What ``generate`` and ``eval`` would read must not be newer than what a resume
    keeps: the weights-only file, where present and intact, holds the checkpoint's step."""
    weights = run / checkpoint.WEIGHTS_NAME
    if not weights.is_file() or checkpoint.verify_file(weights) is not None:
        return None
    step = checkpoint.load_weights(weights).step
    if restored is None or step != restored:
        return f"{weights.name} holds step {step}, the checkpoint a resume loads step {restored}"
    return None


def after_fault(run: Path, flags: list[str], ref: Reference, capsys) -> str | None:
    """A fault has hit ``run``: it must resume to the reference; with nothing saved yet
    but its config, --resume trains it from step 0 to the reference (no row before
    vouched for); with not even that, --resume and a new run into the same folder are
    refused with one line."""
    before, restored = snapshot(run)
    capsys.readouterr()  # the snapshot's own fallback warning
    stale = stale_weights(run, restored)
    if stale:
        return stale
    if restored is None and (run / "config.toml").is_file():
        return check_recovered(run, ref, [], 0, capsys)
    if restored is None:
        code, _, err = run_main(["train", "--resume", str(run)], capsys)
        if not one_line_error(code, err):
            return f"unresumable run: resume gave exit {code}: {err.strip()[-300:]}"
        if run.is_dir() and any(run.iterdir()):
            code, _, err = run_main(["train", *flags, "--out-dir", str(run)], capsys)
            if not one_line_error(code, err):
                return f"a new run into the unresumable folder: exit {code}: {err.strip()[-300:]}"
        return None
    return check_recovered(run, ref, before, restored, capsys)


def kill_plan(ref: Reference, rng: random.Random) -> list[tuple[int, str]]:
    """(event number, action) pairs: every event with every action in the full run,
    else a few chosen inside a checkpoint write, between its renames and in a log write."""
    actions = {"write": ("tear", "kill", "kill-after"), "fsync": ("kill", "kill-after"), "replace": ("kill", "kill-after")}
    every = [(i, a) for i, (kind, _) in enumerate(ref.events, 1) for a in actions[kind]]
    if FULL:
        return every
    ckpt_writes = [i for i, (k, n) in enumerate(ref.events, 1) if k == "write" and n.startswith("ckpt.pt.")]
    demotions = [i for i, (k, n) in enumerate(ref.events, 1) if k == "replace" and n == "ckpt.prev.pt"]
    log_writes = [i for i, (k, n) in enumerate(ref.events, 1) if k == "write" and n == "metrics.jsonl"]
    return [(rng.choice(ckpt_writes[1:]), "tear"), (rng.choice(demotions), "kill-after"), (rng.choice(log_writes[4:]), "tear")]


def test_kills_at_durable_writes(flags: list[str], reference: Reference, zygote: Zygote, tmp_path: Path, capsys) -> None:
    rng = random.Random(0)
    tally = Tally()
    plan = kill_plan(reference, rng)
    for n, (at, action) in enumerate(plan):
        run = tmp_path / f"kill{n}"
        log = tmp_path / f"kill{n}.log"
        code = zygote.run(["train", *flags, "--out-dir", str(run)], run, at, action, n, log)
        what = f"{action} at event {at} {reference.events[at - 1]}"
        if code == 0:  # the event was swallowed (a directory fsync), or killed after the last one
            problem = None if read_rows(run)[-1]["step"] == MAX_STEPS else "exit 0 before the end"
        elif code != -9:
            problem = f"exit {code}: {log.read_text()[-300:]}"
        else:
            problem = after_fault(run, flags, reference, capsys)
        tally.add("kill", problem is None, f"{what}: {problem}")
        shutil.rmtree(run, ignore_errors=True)
    print(f"\nfault injection, kills: {tally.summary()}")
    assert not tally.failures, tally.failures[:5]


def test_full_disk_at_durable_writes(flags: list[str], reference: Reference, tmp_path: Path, capsys) -> None:
    rng = random.Random(1)
    writes = [i for i, (k, _) in enumerate(reference.events, 1) if k in ("write", "fsync")]
    plan = [(i, a) for i in writes for a in ("enospc", "enospc-partial")] if FULL else \
        [(rng.choice(writes), "enospc-partial") for _ in range(3)]
    tally = Tally()
    for n, (at, action) in enumerate(plan):
        run = tmp_path / f"full{n}"
        inj = Injector(str(run), at, action, n).install()
        try:
            code, _, err = run_main(["train", *flags, "--out-dir", str(run)], capsys)
        finally:
            inj.uninstall()
        if code == 0:  # a directory fsync's failure is ignored: nothing was lost
            problem = None if read_rows(run)[-1]["step"] == MAX_STEPS else "exit 0 before the end"
        elif not one_line_error(code, err):
            problem = f"exit {code}: {err.strip()[-300:]}"
        else:
            problem = after_fault(run, flags, reference, capsys)
        tally.add("disk full", problem is None, f"{action} at event {at} {reference.events[at - 1]}: {problem}")
        shutil.rmtree(run, ignore_errors=True)
    print(f"\nfault injection, full disk: {tally.summary()}")
    assert not tally.failures, tally.failures[:5]


@pytest.mark.parametrize("target", ["model.safetensors", "metrics.jsonl"])
def test_full_disk_names_the_file_and_what_is_kept(target: str, flags: list[str], reference: Reference, tmp_path: Path,
                                                  capsys) -> None:
    """A full disk at the second checkpoint's weights-only file (the checkpoint itself
    written) or at a log row after it: one line naming the file, the checkpoint kept and
    how to go on; no weights file newer than the checkpoint; generate reads the run."""
    writes = [i for i, (k, n) in enumerate(reference.events, 1) if k == "write" and n.startswith(target)]
    ckpts = [i for i, e in enumerate(reference.events, 1) if e == ("replace", "ckpt.pt")]
    at = next(i for i in writes if i > ckpts[1])  # after the step-6 checkpoint is in place
    run = tmp_path / "full"
    inj = Injector(str(run), at, "enospc-partial", 0).install()
    try:
        code, _, err = run_main(["train", *flags, "--out-dir", str(run)], capsys)
    finally:
        inj.uninstall()
    assert one_line_error(code, err), err
    assert target in err and "No space left on device" in err and f"--resume {run}" in err, err
    assert "(step 6)" in err or "step-6 checkpoint is written" in err, err
    before, restored = snapshot(run)
    assert restored == 6
    assert stale_weights(run, restored) is None
    assert (run / checkpoint.WEIGHTS_NAME).is_file() == (target != "model.safetensors")
    code, out, err = run_main(["generate", "--ckpt", str(run), "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    assert check_recovered(run, reference, before, restored, capsys) is None


def damage(path: Path, how: str, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: rng.randrange(0, max(len(data), 1))]
    elif how == "zero-block":
        start = rng.randrange(0, max(len(data) - 1, 1))
        data[start : start + 4096] = bytes(len(data[start : start + 4096]))
    elif how == "flip-bits":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def test_damaged_files(flags: list[str], reference: Reference, zygote: Zygote, tmp_path: Path, capsys) -> None:
    # the base: killed right after the step-6 checkpoint and its weights-only file are in place
    at = [i for i, e in enumerate(reference.events, 1) if e == ("replace", "model.safetensors")][1]
    base = tmp_path / "base"
    assert zygote.run(["train", *flags, "--out-dir", str(base)], base, at, "kill-after", 0, tmp_path / "base.log") == -9
    assert checkpoint.load_checkpoint(base)["step"] == 6
    rng = random.Random(2)
    targets = ["ckpt.pt", "ckpt.prev.pt", "both", "checksums.sha256", "model.safetensors", "metrics.jsonl", "config.toml",
               "tokenizer.json"]
    if not FULL:  # the short run: the fallback, the refusal, a damaged checksum file and a damaged log
        targets = ["ckpt.pt", "both", "checksums.sha256", "metrics.jsonl"]
    hows = ["truncate", "zero-block", "flip-bits"]
    seeds = range(4) if FULL else range(1)
    tally = Tally()
    for n, target in enumerate(targets):
        for how in hows if FULL else [hows[n % len(hows)]]:  # the short run: one kind of damage per file
            for seed in seeds:
                run = tmp_path / f"{target}-{how}-{seed}"
                shutil.copytree(base, run)
                for name in (["ckpt.pt", "ckpt.prev.pt"] if target == "both" else [target]):
                    damage(run / name, how, rng)
                problem = damaged_outcome(run, target, flags, reference, capsys)
                tally.add("damage", problem is None, f"{how} {target} (seed {seed}): {problem}")
                shutil.rmtree(run, ignore_errors=True)
    print(f"\nfault injection, damaged files: {tally.summary()}")
    assert not tally.failures, tally.failures[:5]


def damaged_outcome(run: Path, target: str, flags: list[str], ref: Reference, capsys) -> str | None:
    """What a damaged file must lead to: resume or a one-line refusal; never a silent bad load."""
    if target == "model.safetensors":  # generate falls back to the full checkpoint; resume does not read it
        code, out, err = run_main(["generate", "--ckpt", str(run), "--max-new-tokens", "4"], capsys)
        if code != 0 or len(err.strip().splitlines()) > 1:
            return f"generate exit {code}: {err.strip()[-300:]}"
    if target == "tokenizer.json":
        code, _, err = run_main(["generate", "--ckpt", str(run), "--max-new-tokens", "4"], capsys)
        if code != 0 and not one_line_error(code, err):
            return f"generate exit {code}: {err.strip()[-300:]}"
    before, restored = snapshot(run)
    capsys.readouterr()  # the snapshot's own fallback warning
    # a damaged tokenizer.json is another tokenizer than the checkpoint's: resumed, or refused in one line
    if target in ("both", "checksums.sha256") and restored is None or target in ("config.toml", "tokenizer.json"):
        code, _, err = run_main(["train", "--resume", str(run)], capsys)
        if code == 0 and target == "config.toml":
            return None  # a flipped bit in a comment, say; its settings are the user's to check
        if code == 0 and target == "tokenizer.json":  # left whole by the damage (a flip in a string the BPE ignores)
            return check_recovered(run, ref, before, restored, capsys) if restored is not None else None
        if target == "tokenizer.json" and "another tokenizer" not in err:
            return f"resume exit {code} without naming the tokenizer: {err.strip()[-300:]}"
        return None if one_line_error(code, err) else f"resume exit {code}: {err.strip()[-300:]}"
    if restored is None:
        return "no checkpoint loads though only one file was damaged"
    return check_recovered(run, ref, before, restored, capsys, log_intact=target != "metrics.jsonl")
