"""Seeded, cached image generation for evaluation: diffusion pipelines (by prompt) and StyleGAN2 (by latent seed).

Every image is a function of (model, prompt or latent seed, seed, sampler settings) alone, so it goes through the
:class:`~evaluate.cache.GenerationCache` when one is given. Images are ``[n, 3, H, W]`` in ``[-1, 1]`` on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from evaluate.cache import GenerationCache, model_fingerprint
from generators.one_step import one_step_timestep, sample_from_embeddings
from generators.sd import sample_sd

SCHEDULERS = ("ddim",)


@dataclass(frozen=True)
class SamplerSettings:
    """How a diffusion pipeline samples: steps, classifier-free guidance, size, and optionally a scheduler swap.

    ``scheduler=None`` keeps the pipeline's own scheduler; ``"ddim"`` samples with ``DDIMScheduler`` built from the
    pipeline's scheduler config (eta 0), as UnlearnCanvas' protocol does.
    """

    steps: int
    guidance: float
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; allowed: {', '.join(SCHEDULERS)}")

    def request(self) -> dict[str, Any]:
        """The part of a cache key that the settings determine (batch size does not change images)."""
        out = asdict(self)
        out.pop("batch_size")
        return out


class SDSampler:
    """Generates (and caches) images of one diffusion pipeline."""

    def __init__(self, pipe: Any, cache: GenerationCache | None = None) -> None:
        self.pipe = pipe
        self.cache = cache

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self.pipe)

    def _request(self, prompt: str, seed: int, settings: SamplerSettings) -> dict[str, Any]:
        request = {"kind": "sd", "prompt": prompt, "seed": int(seed), "generator": self.pipe.device.type,
                   **settings.request()}
        t_init = one_step_timestep(self.pipe)
        if t_init is not None:  # a one-step generator (SFD): steps/guidance do not apply, t_init does
            request["one_step"] = t_init
        return request

    def images(self, prompts: Sequence[str], seeds: Sequence[int], settings: SamplerSettings) -> Tensor:
        """Images of ``prompts[i]`` with seed ``seeds[i]``."""
        if len(prompts) != len(seeds):
            raise ValueError("prompts and seeds must have the same length")

        def generate(indices: list[int]) -> Tensor:
            with self._scheduler(settings):
                return sample_sd(
                    self.pipe,
                    [prompts[i] for i in indices],
                    [seeds[i] for i in indices],
                    num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance,
                    batch_size=settings.batch_size,
                    height=settings.height,
                    width=settings.width,
                )

        if self.cache is None:
            return generate(list(range(len(prompts)))) if prompts else torch.zeros(0)
        requests = [self._request(p, s, settings) for p, s in zip(prompts, seeds)]
        return self.cache.fetch(self.fingerprint, requests, generate)

    @torch.no_grad()
    def images_from_embeddings(self, prompt_embeds: Tensor, seeds: Sequence[int], settings: SamplerSettings) -> Tensor:
        """Images conditioned on ready-made text embeddings ``[1 or n, L, d]`` (e.g. an adversarial prompt).

        Never cached: such embeddings are one-off. The unconditional branch is the empty prompt, as for text.
        """
        n = len(seeds)
        embeds = prompt_embeds.expand(n, -1, -1) if prompt_embeds.shape[0] == 1 else prompt_embeds
        if one_step_timestep(self.pipe) is not None:
            return sample_from_embeddings(self.pipe, embeds, seeds, settings.height, settings.width)
        device = self.pipe.device
        gen_device = "cpu" if device.type == "mps" else device
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        with self._scheduler(settings):
            out = self.pipe(
                prompt_embeds=embeds.to(device=device, dtype=self.pipe.text_encoder.dtype),
                height=settings.height or size,
                width=settings.width or size,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                generator=[torch.Generator(gen_device).manual_seed(int(s)) for s in seeds],
                output_type="pt",
            ).images
        return out.float().cpu() * 2 - 1

    def _scheduler(self, settings: SamplerSettings) -> _SchedulerSwap:
        return _SchedulerSwap(self.pipe, settings.scheduler)


class _SchedulerSwap:
    """Context manager: sample with another scheduler (built from the pipeline's config), then restore."""

    def __init__(self, pipe: Any, name: str | None) -> None:
        self.pipe, self.name, self.saved = pipe, name, None

    def __enter__(self) -> None:
        if self.name == "ddim":
            from diffusers import DDIMScheduler

            self.saved = self.pipe.scheduler
            self.pipe.scheduler = DDIMScheduler.from_config(self.saved.config)

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            self.pipe.scheduler = self.saved
            self.saved = None


class GANSampler:
    """Generates (and caches) images of a StyleGAN2 generator on fixed latents.

    Latent ``i`` is ``randn(style_dim)`` from ``torch.Generator("cpu").manual_seed(seeds[i])``, so an image depends
    only on the generator and its seed; noise inputs are the stored buffers (``randomize_noise=False``), no
    truncation.
    """

    def __init__(self, generator: torch.nn.Module, cache: GenerationCache | None = None, batch_size: int = 250) -> None:
        self.generator = generator.eval()
        self.cache = cache
        self.batch_size = batch_size

    def latents(self, seeds: Sequence[int]) -> Tensor:
        dim = self.generator.style_dim
        return torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    @torch.no_grad()
    def _generate(self, seeds: Sequence[int]) -> Tensor:
        device = next(self.generator.parameters()).device
        dtype = next(self.generator.parameters()).dtype
        z = self.latents(seeds)
        out = []
        for i in range(0, len(z), self.batch_size):
            batch = z[i : i + self.batch_size].to(device=device, dtype=dtype)
            out.append(self.generator([batch], randomize_noise=False)[0].float().clamp(-1, 1).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def images(self, seeds: Sequence[int]) -> Tensor:
        if self.cache is None:
            return self._generate(seeds)
        requests = [{"kind": "gan", "seed": int(s), "noise": "buffers", "truncation": 1.0} for s in seeds]
        return self.cache.fetch(model_fingerprint(self.generator), requests,
                                lambda idx: self._generate([seeds[i] for i in idx]))
