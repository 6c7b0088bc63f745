"""Does ``torch._grouped_mm`` skip the rows past its last offset? (The plan for
a sync-free causal BK mask rests on it: skipped positions are parked past the
last expert group, so they cost no GEMM work while every shape stays fixed.)

    PYTHONPATH=src python bench/grouped_mm_tail.py --out $OUT/grouped_mm_tail.json

For a ``[R, D] x [E, D, H]`` grouped product with the last offset at a
fraction ``f`` of R (groups of equal size): the forward+backward time against
``f``, and whether the products and gradients of the rows inside the groups
equal a per-group float32 reference when the tail rows hold garbage (huge
values) -- i.e. the tail never leaks into a real row or a weight gradient.
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


def offsets(R: int, E: int, frac: float) -> torch.Tensor:
    used = int(R * frac) // (16 * E) * 16 * E
    return (torch.arange(1, E + 1, device="cuda") * (used // E)).to(torch.int32)


def check(R: int, D: int, H: int, E: int) -> dict:
    torch.manual_seed(0)
    offs = offsets(R, E, 0.5)
    last = int(offs[-1])
    a = torch.randn(R, D, device="cuda").bfloat16()
    a[last:] = 1e4  # garbage in the tail
    w = (torch.randn(E, H, D, device="cuda") / D**0.5).bfloat16().transpose(1, 2)  # the layers' layout
    g = torch.randn(R, H, device="cuda").bfloat16()
    g[last:] = 1e4
    a.requires_grad_(True)
    w = w.detach().requires_grad_(True)
    y = torch._grouped_mm(a, w, offs=offs)
    y.backward(g)
    ref_y, ref_da, ref_dw = torch.zeros(last, H, device="cuda"), torch.zeros(last, D, device="cuda"), torch.zeros_like(w, dtype=torch.float32)
    start = 0
    for e, end in enumerate(offs.tolist()):
        af, gf = a[start:end].float(), g[start:end].float()
        ref_y[start:end] = af @ w[e].float()
        ref_da[start:end] = gf @ w[e].float().t()
        ref_dw[e] = af.t() @ gf
        start = end

    def rel(x: torch.Tensor, r: torch.Tensor) -> float:
        return float((x.float() - r).norm() / r.norm())

    tail = y[last:].float()
    return {"last_offset": last, "rows": R, "y_rel_err": rel(y[:last], ref_y), "da_rel_err": rel(a.grad[:last], ref_da),
            "dw_rel_err": rel(w.grad, ref_dw), "tail_y_all_zero": bool((tail == 0).all()),
            "tail_y_finite": bool(tail.isfinite().all()), "tail_da_all_zero": bool((a.grad[last:] == 0).all())}


def timing(R: int, D: int, H: int, E: int, fracs: list[float]) -> dict:
    a = torch.randn(R, D, device="cuda").bfloat16().requires_grad_(True)
    w = (torch.randn(E, H, D, device="cuda") / D**0.5).bfloat16().transpose(1, 2).requires_grad_(True)
    g = torch.randn(R, H, device="cuda").bfloat16()
    out = {}
    for f in fracs:
        offs = offsets(R, E, f)

        def fb() -> None:
            torch._grouped_mm(a, w, offs=offs).backward(g)

        times = sorted(cuda_ms_per_call(fb) for _ in range(7))
        out[str(f)] = {"last_offset": int(offs[-1]), "fwd_bwd_ms": times[3]}
    base = out[str(fracs[-1])]["fwd_bwd_ms"]
    for v in out.values():
        v["speedup_vs_full"] = base / v["fwd_bwd_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "grouped_mm_tail.json"))
    args = ap.parse_args()
    res = {"env": environment(), "check": check(4096, 256, 512, 4),
           "timing_d2048": timing(16384 + 64, 2048, 8192, 4, [0.3, 0.5, 0.7, 1.0])}
    json.dump(res, open(args.out, "w"), indent=1)
    print(json.dumps(res["check"]))
    for f, v in res["timing_d2048"].items():
        print(f"last offset at {f}: {v['fwd_bwd_ms']:.3f} ms  {v['speedup_vs_full']:.2f}x of full")


if __name__ == "__main__":
    main()
