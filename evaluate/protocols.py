"""Canvas protocols: which concepts, prompts, seeds, sampler, judge, FID features, CLIP and real images to use.

UnlearnCanvas (Zhang et al. 2024) fixes an *answer set*: the template prompt ``"A {object} image in {style}
style."`` for every (style, object) pair, one image per seed, judged by a style and an object classifier. Two
protocols implement it:

* :class:`MiniCanvasProtocol` -- the built-in MiniCanvas world (12 styles x 10 objects, MiniSD's DDIM sampler,
  the MiniCanvas classifier as judge and FID feature network, MiniCLIP, procedural real images). Tiers:
  ``smoke`` (machinery check: every style and object twice, 4 steps), ``quick`` (the full grid, 1 seed,
  MiniSD's default 25 steps), ``full`` (the full grid x UnlearnCanvas' 5 seeds).
* :class:`UnlearnCanvasProtocol` -- the real benchmark on disk: 51 style labels (50 styles + ``Seed_Images``) x
  20 objects, seeds 188/288/588/688/888, DDIM 100 steps, CFG 9, 512 px; ViT-Large judges from local checkpoints;
  FID with torchvision Inception from a local weights file against dataset images 1-5 of each pair; CLIP from a
  local folder. ``quick`` uses seed 188 only and ``smoke`` additionally the cyclic subset and 10 steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from erasure.errors import UserError
from evaluate.sampling import SamplerSettings

if TYPE_CHECKING:
    from evaluate.clip_score import ClipPair
    from evaluate.judges import LabelJudge

Tier = Literal["smoke", "quick", "full"]
TIERS: tuple[Tier, ...] = ("smoke", "quick", "full")
UNLEARNCANVAS_SEEDS: tuple[int, ...] = (188, 288, 588, 688, 888)
REAL_IMAGE_SEED = 20_250_101
"""Seed of MiniCanvas' procedural real images for FID (never used by world training streams)."""


@dataclass(frozen=True)
class CanvasTier:
    """One tier of a protocol: answer-set seeds, sampler, real images per pair, and grid or cyclic subset."""

    seeds: tuple[int, ...]
    sampler: SamplerSettings
    real_per_pair: int
    cyclic: bool = False
    """Instead of every (style, object) pair, pair style ``s`` with objects ``s`` and ``s + 1`` (mod objects) and
    vice versa: every style and object appears at least twice (a machinery check, not a benchmark number)."""


@dataclass(frozen=True)
class AnswerSet:
    """Prompts and seeds of an answer set, with the prompted style and object index of each image."""

    prompts: list[str]
    seeds: list[int]
    styles: Tensor
    objects: Tensor

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, mask: Tensor) -> AnswerSet:
        idx = mask.nonzero().flatten().tolist()
        return AnswerSet([self.prompts[i] for i in idx], [self.seeds[i] for i in idx], self.styles[idx],
                         self.objects[idx])


class CanvasProtocol(ABC):
    """Concepts, prompts, tiers and measuring instruments of an UnlearnCanvas-style evaluation."""

    name: str
    styles: list[str]
    objects: list[str]
    ignored_styles: tuple[str, ...] = ()
    tiers: dict[str, CanvasTier]

    def prompt(self, style: str, obj: str) -> str:
        return f"A {obj} image in {style} style."

    def tier(self, tier: str) -> CanvasTier:
        if tier not in self.tiers:
            raise ValueError(f"unknown tier {tier!r}; allowed: {', '.join(self.tiers)}")
        return self.tiers[tier]

    def pairs(self, tier: str) -> list[tuple[int, int]]:
        """(style index, object index) pairs of the tier's answer set."""
        n_s, n_o = len(self.styles), len(self.objects)
        if not self.tier(tier).cyclic:
            return [(s, o) for s in range(n_s) for o in range(n_o)]
        pairs = {(s, (s + d) % n_o) for s in range(n_s) for d in (0, 1)}
        pairs |= {((o + d) % n_s, o) for o in range(n_o) for d in (0, 1)}
        return sorted(pairs)

    def answer_set(self, tier: str) -> AnswerSet:
        prompts, seeds, styles, objects = [], [], [], []
        for seed in self.tier(tier).seeds:
            for s, o in self.pairs(tier):
                prompts.append(self.prompt(self.styles[s], self.objects[o]))
                seeds.append(seed)
                styles.append(s)
                objects.append(o)
        return AnswerSet(prompts, seeds, torch.tensor(styles), torch.tensor(objects))

    def ignored_style_indices(self) -> list[int]:
        return [self.styles.index(name) for name in self.ignored_styles]

    @abstractmethod
    def judge(self) -> LabelJudge:
        """The style/object judge (labels in the order of ``styles`` and ``objects``)."""

    @abstractmethod
    def fid_features(self) -> nn.Module:
        """FID feature network (images in [0, 1] -> [n, d])."""

    @abstractmethod
    def clip(self) -> ClipPair:
        """``(model, processor)`` for torchmetrics' CLIPScore."""

    @abstractmethod
    def real_images(self, pairs: list[tuple[int, int]], per_pair: int, size: int | None = None) -> Tensor:
        """``per_pair`` real images of each (style, object) pair, in [-1, 1] (``size`` px if given)."""


class MiniCanvasProtocol(CanvasProtocol):
    """UnlearnCanvas' protocol on the MiniCanvas world (``world_dir()`` or ``root``)."""

    name = "minicanvas"

    def __init__(self, device: str | torch.device = "cpu", root: Path | None = None,
                 tiers: dict[str, CanvasTier] | None = None) -> None:
        from generators.minicanvas.concepts import OBJECTS, STYLES, TEMPLATE
        from generators.minicanvas.world import SD_GUIDANCE, SD_STEPS

        self.device = torch.device(device)
        self.root = root
        self.styles, self.objects, self.template = list(STYLES), list(OBJECTS), TEMPLATE
        self.tiers = tiers or {
            "smoke": CanvasTier((188,), SamplerSettings(steps=4, guidance=SD_GUIDANCE), 2, cyclic=True),
            "quick": CanvasTier((188,), SamplerSettings(steps=SD_STEPS, guidance=SD_GUIDANCE), 5),
            "full": CanvasTier(UNLEARNCANVAS_SEEDS, SamplerSettings(steps=SD_STEPS, guidance=SD_GUIDANCE), 20),
        }

    def prompt(self, style: str, obj: str) -> str:
        return self.template.format(style=style, object=obj)

    @cached_property
    def _judge(self) -> LabelJudge:
        from evaluate.judges import MiniCanvasJudge

        return MiniCanvasJudge.load(self.device, self.root)

    def judge(self) -> LabelJudge:
        return self._judge

    def fid_features(self) -> nn.Module:
        from evaluate.fid import ClassifierFeatures

        return ClassifierFeatures(self._judge.classifier)

    @cached_property
    def _clip(self) -> ClipPair:
        from evaluate.clip_score import minicanvas_clip

        return minicanvas_clip(self.device, self.root)

    def clip(self) -> ClipPair:
        return self._clip

    def real_images(self, pairs: list[tuple[int, int]], per_pair: int, size: int | None = None) -> Tensor:
        from generators.minicanvas.dataset import IMAGE_SIZE, render

        s = torch.tensor([p[0] for p in pairs]).repeat(per_pair)
        o = torch.tensor([p[1] for p in pairs]).repeat(per_pair)
        g = torch.Generator().manual_seed(REAL_IMAGE_SEED)
        return torch.cat([render(s[i : i + 512], o[i : i + 512], g, size or IMAGE_SIZE) for i in range(0, len(s), 512)])


# UnlearnCanvas' label lists (``machine_unlearning/evaluation/constants/const.py``: theme_available, class_available).
UNLEARNCANVAS_STYLES: list[str] = [
    "Abstractionism", "Artist_Sketch", "Blossom_Season", "Bricks", "Byzantine", "Cartoon", "Cold_Warm",
    "Color_Fantasy", "Comic_Etch", "Crayon", "Cubism", "Dadaism", "Dapple", "Defoliation", "Early_Autumn",
    "Expressionism", "Fauvism", "French", "Glowing_Sunset", "Gorgeous_Love", "Greenfield", "Impressionism",
    "Ink_Art", "Joy", "Liquid_Dreams", "Magic_Cube", "Meta_Physics", "Meteor_Shower", "Monet", "Mosaic",
    "Neon_Lines", "On_Fire", "Pastel", "Pencil_Drawing", "Picasso", "Pop_Art", "Red_Blue_Ink", "Rust",
    "Seed_Images", "Sketch", "Sponge_Dabbed", "Structuralism", "Superstring", "Surrealism", "Ukiyoe", "Van_Gogh",
    "Vibrant_Flow", "Warm_Love", "Warm_Smear", "Watercolor", "Winter",
]  # fmt: skip
UNLEARNCANVAS_OBJECTS: list[str] = [
    "Architectures", "Bears", "Birds", "Butterfly", "Cats", "Dogs", "Fishes", "Flame", "Flowers", "Frogs",
    "Horses", "Human", "Jellyfish", "Rabbits", "Sandwiches", "Sea", "Statues", "Towers", "Trees", "Waterfalls",
]  # fmt: skip
UNLEARNCANVAS_SAMPLER = SamplerSettings(steps=100, guidance=9.0, height=512, width=512, scheduler="ddim",
                                        batch_size=8)


@dataclass(frozen=True)
class UnlearnCanvasAssets:
    """Local files of the real UnlearnCanvas protocol (nothing is downloaded)."""

    style_classifier: Path | None = None
    object_classifier: Path | None = None
    inception_weights: Path | None = None
    real_images: Path | None = None
    """UnlearnCanvas dataset folder: ``<style>/<object>/<i>.jpg``."""
    clip: Path | None = None
    """A transformers CLIP folder."""
    judge_arch: str = "vit_large_patch16_224"


class UnlearnCanvasProtocol(CanvasProtocol):
    """The UnlearnCanvas benchmark protocol (Zhang et al. 2024) with assets from local files."""

    name = "unlearncanvas"
    ignored_styles = ("Seed_Images",)

    def __init__(self, assets: UnlearnCanvasAssets, device: str | torch.device = "cpu",
                 tiers: dict[str, CanvasTier] | None = None, judge_kwargs: dict | None = None) -> None:
        self.assets = assets
        self.device = torch.device(device)
        self.styles, self.objects = list(UNLEARNCANVAS_STYLES), list(UNLEARNCANVAS_OBJECTS)
        self.judge_kwargs = judge_kwargs
        smoke_sampler = replace(UNLEARNCANVAS_SAMPLER, steps=10)
        self.tiers = tiers or {
            "smoke": CanvasTier((188,), smoke_sampler, 5, cyclic=True),
            "quick": CanvasTier((188,), UNLEARNCANVAS_SAMPLER, 5),
            "full": CanvasTier(UNLEARNCANVAS_SEEDS, UNLEARNCANVAS_SAMPLER, 5),
        }

    def prompt(self, style: str, obj: str) -> str:
        # UnlearnCanvas' sampler: underscores in style names become spaces.
        return f"A {obj} image in {style.replace('_', ' ')} style."

    @cached_property
    def _judge(self) -> LabelJudge:
        from evaluate.judges import ViTJudge

        return ViTJudge.from_checkpoints(
            {"style": self.assets.style_classifier, "object": self.assets.object_classifier},
            {"style": self.styles, "object": self.objects},
            arch=self.assets.judge_arch,
            device=self.device,
            model_kwargs=self.judge_kwargs,
        )

    def judge(self) -> LabelJudge:
        return self._judge

    def fid_features(self) -> nn.Module:
        from evaluate.fid import InceptionFeatures

        return InceptionFeatures(self.assets.inception_weights).to(self.device)

    @cached_property
    def _clip(self) -> ClipPair:
        from evaluate.clip_score import local_clip

        if self.assets.clip is None:
            raise UserError("the unlearncanvas protocol's CLIP score needs a local CLIP folder: pass --clip DIR")
        return local_clip(self.assets.clip, self.device)

    def clip(self) -> ClipPair:
        return self._clip

    def real_images(self, pairs: list[tuple[int, int]], per_pair: int, size: int | None = None) -> Tensor:
        import numpy as np
        from PIL import Image

        root = self.assets.real_images
        if root is None:
            raise UserError("the unlearncanvas protocol's FID needs the UnlearnCanvas images: pass --real-images DIR")
        size = size or 512
        out = []
        for s, o in pairs:
            for i in range(1, per_pair + 1):
                path = Path(root) / self.styles[s] / self.objects[o] / f"{i}.jpg"
                if not path.is_file():
                    raise UserError(f"--real-images: {path} is missing (expected <style>/<object>/<i>.jpg)")
                image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
                out.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1)
        return torch.stack(out)
