"""Loading a resolved backbone onto a device, and the named torch modules (components) it consists of."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from erasure.base import DTYPES, Precision
from erasure.errors import NotAvailableError, UserError
from generators.registry import Backbone

GAN_COMPONENT = "generator"


def check_available(backbone: Backbone) -> None:
    """Raise a UserError (before any work starts) if ``backbone``'s files are missing."""
    if backbone.path.exists():
        return
    if backbone.minicanvas:
        raise NotAvailableError(
            f"backbone {backbone.spec}",
            f"the MiniCanvas world is not built at {backbone.path.parent}; run `erasure-studio world build`",
        )
    raise UserError(f"backbone {backbone.spec}: {backbone.path} does not exist")


def load_backbone(backbone: Backbone, device: torch.device, precision: Precision) -> Any:
    """The loaded backbone: a diffusers StableDiffusionPipeline (kind ``sd``) or a StyleGAN2 Generator (``gan``)."""
    check_available(backbone)
    dtype = DTYPES[precision]
    if backbone.kind == "sd":
        from generators.sd import load_sd_pipeline

        return load_sd_pipeline(backbone.path, str(device), dtype)
    return _load_gan(backbone.path, device, dtype)


def _load_gan(path: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from generators.stylegan2_io import (
        CheckpointFormatError,
        UnsafeCheckpointError,
        load_generator_safetensors,
        load_rosinality_checkpoint,
    )

    try:
        if path.suffix.lower() == ".safetensors":
            return load_generator_safetensors(path, device=device, dtype=dtype)
        checkpoint = load_rosinality_checkpoint(path, device=device, load_g=False, load_d=False)
        return checkpoint.g_ema.to(dtype=dtype)
    except (CheckpointFormatError, UnsafeCheckpointError) as err:
        raise UserError(f"backbone {path}: {err}") from None


def backbone_components(model: Any) -> dict[str, torch.nn.Module]:
    """The torch modules of a loaded backbone by component name (``unet``, ``text_encoder``, ``generator``…)."""
    if isinstance(model, torch.nn.Module):
        return {GAN_COMPONENT: model}
    return {name: part for name, part in model.components.items() if isinstance(part, torch.nn.Module)}
