"""Text-to-Unlearn (Nagasubramaniam, Karamchandani, Wu, Zhu; "Prompting Forgetting: Unlearning in GANs via Textual
Guidance", arXiv 2504.01218; ICLR 2026 submission "Text-to-Unlearn"). No public code: this follows the paper's
description (frozen and trainable twin generators, CLIP guidance, perceptual/identity preservation, no image
dataset) with StyleGAN-NADA's directional CLIP loss (Gal et al., SIGGRAPH 2022; ``rinongal/StyleGAN-nada``,
``ZSSGAN/criteria/clip_loss.py``) as the guidance.

The target is given only as text. A trainable copy ``G_t`` of the generator is fine-tuned against a frozen copy
``G_f`` (same latent and same noise for both):

* **Directional loss** (NADA): ``L_dir = mean(1 - cos(normalise(E_I(G_t(z)) - E_I(G_f(z))), dt))`` on *forget*
  latents, with L2-normalised CLIP image embeddings ``E_I``. ``direction: text`` (NADA): ``dt`` =
  normalise(mean text embedding of the neutral concept(s) - mean text embedding of the target), each the mean of
  L2-normalised embeddings of the prompt templates filled with the concept: the text direction *from the target
  towards the neutral/anchor concept*. ``direction: image`` (the paper's image-space reference direction, without
  its per-prompt StyleCLIP mapper): ``dt`` = -normalise(mean E_I(G_f(forget)) - mean E_I(G_f(retain))), i.e.
  away from "adding the concept" as the generator itself renders it.
* **Preservation** on *retain* latents: pixel MSE between ``G_t`` and ``G_f`` outputs, and the CLIP image-feature
  distance ``1 - cos(E_I(G_t), E_I(G_f))`` (LPIPS-free: no LPIPS network can be downloaded; on MiniCanvas CLIP's
  image tower is the perceptual feature extractor). ``lambda_forget_l2`` optionally keeps forget images close in
  pixels too (the paper's LPIPS term is applied to all edited images; a reviewer reports it lowers efficacy).

Choices that are ours (the paper's details were not accessible):

* forget/retain latents: a fixed pool of ``pool_size`` latents is rendered once by ``G_f`` and sorted by CLIP
  zero-shot classification with the same prompt templates: forget = the target is the most likely concept with
  probability >= ``forget_threshold``; retain = target probability <= ``retain_threshold``; the rest is unused.
  The zero-shot classes are the target and the neutral concepts (on MiniCanvas: every concept of the target's
  kind). This is what makes the text alone decide *which* samples change, and keeps the others in place;
* neutral concepts: the job's anchor; else ``neutral``; else, on MiniCanvas, the other concepts of the target's
  kind (e.g. every other object); else ``photo`` (NADA's usual source class);
* prompt templates: on MiniCanvas the world's caption templates (UnlearnCanvas' template and the training
  paraphrases, over every partner concept); elsewhere a short list of CLIP's ImageNet templates;
* the preservation weights and the ``image`` direction option.

From NADA: Adam with lr ``0.002 x 4/5`` and betas ``(0, 0.99^(4/5))``; trained layers ``synthesis`` (the learned
constant, ``conv1`` and every synthesis conv including their modulations; mapping network and ToRGBs frozen);
both generators see the same w. CLIP input: ``G``'s ``[-1, 1]`` output mapped to ``[0, 1]``, resized to CLIP's
crop size and normalised with its processor's mean/std (NADA skips the PIL steps the same way). Guidance CLIP:
MiniCLIP on MiniCanvas, or a local transformers CLIP folder (``clip``), never a download.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from erasure.base import ErasureMethod, ErasureResult, MethodParams, RunContext
from erasure.errors import UserError
from erasure.forget_data import CONCEPT, concept_prompts, fill
from erasure.methods.adapt_then_unlearn import forked_rng, is_minicanvas_target
from erasure.param_sets import ParameterSubset, changed_tensors
from erasure.registry import register_method
from erasure.resume import TrainingCheckpoints, job_fingerprint
from generators.stylegan2 import Generator

if TYPE_CHECKING:
    from erasure.config import Target

GENERATOR = "generator"
TrainLayers = Literal["synthesis", "all", "mapping"]

# A few of CLIP's ImageNet prompt templates (NADA fills all 79 of them); ``{concept}`` is forget_data.CONCEPT.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a photo of a {concept}.",
    "a rendering of a {concept}.",
    "a cropped photo of the {concept}.",
    "the photo of a {concept}.",
    "a photo of a clean {concept}.",
    "a photo of a dirty {concept}.",
    "a bright photo of a {concept}.",
    "a photo of the {concept}.",
    "a good photo of the {concept}.",
    "a close-up photo of a {concept}.",
    "a low resolution photo of the {concept}.",
    "a painting of the {concept}.",
    "a pixelated photo of the {concept}.",
    "a sculpture of the {concept}.",
    "a blurry photo of the {concept}.",
    "a drawing of a {concept}.",
)
DEFAULT_NEUTRAL = "photo"


class TextToUnlearnParams(MethodParams):
    """Text-to-Unlearn budgets and choices. "NADA" = StyleGAN-NADA's defaults; "ours" = no reference value."""

    iterations: int = Field(300, ge=1, description="Training steps. NADA: about 300.")
    batch_size: int = Field(
        8, ge=1, description="Forget latents per step (directional loss). NADA: 16 (2 at 1024 px)."
    )
    retain_batch: int = Field(8, ge=0, description="Retain latents per step (preservation losses). Ours.")
    lr: float = Field(
        0.002,
        gt=0,
        description="Adam learning rate before NADA's x 4/5 scaling (betas (0, 0.99^(4/5))). NADA: 0.002.",
    )
    train_layers: TrainLayers = Field(
        "synthesis",
        description="'synthesis': constant, conv1 and all synthesis convs (NADA's default; mapping and ToRGBs "
        "frozen); 'mapping': only the mapping network (a reviewer's reading of the paper); 'all'.",
    )
    direction: Literal["text", "image"] = Field(
        "text",
        description="'text': NADA's text direction from the target towards the neutral concept(s); 'image': away "
        "from the CLIP-image direction of the target among G's own samples (ours, after the paper's reference "
        "direction).",
    )
    clip: str | None = Field(
        None, description="Local transformers CLIP folder. None: MiniCLIP (MiniCanvas targets only)."
    )
    prompts: Literal["auto", "minicanvas", "target"] = Field(
        "auto",
        description="Prompt templates: 'minicanvas' (the world's captions over every partner concept), 'target' "
        "(CLIP ImageNet templates); 'auto' = minicanvas for a MiniCanvas target on MiniCanvas.",
    )
    neutral: list[str] | None = Field(
        None,
        description="Neutral concept names the target is moved towards (also zero-shot classes). None: the job's "
        "anchor, else the other MiniCanvas concepts of the target's kind, else 'photo' (NADA's usual source class).",
    )
    pool_size: int = Field(
        2048, ge=2, description="Latents rendered once and sorted into forget/retain. Ours."
    )
    forget_threshold: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Forget latent: the target is CLIP's top concept with at least this probability.",
    )
    retain_threshold: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Retain latent: CLIP's target probability is at most this (and it is no forget latent). Ours.",
    )
    lambda_direction: float = Field(1.0, ge=0, description="Weight of the directional loss. NADA: 1.")
    edit_norm_floor: float = Field(
        0.05,
        ge=0,
        description="Ours: the CLIP edit e_t - e_f is divided by max(its norm, this floor). The twins share latent "
        "and noise, so the edit is exactly 0 at the start, where plain normalisation (0; NADA, whose twins draw "
        "separate noise) has a gradient of about 1/eps: Adam's second moment then keeps every later step about "
        "1e-10 of its size, and the generator stays one step away from the original.",
    )
    lambda_retain_l2: float = Field(1.0, ge=0, description="Pixel MSE on retain latents. Ours.")
    lambda_retain_clip: float = Field(
        1.0, ge=0, description="CLIP image-feature distance on retain latents. Ours."
    )
    lambda_forget_l2: float = Field(
        0.0,
        ge=0,
        description="Pixel MSE on forget latents (the paper's LPIPS on edited images; lowers efficacy).",
    )
    sample_batch: int = Field(64, ge=1, description="Batch for rendering and classifying the pool.")


# ----------------------------------------------------------------------------------------------------- CLIP


def _hw(size: Any) -> tuple[int | None, int | None]:
    if size is None:
        return None, None
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    height, width = get("height"), get("width")
    if height is None and get("shortest_edge") is not None:
        height = width = get("shortest_edge")
    return height, width


class ClipGuide(nn.Module):
    """A frozen CLIP: differentiable L2-normalised image embeddings of ``[-1, 1]`` images, and text embeddings."""

    def __init__(self, model: nn.Module, processor: Any) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        image_processor = processor.image_processor
        height, width = _hw(getattr(image_processor, "crop_size", None))
        if height is None:
            height, width = _hw(getattr(image_processor, "size", None))
        if height is None:
            height = width = int(model.config.vision_config.image_size)
        self.input_size = (int(height), int(width or height))
        do_normalize = getattr(image_processor, "do_normalize", True)
        mean = image_processor.image_mean if do_normalize else (0.0, 0.0, 0.0)
        std = image_processor.image_std if do_normalize else (1.0, 1.0, 1.0)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))
        self.tokenizer = processor.tokenizer
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @property
    def logit_scale(self) -> float:
        scale = getattr(self.model, "logit_scale", None)
        return float(scale.exp()) if scale is not None else 100.0

    def encode_images(self, images: Tensor) -> Tensor:
        from generators.minicanvas.models import projected

        x = (images.float() + 1) / 2
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return F.normalize(projected(self.model.get_image_features(pixel_values=x)), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> Tensor:
        from generators.minicanvas.models import projected

        tokens = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).to(self.mean.device)
        features = projected(
            self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
        )
        return F.normalize(features, dim=-1)

    def concept_embedding(self, templates: list[str], concept: str) -> Tensor:
        """NADA's class embedding: the normalised mean of the normalised embeddings of the filled templates."""
        return F.normalize(self.encode_texts([fill(t, concept) for t in templates]).mean(0), dim=-1)


def load_clip_guide(params: TextToUnlearnParams, minicanvas: bool, device: torch.device) -> ClipGuide:
    if params.clip is not None:
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(params.clip).expanduser()
        if not (folder / "config.json").is_file():
            raise UserError(f"clip {folder}: not a transformers CLIP folder (no config.json)")
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
        processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        return ClipGuide(model, processor).to(device)
    if not minicanvas:
        raise UserError(
            "text_to_unlearn needs a CLIP for this target: set clip to a local transformers CLIP folder"
        )
    from generators.minicanvas.paths import world_dir
    from generators.minicanvas.world import load_clip

    if not (world_dir() / "clip" / "config.json").is_file():
        raise UserError(f"MiniCLIP is not built in {world_dir()}; run `erasure-studio world build`")
    model, processor = load_clip(str(device))
    return ClipGuide(model, processor).to(device)


def directional_loss(
    e_trained: Tensor, e_frozen: Tensor, direction: Tensor, norm_floor: float = 0.0
) -> Tensor:
    """NADA's directional CLIP loss: ``mean(1 - cos(normalise(e_t - e_f), direction))`` (embeddings normalised).

    ``norm_floor`` > 0 divides an edit shorter than it by the floor instead of its own norm (see
    ``TextToUnlearnParams.edit_norm_floor``); 0 is NADA's plain normalisation.
    """
    edit = e_trained - e_frozen
    edit = edit / edit.norm(dim=-1, keepdim=True).clamp_min(max(norm_floor, 1e-12))
    return (1 - edit @ F.normalize(direction, dim=-1)).mean()


# ----------------------------------------------------------------------------------------------------- helpers


def trainable_names(g: Generator, which: TrainLayers) -> list[str]:
    names = []
    for name, _ in g.named_parameters():
        mapping = name.startswith("style.")
        synthesis = name.startswith(("input.", "conv1.", "convs."))
        if (which == "all") or (which == "mapping" and mapping) or (which == "synthesis" and synthesis):
            names.append(name)
    return names


def layer_noise(g: Generator, batch: int, generator: torch.Generator) -> list[Tensor]:
    """Per-sample noise maps for every layer (shared by the twin generators), drawn on the CPU."""
    return [
        torch.randn(batch, 1, *buf.shape[-2:], generator=generator).to(g.device) for buf in g.noise_buffers()
    ]


def _concepts(
    params: TextToUnlearnParams, target: Target, ctx: RunContext, minicanvas_prompts: bool
) -> tuple[list[str], str, list[str], list[str]]:
    """``(templates, target name, neutral concepts, zero-shot classes other than the target)``."""
    if minicanvas_prompts:
        try:
            prompts = concept_prompts(target, None, "minicanvas")
        except ValueError as err:
            raise UserError(f"text_to_unlearn: prompts=minicanvas: {err}") from None
        templates, name, others = prompts.templates, prompts.target, list(prompts.others)
    else:
        templates, name, others = list(IMAGENET_TEMPLATES), target.name, []
        if target.kind == "style":
            templates = [t.replace(CONCEPT, CONCEPT + " style") for t in templates]
    if ctx.anchor is not None:
        neutral = [ctx.anchor.name]
    elif params.neutral:
        neutral = list(params.neutral)
    elif others:
        neutral = others
    else:
        neutral = [DEFAULT_NEUTRAL]
    classes = list(dict.fromkeys([*others, *neutral]))
    if name in neutral or name in classes:
        raise UserError(f"text_to_unlearn: the neutral concepts must not include the target {name!r}")
    return templates, name, neutral, classes


@register_method
class TextToUnlearn(ErasureMethod):
    """Text-to-Unlearn (Nagasubramaniam et al. 2025) with StyleGAN-NADA's directional CLIP loss."""

    name = "text_to_unlearn"
    backbone_kind = "gan"
    description = (
        "Text-to-Unlearn (Nagasubramaniam et al. 2025): fine-tune a StyleGAN2 copy against a frozen twin with "
        "NADA's directional CLIP loss away from the target text, preserving non-target samples."
    )
    Params = TextToUnlearnParams

    def erase(self, backbone, target: Target, params: TextToUnlearnParams, ctx: RunContext) -> ErasureResult:
        original: Generator = backbone
        dtype = next(original.parameters()).dtype
        device = ctx.device
        minicanvas = is_minicanvas_target(target, ctx)
        use_minicanvas_prompts = params.prompts == "minicanvas" or (params.prompts == "auto" and minicanvas)
        clip = load_clip_guide(params, minicanvas or use_minicanvas_prompts, device)
        templates, name, neutral, classes = _concepts(params, target, ctx, use_minicanvas_prompts)
        ctx.log(
            f"text_to_unlearn: '{name}' -> {neutral[:4]}{'...' if len(neutral) > 4 else ''}, "
            f"{len(templates)} template(s), direction {params.direction}, training {params.train_layers}"
        )

        frozen = copy.deepcopy(original).float().to(device).eval().requires_grad_(False)
        trained = copy.deepcopy(original).float().to(device).train().requires_grad_(False)
        names = trainable_names(trained, params.train_layers)
        all_params = dict(trained.named_parameters())
        trainable = {n: all_params[n] for n in names}
        for p in trainable.values():
            p.requires_grad_(True)

        with forked_rng(device, ctx.seed * 7919 + 5):
            setup = torch.Generator().manual_seed(ctx.seed * 7919 + 6)
            target_emb = clip.concept_embedding(templates, name)
            class_emb = torch.stack([target_emb] + [clip.concept_embedding(templates, c) for c in classes])
            forget_z, retain_z, forget_emb, retain_emb = self._pool(frozen, clip, class_emb, params, setup)
            if len(forget_z) == 0:
                raise UserError(
                    f"text_to_unlearn: CLIP found no sample of {name!r} among {params.pool_size} generated ones "
                    f"(forget_threshold {params.forget_threshold}); lower it or grow pool_size"
                )
            if params.retain_batch > 0 and len(retain_z) == 0:
                raise UserError(f"text_to_unlearn: every generated sample looks like {name!r} to CLIP")
            ctx.log(
                f"text_to_unlearn: {len(forget_z)} forget and {len(retain_z)} retain latents of {params.pool_size}"
            )
            if params.direction == "text":
                neutral_emb = F.normalize(
                    torch.stack([clip.concept_embedding(templates, c) for c in neutral]).mean(0), dim=-1
                )
                direction = F.normalize(neutral_emb - target_emb, dim=-1)
            else:
                reference = forget_emb.mean(0) - (retain_emb.mean(0) if len(retain_emb) else 0)
                direction = -F.normalize(reference, dim=-1)

            ratio = 4 / 5
            optimizer = torch.optim.Adam(trainable.values(), lr=params.lr * ratio, betas=(0.0, 0.99**ratio))
            loop = torch.Generator().manual_seed(ctx.seed * 7919 + 7)
            history: list[float] = []
            checkpoints = TrainingCheckpoints(
                ctx,
                job_fingerprint(self.name, params, target, ctx),
                modules={"trained": ParameterSubset(trainable)},
                optimizers={"adam": optimizer},
                generators={"loop": loop},
                history={"direction": history},
            )
            for step in range(checkpoints.resume() + 1, params.iterations + 1):
                logs = self._step(
                    trained, frozen, clip, forget_z, retain_z, direction, params, optimizer, loop
                )
                history.append(logs["direction"])
                checkpoints.step_done(step, params.iterations)
                ctx.progress(step, params.iterations, **logs)

        k = max(1, min(10, len(history) // 2))
        head, tail = history[:k], history[-k:]
        metrics = {
            "forget_latents": float(len(forget_z)),
            "retain_latents": float(len(retain_z)),
            "target_frac_pool_clip": len(forget_z) / params.pool_size,
        }
        if history:
            metrics["direction_loss_first"] = sum(head) / len(head)
            metrics["direction_loss_last"] = sum(tail) / len(tail)
        changed = {n: t.to(dtype) for n, t in changed_tensors(trainable).items()}
        return ErasureResult(changed={GENERATOR: changed}, metrics=metrics)

    @staticmethod
    @torch.no_grad()
    def _pool(
        frozen: Generator,
        clip: ClipGuide,
        class_emb: Tensor,
        params: TextToUnlearnParams,
        setup: torch.Generator,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Render ``pool_size`` latents with G_f (stored noise) and sort them by CLIP zero-shot probabilities."""
        z = torch.randn(params.pool_size, frozen.style_dim, generator=setup)
        probs, embeddings = [], []
        for i in range(0, len(z), params.sample_batch):
            images, _ = frozen([z[i : i + params.sample_batch].to(frozen.device)], randomize_noise=False)
            emb = clip.encode_images(images.clamp(-1, 1))
            embeddings.append(emb.cpu())
            probs.append((clip.logit_scale * emb @ class_emb.T).softmax(-1).cpu())
        p = torch.cat(probs)
        e = torch.cat(embeddings)
        forget = (p.argmax(1) == 0) & (p[:, 0] >= params.forget_threshold)
        retain = (p[:, 0] <= params.retain_threshold) & ~forget
        return z[forget], z[retain], e[forget], e[retain]

    @staticmethod
    def _step(
        trained: Generator,
        frozen: Generator,
        clip: ClipGuide,
        forget_z: Tensor,
        retain_z: Tensor,
        direction: Tensor,
        params: TextToUnlearnParams,
        optimizer: torch.optim.Optimizer,
        loop: torch.Generator,
    ) -> dict[str, float]:
        device = trained.device
        zf = forget_z[torch.randint(len(forget_z), (params.batch_size,), generator=loop)]
        parts = [zf]
        n_r = params.retain_batch if len(retain_z) else 0
        if n_r:
            parts.append(retain_z[torch.randint(len(retain_z), (n_r,), generator=loop)])
        z = torch.cat(parts).to(device)
        noise = layer_noise(trained, len(z), loop)
        with torch.no_grad():
            img_f, _ = frozen([z], noise=noise)
            e_f = clip.encode_images(img_f)
        img_t, _ = trained([z], noise=noise)
        e_t = clip.encode_images(img_t)
        b = params.batch_size
        l_dir = directional_loss(e_t[:b], e_f[:b], direction.to(device), params.edit_norm_floor)
        loss = params.lambda_direction * l_dir
        logs = {"direction": float(l_dir.detach())}
        if n_r:
            l_l2 = F.mse_loss(img_t[b:], img_f[b:])
            l_clip = (1 - (e_t[b:] * e_f[b:]).sum(-1)).mean()
            loss = loss + params.lambda_retain_l2 * l_l2 + params.lambda_retain_clip * l_clip
            logs.update(retain_l2=float(l_l2.detach()), retain_clip=float(l_clip.detach()))
        if params.lambda_forget_l2 > 0:
            l_fl2 = F.mse_loss(img_t[:b], img_f[:b])
            loss = loss + params.lambda_forget_l2 * l_fl2
            logs["forget_l2"] = float(l_fl2.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        logs["loss"] = float(loss.detach())
        return logs


__all__ = [
    "ClipGuide",
    "TextToUnlearn",
    "TextToUnlearnParams",
    "directional_loss",
    "layer_noise",
    "trainable_names",
]
