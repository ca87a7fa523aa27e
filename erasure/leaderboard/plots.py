"""Leaderboard plots (matplotlib, Agg): UA against retained accuracy with its Pareto front, and time vs memory.

Each point is one leaderboard row; error bars are the sample standard deviations over the row's runs. A plot
with nothing to show still gets written, saying which metrics were missing, so the set of files is always the
same.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from erasure.leaderboard.table import Leaderboard, Row, Stat, retain_stat, run_mean

PARETO_FILE = "pareto.png"
TIME_MEMORY_FILE = "time_memory.png"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (both higher is better), by increasing x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (ox >= x and oy >= y) and (ox > x or oy > y) for j, (ox, oy) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def write_pareto_plot(board: Leaderboard, path: Path) -> Path:
    rows, xs, ys = [], [], []
    for row in board.rows:
        ua, retain = run_mean(row, "canvas.ua", 100.0), retain_stat(row)
        if ua is not None and retain is not None:
            rows.append(row)
            xs.append(ua)
            ys.append(retain)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    if rows:
        _scatter(ax, rows, xs, ys)
        front = pareto_front([(x.mean, y.mean) for x, y in zip(xs, ys, strict=True)])
        ax.plot([xs[i].mean for i in front], [ys[i].mean for i in front], "--", color="grey", lw=1,
                label="Pareto front", zorder=1)  # fmt: skip
        ax.legend(fontsize=7, loc="best")
    else:
        _empty(ax, "no run has canvas.ua, canvas.ira and canvas.cra")
    ax.set_xlabel("UA (%) ↑ (mean over style and object targets)")
    ax.set_ylabel("mean of IRA and CRA (%) ↑")
    ax.set_title("Erasure vs retention")
    return _save(fig, path)


def write_time_memory_plot(board: Leaderboard, path: Path) -> Path:
    rows, xs, ys = [], [], []
    for row in board.rows:
        time_s, memory = run_mean(row, "efficiency.erase_time_s"), run_mean(row, "efficiency.peak_mem_mb")
        if time_s is not None and memory is not None:
            rows.append(row)
            xs.append(time_s)
            ys.append(memory)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    if rows:
        _scatter(ax, rows, xs, ys)
        ax.legend(fontsize=7, loc="best")
        if max(x.mean for x in xs) > 100 * max(min(x.mean for x in xs), 1e-9):
            ax.set_xscale("log")
    else:
        _empty(ax, "no run has efficiency.erase_time_s and efficiency.peak_mem_mb")
    ax.set_xlabel("erasure time (s) ↓")
    ax.set_ylabel("peak memory (MB) ↓")
    ax.set_title("Cost of erasure")
    return _save(fig, path)


def _scatter(ax: Axes, rows: list[Row], xs: list[Stat], ys: list[Stat]) -> None:
    colors = plt.get_cmap("tab10")
    methods = sorted({row.method for row in rows})
    several_backbones = len({row.backbone for row in rows}) > 1
    for row, x, y in zip(rows, xs, ys, strict=True):
        color = colors(methods.index(row.method) % 10)
        ax.errorbar(x.mean, y.mean, xerr=x.std or 0.0, yerr=y.std or 0.0, fmt="o", color=color, capsize=3,
                    zorder=2)  # fmt: skip
        label = f"{row.label} [{row.backbone_name}]" if several_backbones else row.label
        ax.annotate(label[:40], (x.mean, y.mean), textcoords="offset points", xytext=(5, 4), fontsize=7)
    for method in methods:
        ax.scatter([], [], color=colors(methods.index(method) % 10), label=method)
    ax.grid(True, alpha=0.3)


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
