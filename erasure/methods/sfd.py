"""SFD: Score Forgetting Distillation (Chen, Zhang, Zhou; "Score Forgetting Distillation: A Swift, Data-Free Method
for Machine Unlearning in Diffusion Models", ICLR 2025; code ``tqch/score-forgetting-distillation``), built on SiD
(Zhou et al., "Score identity Distillation", ICML 2024) and its text-to-image form SiD-LSG.

The pipeline's UNet is distilled into a **one-step generator** ``G`` while the target is forgotten. Three UNets,
all initialised from the pipeline's: the frozen teacher ``f_phi``, a fake-score network ``f_psi`` and ``G``
(which replaces the pipeline's UNet). ``G`` makes a clean latent from pure noise in one call at a fixed timestep
(:mod:`generators.one_step`): ``x_g = x0(G(sqrt(1 - abar[t_init]) z, t_init, c))``. Every step alternates:

1. **fake score**: ``x_g`` from ``G`` (no gradient), ``x_t = sqrt(abar_t) x_g + sqrt(1 - abar_t) eps`` with
   ``t ~ U[t_min, t_max)``; ``L_psi = sum ||eps_psi(x_t, t, c) - eps||^2`` (SiD's denoising loss on generated
   data).
2. **generator** (fresh ``z``, ``eps``, ``t``; gradients flow through both score networks into ``x_g``), with the
   x0-predictions ``y_real = f_phi(x_t, c_teacher)`` (classifier-free guided, ``teacher_guidance``) and
   ``y_fake = f_psi(x_t, c)``, ``w = sg[mean |x_g - y_real|]``::

       L_G = sum (y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake)) / w        (SiD, "L2 - alpha L1")

**Forgetting.** Each step's batch holds ``batch_size`` remain prompts and ``forget_batch_size`` prompts of the
target. For a remain prompt ``c_teacher = c``; for a forget prompt ``G`` and ``f_psi`` are conditioned on it but
the teacher on its **override** (SFD's ``label_to_override`` / the SD code's override prompt): the job's anchor in
the same template, or a random other concept of the target's kind (SFD's ``pseudo_label_type='rand'``), or the
empty prompt. ``G``'s score for the forgotten concept is thus aligned with the teacher's score for the override.
Losses: ``remain + forget_coef * forget`` for each network, summed over pixels and divided by ``batch_size``
(the reference divides by its per-GPU batch), Adam with ``betas=(0, 0.999)``, gradient value clipping.

Choices that are ours (SFD's public code distils CIFAR-10 DDPMs and starts its SD runs from a SiD-LSG generator
that was distilled beforehand on GPUs; we start from the pipeline's UNet, on CPU):

* **Warm start** (``warmup_steps``, 0 = the reference, pure SiD from the teacher's weights): before SiD, ``G`` is
  regressed onto the teacher's own ``ddim_steps``-step guided DDIM samples from the same start noise (Luhman &
  Luhman 2021's one-step knowledge distillation), with forget prompts regressed onto the samples of their
  override. It stands in, cheaply, for SFD-SD's pre-distilled SiD-LSG generator (and for the first stage of SFD's
  "two-stage" variant) so that a CPU budget of a few hundred SiD steps starts from a usable one-step generator.
* ``fake_guidance`` (SFD-SD's kappa_1 = kappa_2 = kappa_3) other than 1 drops 10% of the fake network's training
  prompts to the empty prompt, as the reference does when it guides the fake score.
* Prompts come from :func:`erasure.forget_data.concept_prompts` (on MiniCanvas: every caption form of every
  (style, object) pair; remain = the other concepts), not from LAION captions; no EMA of ``G`` (the SD script's
  ``ema 0``); fp32.

Each field gives the reference values (CIFAR-10 config ``cifar10_sfd.yml``; SD script ``run_sfd.sh``) next to
ours, which are sized for MiniCanvas on 2 CPU cores. The result is the whole ``G`` (saved in place of the UNet)
and the one-step marker (``weights/one_step.safetensors``): every sampler of the studio then makes an image with
one UNet call.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from erasure.base import ErasureMethod, ErasureResult, MethodParams, RunContext
from erasure.forget_data import ConceptPrompts, PromptSource, concept_prompts, resolve_prompt_source, spread
from erasure.registry import register_method
from erasure.resume import TrainingCheckpoints, job_fingerprint
from erasure.text_embeddings import PromptEmbeddings
from erasure.trajectory import ddim_scheduler, guided, initial_noise, sample_trajectories
from generators.one_step import add_noise, alphas_cumprod, generate_latents, marker_tensors, predicted_x0

if TYPE_CHECKING:
    from erasure.config import Target

Override = Literal["auto", "anchor", "random", "empty"]
# SFD-SD: share of the fake score's training prompts dropped to "" when the fake score is guided.
CONTEXT_DROPOUT = 0.1


class SFDParams(MethodParams):
    """SFD budgets. Defaults are for MiniCanvas on 2 CPU cores; "reference" = SFD's CIFAR-10 config / SD script."""

    iterations: int = Field(
        300,
        ge=1,
        description="SiD steps (one fake-score and one generator update each). Reference: 50k (CIFAR-10, batch "
        "128); SD: 1 Mimg at batch 8.",
    )
    batch_size: int = Field(
        6, ge=1, description="Remain prompts per step. Reference: 128 (CIFAR-10), 8 (SD)."
    )
    forget_batch_size: int = Field(
        2, ge=1, description="Forget prompts per step. Reference: as many as remain prompts."
    )
    lr_g: float = Field(
        1e-6,
        gt=0,
        description="Generator Adam learning rate. Reference: 1e-5 (CIFAR-10), 1e-6 (SD). Measured on MiniCanvas: "
        "3e-5 (with lr_fake 1e-4) wrecked the warm-started generator within 60 SiD steps (canvas FID 209 -> 1018).",
    )
    lr_fake: float = Field(
        3e-6, gt=0, description="Fake-score Adam learning rate. Reference: 1e-5 (CIFAR-10), 3e-6 (SD)."
    )
    alpha: float = Field(
        1.2,
        description="alpha of SiD's L2 - alpha*L1 generator loss. Reference: 1.2 (SiD, CIFAR-10), 1.0 (SD).",
    )
    t_init: int = Field(
        625,
        ge=0,
        description="Fixed timestep of the one-step generator. Reference: 440 (CIFAR-10), 625 (SD).",
    )
    t_min: int = Field(
        20, ge=0, description="Smallest timestep for the score networks. Reference: 38 / 20 (SD)."
    )
    t_max: int = Field(
        980, ge=1, description="Timesteps t ~ U[t_min, t_max). Reference: 712 (CIFAR-10), 980 (SD)."
    )
    teacher_guidance: float = Field(
        5.0,
        ge=0,
        description="CFG scale of the teacher score (kappa_4; 1 = conditional only). Reference: 4.5 (SD); "
        "CIFAR-10's DDPM is unguided. MiniCanvas samples with 5.",
    )
    fake_guidance: float = Field(
        1.0,
        ge=0,
        description="CFG scale of the fake score, in training and evaluation (kappa_1..3). Reference: 4.5 (SD "
        "script), 1 (SiD-LSG default).",
    )
    forget_coef_g: float = Field(
        1.0,
        ge=0,
        description="Weight of the generator's forget loss. Reference: 0.01 (CIFAR-10), 1.0 (SD script).",
    )
    forget_coef_fake: float = Field(
        1.0,
        ge=0,
        description="Weight of the fake score's forget loss. Reference: 0.01 (CIFAR-10), 1.0 (SD script).",
    )
    grad_clip: float | None = Field(
        1.0, gt=0, description="Gradient value clipping of both networks (None: off). Reference: 1.0."
    )
    override: Override = Field(
        "auto",
        description="Teacher prompt for forget prompts: 'anchor' (the job's anchor in the same template; SFD-SD's "
        "override prompt), 'random' (a random other concept of the target's kind per sample; SFD's 'rand'), "
        "'empty' (the empty prompt); 'auto' = anchor if the job has one, else random when other concepts are "
        "known, else empty.",
    )
    prompts: PromptSource = Field(
        "auto",
        description="Prompt sets: 'minicanvas' (every caption form of every style/object pair; remain = the "
        "other concepts), 'target' (the target's own prompt, COCO object prompts as remain), 'auto' = minicanvas "
        "on the MiniCanvas world. Reference: LAION captions (remain) and concept prompt lists (forget).",
    )
    warmup_steps: int = Field(
        150,
        ge=0,
        description="Ours: regression steps of G onto the teacher's DDIM samples before SiD (0 = reference: SiD "
        "from the teacher's weights; SFD-SD starts from a pre-distilled SiD-LSG generator instead).",
    )
    warmup_samples: int = Field(
        160, ge=1, description="Ours: teacher DDIM samples the warm start regresses onto (drawn once)."
    )
    warmup_batch_size: int = Field(16, ge=1, description="Ours: samples per warm-start step.")
    warmup_lr: float = Field(3e-4, gt=0, description="Ours: Adam learning rate of the warm start.")
    ddim_steps: int = Field(
        25,
        ge=2,
        description="Ours: DDIM steps of the warm start's teacher samples (MiniCanvas samples with 25).",
    )

    @model_validator(mode="after")
    def _timesteps(self) -> SFDParams:
        if self.t_max <= self.t_min:
            raise ValueError(f"t_max ({self.t_max}) must be larger than t_min ({self.t_min})")
        return self


# ------------------------------------------------------------------------------------------------- loss pieces


def fake_score_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SiD's fake-score loss per sample: ``||f_psi(x_t) - target||^2`` summed over pixels, ``[n]``."""
    return (prediction - target).pow(2).flatten(1).sum(1)


def sid_generator_loss(
    x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float
) -> torch.Tensor:
    """SiD's generator loss per sample, ``[n]``::

        sum (y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake)) / sg[mean |x_g - y_real|]

    (``alpha = 1`` gives ``(y_real - y_fake) * (y_fake - x_g)``). All three are x0-predictions; gradients flow
    through each of them.
    """
    with torch.no_grad():
        weight = (x_g - y_real).abs().flatten(1).mean(1).clamp_min(1e-5)
    loss = (y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake))
    return loss.flatten(1).sum(1) / weight


def score_x0(
    unet: nn.Module,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: float,
    prediction_type: str,
    abar: torch.Tensor,
) -> torch.Tensor:
    """A score network's x0-prediction at ``x_t``, classifier-free guided with scale ``guidance`` (1: ``cond`` only)."""
    if guidance == 1.0:
        output = unet(x_t, timesteps, encoder_hidden_states=cond).sample
    else:
        both = unet(
            torch.cat([x_t, x_t]),
            torch.cat([timesteps, timesteps]),
            encoder_hidden_states=torch.cat([uncond, cond]),
        ).sample
        output = guided(*both.chunk(2), guidance)
    return predicted_x0(prediction_type, abar, x_t, output, timesteps)


# ----------------------------------------------------------------------------------------------------- prompts


@dataclass
class Batch:
    """One step's prompts: ``cond`` conditions ``G`` and the fake score, ``teacher_cond`` the teacher (the override
    on forget rows); ``forget`` marks the forget rows (the last ``forget_batch_size``)."""

    cond: torch.Tensor
    teacher_cond: torch.Tensor
    forget: torch.Tensor

    def __len__(self) -> int:
        return self.cond.shape[0]


class SFDPrompts:
    """Remain, forget and override prompt embeddings, and the draw of a step's batch."""

    def __init__(
        self, tokenizer, text_encoder, sets: ConceptPrompts, override: Literal["anchor", "random", "empty"]
    ):
        forget = sets.forget
        if override == "anchor":
            options = [[p] for p in sets.anchored]
        elif override == "random":
            options = [sets.substitutes(i) for i in range(len(forget))]
        else:
            options = [[""] for _ in forget]
        flat = sorted({p for row in options for p in row})
        position = {p: i for i, p in enumerate(flat)}
        self.override_options = [torch.tensor([position[p] for p in row]) for row in options]
        self.remain = PromptEmbeddings(tokenizer, text_encoder, sets.retain)
        self.forget = PromptEmbeddings(tokenizer, text_encoder, forget)
        self.overrides = PromptEmbeddings(tokenizer, text_encoder, flat)
        self.override = override

    @property
    def empty(self) -> torch.Tensor:
        return self.remain.empty

    def override_index(self, forget_index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """An override prompt (index into ``overrides``) for each forget prompt index, drawn at random among its
        options (one option unless ``override='random'``)."""
        picks = []
        for i in forget_index.tolist():
            options = self.override_options[i]
            picks.append(options[int(torch.randint(len(options), (1,), generator=generator))])
        return torch.stack(picks) if picks else torch.zeros(0, dtype=torch.long)

    def batch(
        self, remain_index: torch.Tensor, forget_index: torch.Tensor, override_index: torch.Tensor
    ) -> Batch:
        cond = torch.cat([self.remain[remain_index], self.forget[forget_index]])
        teacher = torch.cat([self.remain[remain_index], self.overrides[override_index]])
        mask = torch.cat(
            [
                torch.zeros(len(remain_index), dtype=torch.bool),
                torch.ones(len(forget_index), dtype=torch.bool),
            ]
        )
        return Batch(cond=cond, teacher_cond=teacher, forget=mask)

    def draw(self, n_remain: int, n_forget: int, generator: torch.Generator) -> Batch:
        remain_index = torch.randint(len(self.remain), (n_remain,), generator=generator)
        forget_index = torch.randint(len(self.forget), (n_forget,), generator=generator)
        return self.batch(remain_index, forget_index, self.override_index(forget_index, generator))


def resolve_override(
    override: Override, sets: ConceptPrompts, has_anchor: bool
) -> Literal["anchor", "random", "empty"]:
    if override == "auto":
        if has_anchor:
            return "anchor"
        return "random" if sets.others else "empty"
    if override == "anchor" and not has_anchor:
        raise ValueError("override 'anchor' needs an anchor concept (set `anchor:` in the job)")
    return override


# ------------------------------------------------------------------------------------------------------ method


@register_method
class SFD(ErasureMethod):
    """Score Forgetting Distillation (Chen et al., ICLR 2025): one-step SiD distillation that forgets the target."""

    name = "sfd"
    backbone_kind = "sd"
    description = (
        "SFD (Chen et al. 2025): distil the pipeline into a one-step generator (SiD) whose score for the target "
        "follows the teacher's score for an override concept."
    )
    Params = SFDParams

    def erase(self, backbone, target: Target, params: SFDParams, ctx: RunContext) -> ErasureResult:
        pipe = backbone
        unet = pipe.unet
        steps = int(pipe.scheduler.config.num_train_timesteps)
        for name in ("t_init", "t_min"):
            if getattr(params, name) >= steps:
                raise ValueError(f"{name} must be below the scheduler's {steps} training timesteps")
        t_max = min(params.t_max, steps)
        prediction_type = pipe.scheduler.config.prediction_type
        abar = alphas_cumprod(pipe.scheduler)
        device = unet.device

        source = resolve_prompt_source(params.prompts, pipe, target)
        sets = concept_prompts(target, ctx.anchor, source)
        override = resolve_override(params.override, sets, ctx.anchor is not None)
        prompts = SFDPrompts(pipe.tokenizer, pipe.text_encoder, sets, override)
        ctx.log(
            f"sfd: {len(prompts.remain)} remain and {len(prompts.forget)} forget prompts from '{source}' "
            f"(e.g. {prompts.forget.prompts[0]!r}); teacher override: {override} ({len(prompts.overrides)} prompts)"
        )

        teacher = copy.deepcopy(unet).requires_grad_(False)
        fake = copy.deepcopy(unet).requires_grad_(False)
        generator_net = unet.requires_grad_(False)
        opt_g = torch.optim.Adam(generator_net.parameters(), lr=params.lr_g, betas=(0.0, 0.999), eps=1e-8)
        opt_fake = torch.optim.Adam(fake.parameters(), lr=params.lr_fake, betas=(0.0, 0.999), eps=1e-8)
        opt_warm = torch.optim.Adam(generator_net.parameters(), lr=params.warmup_lr)  # its own moments
        rng = torch.Generator().manual_seed(ctx.seed + 1)
        losses: dict[str, list[float]] = {"warmup": [], "g": [], "fake": []}
        checkpoints = TrainingCheckpoints(
            ctx,
            job_fingerprint(self.name, params, target, ctx),
            modules={"generator": generator_net, "fake": fake},
            optimizers={"g": opt_g, "fake": opt_fake, "warm": opt_warm},
            generators={"train": rng},
            history=losses,
        )
        done = checkpoints.resume()
        total = params.warmup_steps + params.iterations

        warm = None
        if done < params.warmup_steps:
            warm = self._warm_start_data(pipe, teacher, prompts, params, ctx)
        uncond = prompts.empty.to(device)

        for step in range(done + 1, total + 1):
            if step <= params.warmup_steps:
                loss = self._warm_start_step(generator_net, warm, params, abar, prediction_type, rng, device)
                _step(opt_warm, generator_net, loss, params.grad_clip)
                generator_net.requires_grad_(False)
                losses["warmup"].append(loss.item())
                scalars = {"loss_warmup": losses["warmup"][-1]}
            else:
                loss_fake, loss_g = self._sid_step(
                    generator_net,
                    fake,
                    teacher,
                    prompts,
                    uncond,
                    params,
                    t_max,
                    abar,
                    prediction_type,
                    opt_g,
                    opt_fake,
                    rng,
                    device,
                )
                losses["fake"].append(loss_fake)
                losses["g"].append(loss_g)
                scalars = {"loss_g": loss_g, "loss_fake": loss_fake}
            checkpoints.step_done(step, total)
            ctx.progress(step, total, **scalars)

        generator_net.requires_grad_(False)
        metrics: dict[str, float] = {"t_init": float(params.t_init), "sampling_unet_calls": 1.0}
        for key, values in losses.items():
            if values:
                metrics[f"final_loss_{key}"] = sum(values[-20:]) / len(values[-20:])
        state = {
            k: v.detach().to("cpu", copy=True).contiguous() for k, v in generator_net.state_dict().items()
        }
        return ErasureResult(
            changed={"unet": state, "one_step": marker_tensors(params.t_init)}, metrics=metrics
        )

    # ------------------------------------------------------------------------------------------- warm start

    @staticmethod
    def _warm_start_data(pipe, teacher, prompts: SFDPrompts, params: SFDParams, ctx: RunContext):
        """The teacher's guided DDIM samples (override prompts on forget rows) and, per sample, its start noise and
        generator condition: what the warm start regresses ``G`` onto. Deterministic for the job's seed."""
        setup = torch.Generator().manual_seed(ctx.seed)
        n = params.warmup_samples
        share = params.forget_batch_size / (params.batch_size + params.forget_batch_size)
        n_forget = min(n, max(1, round(n * share)))
        remain_index = spread(n - n_forget, len(prompts.remain), setup)
        forget_index = spread(n_forget, len(prompts.forget), setup)
        batch = prompts.batch(remain_index, forget_index, prompts.override_index(forget_index, setup))
        noise = initial_noise(n, teacher, setup)
        scheduler = ddim_scheduler(pipe.scheduler.config, params.ddim_steps, teacher.device)
        result = sample_trajectories(
            teacher,
            scheduler,
            noise,
            batch.teacher_cond,
            prompts.empty,
            params.teacher_guidance,
            keep_states=False,
        )
        ctx.log(
            f"sfd: warm start on {n} teacher samples ({n_forget} of forget prompts under their override), "
            f"{params.ddim_steps} DDIM steps, guidance {params.teacher_guidance}"
        )
        return noise, batch.cond, result.final.detach()

    @staticmethod
    def _warm_start_step(generator_net, warm, params: SFDParams, abar, prediction_type, rng, device):
        noise, cond, target = warm
        index = torch.randint(noise.shape[0], (params.warmup_batch_size,), generator=rng)
        generator_net.requires_grad_(True)
        x_g = generate_latents(
            generator_net,
            noise[index].to(device),
            cond[index].to(device),
            params.t_init,
            abar,
            prediction_type,
        )
        return F.mse_loss(x_g, target[index].to(device))

    # ---------------------------------------------------------------------------------------------------- SiD

    @staticmethod
    def _sid_step(
        generator_net,
        fake,
        teacher,
        prompts: SFDPrompts,
        uncond,
        params: SFDParams,
        t_max: int,
        abar,
        prediction_type: str,
        opt_g,
        opt_fake,
        rng,
        device,
    ) -> tuple[float, float]:
        """One SFD iteration: a fake-score update on ``G``'s samples, then a generator update."""
        # 1. fake score network
        batch = prompts.draw(params.batch_size, params.forget_batch_size, rng)
        n = len(batch)
        z = torch.randn(_latent_shape(generator_net, n), generator=rng)
        eps = torch.randn(z.shape, generator=rng)
        t = torch.randint(params.t_min, t_max, (n,), generator=rng)
        cond = batch.cond
        if params.fake_guidance != 1.0:
            drop = torch.rand(n, generator=rng) < CONTEXT_DROPOUT
            cond = torch.where(drop[:, None, None], prompts.empty.expand_as(cond), cond)
        with torch.no_grad():
            x_g = generate_latents(
                generator_net, z.to(device), batch.cond.to(device), params.t_init, abar, prediction_type
            )
        x_t = add_noise(abar, x_g, eps.to(device), t.to(device))
        fake.requires_grad_(True)
        output = _guided_output(fake, x_t, t.to(device), cond.to(device), uncond, params.fake_guidance)
        target = _denoising_target(prediction_type, abar, x_g, eps.to(device), t)
        coef_fake = _coefficients(batch.forget, params.forget_coef_fake).to(device)
        loss_fake = (coef_fake * fake_score_loss(output, target)).sum() / params.batch_size
        _step(opt_fake, fake, loss_fake, params.grad_clip)
        fake.requires_grad_(False)

        # 2. one-step generator
        batch = prompts.draw(params.batch_size, params.forget_batch_size, rng)
        z = torch.randn(_latent_shape(generator_net, n), generator=rng)
        eps = torch.randn(z.shape, generator=rng)
        t = torch.randint(params.t_min, t_max, (n,), generator=rng).to(device)
        generator_net.requires_grad_(True)
        x_g = generate_latents(
            generator_net, z.to(device), batch.cond.to(device), params.t_init, abar, prediction_type
        )
        x_t = add_noise(abar, x_g, eps.to(device), t)
        u = uncond.unsqueeze(0).expand(n, -1, -1)
        y_fake = score_x0(fake, x_t, t, batch.cond.to(device), u, params.fake_guidance, prediction_type, abar)
        y_real = score_x0(
            teacher, x_t, t, batch.teacher_cond.to(device), u, params.teacher_guidance, prediction_type, abar
        )
        coef_g = _coefficients(batch.forget, params.forget_coef_g).to(device)
        loss_g = (coef_g * sid_generator_loss(x_g, y_real, y_fake, params.alpha)).sum() / params.batch_size
        _step(opt_g, generator_net, loss_g, params.grad_clip)
        generator_net.requires_grad_(False)
        return loss_fake.item(), loss_g.item()


def _guided_output(unet, x_t, t, cond, uncond, guidance: float) -> torch.Tensor:
    if guidance == 1.0:
        return unet(x_t, t, encoder_hidden_states=cond).sample
    u = uncond.unsqueeze(0).expand(x_t.shape[0], -1, -1)
    both = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([u, cond])).sample
    return guided(*both.chunk(2), guidance)


def _denoising_target(prediction_type: str, abar, x0, eps, t) -> torch.Tensor:
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        a = abar[t.long()].to(x0)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return a.sqrt().view(shape) * eps - (1 - a).sqrt().view(shape) * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def _coefficients(forget: torch.Tensor, forget_coef: float) -> torch.Tensor:
    """Per-row loss weights: 1 for remain rows, ``forget_coef`` for forget rows."""
    return torch.where(forget, torch.tensor(float(forget_coef)), torch.tensor(1.0))


def _latent_shape(unet, n: int) -> tuple[int, int, int, int]:
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return (n, cfg.in_channels, size, size)


def _step(
    optimizer: torch.optim.Optimizer, module: nn.Module, loss: torch.Tensor, clip: float | None
) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p for p in module.parameters() if p.grad is not None]
    for p in grads:
        torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
    if clip is not None:
        torch.nn.utils.clip_grad_value_(grads, clip)
    optimizer.step()
