"""BK-Core on the GPU: the Triton kernel against the Python-loop recursion, and
the ResNet-BK layer's forward+backward, dense against learned-sparse at skip
ratios 0.3 / 0.5 / 0.7, side by side in one process.

    PYTHONPATH=src python bench/bk_core.py --out $OUT/bk_core.json

Kernel: B = 32 sequences, N = 2048, causal and bidirectional, forward+backward
(float32; the loop is ``impl="torch"``, the same recurrences one position per
Python iteration). Accuracy of both against float64 is recorded too.

Layer: bf16 autocast, B x N = 8 x 2048 tokens, d_model 1024, 4 experts of
hidden 4096, causal BK op. The sparse layer picks its positions in ``topk``
mask mode so every step skips exactly the stated fraction (threshold mode, the
LM default, learns its rate; its per-position choice costs the same).

``--graphed-only``: a fresh input every call, eagerly and as CUDA graphs
(``threshold_*`` rows: the causal threshold mask a language model trains
with, on the sync-free parked path, skipping each position with the stated
probability; ``sparse_*`` rows: ``topk``, exactly that fraction)
(``torch.cuda.make_graphed_callables``), dense against sparse, at d 1024 and
2048 (``--dims``), at ``--batches`` sequences of 2048 per call; ``--relu-control``
adds each layer with its ReLU² over the whole grouped buffer (``*-full-relu``),
the pass that the row-limited kernel (``bk/relu_squared_rows.py``) replaced.
``--profile-only D``: the top kernels of dense and sparse 0.5 at d_model D,
eagerly. (Session 3's ``--bucketing-only`` mode, which compared the per-expert loop's
128-row padding against none, is gone: on CUDA in bf16 the MoE no longer
loops over experts.)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsetrain.benchmark import environment, profile_top_kernels, summarize, time_fn, time_interleaved  # noqa: E402
from sparsetrain.bk import MoEResNetBKLayer, SparseMoEResNetBKLayer, bk_core  # noqa: E402


PROFILE = False


def bench_kernel(B: int, N: int, repeats: int) -> dict:
    out = {}
    v64 = torch.randn(B, N, device="cuda", dtype=torch.float64) * 2
    w = torch.randn(B, N, 2, device="cuda")
    for causal in (True, False):
        ref = bk_core(v64.cpu(), causal=causal).cuda()
        row = {}
        for impl in ("torch", "triton"):
            v = v64.float().clone().requires_grad_(True)

            def fb() -> None:
                (bk_core(v, causal=causal, impl=impl) * w).sum().backward()

            reps = max(3, repeats // 4) if impl == "torch" else repeats
            t = summarize(time_fn(fb, warmup=2 if impl == "torch" else 5, repeats=reps))
            with torch.no_grad():
                err = float((bk_core(v, causal=causal, impl=impl).double() - ref).abs().max() / ref.abs().max())
            row[impl] = {**t, "max_rel_err_vs_float64": err}
        row["speedup"] = row["torch"]["median_ms"] / row["triton"]["median_ms"]
        out["causal" if causal else "bidirectional"] = row
    return out


def timing_sparse_layer(D: int, H: int, E: int, skip: float) -> SparseMoEResNetBKLayer:
    """The learned-sparse layer as the benches time it: ``topk`` mask mode, so
    every call skips exactly ``skip`` of the positions (no host sync), with the
    causal BK op the language model uses (``topk`` is refused for a causal
    layer, so causality is switched on after construction; timing only)."""
    sp = SparseMoEResNetBKLayer(D, H, E, target_sparsity=skip, mask_mode="topk", causal=False).cuda()
    sp.causal = True
    return sp


def timing_threshold_layer(D: int, H: int, E: int, skip: float) -> SparseMoEResNetBKLayer:
    """The learned-sparse layer as a language model trains it (causal,
    ``threshold`` mask, the sync-free parked path on CUDA), with the predictor
    set so each position is skipped with probability ``skip``: its output is
    the constant ``log((1 - skip) / skip)``, and the mask's logistic noise
    does the rest, so the count varies from call to call as in training."""
    sp = SparseMoEResNetBKLayer(D, H, E, target_sparsity=skip, mask_mode="threshold").cuda()
    with torch.no_grad():
        sp.predictor[2].weight.zero_()
        sp.predictor[2].bias.fill_(math.log((1 - skip) / skip))
    return sp


def bench_layer(B: int, N: int, D: int, H: int, E: int, ratios: list[float], repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(B, N, D, device="cuda")
    g = torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16)
    layers = {"dense": MoEResNetBKLayer(D, H, E).cuda()}
    for r in ratios:
        layers[f"sparse_{r}"] = timing_sparse_layer(D, H, E, r)
    layers["dense_bidirectional"] = MoEResNetBKLayer(D, H, E, causal=False).cuda()
    results = {}
    order = list(layers)
    for k in order:  # warm-up (and autotune) each
        for _ in range(3):
            run_layer(layers[k], x, g)
    if PROFILE:  # after the warm-up: first calls load kernels and autotune
        results["profile"] = profile_layers(layers, x, g, ["dense", "sparse_0.5"])
    times = time_interleaved({k: (lambda layer=layers[k]: run_layer(layer, x, g)) for k in order},
                             warmup=0, repeats=repeats)
    for k in order:
        results[k] = summarize(times[k])
        if isinstance(layers[k], SparseMoEResNetBKLayer):
            results[k]["stats"] = layers[k].get_sparsity_stats()
    for k in order:
        results[k]["speedup_vs_dense"] = results["dense"]["median_ms"] / results[k]["median_ms"]
    return results


def bench_graphed(B: int, N: int, D: int, H: int, E: int, ratios: list[float], repeats: int,
                  compile: bool = False, bf16_params: bool = False, relu_control: bool = False) -> dict:
    """Dense against sparse (``topk`` mask, so no host sync anywhere) forward+backward
    with a fresh input each call, run eagerly and as CUDA graphs
    (``torch.cuda.make_graphed_callables``: the host cost of launching the many
    small kernels is gone, so this is what the GPU work itself takes). ``compile``:
    also torch.compile each layer before capturing it (fusing the elementwise
    work around the GEMMs). ``bf16_params``: the layers' parameters in bf16, so
    autocast casts nothing (a diagnostic of what the float32 weights' casts
    cost; the trainer keeps float32 parameters). ``relu_control``: each layer
    also as ``<name>-full-relu``, its ReLU² over the whole grouped buffer (the
    pass before session 10) instead of the row-limited kernel."""
    torch.manual_seed(0)
    xs = [torch.randn(B, N, D, device="cuda") for _ in range(8)]
    g = torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16)
    mods = {"dense": MoEResNetBKLayer(D, H, E).cuda()}
    for r in ratios:
        mods[f"sparse_{r}"] = timing_sparse_layer(D, H, E, r)
        mods[f"threshold_{r}"] = timing_threshold_layer(D, H, E, r)
    if relu_control:
        for name in list(mods):
            control = copy.deepcopy(mods[name])
            control.moe.limit_relu_rows = False
            kind, _, rate = name.partition("_")
            mods[f"{kind}-full-relu" + (f"_{rate}" if rate else "")] = control
    if bf16_params:
        for m in mods.values():
            m.to(torch.bfloat16)
    out: dict = {}
    it = [0]

    def call(fn, layer) -> None:
        it[0] += 1
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            y = fn(xs[it[0] % len(xs)])
        y.backward(g)
        layer.zero_grad(set_to_none=False)  # graphs keep their gradient buffers

    # graph copies first: parameters that already ran an eager backward on the
    # default stream keep AccumulateGrad nodes there, which breaks the capture
    runs = {}  # label -> (callable, the module whose gradients it fills)
    for name, layer in mods.items():
        for kind in ("graphed", "compiled_graphed") if compile else ("graphed",):
            copy_ = copy.deepcopy(layer)
            fn = torch.compile(copy_) if kind == "compiled_graphed" else copy_
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                    runs[f"{name}_{kind}"] = (torch.cuda.make_graphed_callables(fn, (xs[0].clone(),)), copy_)
            except Exception as e:  # noqa: BLE001 -- record why, keep the other variants
                out[f"{name}_{kind}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    for name, layer in mods.items():
        runs[f"{name}_eager"] = (layer, layer)
    times = time_interleaved({label: (lambda fn=fn, layer=layer: call(fn, layer)) for label, (fn, layer) in runs.items()},
                             warmup=3, repeats=repeats)
    out.update({label: summarize(times[label]) for label in runs})
    for name, layer in mods.items():
        for mode in ("eager", "graphed", "compiled_graphed"):
            v, base = out.get(f"{name}_{mode}"), out.get(f"dense_{mode}")
            if isinstance(v, dict) and isinstance(base, dict):
                v["speedup_vs_dense"] = base["median_ms"] / v["median_ms"]
                if isinstance(layer, SparseMoEResNetBKLayer):
                    v["last_call_stats"] = layer.get_sparsity_stats()
    return out


def run_layer(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(g)
    layer.zero_grad(set_to_none=True)


def profile_layers(layers: dict, x: torch.Tensor, g: torch.Tensor, names: list[str], top: int = 25) -> dict:
    """Top CUDA kernels (ms per step over 3 steps) of each named layer's forward+backward."""
    out = {}
    for name in names:
        out[name] = profile_top_kernels(lambda: run_layer(layers[name], x, g), steps=3, top=top)
        print_profile(name, out[name])
    return out


def print_profile(name: str, prof: dict) -> None:
    print(f"\n{name}: GPU busy {prof['gpu_busy_ms_per_step']} ms/step, CPU {prof['cpu_ms_per_step']} ms/step")
    for k, t, c in prof["top_self_cpu"][:8]:
        print(f"  cpu {t:8.3f} ms  x{c:<4} {k}")
    for k, t, c in prof["top_self_gpu"]:
        print(f"  gpu {t:8.3f} ms  x{c:<4} {k}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bk_core.json"))
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--profile", action="store_true", help="also print the top kernels of dense and sparse 0.5")
    ap.add_argument("--profile-only", type=int, default=0, metavar="D",
                    help="only profile dense, sparse 0.5 (topk) and threshold 0.5 (parked) at this d_model "
                         "(hidden 4 D), eagerly (or with --compile / --bf16-params), and exit")
    ap.add_argument("--graphed-only", action="store_true", help="only the eager/CUDA-graph comparison (fresh inputs)")
    ap.add_argument("--compile", action="store_true",
                    help="with --graphed-only: also torch.compile before capture; with --profile-only: profile compiled layers")
    ap.add_argument("--dims", default="1024,2048", help="with --graphed-only: d_model values (hidden 4 d)")
    ap.add_argument("--batches", default="8", help="with --graphed-only: batch sizes (sequences of 2048)")
    ap.add_argument("--ratios", default="0.3,0.5,0.7", help="with --graphed-only: skip rates")
    ap.add_argument("--bf16-params", action="store_true",
                    help="with --graphed-only or --profile-only: bf16 parameters (no weight casts)")
    ap.add_argument("--relu-control", action="store_true",
                    help="with --graphed-only: each layer also with ReLU² over the whole grouped buffer")
    args = ap.parse_args()
    if args.profile_only:
        D = args.profile_only
        torch.manual_seed(0)
        x = torch.randn(8, 2048, D, device="cuda")
        g = torch.randn(8, 2048, D, device="cuda", dtype=torch.bfloat16)
        layers = {"dense": MoEResNetBKLayer(D, 4 * D, 4).cuda(), "sparse_0.5": timing_sparse_layer(D, 4 * D, 4, 0.5),
                  "threshold_0.5": timing_threshold_layer(D, 4 * D, 4, 0.5)}
        if args.bf16_params:
            for layer in layers.values():
                layer.to(torch.bfloat16)
        if args.compile:
            torch._inductor.config.fallback_random = True
            layers = {k: torch.compile(v) for k, v in layers.items()}
        for layer in layers.values():
            for _ in range(3):
                run_layer(layer, x, g)
        res = {"environment": environment(), "d_model": D, "compiled": args.compile,
               "param_dtype": "bfloat16" if args.bf16_params else "float32",
               "profile": profile_layers(layers, x, g, list(layers), top=40)}
        Path(args.out).write_text(json.dumps(res, indent=2))
        return
    if args.graphed_only:
        if args.compile:  # aten's random ops, which CUDA-graph capture handles, instead of inductor's
            torch._inductor.config.fallback_random = True
        res = {"environment": environment(), "layer": {}}
        for D in (int(d) for d in args.dims.split(",")):
            for B in (int(b) for b in args.batches.split(",")):
                H = 4 * D
                key = f"d{D}_h{H}" + (f"_b{B}" if B != 8 else "")
                res["layer"][key] = {"shape": {"B": B, "N": 2048, "d_model": D, "hidden": H, "experts": 4},
                                     "param_dtype": "bfloat16" if args.bf16_params else "float32",
                                     **bench_graphed(B, 2048, D, H, 4, [float(r) for r in args.ratios.split(",")],
                                                     args.repeats, args.compile, args.bf16_params,
                                                     args.relu_control)}
                Path(args.out).write_text(json.dumps(res, indent=2))
                torch.cuda.empty_cache()
        for shape, r in res["layer"].items():
            print(f"\n{'layer ' + shape:<40} {'ms':>8} {'vs dense':>9}")
            for k, v in r.items():
                if isinstance(v, dict) and "median_ms" in v:
                    print(f"{k:<40} {v['median_ms']:8.2f} {v['speedup_vs_dense']:8.2f}x")
                elif k.endswith("_error"):
                    print(f"{k:<40} {v[:150]}")
        return
    global PROFILE
    PROFILE = args.profile  # profiles the first shape only
    out = {"environment": environment(),
           "kernel": {"shape": {"B": 32, "N": 2048}, **bench_kernel(32, 2048, args.repeats)}}
    out["layer"] = {}
    for D, H in [(1024, 4096), (2048, 8192)]:
        shape = {"B": 8, "N": 2048, "d_model": D, "hidden": H, "experts": 4}
        out["layer"][f"d{D}_h{H}"] = {"shape": shape, "dtype": "bf16 autocast",
                                     **bench_layer(8, 2048, D, H, 4, [0.3, 0.5, 0.7], args.repeats)}
        PROFILE = False
        Path(args.out).write_text(json.dumps(out, indent=2))
        torch.cuda.empty_cache()
    print(f"\n{'kernel fwd+bwd':<22} {'loop ms':>9} {'triton ms':>10} {'speedup':>8}")
    for mode in ("causal", "bidirectional"):
        r = out["kernel"][mode]
        print(f"{mode:<22} {r['torch']['median_ms']:9.2f} {r['triton']['median_ms']:10.3f} {r['speedup']:8.1f}x")
    for shape, res in out["layer"].items():
        print(f"\n{'layer ' + shape:<22} {'ms':>9} {'vs dense':>9}")
        for k, r in res.items():
            if isinstance(r, dict) and "median_ms" in r:
                print(f"{k:<22} {r['median_ms']:9.2f} {r['speedup_vs_dense']:8.2f}x")


if __name__ == "__main__":
    main()
