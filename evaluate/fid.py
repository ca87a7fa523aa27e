"""FID through torchmetrics' ``FrechetInceptionDistance`` with a pluggable feature network.

On MiniCanvas the feature network is the MiniCanvas classifier's penultimate layer (an Inception network has
never seen 32 px procedural paintings, and none can be downloaded here); on real models it is Inception
loaded from a local weights file. Either way the Fréchet distance itself is torchmetrics' own.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance


class ClassifierFeatures(nn.Module):
    """Adapter: images in ``[0, 1]`` (any size) -> the MiniCanvas classifier's penultimate features."""

    def __init__(self, classifier, image_size: int = 32):
        super().__init__()
        self.classifier = classifier.eval()
        self.image_size = image_size
        self.num_features = classifier.config["feature_dim"]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return self.classifier.features(x * 2 - 1).double()


def classifier_fid(classifier, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 512) -> float:
    """FID between two image sets in ``[-1, 1]`` using classifier features."""
    metric = FrechetInceptionDistance(feature=ClassifierFeatures(classifier), normalize=True,
                                      input_img_size=(3, 32, 32))
    device = next(classifier.parameters()).device
    metric = metric.to(device)
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, len(images), batch_size):
            metric.update(((images[i : i + batch_size] + 1) / 2).clamp(0, 1).to(device), real=is_real)
    return float(metric.compute())
