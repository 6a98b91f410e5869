"""A sweep's plots, as PNG: the metric against each searched setting, and all settings at once (parallel coordinates).

Built on `matplotlib.figure.Figure` with the Agg canvas, never pyplot (as eval/plots.py): no window, no global state.
A point is (a trial's values by config key, its metric); `space` is `tune.space` (it tells a log axis from a
linear one, and the order of categorical values).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Point = tuple[dict[str, Any], float]


def _numeric(kind: str, values: list) -> bool:
    return kind in ("uniform", "loguniform", "randint") or all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    )


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def metric_vs_params_png(points: list[Point], space: dict[str, list], metric: str, path: str | Path) -> Path:
    """One panel per searched key: the trials' metric against the key's value (log axis for loguniform)."""
    keys = list(space)
    fig = Figure(figsize=(4.2 * len(keys), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    y = [m for _, m in points]
    for ax, key in zip(axes, keys, strict=True):
        kind, *args = space[key]
        x = [p.get(key) for p, _ in points]
        if _numeric(kind, args):
            ax.scatter(x, y, s=36, c="tab:blue", edgecolors="black", linewidths=0.5)
            if kind == "loguniform":
                ax.set_xscale("log")
        else:  # categorical: positions in the listed order
            labels = [str(a) for a in args]
            ax.scatter([labels.index(str(v)) for v in x], y, s=36, c="tab:blue", edgecolors="black", linewidths=0.5)
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "no finished trial", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{metric} of each trial against each searched setting")
    return _save(fig, Path(path))


def _unit(kind: str, args: list, values: list) -> tuple[np.ndarray, list[str]]:
    """Values of one axis mapped to [0, 1], and the axis's end labels."""
    if _numeric(kind, args):
        v = np.asarray(values, dtype=np.float64)
        lo, hi = (min(args), max(args)) if args else (v.min(), v.max())
        if kind == "randint":
            hi = hi - 1
        if kind == "loguniform":
            v, lo, hi = np.log(v), math.log(lo), math.log(hi)
        span = hi - lo if hi > lo else 1.0
        ends = [f"{min(args):.3g}", f"{(max(args) - (kind == 'randint')):.3g}"]
        return (v - lo) / span, ends
    labels = [str(a) for a in args]
    pos = np.asarray([labels.index(str(x)) for x in values], dtype=np.float64)
    return pos / max(len(labels) - 1, 1), [labels[0], labels[-1]]


def parallel_coordinates_png(points: list[Point], space: dict[str, list], metric: str, path: str | Path) -> Path:
    """Every trial as a line through one vertical axis per searched key and one for the metric, coloured by the
    metric (dark = low): the settings the good trials share line up."""
    keys = list(space)
    fig = Figure(figsize=(2.2 * (len(keys) + 1) + 1.5, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    n_axes = len(keys) + 1
    if points:
        columns, ends = [], []
        for key in keys:
            kind, *args = space[key]
            unit, end = _unit(kind, args, [p.get(key) for p, _ in points])
            columns.append(unit)
            ends.append(end)
        m = np.asarray([m for _, m in points], dtype=np.float64)
        span = m.max() - m.min() if m.max() > m.min() else 1.0
        columns.append((m - m.min()) / span)
        ends.append([f"{m.min():.4g}", f"{m.max():.4g}"])
        data = np.stack(columns, axis=1)  # (trials, axes)
        colours = fig.colorbar(
            ax.scatter([], [], c=[], cmap="viridis", vmin=m.min(), vmax=m.max() if m.max() > m.min() else m.min() + 1),
            ax=ax,
            label=metric,
        )
        cmap = colours.cmap
        for row, value in zip(data, m, strict=True):
            ax.plot(range(n_axes), row, color=cmap((value - m.min()) / span), alpha=0.85, linewidth=1.5, marker="o")
        for i, (lo, hi) in enumerate(ends):
            ax.text(i, -0.06, lo, ha="center", va="top", fontsize=8)
            ax.text(i, 1.06, hi, ha="center", va="bottom", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finished trial", ha="center", va="center", transform=ax.transAxes)
    for i in range(n_axes):
        ax.axvline(i, color="black", linewidth=0.8)
    ax.set_xticks(range(n_axes), [*keys, metric])
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    ax.set_xlim(-0.3, n_axes - 0.7)
    ax.set_title("trials in parallel coordinates (each axis spans its searched range)")
    return _save(fig, Path(path))
