"""Fused cross-entropy (sparsetrain/cross_entropy.py) against the plain-torch loss, side by side in one run.

    PYTHONPATH=src python bench/cross_entropy.py --out $OUT/cross_entropy.json

1. The loss alone, forward+backward on bf16 logits ``[N, V]`` for each ``--shapes``
   entry: milliseconds (median of repeats after warm-up) and peak memory above
   the logits, for ``F.cross_entropy(logits.float(), targets)`` and the fused kernels.
2. ``--kept``: Collider's kept-rows loss (half the rows kept, the gradient
   handed to the engine's slot) in plain torch, eager and compiled, against the
   same kernels reading the kept rows in place.
3. Training steps (sequence 2048, batch 8) of each ``--steps`` entry, eager and
   compiled (``--modes``), with the model's loss on the reference (under
   torch.compile: inductor's lowering of it) and on the fused kernels.

Writes JSON after every entry and prints a short table last.
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
from sparsetrain import cross_entropy as ce  # noqa: E402
from sparsetrain.benchmark import bench_train_step, environment, parse_step_entries, time_fn  # noqa: E402


def loss_alone(N: int, V: int, repeats: int) -> dict:
    torch.manual_seed(0)
    logits = (2 * torch.randn(N, V, device="cuda")).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, V, (N,), device="cuda")
    fns = {"reference": lambda: ce.cross_entropy_reference(logits, targets).backward(),
           "fused": lambda: ce.fused_cross_entropy(logits, targets).backward()}
    out = {}
    for name, fn in fns.items():
        fn()
        logits.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

        def step() -> None:
            fn()
            logits.grad = None

        ms = time_fn(step, warmup=3, repeats=repeats)
        out[name] = {"median_ms": statistics.median(ms), "min_ms": min(ms),
                     "peak_extra_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)}
    ref = ce.cross_entropy_reference(logits, targets)
    (g_ref,) = torch.autograd.grad(ref, logits)
    got = ce.fused_cross_entropy(logits, targets)
    (g_got,) = torch.autograd.grad(got, logits)
    out["loss_abs_diff"] = abs(float(ref) - float(got))
    out["grad_max_abs_diff"] = float((g_ref.float() - g_got.float()).abs().max())
    out["speedup"] = out["reference"]["median_ms"] / out["fused"]["median_ms"]
    return out


def kept_rows_loss(N: int, V: int, repeats: int, keep_ratio: float = 0.5) -> dict:
    """Collider's kept-rows loss (``collider.masked_cross_entropy`` handing its
    ``[K, V]`` gradient to the engine's slot, as in a Collider step), forward+backward
    on ``keep_ratio`` of ``N`` bf16 rows: plain torch eagerly, plain torch
    compiled (what ``ColliderModel(compile=True)`` ran before), and the kernels."""
    from sparsetrain.collider import loss as kept_loss
    from sparsetrain.selection.select import kept_indices

    torch.manual_seed(0)
    logits = (2 * torch.randn(1, N, V, device="cuda")).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, V, (1, N), device="cuda")
    keep = torch.rand(1, N, device="cuda") < keep_ratio
    kept_indices(keep)  # cached on the mask, as a selector's mask brings them: no sync per call
    out: dict = {"kept_rows": int(keep.sum())}
    rows = {}
    for name, fused, compile in (("torch_eager", False, False), ("torch_compiled", False, True), ("kernels", True, False)):
        ce.FUSED = fused

        def step() -> None:
            slot = kept_loss.RowGradSlot(compile)
            setattr(logits, kept_loss.SLOT_ATTR, slot)
            kept_loss.masked_cross_entropy(logits, targets, keep).backward()
            logits.grad = None
            rows[name] = slot.items[0][2]

        ms = time_fn(step, warmup=5, repeats=repeats)
        out[name] = {"median_ms": statistics.median(ms), "min_ms": min(ms)}
    ce.FUSED = True
    out["grad_max_abs_diff_kernels_vs_torch"] = float((rows["kernels"].float() - rows["torch_eager"].float()).abs().max())
    out["speedup_vs_torch_eager"] = out["torch_eager"]["median_ms"] / out["kernels"]["median_ms"]
    out["speedup_vs_torch_compiled"] = out["torch_compiled"]["median_ms"] / out["kernels"]["median_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "cross_entropy.json"))
    ap.add_argument("--shapes", default="16384x8192,16384x32768,16384x65536", help="N x V entries, comma list")
    ap.add_argument("--steps", default="nano-125m;d20", help="'preset[:key=value,...]' entries separated by ';'")
    ap.add_argument("--modes", default="eager,compiled", help="comma list of eager, compiled")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--kept", default="", help="N x V entries for Collider's kept-rows loss (half the rows kept)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/cross_entropy.py needs a CUDA GPU")
    res: dict = {"environment": environment(), "loss": {}, "kept_rows_loss": {}, "steps": {}}

    def save() -> None:
        Path(args.out).write_text(json.dumps(res, indent=2))

    for shape in filter(None, args.shapes.split(",")):
        N, V = (int(v) for v in shape.split("x"))
        res["loss"][shape] = loss_alone(N, V, args.repeats)
        torch.cuda.empty_cache()
        save()
    for shape in filter(None, args.kept.split(",")):
        N, V = (int(v) for v in shape.split("x"))
        res["kept_rows_loss"][shape] = kept_rows_loss(N, V, args.repeats)
        torch.cuda.empty_cache()
        save()
    for entry, preset, model in parse_step_entries(args.steps):
        for mode in filter(None, args.modes.split(",")):
            st = res["steps"][f"{entry} {mode}"] = {"preset": preset, "model_overrides": model, "mode": mode}
            for name, fused in (("reference", False), ("fused", True)):
                ce.FUSED = fused
                st[name] = bench_train_step(preset, 2048, 8, compile=mode == "compiled", repeats=args.repeats,
                                            model_overrides=model)
                torch._dynamo.reset()
                torch.cuda.empty_cache()
                save()
            st["speedup"] = st["reference"]["step"]["median_ms"] / st["fused"]["step"]["median_ms"]
            save()
    ce.FUSED = True

    env = res["environment"]
    print(f"\n{env['device']}, torch {env['torch']}")
    print(f"{'loss fwd+bwd':<14} {'ref ms':>7} {'fused ms':>9} {'speedup':>8} {'ref GiB':>8} {'fused GiB':>10} {'grad diff':>10}")
    for shape, r in res["loss"].items():
        print(f"{shape:<14} {r['reference']['median_ms']:7.2f} {r['fused']['median_ms']:9.2f} {r['speedup']:7.2f}x "
              f"{r['reference']['peak_extra_gib']:8.2f} {r['fused']['peak_extra_gib']:10.2f} {r['grad_max_abs_diff']:10.2e}")
    for shape, r in res["kept_rows_loss"].items():
        print(f"kept-rows loss {shape} ({r['kept_rows']} kept): torch eager {r['torch_eager']['median_ms']:.2f} ms, "
              f"torch compiled {r['torch_compiled']['median_ms']:.2f} ms, kernels {r['kernels']['median_ms']:.2f} ms "
              f"({r['speedup_vs_torch_eager']:.2f}x / {r['speedup_vs_torch_compiled']:.2f}x); "
              f"grad diff {r['grad_max_abs_diff_kernels_vs_torch']:.2e}")
    for entry, st in res["steps"].items():
        print(f"{entry} step: reference loss {st['reference']['step']['median_ms']:.1f} ms, fused "
              f"{st['fused']['step']['median_ms']:.1f} ms ({st['speedup']:.3f}x); peak memory "
              f"{st['reference']['peak_memory_gib']} -> {st['fused']['peak_memory_gib']} GiB")


if __name__ == "__main__":
    main()
