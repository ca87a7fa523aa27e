"""``canvas``: the UnlearnCanvas protocol (Zhang et al. 2024) -- UA, IRA, CRA, FID and CLIP score.

The answer set is the template prompt for every (style, object) pair x the tier's seeds (see
:mod:`evaluate.protocols`). The judge labels every image; UA/IRA/CRA follow :mod:`evaluate.accuracy`.
FID compares the answer set without the target's images against real images without the target (UnlearnCanvas:
"answer set minus target vs real minus target"); the CLIP score (torchmetrics, 0-100) is that of the same
non-target images against their prompts, i.e. how well the retained concepts still follow their prompts.
"""

from __future__ import annotations

from evaluate.registry import register_suite
from evaluate.suite import EvalContext, Suite


def target_mask(ctx: EvalContext, styles, objects):
    """Bool per answer-set image: does its prompt name the target?"""
    names = ctx.protocol.styles if ctx.target.kind == "style" else ctx.protocol.objects
    index = names.index(ctx.target.name)
    return (styles if ctx.target.kind == "style" else objects) == index


@register_suite
class CanvasSuite(Suite):
    name = "canvas"
    description = "UnlearnCanvas: unlearning accuracy (UA), in-/cross-domain retain accuracy (IRA/CRA), FID, CLIP score."
    backbone_kinds = ("sd",)
    keys = ("ua", "ira", "cra", "fid", "clip_score")

    def run(self, ctx: EvalContext) -> dict[str, float]:
        from evaluate.accuracy import UnlearnCanvasAccuracy
        from evaluate.clip_score import mean_clip_score
        from evaluate.fid import compute_fid

        protocol = ctx.protocol
        tier = protocol.tier(ctx.tier)
        answer = protocol.answer_set(ctx.tier)
        ctx.log(f"canvas: {len(answer)} answer-set images ({ctx.tier} tier, {tier.sampler.steps} steps)")
        images = ctx.sampler().images(answer.prompts, answer.seeds, tier.sampler)

        judge = protocol.judge()
        if judge.labels["style"] != protocol.styles or judge.labels["object"] != protocol.objects:
            raise ValueError(f"the {protocol.name} judge's labels differ from the protocol's concept lists")
        predicted = judge.predict(images)
        names = protocol.styles if ctx.target.kind == "style" else protocol.objects
        accuracy = UnlearnCanvasAccuracy(
            len(protocol.styles), len(protocol.objects), ctx.target.kind, names.index(ctx.target.name),
            ignored_styles=protocol.ignored_style_indices(),
        )
        accuracy.update(predicted["style"], predicted["object"], answer.styles, answer.objects)
        scores = accuracy.compute()

        keep = ~target_mask(ctx, answer.styles, answer.objects)
        retained = answer.select(keep)
        pairs = sorted({(int(s), int(o)) for s, o in zip(retained.styles, retained.objects)})
        real = protocol.real_images(pairs, tier.real_per_pair, tier.sampler.height)
        scores["fid"] = compute_fid(protocol.fid_features(), real, images[keep])
        scores["clip_score"] = mean_clip_score(protocol.clip(), images[keep], retained.prompts)
        return scores
