"""``python -m bench hf``: a Hugging Face Llama-family training step, dense against Collider.

Each case is one named shape (a ``transformers.LlamaConfig``, random weights
from a fixed seed, no hub), with full fine-tuning or LoRA (``--lora``; peft,
adapters on every projection). A case builds a fresh model and one batch of
random token ids, and steps that model with one AdamW in two ways:

* ``dense``: HF's own forward and loss (``model(ids, labels=ids).loss``, the
  mean cross-entropy over every target), the loss function compiled whole
  with ``torch.compile`` (``--compile``, on by default on CUDA);
* ``collider_<drop>``: the model made a Collider trainee by
  :func:`sparsetrain.collider.apply` (the engine path; its pieces compiled
  alike), whose forward returns the kept-rows loss: the mean cross-entropy
  over the ``1 - drop`` of the targets with the highest ``collider`` score
  (top-k over the batch).

A step is the loss under bf16 autocast (on CUDA; float32 on the CPU) over
float32 weights, its backward, the AdamW step and the gradients set to None.
Before any step, each variant's loss at the initial weights is read from one
forward (``extra.loss_at_start``; that forward compiles it where compiled).
Then, as in every interleaved suite (:func:`bench.timing.prime_heat_time`):
``--warmup`` untimed steps of each, the GPU heated, and ``--repeats`` timed
steps of each in ``--rounds`` interleaved rounds. Both variants train the same
weights, so the losses after the first step are those of a shared run.

A row's ``extra``: ``peak_memory_gib`` (the most allocated during a timed
step) and ``held_memory_gib`` (allocated between steps: weights, optimizer
state), on CUDA; ``loss_at_start``, ``loss_first_step``, ``loss_last_step``;
``targets_per_step`` and ``kept_tokens_per_step`` (every target for dense);
``tokens_per_s``; the start-up (``startup``), the GPU clocks and the case's
wall-clock seconds. ``speedup_vs_baseline`` is dense's median over the row's.

``--keep-all``: one more case per shape, full fine-tuning: ``dense`` against
``engine_keep_all``, the Collider engine with no selector (every token kept,
dense training through its path): what the engine's loss and path give
apart from the dropped tokens.

``--liger`` (CUDA, ``liger_kernel``): one more case per shape, full
fine-tuning on a model patched by Liger's ``apply_liger_kernel_to_llama``
(fused linear cross-entropy, RMSNorm, SwiGLU, RoPE): ``dense_liger`` (the
baseline) against Collider on the patched model; its Collider row's
``composes`` says whether its loss at the initial weights equals the one
before the patch. Compiled, Liger's fused linear cross-entropy stays outside
the graph (``torch.compiler.disable``): it accumulates gradients in its
forward with an ``addmm`` variant that compilation cannot trace.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from sparsetrain import collider
from sparsetrain.collider.hf import applied_state, causal_lm
from sparsetrain.selection import TokenSelector

from .options import BenchError, describe_shapes, parse_cases
from .results import Result, quantile
from .timing import capture_step, gib, graphs_compiled, prime_heat_time, sync

SHARED_DEFAULTS = {"repeats": {"cuda": 10, "cpu": 3}, "warmup": {"cuda": 2, "cpu": 1}, "shapes": "",
                   "compile": {"cuda": True, "cpu": False}, "heat_seconds": {"cuda": 10.0, "cpu": 0.0}}
SHARED_MEANING = {"compile": "torch.compile the dense loss function and the Collider engine's pieces"}

MODELS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.2-1B's config
    "llama-3.2-1b": {"batch": 8, "seq": 2048, "config": {
        "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}},
    # HuggingFaceTB/SmolLM-360M's config
    "smollm-360m": {"batch": 8, "seq": 2048, "config": {
        "hidden_size": 960, "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
        "intermediate_size": 2560, "vocab_size": 49152, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}},
    # the CPU smoke shape
    "tiny": {"batch": 2, "seq": 32, "config": {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 96, "vocab_size": 256, "tie_word_embeddings": True, "max_position_embeddings": 64}},
}
SHAPES = {"hf": MODELS}
DEFAULT = ["hf:llama-3.2-1b", "hf:smollm-360m"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
LEARNING_RATE = 1e-5
MODEL_SEED = 0  # the initial weights
BATCH_SEED = 1  # the token ids, drawn on the CPU so that every device gets the same batch
LORA_MODES = {"off": (False,), "on": (True,), "both": (False, True)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", choices=tuple(LORA_MODES), default="both",
                   help="full fine-tuning (off), LoRA (on) or a case of each (both; default)")
    p.add_argument("--drop", type=float, default=0.5, help="fraction of the targets Collider drops (default 0.5)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds the timed steps are split into (default 2)")
    p.add_argument("--capture", action="store_true",
                   help="CUDA: each variant's whole step (forward, backward, AdamW) captured in one CUDA graph after "
                        "its warm-up, the graphs sharing one memory pool: what the steps cost without the host's "
                        "launches (per-step losses and memory are then not recorded)")
    p.add_argument("--keep-all", action="store_true",
                   help="one more case per shape, full fine-tuning: dense HF against the Collider engine keeping "
                        "every token (engine_keep_all): how much of the speed-up is the engine's loss and path "
                        "rather than the dropped tokens")
    p.add_argument("--liger", action="store_true",
                   help="CUDA, liger_kernel: one more case per shape, dense and Collider on a Liger-patched model")


def file_label(args: argparse.Namespace) -> str:
    label = args.shapes.replace("hf:", "").replace(",", ".") if args.shapes else "default"
    return (f"{label}-lora-{args.lora}" + ("-keepall" if args.keep_all else "") + ("-liger" if args.liger else "")
            + ("-captured" if args.capture else ""))


def build_model(shape: str, device: torch.device | str) -> nn.Module:
    """The shape's ``LlamaForCausalLM`` on ``device``, in float32, its weights
    drawn from ``MODEL_SEED`` (the same weights for every case on one device)."""
    import transformers

    cfg = transformers.LlamaConfig(**MODELS[shape]["config"], attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(MODEL_SEED)
    with torch.device(device):
        return transformers.LlamaForCausalLM(cfg).train()


def make_batch(shape: str, device: torch.device | str) -> torch.Tensor:
    """The shape's ``[batch, seq]`` token ids, drawn from ``BATCH_SEED`` on the CPU."""
    spec = MODELS[shape]
    g = torch.Generator().manual_seed(BATCH_SEED)
    return torch.randint(0, spec["config"]["vocab_size"], (spec["batch"], spec["seq"]), generator=g).to(device)


def collider_name(drop: float) -> str:
    return f"collider_{drop:g}"


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; off elsewhere (the CPU runs float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def forward_loss(loss_fn: Callable[[], torch.Tensor], device: torch.device) -> dict[str, Any]:
    """``loss_fn()``'s loss at the current weights from one forward (no step),
    the forward's seconds and the torch.compile graphs made for it."""
    graphs, t0 = graphs_compiled(), time.perf_counter()
    with autocast(device):
        loss = float(loss_fn().detach())
    return {"loss_at_start": loss, "first_forward_s": time.perf_counter() - t0,
            "first_forward_graphs_compiled": graphs_compiled() - graphs}


class HFStep:
    """One variant's training step (call it): ``loss_fn()`` under autocast, its
    backward, ``optimizer.step()``, the gradients set to None. Every call's loss
    is kept on the device (read after timing) and, on CUDA, the memory held
    when the call began and the peak while it ran."""

    def __init__(self, loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
                 device: torch.device) -> None:
        self.loss_fn, self.optimizer, self.device = loss_fn, optimizer, device
        self.losses: list[torch.Tensor] = []
        self.held_bytes: list[int] = []
        self.peak_bytes: list[int] = []

    def __call__(self) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            self.held_bytes.append(torch.cuda.memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        with autocast(self.device):
            loss = self.loss_fn()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.detach())
        if cuda:  # the allocator's counters are read on the host: no sync
            self.peak_bytes.append(torch.cuda.max_memory_allocated())


@dataclass
class Case:
    """The variants of one case, ready to step; the first is the baseline."""

    steps: dict[str, HFStep]
    collider: nn.Module  # the Collider trainee (its last selection's stats tell the kept count)
    parameters: int
    trainable: int
    extra: dict[str, Any] = field(default_factory=dict)  # for every row
    unpatched_collider_loss: float | None = None  # Liger's case: the Collider loss at the start, before the patch
    restore: Callable[[], None] | None = None  # undoes what building it changed outside the model


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=LEARNING_RATE, fused=params[0].is_cuda)


def _selector(drop: float) -> TokenSelector:
    return TokenSelector(score="collider", method="topk", keep_ratio=1.0 - drop)


def _compiled(fn: Callable[[], torch.Tensor], compile: bool) -> Callable[[], torch.Tensor]:
    return torch.compile(fn) if compile else fn


def _counts(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def build_case(shape: str, lora: bool, args: argparse.Namespace, device: torch.device, keep_all: bool = False) -> Case:
    """Dense and Collider steps on one fresh model (LoRA-wrapped with ``lora``) and one
    batch; with ``keep_all`` the Collider engine keeps every token (no selector)."""
    model = build_model(shape, device)
    ids = make_batch(shape, device)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                           lora_dropout=LORA["dropout"],
                                                           target_modules=list(LORA["targets"])))
    trainee = collider.apply(model, selector=None if keep_all else _selector(args.drop), compile=args.compile,
                             engine=True)
    lm = causal_lm(trainee)
    hf_forward = type(lm).forward  # the class's forward: HF's own, past the Collider one on the instance
    optimizer = _adamw(trainee)
    dense = _compiled(lambda: hf_forward(lm, input_ids=ids, labels=ids, use_cache=False).loss, args.compile)
    n_valid = ids.shape[0] * (ids.shape[1] - 1)  # every position but each row's last has a target
    steps = {"dense": HFStep(dense, optimizer, device),
             ("engine_keep_all" if keep_all else collider_name(args.drop)): HFStep(
                 lambda: trainee(input_ids=ids, labels=ids, collider_logits=False, use_cache=False,
                                 collider_n_valid=n_valid).loss, optimizer, device)}
    total, trainable = _counts(trainee)
    return Case(steps, trainee, total, trainable, extra={"lora": dict(LORA) if lora else None})


def build_liger_case(shape: str, args: argparse.Namespace, device: torch.device) -> Case:
    """Full fine-tuning on a Liger-patched model: HF's forward as Liger patches
    it, and Collider applied on top; the Collider loss at the initial weights
    before the patch, for ``composes``."""
    import liger_kernel.transformers.functional as liger_functional
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    model = build_model(shape, device)
    ids = make_batch(shape, device)

    def collider_loss() -> torch.Tensor:
        return model(input_ids=ids, labels=ids, collider_logits=False, use_cache=False,
                     collider_n_valid=ids.shape[0] * (ids.shape[1] - 1)).loss

    collider.apply(model, selector=_selector(args.drop), compile=args.compile, engine=True)
    unpatched = forward_loss(collider_loss, device)["loss_at_start"]
    collider.remove(model)
    saved = {n: getattr(modeling_llama, n) for n in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")}
    liger_loss = liger_functional.liger_fused_linear_cross_entropy

    def restore() -> None:  # later models get HF's own modules again
        for n, v in saved.items():
            setattr(modeling_llama, n, v)
        liger_functional.liger_fused_linear_cross_entropy = liger_loss

    # Liger's fused linear cross-entropy computes its gradients inside its forward,
    # accumulating with addmm(out=..., out_dtype=float32), which torch.compile's fake
    # tensors reject: compiled, the rest of the model is traced and the loss runs as
    # Liger's own kernels, as it does uncompiled.
    if args.compile:
        liger_functional.liger_fused_linear_cross_entropy = torch.compiler.disable(liger_loss)
    try:
        apply_liger_kernel_to_llama(model=model)  # the instance's forward becomes Liger's (fused linear CE)
        liger_forward = model.forward
        collider.apply(model, selector=_selector(args.drop), compile=args.compile, engine=True)
    except BaseException:
        restore()
        raise
    optimizer = _adamw(model)
    dense = _compiled(lambda: liger_forward(input_ids=ids, labels=ids, use_cache=False).loss, args.compile)
    steps = {"dense_liger": HFStep(dense, optimizer, device),
             f"{collider_name(args.drop)}_on_liger": HFStep(collider_loss, optimizer, device)}
    total, trainable = _counts(model)
    from importlib.metadata import version

    return Case(steps, model, total, trainable, extra={"lora": None, "liger": True,
                                                       "liger_version": version("liger-kernel"),
                                                       "liger_loss_compiled": False},
                unpatched_collider_loss=unpatched, restore=restore)


def case_label(shape: str, kind: str) -> str:
    """The ``shape`` of a case's rows: ``NAME:full``, ``NAME:lora``, ``NAME:full+keepall`` or ``NAME:full+liger``."""
    return f"{shape}:{kind}"


def _variant_names(kind: str, drop: float) -> list[str]:
    if kind == "full+liger":
        return ["dense_liger", f"{collider_name(drop)}_on_liger"]
    if kind == "full+keepall":
        return ["dense", "engine_keep_all"]
    return ["dense", collider_name(drop)]


def run_case(shape: str, kind: str, args: argparse.Namespace) -> list[Result]:
    """Build, measure the start, prime, heat and time one case; its rows (error rows if anything failed)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = MODELS[shape]
    label = case_label(shape, kind)
    mode = {"compile": args.compile, "capture": args.capture, "autocast": "bf16" if device.type == "cuda" else None,
            "drop": args.drop,
            "rounds": args.rounds, "warmup": args.warmup, "heat_seconds": args.heat_seconds,
            "optimizer": f"AdamW lr {LEARNING_RATE:g}",
            "selection": "none: every token kept" if kind == "full+keepall" else "collider score, topk"}
    names = _variant_names(kind, args.drop)
    print(f"hf {label}: {spec['batch']} x {spec['seq']} tokens, "
          f"{'compiled' if args.compile else 'eager'}, {', '.join(names)}", flush=True)
    case = None
    try:
        t0 = time.perf_counter()
        case = build_liger_case(shape, args, device) if kind == "full+liger" else build_case(
            shape, kind == "lora", args, device, keep_all=kind == "full+keepall")
        sync(device)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        start = {name: forward_loss(step.loss_fn, device) for name, step in case.steps.items()}  # initial weights
        start_s = time.perf_counter() - t0
        calls: dict[str, Callable[[], Any]] = dict(case.steps)
        if args.capture:  # after this, a call is a replay: HFStep records nothing more
            pool = torch.cuda.graph_pool_handle()
            calls = {name: capture_step(step, [step.optimizer], pool=pool) for name, step in case.steps.items()}
        m = prime_heat_time(calls, device, args.warmup, args.heat_seconds, args.rounds, args.repeats)
        if m.graphs_compiled_while_timed:
            print(f"hf {label}: {m.graphs_compiled_while_timed} graph(s) compiled while timed: the priming did not "
                  "compile everything", flush=True)
        targets = spec["batch"] * (spec["seq"] - 1)
        stats = _last_stats(case.collider)
        shared = {"mode": mode, "spec": spec, "parameters": case.parameters, "trainable_parameters": case.trainable,
                  "tokens_per_step": spec["batch"] * spec["seq"], "targets_per_step": targets,
                  "gpu_clocks": m.clocks, "heat": m.heat,
                  "wall_s": {"build": build_s, "start": start_s, **m.wall_s},
                  "graphs_compiled_while_timed": m.graphs_compiled_while_timed, **case.extra}
        baseline = next(iter(case.steps))
        results = []
        for name, step in case.steps.items():
            first = dict(start[name])
            extra = dict(shared, loss_at_start=first.pop("loss_at_start"), kept_tokens_per_step=(
                targets if name == baseline else stats.kept), tokens_per_s=tokens_per_second(
                shared["tokens_per_step"], m.times[name]),
                **(_captured_extra(step) if args.capture else _variant_extra(step, m.flags[name], args.warmup)))
            extra["startup"] = {**m.startup[name], **first, **extra["startup"]}
            if name != baseline and case.unpatched_collider_loss is not None:
                unpatched = extra["collider_loss_at_start_unpatched"] = case.unpatched_collider_loss
                extra["composes"] = abs(extra["loss_at_start"] - unpatched) <= 1e-3 * abs(unpatched)
            results.append(Result(name, label, m.times[name], baseline=None if name == baseline else baseline,
                                  extra=extra))
        print(f"hf {label}: " + "; ".join(
            f"{r.variant} loss {r.extra['loss_at_start']:.4f} at start, kept {r.extra['kept_tokens_per_step']}"
            + (f", peak {r.extra['peak_memory_gib']} GiB" if r.extra["peak_memory_gib"] is not None else "")
            for r in results), flush=True)
        return results
    except BenchError:
        raise
    except Exception as e:  # noqa: BLE001 - out of memory, a compile error: recorded, the other cases still run
        traceback.print_exc(file=sys.stderr)
        return [Result(n, label, [], extra={"mode": mode, "spec": spec}, error=f"{type(e).__name__}: {e}"[:500])
                for n in names]
    finally:
        if case is not None and case.restore is not None:
            case.restore()
        case = None
        gc.collect()
        torch._dynamo.reset()  # releases the compiled functions, and with them the model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def tokens_per_second(tokens_per_step: int, times_ms: list[float]) -> float:
    """Tokens per second at the median step time."""
    return tokens_per_step / (quantile(times_ms, 0.5) * 1e-3)


def _variant_extra(step: HFStep, flags: list[bool], warmup: int) -> dict[str, Any]:
    """A variant's losses and, on CUDA, memory, from its calls (``flags``: which were timed;
    the first ``warmup`` primed it)."""
    timed = [i for i, t in enumerate(flags) if t]
    out: dict[str, Any] = {"loss_first_step": float(step.losses[0]), "loss_last_step": float(step.losses[-1]),
                           "peak_memory_gib": None, "held_memory_gib": None, "startup": {}}
    if step.peak_bytes:
        out["peak_memory_gib"] = gib(max(step.peak_bytes[i] for i in timed))
        out["held_memory_gib"] = gib(max(step.held_bytes[i] for i in timed))
        if warmup:  # each step resets the peak: the priming's is the largest of its steps'
            out["startup"]["peak_memory_gib"] = gib(max(step.peak_bytes[:warmup]))
    return out


def _captured_extra(step: HFStep) -> dict[str, Any]:
    """A captured variant's extras: its warm-up's losses and peak memory (replays record none)."""
    return {"loss_first_step": float(step.losses[0]), "loss_last_step": None, "peak_memory_gib": None,
            "held_memory_gib": None, "startup": {"peak_memory_gib": gib(max(step.peak_bytes))} if step.peak_bytes else {}}


def _last_stats(trainee: nn.Module) -> Any:
    """The stats of the last selection the Collider forward of ``trainee`` made."""
    stats = applied_state(trainee).last_stats
    if stats is None:
        raise RuntimeError("the Collider forward recorded no selection")
    return stats


def plan(cases: list[tuple[str, str]], args: argparse.Namespace) -> str:
    """What the run will do, before it does it: per case its tokens, mode and
    variants, the calls each variant gets, and the totals."""
    rounds = max(1, min(args.rounds, args.repeats))
    per_variant = args.warmup + args.repeats + rounds
    lines = [f"hf plan: {len(cases)} case(s). Each builds a fresh model (seed {MODEL_SEED}) and batch; each variant "
             f"gets one forward at the initial weights (the loss at start; it compiles the forward where compiled), "
             f"{args.warmup} untimed priming step(s), then, after {args.heat_seconds:g} s of heating, {args.repeats} "
             f"timed step(s) in {rounds} interleaved round(s) with an untimed switch step each round"]
    width = max(len(case_label(s, k)) for s, k in cases)
    for shape, kind in cases:
        spec = MODELS[shape]
        names = _variant_names(kind, args.drop)
        lines.append(f"  {case_label(shape, kind):<{width}}  {spec['batch']} x {spec['seq']} tokens, "
                     f"{'compiled' if args.compile else 'eager'}, {len(names)} variant(s): {', '.join(names)}; "
                     f"1 forward + {per_variant} step(s) each")
    n = sum(len(_variant_names(k, args.drop)) for _, k in cases)
    lines.append(f"  total: {n} variant(s), {n if args.compile else 0} compiled once each, {n * per_variant} step(s), "
                 f"{len(cases) * args.heat_seconds:g} s of heating")
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The cases to run, ``(shape, kind)`` with kind ``full``, ``lora`` or
    ``full+liger``; every unsupported combination refused in one line."""
    if args.shapes == "list":
        print(describe_shapes(SHAPES, DEFAULT))
        raise SystemExit(0)
    if args.rounds < 1:
        raise BenchError(f"--rounds must be >= 1, got {args.rounds}")
    if not 0 < args.drop < 1:
        raise BenchError(f"--drop must lie strictly between 0 and 1, got {args.drop}")
    shapes = [s for _, s in parse_cases(args.shapes, SHAPES, DEFAULT)]
    cuda = torch.cuda.is_available()
    if True in LORA_MODES[args.lora] and importlib.util.find_spec("peft") is None:
        raise BenchError(f"--lora {args.lora} needs the peft package, which is not installed (or pass --lora off)")
    if args.liger and not cuda:
        raise BenchError("--liger needs a CUDA device (Liger's kernels run on the GPU only)")
    if args.capture and not cuda:
        raise BenchError("--capture needs a CUDA device (CUDA graphs)")
    if args.liger and importlib.util.find_spec("liger_kernel") is None:
        raise BenchError("--liger needs the liger-kernel package, which is not installed")
    cases = []
    for shape in shapes:
        if not cuda and MODELS[shape]["batch"] * MODELS[shape]["seq"] > 4096:
            print(f"hf {shape}: a GPU shape on the CPU; this will be slow", flush=True)
        cases += [(shape, "lora" if lora else "full") for lora in LORA_MODES[args.lora]]
        if args.keep_all:
            cases.append((shape, "full+keepall"))
        if args.liger:
            cases.append((shape, "full+liger"))
    return cases


def run(args: argparse.Namespace) -> list[Result]:
    cases = _check(args)
    print(plan(cases, args), flush=True)
    results: list[Result] = []
    t0 = time.perf_counter()
    for shape, kind in cases:
        results += run_case(shape, kind, args)
        args.save_partial(results)
    print(f"hf: {len(cases)} case(s) in {time.perf_counter() - t0:.0f} s", flush=True)
    return results
