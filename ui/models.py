"""Loaded backbones for comparisons, shared by all requests, and images from them before and after a run.

A base backbone is loaded once and kept (a few at most). A run's weights are not loaded into a copy: the changed
tensors are swapped in, the "after" images generated, and the originals put back, all under the backbone's lock,
so two users comparing at once wait for each other instead of seeing each other's weights. Original ("before")
images are memoised by (backbone, prompt, seed, sampler settings), since every run of a backbone compares against
the same ones. Sampling is seeded per image (:func:`generators.sd.sample_sd`), so an image does not depend on
what else is generated with it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from erasure.errors import UserError
from generators.loading import backbone_components, load_backbone
from generators.registry import Backbone
from ui.prompts import Item

MAX_LOADED = 2
MAX_REMEMBERED_IMAGES = 1024


@dataclass(frozen=True)
class Sampling:
    steps: int
    guidance: float


@dataclass
class _Loaded:
    model: Any
    stamp: float
    lock: threading.Lock


class ModelPool:
    """Base backbones by spec, and seeded images of them with or without a run's weights."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._before: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def before_after(
        self,
        backbone: Backbone,
        weights: dict[str, dict[str, torch.Tensor]],
        items: Sequence[Item],
        sampling: Sampling,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images of ``items`` from the original backbone and with ``weights`` applied: two ``[n, 3, H, W]``."""
        entry = self._entry(backbone)
        with entry.lock:
            before = self._before_images(backbone, entry, items, sampling)
            with _patched(entry.model, weights):
                after = _generate(entry.model, items, sampling)
        return before, after

    def _entry(self, backbone: Backbone) -> _Loaded:
        stamp = _stamp(backbone.path)
        with self._lock:
            entry = self._loaded.get(backbone.spec)
            if entry is None or entry.stamp != stamp:
                entry = _Loaded(model=None, stamp=stamp, lock=threading.Lock())
                self._loaded[backbone.spec] = entry
            self._loaded.move_to_end(backbone.spec)
            while len(self._loaded) > MAX_LOADED:
                self._loaded.popitem(last=False)
        with entry.lock:  # loaded by the first request that needs it; the others wait for it
            if entry.model is None:
                entry.model = load_backbone(backbone, self.device, "fp32")
        return entry

    def _before_images(
        self, backbone: Backbone, entry: _Loaded, items: Sequence[Item], sampling: Sampling
    ) -> torch.Tensor:
        keys = [(backbone.spec, entry.stamp, item.prompt, item.seed, sampling) for item in items]
        with self._lock:
            found = [self._before.get(key) for key in keys]
        missing = [i for i, image in enumerate(found) if image is None]
        if missing:
            fresh = _generate(entry.model, [items[i] for i in missing], sampling)
            with self._lock:
                for i, image in zip(missing, fresh):
                    found[i] = image
                    self._before[keys[i]] = image
                while len(self._before) > MAX_REMEMBERED_IMAGES:
                    self._before.popitem(last=False)
        return torch.stack([image for image in found if image is not None])


@contextmanager
def _patched(model: Any, weights: dict[str, dict[str, torch.Tensor]]) -> Iterator[None]:
    """``model`` with ``weights`` (``{component: {tensor name: tensor}}``) loaded; the originals restored after."""
    components = backbone_components(model)
    saved: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for component, tensors in weights.items():
            module = components.get(component)
            if module is None:
                raise UserError(f"the run changed component {component!r}, which the backbone does not have")
            state = module.state_dict()
            unknown = [key for key in tensors if key not in state]
            if unknown:
                raise UserError(f"the run changed {component}.{unknown[0]}, which the backbone does not have")
            saved[component] = {key: state[key].detach().clone() for key in tensors}
            module.load_state_dict(tensors, strict=False)
        yield
    finally:
        for component, tensors in saved.items():
            components[component].load_state_dict(tensors, strict=False)


@torch.no_grad()
def _generate(model: Any, items: Sequence[Item], sampling: Sampling) -> torch.Tensor:
    if isinstance(model, torch.nn.Module):
        return _generate_gan(model, items)
    from generators.sd import sample_sd

    return sample_sd(
        model,
        [item.prompt for item in items],
        [item.seed for item in items],
        num_inference_steps=sampling.steps,
        guidance_scale=sampling.guidance,
    )


def _generate_gan(generator: torch.nn.Module, items: Sequence[Item]) -> torch.Tensor:
    device = next(generator.parameters()).device
    style_dim = int(generator.style_dim)
    z = torch.stack(
        [torch.randn(style_dim, generator=torch.Generator().manual_seed(item.seed)) for item in items]
    )
    images, _ = generator([z.to(device)], randomize_noise=False)
    return images.clamp(-1, 1).float().cpu()


def _stamp(path: Path) -> float:
    """Changes when the backbone's files are replaced (e.g. the world rebuilt), so a stale load is not reused."""
    marker = path / "model_index.json" if path.is_dir() else path
    try:
        return marker.stat().st_mtime
    except OSError:
        return 0.0
