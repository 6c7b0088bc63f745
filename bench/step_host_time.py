"""Host time against GPU time of a training step's forward and backward, dense
relu2 against relu2_24 (``transposable`` on cuSPARSELt).

    PYTHONPATH=src python bench/step_host_time.py --steps d20 --out $OUT/host.json

Per phase, median of ``--repeats`` steps, each started on an idle GPU:
``host_ms`` is how long the Python call took to return (the launches), and
``wall_ms`` how long until the GPU had finished it. Where the host time comes
near the GPU's, the GPU waits for launches and a synchronized step slows; a
training loop that syncs once per log window hides host time behind the
previous step's GPU work. Also the top host functions of one profiled step
of each variant by own time (``cProfile``), to see what the host spends on.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsetrain.benchmark import SPARSE24_OVERRIDES, environment, parse_step_entries  # noqa: E402
from sparsetrain.config import build_config  # noqa: E402
from sparsetrain.build import build_model  # noqa: E402
from sparsetrain.sparse24.ffn import prepare_ffns  # noqa: E402


def one_variant(preset: str, overrides: dict, compile_: bool, repeats: int, batch: int = 8, seq: int = 2048) -> dict:
    cfg = build_config(preset=preset, overrides={"seq_len": seq, **overrides})
    torch.manual_seed(0)
    model = build_model(cfg.model).cuda().train()
    prepare_ffns(model, batch * seq)
    run = torch.compile(model) if compile_ else model
    x = torch.randint(0, cfg.model.vocab_size, (batch, seq), device="cuda")

    def forward() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return run(x, x)[1]

    for _ in range(4):
        forward().backward()
    model.zero_grad(set_to_none=True)
    phases: dict[str, dict[str, list[float]]] = {p: {"host_ms": [], "wall_ms": []} for p in ("forward", "backward")}
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = forward()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        for p, host, wall in (("forward", t1 - t0, t2 - t0), ("backward", t3 - t2, t4 - t2)):
            phases[p]["host_ms"].append(host * 1e3)
            phases[p]["wall_ms"].append(wall * 1e3)
        model.zero_grad(set_to_none=True)
    out = {p: {k: statistics.median(v) for k, v in d.items()} for p, d in phases.items()}
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    forward().backward()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:20]  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    out["top_host_functions"] = [(f"{Path(f).name}:{line}({name})", nc, round(tt * 1e3, 3), round(ct * 1e3, 3))
                                 for (f, line, name), (cc, nc, tt, ct, _) in rows]
    model.zero_grad(set_to_none=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "step_host_time.json"))
    ap.add_argument("--steps", default="d20", help="'preset[:key=value,...]' entries separated by ';'")
    ap.add_argument("--eager", action="store_true", help="time the eager models instead of compiled ones")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    out: dict = {"environment": environment(), "compiled": not args.eager, "steps": {}}
    for entry, preset, model in parse_step_entries(args.steps):
        res = out["steps"][entry] = {}
        for name, ov in (("relu2", {"ffn": "relu2"}), ("relu2_24_cusparselt", SPARSE24_OVERRIDES)):
            res[name] = one_variant(preset, {**model, **ov}, not args.eager, args.repeats)
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            Path(args.out).write_text(json.dumps(out, indent=2))
    for entry, res in out["steps"].items():
        print(f"{entry} ({'eager' if args.eager else 'compiled'}), ms: host / wall")
        for name, r in res.items():
            print(f"  {name:<20} forward {r['forward']['host_ms']:6.1f} / {r['forward']['wall_ms']:6.1f}   "
                  f"backward {r['backward']['host_ms']:6.1f} / {r['backward']['wall_ms']:6.1f}")
        for name, r in res.items():
            print(f"  {name}: top host functions by own ms in one step (calls, own ms, cumulative ms)")
            for row in r["top_host_functions"][:8]:
                print(f"    {row}")


if __name__ == "__main__":
    main()
