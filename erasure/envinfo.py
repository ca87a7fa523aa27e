"""What env.json records about the machine and software a run used."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = (
    "erasure-studio",
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "accelerate",
    "safetensors",
    "open-clip-torch",
    "torchmetrics",
    "pydantic",
    "numpy",
    "xformers",
)
REPO_ROOT = Path(__file__).resolve().parent.parent


def package_versions() -> dict[str, str | None]:
    """Installed version of each package in :data:`PACKAGES` (None if not installed)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo: Path = REPO_ROOT) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the source checkout, or None outside a git checkout."""
    try:
        sha = _git(repo, "rev-parse", "HEAD")
        dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": sha, "dirty": dirty}


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=10
    )
    return result.stdout.strip()


def cpu_info() -> dict[str, Any]:
    """The processor the run's timings come from: model name, vector ISA torch dispatches to, cores and threads.

    Wall times are only comparable on the same kind of machine (the SalUn job config's Ember erasure took 91 s on
    one 2-core machine and 279 s on another, with the same results), so every run records this beside its timings.
    """
    return {
        "model": _cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _cpu_model() -> str:
    """``model name`` of /proc/cpuinfo on Linux with its family and model numbers (which tell apart generations
    that share a name, e.g. ``AMD EPYC``), else what :func:`platform.processor` reports, else ``unknown``."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or "unknown"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor's block is enough
            continue
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def machine_label(env: dict[str, Any]) -> str | None:
    """A short name for the machine an env.json describes (the GPU when the run used one), or None if unknown."""
    if env.get("cuda_name"):
        return str(env["cuda_name"])
    cpu = env.get("cpu")
    if not isinstance(cpu, dict) or not cpu.get("model"):
        return None
    threads = cpu.get("torch_threads", "?")
    return f"{cpu['model']}, {cpu.get('capability', '?')}, {threads} thread{'' if threads == 1 else 's'}"


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "cpu": cpu_info()}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["cuda_name"] = torch.cuda.get_device_name(index)
        info["cuda_version"] = torch.version.cuda
    return info


def collect_env(device: torch.device, seed: int, timings: dict[str, float]) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "packages": package_versions(),
        **device_info(device),
        "seed": seed,
        "git": git_commit(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "timings_s": {key: round(value, 3) for key, value in timings.items()},
    }
