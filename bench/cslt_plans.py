"""Cached cuSPARSELt plans (sparse24/cslt_plans.py) against torch._cslt_sparse_mm,
which builds a plan on every call, side by side in one run.

    PYTHONPATH=src python bench/cslt_plans.py --out $OUT/cslt_plans.json

1. Products: the 2:4 FFN's four sparse products at each ``--shapes`` entry
   (tokens x d_model x hidden, bf16), with the searched configuration: host
   microseconds to submit one call (100 calls queued, no synchronisation), GPU
   milliseconds per call (calls back to back), and whether both give the same bits.
2. Training steps (sequence 2048, batch 8) of dense ``relu2`` and of ``relu2_24``
   on cuSPARSELt with torch's per-call plans and with cached plans, for each
   ``--steps`` entry and each ``--modes`` entry (eager, compiled, or
   torch.compile's reduce-overhead mode, i.e. CUDA graphs).

Writes JSON after every entry and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsetrain.benchmark import SPARSE24_OVERRIDES, bench_train_step, cuda_ms_per_call, environment, parse_step_entries  # noqa: E402
from sparsetrain.sparse24 import cslt_plans  # noqa: E402
from sparsetrain.sparse24 import ffn as ffn_module  # noqa: E402
from sparsetrain.sparse24.cusparselt import sparse_mm  # noqa: E402
from sparsetrain.sparse24.packing import pack_transposable  # noqa: E402

BF16 = torch.bfloat16


def host_us_per_call(fn, calls: int = 100) -> float:
    """Host time to submit one call, ``calls`` queued without synchronising."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def products(N: int, d: int, h: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(N, d, device="cuda", dtype=BF16)
    dy = torch.randn(N, d, device="cuda", dtype=BF16)
    w_up = torch.randn(h, d, device="cuda", dtype=BF16) / d**0.5
    w_down = torch.randn(d, h, device="cuda", dtype=BF16) / h**0.5
    u = F.linear(x, w_up)
    s, s_t, pattern = pack_transposable(u)
    du, du_t, _ = pack_transposable(u, dy @ w_down, pattern)
    calls = {"down s@Wdown^T": lambda: sparse_mm(s, w_down.t()),
             "dWdown s^T@dy": lambda: sparse_mm(s_t, dy, transpose_result=True),
             "dx du@Wup": lambda: sparse_mm(du, w_up),
             "dWup du^T@x": lambda: sparse_mm(du_t, x)}
    out = {}
    for name, fn in calls.items():
        row = {}
        for plans in ("torch", "cached"):
            cslt_plans.ENABLED = plans == "cached"
            row[f"{plans}_host_us"] = statistics.median(host_us_per_call(fn) for _ in range(3))
            row[f"{plans}_gpu_ms"] = statistics.median(cuda_ms_per_call(fn, calls=10) for _ in range(5))
            row[f"{plans}_result"] = fn()
        row["same_bits"] = bool(torch.equal(row.pop("torch_result"), row.pop("cached_result")))
        out[name] = row
    cslt_plans.ENABLED = True
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "cslt_plans.json"))
    ap.add_argument("--shapes", default="16384x1280x5120,16384x4096x16384")
    ap.add_argument("--steps", default="d20", help="'preset[:key=value,...]' entries separated by ';'")
    ap.add_argument("--modes", default="eager,compiled", help="comma list of eager, compiled, reduce-overhead")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/cslt_plans.py needs a CUDA GPU")
    t0 = time.perf_counter()
    ext = cslt_plans.load()
    env = environment()
    env["extension_build_s"] = round(time.perf_counter() - t0, 1)
    if ext is None:
        sys.exit("the cslt_plans extension did not build")
    res: dict = {"environment": env, "products": {}, "steps": {}}

    def save() -> None:
        Path(args.out).write_text(json.dumps(res, indent=2))

    for shape in filter(None, args.shapes.split(",")):
        N, d, h = (int(v) for v in shape.split("x"))
        res["products"][shape] = products(N, d, h)
        save()

    sparse = SPARSE24_OVERRIDES
    default_width = ffn_module.CUSPARSELT_MIN_WIDTH
    for entry, preset, model in parse_step_entries(args.steps):
        for mode in filter(None, args.modes.split(",")):
            st = res["steps"][f"{entry} {mode}"] = {"preset": preset, "model_overrides": model, "mode": mode}
            for name, ov, cached in [("relu2", {"ffn": "relu2"}, True), ("relu2_24_torch_plans", sparse, False),
                                     ("relu2_24_cached_plans", sparse, True)]:
                cslt_plans.ENABLED = cached
                ffn_module.CUSPARSELT_MIN_WIDTH = 0  # cuSPARSELt at every width
                try:
                    st[name] = bench_train_step(preset, 2048, 8, compile=mode != "eager", repeats=args.repeats,
                                                compile_mode="reduce-overhead" if mode == "reduce-overhead" else None,
                                                model_overrides={**model, **ov})
                except Exception as e:  # noqa: BLE001 - recorded; the other variants still run
                    st[name] = {"error": repr(e)[:500], "step": {"median_ms": float("nan")}}
                torch._dynamo.reset()
                torch.cuda.empty_cache()
                save()
            for name in ("relu2_24_torch_plans", "relu2_24_cached_plans"):
                st[f"speedup_{name}"] = st["relu2"]["step"]["median_ms"] / st[name]["step"]["median_ms"]
            save()
    ffn_module.CUSPARSELT_MIN_WIDTH = default_width
    cslt_plans.ENABLED = True

    print(f"\n{env['device']}, torch {env['torch']}, extension built in {env['extension_build_s']} s")
    print(f"{'shape':<18} {'product':<16} {'host us torch':>13} {'cached':>7} {'GPU ms torch':>12} {'cached':>7} {'same':>5}")
    for shape, rows in res["products"].items():
        for name, r in rows.items():
            print(f"{shape:<18} {name:<16} {r['torch_host_us']:13.1f} {r['cached_host_us']:7.1f} "
                  f"{r['torch_gpu_ms']:12.3f} {r['cached_gpu_ms']:7.3f} {str(r['same_bits']):>5}")
    print(f"\n{'step':<40} {'relu2 ms':>9} {'2:4 torch':>10} {'2:4 cached':>11} {'x torch':>8} {'x cached':>9}")
    for key, st in res["steps"].items():
        print(f"{key:<40} {st['relu2']['step']['median_ms']:9.1f} {st['relu2_24_torch_plans']['step']['median_ms']:10.1f} "
              f"{st['relu2_24_cached_plans']['step']['median_ms']:11.1f} {st['speedup_relu2_24_torch_plans']:7.3f}x "
              f"{st['speedup_relu2_24_cached_plans']:8.3f}x")
        for name in ("relu2", "relu2_24_torch_plans", "relu2_24_cached_plans"):
            if "error" in st[name]:
                print(f"  {name}: {st[name]['error'][:200]}")


if __name__ == "__main__":
    main()
