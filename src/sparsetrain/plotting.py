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


ZOOM_FRACTION = 0.2
"""A race plot's default y-range ends at the curves' highest mean loss at this fraction of the budget."""


def race_curves(report: dict) -> dict[str, tuple]:
    """Per arm of a race report (:mod:`sparsetrain.race`): ``(grid, mean, low, high)``,
    numpy arrays of the held-out loss over seeds against training seconds after
    start-up, each seed's curve linearly interpolated on the union of the seeds'
    evaluation times up to the shortest seed's last evaluation."""
    import numpy as np

    out = {}
    for name, arm in report["arms"].items():
        curves = [(np.array([e[0] for e in r["evals"]]), np.array([e[2] for e in r["evals"]])) for r in arm["runs"]]
        end = min(t[-1] for t, _ in curves)
        grid = np.unique(np.concatenate([t[t <= end] for t, _ in curves] + [np.array([end])]))
        on_grid = np.stack([np.interp(grid, t, v) for t, v in curves])
        out[name] = (grid, on_grid.mean(0), on_grid.min(0), on_grid.max(0))
    return out


def race_zoom_ylim(curves: dict[str, tuple], seconds: float, fraction: float = ZOOM_FRACTION) -> tuple[float, float]:
    """The y-range that shows where the arms differ: from the lowest value plotted (any
    seed's band) to the highest arm mean at ``fraction`` of the budget (the start-up
    loss, far above, is left out), padded by 5 % of the span. The full range where
    that would leave nothing to show (every curve flat)."""
    import numpy as np

    low = min(float(lo.min()) for _, _, lo, _ in curves.values())
    high = max(float(hi.max()) for _, _, _, hi in curves.values())
    at = max(float(np.interp(fraction * seconds, grid, mean)) for grid, mean, _, _ in curves.values())
    top = min(at, high)
    if top <= low:
        top = high
    pad = 0.05 * (top - low) if top > low else 0.05 * max(abs(low), 1.0)
    return low - pad, top + pad


def race_figure(report: dict, full: bool = False):
    """The race figure: held-out loss against training seconds after start-up (per arm
    the mean over seeds and the band from the lowest to the highest seed; the
    final-loss target dashed and the best-loss target dotted; each arm's lowest mean
    point marked), zoomed by :func:`race_zoom_ylim` unless ``full``; beside it the
    seconds each arm needed to reach each target (bars: the mean where every seed
    reached it; dots: the seeds; "never k/n" where not every seed did)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    seconds = report["settings"]["seconds"]
    curves = race_curves(report)
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    for i, (name, (grid, mean, low, high)) in enumerate(curves.items()):
        n = len(report["arms"][name]["runs"])
        ax.plot(grid, mean, color=f"C{i}", lw=1.6, label=f"{name} ({n} seed{'s' * (n > 1)})")
        if n > 1:
            ax.fill_between(grid, low, high, color=f"C{i}", alpha=0.2, lw=0)
        k = int(np.argmin(mean))
        ax.plot(grid[k], mean[k], "v", color=f"C{i}", ms=6)
    targets = [("target", "target_val_loss", "--"), ("best target", "best_target_val_loss", ":")]
    for label, key, style in targets:
        if key in report:
            ax.axhline(report[key], color="gray", ls=style, lw=1, label=f"{label} {report[key]:.3f}")
    if not full:
        ax.set_ylim(*race_zoom_ylim(curves, seconds))
    ax.set_xlabel("training seconds after start-up")
    ax.set_ylabel("held-out loss (nats/token)")
    zoom = "" if full else f", y from the lowest loss to the highest at {ZOOM_FRACTION:.0%} of the budget"
    ax.set_title(f"race: {seconds:g} s per run{zoom}; v: each arm's lowest", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    names = list(curves)
    height = 0.38
    for j, (label, key, style) in enumerate(targets):
        field = "seconds_to_target" if key == "target_val_loss" else "seconds_to_best_target"
        for i, name in enumerate(names):
            d = report["arms"][name].get(field, {}).get("after_startup")
            if d is None:
                continue
            y = i + (j - 0.5) * height
            if d["mean"] is not None:
                bars.barh(y, d["mean"], height=height * 0.9, color=f"C{i}", alpha=0.85 if j == 0 else 0.45,
                          hatch="" if j == 0 else "//", edgecolor="white")
            else:
                bars.text(seconds * 0.02, y, f"never {d['reached']}", va="center", fontsize=8)
            reached = [t for t in d["per_seed"] if t is not None]
            bars.plot(reached, [y] * len(reached), "k.", ms=4)
    bars.set_yticks(range(len(names)), names)
    bars.set_ylim(len(names) - 0.5, -0.5)  # every row, bar or "never" text alike; first arm on top
    bars.set_xlim(0, seconds * 1.05)
    bars.set_xlabel("seconds after start-up to reach the target")
    bars.set_title("solid: target, hatched: best target", fontsize=9)
    bars.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def plot_race(report: dict, png_path: str | Path, full: bool = False) -> Path | None:
    """Write :func:`race_figure` as a PNG (``full``: the whole y-range, from the
    start-up loss down). Returns the path, or None (with a warning) where
    matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        import warnings

        warnings.warn("matplotlib is not installed: no race PNG", RuntimeWarning, stacklevel=2)
        return None
    import matplotlib.pyplot as plt

    fig = race_figure(report, full)
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path
