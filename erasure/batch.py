"""``erasure-studio batch``: run every cell of a benchmark, skipping finished ones, resuming interrupted ones.

Layout of ``--out DIR``::

    benchmark.resolved.yaml       the validated benchmark config
    batch-summary.json            status of every cell (finished / failed / running / pending), errors, timings
    <method>-<target>-s<seed>-<hash8>/     one ordinary run folder per finished cell
    .<cell>.lock                  held while a process runs the cell (see :mod:`erasure.locks`)
    .<cell>.checkpoints/          the runner's resumable checkpoints of an interrupted cell
    .<cell>.error.json            the error of the cell's last failed attempt (removed when it succeeds)

A cell is run under its lock; a finished cell (its run folder has ``metrics.json``) is skipped without loading
anything. A killed cell leaves its lock (stale once the process is gone), a ``.<cell>.partial-<pid>`` folder and
its checkpoints; the next batch breaks the stale lock, removes the partial folder and reruns the cell, which
resumes from the checkpoints. A failing cell is recorded with its error and the batch goes on with the others.

Scale-out: ``processes > 1`` runs cells in that many worker processes (spawned, so CUDA works in them). Under
``accelerate launch`` (or ``torchrun``) every process reads ``RANK``/``WORLD_SIZE`` and takes the cells whose
index modulo ``WORLD_SIZE`` is its rank, on the GPU of its ``LOCAL_RANK``; the locks keep any overlap (two batches
on the same folder) from running a cell twice.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from erasure.batch_progress import BatchProgress
from erasure.benchmark import Benchmark, Cell
from erasure.io import atomic_write_json, atomic_write_text
from erasure.locks import FileLock, lock_is_held
from erasure.runs import is_finished_run

SUMMARY_FILE = "batch-summary.json"
BENCHMARK_FILE = "benchmark.resolved.yaml"

Attempt = Literal["ran", "skipped", "failed", "busy"]
Echo = Callable[[str], None]


@dataclass
class CellOutcome:
    """What this process did with one cell."""

    name: str
    attempt: Attempt
    seconds: float = 0.0
    error: str | None = None
    holder: str | None = None
    """For ``busy``: who holds the cell's lock."""

    def describe(self) -> str:
        if self.attempt == "ran":
            return f"finished {self.name} in {self.seconds:.1f} s"
        if self.attempt == "skipped":
            return f"skipped {self.name} (already finished)"
        if self.attempt == "busy":
            return f"left {self.name}: it is running in {self.holder or 'another process'}"
        return f"FAILED {self.name} after {self.seconds:.1f} s: {self.error}"


@dataclass
class BatchResult:
    summary_path: Path
    outcomes: list[CellOutcome]
    summary: dict[str, Any] = field(default_factory=dict)

    def count(self, attempt: Attempt) -> int:
        return sum(outcome.attempt == attempt for outcome in self.outcomes)

    @property
    def failed(self) -> list[CellOutcome]:
        return [outcome for outcome in self.outcomes if outcome.attempt == "failed"]


# ------------------------------------------------------------------------------------------ file names


def lock_path(out: Path, name: str) -> Path:
    return out / f".{name}.lock"


def error_path(out: Path, name: str) -> Path:
    return out / f".{name}.error.json"


# ------------------------------------------------------------------------------------------ ranks


def distributed_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process under accelerate/torchrun (their env variables), else ``(0, 1)``."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0, 1
    if world < 1 or not 0 <= rank < world:
        return 0, 1
    return rank, world


def cells_for_rank(cells: list[Cell], rank: int, world: int) -> list[Cell]:
    """The cells process ``rank`` of ``world`` runs: every ``world``-th, starting at index ``rank``."""
    return cells[rank::world]


@contextmanager
def quiet_library_progress() -> Iterator[None]:
    """Silence the loading bars of diffusers and transformers while the batch shows its own progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    modules = [diffusers_logging, transformers_logging]
    were_enabled = [module.is_progress_bar_enabled() for module in modules]
    for module in modules:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in zip(modules, were_enabled, strict=True):
            if enabled:
                module.enable_progress_bar()


def use_local_gpu() -> None:
    """Under a launcher, make ``cuda`` mean this process's GPU (``LOCAL_RANK``); nothing otherwise."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None:
        return
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        torch.cuda.set_device(int(local_rank) % torch.cuda.device_count())


# ------------------------------------------------------------------------------------------ one cell


def run_cell(cell: Cell, out: Path, echo: Echo) -> CellOutcome:
    """Run one cell under its lock: skip it if finished, rerun it (resuming) if interrupted, record failures."""
    dest = out / cell.name
    if is_finished_run(dest):
        return CellOutcome(cell.name, "skipped")
    lock = FileLock(lock_path(out, cell.name))
    if not lock.acquire():
        owner = lock.owner()
        return CellOutcome(cell.name, "busy", holder=owner.describe() if owner else None)
    started = time.perf_counter()
    try:
        if is_finished_run(dest):  # finished by another process between the first check and the lock
            return CellOutcome(cell.name, "skipped")
        _remove_partial_folders(out, cell.name)
        from erasure.runner import run_erase

        run_erase(cell.job, dest, overwrite=False, echo=echo)
        error_path(out, cell.name).unlink(missing_ok=True)
        return CellOutcome(cell.name, "ran", seconds=time.perf_counter() - started)
    except Exception as err:  # noqa: BLE001 - a failed cell is reported and the batch goes on
        seconds = time.perf_counter() - started
        message = _one_line(err)
        atomic_write_json(
            error_path(out, cell.name),
            {
                "cell": cell.name,
                "error": message,
                "traceback": traceback.format_exc(),
                "failed_at": _now(),
                "seconds": round(seconds, 3),
            },
        )
        return CellOutcome(cell.name, "failed", seconds=seconds, error=message)
    finally:
        lock.release()


def _remove_partial_folders(out: Path, name: str) -> None:
    """Remove partial run folders left by killed attempts (only called while holding the cell's lock)."""
    for partial in out.glob(f".{name}.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ------------------------------------------------------------------------------------------ the batch


def run_batch(
    bench: Benchmark, out: Path, *, processes: int = 1, progress: BatchProgress | None = None
) -> BatchResult:
    """Run this process's share of the benchmark's cells into ``out`` and write the batch summary."""
    if processes < 1:
        raise ValueError("processes must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / BENCHMARK_FILE, bench.to_yaml())
    rank, world = distributed_rank()
    mine = cells_for_rank(bench.cells, rank, world)
    title = bench.config.name + (f" (rank {rank} of {world})" if world > 1 else "")
    display = progress or BatchProgress(title, len(mine))
    started = time.time()
    outcomes: list[CellOutcome] = []
    with display:
        pending: list[Cell] = []
        for cell in mine:
            if is_finished_run(out / cell.name):
                outcome = CellOutcome(cell.name, "skipped")
                outcomes.append(outcome)
                display.cell_done(None, outcome)
            else:
                pending.append(cell)
        if pending:
            use_local_gpu()
            with quiet_library_progress():
                if processes == 1 or len(pending) == 1:
                    outcomes += _run_here(pending, out, display)
                else:
                    outcomes += _run_in_pool(pending, out, min(processes, len(pending)), display)
    summary = build_summary(bench, out, outcomes, started=started, rank=rank, world=world)
    summary_path = out / SUMMARY_FILE
    atomic_write_json(summary_path, summary)
    return BatchResult(summary_path=summary_path, outcomes=outcomes, summary=summary)


def _run_here(cells: list[Cell], out: Path, display: BatchProgress) -> list[CellOutcome]:
    outcomes = []
    for cell in cells:
        display.cell_started("main", cell.name)
        outcome = run_cell(cell, out, lambda line: display.cell_line("main", line))
        outcomes.append(outcome)
        display.cell_done("main", outcome)
    return outcomes


# --------------------------------------------------------------------------------------- worker processes

_worker_queue: Any = None


def _init_worker(queue: Any, method_classes: list[type], threads: int) -> None:
    """Worker start: report to ``queue``, know the parent's methods (plugins too), share the CPU cores fairly."""
    global _worker_queue
    _worker_queue = queue
    import torch

    from erasure.registry import list_methods, register_method

    known = set(list_methods())
    for cls in method_classes:
        if getattr(cls, "name", None) not in known:
            register_method(cls)
    torch.set_num_threads(threads)
    use_local_gpu()
    quiet_library_progress().__enter__()  # for the worker's whole life


def _run_cell_in_worker(job_data: dict[str, Any], key: str, out: str) -> CellOutcome:
    from erasure.config import JobConfig

    cell = Cell(job=JobConfig.model_validate(job_data), key=key)
    worker = str(os.getpid())
    _worker_queue.put(("started", worker, cell.name))
    return run_cell(cell, Path(out), lambda line: _worker_queue.put(("line", worker, line)))


def _run_in_pool(cells: list[Cell], out: Path, processes: int, display: BatchProgress) -> list[CellOutcome]:
    from erasure.registry import get_method, list_methods

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // processes)
    methods = [get_method(name) for name in list_methods()]
    relay = threading.Thread(target=_relay_progress, args=(queue, display), daemon=True)
    relay.start()
    outcomes: list[CellOutcome] = []
    try:
        with ProcessPoolExecutor(
            max_workers=processes,
            mp_context=context,
            initializer=_init_worker,
            initargs=(queue, methods, threads),
        ) as pool:
            futures: dict[Future[CellOutcome], Cell] = {
                pool.submit(_run_cell_in_worker, cell.job.model_dump(mode="json"), cell.key, str(out)): cell
                for cell in cells
            }
            for future in as_completed(futures):
                cell = futures[future]
                try:
                    outcome = future.result()
                except Exception as err:  # noqa: BLE001 - e.g. a worker killed by the OS
                    outcome = CellOutcome(cell.name, "failed", error=f"worker process died: {_one_line(err)}")
                outcomes.append(outcome)
                queue.put(("done", outcome))
    finally:
        queue.put(None)
        relay.join(timeout=10)
    return outcomes


def _relay_progress(queue: Any, display: BatchProgress) -> None:
    """Parent thread: forward worker events to the display (the display is only touched from here)."""
    running: dict[str, str] = {}
    while True:
        event = queue.get()
        if event is None:
            return
        kind = event[0]
        if kind == "started":
            _, worker, name = event
            running[name] = worker
            display.cell_started(worker, name)
        elif kind == "line":
            _, worker, line = event
            display.cell_line(worker, line)
        elif kind == "done":
            outcome: CellOutcome = event[1]
            display.cell_done(running.pop(outcome.name, None), outcome)


# ------------------------------------------------------------------------------------------ summary


def cell_state(out: Path, cell: Cell) -> dict[str, Any]:
    """A cell's status as the output folder shows it: finished, running, failed or pending."""
    dest = out / cell.name
    entry: dict[str, Any] = {"status": "pending"}
    if is_finished_run(dest):
        return {"status": "finished", "run": str(dest)}
    owner = lock_is_held(lock_path(out, cell.name))
    if owner is not None:
        entry = {"status": "running", "holder": owner.describe()}
    error_file = error_path(out, cell.name)
    if error_file.is_file():
        try:
            error = json.loads(error_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            error = {"error": f"unreadable {error_file.name}"}
        if entry["status"] == "pending":
            entry["status"] = "failed"
        entry["error"] = error.get("error")
        entry["failed_at"] = error.get("failed_at")
    return entry


def build_summary(
    bench: Benchmark,
    out: Path,
    outcomes: list[CellOutcome],
    *,
    started: float,
    rank: int,
    world: int,
) -> dict[str, Any]:
    by_name = {outcome.name: outcome for outcome in outcomes}
    cells = []
    for cell in bench.cells:
        job = cell.job
        entry: dict[str, Any] = {
            "name": cell.name,
            "backbone": job.backbone,
            "method": job.method.name,
            "params": job.method.params.model_dump(mode="json"),
            "target": job.target.spec,
            "seed": job.seed,
            "key": cell.key,
            **cell_state(out, cell),
        }
        outcome = by_name.get(cell.name)
        if outcome is not None:
            entry["this_batch"] = outcome.attempt
            if outcome.attempt in ("ran", "failed"):
                entry["seconds"] = round(outcome.seconds, 3)
            if outcome.error is not None:
                entry["error"] = outcome.error
        cells.append(entry)
    counts: dict[str, int] = {}
    for entry in cells:
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    return {
        "benchmark": bench.config.name,
        "config": bench.source,
        "out": str(out),
        "rank": rank,
        "world_size": world,
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "finished": _now(),
        "wall_s": round(time.time() - started, 3),
        "counts": counts,
        "cells": cells,
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
