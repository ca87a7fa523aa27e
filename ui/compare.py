"""Before/after comparison of a run: the same prompts and seeds through the original and the erased model.

The target concept's images and the retained concepts' images are generated in pairs (see :mod:`ui.prompts`).
On the MiniCanvas world the judge (its classifier) also says, for each concept, which share of the images it
recognises as that concept before and after erasure.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from erasure.errors import UserError
from erasure.runs import read_run_weights
from generators.registry import Backbone, resolve_backbone
from ui.image_files import save_png
from ui.models import ModelPool, Sampling
from ui.prompts import Item, latent_items, minicanvas_items, retained_choices, text_items
from ui.run_index import RunInfo
from ui.settings import Limits
from ui.validation import bounded_float, bounded_int, bounded_lines, choices

JUDGE_COLUMNS = ["concept", "role", "images", "judged as concept before", "judged as concept after"]
GAN_LATENTS_PER_IMAGE = 4
"""GAN runs: latents drawn per requested image; they are split into target and others by the judge."""


@dataclass(frozen=True)
class CompareRequest:
    images_per_concept: int
    retained: list[str]
    retained_prompts: list[str]
    sampling: Sampling
    seed: int


@dataclass(frozen=True)
class Pair:
    item: Item
    before: torch.Tensor
    after: torch.Tensor


@dataclass(frozen=True)
class Comparison:
    run: RunInfo
    target: list[Pair]
    retained: list[Pair]
    judge_rows: list[list[object]]
    note: str


def check_request(
    limits: Limits,
    images_per_concept: object,
    retained: object,
    retained_prompts: object,
    steps: object,
    guidance: object,
    seed: object,
    retained_allowed: list[str],
) -> CompareRequest:
    """The request's inputs, each held to the server's limits (RequestError naming the first problem)."""
    return CompareRequest(
        images_per_concept=bounded_int(
            "images per concept", images_per_concept, 1, limits.max_images_per_concept
        ),
        retained=choices("retained concepts", retained, retained_allowed, limits.max_retained_concepts),
        retained_prompts=bounded_lines(
            "retained prompts", retained_prompts, limits.max_prompts, limits.max_prompt_chars
        ),
        sampling=Sampling(
            steps=bounded_int("sampling steps", steps, 1, limits.max_sample_steps),
            guidance=bounded_float("guidance", guidance, 0.0, limits.max_guidance),
        ),
        seed=bounded_int("seed", seed, 0, limits.max_seed),
    )


def run_backbone(run: RunInfo) -> Backbone:
    spec = run.config.get("backbone")
    if not isinstance(spec, str):
        raise UserError(f"run {run.name}: its config names no backbone")
    try:
        return resolve_backbone(spec)
    except ValueError as err:
        raise UserError(f"run {run.name}: its backbone {spec!r} is not available here: {err}") from None


def run_target(run: RunInfo) -> tuple[str, str]:
    """``(kind, name)`` of the run's target, e.g. ``("style", "Ember")``."""
    spec = str(run.config.get("target", ""))
    kind, _, name = spec.partition(":")
    if kind not in ("style", "object", "text") or not name:
        raise UserError(f"run {run.name}: its config has no valid target ({spec!r})")
    return kind, name


def retained_allowed(run: RunInfo) -> list[str]:
    """The MiniCanvas concepts a comparison of ``run`` may show as retained (none for other backbones)."""
    try:
        backbone = run_backbone(run)
        kind, name = run_target(run)
    except UserError:
        return []
    if not backbone.minicanvas or kind == "text":
        return []
    return retained_choices(kind, name)


def compare(run: RunInfo, request: CompareRequest, pool: ModelPool) -> Comparison:
    backbone = run_backbone(run)
    kind, name = run_target(run)
    weights = read_run_weights(run.path)
    if backbone.kind == "gan":
        return _compare_gan(run, backbone, kind, name, weights, request, pool)
    count, seed = request.images_per_concept, request.seed
    if backbone.minicanvas and kind in ("style", "object"):
        target_items = minicanvas_items(kind, name, count, seed)
        retained_items = [
            item for other in request.retained for item in minicanvas_items(kind, other, count, seed)
        ]
        note = ""
    else:
        prompt = name if kind != "style" else f"{name} style"
        target_items = text_items(f"{kind}:{name}", prompt, count, seed)
        retained_items = [
            item
            for prompt in request.retained_prompts
            for item in text_items(f"text:{prompt}", prompt, count, seed)
        ]
        note = "" if retained_items else "Add retained prompts to compare concepts that should be kept."
    items = target_items + retained_items
    before, after = pool.before_after(backbone, weights, items, request.sampling)
    pairs = [Pair(item, b, a) for item, b, a in zip(items, before, after)]
    target_pairs, retained_pairs = pairs[: len(target_items)], pairs[len(target_items) :]
    judge_rows = _judge_rows(backbone, kind, target_pairs, retained_pairs)
    return Comparison(run, target_pairs, retained_pairs, judge_rows, note)


def _compare_gan(
    run: RunInfo,
    backbone: Backbone,
    kind: str,
    name: str,
    weights: dict[str, dict[str, torch.Tensor]],
    request: CompareRequest,
    pool: ModelPool,
) -> Comparison:
    items = latent_items(request.images_per_concept * GAN_LATENTS_PER_IMAGE, request.seed)
    before, after = pool.before_after(backbone, weights, items, request.sampling)
    pairs = [Pair(item, b, a) for item, b, a in zip(items, before, after)]
    judge = _judge(backbone)
    if judge is None or kind == "text":
        return Comparison(
            run, pairs, [], [], "No judge for this backbone: all latents are shown as one group."
        )
    from generators.minicanvas.world import classify

    style_p, object_p = classify(judge, before)
    probs = style_p if kind == "style" else object_p
    index = _concept_index(kind, name)
    is_target = probs.argmax(1) == index
    target = [pair for pair, hit in zip(pairs, is_target.tolist()) if hit]
    others = [pair for pair, hit in zip(pairs, is_target.tolist()) if not hit]
    rows = _judge_rows(backbone, kind, target, [])
    note = f"{len(target)} of {len(pairs)} latents show {kind} {name} before erasure (by the judge)."
    return Comparison(run, target, others, rows, note)


# ----------------------------------------------------------------------------------------------- the judge

_JUDGES: dict[tuple[str, float], torch.nn.Module] = {}
_JUDGE_LOCK = threading.Lock()


def _judge(backbone: Backbone) -> torch.nn.Module | None:
    """The MiniCanvas classifier for MiniCanvas backbones (if the world has one), else None."""
    if not backbone.minicanvas:
        return None
    from generators.minicanvas.paths import world_dir

    folder = world_dir() / "classifier"
    config = folder / "config.json"
    if not config.is_file():
        return None
    key = (str(folder), config.stat().st_mtime)
    with _JUDGE_LOCK:
        if key not in _JUDGES:
            from generators.minicanvas.world import load_classifier

            _JUDGES.clear()
            _JUDGES[key] = load_classifier("cpu")
        return _JUDGES[key]


def _concept_index(kind: str, name: str) -> int:
    from generators.minicanvas.concepts import OBJECTS, STYLES

    return (STYLES if kind == "style" else OBJECTS).index(name)


def _judge_rows(
    backbone: Backbone, kind: str, target: list[Pair], retained: list[Pair]
) -> list[list[object]]:
    judge = _judge(backbone)
    if judge is None or kind not in ("style", "object") or not target:
        return []
    from generators.minicanvas.world import classify

    rows: list[list[object]] = []
    groups: dict[str, list[Pair]] = {}
    roles: dict[str, str] = {}
    for role, pairs in (("target", target), ("retained", retained)):
        for pair in pairs:
            groups.setdefault(pair.item.concept, []).append(pair)
            roles.setdefault(pair.item.concept, role)
    for concept, pairs in groups.items():
        concept_kind, _, name = concept.partition(":")
        if concept_kind != kind:
            continue
        index = _concept_index(kind, name)
        hits = []
        for images in (torch.stack([p.before for p in pairs]), torch.stack([p.after for p in pairs])):
            style_p, object_p = classify(judge, images)
            probs = style_p if kind == "style" else object_p
            hits.append(float((probs.argmax(1) == index).float().mean()))
        rows.append([concept, roles[concept], len(pairs), f"{hits[0]:.0%}", f"{hits[1]:.0%}"])
    return rows


def gallery_items(pairs: list[Pair], folder: Path, prefix: str) -> list[tuple[str, str]]:
    """Before and after of each pair side by side: ``before · caption``, ``after · caption``, … as PNG files in
    ``folder`` (see :mod:`ui.image_files` for why files and not images)."""
    out: list[tuple[str, str]] = []
    for index, pair in enumerate(pairs):
        for when, image in (("before", pair.before), ("after", pair.after)):
            path = save_png(image, folder / f"{prefix}-{index}-{when}.png")
            out.append((path, f"{when} · {pair.item.caption}"))
    return out
