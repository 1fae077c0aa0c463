"""The training loss curve as a PNG (logged to MLflow) and as a Markdown table (shown in Dagster's metadata).

Both read the trainer's `log_history` (dicts with `step`, `loss`, `learning_rate`, …); no Dagster, no MLflow here.
"""
from __future__ import annotations

import math
from pathlib import Path


def loss_points(log_history: list[dict]) -> list[tuple[int, float, float | None]]:
    """(step, loss, learning rate) for every logging step with a finite loss, in step order."""
    points = []
    for h in log_history:
        loss = h.get("loss")
        if loss is not None and math.isfinite(float(loss)):
            lr = h.get("learning_rate")
            points.append((int(h.get("step", 0)), float(loss), None if lr is None else float(lr)))
    return sorted(points)


def loss_curve_png(log_history: list[dict], path: str | Path, title: str = "training loss") -> Path:
    """Loss per logging step (and the learning rate on a second axis) drawn to `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here, and none needed
    from matplotlib.figure import Figure

    points = loss_points(log_history)
    fig = Figure(figsize=(4.8, 3.0), dpi=100, layout="constrained")  # 480 px: fits Dagster's metadata column
    ax = fig.add_subplot()
    if points:
        steps, losses, lrs = zip(*points)
        ax.plot(steps, losses, marker="o" if len(points) <= 40 else None, markersize=3, color="tab:blue",
                label="train/loss")
        if all(lr is not None for lr in lrs):
            lr_ax = ax.twinx()
            lr_ax.plot(steps, lrs, color="tab:orange", linewidth=1, alpha=0.7, label="train/learning_rate")
            lr_ax.set_ylabel("learning rate", color="tab:orange")
            lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    else:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path)
    return path


def loss_curve_markdown(log_history: list[dict], max_rows: int = 12, image_url: str | None = None,
                        link_url: str | None = None) -> str:
    """A Markdown table of the loss curve, thinned to at most `max_rows` evenly spaced steps (the first and last
    included); above it the picture at `image_url`, linked to `link_url`, where the PNG is served."""
    points = loss_points(log_history)
    if len(points) > max_rows:
        picks = sorted({round(i * (len(points) - 1) / (max_rows - 1)) for i in range(max_rows)})
        points = [points[i] for i in picks]
    rows = [f"| {step} | {loss:.4f} | {'' if lr is None else f'{lr:.2e}'} |" for step, loss, lr in points]
    table = "\n".join(["| step | train/loss | learning rate |", "|---:|---:|---:|", *rows])
    if not image_url:
        return table
    image = f"![loss curve]({image_url})"
    return f"{f'[{image}]({link_url})' if link_url else image}\n\n{table}"
