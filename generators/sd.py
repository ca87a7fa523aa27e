"""Stable Diffusion backbone: any diffusers SD-1.x/2.x pipeline folder (MiniSD included).

Loading never touches a hub: ``from_pretrained`` is called on a local folder with ``local_files_only=True``, and
never unpickles: ``use_safetensors=True`` refuses a folder whose weights are only ``.bin``/``.ckpt`` pickles.
Sampling is batched and seeded per image (one ``torch.Generator`` per image), so an image depends only on
(model, prompt, seed, sampler settings), not on what else shares its batch: that is what makes before/after
comparisons and the generation cache exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch


def load_sd_pipeline(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from diffusers import StableDiffusionPipeline

    with _no_loading_bars():
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path),
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    from generators.one_step import load_marker

    load_marker(pipe, path)  # an exported one-step generator (SFD) carries one_step.json
    return pipe.to(device)


@contextmanager
def _no_loading_bars() -> Iterator[None]:
    """No "Loading pipeline components" / "Loading weights" bars: local folders load in seconds, and a command's
    output (an error message above all) stays one line."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


@torch.no_grad()
def sample_sd(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 128,
    height: int | None = None,
    width: int | None = None,
    negative_prompts: Sequence[str] | None = None,
) -> torch.Tensor:
    """Images for ``prompts[i]`` with seed ``seeds[i]``, shape ``[n, 3, H, W]`` in ``[-1, 1]``, on the CPU.

    A pipeline marked as a one-step generator (:mod:`generators.one_step`) is sampled with one UNet call per batch;
    steps, guidance and negative prompts then do not apply.
    """
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    from generators.one_step import one_step_timestep, sample_one_step

    if one_step_timestep(pipe) is not None:
        return sample_one_step(pipe, prompts, seeds, batch_size=batch_size, height=height, width=width)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or size, width or size
    device = pipe.device
    gen_device = "cpu" if device.type == "mps" else device
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        gens = [torch.Generator(gen_device).manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        neg = list(negative_prompts[i : i + batch_size]) if negative_prompts is not None else None
        images = pipe(
            chunk,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=gens,
            negative_prompt=neg,
            output_type="pt",
        ).images
        out.append(images.float().cpu() * 2 - 1)
    return torch.cat(out)
