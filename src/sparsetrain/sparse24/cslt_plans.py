"""cuSPARSELt 2:4 products on cached plans (``csrc/cslt_plans.cpp``).

``torch._cslt_sparse_mm`` sets up and tears down a cuSPARSELt plan on every
call; that host time, paid by every product, makes a compiled or small-width
2:4 step host-bound (bench/results/cslt_plans_d20_h200.json). The extension here keeps one plan
per problem (shapes, layouts, dtype, algorithm, split-K) and takes torch's
operand conventions, so :func:`sparse_mm` is a drop-in for
``torch._cslt_sparse_mm(packed, dense, transpose_result=..., alg_id=...,
split_k=..., split_k_mode=...)``.

The extension is compiled on first use with ``torch.utils.cpp_extension``
(a C++ compiler, CUDA's headers and cuSPARSELt's header, which the
``nvidia-cusparselt`` wheel beside torch carries; it takes tens of seconds
once, then is cached under ``TORCH_EXTENSIONS_DIR``). Where it cannot be built, :func:`load` warns
once and returns ``None``, and callers use torch's op. The kernel policy's
``cached_cslt_plans`` (:mod:`sparsetrain.kernels`; ``SPARSETRAIN_CSLT_PLANS=0``
in the environment) turns it off.
"""

from __future__ import annotations

import glob
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

from .. import kernels

_SOURCE = Path(__file__).with_name("csrc") / "cslt_plans.cpp"
_EXT: ModuleType | None = None
_TRIED = False


def _cusparselt_dirs() -> tuple[str, str, str]:
    """(include dir, lib dir, library file name) of the cuSPARSELt that torch
    loads: the ``nvidia`` wheels' (``nvidia/cusparselt/`` or ``nvidia/cu13/``), else CUDA_HOME's."""
    roots = [Path(p) for p in sys.path if p and Path(p, "nvidia").is_dir()]
    candidates = [str(r / "nvidia" / "*" / "include" / "cusparseLt.h") for r in roots]
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates.append(os.path.join(home, "include", "cusparseLt.h"))
    for pattern in candidates:
        for header in sorted(glob.glob(pattern)):
            base = Path(header).parent.parent
            for lib in ("lib", "lib64"):
                libs = sorted(glob.glob(str(base / lib / "libcusparseLt.so*")))
                if libs:
                    return str(base / "include"), str(base / lib), os.path.basename(libs[0])
    raise FileNotFoundError("cusparseLt.h with libcusparseLt.so beside it (looked in the nvidia wheels and CUDA_HOME)")


def load() -> ModuleType | None:
    """The compiled extension, or ``None`` (no CUDA, disabled, or the build failed: warned once)."""
    global _EXT, _TRIED
    if _TRIED:
        return _EXT
    _TRIED = True
    if not torch.cuda.is_available():
        return None
    try:
        from torch.utils.cpp_extension import load as load_extension

        include, lib, libname = _cusparselt_dirs()
        _EXT = load_extension(
            name="sparsetrain_cslt_plans", sources=[str(_SOURCE)], extra_include_paths=[include],
            extra_ldflags=[f"-L{lib}", f"-l:{libname}", f"-Wl,-rpath,{lib}"], extra_cflags=["-O2"],
            with_cuda=True, verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure falls back to torch's op
        warnings.warn(f"sparsetrain: cached cuSPARSELt plans unavailable, using torch._cslt_sparse_mm "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", stacklevel=2)
        _EXT = None
    return _EXT


def sparse_mm(packed: torch.Tensor, dense: torch.Tensor, transpose_result: bool = False, alg_id: int = 0,
              split_k: int = 1, split_k_mode: int = -1, policy: kernels.KernelPolicy | None = None) -> torch.Tensor:
    """``torch._cslt_sparse_mm`` with the same arguments, on a cached plan where
    the extension is available and ``policy`` (default :func:`sparsetrain.kernels.current`)
    allows it (the same kernel and result either way). Operands it cannot
    multiply raise ``RuntimeError`` naming the bad value."""
    ext = load() if (policy or kernels.current()).cached_cslt_plans else None
    if ext is None:
        return torch._cslt_sparse_mm(packed, dense, transpose_result=transpose_result, alg_id=alg_id,
                                     split_k=split_k, split_k_mode=split_k_mode)
    return ext.sparse_mm(packed, dense, transpose_result, alg_id, split_k, split_k_mode)


def num_plans() -> int:
    """Plans the extension has built in this process (0 without it)."""
    ext = load()
    return 0 if ext is None else int(ext.num_plans())
