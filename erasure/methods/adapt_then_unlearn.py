"""Adapt-then-Unlearn (Tiwary, Guha, Panda, Prathosh; "Adapt then Unlearn: Exploring Parameter Space Semantics for
Unlearning in Generative Adversarial Networks", TMLR 2025, arXiv 2309.14054; code ``atriguha/Adapt_Unlearn``).

The original training data is not needed: a judge (a classifier standing in for the user) labels the generator's
own samples. Negative samples show the target; positive samples do not.

1. **Negative adaptation** (``Negative_Adaptation/*/stylegan2_ewc_train.py``, ``model.py``). For each of
   ``adapted_models`` independent runs: collect ``negatives`` generated samples the judge flags (batches of
   ``sample_batch``, style mixing), then fine-tune a copy of the generator on them as the "real" data with the
   rosinality StyleGAN2 recipe (logistic losses, lazy R1, lazy path-length regularisation, EMA) plus the EWC
   penalty ``(lambda/2) sum_i F_i (theta_i - theta*_i)^2`` on the parameters of ``generator.convs``, with the
   Fisher diagonal ``F`` estimated once, before training, on the original generator: the mean over
   ``fisher_samples`` style-mixed samples of the squared gradient of the discriminator's logit. The adapted
   models' EMA weights ``theta^{N,k}`` are kept.
2. **Unlearning** (``Unlearning/*/unlearn_main.py``, ``train_different_losses.py``). The original generator is
   trained adversarially on positive samples (all non-target samples among ``positive_candidates`` generated
   ones) with a repulsion term that pushes its weights away from the adapted weights. With
   ``R = 1/2 * mean_k d(theta, theta^{N,k})`` (see ``repulsion_distance``), the generator loss is
   ``L_adv + el2_weight * exp(-gamma R)`` (EL2), ``L_adv - gamma R`` (NL2) or ``L_adv + gamma / R`` (IL2).
   The adapted weights are loaded once, as frozen tensors on the training device.

Where the weights come from: the loaded backbone is the sampling generator (``g_ema``), which stage 1 starts from
(as the reference does). When the backbone is a rosinality ``.pt`` (``RunContext.backbone_path``) its ``g`` starts
stage 2 (reference) and its ``d`` and both Adam states are used; ``discriminator`` may name another source (a
rosinality ``.pt``, a ``.safetensors`` discriminator state dict, or a MiniGAN training folder with
``checkpoint.json``), and a ``discriminator.safetensors`` next to a ``.safetensors`` generator is picked up.
Without any discriminator (e.g. a bare generator file) a freshly initialised one of the generator's widths is
warmed up for ``d_warmup`` discriminator-only steps at the start of each stage (ours; the reference always has
its checkpoint's ``d``).

Judges (:mod:`evaluate.judges` interface, ``shows(images, concept) -> bool``; images in ``[-1, 1]`` everywhere,
the reference's sample collection also feeds raw ``[-1, 1]`` images): ``minicanvas`` (the MiniCanvas classifier,
argmax of the target's axis), ``timm`` (a local classifier checkpoint, e.g. AtU's ResNet-50 for AFHQ with
``judge_rule: argmax`` or ResNeXt-50 CelebA attributes with ``judge_rule: logit_positive``) or ``callable`` (any
``module:function`` taking ``(images, concept)`` and returning one bool per image).

Deviations from the released code (each also noted at its field): the repulsion statistic averages over the
adapted models (``repulsion_k_scaling: mean``; the code's ``value/2*K`` makes it K^2 times larger, available as
``reference_code``); batches are drawn from the sample sets with replacement instead of shuffled epochs; the
sample sets are stored as 8-bit images; the path-length mean starts at the original generator's measured value
(``path_mean_init``; rosinality restarts it at 0, which for a short fine-tune pulls path lengths towards 0); the
EMA half-life is in steps and shorter by default (our budgets are far shorter); ``gamma_units: start_distance``
(optional, ours) measures R in units of its value at the start of stage 2 (see ``effective_gamma``); ``adapted_cache``
(optional, ours) shares finished adapted models between runs. Not implemented: the code's ``--scale_repel_loss`` and
the off-by-default ``--ewc_loss`` of stage 2. Budgets are sized for MiniGAN (32 px);
every field names the reference value.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from erasure.base import ErasureMethod, ErasureResult, MethodParams, RunContext
from erasure.errors import UserError
from erasure.io import load_tensors, save_tensors
from erasure.registry import register_method
from erasure.resume import TrainingCheckpoints, job_fingerprint
from generators.minigan import (
    accumulate,
    d_logistic_loss,
    d_r1_loss,
    g_nonsaturating_loss,
    g_path_regularize,
)
from generators.stylegan2 import Discriminator, Generator

if TYPE_CHECKING:
    from erasure.config import Target
    from evaluate.judges import Judge

GENERATOR = "generator"
RepulsionForm = Literal["el2", "nl2", "il2"]
RepulsionDistance = Literal["tensor_mean", "squared_l2"]
KScaling = Literal["mean", "reference_code"]


class AdaptThenUnlearnParams(MethodParams):
    """Adapt-then-Unlearn budgets and choices. Defaults are for MiniGAN; "reference" is ``atriguha/Adapt_Unlearn``."""

    # ------------------------------------------------------------------------------------------- judge
    judge: Literal["auto", "minicanvas", "timm", "callable"] = Field(
        "auto",
        description="Who labels generated samples as showing the target: 'minicanvas' (the MiniCanvas "
        "classifier), 'timm' (judge_checkpoint), 'callable' (judge_callable); 'auto' = minicanvas for a MiniCanvas "
        "style/object target, else an error asking for one. Reference: a pretrained classifier per dataset.",
    )
    judge_checkpoint: str | None = Field(
        None, description="judge=timm: local classifier state dict (.safetensors/.pt/.pth, weights only)."
    )
    judge_arch: str = Field("resnet50", description="judge=timm: timm architecture name (no download).")
    judge_num_classes: int | None = Field(None, ge=1, description="judge=timm: number of output logits.")
    judge_class: int | None = Field(None, ge=0, description="judge=timm: index of the target's logit.")
    judge_rule: Literal["argmax", "logit_positive"] = Field(
        "argmax",
        description="judge=timm: target shown when its logit is the argmax (reference MNIST/AFHQ) or >= 0 "
        "(reference CelebA attributes).",
    )
    judge_normalize: Literal["minus_one_one", "imagenet"] = Field(
        "minus_one_one", description="judge=timm: classifier input: [-1, 1] images, or ImageNet mean/std."
    )
    judge_image_size: int | None = Field(
        None,
        ge=8,
        description="judge=timm: resize images to this many pixels (None: the model's input size).",
    )
    judge_callable: str | None = Field(
        None,
        description="judge=callable: 'module:function'; function(images in [-1, 1], concept) -> bool per image.",
    )
    # ------------------------------------------------------------------------------------------- stage 1
    adapted_models: int = Field(
        2,
        ge=1,
        description="K, independent negative adaptations (fresh negatives and seed each). Reference: 5.",
    )
    negatives: int = Field(
        300,
        ge=1,
        description="Negative samples per adaptation. Reference: 300 (CelebA-HQ, AFHQ), 200 (MNIST).",
    )
    adapt_iterations: int = Field(
        300,
        ge=1,
        description="Stage-1 iterations per adapted model. Reference: 2000 (MNIST) to 9000 (CelebA).",
    )
    ewc_lambda: float = Field(5e8, ge=0, description="EWC weight lambda. Reference: 5e8.")
    fisher_samples: int = Field(
        32, ge=1, description="Style-mixed samples of the Fisher estimate. Reference: 32."
    )
    max_candidates: int = Field(
        50_000,
        ge=1,
        description="Stop the negative search after this many generated candidates (then train on what was "
        "found, or fail if fewer than a batch). Reference: no limit.",
    )
    # ------------------------------------------------------------------------------------------- stage 2
    iterations: int = Field(
        500, ge=1, description="Stage-2 iterations. Reference: 1000-5000 (3000 AFHQ, 5000 CelebA example)."
    )
    positive_candidates: int = Field(
        4096,
        ge=1,
        description="Generated candidates of which every non-target one is a positive. Reference: 500 x 64 "
        "(CelebA, AFHQ), 50 x 100 (MNIST).",
    )
    repulsion: RepulsionForm = Field(
        "el2",
        description="el2: + el2_weight * exp(-gamma R); nl2: - gamma R (unbounded); il2: + gamma / R. "
        "Reference: exp / l2 / reci (README CelebA example EL2, AFHQ hard-wired IL2).",
    )
    gamma: float = Field(
        1.0,
        gt=0,
        description="gamma of the repulsion (the code's 1/val_factor). Reference runs: EL2 0.8 (CelebA), 1 "
        "(MNIST); NL2 1.2 (MNIST); IL2 10 (CelebA), 0.1-100 (AFHQ). Sweep it.",
    )
    gamma_units: Literal["absolute", "start_distance"] = Field(
        "absolute",
        description="'absolute': gamma as given (reference); 'start_distance': the repulsion reads R / R0, with R0 "
        "the statistic at the start of stage 2, so that R is measured in units of the original's distance to the "
        "adapted models (IL2 then starts at gamma) "
        "(ours: R's scale depends on the generator and on how far stage 1 moved, e.g. about 1e-8 on a MiniGAN "
        "after a short adaptation, where the reference gammas have almost no effect).",
    )
    el2_weight: float = Field(
        100.0,
        gt=0,
        description="Weight of the EL2 term. Reference: 100 (MNIST; a commented AFHQ variant has 50).",
    )
    repulsion_distance: RepulsionDistance = Field(
        "tensor_mean",
        description="d(theta, theta_N): 'tensor_mean' = mean over parameter tensors of each tensor's mean squared "
        "difference (the code's MSELoss per tensor); 'squared_l2' = ||theta - theta_N||^2 (the paper's form).",
    )
    repulsion_k_scaling: KScaling = Field(
        "mean",
        description="'mean': R = 1/2 * mean over the K adapted models (the code's intent); 'reference_code': "
        "R = K/2 * sum over them (the code's value/2*K precedence, K^2 times larger; its gammas were tuned so).",
    )
    # ------------------------------------------------------------------------------------------- GAN recipe
    batch_size: int = Field(16, ge=1, description="Batch of both stages. Reference: 16.")
    lr: float = Field(
        0.002,
        gt=0,
        description="Adam learning rate before the lazy-regularisation scaling (G x 4/5, D x 16/17, betas "
        "(0, 0.99^ratio)). Reference: 0.002.",
    )
    mixing: float = Field(0.9, ge=0, le=1, description="Style-mixing probability. Reference: 0.9.")
    r1: float = Field(10.0, ge=0, description="R1 weight gamma_R1 on the discriminator. Reference: 10.")
    d_reg_every: int = Field(16, ge=1, description="Lazy R1 interval. Reference: 16.")
    path_regularize: float = Field(2.0, ge=0, description="Path-length weight. Reference: 2.")
    g_reg_every: int = Field(4, ge=1, description="Lazy path-length interval. Reference: 4.")
    path_batch_shrink: int = Field(2, ge=1, description="Path-length batch divisor. Reference: 2.")
    path_mean_init: Literal["measured", "zero"] = Field(
        "measured",
        description="Start of the path-length running mean: the original generator's measured mean (ours) or 0 "
        "(reference: rosinality restarts it at 0 on every launch).",
    )
    ema_half_life_steps: float = Field(
        50.0,
        ge=0,
        description="Half-life of the g_ema average in iterations; 0 keeps no average (returns G). Reference: "
        "312.5 (decay 0.5^(32/10000) per iteration).",
    )
    sample_batch: int = Field(
        32, ge=1, description="Batch for generating and judging candidates. Reference: 32 (negatives), 64."
    )
    # ------------------------------------------------------------------------------------------- weights
    discriminator: str | None = Field(
        None,
        description="Discriminator source: a rosinality .pt with 'd', a .safetensors D state dict, or a MiniGAN "
        "training folder (checkpoint.json). None: the backbone .pt's 'd', else discriminator.safetensors next to "
        "the generator, else a fresh D warmed up for d_warmup steps.",
    )
    d_warmup: int = Field(
        200,
        ge=0,
        description="Discriminator-only steps before each stage when D is freshly initialised (ours).",
    )
    restore_optimizers: bool = Field(
        True, description="Restore both Adam states when the discriminator source has them. Reference: yes."
    )
    adapted_cache: str | None = Field(
        None,
        description="Folder that keeps finished adapted models across runs, keyed by everything stage 1 depends on "
        "(the generator's weights, target, seed, the judge and stage-1/training fields): runs that differ only in "
        "stage 2 (repulsion, gamma, iterations, ...) reuse them. Ours; none: each run adapts its own.",
    )

    @model_validator(mode="after")
    def _check(self) -> AdaptThenUnlearnParams:
        for name in ("batch_size", "fisher_samples"):
            value = getattr(self, name)
            if value > 4 and value % 4:
                raise ValueError(
                    f"{name} must be a multiple of 4 (the discriminator's minibatch-stddev groups)"
                )
        if self.judge == "timm" and (
            self.judge_checkpoint is None or self.judge_num_classes is None or self.judge_class is None
        ):
            raise ValueError("judge=timm needs judge_checkpoint, judge_num_classes and judge_class")
        if self.judge == "callable" and not self.judge_callable:
            raise ValueError("judge=callable needs judge_callable ('module:function')")
        if (
            self.judge_class is not None
            and self.judge_num_classes is not None
            and self.judge_class >= self.judge_num_classes
        ):
            raise ValueError("judge_class must be < judge_num_classes")
        return self


# ----------------------------------------------------------------------------------------------------- judges


def is_minicanvas_target(target: Target, ctx: RunContext) -> bool:
    """A MiniCanvas style/object target on the MiniCanvas generator (or on an unknown backbone path)."""
    from generators.minicanvas.concepts import OBJECTS, STYLES
    from generators.minicanvas.paths import gan_checkpoint_path

    names = STYLES if target.kind == "style" else OBJECTS if target.kind == "object" else []
    if target.name not in names:
        return False
    if ctx.backbone_path is None:
        return True
    try:
        return Path(ctx.backbone_path).resolve() == gan_checkpoint_path().resolve()
    except OSError:
        return False


class ClassifierJudge:
    """A single-head classifier as a judge: ``shows`` = target logit is the argmax, or is >= 0 (multi-label)."""

    def __init__(
        self,
        model: nn.Module,
        target_class: int,
        rule: Literal["argmax", "logit_positive"] = "argmax",
        normalize: Literal["minus_one_one", "imagenet"] = "minus_one_one",
        image_size: int | None = None,
        batch_size: int = 64,
    ) -> None:
        self.model = model.eval()
        self.target_class = target_class
        self.rule = rule
        self.normalize = normalize
        self.image_size = image_size
        self.batch_size = batch_size

    @torch.no_grad()
    def shows(self, images: Tensor, concept: Any = None) -> Tensor:
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(images), self.batch_size):
            x = images[i : i + self.batch_size].float().to(device)
            if self.image_size is not None and x.shape[-1] != self.image_size:
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
            if self.normalize == "imagenet":
                mean = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
                std = x.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
                x = ((x + 1) / 2 - mean) / std
            logits = self.model(x)
            if self.rule == "argmax":
                out.append((logits.argmax(dim=1) == self.target_class).cpu())
            else:
                out.append((logits[:, self.target_class] >= 0).cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def load_callable(spec: str) -> Callable[..., Any]:
    """``module:attribute`` -> the attribute (a user's judge function)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"judge_callable {spec!r} must be 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"judge_callable {spec!r}: cannot import {module_name!r} ({err})") from None
    try:
        fn = getattr(module, attr)
    except AttributeError:
        raise UserError(f"judge_callable {spec!r}: {module_name!r} has no {attr!r}") from None
    if not callable(fn):
        raise UserError(f"judge_callable {spec!r} is not callable")
    return fn


def build_judge(params: AdaptThenUnlearnParams, target: Target, ctx: RunContext) -> Judge:
    """The judge that labels generated samples (see the module docstring)."""
    from evaluate.judges import FunctionJudge, MiniCanvasJudge, load_timm_classifier

    kind = params.judge
    if kind == "auto":
        if not is_minicanvas_target(target, ctx):
            raise UserError(
                f"adapt_then_unlearn needs a judge for {target.spec}: set judge to 'timm' (a local classifier "
                "checkpoint) or 'callable' (module:function)"
            )
        kind = "minicanvas"
    if kind == "minicanvas":
        if target.kind not in ("style", "object"):
            raise UserError(
                f"the MiniCanvas judge needs a style:<name> or object:<name> target, not {target.spec}"
            )
        from generators.minicanvas.paths import world_dir

        if not (world_dir() / "classifier" / "config.json").is_file():
            raise UserError(
                f"the MiniCanvas classifier is not built in {world_dir()}; run `erasure-studio world build`"
            )
        judge = MiniCanvasJudge.load(ctx.device)
        judge.index(target)  # fails early for a concept the judge does not know
        return judge
    if kind == "timm":
        model = load_timm_classifier(
            params.judge_checkpoint,
            params.judge_arch,
            int(params.judge_num_classes or 0),
            "judge",
            ctx.device,
        )
        return ClassifierJudge(  # type: ignore[return-value]
            model,
            int(params.judge_class or 0),
            params.judge_rule,
            params.judge_normalize,
            params.judge_image_size,
        )
    return FunctionJudge(load_callable(str(params.judge_callable)), name=str(params.judge_callable))


# ----------------------------------------------------------------------------------------------------- weights


@dataclass
class GanSources:
    """What training starts from besides the backbone generator (``g_ema``)."""

    g: dict[str, Tensor] | None = None
    """The checkpoint's training generator ``g`` (state dict), which stage 2 starts from (reference)."""
    d: dict[str, Tensor] | None = None
    g_optim: dict[str, Any] | None = None
    """Adam state in ``torch.optim`` state-dict form (``{"state": {index: {...}}}``)."""
    d_optim: dict[str, Any] | None = None
    origin: str = "none"


def _strip(state: dict[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def _from_prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _optim_from_prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Any] | None:
    """MiniGAN checkpoints store Adam state as ``{prefix}{param index}.{field}`` tensors."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, _, field = key[len(prefix) :].partition(".")
            state.setdefault(int(index), {})[field] = value
    return {"state": state} if state else None


def load_gan_sources(spec: str | None, backbone_path: Path | None, log: Callable[[str], None]) -> GanSources:
    """Find the discriminator, the training generator and the optimiser states (see ``discriminator``)."""
    from generators.stylegan2_io import read_rosinality_checkpoint

    def rosinality(path: Path, what: str) -> GanSources:
        data = read_rosinality_checkpoint(path)
        if "d" not in data:
            if what == "discriminator":
                raise UserError(
                    f"discriminator {path}: the checkpoint has no 'd' entry (keys: {sorted(data)})"
                )
            return GanSources(origin="none")
        g_state = data.get("g") if backbone_path is not None and path == Path(backbone_path) else None
        return GanSources(
            g=_strip(g_state) if isinstance(g_state, dict) else None,
            d=_strip(data["d"]),
            g_optim=data.get("g_optim") if isinstance(data.get("g_optim"), dict) else None,
            d_optim=data.get("d_optim") if isinstance(data.get("d_optim"), dict) else None,
            origin=str(path),
        )

    def minigan_folder(folder: Path) -> GanSources:
        sidecar = json.loads((folder / "checkpoint.json").read_text())
        tensors, _ = load_tensors(folder / sidecar["tensors"])
        return GanSources(
            g=_from_prefixed(tensors, "g."),
            d=_from_prefixed(tensors, "d."),
            g_optim=_optim_from_prefixed(tensors, "g_optim."),
            d_optim=_optim_from_prefixed(tensors, "d_optim."),
            origin=str(folder),
        )

    def safetensors_d(path: Path) -> GanSources:
        tensors, _ = load_tensors(path)
        if any(k.startswith("d.") for k in tensors) and any(k.startswith("g.") for k in tensors):
            return GanSources(
                d=_from_prefixed(tensors, "d."),
                g_optim=_optim_from_prefixed(tensors, "g_optim."),
                d_optim=_optim_from_prefixed(tensors, "d_optim."),
                origin=str(path),
            )
        return GanSources(d=_strip(tensors), origin=str(path))

    if spec is not None:
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "checkpoint.json").is_file():
                raise UserError(
                    f"discriminator {path}: a folder must be a MiniGAN training folder (checkpoint.json)"
                )
            return minigan_folder(path)
        if not path.is_file():
            raise UserError(f"discriminator {path}: no such file")
        if path.suffix.lower() == ".safetensors":
            return safetensors_d(path)
        return rosinality(path, "discriminator")
    if backbone_path is not None:
        path = Path(backbone_path)
        if path.is_file() and path.suffix.lower() in (".pt", ".pth"):
            sources = rosinality(path, "backbone")
            if sources.d is not None:
                return sources
        sibling = path.parent / "discriminator.safetensors"
        if path.is_file() and sibling.is_file():
            return safetensors_d(sibling)
    log("adapt_then_unlearn: no discriminator found; a fresh one is warmed up at the start of each stage")
    return GanSources()


def build_discriminator(sources: GanSources, g: Generator) -> tuple[Discriminator, bool]:
    """``(D, pretrained)``: the sources' discriminator, or a fresh one with the generator's widths."""
    from generators.stylegan2_io import infer_discriminator_config

    if sources.d is None:
        return Discriminator(g.size, channels=g.channels, blur_kernel=g.config.blur_kernel), False
    config = infer_discriminator_config(sources.d)
    if config.size != g.size:
        raise UserError(
            f"discriminator {sources.origin} is for {config.size} px; the generator makes {g.size} px"
        )
    d = Discriminator.from_config(config)
    try:
        d.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sources.d.items()})
    except RuntimeError as err:
        raise UserError(f"discriminator {sources.origin}: {str(err).splitlines()[0]}") from None
    return d, True


def restore_adam(optimizer: torch.optim.Optimizer, saved: dict[str, Any] | None) -> bool:
    """Load per-parameter Adam state (moments, step) from ``saved``; our learning rate and betas are kept."""
    if not saved or not saved.get("state"):
        return False
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for index, entry in saved["state"].items():
        index = int(index)
        if index >= len(params):
            return False
        for key in ("exp_avg", "exp_avg_sq"):
            if key in entry and tuple(entry[key].shape) != tuple(params[index].shape):
                return False
        state[index] = {
            k: (v.to(params[index].device, torch.float32) if torch.is_tensor(v) and k != "step" else v)
            for k, v in entry.items()
        }
        if "step" in state[index]:
            state[index]["step"] = torch.as_tensor(float(state[index]["step"]), dtype=torch.float32)
    current = optimizer.state_dict()
    current["state"] = state
    optimizer.load_state_dict(current)
    return True


# ----------------------------------------------------------------------------------------------------- samples


@contextmanager
def forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Run a stage under its own seeded global RNG, restoring the caller's afterwards (deterministic stages)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def mixing_latents(
    batch: int, style_dim: int, prob: float, generator: torch.Generator, device: torch.device
) -> list[Tensor]:
    """One z, or two for style mixing with probability ``prob`` (drawn on the CPU from ``generator``)."""
    if prob > 0 and float(torch.rand((), generator=generator)) < prob:
        return [z.to(device) for z in torch.randn(2, batch, style_dim, generator=generator).unbind(0)]
    return [torch.randn(batch, style_dim, generator=generator).to(device)]


def to_uint8(images: Tensor) -> Tensor:
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def from_uint8(images: Tensor, device: torch.device) -> Tensor:
    return images.to(device).float() / 127.5 - 1


@dataclass
class SampleSet:
    """Generated images kept as 8-bit CPU tensors (the stage's "real" data)."""

    images: Tensor
    candidates: int
    """How many samples were generated and judged to collect them."""

    def __len__(self) -> int:
        return len(self.images)

    def draw(self, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
        index = torch.randint(len(self.images), (n,), generator=generator)
        return from_uint8(self.images[index], device)


@torch.no_grad()
def collect_samples(
    g: Generator,
    judge: Judge,
    target: Target,
    *,
    want_target: bool,
    count: int | None,
    candidates: int,
    batch: int,
    mixing: float,
    generator: torch.Generator,
) -> SampleSet:
    """Judge ``g``'s samples: keep those that show (``want_target``) or do not show the target.

    ``count=None`` keeps every match among ``candidates`` samples; otherwise stops once ``count`` are found (or the
    candidates run out) and truncates to ``count``.
    """
    device = g.device
    kept: list[Tensor] = []
    found, done = 0, 0
    while done < candidates and (count is None or found < count):
        n = min(batch, candidates - done)
        images, _ = g(mixing_latents(n, g.style_dim, mixing, generator, device))
        shows = judge.shows(images.clamp(-1, 1), target).bool().cpu()
        keep = shows if want_target else ~shows
        kept.append(to_uint8(images[keep.to(images.device)]))
        found += int(keep.sum())
        done += n
    images = torch.cat(kept) if kept else torch.zeros(0, 3, g.size, g.size, dtype=torch.uint8)
    if count is not None:
        images = images[:count]
    return SampleSet(images, done)


# ----------------------------------------------------------------------------------------------------- EWC


def ewc_parameter_names(g: Generator) -> list[str]:
    """The parameters EWC protects: everything in ``generator.convs`` (reference ``model.py``)."""
    return [f"convs.{name}" for name, _ in g.convs.named_parameters()]


def estimate_fisher(
    g: Generator, d: Discriminator, names: list[str], samples: int, mixing: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """Diagonal Fisher: mean over ``samples`` style-mixed samples of the squared gradient of D's logit."""
    params = dict(g.named_parameters())
    chosen = [params[n] for n in names]
    flags = {n: p.requires_grad for n, p in params.items()}
    d_flags = [p.requires_grad for p in d.parameters()]
    for p in d.parameters():
        p.requires_grad_(False)
    for n, p in params.items():
        p.requires_grad_(n in set(names))
    try:
        fake, _ = g(mixing_latents(samples, g.style_dim, mixing, generator, g.device))
        logits = d(fake).flatten()
        fisher = [torch.zeros_like(p) for p in chosen]
        for i in range(len(logits)):
            grads = torch.autograd.grad(
                logits[i], chosen, retain_graph=i < len(logits) - 1, allow_unused=True
            )
            for acc, grad in zip(fisher, grads):
                if grad is not None:
                    acc.add_(grad.detach().pow(2))
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        for p, flag in zip(d.parameters(), d_flags):
            p.requires_grad_(flag)
    return {n: f / len(logits) for n, f in zip(names, fisher)}


def ewc_penalty(
    params: dict[str, Tensor], anchor: dict[str, Tensor], fisher: dict[str, Tensor], lam: float
) -> Tensor:
    """``(lam / 2) * sum_i F_i (theta_i - theta*_i)^2`` over the named parameters."""
    total = sum((fisher[n] * (params[n] - anchor[n]).pow(2)).sum() for n in fisher)
    return (lam / 2) * total  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------- repulsion


def repulsion_statistic(
    params: dict[str, Tensor],
    adapted: list[dict[str, Tensor]],
    distance: RepulsionDistance = "tensor_mean",
    k_scaling: KScaling = "mean",
) -> Tensor:
    """R: half the squared distance of ``params`` to the adapted models, averaged over them (see the fields)."""
    if not adapted:
        raise ValueError("repulsion needs at least one adapted model")
    per_model = []
    for theta_n in adapted:
        # Sorted names: the same summation order however the adapted weights were loaded (bit-identical resume).
        diffs = [(params[name] - theta_n[name]).pow(2) for name in sorted(theta_n)]
        if distance == "tensor_mean":
            per_model.append(torch.stack([d.mean() for d in diffs]).mean())
        else:
            per_model.append(torch.stack([d.sum() for d in diffs]).sum())
    total = torch.stack(per_model)
    k = len(adapted)
    return total.sum() * k / 2 if k_scaling == "reference_code" else total.mean() / 2


def repulsion_loss(r: Tensor, form: RepulsionForm, gamma: float, el2_weight: float = 100.0) -> Tensor:
    """The repulsion term added to the generator loss: EL2, NL2 or IL2 (all decrease as R grows)."""
    if form == "el2":
        return el2_weight * torch.exp(-gamma * r)
    if form == "nl2":
        return -gamma * r
    if form == "il2":
        return gamma / r.clamp_min(1e-12)
    raise ValueError(f"unknown repulsion form {form!r}")


# Fields that only stage 2 reads: changing them keeps the adapted models (and `adapted_models` only says how many).
STAGE2_FIELDS = frozenset({
    "iterations", "positive_candidates", "repulsion", "gamma", "gamma_units", "el2_weight", "repulsion_distance",
    "repulsion_k_scaling", "adapted_models", "adapted_cache",
})  # fmt: skip


def adapted_fingerprint(
    frozen: Generator, target: Target, params: AdaptThenUnlearnParams, ctx: RunContext, k: int
) -> str:
    """What adapted model ``k`` depends on: the generator's weights, target, seed and every non-stage-2 field."""
    weights = hashlib.sha256()
    for name, tensor in sorted(frozen.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return json.dumps(
        {
            "stage": f"adapt{k}",
            "generator": weights.hexdigest(),
            "target": target.spec,
            "seed": ctx.seed,
            "params": params.model_dump(mode="json", exclude=set(STAGE2_FIELDS)),
        },
        sort_keys=True,
    )


def effective_gamma(form: RepulsionForm, gamma: float, units: str, r0: float) -> float:
    """The gamma :func:`repulsion_loss` is called with.

    ``absolute``: ``gamma`` itself. ``start_distance``: each form evaluated at ``R / R0`` instead of ``R`` (``R0`` the
    statistic at the start of stage 2): ``exp(-gamma R/R0)`` and ``-gamma R/R0`` give ``gamma / R0``; ``gamma / (R/R0)``
    gives ``gamma * R0`` -- so IL2's term starts at ``gamma`` whatever the generator's scale.
    """
    if units == "absolute":
        return gamma
    if units != "start_distance":
        raise ValueError(f"unknown gamma units {units!r}")
    r0 = max(r0, 1e-30)
    return gamma * r0 if form == "il2" else gamma / r0


# ----------------------------------------------------------------------------------------------------- training


class _RunningMean(nn.Module):
    """The path-length running mean, as a module so that training checkpoints carry it."""

    def __init__(self, value: float, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("mean_path_length", torch.tensor(float(value), device=device))


def _requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class GanTrainer:
    """rosinality's ``train.py`` iteration (D logistic + lazy R1, G non-saturating + extra + lazy path length, EMA)."""

    def __init__(
        self,
        g: Generator,
        d: Discriminator,
        g_ema: Generator,
        params: AdaptThenUnlearnParams,
        path_mean: float,
    ) -> None:
        self.g, self.d, self.g_ema, self.p = g, d, g_ema, params
        g_ratio = params.g_reg_every / (params.g_reg_every + 1)
        d_ratio = params.d_reg_every / (params.d_reg_every + 1)
        self.g_optim = torch.optim.Adam(g.parameters(), lr=params.lr * g_ratio, betas=(0.0, 0.99**g_ratio))
        self.d_optim = torch.optim.Adam(d.parameters(), lr=params.lr * d_ratio, betas=(0.0, 0.99**d_ratio))
        self.stats = _RunningMean(path_mean, g.device)
        h = params.ema_half_life_steps
        self.ema_decay = 0.5 ** (1.0 / h) if h > 0 else 0.0

    def modules(self) -> dict[str, nn.Module]:
        return {"g": self.g, "d": self.d, "g_ema": self.g_ema, "stats": self.stats}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"g_optim": self.g_optim, "d_optim": self.d_optim}

    def d_step(self, i: int, real: Tensor, generator: torch.Generator) -> dict[str, float]:
        g, d, p = self.g, self.d, self.p
        _requires_grad(g, False)
        _requires_grad(d, True)
        fake, _ = g(mixing_latents(len(real), g.style_dim, p.mixing, generator, g.device))
        d_loss = d_logistic_loss(d(real), d(fake))
        d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.d_optim.step()
        logs = {"d": float(d_loss.detach())}
        if p.r1 > 0 and i % p.d_reg_every == 0:
            real = real.detach().requires_grad_(True)
            real_pred = d(real)
            r1 = d_r1_loss(real_pred, real)
            d.zero_grad(set_to_none=True)
            (p.r1 / 2 * r1 * p.d_reg_every + 0 * real_pred[0]).sum().backward()
            self.d_optim.step()
            logs["r1"] = float(r1.detach())
        return logs

    def g_step(
        self, i: int, generator: torch.Generator, extra: Callable[[], tuple[Tensor, dict[str, float]]]
    ) -> dict[str, float]:
        g, d, p = self.g, self.d, self.p
        _requires_grad(g, True)
        _requires_grad(d, False)
        fake, _ = g(mixing_latents(p.batch_size, g.style_dim, p.mixing, generator, g.device))
        adv = g_nonsaturating_loss(d(fake))
        extra_loss, logs = extra()
        loss = adv + extra_loss
        g.zero_grad(set_to_none=True)
        loss.backward()
        self.g_optim.step()
        logs = {"g": float(adv.detach()), **logs}
        if p.path_regularize > 0 and i % p.g_reg_every == 0:
            path_batch = max(1, p.batch_size // p.path_batch_shrink)
            fake, latents = g(
                mixing_latents(path_batch, g.style_dim, p.mixing, generator, g.device), return_latents=True
            )
            path_loss, new_mean, _ = g_path_regularize(fake, latents, self.stats.mean_path_length)
            self.stats.mean_path_length.copy_(new_mean)
            g.zero_grad(set_to_none=True)
            (p.path_regularize * p.g_reg_every * path_loss + 0 * fake[0, 0, 0, 0]).backward()
            self.g_optim.step()
            logs["path"] = float(path_loss.detach())
        accumulate(self.g_ema, g, self.ema_decay)
        return logs

    def warm_up_d(self, steps: int, data: SampleSet, generator: torch.Generator) -> None:
        for i in range(steps):
            self.d_step(i, data.draw(self.p.batch_size, generator, self.g.device), generator)


def measured_path_mean(g: Generator, params: AdaptThenUnlearnParams, generator: torch.Generator) -> float:
    """Mean path length of ``g`` on one path-regularisation batch (the running mean's start, ``measured``)."""
    if params.path_mean_init == "zero" or params.path_regularize == 0:
        return 0.0
    path_batch = max(1, params.batch_size // params.path_batch_shrink)
    fake, latents = g(
        mixing_latents(path_batch, g.style_dim, params.mixing, generator, g.device), return_latents=True
    )
    _, _, lengths = g_path_regularize(fake, latents, torch.zeros((), device=g.device))
    return float(lengths.detach().mean())


# ----------------------------------------------------------------------------------------------------- method


def _params_of(module: nn.Module) -> dict[str, Tensor]:
    return dict(module.named_parameters())


def _float_copy(g: Generator) -> Generator:
    """A trainable fp32 copy (the backbone may be loaded in half precision, or frozen)."""
    return copy.deepcopy(g).float().train().requires_grad_(True)


@register_method
class AdaptThenUnlearn(ErasureMethod):
    """Adapt-then-Unlearn (Tiwary et al., TMLR 2025): adapt to negatives with EWC, then repel from the adaptations."""

    name = "adapt_then_unlearn"
    backbone_kind = "gan"
    description = (
        "Adapt-then-Unlearn (Tiwary et al. 2025): adapt StyleGAN2 copies to judged negatives (EWC), then train on "
        "positives repelled from the adapted weights (EL2/NL2/IL2)."
    )
    Params = AdaptThenUnlearnParams

    def __init__(self, judge: Judge | None = None) -> None:
        self._judge = judge
        """A ready judge (tests, notebooks); else one is built from the params."""

    def erase(
        self, backbone, target: Target, params: AdaptThenUnlearnParams, ctx: RunContext
    ) -> ErasureResult:
        original: Generator = backbone
        dtype = next(original.parameters()).dtype
        device = ctx.device
        frozen = _float_copy(original).to(device).eval().requires_grad_(False)
        judge = self._judge or build_judge(params, target, ctx)
        sources = load_gan_sources(params.discriminator, ctx.backbone_path, ctx.log)
        ctx.log(
            f"adapt_then_unlearn: {params.adapted_models} adapted model(s) x {params.adapt_iterations} steps, then "
            f"{params.iterations} steps of {params.repulsion} (gamma {params.gamma}); weights from {sources.origin}"
        )
        fingerprint = job_fingerprint(self.name, params, target, ctx)
        total = params.adapted_models * params.adapt_iterations + params.iterations
        metrics: dict[str, float] = {}

        adapted: list[dict[str, Tensor]] = []
        for k in range(params.adapted_models):
            theta, info = self._adapted_model(k, frozen, judge, target, sources, params, ctx, total)
            adapted.append({n: t.to(device) for n, t in theta.items()})
            metrics.update({f"adapt{k}_{key}": value for key, value in info.items()})

        g_ema, info = self._unlearn(frozen, adapted, judge, target, sources, params, ctx, fingerprint, total)
        metrics.update(info)
        changed = {
            n: p.detach().to("cpu", dtype, copy=True).contiguous() for n, p in g_ema.named_parameters()
        }
        return ErasureResult(changed={GENERATOR: changed}, metrics=metrics)

    # ------------------------------------------------------------------------------------------- stage 1

    def _adapted_model(
        self,
        k: int,
        frozen: Generator,
        judge: Judge,
        target: Target,
        sources: GanSources,
        params: AdaptThenUnlearnParams,
        ctx: RunContext,
        total: int,
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Adapted model ``k``'s EMA parameters: from its finished file, or trained (resumably) now."""
        done_path = ctx.checkpoint_dir / f"adapted_{k}.safetensors"
        stage_fp = adapted_fingerprint(frozen, target, params, ctx, k)
        cache_path = None
        if params.adapted_cache is not None:
            digest = hashlib.sha256(stage_fp.encode()).hexdigest()[:24]
            cache_path = Path(params.adapted_cache).expanduser() / f"adapted-{digest}.safetensors"
        for path in (done_path, cache_path):
            if path is not None and path.is_file():
                tensors, meta = load_tensors(path)
                if meta.get("fingerprint") == stage_fp:
                    ctx.log(f"adapt_then_unlearn: adapted model {k} loaded from {path}")
                    if path != done_path:
                        save_tensors(done_path, tensors, metadata=meta)
                    return tensors, json.loads(meta.get("info", "{}"))
        device = ctx.device
        offset = k * params.adapt_iterations
        with forked_rng(device, ctx.seed * 7919 + 101 + k):
            data_gen = torch.Generator().manual_seed(ctx.seed * 7919 + 1_000 + k)
            negatives = collect_samples(
                frozen, judge, target, want_target=True, count=params.negatives, candidates=params.max_candidates,
                batch=params.sample_batch, mixing=params.mixing, generator=data_gen,
            )  # fmt: skip
            if len(negatives) < max(1, min(params.batch_size, params.negatives)):
                raise UserError(
                    f"adapt_then_unlearn: the judge flagged only {len(negatives)} of {negatives.candidates} "
                    f"generated samples as {target.spec}; stage 1 needs at least a batch of negatives"
                )
            ctx.log(
                f"adapt_then_unlearn: model {k}: {len(negatives)} negatives among {negatives.candidates} samples"
            )
            g = _float_copy(frozen).to(device)
            d, pretrained_d = build_discriminator(sources, g)
            d = d.to(device)
            g_ema = _float_copy(frozen).to(device).eval().requires_grad_(False)
            loop_gen = torch.Generator().manual_seed(ctx.seed * 7919 + 2_000 + k)
            names = ewc_parameter_names(g)
            fisher = estimate_fisher(g, d, names, params.fisher_samples, params.mixing, loop_gen)
            anchor = {n: p.detach().clone() for n, p in _params_of(g).items() if n in set(names)}
            trainer = GanTrainer(g, d, g_ema, params, measured_path_mean(g, params, loop_gen))
            if params.restore_optimizers:
                restored = restore_adam(trainer.g_optim, sources.g_optim) & restore_adam(
                    trainer.d_optim, sources.d_optim
                )
                if restored and k == 0:
                    ctx.log("adapt_then_unlearn: Adam states restored from the checkpoint")
            checkpoints = TrainingCheckpoints(
                dataclasses.replace(ctx, checkpoint_dir=ctx.checkpoint_dir / f"adapt_{k}"),
                stage_fp,
                modules=trainer.modules(),
                optimizers=trainer.optimizers(),
                generators={"data": data_gen, "loop": loop_gen},
            )
            start = checkpoints.resume()
            if start == 0 and not pretrained_d:
                trainer.warm_up_d(params.d_warmup, negatives, loop_gen)
            g_params = _params_of(g)

            def ewc() -> tuple[Tensor, dict[str, float]]:
                penalty = ewc_penalty(g_params, anchor, fisher, params.ewc_lambda)
                return penalty, {"ewc": float(penalty.detach())}

            logs: dict[str, float] = {}
            for step in range(start + 1, params.adapt_iterations + 1):
                i = step - 1
                logs = trainer.d_step(i, negatives.draw(params.batch_size, data_gen, device), loop_gen)
                logs.update(trainer.g_step(i, loop_gen, ewc))
                checkpoints.step_done(step, params.adapt_iterations)
                ctx.progress(offset + step, total, stage=1, **logs)
        info = {"negatives": float(len(negatives)), "candidates": float(negatives.candidates)}
        info.update({f"final_{key}": value for key, value in logs.items()})
        theta = {n: p.detach().cpu().clone() for n, p in g_ema.named_parameters()}
        meta = {"fingerprint": stage_fp, "info": json.dumps(info)}
        save_tensors(done_path, theta, metadata=meta)
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(cache_path, theta, metadata=meta)
        return theta, info

    # ------------------------------------------------------------------------------------------- stage 2

    def _unlearn(
        self,
        frozen: Generator,
        adapted: list[dict[str, Tensor]],
        judge: Judge,
        target: Target,
        sources: GanSources,
        params: AdaptThenUnlearnParams,
        ctx: RunContext,
        fingerprint: str,
        total: int,
    ) -> tuple[Generator, dict[str, float]]:
        device = ctx.device
        offset = params.adapted_models * params.adapt_iterations
        with forked_rng(device, ctx.seed * 7919 + 99):
            data_gen = torch.Generator().manual_seed(ctx.seed * 7919 + 3_000)
            positives = collect_samples(
                frozen, judge, target, want_target=False, count=None, candidates=params.positive_candidates,
                batch=params.sample_batch, mixing=params.mixing, generator=data_gen,
            )  # fmt: skip
            if len(positives) < params.batch_size:
                raise UserError(
                    f"adapt_then_unlearn: only {len(positives)} of {positives.candidates} generated samples are "
                    f"judged free of {target.spec}; stage 2 needs at least a batch of positives"
                )
            ctx.log(f"adapt_then_unlearn: {len(positives)} positives among {positives.candidates} samples")
            g = _float_copy(frozen).to(device)
            if sources.g is not None:
                g.load_state_dict(
                    {k: v.float() if v.is_floating_point() else v for k, v in sources.g.items()}
                )
            d, pretrained_d = build_discriminator(sources, g)
            d = d.to(device)
            g_ema = _float_copy(frozen).to(device).eval().requires_grad_(False)
            loop_gen = torch.Generator().manual_seed(ctx.seed * 7919 + 4_000)
            trainer = GanTrainer(g, d, g_ema, params, measured_path_mean(g, params, loop_gen))
            if params.restore_optimizers:
                restore_adam(trainer.g_optim, sources.g_optim)
                restore_adam(trainer.d_optim, sources.d_optim)
            checkpoints = TrainingCheckpoints(
                dataclasses.replace(ctx, checkpoint_dir=ctx.checkpoint_dir / "unlearn"),
                f"{fingerprint}|unlearn",
                modules=trainer.modules(),
                optimizers=trainer.optimizers(),
                generators={"data": data_gen, "loop": loop_gen},
            )
            g_params = _params_of(g)
            with torch.no_grad():  # before resuming: the distance of the stage's starting weights
                r0 = float(
                    repulsion_statistic(
                        g_params, adapted, params.repulsion_distance, params.repulsion_k_scaling
                    )
                )
            gamma = effective_gamma(params.repulsion, params.gamma, params.gamma_units, r0)
            start = checkpoints.resume()
            if start == 0 and not pretrained_d:
                trainer.warm_up_d(params.d_warmup, positives, loop_gen)

            def repel() -> tuple[Tensor, dict[str, float]]:
                r = repulsion_statistic(
                    g_params, adapted, params.repulsion_distance, params.repulsion_k_scaling
                )
                term = repulsion_loss(r, params.repulsion, gamma, params.el2_weight)
                return term, {"R": float(r.detach()), "repel": float(term.detach())}

            logs: dict[str, float] = {}
            for step in range(start + 1, params.iterations + 1):
                i = step - 1
                logs = trainer.d_step(i, positives.draw(params.batch_size, data_gen, device), loop_gen)
                logs.update(trainer.g_step(i, loop_gen, repel))
                checkpoints.step_done(step, params.iterations)
                ctx.progress(offset + step, total, stage=2, **logs)
        with torch.no_grad():
            r_ema = float(
                repulsion_statistic(
                    _params_of(g_ema), adapted, params.repulsion_distance, params.repulsion_k_scaling
                )
            )
        metrics = {
            "positives": float(len(positives)),
            "positive_candidates": float(positives.candidates),
            "target_frac_candidates": 1.0 - len(positives) / max(1, positives.candidates),
            "repulsion_R_start": r0,
            "repulsion_gamma": gamma,
            "repulsion_R_final": r_ema,
        }
        metrics.update({f"final_{key}": value for key, value in logs.items()})
        return g_ema, metrics


__all__ = [
    "AdaptThenUnlearn",
    "AdaptThenUnlearnParams",
    "ClassifierJudge",
    "GanSources",
    "GanTrainer",
    "build_judge",
    "collect_samples",
    "effective_gamma",
    "estimate_fisher",
    "ewc_penalty",
    "is_minicanvas_target",
    "load_gan_sources",
    "repulsion_loss",
    "repulsion_statistic",
]
