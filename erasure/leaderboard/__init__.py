"""``erasure-studio leaderboard``: rank finished runs (see :func:`write_leaderboard`).

Modules: :mod:`.records` finds run folders and reads them, :mod:`.columns` defines the metric columns,
:mod:`.table` groups and averages, :mod:`.render` writes Markdown/CSV/HTML, :mod:`.plots` the PNGs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from erasure.errors import UserError
from erasure.io import atomic_write_text
from erasure.leaderboard.plots import PARETO_FILE, TIME_MEMORY_FILE, write_pareto_plot, write_time_memory_plot
from erasure.leaderboard.records import RunRecord, find_runs, read_record
from erasure.leaderboard.render import read_images, render_csv, render_html, render_markdown
from erasure.leaderboard.table import Leaderboard, build_table

MARKDOWN_FILE = "leaderboard.md"
CSV_FILE = "leaderboard.csv"
HTML_FILE = "leaderboard.html"


@dataclass
class LeaderboardResult:
    board: Leaderboard
    files: list[Path]
    skipped: list[str]
    """One line per run folder that could not be read."""


def write_leaderboard(
    paths: list[Path], out: Path, *, warn: Callable[[str], None] = print
) -> LeaderboardResult:
    """Read every finished run under ``paths`` and write the leaderboard files and plots into ``out``."""
    folders = find_runs(paths)
    if not folders:
        raise UserError(f"no finished run folders (with metrics.json) in {', '.join(str(p) for p in paths)}")
    records: list[RunRecord] = []
    skipped: list[str] = []
    for folder in folders:
        try:
            records.append(read_record(folder))
        except UserError as err:
            skipped.append(str(err))
            warn(f"skipping {err}")
    if not records:
        raise UserError(f"none of the {len(folders)} run folders could be read")
    board = build_table(records)
    out.mkdir(parents=True, exist_ok=True)
    plots = [
        write_pareto_plot(board, out / PARETO_FILE),
        write_time_memory_plot(board, out / TIME_MEMORY_FILE),
    ]
    plot_names = [plot.name for plot in plots]
    files = [out / MARKDOWN_FILE, out / CSV_FILE, out / HTML_FILE]
    atomic_write_text(files[0], render_markdown(board, plot_names))
    atomic_write_text(files[1], render_csv(board))
    atomic_write_text(files[2], render_html(board, read_images(out, plot_names)))
    return LeaderboardResult(board=board, files=[*files, *plots], skipped=skipped)
