"""Progress display of a batch (rich): one bar for the whole batch, one per worker for the cell it runs.

Cells report progress through the runner's ``echo`` lines (``step 3/250 loss=0.1``, about every 5 s); this module
turns them into bar updates. Every finished, skipped or failed cell is also printed as one plain line, so logs
of non-interactive runs (CI, ``nohup``) keep the whole story.
"""

from __future__ import annotations

import re
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from typing_extensions import Self

    from erasure.batch import CellOutcome

_STEP = re.compile(r"^step (\d+)/(\d+)")


def parse_step(line: str) -> tuple[int, int] | None:
    """``(step, total)`` of a runner progress line, or None for other lines."""
    match = _STEP.match(line)
    return (int(match.group(1)), int(match.group(2))) if match else None


class BatchProgress:
    """Use as a context manager; the batch calls :meth:`cell_started`, :meth:`cell_line` and :meth:`cell_done`."""

    def __init__(self, title: str, total: int, console: Console | None = None) -> None:
        self.console = console or Console()
        self._total = total
        self._done = 0
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )
        self._batch_task = self._progress.add_task(f"batch {title}", total=total)
        self._workers: dict[str, TaskID] = {}
        self._cells: dict[str, str] = {}

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def cell_started(self, worker: str, cell: str) -> None:
        task = self._workers.get(worker)
        self._cells[worker] = cell
        description = f"  {cell}"
        if task is None:
            self._workers[worker] = self._progress.add_task(description, total=None)
        else:
            self._progress.reset(task, description=description, total=None)

    def cell_line(self, worker: str, line: str) -> None:
        """A runner line: ``step i/n`` moves the cell's bar; other lines (evaluation phases) label it."""
        task = self._workers.get(worker)
        if task is None:
            return
        step = parse_step(line)
        if step is not None:
            self._progress.update(task, completed=step[0], total=step[1])
        elif not line.startswith("finished run:"):
            phase = " ".join(line.split())[:60]
            self._progress.update(task, description=f"  {self._cells.get(worker, '')} · {phase}")

    def cell_done(self, worker: str | None, outcome: CellOutcome) -> None:
        self._done += 1
        self._progress.advance(self._batch_task)
        task = self._workers.pop(worker, None) if worker is not None else None
        if task is not None:
            self._progress.remove_task(task)
        self.note(f"[{self._done}/{self._total}] {outcome.describe()}")

    def note(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
