"""Device names accepted in configs (``cpu``, ``cuda``, ``cuda:N``, ``auto``): validation and resolution."""

from __future__ import annotations

import re

import torch

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"
_CUDA = re.compile(r"cuda(?::(\d+))?")


def check_device(value: str) -> str:
    """Return ``value`` if it names a device usable on this machine; ValueError with the reason otherwise."""
    if value in ("cpu", "auto"):
        return value
    match = _CUDA.fullmatch(value)
    if match is None:
        raise ValueError(f"must be {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine; use cpu or auto")
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise ValueError(f"this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    return value


def resolve_device(value: str) -> torch.device:
    """The torch device for a validated config value; ``auto`` picks ``cuda`` when available, else ``cpu``."""
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(value)
