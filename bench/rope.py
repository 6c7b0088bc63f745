"""RoPE forward+backward on q and k: the fused Triton kernel against the
plain-torch reference, bf16, 16k tokens, as the model calls it (strided views
of the fused qkv output), at d 1280 (d20) and d 4096.

    PYTHONPATH=src python bench/rope.py --out $OUT/rope.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsetrain.benchmark import environment, summarize, time_fn  # noqa: E402
from sparsetrain.model import apply_rope_reference, rope_tables  # noqa: E402
from sparsetrain.rope_triton import fused_rope  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "rope.json"))
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    out = {"environment": environment(), "shapes": {}}
    B, T = 8, 2048
    for d, H in ((1280, 10), (4096, 32)):
        hd = d // H
        cos, sin = (t.cuda() for t in rope_tables(T, hd, 10000.0))
        qkv = torch.randn(B, T, 3, H, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16)

        def run(rope) -> None:
            q, k, _ = qkv.permute(2, 0, 3, 1, 4)
            torch.autograd.backward((rope(q, cos, sin), rope(k, cos, sin)), (g, g))
            qkv.grad = None

        q, k, _ = qkv.permute(2, 0, 3, 1, 4)
        err = float((fused_rope(q, cos, sin).float() - apply_rope_reference(q, cos, sin).float()).abs().max())
        row: dict = {"B": B, "T": T, "heads": H, "head_dim": hd, "max_abs_diff_vs_reference": err}
        times: dict[str, list[float]] = {"reference": [], "fused": []}
        for _ in range(3):  # interleaved rounds
            times["reference"] += time_fn(lambda: run(apply_rope_reference), warmup=2, repeats=args.repeats // 3)
            times["fused"] += time_fn(lambda: run(fused_rope), warmup=2, repeats=args.repeats // 3)
        for k_, v in times.items():
            row[k_] = summarize(v)
        row["speedup"] = row["reference"]["median_ms"] / row["fused"]["median_ms"]
        out["shapes"][f"d{d}"] = row
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"{'q+k fwd+bwd':<12} {'reference':>10} {'fused':>8} {'speedup':>8} {'max diff':>9}")
    for key, r in out["shapes"].items():
        print(f"{key:<12} {r['reference']['median_ms']:9.3f}  {r['fused']['median_ms']:7.3f} {r['speedup']:7.2f}x"
              f" {r['max_abs_diff_vs_reference']:9.2e}")


if __name__ == "__main__":
    main()
