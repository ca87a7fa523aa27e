"""Training of the MiniCanvas world models, one function per stage, every stage resumable.

Each stage draws fresh procedural images from its own seeded ``torch.Generator`` (no dataset on disk, no
two batches alike), checkpoints model + optimiser + RNG state every ``checkpoint_every`` steps through
:mod:`erasure.training_state`, and resumes from the last checkpoint when run again. The learning rate is a
pure function of the step, so a resumed run follows the same schedule as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from erasure.training_state import load_training_state, save_training_state

from . import concepts
from .concepts import OBJECTS, STYLES
from .dataset import render, sample_batch, sample_labels
from .models import TEXT_MAX_LENGTH, MiniClassifier, clip_config, projected, unet_config, vae_config


class StageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(gt=0)
    batch: int = Field(gt=0)
    lr: float = Field(gt=0)
    warmup: int = Field(default=100, ge=0)
    seed: int = 0


class WorldSettings(BaseModel):
    """Budgets of ``world build``: the defaults are what the shipped world was trained with."""

    model_config = ConfigDict(extra="forbid")
    classifier: StageSettings = StageSettings(steps=2000, batch=128, lr=2e-3, seed=1)
    clip: StageSettings = StageSettings(steps=1500, batch=128, lr=1e-3, seed=2)
    # Weight of MiniCLIP's auxiliary caption-label loss (phase 1): linear probes on the projected text embedding
    # predict the caption's style and object. Without it the text tower mirrors the young vision tower's
    # confusions (e.g. "circle" and "hexagon", objects of an earlier world, got near-identical hidden states) and
    # MiniSD, conditioned on those hidden states, cannot draw the difference. The probes are discarded after training.
    clip_text_label_weight: float = Field(default=1.0, ge=0)
    # MiniCLIP phase 1b (vision tower locked): token-level text tuning, see :func:`tune_clip_text`.
    clip_text: StageSettings = StageSettings(steps=300, batch=128, lr=3e-4, warmup=20, seed=9)
    clip_token_probe_weight: float = Field(default=1.0, ge=0)
    clip_token_locality_weight: float = Field(default=1.0, ge=0)
    clip_token_keep_weight: float = Field(default=0.1, ge=0)
    clip_vision: StageSettings = StageSettings(steps=4000, batch=128, lr=5e-4, seed=5)
    vae: StageSettings = StageSettings(steps=1000, batch=32, lr=1e-3, seed=3)
    # The UNet's 4,000 + 3,200 steps keep the build within 120 minutes on a 2-core CPU (6,952 s of training loops
    # measured on a Zen 4 EPYC); 5,000 + 4,000 came to about 134 minutes there and 6,000 steps missed MiniSD's
    # object bar (docs/world.md, "Build time").
    unet: StageSettings = StageSettings(steps=4000, batch=48, lr=3e-4, warmup=300, seed=4)
    # Phase 2 of the UNet: a warm restart (fresh optimiser, new cosine cycle) with Min-SNR-5 loss weighting,
    # which spends the budget on the noise levels where object shape is decided (phase 1 leaves shapes soft).
    # Peak lr 3e-4 rather than 1.5e-4: from the same phase-1 checkpoint, MiniSD's object accuracy over 960 samples
    # rose from 0.908 to 0.933 at the same cost (Min-SNR-1.5 at 1.5e-4 reached 0.923; docs/world.md, "Build time").
    unet_refine: StageSettings = StageSettings(steps=3200, batch=48, lr=3e-4, warmup=100, seed=7)
    unet_refine_min_snr_gamma: float = Field(default=5.0, gt=0)
    unet_cfg_dropout: float = Field(default=0.1, ge=0, lt=1)
    # Stage sd_text (generators/minicanvas/text_robustness.py): MiniSD's text encoder learns to read past words it
    # never saw while its states on the training captions stay where the UNet learnt them.
    sd_text: StageSettings = StageSettings(steps=3000, batch=64, lr=1e-3, warmup=100, seed=10)
    sd_text_keep_weight: float = Field(default=10.0, ge=0)
    sd_text_max_inserted: int = Field(default=3, ge=1, description="Random words inserted per caption: 1 to this.")
    sd_text_substitute_prob: float = Field(default=0.5, ge=0, le=1)
    unet_ema_decay: float = Field(default=0.999, gt=0, lt=1)
    checkpoint_every: int = Field(default=250, gt=0)
    # MiniGAN (StyleGAN2, generators/minigan.py): its own optimiser settings live in train_minigan.
    # The shipped MiniGAN: 10,000 plain StyleGAN2 steps, then 1,865 with the label-coverage term below (the run was
    # continued from the published step-10,000 model with fresh Adam moments and stopped at 11,865).
    gan_steps: int = Field(default=11_865, gt=0)
    gan_batch: int = Field(default=32, gt=0)
    # Width 64 rather than StyleGAN2-like 128: on the 2-core CPU a step takes 1.15 s at 64 and 2.3 s at 128, and the
    # 10,000-step budget at 128 (6.4 h) would not fit the build's session-spanning budget.
    gan_channels: int = Field(default=64, gt=0, description="MiniGAN's G and D width at every resolution")
    gan_seed: int = 6
    # StyleGAN2's regularisers: R1 weight gamma, path-length weight, style-mixing probability. The defaults are
    # StyleGAN2-ADA's 32 px CIFAR-10 setup (gamma 0.01, no path-length regulariser, no mixing; Karras et al. 2020),
    # not rosinality's FFHQ-1024 ones (10, 2, 0.9): measured over 2,000 steps from scratch here, both reach the same
    # FID per step (713 vs 746, classifier features) and the CIFAR setup's step is 0.73 s instead of 1.15 s.
    gan_r1: float = Field(default=0.01, ge=0)
    gan_path_regularize: float = Field(default=0.0, ge=0)
    gan_mixing: float = Field(default=0.0, ge=0, le=1)
    # Vision-aided training (Kumari et al., CVPR 2022): weight of a second discriminator, a small head on frozen
    # MiniCLIP vision features (generators/feature_discriminator.py), in G's loss; 0 trains plain StyleGAN2.
    gan_feature_d_weight: float = Field(default=0.0, ge=0)
    # CatGAN's label-coverage term (generators/label_coverage.py): weight in G's loss of "confident per sample,
    # uniform over the batch" under MiniCLIP's zero-shot style and object labels; 0 trains without it. Measured
    # from the step-10,000 model (docs/gan_erasure.md): better on all four of world verify's GAN figures within
    # 1,750 steps, where 2,423 more plain steps were not; the `uniform_kl` marginal covered styles better and drew
    # less confidently.
    gan_coverage_weight: float = Field(default=1.0, ge=0)
    gan_coverage_from_step: int = Field(default=10_000, ge=0, description="The coverage term is on from this step.")
    gan_coverage_marginal: Literal["entropy", "uniform_kl"] = "entropy"
    # Who labels the fakes for that term: "frozen" = MiniCLIP zero-shot (the shipped run); "adversarial" = CatGAN's
    # own classifier (generators.label_coverage.LabelClassifier, width gan_classifier_width) trained beside D on the
    # real images' labels and towards indecision on fakes, from the run's first step. Measured from the shipped
    # model (docs/gan_erasure.md): 1,035 steps of it made all four verify figures worse and drew no Meadow or Neon.
    gan_coverage_labeller: Literal["frozen", "adversarial"] = "frozen"
    gan_classifier_width: int = Field(default=32, gt=0)
    # Its head start on real images alone before the game (Adam 1e-3, batch 64): from scratch it reads objects at
    # chance for hundreds of steps. Measured: object accuracy 0.71 after 600 steps (about 0.2 s a step, one thread).
    gan_classifier_pretrain_steps: int = Field(default=3000, ge=0)
    # Diffusion Soup's base (stage "soup", generators/minicanvas/soup.py): MiniSD's UNet trained from scratch like
    # phase 1 of `unet` (plain epsilon-MSE, cosine schedule, EMA), on every style except the shards' styles, which
    # the soup method's per-shard fine-tunes then teach.
    soup_base: StageSettings = StageSettings(steps=2500, batch=48, lr=3e-4, warmup=300, seed=8)
    soup_shards: list[list[str]] = Field(
        default_factory=lambda: [list(shard) for shard in SOUP_SHARDS],
        description="Styles of each Diffusion Soup shard (kept out of the soup base's training stream).",
    )

    @field_validator("soup_shards")
    @classmethod
    def _check_soup_shards(cls, shards: list[list[str]]) -> list[list[str]]:
        return check_soup_shards(shards)


# Diffusion Soup's default shards: 3 shards x 2 styles; the soup base learns the other 6 (Ember, Cinder, Dusk, Neon,
# Mosaic, Ink). The near pair Ember/Cinder stays in the base: split across shards (or between base and a shard), the
# remaining look-alike would still draw the removed style's stripes, and inside one short shard fine-tune their
# one-colour difference would be learnt poorly; the base learns it with its full budget. Each shard brings new
# background patterns (waves+speckle, dots+checker, rings+halftone) while the base covers every way an object is
# painted (solid, outlined, hollow), so a shard fine-tune has only its styles to learn.
SOUP_SHARDS: tuple[tuple[str, ...], ...] = (("Lagoon", "Frost"), ("Meadow", "Candy"), ("Cocoa", "Comic"))


def check_soup_shards(shards: list[list[str]]) -> list[list[str]]:
    """Soup shards must be at least two non-empty, disjoint groups of MiniCanvas styles that leave the base one."""
    if len(shards) < 2:
        raise ValueError("a soup needs at least 2 shards")
    seen: list[str] = []
    for shard in shards:
        if not shard:
            raise ValueError("a soup shard has no style")
        for name in shard:
            if name not in STYLES:
                raise ValueError(f"soup shard style {name!r} is unknown; allowed: {', '.join(STYLES)}")
            if name in seen:
                raise ValueError(f"style {name!r} is in more than one soup shard")
            seen.append(name)
    if len(seen) == len(STYLES):
        raise ValueError("the soup shards use every style: the soup base would have nothing to learn")
    return shards


def lr_at(step: int, s: StageSettings, final_frac: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to ``final_frac`` of the peak."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Loop:
    """A resumable training loop: ``step_fn(step) -> loss`` is called for steps not yet done."""

    name: str
    state_path: Path
    settings: StageSettings
    modules: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    generators: dict[str, torch.Generator]
    checkpoint_every: int

    def run(self, step_fn: Callable[[int], float], resume: bool = True) -> None:
        start = 0
        self._seconds_before = 0.0  # training time of earlier processes (a resumed loop), from the checkpoint
        if resume and self.state_path.exists():
            meta = load_training_state(self.state_path, modules=self.modules, optimizers=self.optimizers,
                                       generators=self.generators)
            start = meta["step"]
            self._seconds_before = float(meta.get("extra", {}).get("seconds", 0.0))
        self._started = time.monotonic()
        total = self.settings.steps
        bar = tqdm(range(start, total), initial=start, total=total, desc=self.name, dynamic_ncols=True)
        step = start
        try:
            for step in bar:
                for opt in self.optimizers.values():
                    for group in opt.param_groups:
                        group["lr"] = lr_at(step, self.settings)
                loss = step_fn(step)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{loss:.4f}")
                if (step + 1) % self.checkpoint_every == 0 or step + 1 == total:
                    self._save(step + 1)
        except KeyboardInterrupt:
            bar.close()
            print(f"\n{self.name}: interrupted; progress up to the last checkpoint is kept, rerun to resume.")
            raise
        LOOP_SECONDS[self.name] = self._elapsed()

    def _elapsed(self) -> float:
        return self._seconds_before + time.monotonic() - self._started

    def _save(self, step: int) -> None:
        # The checkpoint carries the loop's cumulative training time, so a build that spans several processes
        # (or sessions) still reports what it cost in all.
        save_training_state(self.state_path, step=step, modules=self.modules, optimizers=self.optimizers,
                            generators=self.generators, extra={"seconds": round(self._elapsed(), 3)})


LOOP_SECONDS: dict[str, float] = {}
"""Cumulative training seconds of every :class:`Loop` finished in this process, by loop name (resumed runs
included, counted up to their last checkpoint); ``world build`` records them per stage."""


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Judge robustness to generator artefacts: mild blur, colour shift and noise."""
    n = x.shape[0]
    dev = x.device
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    a = torch.rand(n, 1, 1, 1, generator=g, device=dev) * 0.6
    x = (1 - a) * x + a * blur
    x = x + (torch.rand(n, 3, 1, 1, generator=g, device=dev) * 2 - 1) * 0.06
    x = x + torch.randn(x.shape, generator=g, device=dev) * torch.rand(n, 1, 1, 1, generator=g, device=dev) * 0.08
    return x.clamp(-1, 1)


def train_classifier(work: Path, settings: WorldSettings, device: str, resume: bool = True) -> MiniClassifier:
    s = settings.classifier
    torch.manual_seed(s.seed)
    model = MiniClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=1e-4)
    g = torch.Generator(device).manual_seed(s.seed)
    model.train()

    def step_fn(step: int) -> float:
        x, st, ob = sample_batch(s.batch, g)
        ls, lo = model(_augment(x, g))
        loss = F.cross_entropy(ls, st) + F.cross_entropy(lo, ob)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    Loop("classifier", work / "classifier.state.safetensors", s, {"model": model}, {"opt": opt}, {"data": g},
         settings.checkpoint_every).run(step_fn, resume)
    return model.eval()


class PromptTable:
    """Every training caption, tokenised once; index ``len - 1`` is the empty (unconditional) prompt."""

    def __init__(self, tokenizer, device: str):
        self.prompts: list[str] = []
        self.by_pair: list[list[int]] = []  # pair index (style-major) -> prompt indices
        for style in STYLES:
            for obj in OBJECTS:
                ids = []
                for p in concepts.training_prompts(style, obj):
                    ids.append(len(self.prompts))
                    self.prompts.append(p)
                self.by_pair.append(ids)
        self.prompts.append("")
        enc = tokenizer(self.prompts, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True,
                        return_tensors="pt")
        self.input_ids = enc.input_ids.to(device)
        self.attention_mask = enc.attention_mask.to(device)
        counts = torch.tensor([len(i) for i in self.by_pair], device=device)
        padded = torch.full((len(self.by_pair), int(counts.max())), -1, dtype=torch.long)
        for k, ids in enumerate(self.by_pair):
            padded[k, : len(ids)] = torch.tensor(ids)
        self._counts, self._padded = counts, padded.to(device)

    @property
    def empty_index(self) -> int:
        return len(self.prompts) - 1

    def sample(self, style_idx: torch.Tensor, object_idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        pair = style_idx * len(OBJECTS) + object_idx
        counts = self._counts[pair]
        choice = (torch.rand(pair.shape, generator=g, device=pair.device) * counts).long()
        return self._padded[pair, choice]


def _soft_clip_loss(logits_per_image: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Contrastive loss whose targets treat every caption of the same (style, object) as a positive."""
    target = same / same.sum(dim=1, keepdim=True)
    loss_i = -(target * logits_per_image.log_softmax(dim=1)).sum(1).mean()
    target_t = same.T / same.T.sum(dim=1, keepdim=True)
    loss_t = -(target_t * logits_per_image.T.log_softmax(dim=1)).sum(1).mean()
    return (loss_i + loss_t) / 2


def _clip_update(model, opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One optimiser step of a MiniCLIP phase; CLIP's logit scale stays within [1, 100] (Radford et al. 2021)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss.item()


def train_clip(work: Path, tokenizer, settings: WorldSettings, device: str, resume: bool = True):
    from transformers import CLIPModel

    s = settings.clip
    torch.manual_seed(s.seed)
    model = CLIPModel(clip_config()).to(device)
    probes = torch.nn.Linear(model.config.projection_dim, len(STYLES) + len(OBJECTS)).to(device)
    opt = torch.optim.AdamW([*model.parameters(), *probes.parameters()], lr=s.lr, weight_decay=0.05)
    g = torch.Generator(device).manual_seed(s.seed)
    table = PromptTable(tokenizer, device)
    model.train()

    def step_fn(step: int) -> float:
        x, st, ob = sample_batch(s.batch, g)
        idx = table.sample(st, ob, g)
        out = model(input_ids=table.input_ids[idx], attention_mask=table.attention_mask[idx],
                    pixel_values=_augment(x, g))
        same = ((st[:, None] == st[None]) & (ob[:, None] == ob[None])).float()
        loss = _soft_clip_loss(out.logits_per_image, same)
        if settings.clip_text_label_weight > 0:
            labels = probes(out.text_embeds)
            label_loss = (F.cross_entropy(labels[:, : len(STYLES)], st)
                          + F.cross_entropy(labels[:, len(STYLES) :], ob))
            loss = loss + settings.clip_text_label_weight * label_loss
        return _clip_update(model, opt, loss)

    if not (resume and (work / "clip_vision.state.safetensors").exists()):  # phase 2's checkpoint holds it all
        Loop("clip", work / "clip.state.safetensors", s, {"model": model, "probes": probes}, {"opt": opt},
             {"data": g}, settings.checkpoint_every).run(step_fn, resume)
        tune_clip_text(model, work, tokenizer, settings, device, resume)
    return refine_clip_vision(model, work, tokenizer, settings, device, resume)


def _last_subsequence_end(row: list[int], sub: list[int]) -> int:
    """Index of the last token of the last occurrence of ``sub`` in ``row`` (-1 if absent)."""
    for i in range(len(row) - len(sub), -1, -1):
        if row[i : i + len(sub)] == sub:
            return i + len(sub) - 1
    return -1


@dataclass
class ConceptTokens:
    """For every caption of a :class:`PromptTable`: its style/object labels and the position of the last token of
    its style word and of its object word (Spanish names in Spanish captions); plus the short prompt
    ``"{style} style"`` of every style, tokenised, with the position of its style word's last token."""

    style_label: torch.Tensor
    object_label: torch.Tensor
    style_pos: torch.Tensor
    object_pos: torch.Tensor
    short_ids: torch.Tensor
    short_pos: torch.Tensor

    @classmethod
    def from_table(cls, table: PromptTable, tokenizer, device: str) -> ConceptTokens:
        def word(w: str) -> list[int]:
            return tokenizer(w, add_special_tokens=False).input_ids

        labels, positions = [], []
        rows = table.input_ids.tolist()
        for pair, prompt_ids in enumerate(table.by_pair):
            style, obj = STYLES[pair // len(OBJECTS)], OBJECTS[pair % len(OBJECTS)]
            for i in prompt_ids:
                spanish = table.prompts[i] == concepts.spanish_prompt(style, obj)
                sw = concepts.STYLES_ES[style] if spanish else style
                ow = concepts.OBJECTS_ES[obj] if spanish else obj
                positions.append((_last_subsequence_end(rows[i], word(sw)), _last_subsequence_end(rows[i], word(ow))))
                labels.append((pair // len(OBJECTS), pair % len(OBJECTS)))
        pos = torch.tensor(positions)
        if (pos < 0).any():
            bad = table.prompts[int((pos < 0).any(1).nonzero()[0])]
            raise ValueError(f"concept word not found among the tokens of caption {bad!r}")
        short = tokenizer([f"{s} style" for s in STYLES], padding="max_length", max_length=TEXT_MAX_LENGTH,
                          truncation=True, return_tensors="pt").input_ids
        short_pos = torch.tensor([_last_subsequence_end(short[k].tolist(), word(s)) for k, s in enumerate(STYLES)])
        lab = torch.tensor(labels)
        return cls(lab[:, 0].to(device), lab[:, 1].to(device), pos[:, 0].to(device), pos[:, 1].to(device),
                   short.to(device), short_pos.to(device))


def tune_clip_text(model, work: Path, tokenizer, settings: WorldSettings, device: str, resume: bool = True):
    """Phase 1b of MiniCLIP: token-level text tuning with the vision tower locked.

    MiniSD conditions on the text tower's per-token hidden states, not on the pooled embedding that the
    contrastive loss shapes. After phase 1 alone, look-alike words get near-identical states at their own
    tokens (measured on an earlier world: cosine 0.96 between the "circle" and "hexagon" tokens of the template), so the UNet cannot
    draw the difference; and the style word's state depends on the object named before it (0.59 between the
    "Ember" token of a template caption and of "Ember style"), so an erasure edit learnt on "Ember style" misses
    the template's Ember token. This phase adds, to the soft-CLIP loss against the locked image embeddings:

    * token probes: linear classifiers on the hidden state of each caption's style word (-> style) and object
      word (-> object), last sub-token, so each concept is decodable at its own position;
    * style-token locality: ``1 - cos`` between the style word's state in the caption and in ``"{style} style"``;
    * keep: ``MSE`` to phase 1's hidden states (all positions), so the tower moves no further than needed.

    The probes are discarded afterwards. Measured on that earlier world's MiniCLIP (300 steps): object-token cosines
    circle/hexagon 0.956 -> 0.022, circle/square 0.878 -> -0.130; Ember locality 0.588 -> 0.990.
    """
    s = settings.clip_text
    torch.manual_seed(s.seed)
    model = model.to(device)
    reference = copy.deepcopy(model.text_model).requires_grad_(False).eval()  # phase 1's text tower
    model.vision_model.requires_grad_(False)
    model.visual_projection.requires_grad_(False)
    width = model.config.text_config.hidden_size
    probes = torch.nn.ModuleDict({"style": torch.nn.Linear(width, len(STYLES)),
                                  "object": torch.nn.Linear(width, len(OBJECTS))}).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([*trainable, *probes.parameters()], lr=s.lr, weight_decay=0.01)
    g = torch.Generator(device).manual_seed(s.seed)
    table = PromptTable(tokenizer, device)
    tokens = ConceptTokens.from_table(table, tokenizer, device)
    model.train()

    def step_fn(step: int) -> float:
        x, st, ob = sample_batch(s.batch, g)
        idx = table.sample(st, ob, g)
        ids, mask = table.input_ids[idx], table.attention_mask[idx]
        with torch.no_grad():
            image = F.normalize(projected(model.get_image_features(pixel_values=_augment(x, g))), dim=-1)
            h_ref = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        out = model.text_model(input_ids=ids, attention_mask=mask)
        text = F.normalize(model.text_projection(out.pooler_output), dim=-1)
        same = ((st[:, None] == st[None]) & (ob[:, None] == ob[None])).float()
        loss = _soft_clip_loss(model.logit_scale.exp() * image @ text.T, same)
        h = out.last_hidden_state
        rows = torch.arange(len(idx), device=device)
        h_style, h_object = h[rows, tokens.style_pos[idx]], h[rows, tokens.object_pos[idx]]
        probe = (F.cross_entropy(probes["style"](h_style), tokens.style_label[idx])
                 + F.cross_entropy(probes["object"](h_object), tokens.object_label[idx]))
        # Each style's "{style} style" state, computed once per step (12 prompts, not one per caption).
        every_short = model.text_model(input_ids=tokens.short_ids).last_hidden_state
        short = every_short[torch.arange(len(STYLES), device=device), tokens.short_pos][st]
        locality = (1 - F.cosine_similarity(h_style, short, dim=-1)).mean()
        keep = F.mse_loss(h, h_ref)
        loss = (loss + settings.clip_token_probe_weight * probe + settings.clip_token_locality_weight * locality
                + settings.clip_token_keep_weight * keep)
        return _clip_update(model, opt, loss)

    Loop("clip-text", work / "clip_text.state.safetensors", s, {"model": model, "probes": probes}, {"opt": opt},
         {"data": g}, settings.checkpoint_every).run(step_fn, resume)
    model.requires_grad_(True)
    return model


def refine_clip_vision(model, work: Path, tokenizer, settings: WorldSettings, device: str, resume: bool = True):
    """Phase 2 of MiniCLIP: locked-text tuning. The text tower (which MiniSD uses as its frozen text encoder)
    and its projection stay fixed while the vision tower keeps learning the contrastive task: a small ViT
    learns colour and texture fast but object shape slowly, and this phase spends the budget on shape."""
    s = settings.clip_vision
    torch.manual_seed(s.seed)
    model = model.to(device)
    model.text_model.requires_grad_(False)
    model.text_projection.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=s.lr, weight_decay=0.05)
    g = torch.Generator(device).manual_seed(s.seed)
    table = PromptTable(tokenizer, device)
    with torch.no_grad():  # the locked text tower: every caption embedded once
        text = torch.cat([
            projected(model.get_text_features(input_ids=table.input_ids[i : i + 256],
                                              attention_mask=table.attention_mask[i : i + 256]))
            for i in range(0, len(table.prompts), 256)
        ])
    text = F.normalize(text, dim=-1)
    model.train()

    def step_fn(step: int) -> float:
        x, st, ob = sample_batch(s.batch, g)
        idx = table.sample(st, ob, g)
        image = F.normalize(projected(model.get_image_features(pixel_values=_augment(x, g))), dim=-1)
        logits = model.logit_scale.exp() * image @ text[idx].T
        same = ((st[:, None] == st[None]) & (ob[:, None] == ob[None])).float()
        loss = _soft_clip_loss(logits, same)
        return _clip_update(model, opt, loss)

    Loop("clip-vision", work / "clip_vision.state.safetensors", s, {"model": model}, {"opt": opt}, {"data": g},
         settings.checkpoint_every).run(step_fn, resume)
    model.requires_grad_(True)
    return model.eval()


def train_vae(work: Path, settings: WorldSettings, device: str, resume: bool = True):
    from diffusers import AutoencoderKL

    s = settings.vae
    torch.manual_seed(s.seed)
    vae = AutoencoderKL(**vae_config()).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.lr, weight_decay=0.0)
    g = torch.Generator(device).manual_seed(s.seed)
    vae.train()

    def step_fn(step: int) -> float:
        x, _, _ = sample_batch(s.batch, g)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=g)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    Loop("vae", work / "vae.state.safetensors", s, {"vae": vae}, {"opt": opt}, {"data": g},
         settings.checkpoint_every).run(step_fn, resume)
    vae.eval()
    # Latent scaling as in SD: unit variance of the scaled latents.
    with torch.no_grad():
        gs = torch.Generator(device).manual_seed(s.seed + 1000)
        z = torch.cat([vae.encode(sample_batch(256, gs)[0]).latent_dist.sample(generator=gs) for _ in range(8)])
    vae.register_to_config(scaling_factor=float(1.0 / z.flatten().std()))
    return vae


def text_encoder_from_clip(clip):
    """The SD text encoder: MiniCLIP's text tower as a stand-alone ``CLIPTextModel`` (frozen)."""
    from transformers import CLIPTextModel

    te = CLIPTextModel(clip.config.text_config)
    te.load_state_dict(clip.text_model.state_dict())
    return te.eval().requires_grad_(False)


class UNetTrainer:
    """MiniSD's denoising training, shared by the UNet's phases and the soup base: epsilon-MSE (optionally Min-SNR
    weighted) on freshly rendered MiniCanvas images encoded by the frozen VAE, captions from :class:`PromptTable`
    embedded once by the frozen text encoder, classifier-free-guidance dropout, gradient clipping and an EMA."""

    def __init__(self, unet, vae, text_encoder, tokenizer, settings: WorldSettings, device: str):
        from diffusers import DDPMScheduler

        self.unet, self.settings, self.device = unet, settings, device
        self.ema = copy.deepcopy(unet).requires_grad_(False)
        self.vae = vae.to(device).eval()
        text_encoder = text_encoder.to(device).eval()
        scheduler = DDPMScheduler(**sd_noise_schedule())
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.alphas = scheduler.alphas_cumprod.to(device)
        self.snr = self.alphas / (1 - self.alphas)
        self.table = PromptTable(tokenizer, device)
        with torch.no_grad():  # every caption's embedding, once: the text encoder is frozen
            self.embeddings = torch.cat([
                text_encoder(self.table.input_ids[i : i + 256], attention_mask=None).last_hidden_state
                for i in range(0, len(self.table.prompts), 256)
            ])
        unet.train()

    def step_fn(self, s: StageSettings, opt: torch.optim.Optimizer, g: torch.Generator, *,
                min_snr_gamma: float | None = None, ema_offset: int = 0, styles: list[int] | None = None):
        """``step_fn(step) -> loss`` for a :class:`Loop`; ``styles`` restricts the training stream's styles."""
        unet, vae, table, device = self.unet, self.vae, self.table, self.device
        ema_params, unet_params = list(self.ema.parameters()), list(unet.parameters())

        def step_fn(step: int) -> float:
            st, ob = sample_labels(s.batch, g, styles=styles)
            x = render(st, ob, g)
            with torch.no_grad():
                latents = vae.encode(x).latent_dist.sample(generator=g) * vae.config.scaling_factor
            idx = table.sample(st, ob, g)
            drop = torch.rand(idx.shape, generator=g, device=device) < self.settings.unet_cfg_dropout
            idx = torch.where(drop, torch.full_like(idx, table.empty_index), idx)
            noise = torch.randn(latents.shape, generator=g, device=device)
            t = torch.randint(0, self.num_train_timesteps, (s.batch,), generator=g, device=device)
            a = self.alphas[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            pred = unet(noisy, t, self.embeddings[idx]).sample
            per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
            if min_snr_gamma is not None:  # Min-SNR-gamma weighting for epsilon prediction (Hang et al. 2023)
                per_sample = per_sample * self.snr[t].clamp(max=min_snr_gamma) / self.snr[t]
            loss = per_sample.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            k = ema_offset + step
            decay = min(self.settings.unet_ema_decay, (1 + k) / (10 + k))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, unet_params, 1 - decay)
            return loss.item()

        return step_fn


def train_unet(work: Path, vae, text_encoder, tokenizer, settings: WorldSettings, device: str,
               resume: bool = True):
    from diffusers import UNet2DConditionModel

    s = settings.unet
    torch.manual_seed(s.seed)
    unet = UNet2DConditionModel(**unet_config()).to(device)
    trainer = UNetTrainer(unet, vae, text_encoder, tokenizer, settings, device)
    ema = trainer.ema

    # Phase 1: plain epsilon-MSE, cosine schedule.
    opt = torch.optim.AdamW(unet.parameters(), lr=s.lr, weight_decay=0.01)
    g = torch.Generator(device).manual_seed(s.seed)
    Loop("unet", work / "unet.state.safetensors", s, {"unet": unet, "ema": ema}, {"opt": opt}, {"data": g},
         settings.checkpoint_every).run(trainer.step_fn(s, opt, g), resume)

    # Phase 2: warm restart with Min-SNR weighting; the EMA carries on from phase 1.
    r = settings.unet_refine
    opt = torch.optim.AdamW(unet.parameters(), lr=r.lr, weight_decay=0.01)
    g = torch.Generator(device).manual_seed(r.seed)
    Loop("unet-refine", work / "unet_refine.state.safetensors", r, {"unet": unet, "ema": ema}, {"opt": opt},
         {"data": g}, settings.checkpoint_every).run(
             trainer.step_fn(r, opt, g, min_snr_gamma=settings.unet_refine_min_snr_gamma, ema_offset=s.steps),
             resume)
    return ema.eval()


def sd_noise_schedule() -> dict:
    """Stable Diffusion's training noise schedule (1000 steps, scaled-linear betas 0.00085..0.012)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon")
