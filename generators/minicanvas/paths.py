"""Where the built MiniCanvas world lives.

``WORLD_DIR`` is the shipped location inside the package. Setting the environment variable
``ERASURE_STUDIO_WORLD`` to another folder makes :func:`world_dir` (and everything resolved through it, such as
the ``minicanvas-sd`` backbone) use that folder instead; it is read at call time, so tests can set it.
"""

from __future__ import annotations

import os
from pathlib import Path

WORLD_ENV_VAR = "ERASURE_STUDIO_WORLD"
WORLD_DIR: Path = Path(__file__).resolve().parent / "world"

SD_SUBDIR = "sd"
"""A diffusers StableDiffusionPipeline folder (``model_index.json`` + components)."""
GAN_CHECKPOINT = Path("gan") / "generator.safetensors"
"""The StyleGAN2 generator checkpoint, relative to the world folder."""


def world_dir() -> Path:
    """The world folder in use: ``$ERASURE_STUDIO_WORLD`` if set, else :data:`WORLD_DIR`."""
    override = os.environ.get(WORLD_ENV_VAR)
    return Path(override).expanduser().resolve() if override else WORLD_DIR


def sd_pipeline_dir() -> Path:
    return world_dir() / SD_SUBDIR


def gan_checkpoint_path() -> Path:
    return world_dir() / GAN_CHECKPOINT
