"""Val loss against step and against train seconds for every run of a quality file.

    python -m bench.plot bench/results/quality_collider-nano-125m_h100.json curves.png

Reads the suite's schema (rows with ``extra.val_loss`` and ``extra.val_seconds``)
and the older ``{"runs": {name: {"val_loss", "val_seconds"}}}`` files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves(data: dict) -> dict[str, dict]:
    """``label -> {"val_loss": {step: loss}, "val_seconds": {step: s}}`` of a quality file."""
    if "results" in data:
        return {f"{r['variant']} ({r['shape']})" if len({x['shape'] for x in data['results']}) > 1 else r["variant"]:
                r["extra"] for r in data["results"] if r.get("extra", {}).get("val_loss")}
    return data["runs"]


def plot(src: str, dst: str) -> None:
    data = json.loads(Path(src).read_text())
    runs = curves(data)
    if not runs:
        raise SystemExit(f"{src}: no val-loss curves in it")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for name, run in runs.items():
        steps = sorted(run["val_loss"], key=int)
        losses = [run["val_loss"][s] for s in steps]
        axes[0].plot([int(s) for s in steps], losses, "o-", ms=3, label=name)
        if run.get("val_seconds"):
            axes[1].plot([run["val_seconds"][s] for s in steps], losses, "o-", ms=3, label=name)
    lo = min(min(r["val_loss"].values()) for r in runs.values())
    for ax, xl in zip(axes, ("step", "train seconds")):
        ax.set_xlabel(xl)
        ax.set_ylabel("val loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_ylim(lo - 0.1, lo + 2.0)
    env = data.get("environment", {})
    fig.suptitle(f"{Path(src).name} ({env.get('device', '')}, torch {env.get('torch', '')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.plot FILE.json FILE.png")
    plot(sys.argv[1], sys.argv[2])
