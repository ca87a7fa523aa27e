"""Lock files that keep a batch cell from running twice at once, across processes and across ``accelerate`` ranks.

A lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and NFSv3+) holding JSON with
the owner's host, pid and process start time. A lock whose owner is gone is *stale*: same host, and the pid no
longer runs (or is a zombie, or now belongs to a process that started at another time). A stale lock is broken
under a short-lived guard directory (``mkdir`` is atomic too), after checking again that it is still the same
stale lock, so two processes never both break a lock and both take it. Locks of other hosts are never broken
automatically: their owner cannot be checked from here.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

GUARD_STALE_S = 30.0
"""A break guard older than this was left by a killed process and may be removed."""
UNWRITTEN_STALE_S = 10.0
"""A lock file that is still empty or unreadable after this long was left by a process killed while writing it."""


@dataclass(frozen=True)
class LockOwner:
    host: str
    pid: int
    start: str | None
    """The process start time as the kernel reports it (``/proc/<pid>/stat``), to tell pid reuse apart."""
    created: float

    def describe(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created))
        return f"pid {self.pid} on {self.host} since {stamp}"


def current_owner() -> LockOwner:
    pid = os.getpid()
    return LockOwner(host=socket.gethostname(), pid=pid, start=process_start(pid), created=time.time())


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of stat; fields[0] is field 3 (state)


def process_alive(pid: int, start: str | None) -> bool:
    """Whether ``pid`` runs on this host and, where known, is still the process that started at ``start``."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, it is just not ours
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    if state in ("Z", "X"):
        return False
    return start is None or process_start(pid) in (None, start)


class FileLock:
    """An exclusive lock file; :meth:`acquire` never waits (it returns False while someone else holds it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._owner: LockOwner | None = None

    @property
    def held(self) -> bool:
        return self._owner is not None

    def acquire(self) -> bool:
        """Take the lock; break it first if stale. False if a live process holds it."""
        if self._owner is not None:
            raise RuntimeError(f"{self.path} is already held by this object")
        for _ in range(3):
            if self._try_create():
                return True
            if not self._break_if_stale():
                return False
        return False

    def release(self) -> None:
        """Remove the lock file if it is still ours (it may have been broken by hand meanwhile)."""
        owner, self._owner = self._owner, None
        if owner is None:
            return
        if read_owner(self.path) == owner:
            self.path.unlink(missing_ok=True)

    def owner(self) -> LockOwner | None:
        """Who holds the lock now (None if nobody, or if the file cannot be read yet)."""
        return read_owner(self.path)

    def __enter__(self) -> Self:
        if not self.acquire():
            owner = self.owner()
            holder = owner.describe() if owner else "another process"
            raise BlockingIOError(f"{self.path} is held by {holder}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------------------------------- internals

    def _try_create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        owner = current_owner()
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(_owner_json(owner), fh)
            fh.flush()
            os.fsync(fh.fileno())
        self._owner = owner
        return True

    def _break_if_stale(self) -> bool:
        """Remove the lock file if it is stale; True if the lock may now be free (gone or removed)."""
        if not self._is_stale(self._snapshot()):
            return False
        guard = self.path.with_name(self.path.name + ".break")
        try:
            guard.mkdir()
        except FileExistsError:
            guard_age = _age(guard)
            if guard_age is not None and guard_age > GUARD_STALE_S:
                _remove_dir(guard)
            return False
        try:
            snapshot = self._snapshot()  # look again under the guard: it may have been replaced meanwhile
            if snapshot is None:
                return True
            if self._is_stale(snapshot):
                self.path.unlink(missing_ok=True)
                return True
            return False
        finally:
            _remove_dir(guard)

    def _snapshot(self) -> tuple[LockOwner | None, float] | None:
        """(owner or None if unreadable, file age in s); None if there is no lock file."""
        age = _age(self.path)
        if age is None:
            return None
        return read_owner(self.path), age

    @staticmethod
    def _is_stale(snapshot: tuple[LockOwner | None, float] | None) -> bool:
        if snapshot is None:
            return True
        owner, age = snapshot
        if owner is None:
            return age > UNWRITTEN_STALE_S
        if owner.host != socket.gethostname():
            return False
        return not process_alive(owner.pid, owner.start)


def read_owner(path: Path) -> LockOwner | None:
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        return LockOwner(
            host=str(data["host"]),
            pid=int(data["pid"]),
            start=data.get("start"),
            created=float(data["created"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lock_is_held(path: Path) -> LockOwner | None:
    """The live owner of the lock file at ``path``, or None if it is free or stale."""
    owner = read_owner(path)
    if owner is None:
        return None
    if owner.host == socket.gethostname() and not process_alive(owner.pid, owner.start):
        return None
    return owner


def _owner_json(owner: LockOwner) -> dict[str, Any]:
    return {"host": owner.host, "pid": owner.pid, "start": owner.start, "created": owner.created}


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return None


def _remove_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
