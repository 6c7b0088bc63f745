"""A stand-in for the CUDA step graph on the CPU, shared by the trainer's and the
Hugging Face Trainer's capture tests."""

from __future__ import annotations

import contextlib

import torch

from sparsetrain.step_graph import StepGraph, clone_tree


class ReplayingStepGraph(StepGraph):
    """Capture keeps the step's body, a replay runs it again on the static inputs
    and hands out copies, as a graph replay does. It checks what the caller does
    around a graph, not the graph."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.body = None
        self.replays = 0
        self.captures = 0

    def eager_context(self):
        self.eager_steps -= 1
        return contextlib.nullcontext()

    def capture(self, body, generators=(), pool=None) -> None:
        self.body, self.graph = body, object()
        self.captures += 1

    def replay(self):
        return clone_tree(self.replay_outputs())

    def replay_outputs(self):
        self.replays += 1
        return self.body()
