"""Training objectives shared by the SD erasure methods.

All model outputs live in the UNet's own parameterisation (``epsilon``, or ``v_prediction`` for SD-2 v models):
:func:`denoising_target` gives the regression target of either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from erasure.trajectory import predict


def esd_target(uncond_out: torch.Tensor, cond_out: torch.Tensor, negative_guidance: float) -> torch.Tensor:
    """ESD's negatively guided score (Gandikota et al. 2023, eq. 2 / ``train-esd.py``)::

        eps*(x_t, c0) - eta * (eps*(x_t, c) - eps*(x_t, c0))

    from the frozen model's unconditional (``c0`` = empty prompt) and concept-conditioned outputs. The weights sum
    to one, so the same formula holds for v-prediction outputs.
    """
    return uncond_out - negative_guidance * (cond_out - uncond_out)


def esd_loss(
    trained_out: torch.Tensor, uncond_out: torch.Tensor, cond_out: torch.Tensor, negative_guidance: float
) -> torch.Tensor:
    """``MSE(eps_theta(x_t, c), sg[esd_target])``: the ESD objective (targets carry no gradient)."""
    target = esd_target(uncond_out, cond_out, negative_guidance).detach()
    return F.mse_loss(trained_out, target)


def noise_latents(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The forward process ``q(x_t | x_0)``: ``sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``."""
    return scheduler.add_noise(x0, noise, timesteps)


def denoising_target(
    scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should output for ``x_t = noise_latents(x0, noise, t)``: the noise, or the velocity for
    ``v_prediction`` (``sqrt(abar_t) noise - sqrt(1 - abar_t) x_0``), or ``x_0`` for ``sample``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r}")


def random_timesteps(n: int, scheduler, generator: torch.Generator) -> torch.Tensor:
    """``n`` training timesteps uniform in ``{0, ..., T-1}`` (``T = num_train_timesteps``)."""
    return torch.randint(scheduler.config.num_train_timesteps, (n,), generator=generator)


def denoising_loss(
    unet: nn.Module,
    scheduler,
    x0: torch.Tensor,
    cond: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """The standard latent-diffusion loss ``MSE(model(x_t, t, c), target)`` for given noise and timesteps."""
    device = x0.device
    timesteps = timesteps.to(device)
    x_t = noise_latents(scheduler, x0, noise, timesteps)
    target = denoising_target(scheduler, x0, noise, timesteps)
    return F.mse_loss(predict(unet, x_t, timesteps, cond), target)
