"""The one-pass transposable 2:4 select+pack kernel against memory-bound references.

    PYTHONPATH=src python bench/sparse24_packing.py --out $OUT/sparse24_packing.json

Per shape (tokens x hidden, bf16): GPU ms per call of

* ``pack_transposable(u)`` (forward: ``s`` and ``s^T`` packed, the pattern
  searched) and ``pack_transposable(u, ds, pattern)`` (backward: ``du`` and
  ``du^T`` on the forward's saved pattern; also timed searching again), per
  ``num_warps`` and register cap (``maxnreg``: 96, or the compiler's choice);
* ``mask_transposable(u)`` (the same selection written densely);
* the bandwidth floors: ``u.clone()`` (read and write ``u``), and dense relu2's
  own elementwise work, ``relu(u)^2`` forward and ``ds * 2 relu(u)`` backward;
* with ``--previous MODULE``: the same calls on another packing module (an
  A/B against an earlier kernel, e.g. one saved from git history).

Bytes moved are reported as GB/s: reading ``u`` (and ``ds``) and writing both
packed operands (values plus metadata: ``2 * (K/2 + K/16)`` bf16 per row).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsetrain.benchmark import cuda_ms_per_call, environment  # noqa: E402
from sparsetrain.sparse24 import packing  # noqa: E402

BF16 = torch.bfloat16


def ms(fn, repeats: int) -> float:
    return statistics.median(cuda_ms_per_call(fn) for _ in range(repeats))


def one_shape(M: int, K: int, repeats: int, previous) -> dict:
    torch.manual_seed(0)
    u = torch.randn(M, K, device="cuda", dtype=BF16)
    ds = torch.randn(M, K, device="cuda", dtype=BF16)
    gb_fwd = (M * K * 2 + 2 * M * (K // 2 + K // 16) * 2) / 1e9
    gb_bwd = gb_fwd + M * K * 2 / 1e9
    res: dict = {"shape": [M, K], "gb_forward": gb_fwd, "gb_backward": gb_bwd, "kernel": {}}
    # the floors: what dense relu2 itself spends on the same tensor
    res["clone_ms"] = ms(lambda: u.clone(), repeats)
    res["relu2_forward_ms"] = ms(lambda: torch.relu(u) * torch.relu(u), repeats)
    res["relu2_backward_ms"] = ms(lambda: ds * (2 * torch.relu(u)), repeats)
    configs = {f"warps{w}" + (f"_maxnreg{r}" if r else ""): {"num_warps": w, **({"maxnreg": r} if r else {})}
               for w in (2, 4, 8) for r in (None, 96)}
    for name, config in configs.items():
        packing.KERNEL_CONFIG.clear()
        packing.KERNEL_CONFIG.update(config)
        pattern = packing.pack_transposable(u)[2]
        res["kernel"][name] = {"forward_ms": ms(lambda: packing.pack_transposable(u), repeats),
                                          "backward_ms": ms(lambda: packing.pack_transposable(u, ds, pattern), repeats),
                                          "backward_search_ms": ms(lambda: packing.pack_transposable(u, ds), repeats),
                                          "dense_ms": ms(lambda: packing.mask_transposable(u), repeats)}
    best = min(res["kernel"], key=lambda k: res["kernel"][k]["forward_ms"] + res["kernel"][k]["backward_ms"])
    packing.KERNEL_CONFIG.clear()
    packing.KERNEL_CONFIG.update(configs[best])
    res["best"] = best
    b = res["kernel"][best]
    res["forward_gb_per_s"] = gb_fwd / b["forward_ms"] * 1e3
    res["backward_gb_per_s"] = gb_bwd / b["backward_ms"] * 1e3
    if previous is not None:
        prev = previous.mask_transposable(u)
        agree = (prev[0] if isinstance(prev, tuple) else prev) == packing.mask_transposable(u)[0]  # equal kept values
        res["previous"] = {"forward_ms": ms(lambda: previous.pack_transposable(u), repeats),
                           "backward_ms": ms(lambda: previous.pack_transposable(u, ds), repeats),
                           "dense_ms": ms(lambda: previous.mask_transposable(u), repeats),
                           "mask_agreement": float(agree.float().mean())}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "sparse24_packing.json"))
    ap.add_argument("--shapes", default="16384x5120,16384x8192,16384x16384")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--previous", default="", help="module path of another packing module to time beside it")
    args = ap.parse_args()
    previous = importlib.import_module(args.previous) if args.previous else None
    out = {"environment": environment(), "shapes": {}}
    for shape in args.shapes.split(","):
        M, K = (int(v) for v in shape.split("x"))
        out["shapes"][shape] = one_shape(M, K, args.repeats, previous)
        Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"{'shape':>12} {'fwd ms':>7} {'bwd ms':>7} {'dense':>7} {'fwd GB/s':>8} {'clone':>6} {'relu2 f/b':>11}"
          + ("  previous fwd/bwd/dense (mask agreement)" if previous else ""))
    for shape, r in out["shapes"].items():
        b = r["kernel"][r["best"]]
        line = (f"{shape:>12} {b['forward_ms']:7.3f} {b['backward_ms']:7.3f} {b['dense_ms']:7.3f} "
                f"{r['forward_gb_per_s']:8.0f} {r['clone_ms']:6.3f} {r['relu2_forward_ms']:5.3f}/{r['relu2_backward_ms']:5.3f}")
        if previous:
            p = r["previous"]
            line += f"  {p['forward_ms']:.3f}/{p['backward_ms']:.3f}/{p['dense_ms']:.3f} ({p['mask_agreement']:.4f})"
        print(line, r["best"])


if __name__ == "__main__":
    main()
