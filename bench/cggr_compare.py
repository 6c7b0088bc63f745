"""Batch splitting step time: sparsetrain's CGGRModel against the `cggr` package's
(0.5.0, wheel carried to the GPU) and dense training, on the same Hugging Face
Llama-style model (SmolLM-360M shape, random init), bf16 autocast, AdamW.

Both splitters use a 2-layer truncated router and the same number of selected
sequences (batch sizes where ratio * B is an integer, dynamic ratio off).

    PYTHONPATH=src:/tmp/site python bench/cggr_compare.py --out $OUT/cggr_compare.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsetrain.benchmark import environment, summarize, time_fn  # noqa: E402
from sparsetrain.selection import CGGRModel, create_truncated_router  # noqa: E402

CASES = [(512, 40), (2048, 20)]  # (seq_len, batch)
RATIOS = (0.25, 0.4)


def build_model():
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
        num_key_value_heads=5, max_position_embeddings=2048, tie_word_embeddings=True, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).cuda()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "cggr_compare.json"))
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    import cggr as cggr_pkg

    env = environment()
    env["cggr"] = "0.5.0"
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    results = []
    for seq, batch in CASES:
        ids = torch.randint(0, 49152, (batch, seq), device="cuda")

        def run(loss_fn):
            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = loss_fn()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return summarize(time_fn(step, warmup=5, repeats=args.repeats))

        dense = run(lambda: model(input_ids=ids, labels=ids).loss)
        results.append({"seq_len": seq, "batch": batch, "variant": "dense", "ratio": 1.0, "step": dense})
        for ratio in RATIOS:
            theirs = cggr_pkg.CGGRModel(model, router=cggr_pkg.create_truncated_router(model, num_layers=2),
                                        min_tokens_ratio=ratio, warmup_steps=0, dynamic_threshold=False)
            ours = CGGRModel(model, router=create_truncated_router(model, num_layers=2), min_tokens_ratio=ratio,
                             warmup_steps=0, dynamic_threshold=False, scoring="combined")
            for name, wrapped in (("cggr-0.5.0", theirs), ("sparsetrain", ours)):
                r = run(lambda: wrapped(ids, labels=ids))
                results.append({"seq_len": seq, "batch": batch, "variant": name, "ratio": ratio, "step": r,
                                "speedup_vs_dense": dense["median_ms"] / r["median_ms"],
                                "metrics": {k: v for k, v in wrapped.get_metrics().items() if not isinstance(v, torch.Tensor)}})
            del theirs, ours
            gc.collect()
        Path(args.out).write_text(json.dumps({"environment": env, "model": "Llama (SmolLM-360M shape), random init",
                                              "params": n_params, "results": results}, indent=2, default=str))
    print(f"\n{env['device']}, Llama {n_params / 1e6:.0f}M, bf16 autocast, AdamW")
    print(f"{'seq':>5} {'batch':>5} {'variant':<12} {'ratio':>5} {'step ms':>8} {'vs dense':>8}")
    for r in results:
        print(f"{r['seq_len']:>5} {r['batch']:>5} {r['variant']:<12} {r['ratio']:>5} {r['step']['median_ms']:8.1f} "
              f"{r.get('speedup_vs_dense', 1.0):7.2f}x")


if __name__ == "__main__":
    main()
