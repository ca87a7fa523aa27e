"""SalUn: saliency unlearning (Fan, Liu, Zhang, Wong, Wei, Liu; "SalUn: Empowering Machine Unlearning via Gradient-
based Weight Saliency in Both Image Classification and Generation", ICLR 2024; code ``OPTML-Group/Unlearn-Saliency``,
folder ``SD/``).

1. **Weight saliency** (``generate_mask.py``, :mod:`erasure.saliency`): one pass over the forget set; at a random
   timestep, the guided prediction ``(1 + w) eps(x_t, c_f) - w eps(x_t, ∅)`` (``w = mask_guidance``) is scored by
   ``-MSE`` against the true noise; gradients are summed over the pass; the mask keeps the globally top
   ``mask_fraction`` of ``|sum|`` over all trained parameters.
2. **Unlearning** (``random_label.py`` / ``nsfw_removal.py``): for a forget latent ``x_f`` with prompt ``c_f`` and
   the *same* noise and timestep, ``L_f = MSE(eps_theta(x_t, c_f), sg[eps_theta(x_t, c_pseudo)])`` where the
   pseudo target comes from the *current* model; plus ``alpha`` x the standard denoising loss on a retain batch;
   gradients are multiplied by the mask before each Adam step.

``c_pseudo``: with a job ``anchor`` it is the anchor concept in the same prompt template (substitute concept, as
the NSFW setting's "a photo of a person wearing clothes"); without one, ``pseudo_label`` picks it among the other
concepts of the target's kind, in the same template: ``next`` (default) is the concept after the target in the
concept list, cyclically, as the class-wise code's ``(c + 1) mod 10``; ``random`` draws one per sample and step.
(Measured on MiniCanvas style:Ember: ``random`` regresses every forget prompt towards the *average* of the other
styles, which the classifier still reads as Ember on 3 of 10 samples whatever the budget; see ``pseudo_label``.)
Forget and retain latents are the clean model's own generations by default (the NSFW setting's data), or
MiniCanvas dataset renders (``data: minicanvas_dataset``, the class-wise setting's real images); ``retain_data``
draws the retain latents from the other source (ours: forget what the model draws, retain the dataset's concepts).
Each field documents the reference default; our defaults are sized for MiniCanvas on 2 CPU cores.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from erasure.base import ErasureMethod, ErasureResult, MethodParams, RunContext
from erasure.forget_data import (
    COCO_RETAIN_PROMPTS,
    DataSource,
    LatentSet,
    PromptSource,
    concept_prompts,
    generate_latents,
    minicanvas_dataset_latents,
    require_dataset_labels,
    resolve_prompt_source,
)
from erasure.losses import denoising_loss, denoising_target, noise_latents, random_timesteps
from erasure.param_sets import ParameterSubset, changed_tensors, train_only, unet_parameter_names
from erasure.registry import register_method
from erasure.resume import TrainingCheckpoints, job_fingerprint
from erasure.saliency import accumulate_gradients, mask_gradients, top_fraction_mask
from erasure.text_embeddings import PromptEmbeddings
from erasure.trajectory import ddim_scheduler, guided, predict

if TYPE_CHECKING:
    from erasure.config import Target


class SalUnParams(MethodParams):
    """SalUn budgets. Defaults are for MiniCanvas; "reference" is the SD code of the paper."""

    mask_fraction: float = Field(
        0.5, gt=0, le=1, description="Fraction of weights the mask keeps. Reference: 0.5."
    )
    mask_guidance: float = Field(
        7.5, ge=0, description="w of the guided prediction scored for saliency. Reference: c_guidance 7.5."
    )
    train_method: Literal["full", "esd-x"] = Field(
        "full", description="Parameters trained (and masked). Reference: full (all UNet parameters)."
    )
    forget_images: int = Field(
        40,
        ge=1,
        description="Forget latents. Reference: 800 generated (NSFW); ~950 real images (Imagenette class).",
    )
    retain_images: int = Field(
        240,
        ge=1,
        description="Retain latents. Reference: 800 generated (NSFW); the other 9 classes (class-wise).",
    )
    data: DataSource = Field(
        "generated",
        description="Where the latents come from: 'generated' = the clean model's own generations (reference NSFW "
        "setting); 'minicanvas_dataset' = rendered MiniCanvas images (needs MiniCanvas prompts).",
    )
    retain_data: DataSource | None = Field(
        None,
        description="Where the retain latents come from when it differs from `data` (null = as `data`). Ours: "
        "'minicanvas_dataset' with data 'generated' forgets what the model draws and retains the dataset's "
        "concepts.",
    )
    generation_steps: int = Field(
        25, ge=1, description="DDIM steps of those generations. Reference: 50 (SD default)."
    )
    generation_guidance: float = Field(5.0, ge=0, description="Their CFG scale. Reference: 7.5 (SD default).")
    batch_size: int = Field(8, ge=1, description="Forget (and retain) batch. Reference: 8.")
    epochs: int = Field(
        32,
        ge=1,
        description="Passes over the forget set (the retain set is cycled). Reference: 5 (class-wise), "
        "1 (NSFW). On MiniCanvas (alpha 3, 240 retain images, seed 0) 24 left UA 0.60 on Lagoon, 32 gave 0.90.",
    )
    lr: float = Field(5e-5, gt=0, description="Adam learning rate. Reference: 1e-5.")
    # MiniCanvas, quick tier, seed 0, object:circle (whose look-alike ring is another object): alpha 0.5 left IRA
    # 0.68, alpha 2 0.83-0.84; alpha 3 with 240 retain images and 24-32 epochs gave UA 1.00, IRA 0.86.
    alpha: float = Field(
        3.0,
        ge=0,
        description="Weight of the retain denoising loss. Reference: 0.5 (README class-wise command), "
        "argparse default 0.1.",
    )
    retain_prompts: list[str] = Field(
        default_factory=lambda: list(COCO_RETAIN_PROMPTS),
        description="Retain prompts for prompts='target' (those naming the target are dropped); also the random "
        "labels when no other concepts are known. Reference: the other classes' prompts (class-wise), 'a photo of "
        "a person wearing clothes' (NSFW).",
    )
    pseudo_label: Literal["next", "random"] = Field(
        "next",
        description="Pseudo concept without an anchor: 'next' = the concept after the target in the concept list "
        "(cyclic), 'random' = a random other concept per sample and step (without a concept list, 'prompts: "
        "target', a random retain prompt; 'next' then needs an anchor). Reference: next class, (c + 1) mod 10.",
    )
    prompts: PromptSource = Field(
        "auto",
        description="'target' = the target's prompt and the retain prompts above; 'minicanvas' = MiniCanvas caption "
        "templates (other concepts of the target's kind are the retain set and pseudo labels); 'auto' = minicanvas "
        "on the MiniCanvas world, else target.",
    )


@register_method
class SalUn(ErasureMethod):
    """SalUn (Fan et al., ICLR 2024): saliency-masked random-label unlearning for Stable Diffusion."""

    name = "salun"
    backbone_kind = "sd"
    description = (
        "SalUn (Fan et al. 2024): weight-saliency mask, then masked random-label forgetting + retain loss."
    )
    Params = SalUnParams

    def erase(self, backbone, target: Target, params: SalUnParams, ctx: RunContext) -> ErasureResult:
        pipe = backbone
        unet = pipe.unet
        source = resolve_prompt_source(params.prompts, pipe, target)
        sets = concept_prompts(target, ctx.anchor, source, retain_prompts=params.retain_prompts)
        if ctx.anchor is None and params.pseudo_label == "next" and not sets.others:
            raise ValueError(
                "salun: pseudo_label 'next' needs the target's concept list (MiniCanvas prompts); with "
                "prompts: target set an `anchor:` (substitute concept) or method.params.pseudo_label: random"
            )
        pseudo_kind = "anchor" if ctx.anchor is not None else f"{params.pseudo_label} label"
        ctx.log(
            f"salun: {len(sets.forget)} forget / {len(sets.retain)} retain prompts from '{source}', "
            f"pseudo concept: {pseudo_kind}"
        )
        forget_prompts, retain_prompts = sets.forget, sets.retain
        anchored = sets.anchored if ctx.anchor is not None else []
        nexts = sets.next_substitutes() if ctx.anchor is None and params.pseudo_label == "next" else []
        everything = list(dict.fromkeys([*forget_prompts, *retain_prompts, *anchored, *nexts]))
        row = {prompt: i for i, prompt in enumerate(everything)}
        embeddings = PromptEmbeddings(pipe.tokenizer, pipe.text_encoder, everything)
        forget_rows = torch.tensor([row[p] for p in forget_prompts])
        retain_rows = torch.tensor([row[p] for p in retain_prompts])
        if ctx.anchor is not None:
            pseudo_rows = [torch.tensor([row[p]]) for p in anchored]
        elif nexts:
            pseudo_rows = [torch.tensor([row[p]]) for p in nexts]
        else:
            pseudo_rows = [
                torch.tensor([row[p] for p in sets.substitutes(i)]) for i in range(len(forget_prompts))
            ]

        forget, retain = self._data(pipe, sets, params, ctx)
        scheduler = ddim_scheduler(pipe.scheduler.config, params.generation_steps, unet.device)
        trained = train_only(unet, unet_parameter_names(unet, params.train_method))

        masks = self._saliency_mask(unet, scheduler, trained, forget, embeddings, forget_rows, params, ctx)
        optimizer = torch.optim.Adam(trained.values(), lr=params.lr)
        generator = torch.Generator().manual_seed(ctx.seed + 1)
        losses: list[float] = []
        checkpoints = TrainingCheckpoints(
            ctx,
            job_fingerprint(self.name, params, target, ctx),
            modules={"trained": ParameterSubset(trained)},
            optimizers={"adam": optimizer},
            generators={"train": generator},
            history={"loss": losses},
        )
        steps_per_epoch = math.ceil(len(forget) / params.batch_size)
        total = params.epochs * steps_per_epoch
        for step in range(checkpoints.resume() + 1, total + 1):
            forget_batch = self._batch(len(forget), step - 1, params.batch_size, ctx.seed, "forget")
            retain_batch = self._batch(len(retain), step - 1, params.batch_size, ctx.seed, "retain")
            x0 = forget.latents[forget_batch]
            template = forget.prompt_index[forget_batch]
            cond = embeddings[forget_rows[template]]
            pseudo = embeddings[self._pseudo_rows(template, pseudo_rows, generator)]
            timesteps = random_timesteps(len(forget_batch), scheduler, generator).to(x0.device)
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            x_t = noise_latents(scheduler, x0, noise, timesteps)
            with torch.no_grad():
                pseudo_out = predict(unet, x_t, timesteps, pseudo)
            forget_loss = F.mse_loss(predict(unet, x_t, timesteps, cond), pseudo_out)

            x0_r = retain.latents[retain_batch]
            cond_r = embeddings[retain_rows[retain.prompt_index[retain_batch]]]
            timesteps_r = random_timesteps(len(retain_batch), scheduler, generator)
            noise_r = torch.randn(x0_r.shape, generator=generator).to(x0_r)
            retain_loss = denoising_loss(unet, scheduler, x0_r, cond_r, noise_r, timesteps_r)

            loss = forget_loss + params.alpha * retain_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            mask_gradients(trained, masks)
            optimizer.step()
            losses.append(loss.item())
            checkpoints.step_done(step, total)
            ctx.progress(step, total, loss=losses[-1], forget=forget_loss.item(), retain=retain_loss.item())

        changed = changed_tensors({name: p for name, p in trained.items() if bool(masks[name].any())})
        kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        metrics = {"mask_fraction_kept": kept}
        if losses:
            metrics["final_loss"] = sum(losses[-10:]) / len(losses[-10:])
        return ErasureResult(changed={"unet": changed}, metrics=metrics)

    # ------------------------------------------------------------------------------------------------- pieces

    @staticmethod
    def _data(pipe, sets, params: SalUnParams, ctx: RunContext) -> tuple[LatentSet, LatentSet]:
        """Forget latents (prompt index = forget template) and retain latents (prompt index = retain prompt)."""

        def latents(source: DataSource, prompts, labels, n: int, seed: int) -> LatentSet:
            if source == "minicanvas_dataset":
                return minicanvas_dataset_latents(pipe, prompts, labels, n, seed)
            embeddings = PromptEmbeddings(pipe.tokenizer, pipe.text_encoder, prompts)
            return generate_latents(
                pipe, embeddings, n, seed, params.generation_steps, params.generation_guidance
            )

        retain_source = params.retain_data or params.data
        for source, labels in ((params.data, sets.template_labels), (retain_source, sets.retain_labels)):
            if source == "minicanvas_dataset":
                require_dataset_labels(labels)  # before any latent is generated
        forget = latents(params.data, sets.forget, sets.template_labels, params.forget_images, ctx.seed)
        retain = latents(retain_source, sets.retain, sets.retain_labels, params.retain_images, ctx.seed + 1)
        ctx.log(
            f"salun: {len(forget)} forget latents ({params.data}) and {len(retain)} retain latents ({retain_source})"
        )
        return forget, retain

    @staticmethod
    def _saliency_mask(unet, scheduler, trained, forget: LatentSet, embeddings, forget_rows, params, ctx):
        generator = torch.Generator().manual_seed(ctx.seed + 2)

        def batches():
            for start in range(0, len(forget), params.batch_size):
                yield slice(start, start + params.batch_size)

        def forgetting_loss(batch: slice) -> torch.Tensor:
            x0 = forget.latents[batch]
            n = x0.shape[0]
            cond = embeddings[forget_rows[forget.prompt_index[batch]]]
            timesteps = random_timesteps(n, scheduler, generator).to(x0.device)
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            x_t = noise_latents(scheduler, x0, noise, timesteps)
            uncond = embeddings.uncond(n).to(cond)
            out_u, out_c = predict(
                unet, torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]), torch.cat([uncond, cond])
            ).chunk(2)
            # guided prediction (1 + w) eps(c) - w eps(∅), i.e. CFG with scale 1 + w
            prediction = guided(out_u, out_c, 1.0 + params.mask_guidance)
            return -F.mse_loss(prediction, denoising_target(scheduler, x0, noise, timesteps))

        gradients = accumulate_gradients(trained, batches(), forgetting_loss)
        masks = top_fraction_mask(gradients, params.mask_fraction)
        ctx.log(
            f"salun: saliency mask keeps the top {params.mask_fraction:.0%} of {sum(m.numel() for m in masks.values())} weights"
        )
        return masks

    @staticmethod
    def _batch(n: int, step: int, batch_size: int, seed: int, stream: str) -> torch.Tensor:
        """Indices of batch ``step`` of an endless sequence of epochs over ``n`` items, each a seeded shuffle.

        Each epoch's order depends only on (seed, stream, epoch), so a resumed run sees the same batches.
        """
        per_epoch = math.ceil(n / batch_size)
        epoch, position = divmod(step, per_epoch)
        offset = {"forget": 0, "retain": 1}[stream]
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch * 2 + offset)
        )
        return order[position * batch_size : (position + 1) * batch_size]

    @staticmethod
    def _pseudo_rows(template: torch.Tensor, pseudo_rows: list[torch.Tensor], generator: torch.Generator):
        """Per sample, one embedding row among its template's pseudo prompts (uniformly at random)."""
        picks = []
        for i in template.tolist():
            rows = pseudo_rows[i]
            picks.append(rows[int(torch.randint(len(rows), (1,), generator=generator))])
        return torch.stack(picks)
