"""Quality against controls, on the embedded stdlib corpus.

``--suite selection``: dense, random at the same keep ratio, and the loss /
combined / collider scores (CGGR selective loss), the same number of steps.
``--suite collider``: dense, Collider at drop 0.4 and 0.5 (adaptive threshold
on the collider score) and random 0.5, the same wall-clock budget
(``--max-seconds``) each. ``--suite collider_1b``: the same at the ~1B
geometry (d 2048, 16 layers), Collider and random at exactly 0.5 (top-k).
``--suite mtp`` / ``hyper`` / ``sparse24``: dense against MTP heads, hyper-connections
and the 2:4 FFN, at equal steps.
``--suite bk``: ResNet-BK dense and learned-sparse 0.5 at equal steps, then a
GPT of equal parameters given the dense ResNet-BK's wall-clock (``equal_time_to``).

    PYTHONPATH=src python bench/quality_runs.py --suite selection --out $OUT/selection_quality.json
    PYTHONPATH=src python bench/quality_runs.py --suite collider --max-seconds 60 --out $OUT/collider_quality.json

Each run's val-loss curve and train seconds go into one JSON; plot it with
`python bench/plot_runs.py FILE.json FILE.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsetrain import build_config, train  # noqa: E402
from sparsetrain.benchmark import environment  # noqa: E402
from sparsetrain.build import build_model  # noqa: E402

SUITES = {
    "selection": {
        "dense": {},
        "random": {"selection": "loss", "selection_method": "random"},
        "loss": {"selection": "loss", "selection_score": "loss"},
        "combined": {"selection": "loss", "selection_score": "combined"},
        "collider": {"selection": "loss", "selection_score": "collider"},
    },
    "collider": {
        "dense": {},
        "collider_0.4": {"use_collider": True, "collider_sparsity": 0.4},
        "collider_0.5": {"use_collider": True, "collider_sparsity": 0.5},
        "random_0.5": {"use_collider": True, "collider_sparsity": 0.5, "collider_method": "random"},
    },
    # the ~1B geometry of bench/collider_step.py (vocab 8192, the corpus tokenizer's), where the
    # Collider step is measured faster than dense; exact-ratio selection (topk: no host sync)
    "collider_1b": {
        "dense": {"d_model": 2048, "n_layer": 16, "n_head": 16},
        "collider_0.5": {"d_model": 2048, "n_layer": 16, "n_head": 16, "use_collider": True, "collider_sparsity": 0.5,
                         "collider_method": "topk"},
        "random_0.5": {"d_model": 2048, "n_layer": 16, "n_head": 16, "use_collider": True, "collider_sparsity": 0.5,
                       "collider_method": "random"},
    },
    "mtp": {  # equal steps = equal tokens seen; the main head's val loss
        "dense": {},
        "mtp_2": {"use_mtp": True, "mtp_n_tokens": 2},
        "mtp_4": {"use_mtp": True, "mtp_n_tokens": 4},
    },
    "hyper": {
        "dense": {},
        "hyper_2": {"hyper_connections": 2},
        "hyper_4": {"hyper_connections": 4},
    },
    "sparse24": {  # 2:4 after a dense warmup, against dense relu2 at equal steps
        "relu2": {},
        "relu2_24": {"ffn": "relu2_24", "activation_sparse_method": "transposable", "activation_dense_warmup_steps": 100},
        # the control: the same structure and budget, patterns drawn at random (masked-dense path)
        "relu2_24_random": {"ffn": "relu2_24", "activation_sparse_method": "transposable_random",
                            "activation_dense_warmup_steps": 100},
    },
    # 59M parameters each at vocab 8192: 6 BK layers of 4 experts (8.4M each) vs 16 GPT blocks (3.1M each)
    "bk": {
        "resnet_bk": {"arch": "resnet_bk", "d_model": 512, "n_layer": 6, "n_head": 8, "bk_num_experts": 4},
        "resnet_bk_sparse_0.5": {"arch": "resnet_bk", "d_model": 512, "n_layer": 6, "n_head": 8, "bk_num_experts": 4,
                                 "bk_sparsity": 0.5, "bk_sparsity_warmup_steps": 100},
        "gpt_equal_params": {"d_model": 512, "n_layer": 16, "n_head": 8, "equal_time_to": "resnet_bk"},
    },
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "selection_quality.json"))
    ap.add_argument("--preset", default="nano-125m")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--keep-ratio", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--suite", choices=sorted(SUITES), default="selection")
    ap.add_argument("--max-seconds", type=float, default=0.0, help="wall-clock budget per run (0 = steps only)")
    ap.add_argument("--runs", default="", help="comma-separated subset of the suite's runs")
    args = ap.parse_args()
    runs = SUITES[args.suite]
    extra = {}
    if args.max_seconds:  # equal time: no step count to decay towards, so a constant LR after warmup
        args.steps = max(args.steps, 100_000)
        extra["min_lr_ratio"] = 1.0
    base = dict(**extra, max_steps=args.steps, max_seconds=args.max_seconds, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, warmup_steps=100,
                eval_every=100, eval_batches=16, keep_ratio=args.keep_ratio, log_every=50,
                cache_dir=os.environ.get("SPARSETRAIN_CACHE", "/tmp/sparsetrain-cache"))
    out = {"environment": environment(), "suite": args.suite, "settings": {**base, "preset": args.preset}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in (args.runs.split(",") if args.runs else runs):
            overrides = {**base, **runs[name], "out_dir": f"{tmp}/{name}"}
            if "equal_time_to" in overrides:  # the same wall-clock as another run of this suite
                overrides.update(max_steps=100_000, min_lr_ratio=1.0,
                                 max_seconds=out["runs"][overrides.pop("equal_time_to")]["train_seconds"])
            cfg = build_config(args.preset, overrides=overrides)
            res = train(cfg, verbose=False)
            rows = [json.loads(l) for l in (Path(tmp) / name / "metrics.jsonl").read_text().splitlines()]
            out["runs"][name] = {
                "overrides": runs[name],
                "val_loss": {str(k): v for k, v in sorted(res.val_losses.items())},
                "val_seconds": {str(r["step"]): r["train_seconds"] for r in rows if r["kind"] == "eval"},
                "train_seconds": res.train_seconds,
                "tokens_per_second": res.tokens_per_second,
                "params": sum(p.numel() for p in build_model(cfg.model).parameters()),
                "steps": res.steps_done,
                "bk_sparsity_last": next((r["bk_sparsity"] for r in reversed(rows) if "bk_sparsity" in r), None),
                "mean_kept_fraction": (sum(r.get("kept_fraction", 1.0) for r in rows if r["kind"] == "train")
                                       / max(1, sum(r["kind"] == "train" for r in rows))),
            }
            Path(args.out).write_text(json.dumps(out, indent=2))
            print(f"{name:<10} final val {res.val_losses[max(res.val_losses)]:.4f}  {res.train_seconds:.0f} s", flush=True)
    print(f"\n{'run':<10} {'val loss':>9} {'train s':>8} {'kept':>6}")
    for name, r in out["runs"].items():
        last = r["val_loss"][max(r["val_loss"], key=int)]
        print(f"{name:<10} {last:9.4f} {r['train_seconds']:8.0f} {r['mean_kept_fraction']:6.2f}")


if __name__ == "__main__":
    main()
