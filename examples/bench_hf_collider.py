"""Dense Hugging Face training step against the sparsetrain Collider step, on one GPU.

For each model shape (random init, no hub), full fine-tuning and LoRA, the
same model, batch and AdamW run two kinds of step, interleaved:

* ``dense``: HF's own forward and loss (``model(ids, labels=ids).loss``),
  the whole step function compiled with ``torch.compile``;
* ``collider``: ``sparsetrain.collider.apply(model, selector=topk)`` (the
  engine path, its pieces compiled), the same call with the kept-rows loss
  inside the forward.

Each step is forward, loss, backward, AdamW and zeroing the gradients under
bf16 autocast over float32 weights. Reported per kind: the median (and
min/max) step time over ``--steps`` timed steps after ``--warmup`` steps
(compilation included there), the peak memory of a step and the memory held
between steps (weights, optimizer state). With ``liger_kernel`` importable,
full fine-tuning also runs HF + Liger (``apply_liger_kernel_to_llama``: its
fused linear cross-entropy, RMSNorm, SwiGLU, RoPE) as a second baseline, and
Collider on the Liger-patched model (``composes``: its loss equals the
unpatched Collider loss at the same weights). Writes one JSON file.

Run one shape per process to stay within a command's time limit:

    python examples/bench_hf_collider.py --shape llama-3.2-1b --out llama1b.json
    python examples/bench_hf_collider.py --shape smollm-360m --out smollm360m.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sparsetrain.benchmark import environment
from sparsetrain.collider import apply, remove
from sparsetrain.collider.hf import uses_engine
from sparsetrain.selection import TokenSelector

SHAPES = {
    # meta-llama/Llama-3.2-1B's config
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    # HuggingFaceTB/SmolLM-360M's config
    "smollm-360m": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                        intermediate_size=2560, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5,
                        max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # a smoke run of this script on the CPU (tests/test_collider_hf_trainer.py)
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, vocab_size=256, tie_word_embeddings=True, max_position_embeddings=64),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(shape: str, device: str) -> torch.nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(**SHAPES[shape], attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(cfg).train()


def _gib(n: int) -> float:
    return round(n / 2**30, 3)


class Kind:
    """One kind of step: ``loss_fn()`` under autocast, backward, AdamW, zero grad."""

    def __init__(self, name: str, loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
                 compiled: bool, device: str) -> None:
        self.name, self.loss_fn, self.optimizer, self.compiled = name, loss_fn, optimizer, compiled
        self.cuda = device == "cuda"
        self.ms: list[float] = []
        self.peak = 0
        self.held = 0
        self.losses: list[float] = []

    def step(self, timed: bool) -> None:
        if self.cuda:
            self.held = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        with autocast(self.cuda):
            loss = self.loss_fn()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cuda:
            end.record()
            end.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1e3
        self.losses.append(float(loss.detach()))
        if timed:
            self.ms.append(ms)

    def result(self) -> dict:
        return {"median_ms": round(statistics.median(self.ms), 3), "min_ms": round(min(self.ms), 3),
                "max_ms": round(max(self.ms), 3), "repeats": len(self.ms), "peak_gib": _gib(self.peak),
                "held_between_steps_gib": _gib(self.held), "compiled": self.compiled,
                "first_loss": round(self.losses[0], 4), "last_loss": round(self.losses[-1], 4)}


def run_interleaved(kinds: list[Kind], warmup: int, steps: int) -> dict:
    for k in kinds:
        for _ in range(warmup):
            k.step(timed=False)
    for _ in range(steps):
        for k in kinds:
            k.step(timed=True)
    return {k.name: k.result() for k in kinds}


def autocast(cuda: bool):
    """bf16 autocast on the GPU (the CPU smoke run stays in float32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)


def compiled_or_eager(fn: Callable[[], torch.Tensor], compile: bool) -> tuple[Callable[[], torch.Tensor], bool]:
    """``torch.compile(fn)`` when its forward compiles (tried once now), else ``fn``."""
    if not compile:
        return fn, False
    compiled = torch.compile(fn)
    try:
        with autocast(True):
            compiled()
        return compiled, True
    except Exception as e:  # noqa: BLE001 - report and measure eagerly
        print(f"  torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); eager instead")
        return fn, False


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-5, fused=params[0].is_cuda)


def bench_shape(shape: str, args: argparse.Namespace) -> list[dict]:
    results = []
    model = build(shape, args.device)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device)
    keep_ratio = 1.0 - args.drop
    selector = TokenSelector(score="collider", method="topk", keep_ratio=keep_ratio)
    apply(model, selector=selector, compile=args.device == "cuda", engine=True)
    assert uses_engine(model)
    cls_forward = type(model).forward

    def dense_loss(lm: torch.nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: cls_forward(lm, input_ids=ids, labels=ids, use_cache=False).loss

    def collider_loss(m: torch.nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: m(input_ids=ids, labels=ids, collider_logits=False, use_cache=False).loss

    for lora in args.lora:
        lm, trainee = model, model
        if lora:
            import peft

            trainee = peft.get_peft_model(model, peft.LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r,
                                                                 lora_dropout=args.lora_dropout,
                                                                 target_modules=LORA_TARGETS))
            lm = trainee.get_base_model()
        print(f"{shape} lora={lora}: warming up")
        opt = adamw(trainee)
        dense_fn, dense_compiled = compiled_or_eager(dense_loss(lm), not args.no_compile)
        kinds = [Kind("dense", dense_fn, opt, dense_compiled, args.device),
                 Kind("collider", collider_loss(trainee), opt, args.device == "cuda", args.device)]
        variants = run_interleaved(kinds, args.warmup, args.steps)
        entry = {"shape": shape, "lora": lora, "kinds": variants,
                 "collider_speedup": round(variants["dense"]["median_ms"] / variants["collider"]["median_ms"], 3),
                 "kept_tokens_per_step": math.ceil(keep_ratio * args.batch * (args.seq - 1) - 1e-9)}
        if lora:
            entry["lora_config"] = {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": args.lora_dropout,
                                    "targets": LORA_TARGETS}
        print(json.dumps(entry))
        results.append(entry)
        del opt, kinds, dense_fn
        if lora:
            model = trainee.unload()  # the plain linear layers again (the Collider state stays on the model)
        torch.cuda.empty_cache()

    if args.liger:
        results.append(bench_liger(shape, model, ids, collider_loss, args))
    del model
    torch.cuda.empty_cache()
    return results


def bench_liger(shape: str, model: torch.nn.Module, ids: torch.Tensor, collider_loss, args) -> dict:
    """Dense HF + Liger, and Collider on the Liger-patched model (full fine-tuning)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    saved = {n: getattr(modeling_llama, n) for n in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            before = float(collider_loss(model)())
        remove(model)
        apply_liger_kernel_to_llama(model=model)  # patches the norms, the MLPs and the forward (fused linear CE)
        liger_forward = model.forward
        apply(model, selector=TokenSelector(score="collider", method="topk", keep_ratio=1.0 - args.drop),
              compile=True, engine=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            after = float(collider_loss(model)())
        opt = adamw(model)
        print(f"{shape} liger: warming up")
        fn, compiled = compiled_or_eager(lambda: liger_forward(input_ids=ids, labels=ids, use_cache=False).loss,
                                         not args.no_compile)
        kinds = [Kind("dense_liger", fn, opt, compiled, "cuda"),
                 Kind("collider_on_liger", collider_loss(model), opt, True, "cuda")]
        variants = run_interleaved(kinds, args.warmup, args.steps)
        entry = {"shape": shape, "lora": False, "kinds": variants,
                 "collider_speedup_over_liger": round(variants["dense_liger"]["median_ms"]
                                                      / variants["collider_on_liger"]["median_ms"], 3),
                 "composes": abs(after - before) <= 1e-3 * abs(before),
                 "collider_loss_before_after_liger": [round(before, 5), round(after, 5)]}
        print(json.dumps(entry))
        return entry
    finally:
        for n, v in saved.items():  # later models get HF's own modules again
            setattr(modeling_llama, n, v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES), help="model shape (repeatable; default: all)")
    ap.add_argument("--lora", default="both", choices=["off", "on", "both"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--drop", type=float, default=0.5, help="fraction of target tokens Collider drops")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--no-compile", action="store_true", help="dense step eager (Collider's pieces still compile)")
    ap.add_argument("--no-liger", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("hf_collider_bench.json"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run (shape tiny)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_hf_collider needs a CUDA GPU (--device cpu for a smoke run)")
    if not 0 < args.drop < 1:
        raise SystemExit(f"--drop must be in (0, 1), got {args.drop}")
    args.lora = {"off": [False], "on": [True], "both": [False, True]}[args.lora]
    args.liger = importlib.util.find_spec("liger_kernel") is not None and not args.no_liger and args.device == "cuda"
    results = []
    for shape in args.shape or [s for s in sorted(SHAPES) if s != "tiny"]:
        results += bench_shape(shape, args)
    out = {"bench": "hf_collider_step", "environment": environment(),
           "settings": {"batch": args.batch, "seq": args.seq, "drop": args.drop, "selection": "collider score, topk",
                        "dtype": "bf16 autocast, float32 weights" if args.device == "cuda" else "float32",
                        "optimizer": "AdamW", "device": args.device,
                        "warmup": args.warmup, "steps": args.steps, "interleaved": True,
                        "liger": args.liger, "dense_compile": not args.no_compile},
           "results": results}
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
