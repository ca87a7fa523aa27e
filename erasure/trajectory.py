"""Partial DDIM sampling: the intermediate latents x_t that ESD-style methods train on.

ESD (Gandikota et al. 2023) does not noise real images: each training step draws a DDIM step index ``k``, runs
classifier-free-guided DDIM (``start_guidance``, eta 0) from Gaussian noise under the concept prompt for ``k``
steps, and trains at the latent reached there. We follow the 2024 diffusers code of the ESD authors
(``esd_sd.py``): ``k ~ U{0..N-1}`` indexes the scheduler's descending timesteps, the latent sits exactly at noise
level ``t_k = timesteps[k]`` and every prediction is made at ``t_k``. (The CompVis code instead breaks the DDIM
loop one index late and draws the DDPM timestep uniformly inside the ``1000/N`` bucket of ``k``, so its latents
are slightly less noisy than the timestep it trains at.)

Two ways to get those latents:

* :func:`sample_trajectories` runs whole trajectories once, in batches, and keeps every state together with the
  model's conditional and unconditional outputs there. With the frozen model (diffusers ESD, AdvUnlearn, whose
  UNet never changes) that is all a training run needs: state ``k`` of a trajectory *is* the partial DDIM sample
  for index ``k``, and the guided sampling step at ``k`` already computed the frozen ``eps(x_t, c)`` and
  ``eps(x_t, ∅)`` that the ESD target is made of. Nothing is recomputed, and the teacher runs under ``no_grad``
  exactly once per state.
* :func:`sample_until` runs one partial trajectory with the model being trained (the CompVis ESD code's choice),
  stopping after ``k`` steps.
* :class:`RecomputedTrajectories` is the reference path of the first (``speed.reuse: false``): the same states,
  drawn the same way, each recomputed from its noise by the frozen model whenever it is drawn.

Model outputs are in the UNet's own parameterisation (``epsilon`` or ``v_prediction``, e.g. SD-2): guidance and
the ESD target are affine combinations with weights summing to one, which commute with the affine map between
the two, and the DDIM step is taken by diffusers' ``DDIMScheduler`` configured like the pipeline's scheduler.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def ddim_scheduler(config: Mapping[str, Any], num_inference_steps: int, device: torch.device | str = "cpu"):
    """A ``DDIMScheduler`` with the pipeline scheduler's noise schedule and prediction type, set to ``N`` steps."""
    from diffusers import DDIMScheduler

    accepted = inspect.signature(DDIMScheduler.__init__).parameters
    scheduler = DDIMScheduler.from_config({k: v for k, v in dict(config).items() if k in accepted})
    scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler


def predict(
    unet: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor
) -> torch.Tensor:
    """The UNet's output (eps or v) for a batch; ``timesteps`` is a scalar or one per sample."""
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(latents.shape[0])
    return unet(latents, timesteps.to(latents.device), encoder_hidden_states=cond).sample


def guided(uncond_out: torch.Tensor, cond_out: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``."""
    return uncond_out + scale * (cond_out - uncond_out)


def initial_noise(n: int, unet: nn.Module, generator: torch.Generator) -> torch.Tensor:
    """Gaussian start latents ``[n, C, H, W]`` for ``unet``, drawn on the CPU from ``generator`` (device-independent)."""
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return torch.randn((n, cfg.in_channels, size, size), generator=generator)


@dataclass
class Trajectories:
    """States of ``P`` DDIM trajectories of ``N`` steps, and the sampling model's outputs at each state.

    ``latents[p, k]`` is trajectory ``p`` at noise level ``timesteps[k]`` (``k = 0``: the start noise), i.e. the
    partial DDIM sample for step index ``k``; ``cond_out[p, k]`` / ``uncond_out[p, k]`` are the model's outputs
    there under the trajectory's prompt (``prompt_index[p]``) and under the guidance's unconditional embedding (the
    empty prompt, or the trajectory's negative prompt). ``final`` is the clean latent each trajectory ends at.
    """

    latents: torch.Tensor
    cond_out: torch.Tensor
    uncond_out: torch.Tensor
    timesteps: torch.Tensor
    prompt_index: torch.Tensor
    final: torch.Tensor

    @property
    def num_trajectories(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.latents.shape[1]

    def draw(
        self, n: int, generator: torch.Generator, step: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` random states: ``(latents, timesteps, prompt_index, cond_out, uncond_out)``.

        Each state is a uniformly random trajectory at a uniformly random step index (``step`` fixes the index).
        """
        return self.states(*draw_states(self.num_trajectories, self.num_steps, n, generator, step))

    def states(
        self, p: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """States of trajectories ``p`` at step indices ``k``: ``(latents, timesteps, prompt_index, cond_out,
        uncond_out)``."""
        return (
            self.latents[p, k],
            self.timesteps[k],
            self.prompt_index[p],
            self.cond_out[p, k],
            self.uncond_out[p, k],
        )

    def clean(self, p: torch.Tensor) -> torch.Tensor:
        """The clean latents trajectories ``p`` end at."""
        return self.final[p]


def draw_states(
    num_trajectories: int, num_steps: int, n: int, generator: torch.Generator, step: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, k)``: ``n`` uniformly random trajectory indices and step indices (``step`` fixes the latter)."""
    p = torch.randint(num_trajectories, (n,), generator=generator)
    if step is None:
        k = torch.randint(num_steps, (n,), generator=generator)
    else:
        k = torch.full((n,), step, dtype=torch.long)
    return p, k


class RecomputedTrajectories:
    """The reference path of :class:`Trajectories` (``speed.reuse: false``): nothing is kept but the start noise
    and the prompts; every requested state is sampled again from its noise by the frozen ``teacher`` (a partial
    DDIM trajectory of ``k`` guided steps, as the CompVis ESD code does every iteration), and the teacher's
    conditional and unconditional outputs there are computed again. Same interface, same maths and the same
    random draws as the cached bank, at ~``k + 1`` guided teacher calls per state instead of none."""

    def __init__(
        self,
        teacher: nn.Module,
        scheduler,
        noise: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        guidance_scale: float,
        prompt_index: torch.Tensor,
    ) -> None:
        self.teacher = teacher
        self.scheduler = scheduler
        self.noise = noise
        self.cond = cond
        self.uncond = uncond
        self.guidance_scale = guidance_scale
        self.device = next(teacher.parameters()).device
        self.timesteps = scheduler.timesteps.to(self.device)
        self.prompt_index = prompt_index.to(self.device)

    @property
    def num_trajectories(self) -> int:
        return self.noise.shape[0]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def draw(
        self, n: int, generator: torch.Generator, step: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` random states, drawn exactly as :meth:`Trajectories.draw` draws them."""
        return self.states(*draw_states(self.num_trajectories, self.num_steps, n, generator, step))

    @torch.no_grad()
    def states(
        self, p: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = next(self.teacher.parameters()).dtype
        latents = torch.cat(
            [
                sample_until(
                    self.teacher, self.scheduler, self.noise[i : i + 1], self.cond[i : i + 1],
                    unconditional_batch(self.uncond, slice(i, i + 1), 1), self.guidance_scale, int(j),
                )
                for i, j in zip(p.tolist(), k.tolist(), strict=True)
            ]
        )  # fmt: skip
        timesteps = self.timesteps[k.to(self.device)]
        cond = self.cond[p].to(self.device, dtype)
        uncond = unconditional_batch(self.uncond, p, len(p)).to(self.device, dtype)
        uncond_out, cond_out = predict(
            self.teacher,
            torch.cat([latents, latents]),
            torch.cat([timesteps, timesteps]),
            torch.cat([uncond, cond]),
        ).chunk(2)
        return latents, timesteps, self.prompt_index[p.to(self.device)], cond_out, uncond_out

    @torch.no_grad()
    def clean(self, p: torch.Tensor) -> torch.Tensor:
        return sample_until(
            self.teacher, self.scheduler, self.noise[p], self.cond[p], unconditional_batch(self.uncond, p, len(p)),
            self.guidance_scale, self.num_steps,
        )  # fmt: skip


def partial_trajectories(
    teacher: nn.Module,
    scheduler,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    prompt_index: torch.Tensor,
    reuse: bool = True,
) -> Trajectories | RecomputedTrajectories:
    """The partial DDIM trajectories of the frozen ``teacher`` from ``noise`` under ``cond``: sampled once and
    kept (``reuse``, :func:`sample_trajectories`) or recomputed on demand (:class:`RecomputedTrajectories`).
    With ``reuse=False`` the caller must pass a teacher that stays frozen while it trains (a copy)."""
    if reuse:
        return sample_trajectories(
            teacher, scheduler, noise, cond, uncond, guidance_scale, prompt_index=prompt_index
        )
    return RecomputedTrajectories(teacher, scheduler, noise, cond, uncond, guidance_scale, prompt_index)


@torch.no_grad()
def sample_trajectories(
    unet: nn.Module,
    scheduler,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    prompt_index: torch.Tensor | None = None,
    batch_size: int = 64,
    keep_states: bool = True,
) -> Trajectories:
    """Run guided DDIM (eta 0) from ``noise`` ``[P, C, H, W]`` under ``cond`` ``[P, L, D]`` to the end.

    ``uncond`` is the empty-prompt embedding ``[L, D]``, or one negative-prompt embedding per trajectory
    ``[P, L, D]``. With ``keep_states`` every intermediate latent and both model outputs are kept (on the latents'
    device); otherwise only ``final`` is filled (the others are empty).
    """
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    timesteps = scheduler.timesteps.to(device)
    n_total = noise.shape[0]
    latents_all, cond_all, uncond_all, finals = [], [], [], []
    for start in range(0, n_total, batch_size):
        x = noise[start : start + batch_size].to(device, dtype)
        c = cond[start : start + batch_size].to(device, dtype)
        n = x.shape[0]
        u = unconditional_batch(uncond, slice(start, start + n), n).to(device, dtype)
        states, outs_c, outs_u = [], [], []
        for t in timesteps:
            out_u, out_c = predict(unet, torch.cat([x, x]), t, torch.cat([u, c])).chunk(2)
            if keep_states:
                states.append(x)
                outs_c.append(out_c)
                outs_u.append(out_u)
            x = scheduler.step(guided(out_u, out_c, guidance_scale), t, x, eta=0.0).prev_sample
        finals.append(x)
        if keep_states:
            latents_all.append(torch.stack(states, dim=1))
            cond_all.append(torch.stack(outs_c, dim=1))
            uncond_all.append(torch.stack(outs_u, dim=1))
    empty = torch.empty(0, device=device)
    if prompt_index is None:
        prompt_index = torch.zeros(n_total, dtype=torch.long)
    return Trajectories(
        latents=torch.cat(latents_all) if keep_states else empty,
        cond_out=torch.cat(cond_all) if keep_states else empty,
        uncond_out=torch.cat(uncond_all) if keep_states else empty,
        timesteps=timesteps,
        prompt_index=prompt_index.to(device),
        final=torch.cat(finals),
    )


@torch.no_grad()
def sample_until(
    unet: nn.Module,
    scheduler,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    step_index: int,
) -> torch.Tensor:
    """Guided DDIM from ``noise`` for ``step_index`` steps: the latent at noise level ``timesteps[step_index]``.

    Used when the latents must come from the current (trained) model, so they cannot be sampled in advance.
    """
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    x = noise.to(device, dtype)
    c = cond.to(device, dtype)
    u = unconditional_batch(uncond, slice(None), x.shape[0]).to(device, dtype)
    for t in scheduler.timesteps[:step_index].to(device):
        out_u, out_c = predict(unet, torch.cat([x, x]), t, torch.cat([u, c])).chunk(2)
        x = scheduler.step(guided(out_u, out_c, guidance_scale), t, x, eta=0.0).prev_sample
    return x


def unconditional_batch(uncond: torch.Tensor, rows: torch.Tensor | slice, n: int) -> torch.Tensor:
    """The guidance's unconditional embeddings for ``n`` trajectories: one embedding ``[L, D]`` shared by all
    (the empty prompt), or per trajectory ``[P, L, D]`` (a negative prompt each), of which ``rows`` are taken."""
    if uncond.ndim == 2:
        return uncond.unsqueeze(0).expand(n, -1, -1)
    return uncond[rows]


AnyTrajectories = Trajectories | RecomputedTrajectories
"""What :func:`partial_trajectories` returns: kept or recomputed states behind one interface."""
