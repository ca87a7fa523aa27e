"""Diffusion Soup's base model (world stage ``soup``): MiniSD's UNet trained without the soup shards' styles.

Diffusion Soup (Biggs et al., ECCV 2024; ``erasure/methods/soup.py``) fine-tunes one copy of a base model per data
shard and averages the copies' weights; unlearning a shard is re-averaging without it. On MiniCanvas that only
unlearns something if the base cannot already draw the shard styles, so this stage trains a second MiniSD UNet from
scratch with the recipe of phase 1 of the main UNet (``train.train_unet``: plain epsilon-MSE, AdamW, linear warm-up
and cosine decay, classifier-free-guidance caption dropout, gradient clipping, EMA) on every style *except* those of
``WorldSettings.soup_shards``. It shares MiniSD's VAE, text encoder, tokenizer and scheduler, read from the
published ``sd/`` folder (so ``sd`` must be built first); only its UNet is shipped::

    soup_base/unet/       a diffusers UNet2DConditionModel folder (fp16 on disk, sharded like sd/unet)
    soup_base/soup.json   the shards, the styles the base was trained on, and the stage's settings

:func:`soup_pipeline` combines the two into a ``StableDiffusionPipeline``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .concepts import STYLES
from .paths import world_dir

SOUP_BASE_SUBDIR = "soup_base"
UNET_SUBDIR = "unet"
INFO_FILE = "soup.json"


def soup_base_dir(root: Path | None = None) -> Path:
    """The soup base folder of the world in use (or of ``root``)."""
    return (root or world_dir()) / SOUP_BASE_SUBDIR


def base_style_names(shards: list[list[str]]) -> list[str]:
    """The styles the soup base trains on: every MiniCanvas style that no shard holds, in ``STYLES`` order."""
    held = {name for shard in shards for name in shard}
    return [name for name in STYLES if name not in held]


def train_soup_base(work: Path, vae, text_encoder, tokenizer, unet_config: dict[str, Any], settings, device: str,
                    resume: bool = True):
    """Train the soup base (resumable from ``work/soup_base.state.safetensors``); returns the EMA UNet.

    ``unet_config`` is the architecture (MiniSD's UNet config, so the soup's UNets load into MiniSD's pipeline).
    Every training step draws its labels among the base styles only (``sample_labels(..., styles=...)``).
    """
    from diffusers import UNet2DConditionModel

    from .train import Loop, UNetTrainer

    s = settings.soup_base
    allowed = [STYLES.index(name) for name in base_style_names(settings.soup_shards)]
    torch.manual_seed(s.seed)
    unet = UNet2DConditionModel.from_config(dict(unet_config)).to(device)
    trainer = UNetTrainer(unet, vae, text_encoder, tokenizer, settings, device)
    ema = trainer.ema
    opt = torch.optim.AdamW(unet.parameters(), lr=s.lr, weight_decay=0.01)
    g = torch.Generator(device).manual_seed(s.seed)
    step_fn = trainer.step_fn(s, opt, g, styles=allowed)
    Loop("soup-base", work / "soup_base.state.safetensors", s, {"unet": unet, "ema": ema}, {"opt": opt},
         {"data": g}, settings.checkpoint_every).run(step_fn, resume)
    return ema.eval()


def save_soup_base(unet, folder: Path, settings, max_shard_size: str) -> None:
    """Write ``unet`` (already in its shipping dtype) and ``soup.json`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / UNET_SUBDIR, max_shard_size=max_shard_size)
    info = {
        "shards": [list(shard) for shard in settings.soup_shards],
        "base_styles": base_style_names(settings.soup_shards),
        "settings": settings.soup_base.model_dump(),
        "cfg_dropout": settings.unet_cfg_dropout,
        "ema_decay": settings.unet_ema_decay,
    }
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def read_soup_info(folder: Path) -> dict[str, Any]:
    """``soup.json`` of a soup base folder (``shards``, ``base_styles``, ``settings``)."""
    return json.loads((Path(folder) / INFO_FILE).read_text())


def load_soup_unet(folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(Path(folder) / UNET_SUBDIR), local_files_only=True, dtype=dtype)
    return unet.to(device).eval()


def soup_pipeline(root: Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """MiniSD's pipeline with the soup base's UNet in place of its own."""
    from ..sd import load_sd_pipeline

    root = root or world_dir()
    pipe = load_sd_pipeline(root / "sd", device, dtype)
    pipe.unet = load_soup_unet(soup_base_dir(root), device, dtype)
    return pipe
