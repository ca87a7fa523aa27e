"""Erasure jobs of the playground: each runs :func:`erasure.runner.run_erase` in a background thread.

A job's state (progress, log tail, result) is read by the request that started it, which streams it to the page.
:meth:`JobManager.cancel` sets the job's cancel event: the runner stops at the method's next progress report and
removes the partial run folder and its checkpoints, so a cancelled (or timed-out, or failed) job leaves no half
run in the runs directory (a failed job's checkpoints are removed here: a playground run is never resumed).
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from erasure.config import JobConfig
from erasure.errors import UserError
from erasure.runner import JobCancelled, run_erase
from erasure.runs import checkpoint_dir_for

JobStatus = Literal["running", "finished", "failed", "cancelled"]
LOG_LINES = 200


class BusyError(UserError):
    """Too many jobs are running; the request may be retried later."""


@dataclass
class JobState:
    """What the page shows about one job; updated by the job's thread, read by the request streaming it."""

    id: str
    run_name: str
    dest: Path
    deadline: float
    status: JobStatus = "running"
    step: int = 0
    total: int = 0
    scalars: dict[str, float] = field(default_factory=dict)
    log: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    error: str | None = None
    cancel_reason: str | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total > 0 else 0.0

    def summary(self) -> str:
        """One line: status, progress, last scalars, elapsed time."""
        elapsed = (self.ended or time.monotonic()) - self.started
        if self.status == "running":
            progress = f"step {self.step}/{self.total}" if self.total else "preparing"
            values = " ".join(f"{key}={value:.4g}" for key, value in self.scalars.items())
            return f"running: {progress} {values}".rstrip() + f" ({elapsed:.0f} s)"
        if self.status == "finished":
            return f"finished in {elapsed:.0f} s: run {self.run_name}"
        if self.status == "cancelled":
            return f"cancelled ({self.cancel_reason or 'by request'}) after {elapsed:.0f} s; no run was kept"
        return f"failed after {elapsed:.0f} s: {self.error}"


class JobManager:
    """Starts, tracks and cancels erasure jobs; at most ``max_running`` run at once."""

    def __init__(self, max_running: int, max_seconds: float, max_kept: int = 100) -> None:
        self._max_running = max_running
        self._max_seconds = max_seconds
        self._max_kept = max_kept
        self._jobs: dict[str, JobState] = {}
        self._lock = threading.Lock()

    def start(self, job: JobConfig, dest: Path) -> JobState:
        """Start ``job`` writing to ``dest`` in a new thread; BusyError if ``max_running`` jobs already run."""
        with self._lock:
            running = sum(1 for state in self._jobs.values() if state.status == "running")
            if running >= self._max_running:
                raise BusyError(f"{running} erasure job(s) already running; try again when one has finished")
            self._forget_old()
            state = JobState(
                id=uuid.uuid4().hex,
                run_name=dest.name,
                dest=dest,
                deadline=time.monotonic() + self._max_seconds,
            )
            self._jobs[state.id] = state
        thread = threading.Thread(
            target=self._run, args=(state, job), name=f"erase-{state.id[:8]}", daemon=True
        )
        thread.start()
        return state

    def get(self, job_id: str) -> JobState | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str, reason: str = "by request") -> bool:
        """Ask a running job to stop; False if there is no such running job."""
        state = self.get(job_id)
        if state is None or state.status != "running":
            return False
        state.cancel_reason = state.cancel_reason or reason
        state.cancel_event.set()
        return True

    def running(self) -> list[JobState]:
        with self._lock:
            return [state for state in self._jobs.values() if state.status == "running"]

    def cancel_all(self) -> None:
        with self._lock:
            ids = list(self._jobs)
        for job_id in ids:
            self.cancel(job_id, "the server is stopping")

    def _run(self, state: JobState, job: JobConfig) -> None:
        def on_progress(step: int, total: int, scalars: dict[str, float]) -> None:
            state.step, state.total, state.scalars = step, total, scalars
            if time.monotonic() > state.deadline and not state.cancel_event.is_set():
                state.cancel_reason = f"time limit of {self._max_seconds:.0f} s reached"
                state.cancel_event.set()

        try:
            run_erase(
                job, state.dest, echo=state.log.append, on_progress=on_progress, cancel=state.cancel_event
            )
        except JobCancelled:
            state.status = "cancelled"
        except UserError as err:
            state.error = str(err)
            state.status = "failed"
        except Exception as err:  # noqa: BLE001 - a job's failure is reported on the page, never crashes the server
            state.error = f"internal error: {type(err).__name__}: {err}"
            state.status = "failed"
        else:
            state.status = "finished"
        finally:
            if state.status != "finished":
                # A playground run has a fresh name and is never resumed: its checkpoints would only be litter.
                shutil.rmtree(checkpoint_dir_for(state.dest), ignore_errors=True)
            state.ended = time.monotonic()
            state.done.set()

    def _forget_old(self) -> None:
        """Drop the oldest ended jobs beyond ``max_kept`` (called with the lock held)."""
        ended = sorted((s for s in self._jobs.values() if s.status != "running"), key=lambda s: s.started)
        for state in ended[: max(0, len(self._jobs) - self._max_kept)]:
            del self._jobs[state.id]
