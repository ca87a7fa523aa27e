"""Finding finished run folders and reading what the leaderboard needs from each: config facts and metrics."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erasure.envinfo import machine_label
from erasure.errors import UserError
from erasure.runs import ENV_FILE, METRICS_FILE, is_finished_run, read_run_config

_MISSING = object()


@dataclass(frozen=True)
class RunRecord:
    """One finished run, as the leaderboard sees it."""

    path: Path
    backbone: str
    method: str
    params: dict[str, Any]
    budget: str
    """The method parameters that differ from the method's defaults (``defaults`` if none), e.g. ``iterations=20``."""
    tier: str | None
    """The evaluation tier, or None when the run was not evaluated (no suites)."""
    target: str
    target_kind: str
    seed: int | None
    metrics: dict[str, float]
    """Finite numbers of metrics.json under dotted keys (``canvas.ua``, ``efficiency.erase_time_s``...)."""
    machine: str | None = None
    """The machine the run's timings come from (env.json), or None where env.json does not say."""


def find_runs(paths: list[Path]) -> list[Path]:
    """Finished run folders among ``paths`` and (recursively) below them; hidden folders are not searched."""
    found: dict[Path, None] = {}
    for path in paths:
        if not path.exists():
            raise UserError(f"{path}: no such file or folder")
        if not path.is_dir():
            raise UserError(f"{path}: not a folder (give run folders or folders that contain runs)")
        if is_finished_run(path):
            found[path.resolve()] = None
            continue
        for root, dirs, _files in os.walk(path):
            dirs.sort()
            keep = []
            for name in dirs:
                if name.startswith("."):
                    continue
                child = Path(root) / name
                if is_finished_run(child):
                    found[child.resolve()] = None
                else:
                    keep.append(name)
            dirs[:] = keep
    return list(found)


def read_record(run: Path) -> RunRecord:
    """The leaderboard facts of one finished run; UserError if its config or metrics cannot be read."""
    config = read_run_config(run)
    try:
        metrics = json.loads((run / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{run}: cannot read {METRICS_FILE}: {err}") from None
    method = config.get("method") or {}
    if not isinstance(method, dict) or not isinstance(method.get("name"), str):
        raise UserError(f"{run}: config.resolved.yaml has no method.name")
    params = method.get("params") or {}
    target = str(config.get("target", "text:?"))
    evaluate = config.get("evaluate") or {}
    suites = evaluate.get("suites") if isinstance(evaluate, dict) else None
    seed = config.get("seed")
    return RunRecord(
        path=run,
        backbone=str(config.get("backbone", "?")),
        method=method["name"],
        params=params if isinstance(params, dict) else {},
        budget=budget_label(method["name"], params if isinstance(params, dict) else {}),
        tier=str(evaluate.get("tier")) if suites else None,
        target=target,
        target_kind=target.partition(":")[0],
        seed=seed if isinstance(seed, int) else None,
        metrics=flatten_metrics(metrics),
        machine=read_machine(run),
    )


def read_machine(run: Path) -> str | None:
    """:func:`erasure.envinfo.machine_label` of the run's env.json; None when it is missing, unreadable or older
    than the machine fields (the leaderboard does not fail over a run's provenance)."""
    try:
        env = json.loads((run / ENV_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return machine_label(env) if isinstance(env, dict) else None


def flatten_metrics(metrics: Any) -> dict[str, float]:
    """Nested metrics.json → ``{"canvas.ua": 0.9, ...}``; a leading ``suites.`` is dropped; non-numbers skipped."""
    flat: dict[str, float] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node):
            flat[prefix.removeprefix("suites.")] = float(node)

    visit(metrics, "")
    return flat


def budget_label(method: str, params: dict[str, Any]) -> str:
    """``key=value`` for each parameter that differs from the registered method's default, else ``defaults``.

    A method that is not registered (any more) has no known defaults: then every parameter is listed.
    """
    defaults: dict[str, Any] = {}
    try:
        from erasure.registry import get_method

        defaults = get_method(method).Params().model_dump(mode="json")
    except Exception:  # noqa: BLE001 - unknown method or required params: list everything
        defaults = {}
    changed = [
        f"{key}={_compact(value)}"
        for key, value in sorted(params.items())
        if defaults.get(key, _MISSING) != value
    ]
    return ", ".join(changed) or "defaults"


def _compact(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)
