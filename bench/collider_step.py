"""Collider against dense training and loss-only filtering: forward, backward and
whole-step time (bf16 autocast, sequence 2048), one process, side by side.

    PYTHONPATH=src python bench/collider_step.py --out $OUT/collider_step.json

Variants per model: dense; loss-only filtering at drop 0.5 (masked loss, dense
backward: the naive baseline); Collider at drop 0.25, 0.4, 0.5 with the default
attention backward (``auto``: the Triton kept-query kernel up to keep 0.65),
at 0.5 with cuDNN's dense backward over all query rows (``_dense_attention``),
and compiled at 0.4 with cuDNN's forced (``_dense_attention``).
Keep masks come from the `collider` score with exact top-k, and the
scoring+selection time is measured on its own. Each set runs eager and with
torch.compile (the dense model compiled whole; Collider's elementwise pieces
compiled), each against its own dense baseline. ``--profile`` models get a
torch.profiler pass that splits a compiled step by kernel family;
``--attention-only`` times the attention backward alone at the 1B shape.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsetrain.benchmark import cuda_ms_per_call, environment, gpu_idle_by_phase  # noqa: E402
from sparsetrain.collider import ColliderModel, filter as collider_filter, masked_cross_entropy  # noqa: E402
from sparsetrain.config import build_config  # noqa: E402
from sparsetrain.model import GPT  # noqa: E402
from sparsetrain.optim import make_optimizer  # noqa: E402
from sparsetrain.selection import TokenSelector  # noqa: E402

MODELS = {
    "nano-125m": ("nano-125m", {}),
    "1b": ("nano-125m", {"d_model": 2048, "n_layer": 16, "n_head": 16, "vocab_size": 32768}),
}
VARIANTS = [  # (kind, drop ratio, torch.compile, Collider attention backward: auto, dense or kept)
    ("dense", None, False, ""), ("loss_only", 0.5, False, ""), ("collider", 0.25, False, "auto"),
    ("collider", 0.4, False, "auto"), ("collider", 0.5, False, "auto"), ("collider", 0.5, False, "dense"),
    ("dense", None, True, ""), ("loss_only", 0.5, True, ""), ("collider", 0.25, True, "auto"),
    ("collider", 0.4, True, "auto"), ("collider", 0.4, True, "dense"), ("collider", 0.5, True, "auto"),
    ("collider", 0.5, True, "dense"),
]


def kernel_family(name: str) -> str:
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    if "gemm" in n or "cutlass" in n or "sm90" in n or "nvjet" in n or "xmma" in n or "cublas" in n:
        return "gemm"
    if "index" in n or "gather" in n or "scatter" in n:
        return "gather/scatter"
    if "reduce" in n or "norm" in n:
        return "reductions"
    if "elementwise" in n or "vectorized" in n or "unrolled" in n:
        return "elementwise"
    return "other"


def run_model(name: str, seq: int, batch: int, repeats: int, profile: bool, only: list[str] | None = None) -> dict:
    preset, over = MODELS[name]
    torch._dynamo.reset()  # compile afresh per model: no recompile limit carried over from the last one
    cfg = build_config(preset, overrides={"seq_len": seq, **over}).model
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.95), "cuda")
    colliders = {(c, a): ColliderModel(model, compile=c, attention=a) for c in (False, True) for a in ("auto", "dense", "kept")}
    compiled_model = torch.compile(model)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda", generator=g)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda", generator=g)
    n_valid = int((y != -100).sum())  # as the trainer counts it on the host batch
    out = {"model": name, "params": model.num_params(), "d_model": cfg.d_model, "n_layer": cfg.n_layer,
           "vocab_size": cfg.vocab_size, "seq_len": seq, "batch": batch, "variants": {}}

    host_ms: list[float] = []  # host (Python + launch) time of the backward call, timed steps only

    def step_fn(kind: str, drop: float | None, compiled: bool, attention: str, ev: list | None):
        sel = TokenSelector(score="collider", method="topk", keep_ratio=1.0 - drop) if drop else None
        dense_model = compiled_model if compiled else model
        collider = colliders[(compiled, attention or "auto")]

        host = host_ms if ev is not None else []

        def step():
            e = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
            e[0].record()
            with torch.autocast("cuda", dtype=torch.bfloat16), record_function("phase:forward"):
                if kind == "dense":
                    _, loss = dense_model(x, y)
                    keep = None
                else:
                    logits = collider(x) if kind == "collider" else dense_model(x)[0]
            e[1].record()
            if kind != "dense":
                with record_function("phase:select"):
                    keep, _ = sel(logits.detach(), y, n_valid=n_valid)  # counted once below: no sync per step
            e[2].record()
            if kind != "dense":
                with record_function("phase:loss"):
                    loss = masked_cross_entropy(logits, y, keep)
            with collider_filter(keep if kind == "collider" else None), record_function("phase:backward"):
                t0 = time.perf_counter()
                loss.backward()
                host.append((time.perf_counter() - t0) * 1e3)
            e[3].record()
            with record_function("phase:optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
            e[4].record()
            if ev is not None:
                ev.append(e)
        return step

    for kind, drop, compiled, attention in VARIANTS:
        label = (kind if drop is None else f"{kind}_{drop}") + ("_compiled" if compiled else "")
        label += {"dense": "_dense_attention", "kept": "_kept_attention"}.get(attention, "")  # cuDNN all rows / Triton
        if only and label not in only:
            continue
        warm = step_fn(kind, drop, compiled, attention, None)
        for _ in range(3):
            warm()
        events: list = []
        host_ms.clear()
        timed = step_fn(kind, drop, compiled, attention, events)
        torch.cuda.synchronize()
        for _ in range(repeats):
            timed()
        torch.cuda.synchronize()
        parts = {"forward": [], "select": [], "backward": [], "optimizer": [], "step": []}
        for e in events:
            parts["forward"].append(e[0].elapsed_time(e[1]))
            parts["select"].append(e[1].elapsed_time(e[2]))
            parts["backward"].append(e[2].elapsed_time(e[3]))  # includes the loss on kept rows
            parts["optimizer"].append(e[3].elapsed_time(e[4]))
            parts["step"].append(e[0].elapsed_time(e[4]))
        out["variants"][label] = {k: statistics.median(v) for k, v in parts.items()}
        # host time of loss.backward() (it returns once every kernel is queued): near
        # the GPU backward time means the backward is host-bound
        out["variants"][label]["backward_host"] = statistics.median(host_ms)
        out["variants"][label]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    for label, v in out["variants"].items():
        dense = out["variants"].get("dense_compiled" if "_compiled" in label else "dense", v)
        v["backward_vs_dense"] = v["backward"] / dense["backward"]
        v["step_vs_dense"] = v["step"] / dense["step"]
        v["select_share_of_step"] = v["select"] / v["step"]
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        out["backward_breakdown_ms"] = {}
        for kind, drop in (("dense", None), ("collider", 0.5)):
            step = step_fn(kind, drop, True, "auto", None)
            step()
            torch.cuda.synchronize()
            with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            trace = Path(os.environ.get("OUT", ".")) / f"trace_{name}_{kind}.json"
            p.export_chrome_trace(str(trace))
            gaps = gpu_idle_by_phase(json.loads(trace.read_text()), steps=3)
            os.system(f"gzip -f {trace}")
            fam: dict[str, float] = {}
            for evt in p.key_averages():
                t = getattr(evt, "device_time_total", 0)
                if t:
                    fam[kernel_family(evt.key)] = fam.get(kernel_family(evt.key), 0.0) + t / 1e3 / 3
            top = sorted(((evt.key[:90], getattr(evt, "device_time_total", 0) / 1e3 / 3, evt.count // 3)
                          for evt in p.key_averages()), key=lambda r: -r[1])[:40]
            out["backward_breakdown_ms"][(kind if drop is None else f"{kind}_{drop}") + "_compiled"] = {
                "whole_step_by_family": fam, "top_kernels": top, "gpu_idle": gaps}
    model = opt = colliders = compiled_model = None  # free the GPU memory before the next model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def attention_only(batch: int, seq: int, heads: int = 16, head_dim: int = 128, repeats: int = 20) -> dict:
    """The attention backward alone at the 1B shape: the fused dense backward
    (cuDNN, all query rows, zero dO rows for dropped ones) against the Triton
    kept-query kernels reading the forward's log-sum-exp, per keep ratio."""
    from sparsetrain.collider import triton_attention
    from sparsetrain.collider.attention import attention_backward, attention_forward

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
               .transpose(1, 2) for _ in range(3))  # token-major, as the engine lays them out
    out, saved = attention_forward(q, k, v)
    res: dict = {"shape": [batch, heads, seq, head_dim], "forward_impl": saved.flash[0] if saved.flash else "recompute"}

    def timed(fn) -> float:
        """GPU time per call, median of 5 rounds of ``repeats`` calls queued back
        to back (so the host's launch time does not count where the GPU is busy)."""
        for _ in range(2):
            fn()
        return statistics.median(cuda_ms_per_call(fn, repeats) for _ in range(5))

    d_out = torch.randn_like(out)
    res["dense_backward_ms"] = timed(lambda: attention_backward(saved, d_out))
    for keep_ratio in (0.5, 0.6, 0.75):
        keep = torch.rand(batch, seq, device="cuda", generator=g) < keep_ratio
        kidx = torch.nonzero(keep.reshape(-1)).squeeze(1)
        do_k = torch.randn(kidx.numel(), heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        lse = saved.flash[1]
        ms = timed(lambda: triton_attention.kept_attention_backward(q, k, v, out, do_k, kidx, lse))
        res[f"kept_{keep_ratio}_ms"] = ms
        res[f"kept_{keep_ratio}_vs_dense"] = ms / res["dense_backward_ms"]
    res["tuned_configs"] = {str(key): val for key, val in triton_attention._tuned.items()}
    return res


def print_profiles(res: dict) -> None:
    for r in res["results"]:
        for label, prof_ in r.get("backward_breakdown_ms", {}).items():
            fam = ", ".join(f"{k} {v:.1f}" for k, v in sorted(prof_["whole_step_by_family"].items(), key=lambda kv: -kv[1]))
            print(f"\n{r['model']} {label} ms/step by family: {fam}")
            for key, ms, n in prof_["top_kernels"][:20]:
                print(f"  {ms:7.2f} ms {n:5d}x  {key}")
            idle = prof_.get("gpu_idle")
            if idle:
                print(f"  GPU idle {idle['total_ms_per_step']:.2f} ms/step: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in idle["ms_per_step_by_phase"].items()))
                for g in idle["largest"][:8]:
                    print(f"    {g}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "collider_step.json"))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--models", default="nano-125m,1b")
    ap.add_argument("--profile", default="nano-125m", help="models (comma list) to profile by kernel family")
    ap.add_argument("--variants", default="", help="only these variant labels (comma list; default all)")
    ap.add_argument("--attention-only", action="store_true", help="also time the attention backward alone (1B shape)")
    args = ap.parse_args()
    res = {"environment": environment(), "results": []}
    if args.attention_only:
        res["attention_only"] = attention_only(args.batch, args.seq_len)
        print(json.dumps(res["attention_only"], indent=1))
    for name in args.models.split(","):
        res["results"].append(run_model(name, args.seq_len, args.batch, args.repeats, profile=name in args.profile.split(","),
                                         only=[v for v in args.variants.split(",") if v]))
        Path(args.out).write_text(json.dumps(res, indent=2))
    print_profiles(res)
    print(f"\n{res['environment']['device']}, torch {res['environment']['torch']}, bf16, seq {args.seq_len} x batch {args.batch}")
    print(f"{'model':<10} {'variant':<24} {'fwd':>7} {'select':>7} {'bwd':>8} {'bwd host':>8} {'opt':>6} {'step':>8} {'bwd/dense':>9} {'step/dense':>10}")
    for r in res["results"]:
        for label, v in r["variants"].items():
            print(f"{r['model']:<10} {label:<24} {v['forward']:7.1f} {v['select']:7.2f} {v['backward']:8.1f} {v['backward_host']:8.1f} {v['optimizer']:6.1f} "
                  f"{v['step']:8.1f} {v['backward_vs_dense']:9.2f} {v['step_vs_dense']:10.2f}")


if __name__ == "__main__":
    main()
