"""Training throughput as the trainer itself reports it, on the embedded
corpus: by default dense ``relu2`` against ``relu2_24`` (``transposable``,
sparse from the first step); any runs through ``--runs``, each against the
first.

    PYTHONPATH=src python bench/trainer_throughput.py --preset d20 --compile --out $OUT/throughput.json
    PYTHONPATH=src python bench/trainer_throughput.py --runs "dense;collider:use_collider=True,collider_sparsity=0.5"

Each run trains ``--steps`` steps and logs every ``--log-every``; the
trainer syncs the GPU once per log window, so its tokens/s per window is the
end-to-end rate a user sees (data loading, queued steps, optimizer). The
first two windows (compilation, warm-up) are left out of the median (a run
too short for that takes its last window). The runs
go one after the other, so host or clock drift between them counts (the GPU's
tokens/s fell 1–2% over each 80-step d20 run); ``--abba`` runs the list
forwards then backwards (relu2, relu2_24, relu2_24, relu2) and averages each
run's two, which cancels a drift that is linear in time. Compare with the interleaved step timings of
``bench/sparse24_ffn.py``; ``--fixed-batch`` trains on the first batch at
every step, as those do (the trainer's dense model ran 3-4% faster than the
step bench's while the 2:4 one did not, session 12).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import torch  # noqa: E402

from sparsetrain import build_config, train  # noqa: E402
from sparsetrain.trainer import Trainer  # noqa: E402
from sparsetrain.benchmark import SPARSE24_OVERRIDES, environment, parse_step_entries  # noqa: E402

DEFAULT_RUNS = "relu2:ffn=relu2;relu2_24:" + ",".join(f"{k}={v}" for k, v in SPARSE24_OVERRIDES.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "trainer_throughput.json"))
    ap.add_argument("--preset", default="d20")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--runs", default=DEFAULT_RUNS,
                    help="'name:key=value,...' entries (config overrides) separated by ';'; the first is the baseline")
    ap.add_argument("--abba", action="store_true", help="run the list forwards, then backwards (twice the time)")
    ap.add_argument("--fixed-batch", action="store_true",
                    help="train every step on the first batch, as the step benches do (is the data path what differs?)")
    args = ap.parse_args()
    if args.fixed_batch:
        _repeat_first_batch()
    runs = {name: ov for _, name, ov in parse_step_entries(args.runs)}
    base = dict(max_steps=args.steps, log_every=args.log_every, eval_every=10 * args.steps, eval_batches=2, save_checkpoints=False,
                seq_len=args.seq_len, batch_size=args.batch_size, warmup_steps=10, compile=args.compile,
                cache_dir=os.environ.get("SPARSETRAIN_CACHE", "/tmp/sparsetrain-cache"))
    out = {"environment": environment(), "settings": {**base, "preset": args.preset, "runs": args.runs, "fixed_batch": args.fixed_batch}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        order = list(runs) + list(runs)[::-1] if args.abba else list(runs)
        for i, name in enumerate(order):
            run_dir = f"{tmp}/{i}_{name}"
            cfg = build_config(args.preset, overrides={**base, **runs[name], "out_dir": run_dir})
            train(cfg, verbose=False)
            rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
            logged = [r for r in rows if r["kind"] == "train" and r["step"] % args.log_every == 0]  # one per window
            windows = [r["tokens_per_s"] for r in logged]
            bwd = [r["backward_ms"] for r in logged if "backward_ms" in r]
            run = {"order": i, "tokens_per_s_by_window": windows, "median_tokens_per_s": statistics.median(windows[2:] or windows[-1:]),
                   "backward_ms_by_window": bwd,
                   "loss_last": next(r["loss"] for r in reversed(rows) if r["kind"] == "train")}
            shutil.rmtree(run_dir, ignore_errors=True)
            out["runs"].setdefault(name, {"repeats": []})["repeats"].append(run)
            Path(args.out).write_text(json.dumps(out, indent=2))
    for r in out["runs"].values():  # the mean over an ABBA pair cancels a linear drift
        r["median_tokens_per_s"] = statistics.mean(x["median_tokens_per_s"] for x in r["repeats"])
    r = out["runs"]
    first = next(iter(r))
    out["speedup"] = {name: v["median_tokens_per_s"] / r[first]["median_tokens_per_s"] for name, v in r.items()}
    Path(args.out).write_text(json.dumps(out, indent=2))
    for name, v in r.items():
        for x in v["repeats"]:
            print(f"{name:<10} run {x['order']}: {x['median_tokens_per_s']:10.0f} tokens/s  "
                  f"(windows: {[round(w) for w in x['tokens_per_s_by_window']]}; "
                  f"backward ms: {[round(b, 1) for b in x['backward_ms_by_window']]})")
    for name, speedup in out["speedup"].items():
        print(f"{name} / {first}: {speedup:.3f}x")


def _repeat_first_batch() -> None:
    """Make every Trainer return the first batch it built, already on its device,
    for every step (the step benches time one resident batch)."""
    build = Trainer._batch

    def first_batch(self: Trainer, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not hasattr(self, "_bench_batch"):
            self._bench_batch = tuple(t.to(self.device) for t in build(self, micro))
        return self._bench_batch

    Trainer._batch = first_batch


if __name__ == "__main__":
    main()
