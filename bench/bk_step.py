"""ResNet-BK training steps, dense against learned-sparse, eager and compiled.

    PYTHONPATH=src python bench/bk_step.py --out $OUT/bk_step.json

The whole step of the model the trainer builds (``--model resnet_bk``:
embedding, ``n_layer`` BK blocks, LM head, the sparsity loss in the backward,
AdamW), on random tokens, bf16 autocast, median of repeats after warm-up.
Dense layers against ``bk_sparsity`` (the causal threshold mask: on the GPU the
sync-free parked path), each run

* eagerly;
* with ``torch.compile`` (default mode);
* with ``torch.compile(mode="reduce-overhead")``: CUDA graphs of the compiled
  pieces (the BK-Core op stays outside the compiled graph).

The threshold mask's skip rate is learned. For timing it is pinned: each
predictor's last layer starts at weight 0 and bias ``logit(1 - sparsity)``,
so a position is computed when its logistic noise exceeds ``-bias``, with
probability ``1 - sparsity``, at random positions. Each row reports the
skipped fraction the last step measured. ``--relu-control`` adds both models
with the MoE's ReLU² over the whole grouped buffer (``*-full-relu``), the pass
the row-limited kernel replaced. ``--interleave``: each mode's variants are
built together and timed in interleaved rounds (timed one after another, this
host-bound step moved by more than the effects measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import math

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparsetrain.benchmark import bench_train_step, bench_train_steps_interleaved, environment  # noqa: E402

def pin_skip_rate(sparsity: float):
    """``prepare`` for bench_train_step: every sparse layer skips ``sparsity`` of positions at random."""
    def prepare(model: torch.nn.Module) -> None:
        for layer in getattr(model, "sparse_layers", list)():
            last = layer.predictor[-1]
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.constant_(last.bias, math.log((1 - sparsity) / sparsity))
    return prepare


def full_relu(prepare):
    """``prepare`` plus the control: every MoE's ReLU² over its whole grouped buffer (before session 10)."""
    def both(model: torch.nn.Module) -> None:
        prepare(model)
        for module in model.modules():
            if hasattr(module, "limit_relu_rows"):
                module.limit_relu_rows = False
    return both


def prepare_for(name: str, sparsity: float):
    """The ``prepare`` of variant ``name``: the pinned skip rate, plus the full-buffer ReLU² for ``*full-relu*``."""
    prepare = pin_skip_rate(sparsity)
    return full_relu(prepare) if "full-relu" in name else prepare


MODES = {"eager": None, "compiled": "default", "compiled_graphs": "reduce-overhead"}


def main() -> None:
    from bk_core import print_profile

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bk_step.json"))
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--profile", action="store_true", help="also profile each step's top kernels")
    ap.add_argument("--relu-control", action="store_true",
                    help="also both models with ReLU² over the whole grouped buffer (the pass before session 10)")
    ap.add_argument("--interleave", action="store_true",
                    help="per mode, build every variant and time them in interleaved rounds (all models at once)")
    args = ap.parse_args()
    base = {"arch": "resnet_bk", "d_model": args.d_model, "ffn_hidden": args.hidden, "n_layer": args.layers,
            "n_head": max(1, args.d_model // 128), "bk_num_experts": args.experts}
    variants = {"dense": {}, f"sparse_{args.sparsity}": {"bk_sparsity": args.sparsity, "bk_sparsity_warmup_steps": 0}}
    if args.relu_control:
        variants.update({"dense-full-relu": {}, f"sparse-full-relu_{args.sparsity}": variants[f"sparse_{args.sparsity}"]})
    out = {"environment": environment(), "model": base, "seq_len": args.seq_len, "batch_size": args.batch_size,
           "steps": {}}
    if args.interleave:
        run_interleaved(args, base, variants, out)
        return
    for mode in args.modes.split(","):
        for name, extra in variants.items():
            key = f"{name}_{mode}"
            try:
                out["steps"][key] = bench_train_step("nano-125m", args.seq_len, args.batch_size, repeats=args.repeats,
                                                     model_overrides={**base, **extra}, compile_mode=MODES[mode],
                                                     profile_top=30 if args.profile else 0,
                                                     prepare=prepare_for(name, args.sparsity))
                if args.profile:
                    print_profile(key, out["steps"][key]["profile"])
            except Exception as e:  # noqa: BLE001 - a mode that fails is a result too
                out["steps"][key] = {"error": repr(e)[:500]}
            Path(args.out).write_text(json.dumps(out, indent=2))
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    print(f"\n{'mode':<32} {'dense ms':>9} {'sparse ms':>9} {'speedup':>8} {'skipped':>8}")
    for mode in args.modes.split(","):
        for tag in ("", "-full-relu") if args.relu_control else ("",):
            d, s = out["steps"][f"dense{tag}_{mode}"], out["steps"][f"sparse{tag}_{args.sparsity}_{mode}"]
            if "error" in d or "error" in s:
                print(f"{mode + tag:<32} error: {(d.get('error') or s.get('error'))[:200]}")
                continue
            dm, sm = d["step"]["median_ms"], s["step"]["median_ms"]
            skipped = s.get("sparsity_stats", {}).get("sparsity_ratio", float("nan"))
            print(f"{mode + tag:<32} {dm:9.2f} {sm:9.2f} {dm / sm:7.3f}x {skipped:8.3f}")


def run_interleaved(args, base: dict, variants: dict, out: dict) -> None:
    """Each mode's variants built together and timed in three interleaved rounds."""
    torch._dynamo.config.cache_size_limit = 64  # several models of one class compile side by side
    for mode in args.modes.split(","):
        kwargs = {name: dict(preset="nano-125m", seq_len=args.seq_len, batch_size=args.batch_size,
                             model_overrides={**base, **extra}, compile_mode=MODES[mode],
                             prepare=prepare_for(name, args.sparsity))
                  for name, extra in variants.items()}
        try:
            res = bench_train_steps_interleaved(kwargs, rounds=3, repeats=max(3, args.repeats))
        except Exception as e:  # noqa: BLE001 - a mode that fails is a result too
            res = {"error": repr(e)[:500]}
        out["steps"][mode] = res
        Path(args.out).write_text(json.dumps(out, indent=2))
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    print(f"\n{'mode':<16} " + " ".join(f"{name:>22}" for name in variants))
    for mode, res in out["steps"].items():
        if "error" in res:
            print(f"{mode:<16} error: {res['error'][:200]}")
            continue
        print(f"{mode:<16} " + " ".join(f"{res[name]['median_ms']:19.2f} ms" for name in variants))


if __name__ == "__main__":
    main()
