"""``python -m bench.hyper_stream_precision --out FILE``: how far each parameter's gradient
lies from float64's with the hyper-connection streams stored in float32 and in bfloat16
(``model.hyper_stream_dtype``), with and without bfloat16 autocast, on CPU.

One batch per seed, a small GPT (d 64 x 4 layers, seq 64 x 8); the float64 model with
the same weights is the reference. Per parameter group (each mixing parameter kind,
``hyper_in``, ``hyper_out``, everything else) the relative error ``||g - g64|| / ||g64||``
over the seeds' parameters: median and maximum. The mixing logits' gradients cancel
(softmax and sigmoid Jacobians), so their largest relative errors are large at any
precision; the medians compare the two storages.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
from pathlib import Path

import torch

from sparsetrain.benchmark import environment
from sparsetrain.build import build_model
from sparsetrain.config import ModelConfig

SHAPE = dict(vocab_size=300, seq_len=64, n_layer=4, n_head=2, d_model=64)


def group(name: str) -> str:
    if name.startswith("hyper_"):
        return name
    return name.rsplit(".", 1)[-1] if ".hc_" in name else "other"


def measure(n: int, seeds: int, first_seed: int = 0) -> dict:
    """Per parameter group and arm, the median and maximum relative gradient error
    over seeds ``first_seed .. first_seed + seeds - 1``."""
    errors: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for seed in range(first_seed, first_seed + seeds):
        torch.manual_seed(seed)
        cfg = ModelConfig(**SHAPE, hyper_connections=n)
        ref = build_model(cfg).double()
        idx, tgt = torch.randint(0, 300, (8, 64)), torch.randint(0, 300, (8, 64))
        ref(idx, tgt)[1].backward()
        for dtype in ("float32", "bfloat16"):
            for autocast in (False, True):
                model = build_model(ModelConfig(**SHAPE, hyper_connections=n, hyper_stream_dtype=dtype))
                model.load_state_dict(ref.state_dict())
                ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
                with ctx:
                    loss = model(idx, tgt)[1]
                loss.backward()
                arm = f"{dtype} streams" + (", bf16 autocast" if autocast else "")
                for (name, p), q in zip(ref.named_parameters(), model.parameters()):
                    errors[group(name)][arm].append(float((q.grad.double() - p.grad).norm() / p.grad.norm()))
    return {g: {arm: {"median": statistics.median(v), "max": max(v)} for arm, v in arms.items()}
            for g, arms in sorted(errors.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--seeds", type=int, default=6)
    args = p.parse_args()
    doc = {"environment": environment(), "what": __doc__.split("\n\n")[1].replace("\n", " "), "shape": SHAPE,
           "seeds": args.seeds, "relative_gradient_error": {f"n={n}": measure(n, args.seeds) for n in (2, 4)}}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    for key, groups in doc["relative_gradient_error"].items():
        for g, arms in groups.items():
            print(key, g, "  ".join(f"{arm}: {v['median']:.1e} (max {v['max']:.1e})" for arm, v in arms.items()))


if __name__ == "__main__":
    main()
