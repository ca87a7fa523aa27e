"""``gan``: erasure metrics of a StyleGAN2 generator on fixed latents (MiniCanvas judge, features and MiniCLIP).

The original and the erased generator are sampled on the same latents (latent ``i`` from seed ``i``), so every
difference is the erasure's doing:

* ``target_frac_before`` / ``target_frac_after`` -- share of samples the judge labels as the target;
* ``fid`` -- FID of the erased generator's samples against real images without the target (the distribution an
  ideal erasure produces); ``fid_ratio`` -- that FID over the original generator's FID against the same real
  images (1 = no quality change);
* ``kept_share`` -- overlap of the distributions over the *other* labels of the target's axis, before and after
  (1 = the other concepts keep their shares; see :class:`evaluate.rates.KeptShare`);
* ``clip_unlearning`` -- Wasserstein-1 distance between the per-sample CLIP scores (torchmetrics, 0-100) of the
  original and the erased generator's samples against a caption naming the target (the template prompt with the
  partner concept the judge sees in that sample). Larger = the target's text-image agreement moved further.
"""

from __future__ import annotations

from dataclasses import dataclass

from evaluate.registry import register_suite
from evaluate.suite import EvalContext, Suite


@dataclass(frozen=True)
class GanTier:
    samples: int
    real_per_pair: int


GAN_TIERS: dict[str, GanTier] = {
    "smoke": GanTier(64, 1),
    "quick": GanTier(500, 5),
    "full": GanTier(2000, 20),
}
LATENT_SEED_OFFSET = 1_000_000
"""Latent ``i`` of the suite is drawn from seed ``LATENT_SEED_OFFSET + i`` (disjoint from training seeds)."""


@register_suite
class GanSuite(Suite):
    name = "gan"
    description = "StyleGAN2 erasure on fixed latents: target share before/after, FID (ratio), kept share, CLIP W1."
    backbone_kinds = ("gan",)
    keys = ("target_frac_before", "target_frac_after", "fid", "fid_ratio", "kept_share", "clip_unlearning")

    def run(self, ctx: EvalContext) -> dict[str, float]:
        from evaluate.clip_score import clip_scores
        from evaluate.fid import compute_fid
        from evaluate.rates import KeptShare, TargetProportion, Wasserstein1

        protocol, tier = ctx.protocol, GAN_TIERS[ctx.tier]
        judge = protocol.judge()
        seeds = [LATENT_SEED_OFFSET + i for i in range(tier.samples)]
        ctx.log(f"gan: {len(seeds)} samples from the original and the erased generator")
        before = ctx.gan_sampler(original=True).images(seeds)
        after = ctx.gan_sampler().images(seeds)
        axis = ctx.target.kind
        other = "object" if axis == "style" else "style"
        names = protocol.styles if axis == "style" else protocol.objects
        index = names.index(ctx.target.name)
        pred_before, pred_after = judge.predict(before), judge.predict(after)

        out: dict[str, float] = {}
        for key, predicted in (("target_frac_before", pred_before), ("target_frac_after", pred_after)):
            rate = TargetProportion()
            rate.update(predicted[axis] == index)
            out[key] = float(rate.compute())

        pairs = [(s, o) for s in range(len(protocol.styles)) for o in range(len(protocol.objects))
                 if (s if axis == "style" else o) != index]
        real = protocol.real_images(pairs, tier.real_per_pair)
        features = protocol.fid_features()
        out["fid"] = compute_fid(features, real, after)
        fid_before = compute_fid(features, real, before)
        out["fid_ratio"] = out["fid"] / fid_before if fid_before > 0 else float("nan")

        kept = KeptShare(len(names), index)
        kept.update(pred_before[axis], before=True)
        kept.update(pred_after[axis], before=False)
        out["kept_share"] = float(kept.compute())

        clip = protocol.clip()
        partners = protocol.objects if axis == "style" else protocol.styles

        def captions(predicted: dict) -> list[str]:
            return [protocol.prompt(ctx.target.name, partners[p]) if axis == "style"
                    else protocol.prompt(partners[p], ctx.target.name) for p in predicted[other].tolist()]

        distance = Wasserstein1()
        distance.update(clip_scores(clip, before, captions(pred_before)), first=True)
        distance.update(clip_scores(clip, after, captions(pred_after)), first=False)
        out["clip_unlearning"] = float(distance.compute())
        return out
