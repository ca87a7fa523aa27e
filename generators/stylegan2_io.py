"""Checkpoint I/O for the StyleGAN2 backbone: safe rosinality ``.pt`` loading and safetensors files.

* rosinality ``.pt`` files (from ``train.py`` or ``convert_weight.py`` of rosinality/stylegan2-pytorch) are read
  **only** through ``torch.load(path, map_location="cpu", weights_only=True)``. Anything that would need code to
  be unpickled is refused with :class:`UnsafeCheckpointError`. The only non-tensor class allowed is
  ``argparse.Namespace``, a plain attribute bag that rosinality's ``train.py`` stores under ``"args"``; it is
  rebuilt without calling any of its methods.
* The architecture (size, style_dim, n_mlp, channel table / channel multiplier) is inferred from tensor shapes,
  so a checkpoint loads without a user-given config.
* Generators are shipped as safetensors with the JSON config in the file metadata.

All writes are atomic: the file is written next to its destination and moved into place with ``os.replace``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from erasure.io import unpickling_refusal
from generators.stylegan2 import (
    Discriminator,
    DiscriminatorConfig,
    Generator,
    StyleGAN2Config,
    rosinality_channels,
)

__all__ = [
    "GENERATOR_SAFETENSORS_FORMAT",
    "CheckpointFormatError",
    "RosinalityCheckpoint",
    "UnsafeCheckpointError",
    "atomic_path",
    "infer_discriminator_config",
    "infer_generator_config",
    "load_generator_safetensors",
    "load_rosinality_checkpoint",
    "read_rosinality_checkpoint",
    "save_generator_safetensors",
    "save_rosinality_checkpoint",
]

GENERATOR_SAFETENSORS_FORMAT = "erasure-studio/stylegan2-generator/v1"
"""Value of the ``format`` metadata key in generator safetensors files."""

_SAFE_PICKLE_CLASSES: list[Any] = [argparse.Namespace]


class CheckpointFormatError(ValueError):
    """The checkpoint was read safely but does not have the expected StyleGAN2 structure."""


class UnsafeCheckpointError(ValueError):
    """The checkpoint needs arbitrary code to be unpickled and was refused."""


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the destination directory; on success move it onto ``path`` atomically.

    On error the temporary file is removed and ``path`` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------------------------------------------
# rosinality .pt
# ---------------------------------------------------------------------------------------------------------------


def read_rosinality_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a rosinality ``.pt`` dict safely (``weights_only=True``); refuse pickled code.

    Raises:
        UnsafeCheckpointError: the file needs unpickling of code (or of a class that is not allow-listed).
        CheckpointFormatError: the file is not a readable torch checkpoint holding a dict.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_SAFE_PICKLE_CLASSES), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol N": the refusal says enough
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it needs unpickling of code or of classes other than tensors and "
            f"plain containers, which could execute arbitrary code. Only weights-only checkpoints are "
            f"accepted; re-save the state dicts with torch.save or convert to safetensors ({unpickling_refusal(exc)})"
        ) from exc
    except RuntimeError as exc:
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise UnsafeCheckpointError(
                f"refusing to load {path}: the weights-only unpickler rejected it ({unpickling_refusal(exc)})"
            ) from exc
        raise CheckpointFormatError(f"could not read {path} as a torch checkpoint: {_first_line(exc)}") from exc
    except EOFError as exc:
        raise CheckpointFormatError(f"could not read {path} as a torch checkpoint: it ends early (empty?)") from exc
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{path} holds a {type(data).__name__}, expected a dict of state dicts")
    return data


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _strip_module_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop a DataParallel/DistributedDataParallel ``module.`` prefix if every key carries it."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module.") :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _indices(state_dict: Mapping[str, Tensor], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in state_dict if (m := regex.fullmatch(key))})


def _multiplier_or_channels(channels: dict[int, int], size: int) -> tuple[int, dict[int, int] | None]:
    """Express a channel table as a rosinality channel multiplier when possible, else as an explicit override."""
    candidates = [2] if size < 64 else [max(1, channels[size] * size // 16384)]
    for multiplier in candidates:
        table = rosinality_channels(multiplier)
        if all(table.get(res) == ch for res, ch in channels.items()):
            return multiplier, None
    return 2, channels


def infer_generator_config(state_dict: Mapping[str, Tensor], *, lr_mlp: float = 0.01) -> StyleGAN2Config:
    """Infer a :class:`StyleGAN2Config` from a rosinality generator state dict.

    size = 2 ** (number of ``to_rgbs`` + 2); style_dim from the modulation weights; n_mlp from ``style.{i}``;
    channels from the ToRGB input widths, reported as ``channel_multiplier`` when they match rosinality's table.
    ``lr_mlp`` only scales at run time and cannot be read from weights (0.01 in all published models).
    """
    try:
        n_to_rgbs = len(_indices(state_dict, r"to_rgbs\.(\d+)\.conv\.weight"))
        style_dim = int(state_dict["conv1.conv.modulation.weight"].shape[1])
        n_mlp = len(_indices(state_dict, r"style\.(\d+)\.weight"))
        channels = {4: int(state_dict["input.input"].shape[1])}
        for i in range(n_to_rgbs):
            channels[2 ** (i + 3)] = int(state_dict[f"to_rgbs.{i}.conv.weight"].shape[2])
    except KeyError as exc:
        raise CheckpointFormatError(
            f"not a rosinality StyleGAN2 generator state dict (missing {exc})"
        ) from exc
    size = 2 ** (n_to_rgbs + 2)
    multiplier, override = _multiplier_or_channels(channels, size)
    return StyleGAN2Config(
        size=size,
        style_dim=style_dim,
        n_mlp=n_mlp,
        channel_multiplier=multiplier,
        channels=override,
        lr_mlp=lr_mlp,
    )


def infer_discriminator_config(state_dict: Mapping[str, Tensor]) -> DiscriminatorConfig:
    """Infer a :class:`DiscriminatorConfig` from a rosinality discriminator state dict.

    ``convs.0`` is FromRGB at full resolution, followed by one ResBlock per resolution (each halves it).
    """
    try:
        blocks = _indices(state_dict, r"convs\.(\d+)\.conv1\.0\.weight")
        size = 2 ** (len(blocks) + 2)
        channels = {size: int(state_dict["convs.0.0.weight"].shape[0])}
        for block in blocks:
            channels[size // 2**block] = int(state_dict[f"convs.{block}.conv2.1.weight"].shape[0])
        channels[4] = int(state_dict["final_conv.0.weight"].shape[0])
    except KeyError as exc:
        raise CheckpointFormatError(
            f"not a rosinality StyleGAN2 discriminator state dict (missing {exc})"
        ) from exc
    multiplier, override = _multiplier_or_channels(channels, size)
    return DiscriminatorConfig(size=size, channel_multiplier=multiplier, channels=override)


def _generator_from_state(
    config: StyleGAN2Config, state_dict: Mapping[str, Tensor], what: str, path: Path
) -> Generator:
    """Build on the meta device (no random init) and adopt the checkpoint tensors; every key must match."""
    with torch.device("meta"):
        g = Generator.from_config(config)
    _load_assign_strict(g, state_dict, what, path)
    return g


def _discriminator_from_state(
    config: DiscriminatorConfig, state_dict: Mapping[str, Tensor], what: str, path: Path
) -> Discriminator:
    with torch.device("meta"):
        d = Discriminator.from_config(config)
    _load_assign_strict(d, state_dict, what, path)
    return d


def _load_assign_strict(
    module: torch.nn.Module, state_dict: Mapping[str, Tensor], what: str, path: Path
) -> None:
    expected = module.state_dict()
    wrong = {
        key: (tuple(state_dict[key].shape), tuple(value.shape))
        for key, value in expected.items()
        if key in state_dict and state_dict[key].shape != value.shape
    }
    if wrong:
        raise CheckpointFormatError(f"{what} of {path}: shape mismatch (checkpoint, model): {wrong}")
    # Copies, so that modules never share storage (train.py-style files may alias g and g_ema tensors).
    tensors = {
        key: value.to(torch.float32, copy=True) if value.is_floating_point() else value.clone()
        for key, value in state_dict.items()
    }
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointFormatError(
            f"{what} of {path} does not match the inferred architecture: {exc}"
        ) from exc


@dataclass
class RosinalityCheckpoint:
    """Models rebuilt from a rosinality checkpoint. Sample with ``g_ema``; ``g``/``d`` exist for fine-tuning."""

    g_ema: Generator
    generator_config: StyleGAN2Config
    g: Generator | None = None
    d: Discriminator | None = None
    discriminator_config: DiscriminatorConfig | None = None
    latent_avg: Tensor | None = None


def load_rosinality_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    load_g: bool = True,
    load_d: bool = True,
    lr_mlp: float = 0.01,
) -> RosinalityCheckpoint:
    """Load a rosinality ``.pt`` safely and rebuild ``g_ema`` (and ``g``, ``d`` when present) with ``strict=True``.

    The architecture is inferred from tensor shapes (see :func:`infer_generator_config`). ``latent_avg`` (the
    w average stored by ``convert_weight.py``) is returned when present. Training-only entries (optimiser
    states, ``args``, ``ada_aug_p``) are ignored.

    Raises:
        UnsafeCheckpointError: the file needs unpickling of code.
        CheckpointFormatError: no ``g_ema`` entry, or a state dict does not fit the inferred architecture.
    """
    path = Path(path)
    data = read_rosinality_checkpoint(path)
    if "g_ema" not in data:
        raise CheckpointFormatError(f"{path} has no 'g_ema' entry (keys: {sorted(data)})")

    g_ema_state = _strip_module_prefix(data["g_ema"])
    generator_config = infer_generator_config(g_ema_state, lr_mlp=lr_mlp)
    g_ema = _generator_from_state(generator_config, g_ema_state, "g_ema", path)
    result = RosinalityCheckpoint(g_ema=g_ema.to(device).eval(), generator_config=generator_config)

    if load_g and "g" in data:
        g = _generator_from_state(generator_config, _strip_module_prefix(data["g"]), "g", path)
        result.g = g.to(device)
    if load_d and "d" in data:
        d_state = _strip_module_prefix(data["d"])
        result.discriminator_config = infer_discriminator_config(d_state)
        d = _discriminator_from_state(result.discriminator_config, d_state, "d", path)
        result.d = d.to(device)
    latent_avg = data.get("latent_avg")
    if isinstance(latent_avg, Tensor):
        result.latent_avg = latent_avg.to(device)
    return result


def save_rosinality_checkpoint(
    path: str | os.PathLike[str],
    g_ema: Generator,
    *,
    g: Generator | None = None,
    d: Discriminator | None = None,
    latent_avg: Tensor | None = None,
) -> None:
    """Write a rosinality-style ``.pt`` dict ({"g_ema", "g", "d", "latent_avg"}) atomically with ``torch.save``.

    Only tensors are stored, so the file loads with ``weights_only=True`` here and in rosinality's code.
    """
    payload: dict[str, Any] = {"g_ema": _cpu_state_dict(g_ema)}
    if g is not None:
        payload["g"] = _cpu_state_dict(g)
    if d is not None:
        payload["d"] = _cpu_state_dict(d)
    if latent_avg is not None:
        payload["latent_avg"] = latent_avg.detach().cpu()
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _cpu_state_dict(module: torch.nn.Module) -> dict[str, Tensor]:
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------------------------


def save_generator_safetensors(
    g: Generator,
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> None:
    """Save a generator's state dict (parameters and buffers) as safetensors, with its JSON config in metadata.

    Args:
        g: the generator (usually ``g_ema``).
        path: destination file, written atomically.
        dtype: cast floating-point tensors, e.g. ``torch.float16`` to halve the file size.
        extra_metadata: additional string metadata (e.g. training step, dataset name).
    """
    tensors: dict[str, Tensor] = {}
    for key, value in g.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous().clone()
    metadata = {"format": GENERATOR_SAFETENSORS_FORMAT, "config": json.dumps(g.config.to_dict())}
    if extra_metadata:
        reserved = {"format", "config"} & set(extra_metadata)
        if reserved:
            raise ValueError(f"extra_metadata may not override {sorted(reserved)}")
        metadata.update({str(k): str(v) for k, v in extra_metadata.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_generator_safetensors(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Generator:
    """Load a generator written by :func:`save_generator_safetensors` (strict), cast to ``dtype``, in eval mode."""
    path = Path(path)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != GENERATOR_SAFETENSORS_FORMAT or "config" not in metadata:
            raise CheckpointFormatError(
                f"{path} is not a StyleGAN2 generator safetensors file (format={metadata.get('format')!r})"
            )
    state_dict = load_file(str(path), device="cpu")
    config = StyleGAN2Config.from_dict(json.loads(metadata["config"]))
    g = _generator_from_state(config, state_dict, "generator", path)
    return g.to(device=device, dtype=dtype).eval()
