"""CLIP score through torchmetrics' ``CLIPScore``, fed with MiniCLIP or a local CLIP folder (never a download).

torchmetrics (>= 1.7) accepts a zero-argument callable returning ``(model, processor)`` in place of a hub name.
It calls ``model.get_image_features(pixel_values)`` / ``model.get_text_features(input_ids, attention_mask)``
positionally and L2-normalises what they return, so the model must return plain tensors. transformers 5's
``CLIPModel`` returns an output object whose ``pooler_output`` holds the projected embedding;
:class:`ProjectedCLIP` adapts it. The processor gets uint8-range images (``CLIPImageProcessor`` rescales by 1/255
itself) and text truncated to the model's context (:class:`TruncatingProcessor`), so long prompts keep their
end-of-text token instead of being cut after tokenisation.

Scores are torchmetrics' ``100 * cos(image, text)``: 0-100, higher is better (papers using 0-1, e.g.
UnlearnDiffAtk's tables, divide by 100). :class:`PerSampleCLIPScore` also keeps every per-sample score, for
distributional comparisons (the GAN suite's Wasserstein distance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.functional.multimodal.clip_score import _clip_score_update
from torchmetrics.multimodal.clip_score import CLIPScore
from torchmetrics.utilities import dim_zero_cat

from erasure.errors import UserError

ClipPair = tuple[nn.Module, Any]


def _projected(output: Any) -> Tensor:
    return output if torch.is_tensor(output) else output.pooler_output


class ProjectedCLIP(nn.Module):
    """A transformers ``CLIPModel`` whose ``get_*_features`` return the projected embeddings as tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.config = model.config

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return _projected(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return _projected(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class TruncatingProcessor:
    """A ``CLIPProcessor`` whose text is truncated to the model's context length (images pass through)."""

    def __init__(self, processor: Any, max_length: int) -> None:
        self.processor = processor
        self.max_length = max_length

    def __call__(self, text: Sequence[str] | None = None, images: Any = None, **kwargs: Any) -> Any:
        if text is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return self.processor(text=text, images=images, **kwargs)


def clip_pair(model: nn.Module, processor: Any) -> ClipPair:
    """Adapt a transformers ``(CLIPModel, CLIPProcessor)`` to what torchmetrics' CLIPScore calls."""
    max_length = int(model.config.text_config.max_position_embeddings)
    return ProjectedCLIP(model), TruncatingProcessor(processor, max_length)


def minicanvas_clip(device: str | torch.device = "cpu", root: Path | None = None) -> ClipPair:
    """MiniCLIP of the MiniCanvas world (``world_dir()/clip``)."""
    from generators.minicanvas.world import load_clip

    return clip_pair(*load_clip(str(device), root))


def local_clip(folder: str | Path, device: str | torch.device = "cpu") -> ClipPair:
    """A transformers CLIP folder on disk (``config.json`` + weights + processor files); never downloaded."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise UserError(f"--clip {folder}: not a transformers CLIP folder (no config.json)")
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
    processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    return clip_pair(model.to(device).eval(), processor)


def to_uint8(images: Tensor) -> Tensor:
    """Images in ``[-1, 1]`` -> uint8 ``[0, 255]`` (the range CLIP processors expect)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class PerSampleCLIPScore(CLIPScore):
    """torchmetrics' ``CLIPScore`` that also keeps the per-sample scores (``per_sample()``).

    ``update`` accepts images in ``[-1, 1]`` (converted to uint8) or uint8 images, and captions.
    """

    scores: list[Tensor]

    def __init__(self, pair: ClipPair | Callable[[], ClipPair], **kwargs: Any) -> None:
        super().__init__(model_name_or_path=pair if callable(pair) else (lambda: pair), **kwargs)
        self.add_state("scores", [], dist_reduce_fx="cat")

    def update(self, source: Tensor | list[str], target: Tensor | list[str]) -> None:  # type: ignore[override]
        device = next(self.model.parameters()).device
        source, target = _prepare(source, device), _prepare(target, device)
        with torch.no_grad():
            score, n_samples = _clip_score_update(source, target, self.model, self.processor)
        score = score.to(self.score.device)
        self.score += score.sum(0)
        self.n_samples += n_samples
        self.scores.append(score.detach().double().flatten())

    def per_sample(self) -> Tensor:
        if not self.scores:
            raise ValueError("no CLIP scores yet")
        return dim_zero_cat(self.scores)


def _prepare(value: Tensor | list[str] | str, device: torch.device) -> Any:
    """Images as a list of uint8 CHW tensors on the model's device (torchmetrics moves the model to them)."""
    if torch.is_tensor(value):
        value = to_uint8(value) if value.is_floating_point() else value
        return list(value.to(device))
    return value


def clip_scores(pair: ClipPair, images: Tensor, captions: Sequence[str], batch_size: int = 256) -> Tensor:
    """Per-image CLIP scores (0-100) of images in ``[-1, 1]`` against their captions."""
    metric = PerSampleCLIPScore(pair)
    for i in range(0, len(images), batch_size):
        metric.update(images[i : i + batch_size], list(captions[i : i + batch_size]))
    return metric.per_sample()


def mean_clip_score(pair: ClipPair, images: Tensor, captions: Sequence[str], batch_size: int = 256) -> float:
    """torchmetrics' CLIP score (mean over images, clamped at 0) of images in ``[-1, 1]`` against captions."""
    metric = PerSampleCLIPScore(pair)
    for i in range(0, len(images), batch_size):
        metric.update(images[i : i + batch_size], list(captions[i : i + batch_size]))
    return float(metric.compute())
