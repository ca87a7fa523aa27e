"""UnlearnCanvas' efficiency columns (Zhang et al. 2024): erase time, peak memory, storage.

* ``erase_time_s`` -- wall-clock seconds of the erasure itself (model loading excluded);
* ``peak_mem_mb`` -- on CUDA, ``torch.cuda.max_memory_allocated`` during the erasure (the counter is reset when
  it starts); on the CPU, the process's peak resident set size (``resource.getrusage``; this peak covers the whole
  process up to the end of the erasure, model loading included, as the OS keeps no resettable counter);
* ``storage_mb`` -- size of the run's ``weights/`` folder (the extra disk an erased model needs).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

MB = 1024 * 1024


@dataclass
class Efficiency:
    erase_time_s: float = 0.0
    peak_mem_mb: float = 0.0
    storage_mb: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"erase_time_s": round(self.erase_time_s, 3), "peak_mem_mb": round(self.peak_mem_mb, 1),
                "storage_mb": round(self.storage_mb, 6)}


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024


@contextmanager
def measure_erasure(device: torch.device, into: Efficiency) -> Iterator[Efficiency]:
    """Time the block and record its peak memory into ``into``."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        yield into
    finally:
        if cuda:
            torch.cuda.synchronize(device)
        into.erase_time_s = time.perf_counter() - start
        into.peak_mem_mb = torch.cuda.max_memory_allocated(device) / MB if cuda else peak_rss_mb()


def folder_mb(folder: str | Path) -> float:
    """Total size of the files under ``folder`` in MB (0 if it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0.0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / MB
