"""Grouping runs into leaderboard rows (backbone, method, budget, tier) and averaging each column over them."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from erasure.leaderboard.columns import Column, leaderboard_columns
from erasure.leaderboard.records import RunRecord

MISSING = "—"


@dataclass(frozen=True)
class Stat:
    """Mean and spread of one metric over the runs of a row that measured it."""

    mean: float
    std: float | None
    """Sample standard deviation (n - 1); None for a single value."""
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat | None:
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(mean=statistics.fmean(values), std=std, min=min(values), max=max(values), n=len(values))


@dataclass
class Row:
    backbone: str
    method: str
    budget: str
    params: dict[str, object]
    tier: str | None
    runs: list[RunRecord] = field(default_factory=list)
    stats: dict[str, Stat | None] = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        return sorted({run.target for run in self.runs})

    @property
    def seeds(self) -> list[int]:
        return sorted({run.seed for run in self.runs if run.seed is not None})

    @property
    def machines(self) -> list[str]:
        """The machines the row's runs were timed on (those whose env.json names one)."""
        return sorted({run.machine for run in self.runs if run.machine is not None})

    @property
    def label(self) -> str:
        return f"{self.method} ({self.budget})" if self.budget != "defaults" else self.method

    @property
    def backbone_name(self) -> str:
        """The backbone as shown: a registered name, or the last part of a path."""
        return Path(self.backbone).name if ("/" in self.backbone or "\\" in self.backbone) else self.backbone


@dataclass
class Leaderboard:
    columns: list[Column]
    rows: list[Row]


def build_table(runs: list[RunRecord]) -> Leaderboard:
    """One row per (backbone, method, params, tier), with a :class:`Stat` (or None) for every column."""
    columns = leaderboard_columns(runs)
    groups: dict[tuple[str, str, str, str | None], Row] = {}
    for run in runs:
        key = (run.backbone, run.method, json.dumps(run.params, sort_keys=True), run.tier)
        row = groups.get(key)
        if row is None:
            row = groups[key] = Row(run.backbone, run.method, run.budget, run.params, run.tier)
        row.runs.append(run)
    rows = sorted(groups.values(), key=lambda r: (r.backbone_name, r.method, r.budget, r.tier or ""))
    for row in rows:
        for column in columns:
            values = [
                v for v in (column.value(run) for run in row.runs) if v is not None and math.isfinite(v)
            ]
            row.stats[column.id] = Stat.of(values)
    return Leaderboard(columns=columns, rows=rows)


def run_mean(row: Row, key: str, scale: float = 1.0) -> Stat | None:
    """Stat of one metrics.json key over all runs of a row (both target kinds), for the plots."""
    return Stat.of([run.metrics[key] * scale for run in row.runs if key in run.metrics])


def retain_stat(row: Row) -> Stat | None:
    """Stat over the row's runs of mean(IRA, CRA) in %, for runs that have both."""
    values = [
        50.0 * (run.metrics["canvas.ira"] + run.metrics["canvas.cra"])
        for run in row.runs
        if "canvas.ira" in run.metrics and "canvas.cra" in run.metrics
    ]
    return Stat.of(values)


def format_number(value: float, column: Column) -> str:
    if column.decimals is None:
        return f"{value:.4g}"
    return f"{value:.{column.decimals}f}"


def format_stat(stat: Stat | None, column: Column, row_runs: int) -> str:
    """``mean ± std`` (``(n=k)`` when fewer runs than the row's stand behind it), or ``—`` when not measured."""
    if stat is None:
        return MISSING
    text = format_number(stat.mean, column)
    if stat.std is not None:
        text += f" ± {format_number(stat.std, column)}"
    if stat.n != row_runs:
        text += f" (n={stat.n})"
    return text
