"""The runs directory as the playground sees it: finished runs by name, their summaries and metrics tables.

A run is asked for by name, never by path: :func:`open_run` accepts only the name of a finished run that is a
direct child of the runs directory (so ``../x``, ``/etc``, ``a/b`` and symlinks leading out are refused).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erasure.errors import UserError
from erasure.runs import LOG_FILE, METRICS_FILE, is_finished_run, read_run_config

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SUMMARY_COLUMNS = ["run", "finished", "backbone", "method", "target", "seed"]


class RunChoiceError(UserError):
    """A run name that is not a finished run of the runs directory."""


@dataclass(frozen=True)
class RunInfo:
    name: str
    path: Path
    finished: float
    """Modification time of metrics.json (when the run was committed)."""
    config: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def backbone(self) -> str:
        return str(self.config.get("backbone", "?"))

    @property
    def method(self) -> str:
        method = self.config.get("method")
        return str(method.get("name", "?")) if isinstance(method, dict) else "?"

    @property
    def target(self) -> str:
        return str(self.config.get("target", "?"))

    @property
    def seed(self) -> Any:
        return self.config.get("seed", "")


def list_runs(runs_dir: Path) -> list[RunInfo]:
    """Finished runs, newest first; unreadable ones are skipped."""
    if not runs_dir.is_dir():
        return []
    runs = []
    for path in runs_dir.iterdir():
        if (
            not _RUN_NAME.fullmatch(path.name)
            or not _directly_in(path, runs_dir)
            or not is_finished_run(path)
        ):
            continue
        try:
            runs.append(_read(path))
        except (UserError, OSError, ValueError):
            continue
    return sorted(runs, key=lambda run: (-run.finished, run.name))


def run_names(runs_dir: Path) -> list[str]:
    return [run.name for run in list_runs(runs_dir)]


def open_run(runs_dir: Path, name: object) -> RunInfo:
    """The finished run called ``name`` in ``runs_dir``; RunChoiceError for anything else."""
    if not isinstance(name, str) or not name:
        raise RunChoiceError("run: choose a finished run")
    shown = repr(name) if len(name) <= 80 else repr(name[:77]) + "..."
    if not _RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise RunChoiceError(f"run: got {shown}; must be the name of a run in the runs directory")
    path = runs_dir / name
    if not _directly_in(path, runs_dir) or not is_finished_run(path):
        raise RunChoiceError(f"run: got {shown}; no finished run of that name in the runs directory")
    return _read(path)


def summary_rows(runs: list[RunInfo]) -> list[list[Any]]:
    """One row per run under :data:`SUMMARY_COLUMNS`."""
    import time

    return [
        [
            run.name,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(run.finished)),
            run.backbone,
            run.method,
            run.target,
            run.seed,
        ]
        for run in runs
    ]


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"method": {"final_loss": 0.5}}`` → ``{"method.final_loss": 0.5}``; lists of numbers are kept as text."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_metrics(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = round(value, 6) if isinstance(value, float) and math.isfinite(value) else value
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


def metrics_rows(run: RunInfo) -> list[list[Any]]:
    """``[[metric, value], ...]`` of a run's metrics.json (an empty section shows as one row saying so)."""
    rows = [[name, value] for name, value in flat_metrics(run.metrics).items()]
    return rows or [["(no metrics)", ""]]


def read_log(run: RunInfo, max_chars: int = 20_000) -> str:
    path = run.path / LOG_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text[-max_chars:]


def _directly_in(path: Path, runs_dir: Path) -> bool:
    """``path`` (symlinks followed) is a direct child of ``runs_dir``: a link leading elsewhere is not a run here."""
    try:
        return path.resolve().parent == runs_dir.resolve()
    except OSError:
        return False


def _read(path: Path) -> RunInfo:
    metrics_path = path / METRICS_FILE
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    if not isinstance(metrics, dict):
        raise ValueError(f"{metrics_path}: not a JSON object")  # noqa: TRY004 - skipped like unreadable JSON
    return RunInfo(
        name=path.name,
        path=path,
        finished=metrics_path.stat().st_mtime,
        config=read_run_config(path),
        metrics=metrics,
    )
