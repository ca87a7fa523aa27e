"""What to forget and what to keep: prompt sets, and forget/retain latents from the clean model's own generations.

**Prompts.** :func:`concept_prompts` turns a target (and optional anchor) into

* forget prompts: prompt templates with the target filled in (``templates``, ``{concept}`` placeholder),
* substitutes: the same templates with another concept of the same kind (SalUn's pseudo labels: every other
  concept, or only the next one in the list),
* anchor prompts: the same templates with the anchor (substitute concept / UCE guide / DoCo-style anchor),
* retain prompts: prompts that do not mention the target.

Two sources: ``target`` uses the target's own prompt (``"<name> style"`` or ``"<name>"``, as
:class:`erasure.config.Target` writes it) and a retain list (by default COCO object prompts ``"a photo of a
{object}"``, as AdvUnlearn's ``coco_object`` retain set); ``minicanvas`` uses the MiniCanvas caption templates
(the UnlearnCanvas answer-set template and the training paraphrases) over every object (for a style target) or
every style (for an object target), with the other concepts of the same kind as retain set. ``auto`` picks
``minicanvas`` when the pipeline is the built-in MiniCanvas world and the target is a MiniCanvas style/object.

**Latents.** :func:`generate_latents` samples clean latents from the unmodified model (seeded, guided DDIM),
the default forget/retain data of SalUn here (its NSFW setting also trains on SD's own generations); for
MiniCanvas, :func:`minicanvas_dataset_latents` encodes freshly rendered dataset images instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from erasure.text_embeddings import PromptEmbeddings
from erasure.trajectory import (
    AnyTrajectories,
    ddim_scheduler,
    initial_noise,
    partial_trajectories,
    sample_trajectories,
)

if TYPE_CHECKING:
    from erasure.config import Target

PromptSource = Literal["auto", "minicanvas", "target"]
DataSource = Literal["generated", "minicanvas_dataset"]

# The 80 COCO object categories: the generic retain prompts (AdvUnlearn retains "a photo of {object}" prompts).
COCO_OBJECTS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip
COCO_RETAIN_PROMPTS: tuple[str, ...] = tuple(f"a photo of a {name}" for name in COCO_OBJECTS)

CONCEPT = "{concept}"


def fill(template: str, concept: str) -> str:
    """``template`` with its ``{concept}`` placeholder replaced (other braces are left alone)."""
    return template.replace(CONCEPT, concept)


def without_concept(template: str) -> str:
    """A template with its concept slot dropped and whitespace tidied (``'{concept} style'`` -> ``'style'``,
    ``'A circle image in {concept} style.'`` -> ``'A circle image in style.'``)."""
    text = template.replace(CONCEPT, "")
    return re.sub(r"\s+([.,])", r"\1", re.sub(r"\s+", " ", text)).strip()


def mentions(prompt: str, name: str) -> bool:
    """Whether ``prompt`` contains ``name`` as a whole word (case-insensitive)."""
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", prompt, flags=re.IGNORECASE) is not None


@dataclass(frozen=True)
class ConceptPrompts:
    """Prompt sets for erasing ``target``; see the module docstring."""

    templates: list[str]
    target: str
    anchor: str | None
    others: list[str]
    retain: list[str]
    next_concept: str | None = None
    """MiniCanvas only: the concept after the target in its concept list (cyclic), SalUn's class-wise pseudo label."""
    template_labels: list[tuple[str, str] | None] = field(default_factory=list)
    """MiniCanvas only: the (style, object) a template shows once filled with the target."""
    retain_labels: list[tuple[str, str] | None] = field(default_factory=list)

    @property
    def forget(self) -> list[str]:
        return [fill(t, self.target) for t in self.templates]

    @property
    def anchored(self) -> list[str]:
        """The forget prompts with the anchor in place of the target; ValueError without an anchor."""
        if self.anchor is None:
            raise ValueError("this needs an anchor concept (set `anchor:` in the job)")
        return [fill(t, self.anchor) for t in self.templates]

    def next_substitutes(self) -> list[str]:
        """The forget prompts with the next concept in place of the target; ValueError without a concept list."""
        if self.next_concept is None:
            raise ValueError("the next concept is only known for MiniCanvas prompts (a concept list)")
        return [fill(t, self.next_concept) for t in self.templates]

    def substitutes(self, index: int) -> list[str]:
        """Random-label candidates for forget prompt ``index``: the same template with every other concept, or
        (when no other concepts are known) the retain prompts."""
        if self.others:
            return [fill(self.templates[index], other) for other in self.others]
        return list(self.retain)


EsdReference = Literal["empty", "caption", "others"]
"""The reference branch r of ESD's target ``eps*(x_t, r) - eta (eps*(x_t, c) - eps*(x_t, r))``: see
:func:`esd_references`."""


class References:
    """The reference branch's prompts: ``per_prompt`` of them for each concept prompt (stored consecutively); a
    state of concept prompt ``i`` gets one of its own, drawn at random when there are several."""

    def __init__(self, prompts: PromptEmbeddings, per_prompt: int) -> None:
        self.prompts = prompts
        self.per_prompt = per_prompt

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Reference embeddings for the states of concept prompts ``index`` (one random draw per state)."""
        rows = index.cpu() * self.per_prompt
        if self.per_prompt > 1:
            rows = rows + torch.randint(self.per_prompt, rows.shape, generator=generator)
        return self.prompts[rows.to(self.prompts.embeddings.device)]


def esd_references(tokenizer, text_encoder, sets: ConceptPrompts, kind: EsdReference) -> References | None:
    """ESD's reference branch for the forget prompts of ``sets``: ``empty`` -> None (the empty prompt, as the
    paper); ``caption`` -> each prompt with the target's name dropped ('A circle image in style.'); ``others`` ->
    each prompt with every other concept of the target's kind in its place, one drawn per state: ESD's loss is a
    squared error, so its optimum negates from the *mean* of the other concepts' scores."""
    if kind == "empty":
        return None
    if kind == "caption":
        prompts = [without_concept(t) for t in sets.templates]
        return References(PromptEmbeddings(tokenizer, text_encoder, prompts), 1)
    if not sets.others:
        raise ValueError(
            "reference 'others' needs the other concepts of the target's kind (MiniCanvas prompts)"
        )
    prompts = [fill(t, other) for t in sets.templates for other in sets.others]
    return References(PromptEmbeddings(tokenizer, text_encoder, prompts), len(sets.others))


def is_minicanvas_pipeline(pipe) -> bool:
    """Whether ``pipe`` was loaded from the MiniCanvas world's diffusion pipeline folder."""
    from generators.minicanvas.paths import sd_pipeline_dir

    source = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None)
    if not source:
        return False
    try:
        return Path(source).resolve() == sd_pipeline_dir().resolve()
    except OSError:
        return False


def resolve_prompt_source(source: PromptSource, pipe, target: Target) -> Literal["minicanvas", "target"]:
    if source != "auto":
        return source
    return "minicanvas" if target.kind in ("style", "object") and is_minicanvas_pipeline(pipe) else "target"


def concept_prompts(
    target: Target,
    anchor: Target | None,
    source: Literal["minicanvas", "target"],
    retain_prompts: list[str] | tuple[str, ...] = COCO_RETAIN_PROMPTS,
) -> ConceptPrompts:
    """The prompt sets for ``target`` from ``source`` (``retain_prompts`` is used by the ``target`` source)."""
    if anchor is not None and anchor.kind != target.kind and source == "minicanvas":
        raise ValueError(
            f"anchor {anchor.spec} must be of the target's kind ({target.kind}) for MiniCanvas prompts"
        )
    if source == "minicanvas":
        return _minicanvas_prompts(target, anchor)
    template = "{concept} style" if target.kind == "style" else CONCEPT
    retain = [p for p in retain_prompts if not mentions(p, target.name)]
    if not retain:
        raise ValueError(f"no retain prompt is left once those that mention {target.name!r} are removed")
    return ConceptPrompts(
        templates=[template],
        target=target.name,
        anchor=anchor.name if anchor is not None else None,
        others=[],
        retain=retain,
        template_labels=[None],
        retain_labels=[None] * len(retain),
    )


def _minicanvas_prompts(target: Target, anchor: Target | None) -> ConceptPrompts:
    from generators.minicanvas.concepts import OBJECTS, STYLES, TEMPLATE, TRAIN_PARAPHRASES

    if target.kind not in ("style", "object"):
        raise ValueError(f"MiniCanvas prompts need a style or object target, not {target.spec}")
    forms = [TEMPLATE, *TRAIN_PARAPHRASES]
    is_style = target.kind == "style"
    own, cross = (STYLES, OBJECTS) if is_style else (OBJECTS, STYLES)
    name = next((c for c in own if c.lower() == target.name.lower()), None)
    if name is None:
        raise ValueError(f"{target.name!r} is not a MiniCanvas {target.kind}; allowed: {', '.join(own)}")
    others = [c for c in own if c != name]

    def prompt(form: str, concept: str, other: str) -> str:
        style, obj = (concept, other) if is_style else (other, concept)
        return form.replace("{style}", style).replace("{object}", obj)

    def label(concept: str, other: str) -> tuple[str, str]:
        return (concept, other) if is_style else (other, concept)

    templates, template_labels = [], []
    for other in cross:
        for form in forms:
            templates.append(prompt(form, CONCEPT, other))
            template_labels.append(label(name, other))
    retain, retain_labels = [], []
    for concept in others:
        for other in cross:
            for form in forms:
                retain.append(prompt(form, concept, other))
                retain_labels.append(label(concept, other))
    return ConceptPrompts(
        templates=templates,
        target=name,
        anchor=anchor.name if anchor is not None else None,
        others=others,
        retain=retain,
        next_concept=own[(own.index(name) + 1) % len(own)],
        template_labels=template_labels,
        retain_labels=retain_labels,
    )


# --------------------------------------------------------------------------------------------- forget/retain data


@dataclass
class LatentSet:
    """Clean latents (scaled like the UNet's training data) and, per latent, the index of its prompt."""

    latents: torch.Tensor
    prompt_index: torch.Tensor
    prompts: list[str]

    def __len__(self) -> int:
        return self.latents.shape[0]


def spread(n: int, num_prompts: int, generator: torch.Generator) -> torch.Tensor:
    """Prompt indices for ``n`` samples: every prompt equally often (up to one), in a seeded random order."""
    order = torch.randperm(num_prompts, generator=generator)
    return order[torch.arange(n) % num_prompts]


def prompt_trajectories(
    teacher,
    scheduler,
    prompts: PromptEmbeddings,
    n: int,
    guidance_scale: float,
    generator: torch.Generator,
    reuse: bool = True,
    negative: PromptEmbeddings | None = None,
) -> AnyTrajectories:
    """``n`` partial-DDIM trajectories of the frozen ``teacher`` under ``prompts`` (every prompt equally often),
    from noise drawn from ``generator``: sampled once and kept, or, with ``reuse=False`` (the reference path),
    recomputed whenever a state is drawn (then ``teacher`` must stay frozen while the method trains).

    Guidance is away from the empty prompt, or with ``negative`` (index for index with ``prompts``) away from
    ``negative[i]`` for trajectories of ``prompts[i]``; the bank's ``uncond_out`` are then those outputs."""
    noise = initial_noise(n, teacher, generator)
    index = spread(n, len(prompts), generator)
    if negative is None:
        uncond = prompts.empty
    elif len(negative) != len(prompts):
        raise ValueError(
            f"{len(negative)} negative prompts for {len(prompts)} prompts; they pair index for index"
        )
    else:
        uncond = negative[index]
    return partial_trajectories(
        teacher, scheduler, noise, prompts[index], uncond, guidance_scale, index, reuse=reuse
    )


def generate_latents(
    pipe,
    prompts: PromptEmbeddings,
    n: int,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 64,
) -> LatentSet:
    """``n`` clean latents sampled from ``pipe``'s (unmodified) UNet with guided DDIM, prompts spread evenly.

    Deterministic for ``seed`` (noise and prompt order come from a CPU generator). Skipping the VAE round trip
    (decode to an image, encode it again) is our choice: SalUn encodes saved generations, which the VAE
    reproduces up to its reconstruction error.
    """
    generator = torch.Generator().manual_seed(seed)
    prompt_index = spread(n, len(prompts), generator)
    noise = initial_noise(n, pipe.unet, generator)
    scheduler = ddim_scheduler(pipe.scheduler.config, num_inference_steps, pipe.unet.device)
    result = sample_trajectories(
        pipe.unet,
        scheduler,
        noise,
        prompts[prompt_index],
        prompts.empty,
        guidance_scale,
        batch_size=batch_size,
        keep_states=False,
    )
    return LatentSet(latents=result.final, prompt_index=prompt_index, prompts=prompts.prompts)


def require_dataset_labels(labels: list[tuple[str, str] | None]) -> None:
    """Fail unless every prompt has its MiniCanvas (style, object) label, which dataset renders need."""
    if any(label is None for label in labels):
        raise ValueError(
            "MiniCanvas dataset images need MiniCanvas prompts (method param prompts: minicanvas)"
        )


@torch.no_grad()
def minicanvas_dataset_latents(
    pipe, prompts: list[str], labels: list[tuple[str, str] | None], n: int, seed: int
) -> LatentSet:
    """``n`` latents of freshly rendered MiniCanvas dataset images for the labelled ``prompts`` (VAE posterior
    mean, times the VAE's scaling factor)."""
    from generators.minicanvas.concepts import OBJECTS, STYLES
    from generators.minicanvas.dataset import render

    require_dataset_labels(labels)
    generator = torch.Generator().manual_seed(seed)
    prompt_index = spread(n, len(prompts), generator)
    style = torch.tensor([STYLES.index(labels[i][0]) for i in prompt_index.tolist()])
    obj = torch.tensor([OBJECTS.index(labels[i][1]) for i in prompt_index.tolist()])
    images = render(style, obj, generator, size=pipe.vae.config.sample_size)
    vae = pipe.vae
    latents = torch.cat(
        [vae.encode(images[i : i + 64].to(vae.device, vae.dtype)).latent_dist.mean for i in range(0, n, 64)]
    )
    return LatentSet(
        latents=latents * vae.config.scaling_factor, prompt_index=prompt_index, prompts=list(prompts)
    )
