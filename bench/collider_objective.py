"""Is a Collider quality gap the objective or the engine? Trains the same model
from the same init on the same batches and random keep masks (keep 0.5) four ways:

* dense: all tokens;
* selective_random: loss on the kept tokens, ordinary autograd (CGGR-style);
* reference_detached: the Collider objective written plainly in autograd
  (dropped K/V detached in every layer, tests/test_collider.py's reference);
* engine: sparsetrain's ColliderModel.

engine == reference_detached says the engine is right; reference_detached vs
selective_random is the price of the objective itself.

    PYTHONPATH=src:tests python bench/collider_objective.py --device cuda --preset nano-125m --seq-len 1024 --steps 300
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

root = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(root / "src"), str(root / "tests")]
from sparsetrain import build_config  # noqa: E402
from sparsetrain.benchmark import environment  # noqa: E402
from sparsetrain.collider import ColliderModel, filter as collider_filter, masked_cross_entropy  # noqa: E402
from sparsetrain.data import load_corpus, train_batch, val_batches  # noqa: E402
from sparsetrain.model import GPT  # noqa: E402
from sparsetrain.optim import make_optimizer  # noqa: E402
from test_collider import reference_loss  # noqa: E402

MODES = ("dense", "selective_random", "reference_detached", "engine")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--n-layer", type=int, default=0, help="override the preset's depth")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (default on CUDA)")
    ap.add_argument("--out", default="collider_objective.json")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--check-every", type=int, default=0,
                    help="engine mode: every this many steps, compare its gradients with the reference objective's at the same weights")
    args = ap.parse_args()
    over = {"seq_len": args.seq_len, **({"n_layer": args.n_layer} if args.n_layer else {})}
    cfg = build_config(args.preset, overrides=over)
    corpus = load_corpus("", cfg.model.vocab_size, 0.02, "", verbose=False)
    dev = torch.device(args.device)
    bf16 = args.bf16 or dev.type == "cuda"
    val = val_batches(corpus.val, 8, args.batch_size, args.seq_len)
    results = {}
    checks = []
    for mode in args.modes.split(","):
        torch.manual_seed(0)
        model = GPT(cfg.model).to(dev)
        opt = make_optimizer(model, args.lr, 0.1, (0.9, 0.95), dev.type)
        engine = ColliderModel(model)
        g = torch.Generator().manual_seed(1)
        amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        curve = {}
        for step in range(args.steps):
            x, y = (t.to(dev) for t in train_batch(corpus.train, args.batch_size, args.seq_len, seed=0, step=step))
            keep = (torch.rand(x.shape, generator=g) < 0.5).to(dev)
            with amp():
                if mode == "dense":
                    loss = model(x, y)[1]
                elif mode == "selective_random":
                    logits = model(x)[0]
                    loss = F.cross_entropy(logits[keep].float(), y[keep])
                elif mode == "reference_detached":
                    loss = reference_loss(model, x, y, keep)
                else:
                    loss = masked_cross_entropy(engine(x), y, keep)
            with collider_filter(keep if mode == "engine" else None):
                loss.backward()
            if mode == "engine" and args.check_every and step % args.check_every == 0:
                mine = {n: p.grad.clone() for n, p in model.named_parameters()}
                model.zero_grad(set_to_none=True)
                with amp():
                    reference_loss(model, x, y, keep).backward()
                errs = {n: float((mine[n].double() - p.grad.double()).norm() / p.grad.double().norm().clamp(min=1e-30))
                        for n, p in model.named_parameters()}
                worst = max(errs, key=errs.get)
                checks.append({"step": step, "max_rel_err": errs[worst], "worst": worst, "loss": float(loss)})
                print("check", checks[-1], flush=True)
                for n, p in model.named_parameters():
                    p.grad = mine[n]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (step + 1) % max(1, args.steps // 6) == 0 or step + 1 == args.steps:
                with torch.no_grad(), amp():
                    curve[step + 1] = sum(float(model(a.to(dev), b.to(dev))[1]) for a, b in val) / len(val)
        results[mode] = curve
        print(mode, {k: round(v, 4) for k, v in curve.items()}, flush=True)
    Path(args.out).write_text(json.dumps({"environment": environment(), "args": vars(args), "val_loss": results,
                                          "engine_gradient_checks": checks}, indent=2))


if __name__ == "__main__":
    main()
