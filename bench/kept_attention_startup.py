"""Start-up cost of the kept-query attention kernels: the first call on a fresh
machine compiles and times the candidate tiles; a later process reads the
choice from ``$SPARSETRAIN_CACHE/kept_attention_tuning.json``.

    PYTHONPATH=src python bench/kept_attention_startup.py --out $OUT/kept_attention_startup.json

Two child processes in turn share one empty cache folder (and a fresh Triton
cache), at the ~1B model's attention shape (8 x 2048 tokens, 16 heads of 128,
bf16, RoPE, half the tokens kept). Each reports the wall time of its first
call (compiles, plus tuning in the first process only) and the median of its
later calls. Triton's own compile cache is kept between the two, as it would
be on one machine, so the second process's first call is what a resumed or
repeated run pays.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def child() -> None:
    from sparsetrain.collider import triton_attention as tri

    B, H, T, hd = 8, 16, 2048, 128
    torch.manual_seed(0)
    q, k, v, o = (torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    kidx = torch.randperm(B * T, device="cuda")[: B * T // 2].sort().values
    do = torch.randn(kidx.numel(), H, hd, device="cuda", dtype=torch.bfloat16)
    lse = torch.randn(B, H, T, device="cuda")
    ang = torch.arange(T, device="cuda")[:, None] * torch.rand(hd // 2, device="cuda")
    rope = (ang.cos().bfloat16(), ang.sin().bfloat16())

    def call() -> None:
        tri.kept_attention_backward(q, k, v, o, do, kidx, lse=lse, rope=rope)
        torch.cuda.synchronize()

    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    later = []
    for _ in range(9):
        t0 = time.perf_counter()
        call()
        later.append(time.perf_counter() - t0)
    print(json.dumps({"first_call_s": first, "later_call_ms": sorted(later)[4] * 1e3,
                      "choice": [list(c) for c in next(iter(tri._tuned.values()))]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "kept_attention_startup.json"))
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child()
    from sparsetrain.benchmark import environment

    runs = []
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as triton_cache:
        env = {**os.environ, "SPARSETRAIN_CACHE": cache, "TRITON_CACHE_DIR": triton_cache}
        for label in ("fresh machine", "tuning on disk"):
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True)
            row = {"process": label, "process_s": time.perf_counter() - t0}
            if p.returncode:
                row["error"] = p.stderr[-1500:]
            else:
                row.update(json.loads(p.stdout.strip().splitlines()[-1]))
            row["tuning_file"] = (Path(cache) / "kept_attention_tuning.json").exists()
            runs.append(row)
    res = {"env": environment(), "runs": runs}
    json.dump(res, open(args.out, "w"), indent=1)
    for r in runs:
        print(r.get("process"), {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "process"})


if __name__ == "__main__":
    main()
