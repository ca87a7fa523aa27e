"""Judges: models that say which concept an image shows.

Every suite asks its questions through :class:`Judge` (``shows(images, concept) -> bool per image``), so the
evaluator does not care whether the answer comes from a classifier, a VLM or a detector:

* :class:`LabelJudge` -- a classifier with one head per axis (``style``, ``object``) over fixed label lists;
  ``shows`` is "the argmax is that label". UnlearnCanvas (Zhang et al. 2024) judges this way.
* :class:`MiniCanvasJudge` -- the MiniCanvas classifier (both heads in one network).
* :class:`ViTJudge` -- UnlearnCanvas' judges: ViT-Large style (51-way) and object (20-way) classifiers, loaded
  from local checkpoints with ``timm.create_model(arch, pretrained=False, num_classes=n)`` and the checkpoint's
  ``["model_state_dict"]`` (``torch.load(weights_only=True)``); images resized to 224, normalised with mean/std 0.5.
* :class:`FunctionJudge` -- any callable ``(images, concept) -> bool tensor``: the plug-in point for HUB's judges
  (Moon et al. 2024: a VLM asked yes/no, the GIPHY celebrity detector, NudeNet or Q16 for NSFW).

Images are always ``[n, 3, H, W]`` in ``[-1, 1]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from erasure.errors import UserError


class ConceptLike(Protocol):
    """A concept: ``kind`` (``"style"``, ``"object"``, or a judge-specific kind) and ``name``."""

    @property
    def kind(self) -> str: ...

    @property
    def name(self) -> str: ...


class Judge(ABC):
    """Decides, per image, whether it shows a concept."""

    @abstractmethod
    def shows(self, images: Tensor, concept: ConceptLike) -> Tensor:
        """Bool tensor ``[n]``: does image ``i`` show ``concept``?"""


class LabelJudge(Judge):
    """A classifier judge: one head per axis over fixed label lists (``labels[axis][k]`` = name of class k)."""

    labels: dict[str, list[str]]
    batch_size: int = 256

    @abstractmethod
    def logits(self, images: Tensor) -> dict[str, Tensor]:
        """``{axis: [n, len(labels[axis])]}`` for one batch of images in ``[-1, 1]``."""

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """``{axis: predicted label index [n]}`` (argmax), computed in batches; on the CPU."""
        out: dict[str, list[Tensor]] = {axis: [] for axis in self.labels}
        for i in range(0, len(images), self.batch_size):
            for axis, logits in self.logits(images[i : i + self.batch_size]).items():
                out[axis].append(logits.argmax(dim=1).cpu())
        return {axis: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long) for axis, parts in out.items()}

    def index(self, concept: ConceptLike) -> int:
        names = self.labels.get(concept.kind)
        if names is None:
            raise ValueError(f"this judge has no {concept.kind!r} axis (it has {', '.join(self.labels)})")
        if concept.name not in names:
            raise ValueError(f"{concept.name!r} is not a {concept.kind} label of this judge")
        return names.index(concept.name)

    def shows(self, images: Tensor, concept: ConceptLike) -> Tensor:
        return self.predict(images)[concept.kind] == self.index(concept)


class MiniCanvasJudge(LabelJudge):
    """The MiniCanvas classifier (``world.load_classifier``): style and object heads on 32 px images."""

    def __init__(self, classifier: nn.Module, image_size: int = 32) -> None:
        from generators.minicanvas.concepts import OBJECTS, STYLES

        self.classifier = classifier.eval()
        self.image_size = image_size
        self.labels = {"style": list(STYLES), "object": list(OBJECTS)}

    @classmethod
    def load(cls, device: str | torch.device = "cpu", root: Path | None = None) -> MiniCanvasJudge:
        from generators.minicanvas.world import load_classifier

        return cls(load_classifier(str(device), root))

    def logits(self, images: Tensor) -> dict[str, Tensor]:
        device = next(self.classifier.parameters()).device
        x = images.float().to(device)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        style, obj = self.classifier(x)
        return {"style": style, "object": obj}


class ViTJudge(LabelJudge):
    """One timm classifier per axis, as UnlearnCanvas' evaluation (``accuracy.py``): resize, normalise 0.5/0.5."""

    def __init__(self, models: dict[str, nn.Module], labels: dict[str, Sequence[str]], batch_size: int = 64) -> None:
        if set(models) != set(labels):
            raise ValueError("ViTJudge needs one model per label axis")
        self.models = {axis: model.eval() for axis, model in models.items()}
        self.labels = {axis: list(names) for axis, names in labels.items()}
        self.batch_size = batch_size

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: dict[str, str | Path | None],
        labels: dict[str, Sequence[str]],
        *,
        arch: str = "vit_large_patch16_224",
        device: str | torch.device = "cpu",
        model_kwargs: dict[str, Any] | None = None,
    ) -> ViTJudge:
        """Load ``{axis: checkpoint}`` into ``timm.create_model(arch, pretrained=False, num_classes=len(labels))``."""
        models = {
            axis: load_timm_classifier(path, arch, len(labels[axis]), axis, device, model_kwargs)
            for axis, path in checkpoints.items()
        }
        return cls(models, labels)

    def logits(self, images: Tensor) -> dict[str, Tensor]:
        out = {}
        for axis, model in self.models.items():
            device = next(model.parameters()).device
            size = _input_size(model)
            x = images.float().to(device)
            if x.shape[-2:] != size:
                # UnlearnCanvas: transforms.Resize((224, 224)) on the image, then Normalize(0.5, 0.5) = our [-1, 1].
                x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
            out[axis] = model(x)
        return out


def _input_size(model: nn.Module) -> tuple[int, int]:
    """The (H, W) a timm model takes: its patch embedding's image size (ViTs), else its pretrained config's."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None:
        size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-2:]
    return (int(size[0]), int(size[1]))


def load_timm_classifier(
    path: str | Path | None,
    arch: str,
    num_classes: int,
    axis: str,
    device: str | torch.device = "cpu",
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A timm classifier from a local checkpoint holding ``{"model_state_dict": ...}`` (or a bare state dict)."""
    import timm

    from evaluate.fid import load_state_dict_file

    state = load_state_dict_file(path, what=f"the {axis} classifier checkpoint", option=f"--{axis}-classifier")
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **(model_kwargs or {}))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{path}: does not fit timm {arch} with {num_classes} classes: {first}") from None
    return model.to(device).eval()


class FunctionJudge(Judge):
    """Wraps ``fn(images, concept) -> bool tensor [n]`` (a VLM, NudeNet, Q16 or any detector) as a Judge."""

    def __init__(self, fn: Callable[[Tensor, ConceptLike], Tensor], name: str = "custom") -> None:
        self.fn = fn
        self.name = name

    def shows(self, images: Tensor, concept: ConceptLike) -> Tensor:
        out = torch.as_tensor(self.fn(images, concept)).bool().flatten().cpu()
        if out.numel() != len(images):
            raise ValueError(f"judge {self.name!r} returned {out.numel()} answers for {len(images)} images")
        return out
