"""How fast can the 2:4 FFN get in FP8? The six products of the FFN's forward
and backward, each timed on its own at the issue's shapes, dense against 2:4
sparse, in bf16 and in FP8 (e4m3), side by side in one process.

    PYTHONPATH=src python bench/sparse24_fp8_gemm.py --out $OUT/sparse24_fp8_gemm.json

Products (N tokens, model width d, hidden h; "A" is the left operand):

=====  ======================  ==================  ======
name   product                 A                   2:4 A?
=====  ======================  ==================  ======
up     u = x W_up^T            x [N, d]            no
down   y = s W_down^T          s [N, h]            yes
dS     ds = dy W_down          dy [N, d]           no
dWd    dW_down^T = s^T dy      s^T [h, N]          yes
dX     dx = du W_up            du [N, h]           yes
dWu    dW_up = du^T x          du^T [h, N]         yes
=====  ======================  ==================  ======

Dense bf16 is ``torch.mm``; dense FP8 is ``torch._scaled_mm`` (per-tensor
scales, bf16 out); sparse bf16 and sparse FP8 are ``torch._cslt_sparse_mm``
on ``torch._cslt_compress``'s output with the algorithm found by
``torch._cslt_sparse_mm_search`` (FP8: bf16 out). Compression is outside the
timing (in the FFN a fused packing kernel does it). For each precision the
"ceiling" is the FFN's six dense products over two dense plus four sparse
ones: what 2:4 could give the FFN if everything else were free.

``sparse_bf16_row_major_b``: the same sparse bf16 product with B row-major
(the layout the FFN passed before session 6). Also recorded: whether each FP8 call is accepted at all, and the FP8 sparse
product's error against the float32 product of the same FP8 values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsetrain.benchmark import cuda_ms_per_call, environment  # noqa: E402
from sparsetrain.sparse24.sparsify import naive_24  # noqa: E402

FP8 = torch.float8_e4m3fn
PRODUCTS = {"up": ("N", "d", "h", False), "down": ("N", "h", "d", True), "dS": ("N", "d", "h", False),
            "dWd": ("h", "N", "d", True), "dX": ("N", "h", "d", True), "dWu": ("h", "N", "d", True)}


def median_ms(fn, repeats: int) -> float:
    times = sorted(cuda_ms_per_call(fn, calls=5) for _ in range(repeats))
    return times[len(times) // 2]


def bench_product(M: int, K: int, Nn: int, sparse_ok: bool, repeats: int) -> dict:
    """``A[M, K] @ B[K, Nn]`` four ways; B is handed over column-major (``Bt[Nn, K]``
    transposed), the layout both ``_scaled_mm`` and FP8 cuSPARSELt want."""
    torch.manual_seed(0)
    a = naive_24(torch.randn(M, K, device="cuda"))[0]
    bt = torch.randn(Nn, K, device="cuda") / K**0.5
    row: dict = {"M": M, "K": K, "N": Nn, "flop": 2 * M * K * Nn}
    a16, b16 = a.bfloat16(), bt.bfloat16().t()
    row["dense_bf16_ms"] = median_ms(lambda: torch.mm(a16, b16), repeats)
    one = torch.ones((), device="cuda")
    a8, b8 = a.to(FP8), bt.to(FP8).t()
    try:
        row["dense_fp8_ms"] = median_ms(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), repeats)
    except (RuntimeError, TypeError) as e:
        row["dense_fp8_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if not sparse_ok:
        return row
    for name, (av, bv) in {"bf16": (a16, b16), "bf16_row_major_b": (a16, b16.contiguous()), "fp8": (a8, b8)}.items():
        try:
            packed = torch._cslt_compress(av)
            kw = {"out_dtype": torch.bfloat16} if av.dtype == FP8 else {}
            alg = int(torch._cslt_sparse_mm_search(packed, bv, **kw))
            out = torch._cslt_sparse_mm(packed, bv, alg_id=alg, **kw)
            ref = av.float() @ bv.float()
            row[f"sparse_{name}_alg"] = alg
            row[f"sparse_{name}_rel_err"] = float((out.float() - ref).norm() / ref.norm())
            row[f"sparse_{name}_ms"] = median_ms(lambda: torch._cslt_sparse_mm(packed, bv, alg_id=alg, **kw), repeats)
        except (RuntimeError, TypeError) as e:
            row[f"sparse_{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "sparse24_fp8_gemm.json"))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--widths", default="2048,4096,8192", help="d_model values; hidden is 4 d")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    res: dict = {"env": environment(), "tokens": args.tokens, "shapes": {}}
    for d in (int(w) for w in args.widths.split(",")):
        sizes = {"N": args.tokens, "d": d, "h": 4 * d}
        rows = {}
        for name, (m, k, n, sp) in PRODUCTS.items():
            rows[name] = bench_product(sizes[m], sizes[k], sizes[n], sp, args.repeats)
            print(name, d, {k: v for k, v in rows[name].items() if k.endswith("ms") or "error" in k}, flush=True)
        summary = {}
        for prec in ("bf16", "fp8"):
            dense = [rows[p].get(f"dense_{prec}_ms") for p in PRODUCTS]
            mixed = [rows[p].get(f"sparse_{prec}_ms") if PRODUCTS[p][3] else rows[p].get(f"dense_{prec}_ms")
                     for p in PRODUCTS]
            if all(t is not None for t in dense + mixed):
                summary[prec] = {"dense_ms": sum(dense), "with_24_ms": sum(mixed), "ceiling": sum(dense) / sum(mixed)}
        if "fp8" in summary:
            summary["fp8_24_vs_bf16_dense"] = summary["bf16"]["dense_ms"] / summary["fp8"]["with_24_ms"] if "bf16" in summary else None
        res["shapes"][f"d{d}_h{4 * d}"] = {"products": rows, "summary": summary}
        json.dump(res, open(args.out, "w"), indent=1)
    print(f"\n{'shape':>14} {'prec':>5} {'dense ms':>9} {'2:4 ms':>8} {'ceiling':>8}")
    for shape, r in res["shapes"].items():
        for prec in ("bf16", "fp8"):
            s = r["summary"].get(prec)
            if s:
                print(f"{shape:>14} {prec:>5} {s['dense_ms']:9.3f} {s['with_24_ms']:8.3f} {s['ceiling']:7.3f}x")
            else:
                errs = {p: v for p, row in r["products"].items() for k, v in row.items() if prec in k and "error" in k}
                print(f"{shape:>14} {prec:>5} failed: {str(errs)[:300]}")


if __name__ == "__main__":
    main()
