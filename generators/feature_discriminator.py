"""A discriminator on a frozen, pretrained image encoder's features ("vision-aided" GAN training).

Kumari et al., "Ensembling Off-the-shelf Models for GAN Training" (CVPR 2022), and Sauer et al., "Projected GANs
Converge Faster" (NeurIPS 2021), add to a GAN a second discriminator: a small trainable head on the features of a
frozen pretrained network (CLIP's vision tower in Kumari et al.). Its features already separate the concepts of the
data, so the head tells real from fake along directions the pixel discriminator would take many steps to find; the
generator is trained against both. Both papers report several-fold faster convergence and better mode coverage.

Here the frozen network is a transformers ``CLIPVisionModel`` (MiniCLIP's on MiniCanvas). :class:`CLIPPatchFeatures`
turns the patch tokens of chosen layers back into feature maps, and :class:`FeatureDiscriminator` puts one small
convolutional head on each map, giving patch-level logits (as Projected GAN's multi-scale heads do). The head is a
training aid only: the StyleGAN2 discriminator is trained as before and is the one that ships.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["CLIPPatchFeatures", "FeatureDiscriminator", "clip_pixel_values"]


def clip_pixel_values(images: Tensor, mean: Tensor, std: Tensor, size: int) -> Tensor:
    """Images in [-1, 1] as a CLIP vision tower's ``pixel_values``: mapped to [0, 1], normalised with the image
    processor's ``mean``/``std`` (shape (1, 3, 1, 1)), resized (bilinear, antialiased) to ``size`` when needed."""
    x = ((images + 1) / 2 - mean) / std
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


class CLIPPatchFeatures(nn.Module):
    """Frozen CLIP vision tower: images in [-1, 1] -> one (B, hidden, h, w) patch-token map per chosen layer.

    Args:
        vision_model: a transformers ``CLIPVisionModel`` (or ``CLIPModel.vision_model``-like module accepting
            ``pixel_values`` and ``output_hidden_states``).
        image_mean, image_std: the CLIP image processor's normalisation (images are mapped to [0, 1] first).
        layers: indices into ``hidden_states`` (0 = patch embeddings, i = output of encoder layer i).
    """

    def __init__(
        self,
        vision_model: nn.Module,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        layers: Sequence[int],
    ) -> None:
        super().__init__()
        self.vision_model = vision_model.eval()
        self.vision_model.requires_grad_(False)
        config = vision_model.config
        self.image_size = int(config.image_size)
        self.grid = self.image_size // int(config.patch_size)
        self.hidden_size = int(config.hidden_size)
        if not layers or any(not 0 <= i <= int(config.num_hidden_layers) for i in layers):
            raise ValueError(f"layers must lie in 0..{config.num_hidden_layers}, got {list(layers)}")
        self.layers = tuple(int(i) for i in layers)
        self.register_buffer("mean", torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> CLIPPatchFeatures:
        super().train(mode)
        self.vision_model.eval()  # frozen: dropout and the like stay off
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        x = clip_pixel_values(images, self.mean, self.std, self.image_size)
        hidden = self.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
        maps = []
        for index in self.layers:
            tokens = hidden[index][:, 1:]  # drop the class token
            maps.append(tokens.transpose(1, 2).reshape(tokens.shape[0], self.hidden_size, self.grid, self.grid))
        return maps


class FeatureDiscriminator(nn.Module):
    """One small convolutional head per feature map; returns all patch logits of a batch as (B, n_logits).

    Args:
        in_channels: channels of each feature map (the encoder's hidden size).
        n_maps: number of feature maps (layers) the heads read.
        width: hidden channels of each head.
    """

    def __init__(self, in_channels: int, n_maps: int, width: int = 64) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1),
                nn.LeakyReLU(0.2),
                nn.Conv2d(width, width, 3, padding=1, stride=2),
                nn.LeakyReLU(0.2),
                nn.Conv2d(width, 1, 1),
            )
            for _ in range(n_maps)
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} feature maps, got {len(features)}")
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, features, strict=True)], dim=1)
