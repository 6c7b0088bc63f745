"""Correctness check of the cuSPARSELt pieces the 2:4 FFN uses, on random bf16
data: the tile kernel's pattern (transposable 2:4, equal to the CPU greedy),
its dense view, and the sparse products (subclass ``torch.mm`` and direct
``_cslt_sparse_mm`` with searched algorithm ids) against masked-dense GEMMs.

    PYTHONPATH=src python bench/cusparselt_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsetrain.sparse24 import cusparselt  # noqa: E402
from sparsetrain.sparse24.cusparselt import _pack, sparse_mm  # noqa: E402
from sparsetrain.sparse24.sparsify import is_24, transposable_24  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    torch.manual_seed(0)
    N, h, d = 1024, 2048, 512
    a = torch.relu(torch.randn(N, h, device="cuda", dtype=torch.bfloat16)) ** 2
    for packing in ("tile", "compress"):
        cusparselt.PACKING = packing
        _ALG = cusparselt._ALG_IDS
        _ALG.clear()
        print(f"\n=== packing = {packing}")
        check(a, N, h, d)
    cusparselt.PACKING = "compress"


def check(a: torch.Tensor, N: int, h: int, d: int) -> None:
    s = _pack(a, "")
    dense_view = torch._sparse_semi_structured_apply_dense(a, s.compressed_swizzled_bitmask)
    ref_vals, ref_mask = transposable_24(a)
    print("apply_dense is 2:4 both ways:", is_24(dense_view), is_24(dense_view.t()))
    print("apply_dense == CPU greedy (fraction of equal entries):", float((dense_view == ref_vals).float().mean()))
    try:
        td = s.to_dense()
        print("to_dense vs apply_dense rel err:", rel(td, dense_view))
    except Exception as e:  # noqa: BLE001
        print("to_dense failed:", repr(e)[:200])
    W = torch.randn(h, d, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(N, d, device="cuda", dtype=torch.bfloat16)
    print("torch.mm(s, W) vs masked dense:", rel(torch.mm(s, W), dense_view @ W))
    print("torch.mm(s.t(), dy) vs masked dense:", rel(torch.mm(s.t(), dy), dense_view.t() @ dy))
    print("sparse_mm(s, W) vs masked dense:", rel(sparse_mm(s, W), dense_view @ W))
    print("sparse_mm(s.t(), dy) vs masked dense:", rel(sparse_mm(s.t(), dy), dense_view.t() @ dy))
    for alg in range(0, 3):
        try:
            out = torch._cslt_sparse_mm(s.packed, W, alg_id=alg)
            print(f"_cslt_sparse_mm alg {alg}: shape {tuple(out.shape)} stride {out.stride()} rel err {rel(out, dense_view @ W):.3e}")
        except Exception as e:  # noqa: BLE001
            print(f"_cslt_sparse_mm alg {alg}: {repr(e)[:120]}")
    from sparsetrain.benchmark import time_fn

    t = sorted(time_fn(lambda: _pack(a, ""), warmup=3, repeats=10))[5]
    print(f"pack ({cusparselt.PACKING}) of [{N}, {h}]: {t:.3f} ms")


if __name__ == "__main__":
    main()
