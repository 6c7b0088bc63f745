"""What the Triton kernels of every subpackage need to know about their runtime."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Is Triton running kernels in its CPU interpreter (``TRITON_INTERPRET=1``)?
    The CPU tests run the GPU kernels this way."""
    return os.environ.get("TRITON_INTERPRET") == "1"
