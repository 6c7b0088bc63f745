"""Quality and speed of the README's main command: the `tiny` preset on the
embedded stdlib corpus, on the CPU. Writes the val-loss curve, wall time and
environment as JSON.

    python bench/tiny_cpu.py --out bench/results/tiny_cpu_run.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsetrain import build_config, train  # noqa: E402
from sparsetrain.benchmark import environment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tiny_cpu_run.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config("tiny", overrides={"device": "cpu", "out_dir": str(Path(tmp) / "run")})
        t0 = time.perf_counter()
        result = train(cfg)
        wall = time.perf_counter() - t0
    out = {
        "environment": environment(),
        "command": "sparsetrain train --preset tiny --device cpu",
        "config": cfg.to_dict(),
        "wall_seconds_including_data": round(wall, 1),
        "train_seconds": round(result.train_seconds, 1),
        "tokens_per_second": round(result.tokens_per_second),
        "val_loss_by_step": {str(k): round(v, 4) for k, v in sorted(result.val_losses.items())},
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    first, last = min(result.val_losses), max(result.val_losses)
    print(f"val loss {result.val_losses[first]:.3f} -> {result.val_losses[last]:.3f} in {last} steps, "
          f"{wall:.0f} s wall, {result.tokens_per_second:,.0f} tokens/s")


if __name__ == "__main__":
    main()
