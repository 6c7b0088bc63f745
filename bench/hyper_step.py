"""Step-time and memory overhead of mHC-lite hyper-connections on ``nano-125m``
(bf16 autocast, sequence 2048, batch 8, eager), n = 2 and 4 streams against
none, side by side in one process.

    PYTHONPATH=src python bench/hyper_step.py --out $OUT/hyper_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsetrain.benchmark import bench_train_step, environment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "hyper_step.json"))
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    out = {"environment": environment(), "runs": {}}
    for n in (0, 2, 4):
        out["runs"][f"n{n}"] = bench_train_step("nano-125m", 2048, 8, repeats=args.repeats,
                                                model_overrides={"hyper_connections": n})
        torch.cuda.empty_cache()
    base = out["runs"]["n0"]["step"]["median_ms"]
    for r in out["runs"].values():
        r["time_vs_none"] = r["step"]["median_ms"] / base
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\n{'streams':<8} {'step ms':>8} {'x none':>7} {'peak GiB':>9}")
    for k, r in out["runs"].items():
        print(f"{k:<8} {r['step']['median_ms']:8.1f} {r['time_vs_none']:7.3f} {r.get('peak_memory_gib', 0):9.2f}")


if __name__ == "__main__":
    main()
