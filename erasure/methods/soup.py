"""Diffusion Soup (Biggs, Seshadri, …, Soatto; "Diffusion Soup: Model Merging for Text-to-Image Diffusion Models",
ECCV 2024, arXiv 2406.08431). No public code: this implements the description, with our choices marked below.

The method: split the training data into shards, fine-tune one copy of a common base model per shard, and average
the copies' weights (uniform soup). Unlearning shard ``k`` is training-free: re-average without it,
``theta' = (N theta_soup - theta_k) / (N - 1)``, i.e. the mean of the other shards' weights.

Our choices (the accessible text does not fix them):

* **Base and shards.** MiniCanvas only. The base is the world's *soup base* (``erasure-studio world build --only
  soup``, :mod:`generators.minicanvas.soup`): MiniSD's UNet trained from scratch on every style except the shards'
  styles, so it cannot draw them and removing a shard really removes what the soup knows of its styles. A shard is
  a group of styles (default: the groups the base was built for, in its ``soup.json``), its data every
  (style of the shard, object) pair.
* **Shard fine-tunes.** The full UNet, from the base, with MiniSD's own recipe: plain epsilon-MSE on freshly
  rendered MiniCanvas images (VAE posterior sample), captions drawn uniformly among the MiniCanvas training captions
  of each pair, 10 % of them replaced by the empty prompt (classifier-free guidance), AdamW (weight decay 0.01),
  linear warm-up then cosine decay to 5 % of the peak, gradient-norm clipping at 1; no EMA. VAE, text encoder,
  tokenizer and scheduler are the job's pipeline's (MiniSD's) and stay frozen.
* **What is averaged.** Every tensor of the UNet's state dict, uniform weights, in float64, cast back.
* **Target.** ``style:<name>`` removes the whole shard that holds ``<name>`` (all its styles).
* **Removal** (``removal``): ``subtract`` = the formula above from the soup and the removed shard's stored weights
  (all that must be kept at hand), computed in float64; ``average`` = plain mean of the remaining shards. They
  agree up to float rounding. Its wall time (reading the removed shard's weights from the cache, the arithmetic,
  loading the result into the UNet) is ``soup.removal_seconds``.
* **Cache.** Each shard's fine-tuned UNet is stored (safetensors) under ``cache_dir/<base fingerprint>/<key>``,
  the key hashing the base UNet, the VAE, text encoder and tokenizer that make its data, the shard's styles, the
  training settings, the seed and the precision; a later job with the same key trains nothing. A shard fine-tune is
  resumable (:mod:`erasure.resume`, one checkpoint folder per shard) until it reaches the cache.

Measurement (the method's own metrics, in ``metrics.json`` under ``soup``): the MiniCanvas classifier judges
template-prompt generations (``"A {object} image in {style} style."``) of every object x ``eval_seeds`` for each
shard style. ``before_acc.shard_<j>``: style accuracy of the full soup on shard ``j``'s styles;
``after_acc.shard_<j>``: after removal; ``base_acc.shard_<j>`` (``eval_base``): of the base alone.
``removed_ua`` = 1 - after-removal accuracy on the removed shard's styles; ``kept_retention`` = the other shards'
style accuracy after removal / before (NaN if it was 0 before). The run's weights are the whole UNet after
removal, so an exported run is MiniSD with the unlearned soup as its UNet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors import SafetensorError

from erasure.base import ErasureMethod, ErasureResult, MethodParams, RunContext
from erasure.errors import ConfigError, NotAvailableError
from erasure.forget_data import is_minicanvas_pipeline
from erasure.io import load_tensors, save_tensors
from erasure.registry import register_method
from erasure.resume import TrainingCheckpoints
from generators.minicanvas.world import SD_GUIDANCE, SD_STEPS

if TYPE_CHECKING:
    from erasure.config import Target

CACHE_ENV_VAR = "ERASURE_STUDIO_SOUP_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/erasure-studio/soup")
CACHE_FORMAT = "erasure-studio/soup-shard/1"
FINAL_LR_FRACTION = 0.05  # MiniSD's cosine schedule ends at 5 % of the peak


class SoupParams(MethodParams):
    """Diffusion Soup settings. "Reference" is the paper; it does not state most of them (see the docstring)."""

    shard_steps: int = Field(
        400, ge=1, description="Fine-tuning steps per shard (the budget). Reference: not stated."
    )
    batch_size: int = Field(
        32, ge=1, description="Images per step. Reference: not stated (MiniSD trained with 48)."
    )
    lr: float = Field(
        2e-4, gt=0, description="Peak AdamW learning rate. Reference: not stated (MiniSD's phase 1: 3e-4)."
    )
    warmup: int = Field(
        50, ge=0, description="Linear warm-up steps, then cosine decay to 5 % (MiniSD's schedule)."
    )
    cfg_dropout: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Share of captions replaced by the empty prompt (SD's and MiniSD's 10 %).",
    )
    shards: list[list[str]] | None = Field(
        None,
        description="Styles of each shard; default: the shards the soup base was built for (its soup.json). "
        "Every shard style must be one the base was not trained on.",
    )
    removal: Literal["subtract", "average"] = Field(
        "subtract",
        description="subtract: theta' = (N theta_soup - theta_k)/(N-1), the reference's formula; average: plain "
        "mean of the remaining shards (equal up to rounding).",
    )
    eval_seeds: list[int] = Field(
        default_factory=lambda: [188, 288],
        min_length=1,
        description="Seeds of the before/after measurement: each shard style x every object x these seeds.",
    )
    eval_steps: int = Field(SD_STEPS, ge=1, description="DDIM steps of the measurement (MiniSD's default).")
    eval_guidance: float = Field(
        SD_GUIDANCE, ge=0, description="CFG scale of the measurement (MiniSD's default)."
    )
    eval_base: bool = Field(True, description="Also measure the base alone on the shard styles (base_acc).")
    base: str | None = Field(
        None,
        description="Soup base folder (unet/ + soup.json); default: the world's soup_base/ "
        "(`erasure-studio world build --only soup`).",
    )
    cache_dir: str | None = Field(
        None,
        description=f"Folder of the shard fine-tunes; default ${CACHE_ENV_VAR} or {DEFAULT_CACHE_DIR}.",
    )


def soup_average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform soup: the mean of every floating-point tensor over ``states`` (float64 sum, cast back)."""
    if not states:
        raise ValueError("a soup needs at least one model")
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            total = sum(state[key].double() for state in states)
            out[key] = (total / len(states)).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def soup_remove(
    soup: dict[str, torch.Tensor], removed: dict[str, torch.Tensor], n: int
) -> dict[str, torch.Tensor]:
    """``(n * soup - removed) / (n - 1)``: the soup of ``n`` models without ``removed`` (float64, cast back)."""
    if n < 2:
        raise ValueError("removing a model from a soup needs at least 2 models in it")
    return {
        key: ((n * value.double() - removed[key].double()) / (n - 1)).to(value.dtype)
        if value.is_floating_point()
        else value.clone()
        for key, value in soup.items()
    }


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR).expanduser()


@register_method
class DiffusionSoup(ErasureMethod):
    """Diffusion Soup (Biggs et al., ECCV 2024): per-shard fine-tunes averaged; unlearning = re-averaging."""

    name = "soup"
    backbone_kind = "sd"
    description = "Diffusion Soup (Biggs et al. 2024): average per-shard fine-tunes; unlearn a shard by re-averaging without it."
    Params = SoupParams

    def erase(self, backbone, target: Target, params: SoupParams, ctx: RunContext) -> ErasureResult:
        from generators.minicanvas.soup import load_soup_unet, read_soup_info, soup_base_dir

        pipe = backbone
        if not is_minicanvas_pipeline(pipe):
            raise ConfigError(
                "soup: only the MiniCanvas world is supported (backbone: minicanvas-sd): its shards are groups of "
                "MiniCanvas styles over a base built without them; shards of other pipelines (user prompt or data "
                "lists) are not implemented"
            )
        base_dir = Path(params.base).expanduser() if params.base else soup_base_dir()
        if not (base_dir / "unet").is_dir():
            raise NotAvailableError(
                "the Diffusion Soup base",
                f"{base_dir} is not built; run `erasure-studio world build --only soup`",
            )
        info = read_soup_info(base_dir)
        shards = self._shards(params, info)
        removed = self._removed_shard(target, shards)
        n = len(shards)
        ctx.log(
            f"soup: {n} shards {shards}; the target {target.spec} removes shard {removed} {shards[removed]}"
        )

        unet = pipe.unet
        base = load_soup_unet(base_dir, "cpu", unet.dtype)
        base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        own = unet.state_dict()
        if set(base_state) != set(own) or any(base_state[k].shape != own[k].shape for k in own):
            raise ConfigError(
                f"soup: the base UNet in {base_dir} does not fit this pipeline's UNet architecture"
            )
        fingerprints = self._fingerprints(pipe, base)
        del base, own
        cache = Path(params.cache_dir).expanduser() if params.cache_dir else default_cache_dir()
        cache = cache / fingerprints["base"]

        # 1. One fine-tune per shard, from the cache when a job with the same key made it before.
        keys = [self._shard_key(fingerprints, shard, params, ctx) for shard in shards]
        paths = [
            cache / f"{hashlib.blake2b(key.encode(), digest_size=16).hexdigest()}.safetensors" for key in keys
        ]
        metrics: dict[str, float] = {"soup.num_shards": n, "soup.removed_shard": removed}
        states = [self._read_cached(paths[j], keys[j]) for j in range(n)]
        todo = [j for j in range(n) if states[j] is None]
        trained_steps, done = 0, 0
        for j in range(n):
            state = states[j]
            if state is None:
                state, steps, loss = self._fine_tune(
                    pipe,
                    base_state,
                    shards[j],
                    j,
                    keys[j],
                    params,
                    ctx,
                    offset=done,
                    total=len(todo) * params.shard_steps,
                )
                save_tensors(paths[j], state, metadata={"soup_key": keys[j]})
                ctx.log(f"soup: shard {j} fine-tuned ({steps} steps here), stored in {paths[j]}")
                trained_steps += steps
                done += params.shard_steps
                metrics[f"soup.final_loss.shard_{j}"] = loss
                states[j] = state
            else:
                ctx.log(f"soup: shard {j} {shards[j]} from the cache {paths[j]} (no training)")
        metrics["soup.trained_steps"] = trained_steps
        metrics["soup.cache_hits"] = n - len(todo)

        # 2. The uniform soup, and the accuracies before removal.
        soup = soup_average([state for state in states if state is not None])
        judge = _Judge(pipe, params, ctx)
        if params.eval_base:
            self._load(unet, base_state)
            for j, shard in enumerate(shards):
                metrics[f"soup.base_acc.shard_{j}"] = judge.accuracy(shard)
        self._load(unet, soup)
        before = [judge.accuracy(shard) for shard in shards]

        # 3. Unlearning: re-average without the removed shard (timed on its own).
        del states
        start = time.perf_counter()
        if params.removal == "subtract":
            removed_state = load_tensors(paths[removed])[0]
            unlearned = soup_remove(soup, removed_state, n)
        else:
            unlearned = soup_average([load_tensors(paths[j])[0] for j in range(n) if j != removed])
        self._load(unet, unlearned)
        metrics["soup.removal_seconds"] = time.perf_counter() - start
        ctx.log(
            f"soup: shard {removed} removed in {metrics['soup.removal_seconds']:.3f} s ({params.removal})"
        )

        after = [judge.accuracy(shard) for shard in shards]
        kept = [j for j in range(n) if j != removed]
        kept_before = _style_weighted([before[j] for j in kept], [len(shards[j]) for j in kept])
        kept_after = _style_weighted([after[j] for j in kept], [len(shards[j]) for j in kept])
        for j in range(n):
            metrics[f"soup.before_acc.shard_{j}"] = before[j]
            metrics[f"soup.after_acc.shard_{j}"] = after[j]
        metrics["soup.removed_ua"] = 1.0 - after[removed]
        metrics["soup.kept_acc_before"] = kept_before
        metrics["soup.kept_acc_after"] = kept_after
        metrics["soup.kept_retention"] = kept_after / kept_before if kept_before > 0 else float("nan")
        ctx.log(
            f"soup: removed shard accuracy {before[removed]:.3f} -> {after[removed]:.3f} "
            f"(UA {metrics['soup.removed_ua']:.3f}); kept shards {kept_before:.3f} -> {kept_after:.3f}"
        )
        return ErasureResult(
            changed={"unet": {k: v.detach().cpu() for k, v in unlearned.items()}}, metrics=metrics
        )

    # ------------------------------------------------------------------------------------------- pieces

    @staticmethod
    def _shards(params: SoupParams, info: dict[str, Any]) -> list[list[str]]:
        from generators.minicanvas.concepts import STYLES
        from generators.minicanvas.train import check_soup_shards

        requested = params.shards if params.shards is not None else info["shards"]
        by_lower = {name.lower(): name for name in STYLES}
        shards = []
        for shard in requested:
            unknown = [name for name in shard if name.lower() not in by_lower]
            if unknown:
                raise ConfigError(
                    f"soup: shard styles {unknown} are not MiniCanvas styles; allowed: {', '.join(STYLES)}"
                )
            shards.append([by_lower[name.lower()] for name in shard])
        try:
            check_soup_shards(shards)
        except ValueError as err:
            raise ConfigError(f"soup: shards {shards}: {err}") from None
        known = [name for shard in shards for name in shard if name in info["base_styles"]]
        if known:
            raise ConfigError(
                f"soup: the soup base was trained on {known}, so removing their shard could not unlearn them; "
                f"shard styles must be among those it never saw ({info['shards']})"
            )
        return shards

    @staticmethod
    def _removed_shard(target: Target, shards: list[list[str]]) -> int:
        if target.kind == "style":
            for j, shard in enumerate(shards):
                if any(name.lower() == target.name.lower() for name in shard):
                    return j
        raise ConfigError(
            f"soup: the target names the shard to remove as style:<one of its styles>; {target.spec} is in no "
            f"shard (shards: {shards})"
        )

    @staticmethod
    def _fingerprints(pipe, base) -> dict[str, str]:
        from evaluate.cache import model_fingerprint

        vocab = json.dumps(sorted(pipe.tokenizer.get_vocab().items()), ensure_ascii=False)
        return {
            "base": model_fingerprint(base),
            "vae": model_fingerprint(pipe.vae),
            "text_encoder": model_fingerprint(pipe.text_encoder),
            "tokenizer": hashlib.blake2b(
                f"{pipe.tokenizer.model_max_length}:{vocab}".encode(), digest_size=16
            ).hexdigest(),
            "schedule": hashlib.blake2b(
                json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str).encode(), digest_size=16
            ).hexdigest(),
        }

    @staticmethod
    def _shard_key(
        fingerprints: dict[str, str], shard: list[str], params: SoupParams, ctx: RunContext
    ) -> str:
        training = {
            k: getattr(params, k) for k in ("shard_steps", "batch_size", "lr", "warmup", "cfg_dropout")
        }
        return json.dumps(
            {
                "format": CACHE_FORMAT,
                **fingerprints,
                "shard": shard,
                "training": training,
                "seed": ctx.seed,
                "precision": ctx.precision,
            },
            sort_keys=True,
        )

    @staticmethod
    def _read_cached(path: Path, key: str) -> dict[str, torch.Tensor] | None:
        if not path.is_file():
            return None
        try:
            tensors, meta = load_tensors(path)
        except (OSError, ValueError, SafetensorError):  # damaged: trained again and rewritten
            return None
        return tensors if meta.get("soup_key") == key else None

    @staticmethod
    def _load(unet, state: dict[str, torch.Tensor]) -> None:
        unet.load_state_dict({k: v.to(unet.device) for k, v in state.items()}, strict=True)

    def _fine_tune(
        self,
        pipe,
        base_state,
        shard: list[str],
        j: int,
        key: str,
        params: SoupParams,
        ctx: RunContext,
        *,
        offset: int,
        total: int,
    ) -> tuple[dict[str, torch.Tensor], int, float]:
        """Fine-tune the base on ``shard`` (resumable); ``(state, steps run here, mean loss of the last 20)``."""
        from generators.minicanvas.concepts import OBJECTS, STYLES
        from generators.minicanvas.dataset import render
        from generators.minicanvas.train import PromptTable, StageSettings, lr_at

        unet, vae, device = pipe.unet, pipe.vae, pipe.unet.device
        if pipe.scheduler.config.get("prediction_type", "epsilon") != "epsilon":
            raise ConfigError(
                "soup: the shard fine-tunes need an epsilon-prediction pipeline (MiniSD is one)"
            )
        self._load(unet, base_state)
        unet.requires_grad_(True).train()
        table = PromptTable(pipe.tokenizer, "cpu")
        with torch.no_grad():
            embeddings = torch.cat(
                [
                    pipe.text_encoder(
                        table.input_ids[i : i + 256].to(device), attention_mask=None
                    ).last_hidden_state
                    for i in range(0, len(table.prompts), 256)
                ]
            ).to(unet.dtype)
        alphas = pipe.scheduler.alphas_cumprod.to(device)
        num_train_timesteps = pipe.scheduler.config.num_train_timesteps
        styles = torch.tensor([STYLES.index(name) for name in shard])
        schedule = StageSettings(
            steps=params.shard_steps, batch=params.batch_size, lr=params.lr, warmup=params.warmup
        )
        opt = torch.optim.AdamW(unet.parameters(), lr=params.lr, weight_decay=0.01)
        g = torch.Generator().manual_seed(ctx.seed * 1_000 + j)
        shard_ctx = dataclasses.replace(ctx, checkpoint_dir=ctx.checkpoint_dir / f"shard_{j}")
        losses: list[float] = []
        checkpoints = TrainingCheckpoints(
            shard_ctx,
            key,
            modules={"unet": unet},
            optimizers={"adamw": opt},
            generators={"data": g},
            history={"loss": losses},
        )
        b = params.batch_size
        first = checkpoints.resume() + 1
        for step in range(first, params.shard_steps + 1):
            for group in opt.param_groups:
                group["lr"] = lr_at(step - 1, schedule, FINAL_LR_FRACTION)
            st = styles[torch.randint(len(styles), (b,), generator=g)]
            ob = torch.randint(len(OBJECTS), (b,), generator=g)
            images = render(st, ob, g, size=vae.config.sample_size)
            with torch.no_grad():
                posterior = vae.encode(images.to(device, vae.dtype)).latent_dist
                eps = torch.randn(posterior.mean.shape, generator=g).to(device, posterior.mean.dtype)
                latents = (posterior.mean + posterior.std * eps) * vae.config.scaling_factor
            idx = table.sample(st, ob, g)
            drop = torch.rand(idx.shape, generator=g) < params.cfg_dropout
            idx = torch.where(drop, torch.full_like(idx, table.empty_index), idx)
            noise = torch.randn(latents.shape, generator=g).to(device, latents.dtype)
            t = torch.randint(0, num_train_timesteps, (b,), generator=g).to(device)
            a = alphas[t].view(-1, 1, 1, 1).to(latents.dtype)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            pred = unet(noisy, t, encoder_hidden_states=embeddings[idx.to(device)]).sample
            loss = F.mse_loss(pred.float(), noise.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            checkpoints.step_done(step, params.shard_steps)
            ctx.progress(offset + step, total, loss=losses[-1], shard=j)
        unet.requires_grad_(False).eval()
        state = {k: v.detach().to("cpu", copy=True) for k, v in unet.state_dict().items()}
        tail = losses[-20:]
        return state, len(losses), (sum(tail) / len(tail) if tail else float("nan"))


class _Judge:
    """Style accuracy of the pipeline's current UNet on some styles: the MiniCanvas classifier on template-prompt
    generations of every object x ``eval_seeds``."""

    def __init__(self, pipe, params: SoupParams, ctx: RunContext) -> None:
        from generators.minicanvas.world import load_classifier

        self.pipe, self.params, self.ctx = pipe, params, ctx
        self.classifier = load_classifier(str(ctx.device))

    def accuracy(self, styles: list[str]) -> float:
        from generators.minicanvas.concepts import OBJECTS, STYLES, template_prompt
        from generators.minicanvas.world import classify
        from generators.sd import sample_sd

        pairs = [(s, o) for s in styles for o in OBJECTS]
        prompts = [template_prompt(s, o) for _ in self.params.eval_seeds for s, o in pairs]
        seeds = [seed for seed in self.params.eval_seeds for _ in pairs]
        labels = torch.tensor([STYLES.index(s) for _ in self.params.eval_seeds for s, _ in pairs])
        images = sample_sd(
            self.pipe,
            prompts,
            seeds,
            num_inference_steps=self.params.eval_steps,
            guidance_scale=self.params.eval_guidance,
        )
        style_probs, _ = classify(self.classifier, images)
        correct = (style_probs.argmax(1) == labels).float()
        per_style = {s: float(correct[labels == STYLES.index(s)].mean()) for s in styles}
        self.ctx.log(f"soup: style accuracy {', '.join(f'{s} {a:.2f}' for s, a in per_style.items())}")
        return float(correct.mean())


def _style_weighted(values: list[float], weights: list[int]) -> float:
    """Mean of per-shard accuracies weighted by each shard's number of styles (= mean over their styles)."""
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)
