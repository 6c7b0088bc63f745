"""Async loader and multi-token prediction on the GPU, side by side in one process.

    PYTHONPATH=src python bench/loader_mtp.py --out $OUT/loader_mtp.json

Loader: ``nano-125m`` training steps (bf16, sequence 1024, batch 16) fed three
ways: batches already on the GPU (compute only), the synchronous loader over
raw stdlib text tokenized on the fly (a slow loader, on purpose), and the async
loader over the same source. Per-step wall-clock (loader ``next`` included),
median after warm-up. Goal: async within 5% of compute only.

MTP: step time and peak memory of ``nano-125m`` (sequence 2048, batch 8, and a
32k vocabulary where the logits dominate memory) with no extra heads, with
n = 2, 3, 4 heads and the sequential head backward, and n = 4 with the naive
summed loss (every head's logits alive at once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsetrain.benchmark import environment, summarize, time_fn  # noqa: E402
from sparsetrain.config import build_config  # noqa: E402
from sparsetrain.loader import AsyncLoader, SyncLoader, TextBatchSource  # noqa: E402
from sparsetrain.model import GPT  # noqa: E402
from sparsetrain.mtp import MTPHeads, naive_loss, sequential_backward  # noqa: E402
from sparsetrain.optim import make_optimizer  # noqa: E402
from sparsetrain.tokenizer import BPETokenizer  # noqa: E402


def amp():
    return torch.autocast("cuda", dtype=torch.bfloat16)


def make_model(vocab: int, seq_len: int):
    cfg = build_config("nano-125m", overrides={"vocab_size": vocab, "seq_len": seq_len}).model
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    return model, make_optimizer(model, 1e-4, 0.1, (0.9, 0.95), "cuda")


def text_source(tmp: Path, batch: int, seq_len: int) -> TextBatchSource:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in root.rglob("*.py") if "site-packages" not in p.parts)
    tok_path = tmp / "tokenizer.json"
    if not tok_path.exists():
        texts = [Path(f).read_text(errors="replace") for f in files[::10]]
        BPETokenizer.train(texts, 8192).save(tok_path)
    return TextBatchSource(files=tuple(files), tokenizer_path=str(tok_path), batch_size=batch, seq_len=seq_len, seed=0)


def bench_loader(steps: int, warmup: int, workers: int) -> dict:
    batch, seq = 16, 1024
    model, opt = make_model(8192, seq)
    src = text_source(Path(os.environ.get("TMPDIR", "/tmp")), batch, seq)

    def train_step(x, y) -> None:
        with amp():
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(next_batch) -> list[float]:
        times = []
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            x, y = next_batch()
            train_step(x, y)
            torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        return times

    sync = SyncLoader(src, 0, 1, torch.device("cuda"))
    fixed = sync.next()
    t_build = []
    for _ in range(5):
        t0 = time.perf_counter()
        src.batch(sync._tokens, 0, 0)
        t_build.append((time.perf_counter() - t0) * 1e3)
    out = {"batch": batch, "seq_len": seq, "workers": workers, "batch_build_ms_one_process": statistics.median(t_build)}
    out["compute_only"] = summarize(run(lambda: fixed))
    out["sync"] = summarize(run(sync.next))
    with AsyncLoader(src, 0, 1, torch.device("cuda"), n_workers=workers, prefetch=4) as loader:
        time.sleep(5)  # workers start (spawn + tokenizer load) before timing, as in a long run
        out["async"] = summarize(run(loader.next))
    base = out["compute_only"]["median_ms"]
    out["async_over_compute"] = out["async"]["median_ms"] / base
    out["sync_over_compute"] = out["sync"]["median_ms"] / base
    return out


def bench_mtp(vocab: int, repeats: int) -> dict:
    seq, batch = 2048, 8
    out = {"vocab": vocab, "seq_len": seq, "batch": batch}
    variants = [("none", 0, False), ("n2", 2, False), ("n3", 3, False), ("n4", 4, False), ("n4_naive", 4, True)]
    for name, n, naive in variants:
        model, _ = make_model(vocab, seq)
        heads = MTPHeads(model, n).cuda() if n else None
        x = torch.randint(0, vocab, (batch, seq), device="cuda")
        y = torch.randint(0, vocab, (batch, seq), device="cuda")

        def step() -> None:
            if heads is None:
                with amp():
                    _, loss = model(x, y)
                loss.backward()
            elif naive:
                with amp():
                    loss, _ = naive_loss(model, heads, x, y)
                loss.backward()
            else:
                sequential_backward(model, heads, x, y, 1.0, amp)
            model.zero_grad(set_to_none=True)
            if heads is not None:
                heads.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # after warm-up: the peak of the timed steps
        times = time_fn(step, warmup=0, repeats=repeats)
        out[name] = {**summarize(times), "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
        model = heads = None  # free the GPU memory before the next variant
        torch.cuda.empty_cache()
    for name, *_ in variants:
        out[name]["time_vs_none"] = out[name]["median_ms"] / out["none"]["median_ms"]
        out[name]["extra_memory_gib"] = round(out[name]["peak_memory_gib"] - out["none"]["peak_memory_gib"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "loader_mtp.json"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    out = {"environment": environment()}
    out["loader"] = bench_loader(args.steps, 5, args.workers)
    Path(args.out).write_text(json.dumps(out, indent=2))
    out["mtp"] = {f"vocab_{v}": bench_mtp(v, args.repeats) for v in (8192, 32768)}
    Path(args.out).write_text(json.dumps(out, indent=2))
    L = out["loader"]
    print(f"\nloader (ms/step): compute only {L['compute_only']['median_ms']:.1f}, sync {L['sync']['median_ms']:.1f} "
          f"({L['sync_over_compute']:.2f}x), async {L['async']['median_ms']:.1f} ({L['async_over_compute']:.3f}x); "
          f"one batch built in {L['batch_build_ms_one_process']:.0f} ms")
    print(f"{'MTP':<14} {'ms':>8} {'x none':>7} {'peak GiB':>9}")
    for vk, r in out["mtp"].items():
        for name in ("none", "n2", "n3", "n4", "n4_naive"):
            print(f"{vk + ' ' + name:<14} {r[name]['median_ms']:8.1f} {r[name]['time_vs_none']:7.3f} {r[name]['peak_memory_gib']:9.2f}")


if __name__ == "__main__":
    main()
