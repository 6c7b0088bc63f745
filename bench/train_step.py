"""Dense baseline: full training-step throughput (forward, backward, fused AdamW)
of the GPT presets at sequence 2048 in bf16 autocast, eager and torch.compile.

Every later speedup (Collider, 2:4 FFN, ...) is measured against these numbers.

    PYTHONPATH=src python bench/train_step.py --out bench/results/train_step_h100.json

Writes one JSON with the environment and each configuration's step-time
summary (median of repeats after warm-up, CUDA events), tokens/s and MFU, and
prints a short table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsetrain.benchmark import bench_train_step, environment, matmul_tflops  # noqa: E402

CASES = [
    # (preset, batch_size, compile)
    ("nano-125m", 8, False),
    ("nano-125m", 8, True),
    ("d20", 8, False),
    ("d20", 8, True),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "train_step.json"))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/train_step.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    env = environment()
    env["measured_bf16_matmul_tflops_8192"] = round(matmul_tflops(), 1)
    results = []
    for preset, bs, comp in CASES:
        try:
            r = bench_train_step(preset, args.seq_len, bs, comp, warmup=5, repeats=args.repeats)
            r["mfu_vs_measured_matmul"] = r["achieved_tflops"] / env["measured_bf16_matmul_tflops_8192"]
        except Exception as e:  # keep the other cases' numbers
            traceback.print_exc()
            r = {"preset": preset, "batch_size": bs, "compile": comp, "error": f"{type(e).__name__}: {e}"}
        results.append(r)
        gc.collect()
        torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps({"environment": env, "results": results}, indent=2))
    print(f"\n{env['device']}, torch {env['torch']}, measured bf16 GEMM {env['measured_bf16_matmul_tflops_8192']} TFLOP/s")
    print(f"{'preset':<10} {'params':>7} {'compile':>7} {'step ms':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['preset']:<10} {'':>7} {str(r['compile']):>7}  error: {r['error'][:60]}")
            continue
        print(f"{r['preset']:<10} {r['params'] / 1e6:6.0f}M {str(r['compile']):>7} {r['step']['median_ms']:8.1f} "
              f"{r['tokens_per_s']:10,.0f} {r['achieved_tflops']:8.1f} {r.get('mfu_vs_datasheet', 0):6.1%} {r['peak_memory_gib']:8.1f}")


if __name__ == "__main__":
    main()
