"""One-step generators distilled from a diffusion pipeline (SFD / SiD): the marker, and sampling with one UNet call.

A one-step generator ``G`` has the architecture of the pipeline's UNet and replaces it. An image is made with a
single call at a fixed timestep ``t_init`` on pure noise, as SiD-LSG's ``sid_sd_sampler`` does for Stable
Diffusion (``noise_scheduler.add_noise(0, z, t_init)`` then the scheduler's ``pred_original_sample``)::

    x_init = sqrt(1 - abar[t_init]) * z                       z ~ N(0, I), the pipeline's usual start noise
    x_g    = x0-prediction of G(x_init, t_init, c)            e.g. (x_init - sqrt(1 - abar) * eps) / sqrt(abar)
    image  = VAE.decode(x_g / scaling_factor)

with the prompt's text embedding ``c`` and no classifier-free guidance (the generator has learnt the guided
teacher's distribution; SFD/SiD-LSG sample with guidance 1). The noise ``z`` of a seed is the one
``StableDiffusionPipeline`` would start from, so a seed gives the same start noise in both modes.

**The marker.** Whether a loaded pipeline is a one-step generator is a tiny pseudo-component of the backbone,
:class:`OneStepSettings` (``one_step``, a buffer ``t_init``; ``-1`` = an ordinary multi-step pipeline), that
:func:`generators.loading.backbone_components` lists next to ``unet``/``text_encoder``/... So it travels with the
weights like any component, through every path that already moves weights: a run saves it as
``weights/one_step.safetensors`` next to ``weights/unet.safetensors``; the evaluator (``apply_weights``), the UI
(swapping a run's weights in and out of a shared base pipeline) and ``export`` load it like the others. An exported
folder carries it as ``one_step.json`` (:data:`MARKER_FILE`), which :func:`generators.sd.load_sd_pipeline` reads
back, and which ``StableDiffusionPipeline.from_pretrained`` simply ignores (the folder still opens as an ordinary
multi-step pipeline). :func:`generators.sd.sample_sd` and the evaluator's embedding sampler dispatch to
:func:`sample_one_step` when the marker is set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

COMPONENT = "one_step"
"""Component name of the marker (``weights/one_step.safetensors`` in a run)."""
MARKER_FILE = "one_step.json"
"""The marker in an exported pipeline folder: ``{"t_init": 625}``."""
_ATTRIBUTE = "_erasure_one_step"
OFF = -1


class OneStepSettings(nn.Module):
    """The one-step marker of a pipeline: ``t_init`` (a ``[1]`` int64 buffer), ``-1`` when the pipeline is not a
    one-step generator."""

    def __init__(self, t_init: int = OFF) -> None:
        super().__init__()
        self.register_buffer("t_init", torch.tensor([int(t_init)], dtype=torch.long))

    @property
    def timestep(self) -> int | None:
        value = int(self.t_init.item())
        return None if value < 0 else value


def settings(pipe: Any) -> OneStepSettings:
    """The pipeline's marker module, attached (off) the first time it is asked for."""
    found = pipe.__dict__.get(_ATTRIBUTE)
    if found is None:
        found = OneStepSettings()
        object.__setattr__(pipe, _ATTRIBUTE, found)
    return found


def one_step_timestep(pipe: Any) -> int | None:
    """``t_init`` if ``pipe`` is marked as a one-step generator, else ``None``."""
    found = getattr(pipe, "__dict__", {}).get(_ATTRIBUTE)
    return None if found is None else found.timestep


def mark(pipe: Any, t_init: int | None) -> None:
    """Mark ``pipe`` as a one-step generator sampled at ``t_init`` (``None``: back to multi-step)."""
    if t_init is not None:
        check_timestep(pipe, t_init)
    settings(pipe).t_init.fill_(OFF if t_init is None else int(t_init))


def marker_tensors(t_init: int) -> dict[str, torch.Tensor]:
    """The marker component's tensors, for :class:`erasure.base.ErasureResult` (``changed["one_step"]``)."""
    return dict(OneStepSettings(t_init).state_dict())


def check_timestep(pipe: Any, t_init: int) -> None:
    steps = int(pipe.scheduler.config.num_train_timesteps)
    if not 0 <= int(t_init) < steps:
        raise ValueError(f"one-step t_init must lie in [0, {steps - 1}], got {t_init}")


def load_marker(pipe: Any, folder: str | Path) -> None:
    """Mark ``pipe`` from ``folder/one_step.json`` if that file exists (an exported one-step generator)."""
    path = Path(folder) / MARKER_FILE
    if path.is_file():
        mark(pipe, int(json.loads(path.read_text())["t_init"]))


def save_marker(pipe: Any, folder: str | Path) -> None:
    """Write ``folder/one_step.json`` if ``pipe`` is a one-step generator."""
    t_init = one_step_timestep(pipe)
    if t_init is not None:
        (Path(folder) / MARKER_FILE).write_text(json.dumps({"t_init": t_init}) + "\n")


# ------------------------------------------------------------------------------------------------------ the maths


def alphas_cumprod(scheduler: Any) -> torch.Tensor:
    """``abar_t`` for ``t = 0..T-1`` (float64, CPU) from a diffusers scheduler."""
    value = getattr(scheduler, "alphas_cumprod", None)
    if value is None:
        raise ValueError(
            f"{type(scheduler).__name__} has no alphas_cumprod; one-step sampling needs a DDPM-type schedule"
        )
    return torch.as_tensor(value, dtype=torch.float64).cpu()


def _coefficients(
    abar: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    a = abar[timesteps.cpu().long()].to(like.device)
    shape = (-1,) + (1,) * (like.ndim - 1)
    return a.sqrt().to(like.dtype).view(shape), (1 - a).sqrt().to(like.dtype).view(shape)


def add_noise(
    abar: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """``q(x_t | x_0)``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (differentiable in ``x0``)."""
    a, s = _coefficients(abar, timesteps, x0)
    return a * x0 + s * noise


def predicted_x0(
    prediction_type: str, abar: torch.Tensor, x_t: torch.Tensor, output: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The clean latent a model output implies at ``x_t`` (``epsilon``, ``v_prediction`` or ``sample``)."""
    a, s = _coefficients(abar, timesteps, x_t)
    if prediction_type == "epsilon":
        return (x_t - s * output) / a
    if prediction_type == "v_prediction":
        return a * x_t - s * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def generate_latents(
    unet: nn.Module,
    noise: torch.Tensor,
    cond: torch.Tensor,
    t_init: int,
    abar: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """``x_g = G(z, c)``: the clean latents of one-step generator ``unet`` from start noise ``noise`` (``[n, C, h, w]``)
    under text embeddings ``cond``. Differentiable in the UNet's weights (SFD trains through it)."""
    timesteps = torch.full((noise.shape[0],), int(t_init), dtype=torch.long, device=noise.device)
    x_init = add_noise(abar, torch.zeros_like(noise), noise, timesteps)
    output = unet(x_init, timesteps, encoder_hidden_states=cond).sample
    return predicted_x0(prediction_type, abar, x_init, output, timesteps)


# ------------------------------------------------------------------------------------------------------- sampling


def start_noise(pipe: Any, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
    """The start latents ``StableDiffusionPipeline`` draws for these seeds (one generator per image)."""
    from diffusers.utils.torch_utils import randn_tensor

    device = pipe.device
    gen_device = "cpu" if device.type == "mps" else device
    generators = [torch.Generator(gen_device).manual_seed(int(s)) for s in seeds]
    shape = (
        len(seeds),
        pipe.unet.config.in_channels,
        height // pipe.vae_scale_factor,
        width // pipe.vae_scale_factor,
    )
    noise = randn_tensor(shape, generator=generators, device=device, dtype=pipe.unet.dtype)
    return noise * pipe.scheduler.init_noise_sigma


@torch.no_grad()
def _decode(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return images.float().clamp(-1, 1).cpu()


@torch.no_grad()
def sample_from_embeddings(
    pipe: Any,
    prompt_embeds: torch.Tensor,
    seeds: Sequence[int],
    height: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """Images ``[n, 3, H, W]`` in ``[-1, 1]`` (CPU) of one-step generator ``pipe`` for text embeddings ``[n, L, D]``."""
    t_init = one_step_timestep(pipe)
    if t_init is None:
        raise ValueError("this pipeline is not marked as a one-step generator")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    noise = start_noise(pipe, seeds, height or size, width or size)
    cond = prompt_embeds.to(device=pipe.device, dtype=pipe.unet.dtype)
    latents = generate_latents(
        pipe.unet, noise, cond, t_init, alphas_cumprod(pipe.scheduler), pipe.scheduler.config.prediction_type
    )
    return _decode(pipe, latents)


@torch.no_grad()
def sample_one_step(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    batch_size: int = 128,
    height: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """Images for ``prompts[i]`` with seed ``seeds[i]``: ``[n, 3, H, W]`` in ``[-1, 1]`` on the CPU, one UNet call per
    batch. The same contract as :func:`generators.sd.sample_sd` (an image depends only on model, prompt and seed)."""
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    out = []
    for i in range(0, len(prompts), batch_size):
        embeds, _ = pipe.encode_prompt(
            list(prompts[i : i + batch_size]), pipe.device, 1, do_classifier_free_guidance=False
        )
        out.append(sample_from_embeddings(pipe, embeds, seeds[i : i + batch_size], height, width))
    return torch.cat(out) if out else torch.zeros(0)
