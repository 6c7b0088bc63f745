"""2:4 activation-sparse FFN on sparse tensor cores against dense, side by side.

    PYTHONPATH=src python bench/sparse24_ffn.py --out $OUT/sparse24_ffn.json

Per shape (bf16, 16k tokens; d_model 2048 / hidden 8192 and 4096 / 16384):

* FFN block forward+backward: dense ``relu2``, ``swiglu`` at equal parameters
  (hidden 2/3), and ``relu2_24`` (``transposable`` through cuSPARSELt);
* the pieces: each of the six GEMMs dense, the four sparse ones through
  cuSPARSELt with the searched algorithm, and the one-pass Triton
  selection+packing of ``s`` and ``s^T`` (forward) and of ``du``, ``du^T``
  (backward);
* the bf16 ceiling those measured GEMMs allow:
  ``sum(6 dense GEMMs) / (2 dense + 4 sparse GEMMs)``.

Then training steps (sequence 2048, batch 8; ``--steps``, default the ``d20``
preset; wider models through overrides, e.g. ``d20:d_model=4096,n_head=32,n_layer=8``):
dense ``relu2`` against ``relu2_24`` on cuSPARSELt and on the masked kernel,
all eager. ``--interleave-steps``: relu2 and relu2_24 on cuSPARSELt built
together and timed in interleaved rounds instead (eager, or compiled with
``--compile-steps``): each step synchronized, then ``--queued-steps`` steps
per sync as the trainer runs them; with ``--clock-steps``, the SM clock and
power while each model runs; with ``--profile-steps``, kernel lists and GPU
idle by phase. The packing kernel alone: bench/sparse24_packing.py; the
trainer's own tokens/s: bench/trainer_throughput.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparsetrain.benchmark import SPARSE24_OVERRIDES, bench_train_step, bench_train_steps_interleaved, cuda_ms_per_call, environment, parse_step_entries, profile_top_kernels, summarize, time_fn, time_interleaved  # noqa: E402
from sparsetrain.model import relu_squared  # noqa: E402
from sparsetrain.sparse24.cusparselt import _CONFIGS, sparse24_ffn_cusparselt, sparse_mm  # noqa: E402
from sparsetrain.sparse24 import ffn as ffn_module  # noqa: E402
from sparsetrain.sparse24.ffn import sparse24_ffn_masked_kernel  # noqa: E402
from sparsetrain.sparse24.packing import pack_transposable, transposable_mask  # noqa: E402

BF16 = torch.bfloat16


def ms(fn, repeats: int) -> float:
    """GPU ms per call, calls queued back to back: a cuSPARSELt call spends
    0.4-0.6 ms on the host setting up its plan (bench/results/cusparselt_operand_probe_h200.json),
    which a single call between two events would count as GPU time."""
    return statistics.median(cuda_ms_per_call(fn) for _ in range(max(3, repeats // 3)))


def ffn_block(N: int, d: int, h: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(N, d, device="cuda", dtype=BF16)
    dy = torch.randn(N, d, device="cuda", dtype=BF16)
    w_up = (torch.randn(h, d, device="cuda") / d**0.5).to(BF16).requires_grad_(True)
    w_down = (torch.randn(d, h, device="cuda") / h**0.5).to(BF16).requires_grad_(True)
    hs = int(round(h * 2 / 3 / 64)) * 64
    w_gate_s = (torch.randn(hs, d, device="cuda") / d**0.5).to(BF16).requires_grad_(True)
    w_up_s = (torch.randn(hs, d, device="cuda") / d**0.5).to(BF16).requires_grad_(True)
    w_down_s = (torch.randn(d, hs, device="cuda") / hs**0.5).to(BF16).requires_grad_(True)
    xg = x.clone().requires_grad_(True)

    def relu2() -> None:
        F.linear(F.relu(F.linear(xg, w_up)).square(), w_down).backward(dy)

    def swiglu() -> None:
        F.linear(F.silu(F.linear(xg, w_gate_s)) * F.linear(xg, w_up_s), w_down_s).backward(dy)

    def relu2_24() -> None:
        sparse24_ffn_cusparselt(xg, w_up, w_down).backward(dy)

    def relu2_24_masked_kernel() -> None:  # the same selection on dense GEMMs (below CUSPARSELT_MIN_WIDTH)
        sparse24_ffn_masked_kernel(xg, w_up, w_down).backward(dy)

    variants = {"relu2": relu2, "swiglu": swiglu, "relu2_24": relu2_24, "relu2_24_masked_kernel": relu2_24_masked_kernel}
    times = time_interleaved(variants, warmup=6, repeats=repeats)
    out = {k: summarize(v) for k, v in times.items()}
    for k in out:
        out[k]["speedup_vs_relu2"] = out["relu2"]["median_ms"] / out[k]["median_ms"]

    # pieces
    with torch.no_grad():
        u = F.linear(x, w_up)
        a = F.relu(u).square()
        s, s_t, pattern = pack_transposable(u)
        mask = transposable_mask(a)
        wd_t = w_down.t()  # column-major, as the path passes it
        ds = dy @ w_down
        g = (ds * 2 * F.relu(u)) * mask
        du, du_t, _ = pack_transposable(u, ds, pattern)
        dense = {
            "up x@Wup^T": ms(lambda: F.linear(x, w_up), repeats),
            "down s@Wdown^T": ms(lambda: a @ wd_t, repeats),
            "ds dy@Wdown": ms(lambda: dy @ w_down, repeats),
            "dWdown s^T@dy": ms(lambda: a.t() @ dy, repeats),
            "dx du@Wup": ms(lambda: g @ w_up, repeats),
            "dWup du^T@x": ms(lambda: g.t() @ x, repeats),
        }
        wu = w_up.detach()
        sparse = {  # the path's own products: searched configuration per shape
            "down s@Wdown^T": ms(lambda: sparse_mm(s, wd_t), repeats),
            "dWdown s^T@dy": ms(lambda: sparse_mm(s_t, dy, transpose_result=True), repeats),
            "dx du@Wup": ms(lambda: sparse_mm(du, wu), repeats),
            "dWup du^T@x": ms(lambda: sparse_mm(du_t, x), repeats),
        }
        want = (a * mask).float() @ wd_t.float()
        err = float((sparse_mm(s, wd_t).float() - want).norm() / want.norm())
        want = g.float().t() @ x.float()
        err_t = float((sparse_mm(du_t, x).float() - want).norm() / want.norm())
        other = {
            "select+pack s, s^T (Triton)": ms(lambda: pack_transposable(u), repeats),
            "pack du, du^T on the saved pattern (Triton)": ms(lambda: pack_transposable(u, ds, pattern), repeats),
            "cslt_compress s + s^T": ms(lambda: (torch._cslt_compress(a * mask), torch._cslt_compress((a * mask).t().contiguous())), 5),
            "relu^2": ms(lambda: F.relu(u).square(), repeats),
        }
        searched = {str(k): v for k, v in _CONFIGS.items()}
    dense_gemms = sum(dense.values())
    sparse_mix = dense["up x@Wup^T"] + dense["ds dy@Wdown"] + sum(sparse.values())
    out["pieces_ms"] = {"dense_gemms": dense, "sparse_gemms": sparse, "other": other, "alg_ids": searched,
                        "sparse_down_rel_err_vs_masked_dense": err, "sparse_dWup_rel_err_vs_masked_dense": err_t}
    out["ceiling_gemms_only"] = dense_gemms / sparse_mix
    out["fraction_of_ceiling"] = out["relu2_24"]["speedup_vs_relu2"] / out["ceiling_gemms_only"]
    return out


def profile_blocks(N: int, d: int, h: int) -> dict:
    """Top kernels of the relu2 and relu2_24 (cuSPARSELt) blocks' forward+backward."""
    from bk_core import print_profile

    torch.manual_seed(0)
    x = torch.randn(N, d, device="cuda", dtype=BF16).requires_grad_(True)
    dy = torch.randn(N, d, device="cuda", dtype=BF16)
    w_up = (torch.randn(h, d, device="cuda") / d**0.5).to(BF16).requires_grad_(True)
    w_down = (torch.randn(d, h, device="cuda") / h**0.5).to(BF16).requires_grad_(True)
    fns = {"relu2": lambda: F.linear(relu_squared(F.linear(x, w_up)), w_down).backward(dy),
           "relu2_24": lambda: sparse24_ffn_cusparselt(x, w_up, w_down).backward(dy)}
    out = {}
    for name, fn in fns.items():
        time_fn(fn, warmup=5, repeats=1)
        out[name] = profile_top_kernels(fn, steps=3, top=20)
        print_profile(name, out[name])
    return out


def main() -> None:
    from bk_core import print_profile

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "sparse24_ffn.json"))
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--shapes", default="16384x2048x8192,16384x4096x16384",
                    help="FFN shapes tokens x d_model x hidden (comma list)")
    ap.add_argument("--steps", default="d20",
                    help="training steps to time: 'preset[:key=value,...]' entries (model overrides) separated by ';'")
    ap.add_argument("--profile-steps", action="store_true", help="also profile each timed step's top kernels "
                    "(with --interleave-steps: after the timing, 60 GPU kernels each)")
    ap.add_argument("--compile-steps", action="store_true", help="torch.compile the models whose steps are timed")
    ap.add_argument("--compile-mode", default=None,
                    help="with --compile-steps: torch.compile's mode (e.g. reduce-overhead: CUDA graphs)")
    ap.add_argument("--tokens", choices=("random", "corpus"), default="random",
                    help="with --interleave-steps: the timed batch, uniform random token ids or the embedded corpus")
    ap.add_argument("--interleave-steps", action="store_true",
                    help="time relu2 and relu2_24 on cuSPARSELt built together, in interleaved rounds (no masked kernel)")
    ap.add_argument("--queued-steps", type=int, default=5,
                    help="with --interleave-steps: also time samples of this many steps queued back to back, one "
                         "sync per sample, as the trainer runs them (0: off)")
    ap.add_argument("--clock-steps", type=int, default=10,
                    help="with --interleave-steps: also run this many queued steps of each model while nvidia-smi "
                         "reads the SM clock and power (0: off)")
    ap.add_argument("--profile-only", default="", metavar="NxDxH",
                    help="only profile the relu2 and relu2_24 blocks' kernels at this shape, and exit")
    args = ap.parse_args()
    if args.profile_only:
        N, d, h = (int(v) for v in args.profile_only.split("x"))
        res = {"environment": environment(), "shape": [N, d, h], "profile": profile_blocks(N, d, h)}
        Path(args.out).write_text(json.dumps(res, indent=2))
        return
    out = {"environment": environment(), "ffn": {}, "step": {}}
    for N, d, h in (tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",") if shape):
        key = f"N{N}_d{d}_h{h}"
        out["ffn"][key] = ffn_block(N, d, h, args.repeats)
        Path(args.out).write_text(json.dumps(out, indent=2))
        torch.cuda.empty_cache()
    if args.interleave_steps:
        interleaved_steps(args, out)
        return
    if not args.skip_step:
        sparse = SPARSE24_OVERRIDES
        default_width = ffn_module.CUSPARSELT_MIN_WIDTH
        for entry, preset, model in parse_step_entries(args.steps):
            st = out["step"][entry] = {"preset": preset, "model_overrides": model}
            # relu2_24 on cuSPARSELt and on the masked kernel (dense GEMMs), forced either way
            for name, ov, min_width in [("relu2", {"ffn": "relu2"}, default_width), ("relu2_24_cusparselt", sparse, 0),
                                        ("relu2_24_masked_kernel", sparse, 1 << 30)]:
                ffn_module.CUSPARSELT_MIN_WIDTH = min_width
                try:
                    st[name] = bench_train_step(preset, 2048, 8, compile=args.compile_steps, repeats=10,
                                                compile_mode=args.compile_mode if args.compile_steps else None,
                                                model_overrides={**model, **ov},
                                                profile_top=25 if args.profile_steps else 0)
                except Exception as e:  # noqa: BLE001 - e.g. a compile failure: recorded, the others still run
                    st[name] = {"error": repr(e)[:500], "step": {"median_ms": float("nan")}}
                if args.profile_steps and "profile" in st[name]:
                    print_profile(f"{entry} {name}", st[name]["profile"])
                torch._dynamo.reset()
                torch.cuda.empty_cache()
                Path(args.out).write_text(json.dumps(out, indent=2))  # a run cut short keeps what it measured
            ffn_module.CUSPARSELT_MIN_WIDTH = default_width
            for name in ("relu2_24_cusparselt", "relu2_24_masked_kernel"):
                st[f"speedup_{name}"] = st["relu2"]["step"]["median_ms"] / st[name]["step"]["median_ms"]
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\n{'FFN fwd+bwd ms':<20} {'relu2':>7} {'swiglu':>7} {'2:4':>7} {'2:4 mk':>7} {'speedup':>8} {'ceiling':>8} {'of ceil':>8}")
    for key, r in out["ffn"].items():
        print(f"{key:<20} {r['relu2']['median_ms']:7.3f} {r['swiglu']['median_ms']:7.3f} {r['relu2_24']['median_ms']:7.3f}"
              f" {r['relu2_24_masked_kernel']['median_ms']:7.3f} {r['relu2_24']['speedup_vs_relu2']:7.3f}x {r['ceiling_gemms_only']:7.3f}x {r['fraction_of_ceiling']:8.3f}")
    for preset, st in out["step"].items():
        for name in ("relu2", "relu2_24_cusparselt", "relu2_24_masked_kernel"):
            if "error" in st[name]:
                print(f"{preset} {name}: {st[name]['error'][:300]}")
        print(f"{preset} step: relu2 {st['relu2']['step']['median_ms']:.1f} ms, relu2_24 on cuSPARSELt "
              f"{st['relu2_24_cusparselt']['step']['median_ms']:.1f} ms ({st['speedup_relu2_24_cusparselt']:.3f}x), "
              f"on the masked kernel {st['relu2_24_masked_kernel']['step']['median_ms']:.1f} ms "
              f"({st['speedup_relu2_24_masked_kernel']:.3f}x)")

def interleaved_steps(args, out: dict) -> None:
    """Dense relu2 against relu2_24 on cuSPARSELt, both models built at once and
    timed in three interleaved rounds of 5 steps, so drift between two
    sequential runs cannot pass for a speedup (on the ResNet-BK step it was
    larger than the effects; bench/results/bk_step_relu_rows_interleaved_h200.json)."""
    sparse = SPARSE24_OVERRIDES
    torch._dynamo.config.cache_size_limit = 64  # two models of one class compile side by side
    mode = args.compile_mode if args.compile_steps else None
    for entry, preset, model in parse_step_entries(args.steps):
        kw = dict(preset=preset, seq_len=2048, batch_size=8, compile=args.compile_steps, compile_mode=mode, tokens=args.tokens)
        variants = {"relu2": {**kw, "model_overrides": {**model, "ffn": "relu2"}},
                    "relu2_24_cusparselt": {**kw, "model_overrides": {**model, **sparse}}}
        key = (f"{entry} {'compiled' if args.compile_steps else 'eager'}" + (f" {mode}" if mode else "")
               + (f" {args.tokens} tokens" if args.tokens != "random" else ""))
        try:
            res = bench_train_steps_interleaved(variants, rounds=3, repeats=15, profile_top=60 if args.profile_steps else 0,
                                                queued=args.queued_steps, clock_steps=args.clock_steps)
            res["speedup"] = res["relu2"]["median_ms"] / res["relu2_24_cusparselt"]["median_ms"]
            if args.queued_steps:
                res["speedup_queued"] = res["relu2"]["queued"]["median_ms"] / res["relu2_24_cusparselt"]["queued"]["median_ms"]
        except Exception as e:  # noqa: BLE001 - recorded, the other entries still run
            res = {"error": repr(e)[:500]}
        out["step"][key] = res
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(out, indent=2))
    for key, res in out["step"].items():
        if "error" in res:
            print(f"{key}: {res['error'][:300]}")
        else:
            for name in ("relu2", "relu2_24_cusparselt"):
                clocks = res[name].get("gpu_clocks")
                if clocks and clocks["samples"]:
                    print(f"{key} {name}: SM clock {clocks['sm_clock_mhz']:.0f} MHz, power {clocks['power_w']:.0f} W "
                          f"(median of {clocks['samples']} readings over {args.clock_steps} queued steps)")
            if args.profile_steps:
                for name in ("relu2", "relu2_24_cusparselt"):
                    print(f"-- {key} {name}: GPU kernels, ms per step, calls per step")
                    prof = res[name]["profile"]
                    for k, t, c in prof["gpu_kernels"][:30]:
                        print(f"{t:9.3f} {c:5d}  {k}")
                    idle = prof["gpu_idle"]
                    print(f"   kernels {prof['kernel_ms_per_step']:.2f} ms/step, GPU idle {idle['total_ms_per_step']:.2f} ms/step: "
                          + ", ".join(f"{k} {v:.2f}" for k, v in idle["ms_per_step_by_phase"].items()))
                    for g in idle["largest"][:10]:
                        print("     gap", g)
            print(f"{key} step, interleaved: relu2 {res['relu2']['median_ms']:.1f} ms, relu2_24 on cuSPARSELt "
                  f"{res['relu2_24_cusparselt']['median_ms']:.1f} ms ({res['speedup']:.3f}x)"
                  + (f"; {args.queued_steps} steps queued: {res['relu2']['queued']['median_ms']:.1f} ms against "
                     f"{res['relu2_24_cusparselt']['queued']['median_ms']:.1f} ms ({res['speedup_queued']:.3f}x)"
                     if args.queued_steps else ""))


if __name__ == "__main__":
    main()
