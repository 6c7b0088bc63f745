"""Training seconds: the wall clock of training alone, with start-up apart.

A run's time budget (``max_seconds``), its time-based learning-rate schedule
(``schedule_by = "time"``) and its evaluations every so many seconds
(``eval_every_seconds``) all read one clock, :class:`TrainClock`:

* it counts host wall time while training runs and stops during pauses
  (evaluation, checkpoints). A pause first waits for the device, so training
  work still queued on the GPU is counted as training, not as the pause; a
  log window's synchronisation is counted as training too (it is training work
  the host had run ahead of).
* the first ``startup_steps`` steps of every process (``torch.compile``,
  kernel autotuning, plan building, the first allocations) are timed apart, with
  one device synchronisation when they end, as ``startup_seconds``.
  ``seconds_after_startup = seconds - startup_seconds`` is what a budget and a
  time schedule count. Recompilations later in the run (a schedule switching a
  path on) are counted as training: they are a cost of the method. The
  trainer brings those a changing kept count causes forward into the first
  step (``Trainer._prime_objective``), so they count as start-up.

The host never synchronises with the device to read the time of one step. Between
synchronisations the host clock is at most the CUDA launch queue ahead of the
device's progress (the queue is bounded, so the host blocks once it is full); each
synchronisation (log window, evaluation) brings the two together again. The time
schedule therefore chooses the lr of a step from the host clock when the step is
queued plus one step's duration as measured over the last synchronised window (the
expected training seconds at the end of that step). The step that crosses the
budget is the last; the budget is overshot by at most the work queued at that
moment, and the reported seconds include it.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TrainClock:
    """Training seconds of one run, cumulative over resumes (see the module docstring)."""

    def __init__(self, startup_steps: int = 1, sync: Callable[[], None] = lambda: None,
                 now: Callable[[], float] = time.perf_counter) -> None:
        self.startup_steps = startup_steps
        self.sync = sync  # waits for the device; a no-op on the CPU
        self.now = now
        self.startup_seconds = 0.0  # cumulative over every process's start-up
        self._seconds = 0.0  # counted up to the last pause (or the running stretch's start)
        self._running_since: float | None = None
        self._process_steps = 0  # steps done by this process
        self._process_start: float | None = None  # seconds when this process's first step began
        self._window: tuple[float, int] | None = None  # (seconds, process steps) at the last synchronisation
        self._step_seconds = 0.0  # one step's duration over the last synchronised window

    # --------------------------------------------------------------- reading

    @property
    def seconds(self) -> float:
        """Training seconds so far, start-up included."""
        if self._running_since is None:
            return self._seconds
        return self._seconds + self.now() - self._running_since

    @seconds.setter
    def seconds(self, value: float) -> None:  # a resumed run's saved count
        self._seconds = float(value)
        if self._running_since is not None:
            self._running_since = self.now()

    @property
    def in_startup(self) -> bool:
        """True until this process has done ``startup_steps`` steps."""
        return self._process_steps < self.startup_steps

    @property
    def seconds_after_startup(self) -> float:
        """Training seconds without any start-up: what budgets and the time schedule count.
        It stands still while this process is in its start-up."""
        if self.in_startup and self._process_start is not None:
            return max(0.0, self._process_start - self.startup_seconds)
        return max(0.0, self.seconds - self.startup_seconds)

    def expected_after_next_step(self) -> float:
        """``seconds_after_startup`` expected when the step about to be queued ends."""
        if self.in_startup:
            return self.seconds_after_startup
        estimate = self._step_seconds
        if not estimate and self._window is not None:  # no synchronised window yet: the host's pace
            done = self._process_steps - self._window[1]
            estimate = (self.seconds - self._window[0]) / done if done else 0.0
        return self.seconds_after_startup + estimate

    # --------------------------------------------------------------- counting

    def run(self) -> None:
        """Start (or continue) counting; a no-op while counting."""
        if self._running_since is None:
            self._running_since = self.now()
            if self._process_start is None:
                self._process_start = self._seconds
            if self._window is None and not self.in_startup:  # no start-up to wait for
                self._window = (self._seconds, self._process_steps)

    def pause(self) -> None:
        """Stop counting (evaluation, checkpoint) once the device has caught up."""
        if self._running_since is None:
            return
        self.sync()
        self._seconds += self.now() - self._running_since
        self._running_since = None
        self._mark_synced()

    def step_done(self) -> bool:
        """Count one finished (queued) step. Returns True when it ended this process's
        start-up, which it then measures (after one device synchronisation)."""
        self._process_steps += 1
        if self._process_steps != self.startup_steps:
            return False
        self.sync()
        start = self._process_start if self._process_start is not None else self._seconds
        self.startup_seconds += self.seconds - start
        self._window = (self.seconds, self._process_steps)
        return True

    def count_as_startup(self, seconds: float) -> None:
        """Count ``seconds`` of training just measured (a CUDA graph's capture, after
        the start-up steps) as start-up instead: they leave ``seconds_after_startup``."""
        if self.in_startup:
            raise RuntimeError("count_as_startup after the start-up steps only (they measure themselves)")
        self.startup_seconds += seconds
        if self._window is not None:  # nor do they count in the step time measured over this window
            self._window = (self._window[0] + seconds, self._window[1])

    def synced(self) -> None:
        """The device has just been synchronised (a log window): measure the step time."""
        self._mark_synced()

    def _mark_synced(self) -> None:
        if self.in_startup:
            return
        now = self.seconds
        if self._window is not None and self._process_steps > self._window[1]:
            self._step_seconds = (now - self._window[0]) / (self._process_steps - self._window[1])
        self._window = (now, self._process_steps)
