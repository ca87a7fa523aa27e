"""DoCo: concept domain correction with a concept-preserving gradient (Wu, Zhou, Wang, Ling, Ma, Yang; "Unlearning
Concepts in Diffusion Model via Concept Domain Correction and Concept Preserving Gradient", AAAI 2025; code
``yongliang-wu/DoCo``, ``train.py``, ``gan.py``, ``gradient_clip.py``).

Only the cross-attention keys and values (``attn2.to_k/to_v``) of the UNet are trained. Each step:

* **Domain correction.** At noisy latents ``x_t`` of the *anchor* domain, a PatchGAN discriminator ``D`` on
  predicted clean latents ``x0_hat`` tells the frozen model under the anchor prompt ("real",
  ``x0_hat(eps*(x_t, c_anchor))``) from the trained model under the target prompt ("fake",
  ``x0_hat(eps_theta(x_t, c_target))``). Labels as in the reference: real -> 0, fake -> 1, BCE with logits;
  ``L_D = BCE(D(real), 0) + BCE(D(sg[fake]), 1)``, and the UNet's adversarial loss is ``L_adv = BCE(D(fake), 0)``,
  which pulls the target prompt's predictions into the anchor's domain. For the first ``warmup`` steps only ``D``
  is trained (reference ``--warm_up``).
* **Concept-preserving gradient.** The unlearning gradient ``g_u = grad L_adv`` and the retain gradient
  ``g_r = grad L_r`` are each clipped to norm ``max_grad_norm``; where ``<g_u, g_r> < 0`` the conflicting component
  is removed from ``g_u`` (:mod:`erasure.gradient_surgery`, per parameter tensor as the reference), and the UNet
  steps along the corrected ``g_u`` only (the reference's ``--gradient_clip`` mode: the retain loss acts only
  through the projection).

Our choices, where the studio's pieces replace the reference's data pipeline:

* ``x_t`` are states of partial DDIM trajectories sampled once, up front, by the frozen model under the anchor
  prompts (:mod:`erasure.trajectory`), not DDPM-noised anchor images at ``t ~ U{0..999}``: state ``k`` of a
  trajectory is at timestep ``t_k`` of the ``ddim_steps`` schedule, and the frozen model's conditional output
  there, kept from the sampling, *is* the "real" branch's prediction. No horizontal-flip augmentation.
* The retain loss is model-based prior preservation, ``MSE(eps_theta(x_r, c_r), sg[eps*(x_r, c_r)])`` on states of
  frozen-model trajectories of retain prompts (the reference's prior loss is the plain denoising loss on anchor
  images under the anchor prompt).
* The discriminator is the reference's PatchGAN (``Conv k4 s2`` blocks 64-128-256-512 with BatchNorm and
  LeakyReLU 0.2, then ``Conv k4 p1`` to one logit per patch) with as many stride-2 blocks as the latent size
  allows: ``log2(size) - 2``, i.e. the reference's four for SD's 64x64 latents, two for MiniSD's 16x16.
* Prompts: target prompts are the prompt source's captions with the target in them ("A circle image in Ember
  style.", ``forget_prompts: captions``; the reference injects the target into anchor captions) or the target's
  own prompt ("Ember style", ``name``). The anchor is the job's ``anchor`` concept in the same templates; without
  one, each caption with the target's name dropped ("A circle image in style."; "Ember style" -> "style"), which
  keeps the caption's other concepts (the reference's style anchors are generic "painting" captions), or for
  ``name`` the empty prompt. ``anchor_prompt`` sets one fixed anchor prompt instead.
* Classifier-free guidance is part of sampling, not of the method: the model is sampled with ``uncond + s (cond -
  uncond)``, and the trained keys/values serve the empty prompt too. An update that moves the unconditional output
  comes back ``s - 1`` times amplified, so ``keep_unconditional`` (default ``null_space``) projects every key/value
  update onto the null space of the empty prompt's token states (:mod:`erasure.null_space`); ``retain`` adds the
  empty prompt to the retain loss instead.
* The anchor trajectories are guided away from the paired target prompt (``anchor_negative``), so the anchor
  domain does not itself hold the target; ``anchor_from: others`` anchors on the other concepts of the target's
  kind instead of the caption without the name.
* Constant learning rates (the reference warms the UNet's up over 500 steps), and ``ablation_weight`` (0 =
  reference) optionally adds Concept Ablation's model-based loss ``MSE(eps_theta(x_t, c_target),
  sg[eps*(x_t, c_anchor)])`` to the unlearning loss before the surgery.

Each field documents the reference default; ours are sized for MiniCanvas on 2 CPU cores.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from erasure.base import ErasureMethod, ErasureResult, MethodParams, RunContext, yaml_off
from erasure.forget_data import (
    COCO_RETAIN_PROMPTS,
    PromptSource,
    concept_prompts,
    prompt_trajectories,
    resolve_prompt_source,
    without_concept,
)
from erasure.gradient_surgery import SurgeryForm, SurgeryScope, clip_total_norm, project_conflicting
from erasure.null_space import KeptInputs, NullSpaceTolerance
from erasure.param_sets import ParameterSubset, changed_tensors, train_only, unet_parameter_names
from erasure.registry import register_method
from erasure.resume import TrainingCheckpoints, job_fingerprint
from erasure.text_embeddings import PromptEmbeddings
from erasure.trajectory import AnyTrajectories, ddim_scheduler, predict

if TYPE_CHECKING:
    from erasure.config import Target


class DoCoParams(MethodParams):
    """DoCo budgets. Defaults are for MiniCanvas; "reference" is the paper's code (README style commands)."""

    # On the v4 MiniCanvas world 240 steps erased too little (quick tier UA 0.3 Ember, 0.8 Lagoon); 800 gave UA 1.0
    # on both with IRA >= 0.99 and CRA >= 0.93, 132-146 s on 2 CPU cores. On the world with stage sd_text 800 left
    # Ember at UA 0.50 (Lagoon 1.00); 1600 gave Ember 1.000 / 1.000 / 0.942 (UA / IRA / CRA) in 218 s and Lagoon
    # 1.000 / 0.991 / 0.933 in 231 s, alone on a 2-core AMD EPYC (Zen 4) (docs/leaderboard/README.md, 2026-12-07),
    # but Ink UA 0.00 and Mosaic 0.50 even at 1600. With keep_unconditional and anchor_negative (2026-12-07, later):
    # Ink 0.400 / 0.991 / 0.950 (208 s alone), Mosaic 0.700 / 1.000 / 0.950, Ember 1.000 / 1.000 / 0.917, Lagoon
    # 1.000 / 1.000 / 0.917; 3200 steps took Ink to 0.700 with CRA 0.875 and FID 108.
    iterations: int = Field(
        1600, ge=1, description="Training steps, discriminator warm-up included. Reference: 2000."
    )
    warmup: int = Field(
        40,
        ge=0,
        description="First steps that train only the discriminator. Reference: 1000 (README; argparse 500).",
    )
    lr: float = Field(
        2e-4,
        gt=0,
        description="Adam learning rate of attn2.to_k/to_v. Reference: 6e-6 x batch 8 (--scale_lr) = 4.8e-5.",
    )
    disc_lr: float = Field(
        5e-4,
        gt=0,
        description="Adam (betas 0.5/0.999) learning rate of the discriminator. Reference: 5e-4 (style), 1e-4 "
        "(object, nudity); argparse 1e-2.",
    )
    batch_size: int = Field(4, ge=1, description="Anchor states x_t per step. Reference: 8.")
    retain_batch: int = Field(
        4,
        ge=0,
        description="Retain states per step (0: no surgery). Reference: 8 (the prior half of the batch).",
    )
    max_grad_norm: float = Field(
        1.0, gt=0, description="Each of g_u and g_r is clipped to this norm first. Reference: 1.0."
    )
    surgery: SurgeryForm | Literal["off"] = Field(
        "pcgrad",
        description="Conflict removal: pcgrad (g_u -= <g_u,g_r>/|g_r|^2 g_r, the paper's projection), doco (the "
        "reference code's g_u -= cos * g_r/|g_r|), or off (plain g_u).",
    )
    surgery_scope: SurgeryScope = Field(
        "tensor",
        description="Apply the rule per parameter tensor (reference) or to all as one vector (global).",
    )
    surgery_strength: float = Field(1.0, ge=0, description="lambda of the correction. Reference: 1.")
    keep_unconditional: Literal["null_space", "retain", "off"] = Field(
        "null_space",
        description="Ours: keep the empty prompt's output, which classifier-free guidance, uncond + s (cond - "
        "uncond), amplifies the drift of. null_space = every key/value update is projected onto the null space "
        "of the empty prompt's token states (erasure/null_space.py), so that output stays as it was; retain = "
        "the retain loss also covers the empty prompt at the retain states; off = reference. Without it "
        "MiniSD's erased Ink prompt matched the anchor's conditional output to 1/150 of the original gap yet "
        "still drew Ink at guidance 5.",
    )
    null_space_tol: NullSpaceTolerance = 1e-2
    retain_weight: float = Field(
        0.0,
        ge=0,
        description="Also step along this x g_r after the surgery. Reference: 0 (with --gradient_clip the prior "
        "loss acts only through the projection).",
    )
    ablation_weight: float = Field(
        0.0,
        ge=0,
        description="Ours: weight of Concept Ablation's MSE(eps(x_t, target), sg[eps*(x_t, anchor)]) added to the "
        "adversarial loss. Reference: 0.",
    )
    disc_width: int = Field(
        64, ge=1, description="Channels of the discriminator's first block. Reference: 64."
    )
    start_guidance: float = Field(
        3.0,
        ge=0,
        description="CFG scale of the frozen-model sampling of anchor and retain trajectories. Reference: anchor "
        "images sampled by SD (Concept Ablation's scripts).",
    )
    ddim_steps: int = Field(
        25,
        ge=2,
        description="DDIM steps of those trajectories; x_t is drawn uniformly among their states. Reference: "
        "t ~ U{0..999} on noised anchor images; MiniCanvas samples with 25 steps.",
    )
    anchor_negative: bool = Field(
        True,
        description="Ours: the anchor trajectories are guided away from the paired target prompt (its negative "
        "prompt) instead of the empty prompt, so the anchor domain does not hold the target. MiniSD draws "
        "'A circle image in style.' as Mosaic in 9 of 40 samples (guidance 3), none with 'Mosaic' as the "
        "negative prompt. Reference: anchor images generated without one.",
    )
    trajectories: int = Field(
        32, ge=1, description="Anchor trajectories sampled up front. Reference: 1000 anchor images."
    )
    retain_trajectories: int = Field(
        32, ge=1, description="Retain trajectories sampled up front. Reference: the same anchor images."
    )
    forget_prompts: Literal["captions", "name"] = Field(
        "captions",
        description="Target-side prompts: 'captions' = the prompt source's templates filled with the target "
        "(MiniCanvas captions, e.g. 'A circle image in Ember style.'; for prompts='target' the target's own "
        "prompt), like the reference, which injects the target into anchor captions; 'name' = always the "
        "target's own prompt ('Ember style'). The anchor prompts follow the same templates. On MiniCanvas "
        "(Ember, seed 0) 'name' reached UA 0.80, 'captions' 0.90 at the same budget.",
    )
    anchor_prompt: str | None = Field(
        None,
        description="A fixed anchor prompt. Default: the job's anchor in the target's templates, else what "
        "anchor_from says. Reference: generic captions of the anchor concept ('painting' captions for styles).",
    )
    anchor_from: Literal["caption", "others"] = Field(
        "caption",
        description="Ours, without a job anchor or anchor_prompt: 'caption' = each target caption with the "
        "target's name dropped ('A circle image in style.'; the empty prompt for forget_prompts=name); 'others' "
        "= the same caption with each other concept of the target's kind (MiniCanvas prompts), so the anchor "
        "domain is the other concepts' images. MiniSD draws 'A circle image in style.' mostly as Comic, Mosaic "
        "and Ember.",
    )
    retain_prompts: list[str] = Field(
        default_factory=lambda: list(COCO_RETAIN_PROMPTS),
        description="Retain prompts for prompts='target' (those naming the target are dropped). Reference: the "
        "anchor captions (prior preservation).",
    )
    prompts: PromptSource = Field(
        "auto",
        description="Prompt source: 'target' = the target's prompt and retain_prompts above; 'minicanvas' = "
        "MiniCanvas captions (retain: the other concepts of the target's kind); 'auto' = minicanvas on the "
        "MiniCanvas world, else target.",
    )

    _yaml_off = field_validator("surgery", "keep_unconditional", mode="before")(yaml_off)


class PatchDiscriminator(nn.Module):
    """PatchGAN on latents (DoCo ``gan.py``): ``n`` blocks ``Conv(k4, s2, p1)`` [+ BatchNorm] + LeakyReLU(0.2), widths
    ``w, 2w, 4w, 8w`` (capped at ``8w``; no norm in the first), then ``Conv(k4, p1)`` to one logit per patch.

    ``n = log2(size) - 2`` (at least 1) keeps the last feature map at 4x4 and the output at 3x3 patches, as the
    reference's four blocks do on 64x64 SD latents.
    """

    def __init__(self, in_channels: int, size: int, width: int = 64) -> None:
        super().__init__()
        blocks = max(1, int(math.log2(size)) - 2)
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(blocks):
            out = width * min(2**i, 8)
            layers.append(nn.Conv2d(channels, out, 4, stride=2, padding=1))
            if i > 0:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.LeakyReLU(0.2))
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model(latents)


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """DoCo's discriminator loss, with the reference's labels (anchor/real -> 0, model/fake -> 1):
    ``BCE(D(real), 0) + BCE(D(sg[fake]), 1)``."""
    real_logits = discriminator(real)
    fake_logits = discriminator(fake.detach())
    return F.binary_cross_entropy_with_logits(
        real_logits, torch.zeros_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def adversarial_loss(discriminator: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """The generator's (UNet's) loss ``BCE(D(fake), 0)``: make its predictions pass for the anchor domain."""
    logits = discriminator(fake)
    return F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))


def predicted_x0(
    scheduler, latents: torch.Tensor, model_out: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The clean latent the model output implies (the scheduler's ``pred_original_sample``), per sample."""
    abar = scheduler.alphas_cumprod.to(latents.device, torch.float32)[timesteps.to(latents.device)]
    abar = abar.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (latents - (1 - abar).sqrt() * model_out) / abar.sqrt()
    if kind == "v_prediction":
        return abar.sqrt() * latents - (1 - abar).sqrt() * model_out
    if kind == "sample":
        return model_out
    raise ValueError(f"unsupported prediction_type {kind!r}")


def _add(u: torch.Tensor | None, r: torch.Tensor | None, weight: float) -> torch.Tensor | None:
    """``u + weight * r`` where either may be missing."""
    if r is None:
        return u
    return weight * r if u is None else u + weight * r


@register_method
class DoCo(ErasureMethod):
    """DoCo (Wu et al., AAAI 2025): adversarial domain correction + concept-preserving gradient surgery."""

    name = "doco"
    backbone_kind = "sd"
    description = (
        "DoCo (Wu et al. 2025): PatchGAN on predicted latents pulls the target into the anchor domain; "
        "gradient surgery against a retain loss."
    )
    Params = DoCoParams

    def erase(self, backbone, target: Target, params: DoCoParams, ctx: RunContext) -> ErasureResult:
        pipe = backbone
        unet = pipe.unet
        source = resolve_prompt_source(params.prompts, pipe, target)
        sets = concept_prompts(target, ctx.anchor, source, retain_prompts=params.retain_prompts)
        forget, anchored = self._prompt_pairs(target, sets, params, ctx)
        ctx.log(
            f"doco: {len(forget)} target/anchor prompt pair(s), e.g. {forget[0]!r} -> {anchored[0]!r}; "
            f"{len(sets.retain)} retain prompts from '{source}'"
        )
        forget_emb = PromptEmbeddings(pipe.tokenizer, pipe.text_encoder, forget)
        anchor_emb = PromptEmbeddings(pipe.tokenizer, pipe.text_encoder, anchored)
        retain_emb = PromptEmbeddings(pipe.tokenizer, pipe.text_encoder, sets.retain)
        scheduler = ddim_scheduler(pipe.scheduler.config, params.ddim_steps, unet.device)

        unet.requires_grad_(False)
        setup = torch.Generator().manual_seed(ctx.seed)
        # The frozen model's trajectories: kept, or (reference path) recomputed by a frozen copy when drawn.
        frozen = unet if ctx.speed.reuse else copy.deepcopy(unet)
        bank = prompt_trajectories(
            frozen, scheduler, anchor_emb, params.trajectories, params.start_guidance, setup, ctx.speed.reuse,
            negative=forget_emb if params.anchor_negative else None,
        )  # fmt: skip
        retain_bank = None
        if params.retain_batch > 0:
            retain_bank = prompt_trajectories(
                frozen, scheduler, retain_emb, params.retain_trajectories, params.start_guidance, setup,
                ctx.speed.reuse,
            )  # fmt: skip
        ctx.log(
            f"doco: sampled anchor and retain trajectories x {params.ddim_steps} steps with the frozen UNet"
        )

        size = unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        with torch.random.fork_rng(devices=[]):  # the discriminator's initialisation depends on the seed only
            torch.manual_seed(ctx.seed + 2)
            discriminator = PatchDiscriminator(unet.config.in_channels, size, params.disc_width)
        discriminator = discriminator.to(unet.device).train()
        disc_opt = torch.optim.Adam(discriminator.parameters(), lr=params.disc_lr, betas=(0.5, 0.999))

        trained = train_only(unet, unet_parameter_names(unet, "esd-x-strict"))
        names = list(trained)
        optimizer = torch.optim.Adam(trained.values(), lr=params.lr)
        keep = (
            KeptInputs(trained, forget_emb.empty, params.null_space_tol)
            if params.keep_unconditional == "null_space"
            else None
        )
        generator = torch.Generator().manual_seed(ctx.seed + 1)
        history: dict[str, list[float]] = {"d_loss": [], "g_loss": [], "retain_loss": [], "projected": []}
        checkpoints = TrainingCheckpoints(
            ctx,
            job_fingerprint(self.name, params, target, ctx),
            modules={"trained": ParameterSubset(trained), "discriminator": discriminator},
            optimizers={"unet": optimizer, "discriminator": disc_opt},
            generators={"train": generator},
            history=history,
        )
        for step in range(checkpoints.resume() + 1, params.iterations + 1):
            latents, timesteps, index, anchor_out, _ = bank.draw(params.batch_size, generator)
            real = predicted_x0(scheduler, latents, anchor_out, timesteps).float()
            cond = forget_emb[index.to(forget_emb.embeddings.device)]
            scalars: dict[str, float] = {}
            if step > params.warmup:
                unet.train()
                out = predict(unet, latents, timesteps, cond)
                fake = predicted_x0(scheduler, latents, out, timesteps).float()
                g_loss = adversarial_loss(discriminator, fake)
                unlearn = g_loss
                if params.ablation_weight > 0:
                    unlearn = unlearn + params.ablation_weight * F.mse_loss(out, anchor_out)
                g_u = torch.autograd.grad(unlearn, list(trained.values()), allow_unused=True)
                g_u = clip_total_norm(g_u, params.max_grad_norm)
                if retain_bank is not None:
                    retain_loss, g_r = self._retain_gradient(
                        unet, trained, retain_bank, retain_emb, params, generator
                    )
                    g_r = clip_total_norm(g_r, params.max_grad_norm)
                    if params.surgery != "off":
                        surgery = project_conflicting(
                            g_u,
                            g_r,
                            form=params.surgery,
                            scope=params.surgery_scope,
                            strength=params.surgery_strength,
                        )
                        g_u = surgery.grads
                        scalars["projected"] = surgery.projected / max(surgery.groups, 1)
                    if params.retain_weight > 0:
                        g_u = [_add(u, r, params.retain_weight) for u, r in zip(g_u, g_r)]
                    scalars["retain_loss"] = retain_loss
                optimizer.zero_grad(set_to_none=True)
                for name, grad in zip(names, g_u):
                    trained[name].grad = None if grad is None else grad.to(trained[name].dtype)
                optimizer.step()
                if keep is not None:
                    keep.project()
                fake = fake.detach()
                scalars["g_loss"] = g_loss.item()
            else:
                with torch.no_grad():
                    out = predict(unet, latents, timesteps, cond)
                fake = predicted_x0(scheduler, latents, out, timesteps).float()

            d_loss = discriminator_loss(discriminator, real, fake)
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
            scalars["d_loss"] = d_loss.item()
            for key, value in scalars.items():
                history[key].append(value)
            checkpoints.step_done(step, params.iterations)
            ctx.progress(step, params.iterations, **scalars)

        unet.eval()
        metrics = {}
        for key, values in history.items():
            if values:
                tail = values[-20:]
                metrics[f"final_{key}"] = float(sum(tail) / len(tail))
        return ErasureResult(changed={"unet": changed_tensors(trained)}, metrics=metrics)

    # ------------------------------------------------------------------------------------------------- pieces

    @staticmethod
    def _prompt_pairs(
        target: Target, sets, params: DoCoParams, ctx: RunContext
    ) -> tuple[list[str], list[str]]:
        """Target prompts and, index for index, their anchor prompts."""
        if params.forget_prompts == "captions":
            templates = list(sets.templates)
        else:
            templates = ["{concept} style" if target.kind == "style" else "{concept}"]
        forget = [t.replace("{concept}", target.name) for t in templates]
        if params.anchor_prompt is not None:
            anchored = [params.anchor_prompt] * len(forget)
        elif ctx.anchor is not None:
            anchored = [t.replace("{concept}", ctx.anchor.name) for t in templates]
        elif params.anchor_from == "others":
            if not sets.others:
                raise ValueError("anchor_from 'others' needs the other concepts of the target's kind (MiniCanvas)")
            forget = [f for f in forget for _ in sets.others]
            anchored = [t.replace("{concept}", other) for t in templates for other in sets.others]
        elif params.forget_prompts == "captions":
            anchored = [without_concept(t) for t in templates]
        else:
            anchored = [""] * len(forget)
        return forget, anchored

    @staticmethod
    def _retain_gradient(unet, trained, bank: AnyTrajectories, prompts: PromptEmbeddings, params, generator):
        """Model-based prior preservation on retain states: ``MSE(eps_theta(x_r, c_r), sg[eps*(x_r, c_r)])``, and
        with ``keep_unconditional: retain`` the same for the empty prompt at those states."""
        latents, timesteps, index, frozen_out, frozen_uncond = bank.draw(params.retain_batch, generator)
        cond = prompts[index.to(prompts.embeddings.device)]
        if params.keep_unconditional == "retain":
            empty = prompts.uncond(len(cond)).to(cond)
            latents, timesteps = torch.cat([latents, latents]), torch.cat([timesteps, timesteps])
            cond, frozen_out = torch.cat([cond, empty]), torch.cat([frozen_out, frozen_uncond])
        out = predict(unet, latents, timesteps, cond)
        loss = F.mse_loss(out, frozen_out)
        grads = torch.autograd.grad(loss, list(trained.values()), allow_unused=True)
        return loss.item(), list(grads)
