"""Run folders: ``runs/<name>/`` (or ``--out DIR``) with the artifacts of one erasure job.

Layout of a finished run::

    config.resolved.yaml   the validated job config, every default filled in
    env.json               package versions, python, device, seed, git commit, hostname, timings
    weights/<component>.safetensors   the changed tensors of each component (e.g. unet, text_encoder)
    metrics.json           written last; its presence marks a finished run
    samples/               images written by evaluation
    log.txt                what happened, with timestamps

A run is written under a hidden sibling name ``.<name>.partial-<pid>`` and renamed to its final name only when
complete, so a folder named like a run that holds ``metrics.json`` is always a finished run. A failed run's
partial folder is removed, and one left by a killed process is swept by the next run aimed at the same
destination. Resumable checkpoints go to ``.<name>.checkpoints`` next to it: kept when the run
fails, removed when it succeeds.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from erasure.errors import UserError
from erasure.io import atomic_write_json, atomic_write_text, load_tensors, save_tensors
from erasure.yamlfile import parse_yaml

if TYPE_CHECKING:
    from erasure.config import JobConfig

RUNS_DIR = Path("runs")
CONFIG_FILE = "config.resolved.yaml"
ENV_FILE = "env.json"
METRICS_FILE = "metrics.json"
LOG_FILE = "log.txt"
WEIGHTS_DIR = "weights"
SAMPLES_DIR = "samples"


def default_run_dir(name: str) -> Path:
    return RUNS_DIR / name


def is_finished_run(path: str | Path) -> bool:
    path = Path(path)
    return not path.name.startswith(".") and (path / METRICS_FILE).is_file()


def checkpoint_dir_for(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.checkpoints"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_partials(dest: Path) -> list[Path]:
    """Remove ``.<name>.partial-<pid>`` folders whose writer process is gone (a SIGKILLed job); return them.

    A live writer's folder is never touched, so two jobs aimed at the same destination do not disturb each other.
    """
    removed = []
    for partial in dest.parent.glob(f".{dest.name}.partial-*"):
        pid = partial.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
    return removed


def check_destination(dest: Path, overwrite: bool) -> None:
    """Refuse (UserError) to write a run where one already is, unless ``overwrite``; never replace other data."""
    if not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
        return
    if is_finished_run(dest):
        if overwrite:
            return
        raise UserError(
            f"{dest} already holds a finished run; pass --overwrite to replace it, "
            f"or write elsewhere with --out DIR or --set name=NEW_NAME"
        )
    raise UserError(
        f"{dest} exists and is not a run folder; choose another --out DIR (it is never overwritten)"
    )


class RunWriter:
    """Writes one run into its partial folder; :meth:`commit` makes it final. Use :meth:`open`."""

    def __init__(self, dest: Path, overwrite: bool) -> None:
        self.dest = dest
        self.overwrite = overwrite
        self.path = dest.parent / f".{dest.name}.partial-{os.getpid()}"
        self.checkpoint_dir = checkpoint_dir_for(dest)
        self.weights_dir = self.path / WEIGHTS_DIR
        self.samples_dir = self.path / SAMPLES_DIR
        self._committed = False

    @classmethod
    @contextmanager
    def open(cls, dest: str | Path, overwrite: bool = False) -> Iterator[RunWriter]:
        """Create the partial folder; remove it again if the block raises or does not :meth:`commit`."""
        dest = Path(dest)
        check_destination(dest, overwrite)
        remove_stale_partials(dest)
        writer = cls(dest, overwrite)
        if writer.path.exists():
            shutil.rmtree(writer.path)
        writer.weights_dir.mkdir(parents=True)
        writer.samples_dir.mkdir()
        try:
            yield writer
        finally:
            if not writer._committed:
                shutil.rmtree(writer.path, ignore_errors=True)

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path / LOG_FILE, "a", encoding="utf-8") as fh:
            fh.writelines(f"{stamp} {line}\n" for line in message.splitlines() or [""])

    def write_config(self, job: JobConfig) -> None:
        atomic_write_text(self.path / CONFIG_FILE, job.to_yaml())

    def write_env(self, env: dict[str, Any]) -> None:
        atomic_write_json(self.path / ENV_FILE, env)

    def save_weights(self, component: str, tensors: dict[str, torch.Tensor], *, full: bool = False) -> Path:
        """``weights/<component>.safetensors``; ``full`` records that it holds the whole component."""
        path = self.weights_dir / f"{component}.safetensors"
        save_tensors(
            path, tensors, metadata={"component": component, "content": "full" if full else "changed"}
        )
        return path

    def commit(self, metrics: dict[str, Any]) -> Path:
        """Write metrics.json, then atomically rename the partial folder to its final name."""
        atomic_write_json(self.path / METRICS_FILE, metrics)
        replaced: Path | None = None
        if self.dest.exists():
            if is_finished_run(self.dest) and self.overwrite:
                replaced = self.dest.parent / f".{self.dest.name}.replaced-{os.getpid()}"
                os.rename(self.dest, replaced)
            elif self.dest.is_dir() and not any(self.dest.iterdir()):
                self.dest.rmdir()
        try:
            os.rename(self.path, self.dest)
        except OSError as err:
            if replaced is not None:
                os.rename(replaced, self.dest)
            raise UserError(
                f"{self.dest}: cannot finish the run there ({err.strerror}); nothing was replaced"
            ) from err
        self._committed = True
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        return self.dest


# -------------------------------------------------------------------------------------------- reading runs


def open_finished_run(path: str | Path) -> Path:
    """``path`` if it is a finished run folder; UserError saying what is wrong otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such run folder")
    if not is_finished_run(path):
        raise UserError(f"{path}: not a finished run (no {METRICS_FILE})")
    return path


def read_run_config(run: str | Path) -> dict[str, Any]:
    """The raw mapping of a run's config.resolved.yaml (not re-validated: its method may be gone since)."""
    path = Path(run) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run}: missing {CONFIG_FILE}")
    data = parse_yaml(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a mapping")
    return data


def read_run_weights(run: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{component: {tensor name: tensor}}`` from a run's weights/*.safetensors."""
    weights = Path(run) / WEIGHTS_DIR
    return {path.stem: load_tensors(path)[0] for path in sorted(weights.glob("*.safetensors"))}
