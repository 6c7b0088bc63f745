"""Plot val loss against step and against train seconds for every run in a
bench JSON that has {"runs": {name: {"val_loss": {step: loss}, "val_seconds": {step: s}}}}.

    python bench/plot_runs.py bench/results/selection_quality_h200.json bench/results/selection_quality_h200.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for name, run in data["runs"].items():
        steps = sorted(run["val_loss"], key=int)
        losses = [run["val_loss"][s] for s in steps]
        axes[0].plot([int(s) for s in steps], losses, "o-", ms=3, label=name)
        if "val_seconds" in run:
            axes[1].plot([run["val_seconds"][s] for s in steps], losses, "o-", ms=3, label=name)
    for ax, xl in zip(axes, ("step", "train seconds")):
        ax.set_xlabel(xl)
        ax.set_ylabel("val loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        lo = min(min(r["val_loss"].values()) for r in data["runs"].values())
        ax.set_ylim(lo - 0.1, lo + 2.0)
    env = data.get("environment", {})
    fig.suptitle(f"{src.split('/')[-1]} ({env.get('device', '')}, torch {env.get('torch', '')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
