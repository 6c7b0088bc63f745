"""Training throughput as the trainer itself reports it: dense ``relu2``
against ``relu2_24`` (``transposable``, sparse from the first step), the same
preset, on the embedded corpus.

    PYTHONPATH=src python bench/trainer_throughput.py --preset d20 --compile --out $OUT/throughput.json

Each run trains ``--steps`` steps and logs every ``--log-every``; the
trainer syncs the GPU once per log window, so its tokens/s per window is the
end-to-end rate a user sees (data loading, queued steps, optimizer). The
first two windows (compilation, warm-up) are left out of the median. The runs
go one after the other, so host or clock drift between them counts; compare
with the interleaved step timings of ``bench/sparse24_ffn.py``.
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
from sparsetrain.benchmark import environment  # noqa: E402

RUNS = {
    "relu2": {"ffn": "relu2"},
    "relu2_24": {"ffn": "relu2_24", "activation_sparse_method": "transposable", "activation_dense_warmup_steps": 0},
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
    args = ap.parse_args()
    base = dict(max_steps=args.steps, log_every=args.log_every, eval_every=10 * args.steps, eval_batches=2,
                seq_len=args.seq_len, batch_size=args.batch_size, warmup_steps=10, compile=args.compile,
                cache_dir=os.environ.get("SPARSETRAIN_CACHE", "/tmp/sparsetrain-cache"))
    out = {"environment": environment(), "settings": {**base, "preset": args.preset}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ov in RUNS.items():
            cfg = build_config(args.preset, overrides={**base, **ov, "out_dir": f"{tmp}/{name}"})
            train(cfg, verbose=False)
            rows = [json.loads(line) for line in (Path(tmp) / name / "metrics.jsonl").read_text().splitlines()]
            windows = [r["tokens_per_s"] for r in rows if r["kind"] == "train" and r["step"] % args.log_every == 0]
            out["runs"][name] = {"tokens_per_s_by_window": windows,
                                 "median_tokens_per_s": statistics.median(windows[2:]),
                                 "loss_last": next(r["loss"] for r in reversed(rows) if r["kind"] == "train")}
            Path(args.out).write_text(json.dumps(out, indent=2))
    r = out["runs"]
    out["speedup"] = r["relu2_24"]["median_tokens_per_s"] / r["relu2"]["median_tokens_per_s"]
    Path(args.out).write_text(json.dumps(out, indent=2))
    for name, v in r.items():
        print(f"{name:<10} {v['median_tokens_per_s']:10.0f} tokens/s  (windows: {[round(w) for w in v['tokens_per_s_by_window']]})")
    print(f"relu2_24 / relu2: {out['speedup']:.3f}x")


if __name__ == "__main__":
    main()
