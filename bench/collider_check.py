"""GPU correctness check of Collider's attention paths at a real head size.

For each attention implementation (cuDNN, flash, recompute), compares (1) the
attention backward with zeroed dropped-query rows against autograd through
F.scaled_dot_product_attention, and (2) a whole ColliderModel backward (bf16
autocast) against the float64 CPU reference of tests/test_collider.py.
Writes the first implementation that passes to $OUT/attention_impl.

    PYTHONPATH=src:tests python bench/collider_check.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import sparsetrain.collider.attention as A  # noqa: E402
from sparsetrain.collider import ColliderModel, filter as collider_filter, masked_cross_entropy  # noqa: E402
from sparsetrain.config import ModelConfig  # noqa: E402
from sparsetrain.model import GPT  # noqa: E402
from test_collider import reference_loss  # noqa: E402


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    out_dir = Path(os.environ.get("OUT", "."))
    torch.manual_seed(0)
    report = {}
    B, H, T, hd = 2, 4, 256, 64
    q, k, v = (torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    keep = torch.rand(B, T, device="cuda") < 0.5
    d_out = torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16) * keep[:, None, :, None]
    qf, kf, vf = (t.float().requires_grad_(True) for t in (q, k, v))
    ref = torch.autograd.grad(F.scaled_dot_product_attention(qf, kf, vf, is_causal=True), (qf, kf, vf), d_out.float())
    cfg = ModelConfig(vocab_size=300, seq_len=128, n_layer=2, n_head=2, d_model=128, init_std=0.1)
    model64 = GPT(cfg).double()
    idx = torch.randint(0, 300, (2, 128))
    targets = torch.randint(0, 300, (2, 128))
    kmask = torch.rand(2, 128) < 0.5
    reference_loss(model64, idx, targets, kmask).backward()
    ref_grads = {n: p.grad.clone() for n, p in model64.named_parameters()}
    chosen = None
    for impl in ("cudnn", "flash", "recompute"):
        os.environ["SPARSETRAIN_ATTENTION_IMPL"] = impl
        A._cudnn_ok = None
        try:
            o, saved = A.attention_forward(q, k, v)
            used = saved.flash[0] if saved.flash else "recompute"
            dq, dk, dv = A.attention_backward(saved, d_out.transpose(1, 2).contiguous().transpose(1, 2)
                                              if o.transpose(1, 2).is_contiguous() else d_out)
            att_err = {n: rel(a, r) for n, a, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref)}
            gpu = GPT(cfg).cuda()
            gpu.load_state_dict({kk: vv.float() for kk, vv in model64.state_dict().items()})
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = ColliderModel(gpu, attention="dense")(idx.cuda())
            loss = masked_cross_entropy(logits, targets.cuda(), kmask.cuda())
            with collider_filter(kmask.cuda()):
                loss.backward()
            model_err = {n: rel(p.grad.cpu(), ref_grads[n]) for n, p in gpu.named_parameters()}
            ok = max(att_err.values()) < 2e-2 and max(model_err.values()) < 5e-2
            report[impl] = {"used": used, "attention_rel_err": att_err, "max_param_rel_err": max(model_err.values()),
                            "worst_param": max(model_err, key=model_err.get), "ok": ok}
            if ok and chosen is None:
                chosen = impl
        except Exception as e:  # record and go on
            report[impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(impl, json.dumps(report[impl]), flush=True)
    (out_dir / "collider_check.json").write_text(json.dumps(report, indent=2))
    (out_dir / "attention_impl").write_text(chosen or "recompute")
    print("chosen:", chosen)


if __name__ == "__main__":
    main()
