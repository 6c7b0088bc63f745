"""Queued training steps timed two ways, dense relu2 against relu2_24
(``transposable`` on cuSPARSELt): do host launches leave the GPU idle?

    PYTHONPATH=src python bench/step_host_ahead.py --steps d20 --out $OUT/ahead.json

``synced_start``: ``--queued`` steps launched right after a sync, as a
training loop that syncs once per window runs them. ``host_ahead``: the same
steps launched while the GPU runs a one-second ``torch.cuda._sleep``, so the
host is far ahead and every kernel is queued before the GPU needs it; the
CUDA events start after the sleep. A step that is host-bound anywhere (a sync
inside it, slow launches) runs faster host-ahead by that much; a step that is
GPU-bound throughout runs the same both ways, apart from the one launch
latency after the sync. Variants and modes alternate in ``--rounds`` rounds
(the order flips each round), so clock drift falls on both alike.
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
from sparsetrain.benchmark import (SPARSE24_OVERRIDES, cuda_ms_per_call, environment, make_train_step,  # noqa: E402
                                   parse_step_entries)

SLEEP_CYCLES = int(1.5e9)  # about a second at the H200's power-limited clock: longer than launching the steps


def time_queued(step, queued: int, host_ahead: bool) -> float:
    """GPU milliseconds per step over ``queued`` steps (see the module docstring)."""
    torch.cuda.synchronize()
    return cuda_ms_per_call(step, queued, warmup=0, sleep_cycles=SLEEP_CYCLES if host_ahead else 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "step_host_ahead.json"))
    ap.add_argument("--steps", default="d20", help="'preset[:key=value,...]' entries separated by ';'")
    ap.add_argument("--eager", action="store_true", help="time the eager models instead of compiled ones")
    ap.add_argument("--queued", type=int, default=8, help="steps per timed sample")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("step_host_ahead.py times CUDA queues; no CUDA device here")
    out = {"environment": environment(), "settings": vars(args), "steps": {}}
    modes = ("synced_start", "host_ahead")
    for key, preset, overrides in parse_step_entries(args.steps):
        steps = {}
        for name, ffn in (("relu2", {"ffn": "relu2"}), ("relu2_24", SPARSE24_OVERRIDES)):
            step, _ = make_train_step(preset, compile=not args.eager, model_overrides={**overrides, **ffn})
            for _ in range(5):  # compile and warm up
                step()
            steps[name] = step
        times = {name: {m: [] for m in modes} for name in steps}
        for r in range(args.rounds):
            for name, step in steps.items():
                for mode in modes[::-1] if r % 2 else modes:
                    times[name][mode].append(time_queued(step, args.queued, mode == "host_ahead"))
        med = {name: {m: statistics.median(v) for m, v in t.items()} for name, t in times.items()}
        out["steps"][key] = {"ms_per_step": times, "median_ms": med,
                             "speedup": {m: med["relu2"][m] / med["relu2_24"][m] for m in modes}}
        del steps
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(out, indent=2))
    width = max(len(k) for k in out["steps"]) + 2
    print(f"{'steps':<{width}}{'variant':<10}" + "".join(f"{m:>14}" for m in modes))
    for key, r in out["steps"].items():
        for name, med in r["median_ms"].items():
            print(f"{key:<{width}}{name:<10}" + "".join(f"{med[m]:>12.2f}ms" for m in modes))
        print(f"{key:<{width}}{'speedup':<10}" + "".join(f"{r['speedup'][m]:>13.3f}x" for m in modes))


if __name__ == "__main__":
    main()
