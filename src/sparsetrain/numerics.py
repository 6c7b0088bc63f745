"""The two conventions every tensor-handling module shares: the ignored-target
marker and the float32 upcast. A leaf module, so kernels, losses and models
can all import it without importing each other."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
"""Target of a position that has nothing to predict (PyTorch's convention)."""


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half/bfloat16 tensors; float32/float64 pass through (so a
    float64 model stays float64 end to end, which the tests rely on)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
