"""Small, safe file helpers: atomic writes (temp file + ``os.replace``), safetensors I/O, pickle-free loading."""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from erasure.errors import UserError


class UnreadableFileError(UserError, ValueError):
    """A file that is not what it should be (a damaged or foreign safetensors file); also a ValueError, so
    callers that treat a damaged file as absent (caches) keep doing so."""


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically, else it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with _atomic_target(Path(path)) as tmp, open(tmp, "wb") as fh:
        _write_synced(fh, data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _write_synced(fh: IO[bytes], data: bytes) -> None:
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` to a safetensors file atomically (tensors are detached, made contiguous, moved to CPU)."""
    prepared = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    with _atomic_target(Path(path)) as tmp:
        save_file(prepared, str(tmp), metadata=metadata)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: its tensors (on CPU) and its string metadata; UserError if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open is not a dict
    except SafetensorError as err:
        raise UnreadableFileError(f"{path}: not a readable safetensors file ({_first_line(err)})") from None
    return tensors, metadata


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``); never runs pickled code.

    A file that needs arbitrary unpickling (a pickled model object, custom classes) is refused with a UserError
    that says so, instead of PyTorch's long UnpicklingError.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", UserWarning
            )  # "Detected pickle protocol N": the refusal says enough
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{path}: refusing to load: the file holds pickled Python objects beyond plain tensors "
            f"(torch.load weights_only=True: {unpickling_refusal(err)}); convert it to safetensors or a plain "
            "state dict"
        ) from err
    except (EOFError, RuntimeError) as err:
        raise UserError(f"{path}: not a readable torch checkpoint ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def unpickling_refusal(err: BaseException) -> str:
    """What PyTorch's weights-only unpickler refused, in a few words (its own message is a page long)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it references {found.group(1)}, which is not a tensor or plain container"
    found = re.search(r"Unsupported operand (\S+)", text)
    if found:
        return f"pickle opcode {found.group(1)} is not allowed: not a plain torch.save file of tensors"
    line = _first_line(Exception(text))
    return line if len(line) <= 160 else line[:157] + "..."
