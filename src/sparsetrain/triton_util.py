"""What the Triton kernels of every subpackage need to know about their runtime."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Is Triton running kernels in its CPU interpreter (``TRITON_INTERPRET=1``)?
    The CPU tests run the GPU kernels this way."""
    return os.environ.get("TRITON_INTERPRET") == "1"


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:

    @triton.jit
    def bf16_bits_rne(x):
        """float32 -> its bf16 bit pattern (the low 16 bits of an int32), rounded
        to nearest even by hand. The GPU's own conversion rounds this way; Triton's
        interpreter truncates, so kernels that must match bit for bit on CPU round here."""
        b = x.to(tl.int32, bitcast=True)
        return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
