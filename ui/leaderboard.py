"""The leaderboard tab: the studio leaderboard (:mod:`erasure.leaderboard`) of the runs directory's finished runs.

The table is the one ``erasure-studio leaderboard`` writes as Markdown: one row per (backbone, method, budget,
tier), each metric column as ``mean ± std`` over the row's runs. If that package cannot be imported (it is
optional for the playground), the tab falls back to :func:`simple_table`, one row per run with its metrics.json
numbers, and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from erasure.errors import UserError
from ui.run_index import RunInfo, flat_metrics, list_runs

Table = tuple[list[str], list[list[Any]]]


def leaderboard(runs_dir: Path) -> tuple[Table, str]:
    """``((columns, rows), source)`` for the finished runs directly in ``runs_dir``."""
    runs = list_runs(runs_dir)
    try:
        return studio_table(runs), "the studio leaderboard (rows: backbone × method × budget × tier)"
    except ImportError:
        return simple_table(runs), "one row per run (the studio leaderboard module is not available)"


def studio_table(runs: list[RunInfo]) -> Table:
    """The studio leaderboard's rows and columns (ImportError if :mod:`erasure.leaderboard` is missing)."""
    from erasure.leaderboard.records import read_record
    from erasure.leaderboard.render import ROW_HEADERS
    from erasure.leaderboard.table import MISSING, build_table, format_stat

    records = []
    for run in runs:
        try:
            records.append(read_record(run.path))
        except UserError:
            continue
    board = build_table(records)
    columns = [*ROW_HEADERS, *(column.header() for column in board.columns)]
    rows = []
    for row in board.rows:
        facts = [
            row.backbone_name,
            row.method,
            row.budget,
            row.tier or MISSING,
            str(len(row.runs)),
            str(len(row.targets)),
            str(len(row.seeds)) if row.seeds else MISSING,
        ]
        stats = [format_stat(row.stats[column.id], column, len(row.runs)) for column in board.columns]
        rows.append(facts + stats)
    return list(columns), rows


def simple_table(runs: list[RunInfo]) -> Table:
    """Runs as rows: identity columns, then every numeric metric any run has (sorted); newest run first."""
    flats = [
        {k: v for k, v in flat_metrics(run.metrics).items() if isinstance(v, (int, float))} for run in runs
    ]
    metric_names = sorted({name for flat in flats for name in flat})
    columns = ["run", "backbone", "method", "target", *metric_names]
    rows = [
        [run.name, run.backbone, run.method, run.target, *(flat.get(name, "") for name in metric_names)]
        for run, flat in zip(runs, flats)
    ]
    return columns, rows
