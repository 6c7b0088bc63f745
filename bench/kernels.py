"""``python -m bench kernels``: sparsetrain's fused kernels against the plain-torch work they replace.

Benches (each at the named shapes of ``SHAPES``: tokens, model width, FFN
hidden size, vocabulary, heads; ``--shapes list`` prints them):

* ``cross_entropy``: the loss forward+backward on bf16 logits, plain torch
  against the fused kernels;
* ``kept_loss``: Collider's kept-rows loss (half the rows kept), plain torch
  eager and compiled against the kernels reading the kept rows in place;
* ``rope``: RoPE forward+backward on q and k as the model calls it (strided
  views of the fused qkv output), plain torch against the fused kernel;
* ``scoring``: the token scorers' row statistics, the Triton kernel against the
  chunked torch path and a naive float32 softmax;
* ``packing``: the 2:4 select+pack kernel, forward (pattern searched) and
  backward (on the saved pattern), each against the elementwise work of dense
  relu2 that it replaces;
* ``ffn``: the FFN block forward+backward, dense relu2 against SwiGLU at equal
  parameters and the 2:4 FFN on cuSPARSELt and on the masked kernel;
* ``bk_core``: the BK-Core recursion forward+backward (causal), the Python
  loop against the Triton kernel;
* ``bk_layer``: the ResNet-BK layer, dense against learned-sparse (eager);
* ``kept_attention``: the attention backward, cuDNN's dense backward over all
  query rows against the Triton kept-query kernels at keep 0.5;
* ``hyper_mixing``: one block's hyper-connection mixing forward+backward
  (read, write-then-read, write; float32 streams, bf16 sublayer outputs) at 2
  and 4 streams, plain torch eager and compiled and the Triton kernels, against
  the plain residual's own work (two adds, and autograd adding the gradients).

A shape's variants are timed in interleaved rounds after ``--warmup`` calls
each; on CUDA a sample is ``--queued`` calls queued back to back (GPU time per
call: a call's host work counts only where it starves the GPU). Each bench
also records the largest difference between its variants' outputs and, on
CUDA, each variant's peak memory above its inputs. Without CUDA the Triton
variants run in Triton's interpreter (``TRITON_INTERPRET=1``) or are left out;
cuSPARSELt and cuDNN variants need CUDA.
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from sparsetrain.triton_util import interpreting

from .options import BenchError, describe_shapes, parse_cases
from .results import Result
from .timing import gpu_clock_monitor, heat_gpu, time_interleaved

SHARED_DEFAULTS = {"repeats": 21, "warmup": 3, "shapes": "", "heat_seconds": {"cuda": 10.0, "cpu": 0.0}}


def _shape(tokens: int, batch: int, d: int, hidden: int, vocab: int, heads: int, experts: int = 4) -> dict[str, int]:
    return {"tokens": tokens, "batch": batch, "d_model": d, "hidden": hidden, "vocab": vocab, "heads": heads,
            "experts": experts}


NAMED_SHAPES = {
    "tiny": _shape(64, 2, 64, 256, 512, 2, 2),
    "d1280": _shape(16384, 8, 1280, 5120, 65536, 10),  # the d20 preset's width and vocabulary
    "d2048": _shape(16384, 8, 2048, 8192, 32768, 16),  # the ~1B model's
    "d4096": _shape(16384, 8, 4096, 16384, 65536, 32),
}
BENCHES = ("cross_entropy", "kept_loss", "rope", "scoring", "packing", "ffn", "bk_core", "bk_layer", "kept_attention",
           "hyper_mixing")
SHAPES = {bench: NAMED_SHAPES for bench in BENCHES}
DEFAULT = ["cross_entropy:d1280", "cross_entropy:d2048", "kept_loss:d1280", "kept_loss:d2048", "rope:d1280",
           "rope:d4096", "scoring:d2048", "packing:d1280", "packing:d2048", "packing:d4096", "ffn:d2048", "ffn:d4096",
           "bk_core:d2048", "bk_layer:d2048", "kept_attention:d2048", "hyper_mixing:d1280"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds the timed samples are split into")
    p.add_argument("--queued", type=int, default=None, help="calls per timed sample, queued back to back "
                   "(default 5 on CUDA, 1 on the CPU)")


def file_label(args: argparse.Namespace) -> str:
    return args.shapes.replace(":", "-").replace(",", ".") if args.shapes else "default"


@dataclass
class Bench:
    """One shape's variants: ``calls`` (name -> one timed call), each one's
    baseline, and what the bench checked or measured besides time."""

    calls: dict[str, Callable[[], None]]
    baselines: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)  # variant -> why it cannot run here
    check: Callable[[], dict[str, Any]] | None = None  # after timing: compares what the timed calls produced
    max_repeats: int | None = None  # fewer samples for a bench whose reference is slow
    queued: int | None = None  # calls per sample, instead of --queued


def _triton_here() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or interpreting()


NO_TRITON = "needs CUDA or Triton's interpreter (TRITON_INTERPRET=1)"


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def cross_entropy(s: dict, device: torch.device) -> Bench:
    from sparsetrain import cross_entropy as ce

    g = torch.Generator(device=device).manual_seed(0)
    logits = (2 * torch.randn(s["tokens"], s["vocab"], device=device, generator=g)).to(_dtype(device)).requires_grad_(True)
    targets = torch.randint(0, s["vocab"], (s["tokens"],), device=device, generator=g)

    def run(loss_fn: Callable) -> Callable[[], None]:
        def call() -> None:
            loss_fn(logits, targets).backward()
            logits.grad = None
        return call

    b = Bench({"reference": run(ce.cross_entropy_reference)}, {})
    if not _triton_here():
        b.left_out["fused"] = NO_TRITON
        return b
    b.calls["fused"], b.baselines["fused"] = run(ce.fused_cross_entropy), "reference"
    ref, got = ce.cross_entropy_reference(logits, targets), ce.fused_cross_entropy(logits, targets)
    (g_ref,), (g_got,) = torch.autograd.grad(ref, logits), torch.autograd.grad(got, logits)
    b.extra = {"loss_abs_diff": abs(float(ref.detach()) - float(got.detach())), "grad_max_abs_diff": _max_diff(g_ref, g_got)}
    return b


def kept_loss(s: dict, device: torch.device) -> Bench:
    from sparsetrain import kernels
    from sparsetrain.collider import loss as kept
    from sparsetrain.selection.select import kept_indices

    g = torch.Generator(device=device).manual_seed(0)
    N, V = s["tokens"], s["vocab"]
    logits = (2 * torch.randn(1, N, V, device=device, generator=g)).to(_dtype(device)).requires_grad_(True)
    targets = torch.randint(0, V, (1, N), device=device, generator=g)
    keep = torch.rand(1, N, device=device, generator=g) < 0.5
    kidx = kept_indices(keep)  # cached on the mask, as a selector's mask brings them: no sync per call
    rows: dict[str, torch.Tensor] = {}

    def run(name: str, fused: bool, compile: bool) -> Callable[[], None]:
        def call() -> None:
            with kernels.using(fused_cross_entropy=fused):
                slot = kept.RowGradSlot(compile)
                setattr(logits, kept.SLOT_ATTR, slot)
                kept.masked_cross_entropy(logits, targets, keep).backward()
                logits.grad = None
                rows[name] = slot.items[0][2]  # the kept rows' gradient, handed to the engine's slot
        return call

    def float64_rows() -> torch.Tensor:  # (softmax - onehot) / kept count, row by row
        picked = logits.detach().double().reshape(N, V).index_select(0, kidx)
        grad = torch.softmax(picked, -1)
        grad[torch.arange(kidx.numel(), device=device), targets.reshape(-1)[kidx]] -= 1.0
        return grad / kidx.numel()

    def check() -> dict[str, float]:
        ref = float64_rows()
        out = {"grad_max_abs_diff_vs_float64": max(_max_diff(r, ref) for r in rows.values())}
        if "kernels" in rows:
            out["grad_max_abs_diff_kernels_vs_torch"] = _max_diff(rows["kernels"], rows["torch_eager"])
        return out

    b = Bench({"torch_eager": run("torch_eager", False, False)}, {}, extra={"kept_rows": int(keep.sum())}, check=check)
    if device.type != "cuda":  # the kernels run on CUDA only; compiling on the CPU is not what is measured
        b.left_out.update(torch_compiled="CUDA only", kernels="CUDA only")
        return b
    b.calls.update(torch_compiled=run("torch_compiled", False, True), kernels=run("kernels", True, False))
    b.baselines.update(torch_compiled="torch_eager", kernels="torch_eager")
    return b


def rope(s: dict, device: torch.device) -> Bench:
    from sparsetrain.model import apply_rope_reference, rope_tables
    from sparsetrain.rope_triton import fused_rope

    B, H = s["batch"], s["heads"]
    T, hd = s["tokens"] // B, s["d_model"] // H
    cos, sin = (t.to(device) for t in rope_tables(T, hd, 10000.0))
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(B, T, 3, H, hd, device=device, dtype=_dtype(device), generator=g).requires_grad_(True)
    dy = torch.randn(B, H, T, hd, device=device, dtype=_dtype(device), generator=g)

    def run(rope_fn: Callable) -> Callable[[], None]:
        def call() -> None:
            q, k, _ = qkv.permute(2, 0, 3, 1, 4)
            torch.autograd.backward((rope_fn(q, cos, sin), rope_fn(k, cos, sin)), (dy, dy))
            qkv.grad = None
        return call

    b = Bench({"reference": run(apply_rope_reference)}, {})
    if not _triton_here():
        b.left_out["fused"] = NO_TRITON
        return b
    b.calls["fused"], b.baselines["fused"] = run(fused_rope), "reference"
    q = qkv.permute(2, 0, 3, 1, 4)[0]
    b.extra = {"max_abs_diff": _max_diff(fused_rope(q, cos, sin), apply_rope_reference(q, cos, sin))}
    return b


def scoring(s: dict, device: torch.device) -> Bench:
    from sparsetrain.selection.scores import row_stats_torch
    from sparsetrain.selection.triton_scores import row_stats_triton

    g = torch.Generator(device=device).manual_seed(0)
    N, V = s["tokens"], s["vocab"]
    logits = (torch.randn(N, V, device=device, generator=g) * 2).to(_dtype(device))
    targets = torch.randint(0, V, (N,), device=device, generator=g)
    targets[::97] = -100  # some rows without a target

    def naive() -> tuple[torch.Tensor, ...]:  # a straightforward implementation: a full float32 softmax
        logp = torch.log_softmax(logits.float(), -1)
        p = logp.exp()
        return -(p * logp).sum(-1), p.topk(2, -1).values, logp.gather(-1, targets.clamp(min=0)[:, None])

    b = Bench({"torch_naive_fp32": naive, "torch": lambda: row_stats_torch(logits, targets)}, {"torch": "torch_naive_fp32"})
    b.extra = {"logits_gb": N * V * logits.element_size() / 1e9}
    if not _triton_here():
        b.left_out["triton"] = NO_TRITON
        return b
    b.calls["triton"], b.baselines["triton"] = (lambda: row_stats_triton(logits, targets)), "torch_naive_fp32"
    ref, got = row_stats_torch(logits, targets), row_stats_triton(logits, targets)
    b.extra["max_abs_diff_vs_torch"] = max(_max_diff(getattr(got, k), getattr(ref, k)) for k in ("lse", "nll", "entropy", "p1", "p2"))
    return b


def packing(s: dict, device: torch.device) -> Bench:
    from sparsetrain.sparse24 import packing as pk

    g = torch.Generator(device=device).manual_seed(0)
    M, K = s["tokens"], s["hidden"]
    u = torch.randn(M, K, device=device, generator=g).to(torch.bfloat16)  # the kernel takes bf16
    ds = torch.randn(M, K, device=device, generator=g).to(torch.bfloat16)
    b = Bench({"relu2_forward": lambda: torch.relu(u).square(), "relu2_backward": lambda: ds * (2 * torch.relu(u))}, {})
    if not (_triton_here() and pk.triton_ok(u)):
        b.left_out.update(pack_forward=NO_TRITON, pack_backward=NO_TRITON)
        return b
    pattern = pk.pack_transposable(u)[2]
    b.calls.update(pack_forward=lambda: pk.pack_transposable(u), pack_backward=lambda: pk.pack_transposable(u, ds, pattern))
    b.baselines.update(pack_forward="relu2_forward", pack_backward="relu2_backward")
    ref = pk.pack_transposable_reference(u)
    got = pk.pack_transposable(u)
    gb = (M * K * 2 + 2 * M * (K // 2 + K // 16) * 2) / 1e9  # read u, write both packed operands
    b.extra = {"gb_moved_forward": gb, "gb_moved_backward": gb + M * K * 2 / 1e9,
               "equal_to_reference": all(torch.equal(a.view(torch.int16), r.view(torch.int16)) for a, r in zip(got, ref))}
    return b


def ffn(s: dict, device: torch.device) -> Bench:
    from sparsetrain.sparse24 import cusparselt
    from sparsetrain.sparse24.ffn import sparse24_ffn_masked_kernel

    g = torch.Generator(device=device).manual_seed(0)
    N, d, h = s["tokens"], s["d_model"], s["hidden"]
    dt = _dtype(device)

    def weight(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, device=device, generator=g) / cols**0.5).to(dt).requires_grad_(True)

    x = torch.randn(N, d, device=device, generator=g).to(dt).requires_grad_(True)
    dy = torch.randn(N, d, device=device, generator=g).to(dt)
    w_up, w_down = weight(h, d), weight(d, h)
    hs = int(round(h * 2 / 3 / 64)) * 64  # SwiGLU at equal parameters
    w_gate_s, w_up_s, w_down_s = weight(hs, d), weight(hs, d), weight(d, hs)
    calls = {"relu2": lambda: F.linear(F.relu(F.linear(x, w_up)).square(), w_down).backward(dy),
             "swiglu": lambda: F.linear(F.silu(F.linear(x, w_gate_s)) * F.linear(x, w_up_s), w_down_s).backward(dy)}
    b = Bench(calls, {"swiglu": "relu2"})
    if device.type == "cuda" and cusparselt.cusparselt_available() and cusparselt.supported(x, w_up):
        b.calls["relu2_24"] = lambda: cusparselt.sparse24_ffn_cusparselt(x, w_up, w_down).backward(dy)
        b.baselines["relu2_24"] = "relu2"
    else:
        b.left_out["relu2_24"] = "needs cuSPARSELt on CUDA (bf16, supported widths)"
    # the same selection on dense GEMMs (the Triton kernel where it runs, else its plain-torch reference)
    b.calls["relu2_24_masked_kernel"] = lambda: sparse24_ffn_masked_kernel(x, w_up, w_down).backward(dy)
    b.baselines["relu2_24_masked_kernel"] = "relu2"
    return b


def bk_core(s: dict, device: torch.device) -> Bench:
    from sparsetrain.bk import bk_core as bk

    g = torch.Generator(device=device).manual_seed(0)
    B, N = s["batch"], s["tokens"] // s["batch"]
    v64 = torch.randn(B, N, device=device, dtype=torch.float64, generator=g) * 2
    w = torch.randn(B, N, 2, device=device, generator=g)
    v = v64.float().requires_grad_(True)

    def run(impl: str) -> Callable[[], None]:
        def call() -> None:
            (bk(v, causal=True, impl=impl) * w).sum().backward()
            v.grad = None
        return call

    ref = bk(v64.cpu(), causal=True).to(device)
    # the loop runs one position per Python iteration: a few samples of one call each
    b = Bench({"torch_loop": run("torch")}, {}, max_repeats=5, queued=1)
    errs = {}
    impls = ["torch"] + (["triton"] if _triton_here() else [])
    with torch.no_grad():
        for impl in impls:
            errs[impl] = float((bk(v, causal=True, impl=impl).double() - ref).abs().max() / ref.abs().max())
    b.extra = {"max_rel_err_vs_float64": errs}
    if "triton" in impls:
        b.calls["triton"], b.baselines["triton"] = run("triton"), "torch_loop"
    else:
        b.left_out["triton"] = NO_TRITON
    return b


def bk_layer(s: dict, device: torch.device) -> Bench:
    from .bk_layer import build_layers, layer_calls

    layers = build_layers(s["d_model"], s["hidden"], s["experts"], 0.5)
    calls = layer_calls(layers, s["batch"], s["tokens"] // s["batch"], device, compile=False, graphed=False)
    return Bench(calls, {name: "dense" for name in calls if name != "dense"}, extra={"skip": 0.5})


def kept_attention(s: dict, device: torch.device) -> Bench:
    from sparsetrain.collider import triton_attention as tri
    from sparsetrain.collider.attention import attention_backward, attention_forward

    B, H = s["batch"], s["heads"]
    T, hd = s["tokens"] // B, s["d_model"] // H
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, T, H, hd, device=device, dtype=_dtype(device), generator=g).transpose(1, 2)
               for _ in range(3))  # token-major, as the engine lays them out
    out, saved = attention_forward(q, k, v)
    d_out = torch.randn_like(out)
    b = Bench({"dense_backward": lambda: attention_backward(saved, d_out)}, {},
              extra={"forward_impl": saved.flash[0] if saved.flash else "recompute", "keep": 0.5})
    if not (_triton_here() and tri.available()):
        b.left_out["kept_0.5"] = NO_TRITON
        return b
    keep = torch.rand(B, T, device=device, generator=g) < 0.5
    kidx = torch.nonzero(keep.reshape(-1)).squeeze(1)
    do_k = torch.randn(kidx.numel(), H, hd, device=device, dtype=q.dtype, generator=g)
    lse = saved.flash[1] if saved.flash else None
    b.calls["kept_0.5"] = lambda: tri.kept_attention_backward(q, k, v, out, do_k, kidx, lse)
    b.baselines["kept_0.5"] = "dense_backward"
    return b


def hyper_mixing(s: dict, device: torch.device) -> Bench:
    from sparsetrain import hyper_mixing as hm
    from sparsetrain import kernels

    B, D = s["batch"], s["d_model"]
    T = s["tokens"] // B
    g = torch.Generator(device=device).manual_seed(0)
    half = _dtype(device)  # what a sublayer hands back under autocast

    def randn(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=g).requires_grad_(grad)

    f1, f2 = randn(B, T, D, dtype=half, grad=True), randn(B, T, D, dtype=half, grad=True)
    da1, da2 = randn(B, T, D), randn(B, T, D)
    x_res, dy_res = randn(B, T, D, grad=True), randn(B, T, D)
    grads: dict[str, list[torch.Tensor]] = {}

    def residual() -> None:  # what the plain block does with its stream: reads it as is, adds each output
        a1 = x_res.view_as(x_res)
        x1 = a1 + f1
        a2 = x1.view_as(x1)
        torch.autograd.backward([x1 + f2, a1, a2], [dy_res, da1, da2])
        x_res.grad = f1.grad = f2.grad = None

    per_n: dict[int, tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = {}

    def mixing(n: int, name: str, fused: bool, compile: bool) -> Callable[[], None]:
        if n not in per_n:  # one set of inputs per n: the check compares the variants' gradients of the same inputs
            per_n[n] = (randn(B, T, n, D, grad=True), randn(B, T, n, D),
                        [torch.rand(*shape, device=device, generator=g).requires_grad_(True)
                         for shape in ((n,), (n, n), (n,), (n,), (n, n), (n,))])
        x, dy, w = per_n[n]

        def block(x, f1, f2, p1, h1, q1, p2, h2, q2):
            a1, x = hm.read_through(x, p1)
            x, a2 = hm.write_then_read(x, f1, h1, q1, p2)
            return hm.write(x, f2, h2, q2), a1, a2
        fn = torch.compile(block) if compile else block

        def call() -> None:
            with kernels.using(fused_hyper_mixing=fused, fused_hyper_mixing_compiled=fused):
                y, a1, a2 = fn(x, f1, f2, *w)
                torch.autograd.backward([y, a1, a2], [dy, da1, da2])
            grads[name] = [t.grad for t in (x, f1, f2, *w)]
            for t in (x, f1, f2, *w):
                t.grad = None
        return call

    b = Bench({"residual": residual}, {}, extra={"streams_dtype": "float32", "sublayer_dtype": str(half)[6:]})
    for n in (2, 4):
        variants = {f"torch_eager_n{n}": (False, False), f"torch_compiled_n{n}": (False, True),
                    f"kernels_n{n}": (True, False), f"kernels_compiled_n{n}": (True, True)}
        for name, (fused, compile) in variants.items():
            if device.type != "cuda" and (compile or fused):
                # the model takes the kernels on CUDA only; compiling on the CPU is not what is measured
                b.left_out[name] = "CUDA only"
            else:
                b.calls[name], b.baselines[name] = mixing(n, name, fused, compile), "residual"

    def check() -> dict[str, float]:  # the timed calls' last gradients, against plain torch eager
        out = {}
        for name, got in grads.items():
            ref = grads[f"torch_eager_n{name[-1]}"]
            if name != f"torch_eager_n{name[-1]}":
                out[f"{name}_grad_max_abs_diff"] = max(_max_diff(a, r) for a, r in zip(got, ref))
        return out
    b.check = check
    return b


BUILDERS: dict[str, Callable[[dict, torch.device], Bench]] = {
    "cross_entropy": cross_entropy, "kept_loss": kept_loss, "rope": rope, "scoring": scoring, "packing": packing,
    "ffn": ffn, "bk_core": bk_core, "bk_layer": bk_layer, "kept_attention": kept_attention,
    "hyper_mixing": hyper_mixing}


def _peak_extra_gib(call: Callable[[], None]) -> float:
    """Peak CUDA memory of one call above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)


def run_bench(bench: str, shape: str, args: argparse.Namespace) -> list[Result]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    label = f"{bench}:{shape}"
    spec = SHAPES[bench][shape]
    built = None
    try:
        built = BUILDERS[bench](spec, device)
        for name, why in built.left_out.items():
            print(f"kernels {label}: {name} left out ({why})", flush=True)
        for call in built.calls.values():
            for _ in range(args.warmup):
                call()
        repeats = min(args.repeats, built.max_repeats or args.repeats)
        queued = built.queued or args.queued
        with gpu_clock_monitor() as clocks:
            times = time_interleaved(built.calls, rounds=args.rounds, warmup=0, repeats=repeats, calls_per_sample=queued)
        extra = {"spec": spec, "queued": queued, "gpu_clocks": clocks, **built.extra,
                 **(built.check() if built.check else {})}
        if built.left_out:
            extra["left_out"] = built.left_out
        results = []
        for name, t in times.items():
            mine = dict(extra)
            if device.type == "cuda":
                mine["peak_extra_gib"] = _peak_extra_gib(built.calls[name])
            results.append(Result(name, label, t, baseline=built.baselines.get(name), extra=mine))
        return results
    except Exception as e:  # noqa: BLE001 - out of memory, a missing library: recorded, the other benches still run
        traceback.print_exc(file=sys.stderr)
        names = list(built.calls) if built is not None else ["(build)"]
        return [Result(n, label, [], extra={"spec": spec}, error=f"{type(e).__name__}: {e}"[:500]) for n in names]
    finally:
        built = None
        gc.collect()
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> list[Result]:
    if args.shapes == "list":
        print(describe_shapes(SHAPES, DEFAULT))
        raise SystemExit(0)
    cases = parse_cases(args.shapes, SHAPES, DEFAULT)
    if args.queued is None:
        args.queued = 5 if torch.cuda.is_available() else 1
    for name in ("rounds", "queued"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name} must be >= 1, got {getattr(args, name)}")
    heat = heat_gpu(args.heat_seconds)  # once: the kernels are short, and their compiles brief
    results: list[Result] = []
    for bench, shape in cases:
        print(f"kernels {bench}:{shape}: {SHAPES[bench][shape]}", flush=True)
        rows = run_bench(bench, shape, args)
        for r in rows:
            r.extra.setdefault("heat", heat)
        results += rows
        args.save_partial(results)
    return results
