"""Batch loaders: synchronous, and asynchronous with background workers.

Both yield the batches of steps ``start, start + 1, ...`` (``grad_accum``
micro-batches each) in the same order with the same contents: a batch is a
pure function of ``(seed, step, micro, rank)`` (see ``data.train_batch``), so
worker ``w`` can build every batch ``i`` with ``i % n_workers == w`` on its own
and the consumer reads the workers' queues round-robin.

The async loader builds batches in worker processes (reading, and for raw
text sources tokenizing and packing), pins them in a consumer thread and
copies them to the GPU with non-blocking transfers while the current step
runs. A worker's exception is raised in the main process with its traceback
text; ``close()`` (also on Ctrl-C and at the end of data) stops every worker.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .data import train_batch


@dataclass(frozen=True)
class TokenBatchSource:
    """Picklable recipe for training batches from a token file (what workers get
    instead of the memory-mapped array itself)."""

    path: str
    dtype: str
    offset: int  # in tokens
    length: int  # in tokens
    batch_size: int
    seq_len: int
    seed: int
    rank: int = 0
    world_size: int = 1

    def open(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r")[self.offset : self.offset + self.length]

    def batch(self, tokens: np.ndarray, step: int, micro: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = train_batch(tokens, self.batch_size, self.seq_len, seed=self.seed, step=step, micro=micro,
                           rank=self.rank, world_size=self.world_size)
        return x.numpy(), y.numpy()


@dataclass(frozen=True)
class TextBatchSource:
    """Raw text files, read and tokenized when a batch is built (no token cache).

    Row ``b`` of batch ``(step, micro)`` concatenates documents drawn with a
    generator seeded by ``(seed, step, micro, rank, b)``, separated by
    end-of-text, and takes a random ``seq_len + 1`` window: a pure function of
    its arguments, like :class:`TokenBatchSource`, so sync and async loaders
    agree. It costs real CPU time per batch (reading and BPE-encoding whole
    files), which is what the async loader exists to hide.
    """

    files: tuple[str, ...]
    tokenizer_path: str
    batch_size: int
    seq_len: int
    seed: int
    rank: int = 0
    world_size: int = 1

    def open(self):
        from .tokenizer import BPETokenizer

        return BPETokenizer.load(self.tokenizer_path)

    def batch(self, tokenizer, step: int, micro: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        # each process its own files (every one of them where there are fewer files than processes)
        files = self.files[self.rank :: self.world_size] if len(self.files) >= self.world_size else self.files
        for b in range(self.batch_size):
            rng = np.random.default_rng([self.seed, step, micro, self.rank, b])
            ids: list[int] = []
            while len(ids) < self.seq_len + 1:
                path = files[int(rng.integers(len(files)))]
                with open(path, "rb") as f:  # bytes, as the token cache reads them: CRLF stays CRLF
                    ids += tokenizer.encode(f.read().decode("utf-8", errors="replace")) + [tokenizer.eot_id]
            start = int(rng.integers(0, len(ids) - self.seq_len))
            rows[b] = ids[start : start + self.seq_len + 1]
        return rows[:, :-1], rows[:, 1:]


def _index(i: int, start: int, grad_accum: int) -> tuple[int, int]:
    """The i-th batch of the stream: (step, micro)."""
    return start + i // grad_accum, i % grad_accum


class SyncLoader:
    """Builds each batch when asked, in the calling thread."""

    def __init__(self, source: TokenBatchSource | TextBatchSource, start_step: int, grad_accum: int, device: torch.device) -> None:
        self.source, self.start, self.grad_accum, self.device = source, start_step, grad_accum, device
        self._tokens = source.open()  # the token array, or the tokenizer of a text source
        self._i = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        step, micro = _index(self._i, self.start, self.grad_accum)
        self._i += 1
        x, y = self.source.batch(self._tokens, step, micro)
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def close(self) -> None:
        pass

    def __enter__(self) -> "SyncLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _worker(source: TokenBatchSource | TextBatchSource, w: int, n_workers: int, start: int, grad_accum: int, out: mp.Queue,
            stop: mp.Event) -> None:
    parent = mp.parent_process()  # a trainer killed (SIGKILL, the OOM killer) never sets stop: watch it too

    def done() -> bool:
        return stop.is_set() or (parent is not None and not parent.is_alive())

    try:
        tokens = source.open()  # the token array, or the tokenizer of a text source
        i = w
        while not done():
            step, micro = _index(i, start, grad_accum)
            item = ("ok", i, *source.batch(tokens, step, micro))
            while not done():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            i += n_workers
    except KeyboardInterrupt:
        pass
    except BaseException as e:  # surfaces in the main process
        out.put(("error", w, f"{type(e).__name__}: {e}\n{traceback.format_exc()}", None))


class AsyncLoader:
    """``n_workers`` processes build batches ahead (``prefetch`` per worker); a
    consumer thread pins them and starts their copy to the device."""

    def __init__(self, source: TokenBatchSource | TextBatchSource, start_step: int, grad_accum: int, device: torch.device,
                 n_workers: int = 2, prefetch: int = 4) -> None:
        if n_workers < 1 or prefetch < 1:
            raise ValueError(f"n_workers and prefetch must be >= 1, got {n_workers}, {prefetch}")
        self.device = device
        ctx = mp.get_context("spawn")  # safe with CUDA initialised in the parent
        self._stop = ctx.Event()
        self._queues = [ctx.Queue(maxsize=prefetch) for _ in range(n_workers)]
        self._procs = [
            ctx.Process(target=_worker, args=(source, w, n_workers, start_step, grad_accum, q, self._stop), daemon=True)
            for w, q in enumerate(self._queues)
        ]
        for p in self._procs:
            p.start()
        self._ready: queue.Queue = queue.Queue(maxsize=2)
        self._thread_stop = threading.Event()
        self._thread = threading.Thread(target=self._consume, daemon=True)
        self._thread.start()
        self._closed = False

    def _consume(self) -> None:
        """Round-robin over the workers' queues (this keeps the order), pin, and
        start the host-to-device copy."""
        i = 0
        pin = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if pin else None
        try:
            while not self._thread_stop.is_set():
                q = self._queues[i % len(self._queues)]
                try:
                    kind, idx, a, b = q.get(timeout=0.1)
                except queue.Empty:
                    if not self._procs[i % len(self._procs)].is_alive() and q.empty():
                        raise RuntimeError(f"async loader worker {i % len(self._procs)} died without a message")
                    continue
                if kind == "error":
                    raise RuntimeError(f"async loader worker {idx} failed: {a}")
                assert idx == i, (idx, i)  # a worker only ever produces its own indices, in order
                x, y = torch.from_numpy(a), torch.from_numpy(b)
                if pin:
                    with torch.cuda.stream(stream):
                        x = x.pin_memory().to(self.device, non_blocking=True)
                        y = y.pin_memory().to(self.device, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    event = None
                self._put(("ok", x, y, event))
                i += 1
        except BaseException as e:
            self._put(("error", e, None, None))

    def _put(self, item) -> None:
        while not self._thread_stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._closed:
            raise RuntimeError("the async loader is closed")
        while True:
            try:
                kind, x, y, event = self._ready.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("async loader consumer thread stopped") from None
        if kind == "error":
            self.close()
            raise x
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)  # the copy finished before use
            # made on the loader's stream: without this, their memory could go back to that stream's pool
            # (and be refilled by a later batch) while work queued here still reads them
            x.record_stream(stream)
            y.record_stream(stream)
        return x, y

    def close(self) -> None:
        """Stop and join every worker and the consumer thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread_stop.set()
        self._thread.join(timeout=5)
        for q in self._queues:  # unblock workers waiting on a full queue
            try:
                while True:
                    q.get_nowait()
            except (queue.Empty, OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for q in self._queues:
            q.close()
            q.join_thread()

    def __enter__(self) -> "AsyncLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def iterate(loader: SyncLoader | AsyncLoader, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The next ``n`` batches."""
    for _ in range(n):
        yield loader.next()


def make_loader(corpus, batch_size: int, seq_len: int, seed: int, rank: int, world_size: int, start_step: int,
                grad_accum: int, device: torch.device, use_async: bool, n_workers: int = 2,
                prefetch: int = 4, on_the_fly: bool = False) -> SyncLoader | AsyncLoader:
    """The trainer's loader for a :class:`~sparsetrain.data.TokenizedCorpus`:
    batches from its token cache, or (``on_the_fly``) read and tokenized from
    its raw train-split files for every batch."""
    source: TokenBatchSource | TextBatchSource
    if on_the_fly:
        if not corpus.train_text_files or corpus.tokenizer_path is None:
            from .errors import DataError

            raise DataError("data_on_the_fly needs a text corpus split by file (a folder with files on both sides of "
                            "val_fraction), not a .bin token file or a text whose held-out part is cut from its end")
        source = TextBatchSource(files=corpus.train_text_files, tokenizer_path=str(corpus.tokenizer_path),
                                 batch_size=batch_size, seq_len=seq_len, seed=seed, rank=rank, world_size=world_size)
    else:
        path, dtype, first = corpus.train_file
        source = TokenBatchSource(path=path, dtype=dtype, offset=first, length=int(corpus.train.size),
                                  batch_size=batch_size, seq_len=seq_len, seed=seed, rank=rank, world_size=world_size)
    if use_async:
        return AsyncLoader(source, start_step, grad_accum, device, n_workers, prefetch)
    return SyncLoader(source, start_step, grad_accum, device)
