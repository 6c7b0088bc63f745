"""Token scoring throughput: the fused Triton row-stats kernel against the torch
paths, at N = 16k tokens and V = 32k / 128k in bf16.

The floor is reading the logits once: N * V * 2 bytes at the copy bandwidth
measured in the same run (a device-to-device clone, bytes read + written).

    PYTHONPATH=src python bench/scoring_kernel.py --out $OUT/scoring_kernel.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsetrain.benchmark import environment, summarize, time_fn  # noqa: E402
from sparsetrain.selection.scores import row_stats_torch  # noqa: E402
from sparsetrain.selection.triton_scores import row_stats_triton  # noqa: E402


def copy_bandwidth_gbs() -> float:
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    ms = statistics.median(time_fn(lambda: x.clone(), warmup=3, repeats=10))
    return 2 * x.numel() / (ms * 1e-3) / 1e9


def naive_torch(logits: torch.Tensor, targets: torch.Tensor):
    """What a straightforward implementation does: full float32 softmax."""
    x = logits.float()
    logp = torch.log_softmax(x, -1)
    p = logp.exp()
    top = p.topk(2, -1).values
    return -(p * logp).sum(-1), top, logp.gather(-1, targets.clamp(min=0)[:, None])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "scoring_kernel.json"))
    args = ap.parse_args()
    env = environment()
    bw = copy_bandwidth_gbs()
    env["measured_copy_gbs"] = round(bw, 1)
    N = 16384
    rows = []
    for V in (32768, 131072):
        g = torch.Generator(device="cuda").manual_seed(V)
        logits = (torch.randn(N, V, device="cuda", generator=g) * 2).to(torch.bfloat16)
        targets = torch.randint(0, V, (N,), device="cuda", generator=g)
        targets[::97] = -100
        ref = row_stats_torch(logits, targets)
        floor_ms = N * V * 2 / (bw * 1e9) * 1e3
        variants = {}
        for block, warps in ((1024, 4), (2048, 8), (4096, 8), (8192, 16)):
            name = f"triton_b{block}_w{warps}"
            got = row_stats_triton(logits, targets, block=block, num_warps=warps)
            err = max(float((getattr(got, k) - getattr(ref, k)).abs().max()) for k in ("lse", "nll", "entropy", "p1", "p2"))
            variants[name] = {**summarize(time_fn(lambda: row_stats_triton(logits, targets, block=block, num_warps=warps), 3, 20)),
                              "max_abs_err_vs_torch": err}
        variants["torch_chunked"] = summarize(time_fn(lambda: row_stats_torch(logits, targets), 2, 5))
        variants["torch_naive_full_fp32"] = summarize(time_fn(lambda: naive_torch(logits, targets), 2, 5))
        for v in variants.values():
            v["gbs"] = N * V * 2 / (v["median_ms"] * 1e-3) / 1e9
            v["fraction_of_floor"] = floor_ms / v["median_ms"]
        rows.append({"N": N, "V": V, "dtype": "bfloat16", "floor_ms": floor_ms, "variants": variants})
        logits = None  # free the GPU memory before the next size
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps({"environment": env, "results": rows}, indent=2))
    print(f"\n{env['device']}, copy bandwidth {bw:.0f} GB/s (read+write)")
    print(f"{'V':>7} {'variant':<24} {'ms':>8} {'GB/s':>7} {'of floor':>9}")
    for r in rows:
        for name, v in r["variants"].items():
            print(f"{r['V']:>7} {name:<24} {v['median_ms']:8.3f} {v['gbs']:7.0f} {v['fraction_of_floor']:9.1%}")


if __name__ == "__main__":
    main()
