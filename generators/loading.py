"""Loading a resolved backbone onto a device, and the named torch modules (components) it consists of."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from erasure.base import DTYPES, Precision
from erasure.errors import ConfigError, NotAvailableError, UserError
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


class BackboneLoadError(ConfigError):
    """The backbone's files are there but do not load: corrupted, not model weights, or refused as unsafe pickles.

    A config error (exit code 2): the job names a model that cannot be used, and nothing has been written yet.
    """


_EXPECTED = {
    "sd": "expected a diffusers pipeline folder with safetensors weights",
    "gan": "expected a StyleGAN2 generator .safetensors file or a weights-only rosinality .pt/.pth checkpoint",
}
_LOAD_ERRORS = (
    UserError, OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError, SafetensorError,
)  # fmt: skip


def load_backbone(backbone: Backbone, device: torch.device, precision: Precision) -> Any:
    """The loaded backbone: a diffusers StableDiffusionPipeline (kind ``sd``) or a StyleGAN2 Generator (``gan``).

    The files are read on the CPU (never unpickling code) and then moved to ``device``; files that cannot be read
    as a model of the backbone's kind raise :class:`BackboneLoadError` (one line naming the file and what is
    expected), while a failure to move the model to the device (e.g. out of GPU memory) is left as it is.
    """
    check_available(backbone)
    dtype = DTYPES[precision]
    try:
        if backbone.kind == "sd":
            from generators.sd import load_sd_pipeline

            model = load_sd_pipeline(backbone.path, "cpu", dtype)
        else:
            model = _load_gan(backbone.path, dtype)
    except torch.OutOfMemoryError:
        raise
    except _LOAD_ERRORS as err:
        reason = _reason(err, backbone.path)
        raise BackboneLoadError(f"backbone {backbone.spec}: {reason}; {_EXPECTED[backbone.kind]}") from None
    return model.to(device)


def _reason(err: BaseException, path: Path) -> str:
    """One line: our own loaders' errors as they are (they name the file); others' first line, with the file."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if not type(err).__module__.startswith(("erasure.", "generators.")):
        text = f"cannot load {path}: {type(err).__name__}: {text}".rstrip(": ")
    return text if len(text) <= 500 else text[:497] + "..."


def _load_gan(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    from generators.stylegan2_io import load_generator_safetensors, load_rosinality_checkpoint

    if path.suffix.lower() == ".safetensors":
        return load_generator_safetensors(path, device="cpu", dtype=dtype)
    checkpoint = load_rosinality_checkpoint(path, device="cpu", load_g=False, load_d=False)
    return checkpoint.g_ema.to(dtype=dtype)


def backbone_components(model: Any) -> dict[str, torch.nn.Module]:
    """The torch modules of a loaded backbone by component name (``unet``, ``text_encoder``, ``generator``…).

    A diffusion pipeline also lists ``one_step``, the marker of a one-step generator (:mod:`generators.one_step`),
    so that it travels with a run's weights like any component.
    """
    if isinstance(model, torch.nn.Module):
        return {GAN_COMPONENT: model}
    from generators import one_step

    components = {name: part for name, part in model.components.items() if isinstance(part, torch.nn.Module)}
    components[one_step.COMPONENT] = one_step.settings(model)
    return components
