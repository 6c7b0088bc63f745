"""Async loader: the same batches in the same order as the sync loader, worker
errors surface with their message, and nothing is left running."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain.loader import AsyncLoader, SyncLoader, TokenBatchSource, iterate


def _source(tmp_path: Path, **kw) -> TokenBatchSource:
    tokens = np.random.randint(0, 5000, size=20_000).astype(np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    base = dict(path=str(tmp_path / "t.bin"), dtype="uint16", offset=1000, length=15_000, batch_size=4, seq_len=32,
                seed=int(np.random.randint(1 << 30)), rank=0, world_size=1)
    base.update(kw)
    return TokenBatchSource(**base)


def _no_children() -> bool:
    return not [p for p in mp.active_children() if p.is_alive()]


@pytest.mark.parametrize("n_workers, prefetch", [(1, 1), (3, 2)])
def test_async_equals_sync(tmp_path: Path, n_workers: int, prefetch: int) -> None:
    src = _source(tmp_path)
    sync = list(iterate(SyncLoader(src, start_step=5, grad_accum=2, device=torch.device("cpu")), 12))
    with AsyncLoader(src, 5, 2, torch.device("cpu"), n_workers, prefetch) as loader:
        got = list(iterate(loader, 12))
    for (a, b), (c, d) in zip(sync, got):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert _no_children()


def test_sync_batches_read_the_right_slice(tmp_path: Path) -> None:
    src = _source(tmp_path)
    x, y = SyncLoader(src, 0, 1, torch.device("cpu")).next()
    full = np.fromfile(src.path, dtype=np.uint16)[src.offset : src.offset + src.length].astype(np.int64)
    hay = torch.from_numpy(full)
    for row in range(x.shape[0]):  # every window is a contiguous run of the slice, y shifted by one
        starts = torch.nonzero(hay[:-32] == x[row, 0]).squeeze(1)
        assert any(torch.equal(hay[s : s + 32], x[row]) and torch.equal(hay[s + 1 : s + 33], y[row]) for s in starts)


def test_worker_error_surfaces_and_cleans_up(tmp_path: Path) -> None:
    src = _source(tmp_path, seq_len=100_000)  # longer than the data: train_batch raises in the worker
    loader = AsyncLoader(src, 0, 1, torch.device("cpu"), n_workers=2, prefetch=1)
    with pytest.raises(RuntimeError, match="fewer than seq_len"):
        loader.next()
    loader.close()
    assert _no_children()


def test_early_close_stops_workers(tmp_path: Path) -> None:
    loader = AsyncLoader(_source(tmp_path), 0, 1, torch.device("cpu"), n_workers=2, prefetch=2)
    loader.next()
    loader.close()  # as on Ctrl-C or at the end of training, with queues still full
    loader.close()  # idempotent
    assert _no_children()
    with pytest.raises(RuntimeError, match="closed"):
        loader.next()


def test_text_source_tokenizes_on_the_fly_and_async_agrees(tmp_path: Path, corpus_dir: Path) -> None:
    from sparsetrain.loader import TextBatchSource
    from sparsetrain.tokenizer import BPETokenizer

    files = sorted(str(p) for p in corpus_dir.rglob("*.py"))
    texts = [Path(f).read_text() for f in files]
    tok = BPETokenizer.train(texts, 300)
    tok.save(tmp_path / "tok.json")
    src = TextBatchSource(files=tuple(files), tokenizer_path=str(tmp_path / "tok.json"), batch_size=3, seq_len=40,
                          seed=int(np.random.randint(1 << 30)))
    sync = list(iterate(SyncLoader(src, 2, 1, torch.device("cpu")), 4))
    with AsyncLoader(src, 2, 1, torch.device("cpu"), n_workers=2, prefetch=1) as loader:
        got = list(iterate(loader, 4))
    for (a, b), (c, d) in zip(sync, got):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert _no_children()
    # each row is a window over whole documents joined by end-of-text: every piece
    # between separators is a substring of one document; y is x shifted by one
    x, y = sync[0]
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in x.tolist():
        pieces, cur = [], []
        for t in row:
            if t == tok.eot_id:
                pieces.append(cur)
                cur = []
            else:
                cur.append(t)
        pieces.append(cur)
        for piece in pieces:
            if piece:
                assert any(tok.decode(piece) in text for text in texts)


def test_workers_exit_when_the_trainer_is_killed(tmp_path: Path) -> None:
    """A trainer killed outright (SIGKILL: no close, no stop event) leaves no worker
    behind: each notices its parent is gone while its queue is full, and exits."""
    import os
    import signal
    import subprocess
    import sys
    import time

    src = _source(tmp_path)
    script = f"""
import sys, os, numpy as np, torch
from sparsetrain.loader import AsyncLoader, TokenBatchSource
src = TokenBatchSource(path={src.path!r}, dtype="uint16", offset=1000, length=15_000, batch_size=4, seq_len=32,
                       seed=3, rank=0, world_size=1)
loader = AsyncLoader(src, 0, 1, torch.device("cpu"), n_workers=2, prefetch=1)
loader.next()
print(" ".join(str(p.pid) for p in loader._procs), flush=True)
sys.stdin.read()  # wait to be killed, the queues full
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                            text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z" if os.path.exists(f"/proc/{pid}/stat") else True

    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [p for p in pids if alive(p)]
    for p in survivors:  # a failure must not leave them running
        os.kill(p, signal.SIGKILL)
    assert not survivors, survivors


def _marked_files(root: Path, n: int, newline: str = "\n") -> list[str]:
    """``n`` files, file ``i`` holding the word ``fileNNN`` on every line."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"f{i:03d}.txt"
        p.write_bytes(newline.join([f"file{i:03d} line {j}" for j in range(6)]).encode() + newline.encode())
        paths.append(str(p))
    return paths


def test_text_source_reads_bytes_and_shards_files_by_rank(tmp_path: Path) -> None:
    """On the fly, each process draws from its own files (``files[rank::world_size]``), as
    the token cache gives each its own range, and reads them as bytes, as the cache does
    (CRLF stays CRLF: the model trains on the newlines it is evaluated on)."""
    from sparsetrain.loader import TextBatchSource
    from sparsetrain.tokenizer import BPETokenizer

    files = _marked_files(tmp_path / "docs", 8, newline="\r\n")
    tok = BPETokenizer.train([Path(f).read_bytes().decode() for f in files], 300)
    tok.save(tmp_path / "tok.json")
    seen: dict[int, set[str]] = {}
    for rank in (0, 1):
        src = TextBatchSource(files=tuple(files), tokenizer_path=str(tmp_path / "tok.json"), batch_size=4, seq_len=64,
                              seed=int(np.random.randint(1 << 30)), rank=rank, world_size=2)
        text = "".join(tok.decode([t for t in row if t != tok.eot_id]) for s in range(6)
                       for row in src.batch(tok, s, 0)[0].tolist())
        assert "\r\n" in text
        seen[rank] = {w for w in text.replace("\r", " ").replace("\n", " ").split() if len(w) == 7 and w.startswith("file")}
    assert seen[0] and seen[1] and not seen[0] & seen[1], seen
    assert seen[0] <= {f"file{i:03d}" for i in range(0, 8, 2)} and seen[1] <= {f"file{i:03d}" for i in range(1, 8, 2)}
