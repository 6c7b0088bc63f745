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
run's two, which cancels a drift that is linear in time.

The drift is not linear: under the H200's 700 W limit the SM clock falls as
the chip warms, so the first run of a call, on a cool GPU, ran 3-5% faster
than the same model later (session 12's files: dense at order 0 against
order 3). That was the "dense model faster in the trainer than in the step
bench" of session 12. A run's first compilation also idles the GPU for a
minute, long enough to cool it from 63 to 45 C (session 13). So each run is
first trained ``--prime-steps`` steps untimed (compiling it, and filling the
compile caches the timed run then reads), ``--heat-seconds`` (60 by default
on CUDA) of matmuls follow, and only then the timed runs; each records its
median SM clock, power and temperature (``gpu``). Compare with
the interleaved step timings of ``bench/sparse24_ffn.py``; ``--fixed-batch``
trains on the first batch at every step, as those do.
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
from sparsetrain.benchmark import (SPARSE24_OVERRIDES, environment, gpu_clock_monitor, heat_gpu,  # noqa: E402
                                   parse_step_entries)

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
    ap.add_argument("--heat-seconds", type=float, default=60.0,
                    help="on CUDA, run matmuls this long before the first timed run, so no run starts on a cool GPU (0: off)")
    ap.add_argument("--prime-steps", type=int, default=3,
                    help="train each run this many steps, untimed, before heating and timing (compiles it; 0: off)")
    args = ap.parse_args()
    if args.fixed_batch:
        _repeat_first_batch()
    runs = {name: ov for _, name, ov in parse_step_entries(args.runs)}
    heat_seconds = args.heat_seconds if torch.cuda.is_available() else 0.0  # nothing to heat without CUDA
    base = dict(max_steps=args.steps, log_every=args.log_every, eval_every=10 * args.steps, eval_batches=2, save_checkpoints=False,
                seq_len=args.seq_len, batch_size=args.batch_size, warmup_steps=10, compile=args.compile,
                cache_dir=os.environ.get("SPARSETRAIN_CACHE", "/tmp/sparsetrain-cache"))
    out = {"environment": environment(), "runs": {},
           "settings": {**base, "preset": args.preset, "runs": args.runs, "fixed_batch": args.fixed_batch,
                        "heat_seconds": heat_seconds,
                        "prime_steps": args.prime_steps}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in runs if args.prime_steps > 0 else ():
            prime = {**base, **runs[name], "max_steps": args.prime_steps, "log_every": 1, "out_dir": f"{tmp}/prime_{name}"}
            train(build_config(args.preset, overrides=prime), verbose=False)
            shutil.rmtree(prime["out_dir"], ignore_errors=True)
        if heat_seconds > 0:
            out["heat"] = heat_gpu(heat_seconds)
        order = list(runs) + list(runs)[::-1] if args.abba else list(runs)
        for i, name in enumerate(order):
            run_dir = f"{tmp}/{i}_{name}"
            cfg = build_config(args.preset, overrides={**base, **runs[name], "out_dir": run_dir})
            with gpu_clock_monitor(interval_s=1.0) as gpu:
                train(cfg, verbose=False)
            rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
            logged = [r for r in rows if r["kind"] == "train" and r["step"] % args.log_every == 0]  # one per window
            windows = [r["tokens_per_s"] for r in logged]
            bwd = [r["backward_ms"] for r in logged if "backward_ms" in r]
            run = {"order": i, "tokens_per_s_by_window": windows, "median_tokens_per_s": statistics.median(windows[2:] or windows[-1:]),
                   "backward_ms_by_window": bwd, "gpu": gpu,
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
                  f"backward ms: {[round(b, 1) for b in x['backward_ms_by_window']]}; "
                  f"SM {x['gpu'].get('sm_clock_mhz', 0):.0f} MHz, {x['gpu'].get('temperature_c', 0):.0f} C)")
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
