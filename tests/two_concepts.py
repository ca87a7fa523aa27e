"""An exact two-concept diffusion model for attack tests, with the UNet's call interface (a diffusers ModelMixin).

Training even a tiny UNet to follow prompts costs minutes of CPU; the attack needs only *a* conditional diffusion
model that draws a concept from its prompt and not from another. This one is exact: the world has two images
(latents), the text embedding sets their prior through a logistic function, and the noise prediction is the
posterior one. The attack sees it only through the real pipeline (CLIP text encoder, scheduler, VAE).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput


class TwoConceptDenoiser(ModelMixin, ConfigMixin):
    """The exact noise predictor of a world with two images ``concepts[0]``/``concepts[1]`` (latents), drawn with
    probability ``sigmoid(+-beta * (score - mid))`` where ``score`` = mean text embedding . ``direction``.

    eps(x_t, t, c) = (x_t - sqrt(abar) E[x0 | x_t, c]) / sqrt(1 - abar), the posterior mean over the two images.
    """

    @register_to_config
    def __init__(self, in_channels: int = 4, sample_size: int = 16, embed_dim: int = 16,
                 time_cond_proj_dim: int | None = None) -> None:
        super().__init__()
        self.register_buffer("concepts", torch.zeros(2, in_channels, sample_size, sample_size))
        self.register_buffer("direction", torch.zeros(embed_dim))
        self.register_buffer("alphas", torch.zeros(1000))
        self.register_buffer("mid", torch.zeros(()))
        self.register_buffer("beta", torch.ones(()))
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def score(self, cond: torch.Tensor) -> torch.Tensor:
        return cond.float().mean(1) @ self.direction

    def forward(self, sample, timestep, encoder_hidden_states, return_dict: bool = True, **kwargs):
        n = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).long().reshape(-1).expand(n)
        abar = self.alphas[t].view(n, 1, 1, 1)
        s = self.beta * (self.score(encoder_hidden_states) - self.mid)
        log_prior = F.logsigmoid(torch.stack([s, -s], dim=1))
        dist = (sample.float()[:, None] - abar.sqrt()[:, None] * self.concepts[None]).pow(2).flatten(2).sum(-1)
        weights = (log_prior - dist / (2 * (1 - abar.view(n, 1)))).softmax(dim=1)
        x0 = torch.einsum("nc,cxyz->nxyz", weights, self.concepts)
        eps = (sample.float() - abar.sqrt() * x0) / (1 - abar).sqrt()
        return UNet2DConditionOutput(sample=eps) if return_dict else (eps,)
