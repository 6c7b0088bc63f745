"""The whole optimizer step captured in one CUDA graph and replayed (``run.cuda_graph``).

Why: a training step launches thousands of small kernels. Where the host cannot
queue them as fast as the GPU runs them (small models, the Collider step's extra
kernels, a slow host CPU), the GPU waits on the host; the Collider step suffers
most, since it halves the GPU's work but not the launches. A replay launches the
recorded step in one call, so the step's time is the GPU's.

What a capture needs from the step, and how the trainer gives it:

* **fixed shapes.** Top-k, random and importance selection keep a fixed count
  once a selection warmup is over; the trainer captures after it. Selections
  whose count follows the scores are refused (:meth:`TrainConfig._validate_cuda_graph`).
* **no host synchronisation** inside the step: the trainer's steps never read
  the device (tests check it), and the kept count is sized from the host's own
  count of valid targets, which the graph holds fixed (a batch with another
  count runs eagerly).
* **inputs at fixed addresses:** each micro-batch's tokens, targets, reference
  losses and document labels are copied into :class:`StepGraph`'s static
  buffers before each replay.
* **Python-side values frozen at capture:** the learning rate lives in a device
  tensor per parameter group, filled before each replay (the fused AdamW takes a
  tensor lr when capturable); random and importance selection draw from
  generators registered with the graph, so each replay draws anew.
* **warm-up:** a few steps after start-up (and after any selection warmup) run
  the recorded body eagerly on the static inputs, the last ones on a side stream
  as PyTorch's CUDA graph notes prescribe, so that compilation, autotuning and
  lazily made state for exactly those inputs happen before the capture.

A replay writes its outputs (loss, grad norm, the micro-steps' metrics) into the
same memory every time; :meth:`StepGraph.replay` hands out copies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

EAGER_STEPS = 3  # eager steps before the capture; the last SIDE_STREAM_STEPS of them on a side stream
SIDE_STREAM_STEPS = 2


def clone_tree(tree: Any) -> Any:
    """``tree`` (tensors in dicts, lists, tuples) with every tensor copied: a replay
    overwrites its outputs, and the metrics of a log window hold every step's."""
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(clone_tree(v) for v in tree)
    return tree


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Let ``optimizer``'s step be captured: capturable param groups whose lr is a
    device tensor (filled in place before each replay). The fused AdamW keeps its
    step counts on the device already."""
    for group in optimizer.param_groups:
        group["capturable"] = device.type == "cuda"  # what capturable means; elsewhere (tests) only the lr tensor
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def portable_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` as an uncaptured run would write it (float lrs, not
    capturable), so that a checkpoint resumes with or without ``cuda_graph``, on any
    device; a captured run makes it capturable again at its capture."""
    state = optimizer.state_dict()  # its param groups are copies: the live ones keep their tensors
    for group in state.get("param_groups", ()):  # a composite optimizer (Muon with its fallback) is never captured
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = False
    return state


class StepGraph:
    """One captured optimizer step and its static inputs.

    The trainer copies each step's inputs in with :meth:`set_inputs`, runs the
    body eagerly while ``eager_steps`` remain (inside :meth:`eager_context`),
    captures once with :meth:`capture` (the ``body`` reads only :attr:`inputs`
    and returns its outputs) and replays with :meth:`replay`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.inputs: dict[str, torch.Tensor] = {}
        self.n_valid: tuple[int, ...] | None = None  # the host counts the capture was sized by
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Any = None
        self.eager_steps = EAGER_STEPS
        self.capture_seconds: float | None = None
        self._side: torch.cuda.Stream | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def eager_context(self):
        """The context of the next eager warm-up step: the last ones run on a side
        stream (which then rejoins the current one when the step is queued)."""
        self.eager_steps -= 1
        if self.eager_steps >= SIDE_STREAM_STEPS:
            return _Nothing()
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return SideStream(self._side)

    def restart_warmup(self) -> None:
        """Before the capture: forget the static inputs and run the eager warm-up
        steps again, for inputs of another shape than the warm-up's so far."""
        assert self.graph is None, "the graph is captured: its inputs are fixed"
        self.inputs = {}
        self.eager_steps = EAGER_STEPS

    def set_inputs(self, **tensors: torch.Tensor) -> None:
        """Copy this step's inputs into the static buffers (made on first use, with
        each tensor's shape and dtype on the graph's device)."""
        for name, t in tensors.items():
            buf = self.inputs.get(name)
            if buf is None:
                self.inputs[name] = buf = torch.empty(t.shape, dtype=t.dtype, device=self.device)
            elif buf.shape != t.shape or buf.dtype != t.dtype:
                raise ValueError(f"step graph input {name}: {tuple(t.shape)} {t.dtype}, captured with "
                                 f"{tuple(buf.shape)} {buf.dtype}")
            buf.copy_(t, non_blocking=True)

    def capture(self, body: Callable[[], Any], generators: Iterable[torch.Generator] = (), pool: Any = None) -> None:
        """Record ``body`` (one whole optimizer step on :attr:`inputs`) into the graph.
        Nothing runs: :meth:`replay` runs it. ``generators``: every non-default
        generator the step draws from, registered so that each replay draws anew.
        ``pool``: a memory pool shared with other graphs (``torch.cuda.graph_pool_handle()``),
        safe for graphs replayed one after another on one stream, never concurrently."""
        graph = torch.cuda.CUDAGraph()
        for gen in generators:
            graph.register_generator_state(gen)
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph, pool=pool):
            self.outputs = body()
        self.graph = graph

    def replay(self) -> Any:
        """Run the captured step once; returns copies of its outputs."""
        return clone_tree(self.replay_outputs())

    def replay_outputs(self) -> Any:
        """Run the captured step once; returns its outputs themselves, which the next
        replay rewrites: for callers that copy only what they keep."""
        assert self.graph is not None, "capture first"
        self.graph.replay()
        return self.outputs


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class SideStream:
    """Run on ``side`` (after the current stream's work) and make the current
    stream wait for it on exit."""

    def __init__(self, side: torch.cuda.Stream) -> None:
        self.side = side
        self.outer = torch.cuda.current_stream(side.device)
        self.ctx = torch.cuda.stream(side)

    def __enter__(self) -> None:
        self.side.wait_stream(self.outer)
        self.ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.ctx.__exit__(*exc)
        self.outer.wait_stream(self.side)
