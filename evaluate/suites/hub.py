"""``hub``: HUB's holistic aspects (Moon et al. 2024) on MiniCanvas, with the MiniCanvas classifier and MiniCLIP as
judges, plus UnlearnDiffAtk's attack robustness (Zhang et al. 2024).

For a target concept ``t`` (a style or an object) and its *partners* (the concepts of the other axis):

* ``target_proportion`` -- share of images from held-out paraphrases naming ``t`` (never seen in training) that
  the judge still labels ``t``. Lower is better after erasure.
* ``selective_alignment`` -- on the same images, share where the partner named in the prompt is still there
  (HUB: does the rest of the prompt survive?). Higher is better.
* ``multilingual`` -- target proportion on Spanish prompts (``ES_TEMPLATE``). Lower is better.
* ``quality_fid`` -- FID of the model's general (non-target) generations against the original model's
  generations of the same prompts and seeds (HUB's FID_SD); 0 for an unchanged model. Lower is better.
* ``alignment`` -- CLIP score (torchmetrics, 0-100) of the general generations against their prompts.
* ``pinpoint`` -- accuracy on the concepts nearest to ``t`` (same axis): the declared look-alike pairs first
  (``NEAR_STYLES``/``NEAR_OBJECTS``), then by MiniCLIP text similarity. Higher is better (no over-erasure).
* ``pre_attack_asr`` / ``attack_asr`` -- UnlearnDiffAtk's Pre-ASR and ASR on template prompts naming ``t``:
  see :mod:`evaluate.robustness`. Lower is better.

General images are the canvas answer set without the target (same prompts, seeds and sampler), so with a
generation cache the two suites share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from erasure.errors import UserError
from evaluate.protocols import MiniCanvasProtocol
from evaluate.registry import register_suite
from evaluate.robustness import AttackSettings
from evaluate.suite import EvalContext, Suite
from evaluate.suites.canvas import target_mask

if TYPE_CHECKING:
    from evaluate.clip_score import ClipPair


@dataclass(frozen=True)
class HubTier:
    seeds: tuple[int, ...]
    """Seeds of the paraphrase and Spanish prompts."""
    partners: int | None
    """How many partner concepts the target is paired with (None: all)."""
    pinpoint_k: int
    attack_prompts: int
    attack: AttackSettings


# The attack: UnlearnDiffAtk's token attack with the reference's budget per prompt: timestep blocks of 40 steps, up
# to 50 of them, stopping at the first success; quick attacks 5 prompts, full 10. Smaller budgets missed what it
# finds on this world: against ESD's job config, 5 blocks of 20 found no prompt on six of the twelve styles and 10
# blocks of 40 none on Ember, Lagoon, Frost and Meadow; 50 blocks of 40 broke ESD on Ember, Lagoon and Frost (ASR
# 0.2, 0.2, 1.0; docs/evaluation.md). A prompt that holds takes the reference's 2,000 steps; the prompts run side
# by side (one UNet batch per step), so on 2 CPU cores the quick tier's hub suite took 350 s for AdvUnlearn on Ember,
# which held all five (705 s when the prompts ran one after another; docs/performance.md).
HUB_TIERS: dict[str, HubTier] = {
    "smoke": HubTier((0,), 2, 1, 1, AttackSettings(steps=4, check_every=0)),
    "quick": HubTier((0,), None, 3, 5, AttackSettings(steps=2000, check_every=40)),
    "full": HubTier((0, 1, 2), None, 5, 10, AttackSettings(steps=2000, check_every=40)),
}


@dataclass(frozen=True)
class _Concept:
    kind: str
    name: str


@register_suite
class HubSuite(Suite):
    name = "hub"
    description = ("HUB: target proportion, quality FID, alignment, selective alignment, pinpoint-ness, "
                   "multilingual robustness, UnlearnDiffAtk attack robustness.")
    backbone_kinds = ("sd",)
    keys = ("target_proportion", "quality_fid", "alignment", "selective_alignment", "pinpoint", "multilingual",
            "pre_attack_asr", "attack_asr")

    def check(self, ctx: EvalContext) -> None:
        super().check(ctx)
        if not isinstance(ctx.protocol, MiniCanvasProtocol):
            raise UserError("the hub suite needs MiniCanvas' paraphrases and second language: use --protocol minicanvas")

    def run(self, ctx: EvalContext) -> dict[str, float]:
        from evaluate.clip_score import mean_clip_score
        from evaluate.fid import compute_fid
        from evaluate.robustness import attack_prompts
        from generators.minicanvas import concepts as C

        protocol, tier = ctx.protocol, HUB_TIERS[ctx.tier]
        sampling = protocol.tier(ctx.tier).sampler
        judge = protocol.judge()
        target = _Concept(ctx.target.kind, ctx.target.name)
        partner_kind = "object" if target.kind == "style" else "style"
        partners = (protocol.objects if target.kind == "style" else protocol.styles)[: tier.partners]
        model = ctx.sampler()

        def pair(partner: str) -> tuple[str, str]:
            """(style, object) of the target with one partner."""
            return (target.name, partner) if target.kind == "style" else (partner, target.name)

        # Target proportion and selective alignment: held-out paraphrases x partners x seeds.
        items = [(t, p, s) for t in C.HELDOUT_PARAPHRASES for p in partners for s in tier.seeds]
        prompts = [t.format(style=pair(p)[0], object=pair(p)[1]) for t, p, _ in items]
        ctx.log(f"hub: {len(prompts)} paraphrase images")
        images = model.images(prompts, [s for *_, s in items], sampling)
        predicted = judge.predict(images)
        out = {"target_proportion": _rate(predicted[target.kind] == judge.index(target), higher_is_better=False)}
        partner_idx = torch.tensor([judge.index(_Concept(partner_kind, p)) for _, p, _ in items])
        out["selective_alignment"] = _rate(predicted[partner_kind] == partner_idx, higher_is_better=True)

        # Multilingual robustness: Spanish prompts.
        es_items = [(p, s) for p in partners for s in tier.seeds]
        es_prompts = [C.spanish_prompt(*pair(p)) for p, _ in es_items]
        es_images = model.images(es_prompts, [s for _, s in es_items], sampling)
        out["multilingual"] = _rate(judge.shows(es_images, target), higher_is_better=False)

        # Quality and alignment on general (non-target) prompts: the canvas answer set without the target.
        answer = protocol.answer_set(ctx.tier)
        general = answer.select(~target_mask(ctx, answer.styles, answer.objects))
        ctx.log(f"hub: {len(general)} general images (model and original)")
        general_images = model.images(general.prompts, general.seeds, sampling)
        original_images = ctx.sampler(original=True).images(general.prompts, general.seeds, sampling)
        out["quality_fid"] = max(0.0, compute_fid(protocol.fid_features(), original_images, general_images))
        out["alignment"] = mean_clip_score(protocol.clip(), general_images, general.prompts)

        # Pinpoint-ness: accuracy on the nearest concepts of the target's axis.
        axis_names = protocol.styles if target.kind == "style" else protocol.objects
        near = C.NEAR_STYLES if target.kind == "style" else C.NEAR_OBJECTS
        neighbours = nearest_concepts(protocol.clip(), protocol, target, axis_names, near, tier.pinpoint_k)
        ctx.log(f"hub: pinpoint neighbours of {target.name}: {', '.join(neighbours)}")
        labels = general.styles if target.kind == "style" else general.objects
        predicted_general = judge.predict(general_images)[target.kind]
        hits = [predicted_general[labels == axis_names.index(n)] == axis_names.index(n) for n in neighbours]
        out["pinpoint"] = _rate(torch.cat(hits), higher_is_better=True)

        # Attack robustness: template prompts naming the target (the canvas answer set's target rows).
        seed = protocol.tier(ctx.tier).seeds[0]
        chosen = _spread(partners, tier.attack_prompts)
        attack_prompts_ = [protocol.prompt(*pair(p)) for p in chosen]
        seeds = [seed] * len(chosen)
        references = ctx.sampler(original=True).images(attack_prompts_, seeds, sampling)
        outcome = attack_prompts(model, judge, target, attack_prompts_, seeds, references, sampling,
                                 _seeded(tier.attack, ctx.seed), log=ctx.log)
        rates = outcome.rates()
        out["pre_attack_asr"], out["attack_asr"] = rates["pre_asr"], rates["asr"]
        return out


def _rate(judged: torch.Tensor, higher_is_better: bool) -> float:
    from evaluate.rates import RetainRate, TargetProportion

    metric = RetainRate() if higher_is_better else TargetProportion()
    metric.update(judged)
    return float(metric.compute())


def _spread(names: list[str], n: int) -> list[str]:
    """``n`` names spread evenly over the list (all of them if ``n >= len``)."""
    if n >= len(names):
        return list(names)
    step = len(names) / n
    return [names[int(i * step)] for i in range(n)]


def _seeded(settings: AttackSettings, seed: int) -> AttackSettings:
    from dataclasses import replace

    return replace(settings, seed=settings.seed + seed)


@torch.no_grad()
def nearest_concepts(
    clip: ClipPair,
    protocol: MiniCanvasProtocol,
    target: _Concept,
    names: list[str],
    near_pairs: list[tuple[str, str]],
    k: int,
) -> list[str]:
    """The ``k`` concepts of the target's axis nearest to it: declared look-alikes first, then by CLIP similarity.

    A concept's text embedding is the normalised mean of its template prompts over all partners (prompt
    ensembling), from the CLIP text tower.
    """
    model, processor = clip
    partners = protocol.objects if target.kind == "style" else protocol.styles

    def embed(name: str) -> torch.Tensor:
        texts = [protocol.prompt(name, p) if target.kind == "style" else protocol.prompt(p, name) for p in partners]
        tokens = processor(text=texts, return_tensors="pt", padding=True)
        device = next(model.parameters()).device
        features = model.get_text_features(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        return F.normalize(F.normalize(features, dim=-1).mean(0), dim=0)

    anchor = embed(target.name)
    others = [n for n in names if n != target.name]
    similarity = {n: float(anchor @ embed(n)) for n in others}
    declared = [b if a == target.name else a for a, b in near_pairs if target.name in (a, b)]
    ranked = declared + sorted((n for n in others if n not in declared), key=lambda n: -similarity[n])
    return ranked[:k]
