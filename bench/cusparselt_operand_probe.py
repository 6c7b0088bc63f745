"""Why did the same sparse product time differently in two benches? One shape
(the FFN's down-projection at d 4096: [16384, 16384] 2:4 x [16384, 4096]),
every cuSPARSELt algorithm, several sparse operands, side by side.

    PYTHONPATH=src python bench/cusparselt_operand_probe.py --out $OUT/cusparselt_operand_probe.json

Operands (all 2:4 along the inner dimension, the dense operand column-major):

* ``randn_pruned``: ``_cslt_compress`` of N(0, 1) pruned to the two largest of four
  (what bench/sparse24_fp8_gemm.py times);
* ``relu2_packed``: the FFN's own ``pack_transposable(u)`` of ``u ~ N(0, 1)``
  (relu(u)^2 on the transposable pattern; what bench/sparse24_ffn.py times);
* ``relu2_compressed``: ``_cslt_compress`` of the same values written densely
  (bytes compared with ``relu2_packed``);
* ``randn_pruned_positive``: the absolute values of ``randn_pruned``.

Also: host time per ``_cslt_sparse_mm`` call, the same call timed alone between
two events, and the whole FFN block both ways. Each operand is timed with every algorithm id cuSPARSELt accepts, next to the dense
product of the same (decompressed) values, so data-dependent clocks show up
as a change in both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsetrain.benchmark import cuda_ms_per_call, environment, time_fn  # noqa: E402
from sparsetrain.sparse24.packing import mask_transposable, pack_transposable  # noqa: E402
from sparsetrain.sparse24.sparsify import naive_24  # noqa: E402


def med(fn, n: int = 5) -> float:
    return sorted(cuda_ms_per_call(fn, calls=10) for _ in range(n))[n // 2]


def host_ms(fn, calls: int = 20) -> float:
    """Host milliseconds per call while the GPU queue stays full (no sync inside)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    return t


def ffn_block_timings(repeats: int = 11) -> dict:
    """The FFN block (d 4096, hidden 16384, 16k tokens) timed per call between two
    events (what bench/sparse24_ffn.py reports) and back to back (host work hidden)."""
    from sparsetrain.sparse24.cusparselt import sparse24_ffn_cusparselt

    N, d, h = 16384, 4096, 16384
    x = torch.randn(N, d, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    dy = torch.randn(N, d, device="cuda", dtype=torch.bfloat16)
    w_up = (torch.randn(h, d, device="cuda") / d**0.5).bfloat16().requires_grad_(True)
    w_down = (torch.randn(d, h, device="cuda") / h**0.5).bfloat16().requires_grad_(True)
    fns = {"relu2": lambda: F.linear(F.relu(F.linear(x, w_up)).square(), w_down).backward(dy),
           "relu2_24": lambda: sparse24_ffn_cusparselt(x, w_up, w_down).backward(dy)}
    out = {}
    for name, fn in fns.items():
        out[name] = {"per_call_events_ms": sorted(time_fn(fn, 3, repeats))[repeats // 2],
                     "back_to_back_ms": med(fn), "host_ms_per_call": host_ms(fn, 10)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "cusparselt_operand_probe.json"))
    ap.add_argument("--max-alg", type=int, default=40)
    args = ap.parse_args()
    M, K, N = 16384, 16384, 4096
    torch.manual_seed(0)
    b = (torch.randn(N, K, device="cuda") / K**0.5).bfloat16().t()  # [K, N] column-major
    u = torch.randn(M, K, device="cuda").bfloat16()
    pruned = naive_24(torch.randn(M, K, device="cuda"))[0].bfloat16()
    relu2_dense = mask_transposable(u)[0]
    operands = {
        "randn_pruned": (pruned, torch._cslt_compress(pruned)),
        "relu2_packed": (relu2_dense, pack_transposable(u)[0]),
        "relu2_compressed": (relu2_dense, torch._cslt_compress(relu2_dense)),
        "randn_pruned_positive": (pruned.abs(), torch._cslt_compress(pruned.abs())),
    }
    res: dict = {"env": environment(), "shape": [M, K, N], "operands": {}}
    res["relu2_packed_bytes_equal_compress"] = bool(torch.equal(
        operands["relu2_packed"][1].view(torch.int16).flatten(), operands["relu2_compressed"][1].view(torch.int16).flatten()))
    for name, (dense, packed) in operands.items():
        row: dict = {"nonzero_fraction": float((dense != 0).float().mean()),
                     "dense_ms": med(lambda: torch.mm(dense, b)),
                     "search_alg": int(torch._cslt_sparse_mm_search(packed, b)), "algs": {}}
        for alg in range(args.max_alg):
            try:
                torch._cslt_sparse_mm(packed, b, alg_id=alg)
                torch.cuda.synchronize()
            except RuntimeError:
                break
            row["algs"][alg] = med(lambda: torch._cslt_sparse_mm(packed, b, alg_id=alg))
        alg = row["search_alg"]
        row["host_ms_per_call"] = host_ms(lambda: torch._cslt_sparse_mm(packed, b, alg_id=alg))
        row["single_call_event_ms"] = sorted(time_fn(lambda: torch._cslt_sparse_mm(packed, b, alg_id=alg), 3, 11))[5]
        best = min(row["algs"], key=row["algs"].get)
        row["best_alg"], row["best_ms"] = best, row["algs"][best]
        row["searched_ms"] = row["algs"].get(row["search_alg"])
        res["operands"][name] = row
        print(name, {k: v for k, v in row.items() if k != "algs"}, flush=True)
    res["ffn_block_d4096"] = ffn_block_timings()
    print(res["ffn_block_d4096"])
    json.dump(res, open(args.out, "w"), indent=1)
    print(f"\n{'operand':>24} {'dense ms':>9} {'searched':>9} {'best':>7} {'alg':>4} {'host ms':>8} {'1-call':>7}  bytes equal: {res['relu2_packed_bytes_equal_compress']}")
    for name, r in res["operands"].items():
        print(f"{name:>24} {r['dense_ms']:9.3f} {r['searched_ms'] or float('nan'):9.3f} {r['best_ms']:7.3f} {r['best_alg']:>4} {r['host_ms_per_call']:8.3f} {r['single_call_event_ms']:7.3f}")


if __name__ == "__main__":
    main()
