"""FID through torchmetrics' ``FrechetInceptionDistance`` with a pluggable feature network.

One code path: :func:`fid_metric` builds torchmetrics' metric around a feature module, and every FID in the
studio (MiniCanvas, UnlearnCanvas protocol, HUB quality, GAN) goes through it; the Fréchet distance itself is
torchmetrics' own (means and covariances accumulated in float64, matrix square root via eigenvalues).

Feature networks:

* :class:`ClassifierFeatures` -- on MiniCanvas, the MiniCanvas classifier's penultimate layer (an Inception
  network has never seen 32 px procedural paintings, and none can be downloaded here);
* :class:`InceptionFeatures` -- on real models, torchvision's Inception-v3 pool features (2048-d), loaded from a
  local weights file. This is the network UnlearnCanvas' FID uses (Zhang et al. 2024,
  ``machine_unlearning/evaluation/quantitative/fid.py``: torchvision ``inception_v3``, Mixed_7c average-pooled);
  nothing is ever downloaded, and a missing file is an error that says what to pass.

Every feature module takes images in ``[0, 1]`` (torchmetrics' ``normalize=True`` convention), any size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from erasure.errors import UserError


class ClassifierFeatures(nn.Module):
    """Adapter: images in ``[0, 1]`` (any size) -> the MiniCanvas classifier's penultimate features."""

    def __init__(self, classifier: nn.Module, image_size: int = 32) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.image_size = image_size
        self.num_features = int(classifier.config["feature_dim"])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return self.classifier.features(x * 2 - 1).double()


class InceptionFeatures(nn.Module):
    """torchvision Inception-v3 average-pooled Mixed_7c features (2048-d) from a local state-dict file.

    ``weights`` is a torchvision ``inception_v3`` state dict (``.pth``/``.pt`` read with
    ``torch.load(weights_only=True)``, or ``.safetensors``), e.g. torchvision's ``inception_v3_google-*.pth``.
    Images in ``[0, 1]`` are mapped to ``[-1, 1]`` and resized to ``input_size`` px: 299, as in UnlearnCanvas' FID
    script (smaller sizes, down to Inception's minimum of 75, only make machinery tests cheap).
    """

    num_features = 2048

    def __init__(self, weights: str | Path | None, input_size: int = 299) -> None:
        super().__init__()
        self.input_size = input_size
        from torchvision.models import inception_v3

        state = load_state_dict_file(weights, what="Inception-v3 weights", option="--inception-weights")
        net = inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=False)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(
                f"{weights}: not a torchvision inception_v3 state dict "
                f"(missing {len(missing)} tensors e.g. {missing[:2]}, unexpected {len(unexpected)} e.g. {unexpected[:2]})"
            )
        net.fc = nn.Identity()
        self.net = net.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * 2 - 1
        size = (self.input_size, self.input_size)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.net(x).double()


def load_state_dict_file(path: str | Path | None, *, what: str, option: str) -> dict[str, torch.Tensor]:
    """A state dict from a local ``.safetensors`` or ``.pt``/``.pth`` file (never downloaded; pickle-free).

    A ``{"model_state_dict": ...}`` or ``{"state_dict": ...}`` wrapper is unwrapped. ``option`` names the CLI
    option that supplies the file, for the error message.
    """
    from erasure.io import load_tensors, safe_torch_load

    if path is None:
        raise UserError(f"{what} are needed and are never downloaded: pass a local file with {option}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what}: {path} does not exist (pass a local file with {option})")
    data = load_tensors(path)[0] if path.suffix == ".safetensors" else safe_torch_load(path)
    for key in ("model_state_dict", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
        raise UserError(f"{what}: {path} does not hold a state dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in data.items()}


def fid_metric(features: nn.Module) -> FrechetInceptionDistance:
    """torchmetrics' FID around ``features`` (an ``nn.Module`` mapping ``[0, 1]`` images to ``[n, d]``)."""
    metric = FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=False)
    try:
        device = next(features.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    return metric.to(device)


def update_fid(metric: FrechetInceptionDistance, images: torch.Tensor, *, real: bool,
               batch_size: int = 256) -> None:
    """Feed images in ``[-1, 1]`` to ``metric`` in batches (on the metric's device)."""
    device = metric.device
    for i in range(0, len(images), batch_size):
        metric.update(((images[i : i + batch_size] + 1) / 2).clamp(0, 1).to(device), real=real)


def compute_fid(features: nn.Module, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 256) -> float:
    """FID between two image sets in ``[-1, 1]`` under the feature network ``features``."""
    metric = fid_metric(features)
    update_fid(metric, real, real=True, batch_size=batch_size)
    update_fid(metric, fake, real=False, batch_size=batch_size)
    return float(metric.compute())


def classifier_fid(classifier: nn.Module, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 512) -> float:
    """FID between two image sets in ``[-1, 1]`` using MiniCanvas classifier features."""
    return compute_fid(ClassifierFeatures(classifier), real, fake, batch_size)
