"""Where does the Collider engine part from its reference objective on the GPU?

A copy task (second half of each sequence repeats the first half) needs sharp
attention, which random-init gradient checks never exercise. Per attention
implementation of the engine (cudnn, flash, recompute):

1. train the reference objective (dropped K/V detached, plain autograd) and
   the engine from the same init on the same batches and random keep masks;
   report the loss on the copied half;
2. from the reference-trained weights, compare engine and reference parameter
   gradients on one batch, in float32 and under bf16 autocast.

    PYTHONPATH=src:tests python bench/collider_drift.py --out $OUT/collider_drift.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
from pathlib import Path

import torch

root = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(root / "src"), str(root / "tests")]
import sparsetrain.collider.attention as A  # noqa: E402
from sparsetrain.benchmark import environment  # noqa: E402
from sparsetrain.collider import ColliderModel, filter as collider_filter, masked_cross_entropy  # noqa: E402
from sparsetrain.config import ModelConfig  # noqa: E402
from sparsetrain.model import GPT  # noqa: E402
from test_collider import reference_loss  # noqa: E402

V, T, B = 512, 256, 16


def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    half = torch.randint(1, V, (B, T // 2 + 1), generator=g)
    seq = torch.cat((half, half[:, 1:]), 1)[:, : T + 1]
    keep = torch.rand(B, T, generator=g) < 0.5
    return seq[:, :-1].cuda(), seq[:, 1:].cuda(), keep.cuda()


def loss_of(mode: str, model: GPT, x, y, keep):
    if mode == "reference":
        return reference_loss(model, x, y, keep), contextlib.nullcontext()
    return masked_cross_entropy(ColliderModel(model, attention="dense")(x), y, keep), collider_filter(keep)


def train(mode: str, init: dict, steps: int, cfg: ModelConfig) -> float:
    model = GPT(cfg).cuda()
    model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y, keep = batch(g)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, ctx = loss_of(mode, model, x, y, keep)
        with ctx:
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    x, y, _ = batch(torch.Generator().manual_seed(99))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)[0]
    copied = slice(T // 2 + 1, T)
    return float(torch.nn.functional.cross_entropy(logits[:, copied].float().flatten(0, 1), y[:, copied].flatten()))


def grad_compare(weights: dict, cfg: ModelConfig, bf16: bool) -> dict:
    x, y, keep = batch(torch.Generator().manual_seed(5))
    grads = {}
    for mode in ("reference", "engine"):
        model = GPT(cfg).cuda()
        model.load_state_dict(weights)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with amp:
            loss, ctx = loss_of(mode, model, x, y, keep)
        with ctx:
            loss.backward()
        grads[mode] = {n: p.grad.double() for n, p in model.named_parameters()}
    errs = {n: float((grads["engine"][n] - r).norm() / r.norm().clamp(min=1e-30)) for n, r in grads["reference"].items()}
    worst = sorted(errs, key=errs.get, reverse=True)[:6]
    return {"max": max(errs.values()), "worst": {n: errs[n] for n in worst}}


def real_data_check(steps: int, out: dict) -> None:
    """nano-125m on the stdlib corpus: train the reference objective (the trainer's
    AdamW and clipping), then compare engine and reference on the trained weights:
    forward logits and every parameter gradient, float32 and bf16."""
    from sparsetrain import build_config
    from sparsetrain.data import load_corpus, train_batch
    from sparsetrain.optim import make_optimizer

    cfg = build_config("nano-125m", overrides={"seq_len": 1024}).model
    corpus = load_corpus("", cfg.vocab_size, 0.02, "", verbose=False)
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cuda")
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x, y = (t.cuda() for t in train_batch(corpus.train, 16, 1024, seed=0, step=step))
        keep = (torch.rand(x.shape, generator=g) < 0.5).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = reference_loss(model, x, y, keep)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    weights = copy.deepcopy(model.state_dict())
    x, y = (t[:4].cuda() for t in train_batch(corpus.train, 16, 1024, seed=0, step=10_000))
    keep = (torch.rand(x.shape, generator=g) < 0.5).cuda()
    res = {"trained_steps": steps, "last_loss": float(loss)}
    for bf16 in (False, True):
        amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        grads, logits = {}, {}
        for mode in ("reference", "engine"):
            m = GPT(cfg).cuda()
            m.load_state_dict(weights)
            with amp():
                if mode == "engine":
                    lg = ColliderModel(m, attention="dense")(x)
                    loss = masked_cross_entropy(lg, y, keep)
                    ctx = collider_filter(keep)
                else:
                    lg = m(x)[0]
                    loss = reference_loss(m, x, y, keep)
                    ctx = contextlib.nullcontext()
            logits[mode] = lg.detach().float()
            with ctx:
                loss.backward()
            grads[mode] = {n: p.grad.double() for n, p in m.named_parameters()}
        errs = {n: float((grads["engine"][n] - r).norm() / r.norm().clamp(min=1e-30)) for n, r in grads["reference"].items()}
        worst = sorted(errs, key=errs.get, reverse=True)[:8]
        key = "bf16" if bf16 else "fp32"
        res[key] = {"logits_rel_diff": float((logits["engine"] - logits["reference"]).norm() / logits["reference"].norm()),
                    "max_grad_rel_err": max(errs.values()), "worst": {n: errs[n] for n in worst}}
        print(key, json.dumps(res[key]), flush=True)
    out["nano125m_real_data"] = res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "collider_drift.json"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--real-data-steps", type=int, default=0, help="run only the nano-125m real-data check, after this many steps")
    args = ap.parse_args()
    if args.real_data_steps:
        out = {"environment": environment()}
        real_data_check(args.real_data_steps, out)
        Path(args.out).write_text(json.dumps(out, indent=2))
        return
    cfg = ModelConfig(vocab_size=V, seq_len=T, n_layer=4, n_head=4, d_model=256)
    torch.manual_seed(0)
    init = copy.deepcopy(GPT(cfg).state_dict())
    out = {"environment": environment(), "task": f"copy, V={V}, T={T}, B={B}, keep 0.5 random", "runs": {}}
    ref_loss = train("reference", init, args.steps, cfg)
    out["reference_copied_half_loss"] = ref_loss
    print("reference copied-half loss", round(ref_loss, 4), flush=True)
    # weights after reference training, for the gradient comparison
    model = GPT(cfg).cuda()
    model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        x, y, keep = batch(g)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = reference_loss(model, x, y, keep)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    trained = copy.deepcopy(model.state_dict())
    for impl in ("cudnn", "flash", "recompute"):
        os.environ["SPARSETRAIN_ATTENTION_IMPL"] = impl
        A._cudnn_ok = None
        r = {"engine_copied_half_loss": train("engine", init, args.steps, cfg),
             "grads_trained_fp32": grad_compare(trained, cfg, False),
             "grads_trained_bf16": grad_compare(trained, cfg, True),
             "grads_init_bf16": grad_compare(init, cfg, True)}
        out["runs"][impl] = r
        print(impl, json.dumps(r), flush=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
