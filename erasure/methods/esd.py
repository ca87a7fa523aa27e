"""ESD: Erased Stable Diffusion (Gandikota, Materzyńska, Fiotto-Kaufman, Bau; "Erasing Concepts from Diffusion
Models", ICCV 2023; code ``rohitgandikota/erasing``).

The UNet is fine-tuned so that, conditioned on the concept prompt ``c``, it predicts the frozen model's
*negatively guided* score::

    L = MSE( eps_theta(x_t, c, t),  sg[ eps*(x_t, ∅, t) - eta * (eps*(x_t, c, t) - eps*(x_t, ∅, t)) ] )

at latents ``x_t`` obtained by partial DDIM sampling under ``c`` with guidance ``start_guidance``
(:mod:`erasure.trajectory`). Parameter sets (:mod:`erasure.param_sets`): ESD-x trains cross-attention (styles),
ESD-u everything else except time embedding and output layer (objects, nudity).

Which model samples ``x_t``: the 2024 diffusers code of the authors uses the frozen model (``sampler: frozen``,
default here), so all latents and teacher predictions are computed once, up front, for ``trajectories`` noise
seeds (:func:`erasure.trajectory.sample_trajectories`) and each step draws its states among them; the CompVis
code of the paper samples with the model being trained (``sampler: current``), one fresh partial trajectory per
step. Budgets: each field documents the paper/CompVis default and, where it differs, the diffusers one; our
defaults are sized for MiniCanvas on 2 CPU cores. The "erase-from" variant of the diffusers code is not
implemented. Our option ``reference: caption`` replaces ``∅`` in the target by the concept prompt with the target's
name dropped, for caption prompts (``prompts: minicanvas``), whose ``eps(c) - eps(∅)`` also holds their objects.
Our option ``reference: others`` puts a random other concept of the target's kind in the target's place, one per
state: as the loss is a squared error, its optimum is the target built on the *mean* of the other concepts' scores,
a neutral reference for models whose caption without a name still draws particular concepts (MiniSD draws
mostly Comic, Mosaic and Cocoa for "A circle image in style."; docs/world.md).

Our option ``keep_unconditional: null_space`` (with ``train_method: esd-x-strict``, the keys and values only)
projects every update onto the null space of the empty prompt's token states (:mod:`erasure.null_space`), so the
unconditional output, which classifier-free guidance ``uncond + s (cond - uncond)`` returns ``s - 1`` times
amplified for every prompt, does not move (up to the directions ``null_space_tol`` leaves free); ``retain`` adds
that output's squared error to the loss instead. ESD trains on the target's prompts only and nothing else holds that
output: on MiniSD's Ink its mean squared change reached 0.11 at the middle DDIM step, and the other styles' objects
went with it (docs/leaderboard/README.md, sixteenth session).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from erasure.base import ErasureMethod, ErasureResult, MethodParams, RunContext, yaml_off
from erasure.forget_data import (
    EsdReference,
    PromptSource,
    References,
    concept_prompts,
    esd_references,
    prompt_trajectories,
    resolve_prompt_source,
)
from erasure.losses import esd_loss
from erasure.null_space import KeptInputs, NullSpaceTolerance
from erasure.param_sets import (
    ParameterSubset,
    UnetParamSet,
    changed_tensors,
    train_only,
    unet_parameter_names,
)
from erasure.registry import register_method
from erasure.resume import TrainingCheckpoints, job_fingerprint
from erasure.text_embeddings import PromptEmbeddings
from erasure.trajectory import ddim_scheduler, initial_noise, predict, sample_until

if TYPE_CHECKING:
    from erasure.config import Target


class ESDParams(MethodParams):
    """ESD budgets. Defaults are for MiniCanvas; "reference" is the paper's CompVis code unless noted."""

    train_method: UnetParamSet = Field(
        "esd-x",
        description="Parameters to train: esd-x (cross-attention; the paper's choice for styles), esd-u (all but "
        "cross-attention, time embedding and output layer; objects/nudity), esd-x-strict (attn2 to_k/to_v), full.",
    )
    # 1000 like the paper: on the v4 MiniCanvas world 250 steps left 2 of 10 Ember samples Ember (UA 0.8, quick
    # tier); 1000 gave UA 1.0, IRA 1.0, CRA 0.91 in 87 s on 2 CPU cores.
    iterations: int = Field(
        1000, ge=1, description="Training steps. Reference: 1000 (CompVis/paper), 200 (diffusers)."
    )
    lr: float = Field(
        2e-4, gt=0, description="Adam learning rate. Reference: 1e-5 (CompVis/paper), 5e-5 (diffusers)."
    )
    batch_size: int = Field(4, ge=1, description="Latents x_t per step. Reference: 1.")
    negative_guidance: float = Field(
        1.0,
        ge=0,
        description="eta of the negatively guided target. Reference: 1.0 (CompVis/paper). The 2024 diffusers "
        "code writes its target as eps(c) - eta' (eps(c) - eps(0)) and defaults to eta' = 2, which is eta = 1 "
        "here (eta = eta' - 1).",
    )
    start_guidance: float = Field(
        3.0, ge=0, description="CFG scale of the DDIM sampling that makes x_t. Reference: 3."
    )
    ddim_steps: int = Field(
        25,
        ge=2,
        description="DDIM steps of that sampling (x_t index k ~ U{0..steps-1}). Reference: 50; MiniCanvas "
        "samples with 25.",
    )
    sampler: Literal["frozen", "current"] = Field(
        "frozen",
        description="Model that samples x_t: frozen original (diffusers code; all trajectories sampled once) or "
        "the model being trained (CompVis code of the paper; one partial trajectory per step, much slower).",
    )
    trajectories: int = Field(
        48,
        ge=1,
        description="sampler=frozen: DDIM trajectories sampled up front; every step draws its states "
        "among their trajectories x steps states. Reference: a fresh trajectory per step (= iterations).",
    )
    prompts: PromptSource = Field(
        "target",
        description="Concept prompts: 'target' = the target's own prompt, e.g. 'Ember style' (reference); "
        "'minicanvas' = MiniCanvas captions naming the target, one per trajectory (like the reference's "
        "--seperator mode); 'auto' = minicanvas on the MiniCanvas world. With reference='empty' full captions "
        "also erase what else they name (their objects): on MiniCanvas Lagoon that cost CRA 0.92 -> 0.16.",
    )
    reference: EsdReference = Field(
        "empty",
        description="Reference branch of the target, eps*(x_t, r) - eta (eps*(x_t, c) - eps*(x_t, r)): 'empty' = "
        "r is the empty prompt (reference); 'caption' = r is each concept prompt with the target's name dropped "
        "('A circle image in style.'), so that only the target's direction is negated; 'others' = r is the "
        "concept prompt with a random other concept of the target's kind in its place, drawn per state, so that "
        "the MSE's optimum negates from the mean of the other concepts (MiniCanvas prompts only). Both: one more "
        "frozen-UNet forward per step, and a frozen copy of the UNet.",
    )
    keep_unconditional: Literal["null_space", "retain", "off"] = Field(
        "off",
        description="Ours: keep the empty prompt's output, which classifier-free guidance (uncond + s (cond - "
        "uncond)) amplifies the drift of. null_space = every key/value update is projected onto the null space "
        "of the empty prompt's token states (erasure/null_space.py), so that output stays as it was (up to the "
        "directions null_space_tol leaves free); needs train_method esd-x-strict (only attn2 to_k/to_v read the "
        "text). retain = the loss adds unconditional_weight x MSE(eps_theta(x_t, 0), sg[eps*(x_t, 0)]) at the "
        "same states. off = reference.",
    )
    unconditional_weight: float = Field(
        1.0, gt=0, description="keep_unconditional=retain: weight of the empty prompt's MSE term."
    )
    null_space_tol: NullSpaceTolerance = 1e-2

    _yaml_off = field_validator("keep_unconditional", mode="before")(yaml_off)

    @model_validator(mode="after")
    def _null_space_needs_keys_and_values_only(self):
        if self.keep_unconditional == "null_space" and self.train_method != "esd-x-strict":
            raise ValueError(
                f"keep_unconditional 'null_space' needs train_method 'esd-x-strict' (got {self.train_method!r}): "
                "only the cross-attention keys/values read the text states, so only their updates can be projected "
                "off the empty prompt's; use keep_unconditional 'retain' with other parameter sets"
            )
        return self


@register_method
class ESD(ErasureMethod):
    """Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023): ESD-x / ESD-u."""

    name = "esd"
    backbone_kind = "sd"
    description = (
        "ESD (Gandikota et al. 2023): fine-tune the UNet towards the frozen model's negatively guided score."
    )
    Params = ESDParams

    def erase(self, backbone, target: Target, params: ESDParams, ctx: RunContext) -> ErasureResult:
        pipe = backbone
        unet = pipe.unet
        source = resolve_prompt_source(params.prompts, pipe, target)
        sets = concept_prompts(target, None, source)
        prompts = sets.forget
        ctx.log(
            f"esd: {params.train_method}, {len(prompts)} concept prompt(s) from '{source}', e.g. {prompts[0]!r}"
        )
        embeddings = PromptEmbeddings(pipe.tokenizer, pipe.text_encoder, prompts)
        references = esd_references(pipe.tokenizer, pipe.text_encoder, sets, params.reference)
        if references is not None:
            ctx.log(f"esd: reference branch {references.prompts.prompts[0]!r} instead of the empty prompt")
        scheduler = ddim_scheduler(pipe.scheduler.config, params.ddim_steps, unet.device)
        setup = torch.Generator().manual_seed(ctx.seed)

        teacher = None
        trajectories = None
        frozen = unet
        if params.sampler == "frozen":
            # Kept (speed.reuse) or, on the reference path, recomputed by a frozen copy whenever drawn.
            frozen = unet if ctx.speed.reuse else copy.deepcopy(unet).requires_grad_(False)
            trajectories = prompt_trajectories(
                frozen,
                scheduler,
                embeddings,
                params.trajectories,
                params.start_guidance,
                setup,
                ctx.speed.reuse,
            )
            ctx.log(
                f"esd: {params.trajectories} trajectories x {params.ddim_steps} steps of the frozen UNet "
                + ("sampled" if ctx.speed.reuse else "to be recomputed when drawn (speed.reuse off)")
            )
        if params.sampler == "current" or references is not None:
            # The frozen UNet for the reference branch (and for sampler=current); an existing frozen copy serves.
            teacher = frozen if frozen is not unet else copy.deepcopy(unet).requires_grad_(False)

        trained = train_only(unet, unet_parameter_names(unet, params.train_method))
        optimizer = torch.optim.Adam(trained.values(), lr=params.lr)
        keep = (
            KeptInputs(trained, embeddings.empty, params.null_space_tol)
            if params.keep_unconditional == "null_space"
            else None
        )
        if keep is not None:
            ctx.log(f"esd: updates projected off the empty prompt's {keep.rank} token-state directions")
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
        for step in range(checkpoints.resume() + 1, params.iterations + 1):
            if trajectories is not None:
                latents, timesteps, index, cond_out, uncond_out = trajectories.draw(
                    params.batch_size, generator
                )
            else:
                latents, timesteps, index, cond_out, uncond_out = self._current_model_states(
                    unet, teacher, scheduler, embeddings, references, params, generator
                )
            # The frozen model's empty-prompt output at these states (drawn with them, unless replaced below).
            empty_out = uncond_out if references is None or trajectories is not None else None
            if references is not None and trajectories is not None:
                with torch.no_grad():
                    uncond_out = predict(teacher, latents, timesteps, references.draw(index, generator))
            prediction = predict(unet, latents, timesteps, embeddings[index.to(embeddings.embeddings.device)])
            loss = esd_loss(prediction, uncond_out, cond_out, params.negative_guidance)
            if params.keep_unconditional == "retain":
                empty = embeddings.uncond(len(latents)).to(prediction)
                if empty_out is None:
                    with torch.no_grad():
                        empty_out = predict(teacher, latents, timesteps, empty)
                drift = F.mse_loss(predict(unet, latents, timesteps, empty), empty_out)
                loss = loss + params.unconditional_weight * drift
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if keep is not None:
                keep.project()
            losses.append(loss.item())
            checkpoints.step_done(step, params.iterations)
            ctx.progress(step, params.iterations, loss=losses[-1])
        metrics = {"final_loss": sum(losses[-20:]) / len(losses[-20:])} if losses else {}
        return ErasureResult(changed={"unet": changed_tensors(trained)}, metrics=metrics)

    @staticmethod
    def _current_model_states(
        unet,
        teacher,
        scheduler,
        embeddings: PromptEmbeddings,
        references: References | None,
        params: ESDParams,
        generator,
    ):
        """CompVis ESD: a partial DDIM trajectory sampled by the model being trained, then the frozen teacher's
        conditional and reference outputs there (reference: ∅, or ``references`` for ``reference: caption``; all
        states of a batch share the step index)."""
        k = int(torch.randint(params.ddim_steps, (1,), generator=generator))
        index = torch.randint(len(embeddings), (params.batch_size,), generator=generator)
        noise = initial_noise(params.batch_size, unet, generator)
        cond = embeddings[index]
        latents = sample_until(unet, scheduler, noise, cond, embeddings.empty, params.start_guidance, k)
        timesteps = scheduler.timesteps[k].expand(params.batch_size)
        with torch.no_grad():
            if references is None:
                uncond = embeddings.uncond(params.batch_size).to(cond)
            else:
                uncond = references.draw(index, generator).to(cond)
            uncond_out, cond_out = predict(
                teacher,
                torch.cat([latents, latents]),
                torch.cat([timesteps, timesteps]),
                torch.cat([uncond, cond]),
            ).chunk(2)
        return latents, timesteps, index, cond_out, uncond_out
