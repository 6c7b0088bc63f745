"""Training throughput as the trainer itself reports it: dense ``relu2``
against ``relu2_24`` (``transposable``, sparse from the first step), the same
preset, on the embedded corpus.

    PYTHONPATH=src python bench/trainer_throughput.py --preset d20 --compile --out $OUT/throughput.json

Each run trains ``--steps`` steps and logs every ``--log-every``; the
trainer syncs the GPU once per log window, so its tokens/s per window is the
end-to-end rate a user sees (data loading, queued steps, optimizer). The
first two windows (compilation, warm-up) are left out of the median. The runs
go one after the other, so host or clock drift between them counts (the GPU's
tokens/s fell about 2% over each 80-step d20 run); ``--abba`` runs relu2,
relu2_24, relu2_24, relu2 and averages each pair, which cancels a drift that
is linear in time. Compare with the interleaved step timings of
``bench/sparse24_ffn.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsetrain import build_config, train  # noqa: E402
from sparsetrain.benchmark import SPARSE24_OVERRIDES, environment  # noqa: E402

RUNS = {
    "relu2": {"ffn": "relu2"},
    "relu2_24": SPARSE24_OVERRIDES,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "trainer_throughput.json"))
    ap.add_argument("--preset", default="d20")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--abba", action="store_true", help="run relu2, relu2_24, relu2_24, relu2 (twice the time)")
    args = ap.parse_args()
    base = dict(max_steps=args.steps, log_every=args.log_every, eval_every=10 * args.steps, eval_batches=2,
                seq_len=args.seq_len, batch_size=args.batch_size, warmup_steps=10, compile=args.compile,
                cache_dir=os.environ.get("SPARSETRAIN_CACHE", "/tmp/sparsetrain-cache"))
    out = {"environment": environment(), "settings": {**base, "preset": args.preset}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        order = ["relu2", "relu2_24", "relu2_24", "relu2"] if args.abba else list(RUNS)
        for i, name in enumerate(order):
            run_dir = f"{tmp}/{i}_{name}"
            cfg = build_config(args.preset, overrides={**base, **RUNS[name], "out_dir": run_dir})
            train(cfg, verbose=False)
            rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
            windows = [r["tokens_per_s"] for r in rows if r["kind"] == "train" and r["step"] % args.log_every == 0]
            run = {"order": i, "tokens_per_s_by_window": windows, "median_tokens_per_s": statistics.median(windows[2:]),
                   "loss_last": next(r["loss"] for r in reversed(rows) if r["kind"] == "train")}
            out["runs"].setdefault(name, {"repeats": []})["repeats"].append(run)
            Path(args.out).write_text(json.dumps(out, indent=2))
    for r in out["runs"].values():  # the mean over an ABBA pair cancels a linear drift
        r["median_tokens_per_s"] = statistics.mean(x["median_tokens_per_s"] for x in r["repeats"])
    r = out["runs"]
    out["speedup"] = r["relu2_24"]["median_tokens_per_s"] / r["relu2"]["median_tokens_per_s"]
    Path(args.out).write_text(json.dumps(out, indent=2))
    for name, v in r.items():
        for x in v["repeats"]:
            print(f"{name:<10} run {x['order']}: {x['median_tokens_per_s']:10.0f} tokens/s  "
                  f"(windows: {[round(w) for w in x['tokens_per_s_by_window']]})")
    print(f"relu2_24 / relu2: {out['speedup']:.3f}x")


if __name__ == "__main__":
    main()
