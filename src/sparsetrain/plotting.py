"""Loss-curve PNG from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """Train loss (raw and smoothed) and val loss against step. Returns the PNG
    path, or None (with a warning) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        import warnings

        warnings.warn("matplotlib is not installed: no loss-curve PNG", RuntimeWarning, stacklevel=2)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if isinstance(r, dict)]
    # a row a damaged log left without its numbers is skipped, not plotted
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and {"step", "loss"} <= r.keys()]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "eval" and {"step", "val_loss"} <= r.keys()]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
        ema, smooth = 0.0, []
        for i, v in enumerate(losses, 1):  # bias-corrected EMA, as in Adam
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema / (1 - 0.9**i))
        ax.plot(steps, smooth, color="tab:blue", lw=1.5, label="train (EMA 0.9)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:red", lw=1.5, ms=4, label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path


def plot_race(report: dict, png_path: str | Path) -> Path | None:
    """Held-out loss against training seconds after start-up for each arm of a race
    report (:mod:`sparsetrain.race`): the mean over seeds, the band from the lowest
    to the highest seed (each seed's curve linearly interpolated on a common grid up
    to the shortest seed's last evaluation), and the target as a dashed line."""
    try:
        import matplotlib
    except ImportError:
        import warnings

        warnings.warn("matplotlib is not installed: no race PNG", RuntimeWarning, stacklevel=2)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for i, (name, arm) in enumerate(report["arms"].items()):
        color = f"C{i}"
        curves = [(np.array([e[0] for e in r["evals"]]), np.array([e[2] for e in r["evals"]])) for r in arm["runs"]]
        end = min(t[-1] for t, _ in curves)
        grid = np.unique(np.concatenate([t[t <= end] for t, _ in curves] + [np.array([end])]))
        on_grid = np.stack([np.interp(grid, t, v) for t, v in curves])
        ax.plot(grid, on_grid.mean(0), color=color, lw=1.6, label=f"{name} ({len(curves)} seed{'s' * (len(curves) > 1)})")
        if len(curves) > 1:
            ax.fill_between(grid, on_grid.min(0), on_grid.max(0), color=color, alpha=0.2, lw=0)
    ax.axhline(report["target_val_loss"], color="gray", ls="--", lw=1, label="target")
    ax.set_xlabel("training seconds after start-up")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"race: {report['settings']['seconds']:g} s per run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path
