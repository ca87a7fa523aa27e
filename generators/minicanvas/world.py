"""``world build`` and ``world verify``: train the MiniCanvas world from scratch and prove it works.

Layout of a world folder (``paths.world_dir()``)::

    classifier/        config.json + model.safetensors  (style/object judge, FID features)
    clip/              a transformers CLIPModel folder + CLIPImageProcessor + CLIPTokenizer (MiniCLIP)
    sd/                a diffusers StableDiffusionPipeline folder (MiniSD)
    soup_base/         Diffusion Soup's base: a MiniSD UNet trained without the soup shards' styles (soup.py)
    gan/               generator.safetensors (MiniGAN g_ema, StyleGAN2) + discriminator.safetensors (its D)
    build_info.json    settings, device, processor, versions and wall time of every stage

Each stage's folder is written under a temporary name and renamed into place when complete; training
state lives in a separate work folder (``.world-build/`` by default) so an interrupted build resumes.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from erasure.envinfo import cpu_info

from .models import TEXT_MAX_LENGTH, MiniClassifier, projected
from .paths import world_dir

STAGES = ("classifier", "clip", "sd", "sd_text", "soup", "gan")
# MiniCLIP vision layers the MiniGAN's feature discriminator reads (hidden_states indices; the tower has 3 layers).
GAN_FEATURE_LAYERS = (1, 2, 3)
# A stage's folder, where it is not the stage's name (sd_text republishes MiniSD with its tuned text encoder).
STAGE_FOLDERS = {"soup": "soup_base", "sd_text": "sd"}
SHARD_SIZE = "6MB"  # shipped weight files stay small (the UNet is sharded)
DEFAULT_WORK_DIR = Path(".world-build")

# MiniSD's sampler defaults (DDIM): the evaluator's "quick" tier and the UI use these.
SD_STEPS = 25
SD_GUIDANCE = 5.0


# ----------------------------------------------------------------------------------------------- loading
def load_classifier(device: str = "cpu", root: Path | None = None) -> MiniClassifier:
    return MiniClassifier.load((root or world_dir()) / "classifier", device)


def load_clip(device: str = "cpu", root: Path | None = None):
    """``(model, processor)``: MiniCLIP as a transformers ``CLIPModel`` and its ``CLIPProcessor``."""
    from transformers import CLIPModel, CLIPProcessor

    folder = (root or world_dir()) / "clip"
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    return model.to(device).eval(), processor


def load_minisd(device: str = "cpu", root: Path | None = None):
    from ..sd import load_sd_pipeline

    return load_sd_pipeline((root or world_dir()) / "sd", device)


def _caption_embeddings(clip, processor, device) -> torch.Tensor:
    """MiniCLIP's projected embeddings of the template caption of every (style, object), style-major."""
    from . import concepts
    from .concepts import OBJECTS, STYLES

    captions = [concepts.template_prompt(s, o) for s in STYLES for o in OBJECTS]
    text = processor.tokenizer(captions, padding="max_length", max_length=TEXT_MAX_LENGTH,
                               return_tensors="pt").to(device)
    return projected(clip.get_text_features(**text))


# ----------------------------------------------------------------------------------------------- building
@torch.no_grad()
def _zero_shot_labels(root: Path):
    """MiniCLIP as a frozen zero-shot (style, object) labeller for the MiniGAN's label-coverage term."""
    from ..label_coverage import ZeroShotLabels
    from .concepts import OBJECTS, STYLES

    if not (root / "clip").is_dir():
        raise FileNotFoundError(f"the MiniGAN's label-coverage term reads MiniCLIP: build it into {root} first "
                                f"(`erasure-studio world build --only clip`)")
    clip, processor = load_clip("cpu", root)
    text_embeds = _caption_embeddings(clip, processor, "cpu")
    caption = torch.arange(len(STYLES) * len(OBJECTS))  # caption s * len(OBJECTS) + o is (style s, object o)
    labels = {"style": caption // len(OBJECTS), "object": caption % len(OBJECTS)}
    return ZeroShotLabels(clip.vision_model, clip.visual_projection, text_embeds, labels,
                          float(clip.logit_scale.exp()), processor.image_processor.image_mean,
                          processor.image_processor.image_std)


def _adversarial_classifier(settings, pretrain: bool = True):
    """CatGAN's classifier for the MiniGAN's label-coverage term (initialised from the GAN's seed, then
    ``gan_classifier_pretrain_steps`` on real images when ``pretrain``) and the labelled real-image sampler of the
    game (the same image stream as the plain GAN's sampler)."""
    from ..label_coverage import LabelClassifier, pretrain_classifier
    from .concepts import OBJECTS, STYLES
    from .dataset import IMAGE_SIZE, sample_batch

    with torch.random.fork_rng():
        torch.manual_seed(settings.gan_seed)
        classifier = LabelClassifier({"style": len(STYLES), "object": len(OBJECTS)}, size=IMAGE_SIZE,
                                     width=settings.gan_classifier_width)

    def sample_labelled(n: int, generator: torch.Generator):
        images, style, obj = sample_batch(n, generator)
        return images, {"style": style, "object": obj}

    if pretrain and settings.gan_classifier_pretrain_steps > 0:
        pretrain_classifier(classifier, sample_labelled, settings.gan_classifier_pretrain_steps,
                            seed=settings.gan_seed + 1)
    return classifier, sample_labelled


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def _publish(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the complete folder ``tmp`` (rename: never a half-written stage folder)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _require_minisd(root: Path, stage: str) -> None:
    if not (root / "sd" / "model_index.json").is_file():
        from erasure.errors import UserError

        raise UserError(f"the {stage} stage needs MiniSD: build the sd stage into {root} first "
                        f"(`erasure-studio world build --only sd`)")


def _tmp_dir(root: Path, name: str) -> Path:
    tmp = root / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _half(module: torch.nn.Module) -> torch.nn.Module:
    """fp16 copy for shipping: the world's weights are stored in half precision (loaded back as fp32)."""
    import copy

    return copy.deepcopy(module).to(torch.float16)


def _load_as_fp32(config_path: Path) -> None:
    """Weights stay fp16 on disk, but plain ``from_pretrained`` should give fp32 models (as diffusers does
    for the UNet and VAE): transformers reads the load dtype from the config's ``dtype``."""
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2))


def image_processor():
    from transformers import CLIPImageProcessor

    # Images are 32 px in [0, 255]; rescaled to [0, 1] and normalised to [-1, 1], as the models were trained.
    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": 32}, do_center_crop=True, crop_size={"height": 32, "width": 32},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
    )


def build(
    only: Iterable[str] | None = None,
    device: str = "cpu",
    resume: bool = True,
    out_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    settings=None,
    continue_gan: bool = False,
) -> dict:
    """Train the world (all stages, or ``only`` those named) and publish it to ``out_dir``.

    ``continue_gan``: when the GAN's work folder holds no checkpoint (a fresh checkout), continue training from the
    published ``gan/`` instead of from scratch (weights only; see :func:`generators.minigan.train_minigan`).
    """
    from .tokenizer import build_clip_tokenizer
    from .train import (
        LOOP_SECONDS,
        WorldSettings,
        text_encoder_from_clip,
        train_classifier,
        train_clip,
        train_unet,
        train_vae,
    )

    stages = list(only) if only else list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown world stage(s) {unknown}; allowed: {', '.join(STAGES)}")
    settings = settings or WorldSettings()
    root = Path(out_dir) if out_dir else world_dir()
    work = Path(work_dir) if work_dir else DEFAULT_WORK_DIR
    root.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    info_path = root / "build_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {"stages": {}}
    tokenizer = build_clip_tokenizer(TEXT_MAX_LENGTH)

    for stage in STAGES:
        if stage not in stages:
            continue
        t0 = time.time()
        LOOP_SECONDS.clear()
        tmp = _tmp_dir(root, stage)
        if stage == "classifier":
            model = train_classifier(work, settings, device, resume)
            _half(model).save(tmp)
        elif stage == "clip":
            from transformers import CLIPProcessor

            clip = train_clip(work, tokenizer, settings, device, resume)
            _half(clip).save_pretrained(tmp)
            _load_as_fp32(tmp / "config.json")
            CLIPProcessor(image_processor=image_processor(), tokenizer=tokenizer).save_pretrained(tmp)
        elif stage == "sd":
            from diffusers import DDIMScheduler, StableDiffusionPipeline

            clip, _ = load_clip(device, root)
            text_encoder = text_encoder_from_clip(clip)
            vae = train_vae(work, settings, device, resume)
            unet = train_unet(work, vae, text_encoder, tokenizer, settings, device, resume)
            from .train import sd_noise_schedule

            scheduler = DDIMScheduler(**sd_noise_schedule(), clip_sample=False, set_alpha_to_one=False,
                                      steps_offset=1)
            pipe = StableDiffusionPipeline(
                vae=_half(vae), text_encoder=_half(text_encoder), tokenizer=tokenizer, unet=_half(unet),
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
            pipe.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
            _load_as_fp32(tmp / "text_encoder" / "config.json")
        elif stage == "sd_text":
            from .text_robustness import tune_text_robustness

            _require_minisd(root, stage)
            clip, _ = load_clip(device, root)
            # Tuned from MiniCLIP's tower (what MiniSD's UNet was trained on), never from the published, tuned copy.
            tuned = tune_text_robustness(text_encoder_from_clip(clip), work, tokenizer, settings, device, resume)
            shutil.copytree(root / "sd", tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("text_encoder"))
            _half(tuned).save_pretrained(tmp / "text_encoder", max_shard_size=SHARD_SIZE)
            _load_as_fp32(tmp / "text_encoder" / "config.json")
        elif stage == "soup":
            from .soup import save_soup_base, train_soup_base

            _require_minisd(root, stage)
            minisd = load_minisd(device, root)
            # Trained, like MiniSD's UNet, on MiniCLIP's tower (the text encoder before stage sd_text).
            clip, _ = load_clip(device, root)
            unet = train_soup_base(work, minisd.vae, text_encoder_from_clip(clip), minisd.tokenizer,
                                   minisd.unet.config, settings, device, resume)
            save_soup_base(_half(unet), tmp, settings, SHARD_SIZE)
        elif stage == "gan":
            from safetensors.torch import save_file

            from ..minigan import (
                PUBLISHED_DISCRIMINATOR,
                PUBLISHED_GENERATOR,
                load_training_checkpoint_discriminator_state,
                read_checkpoint_sidecar,
                train_minigan,
            )
            from ..stylegan2_io import save_generator_safetensors
            from .dataset import sample_images

            published = root / STAGE_FOLDERS.get(stage, stage)
            features = None
            if settings.gan_feature_d_weight > 0:
                from ..feature_discriminator import CLIPPatchFeatures

                if not (root / "clip").is_dir():
                    raise FileNotFoundError(f"the MiniGAN's feature discriminator reads MiniCLIP: build it into "
                                            f"{root} first (`erasure-studio world build --only clip`)")
                clip, processor = load_clip("cpu", root)
                features = CLIPPatchFeatures(clip.vision_model, processor.image_processor.image_mean,
                                             processor.image_processor.image_std, layers=GAN_FEATURE_LAYERS)
            labels = classifier = sample_labelled = None
            if settings.gan_coverage_weight > 0 and settings.gan_coverage_labeller == "frozen":
                labels = _zero_shot_labels(root)
            elif settings.gan_coverage_weight > 0:
                # A checkpoint in the work folder restores the classifier: its head start is then not repeated.
                fresh = read_checkpoint_sidecar(work / "gan") is None
                classifier, sample_labelled = _adversarial_classifier(settings, pretrain=fresh)
            g_ema = train_minigan(lambda n, gen: sample_images(n, gen), work / "gan", device=device,
                                  seed=settings.gan_seed, steps=settings.gan_steps, batch=settings.gan_batch,
                                  channels=settings.gan_channels, checkpoint_every=settings.checkpoint_every,
                                  r1=settings.gan_r1, path_regularize=settings.gan_path_regularize,
                                  mixing=settings.gan_mixing, continue_from=published if continue_gan else None,
                                  features=features, feature_d_weight=settings.gan_feature_d_weight,
                                  labels=labels, coverage_weight=settings.gan_coverage_weight,
                                  coverage_from_step=settings.gan_coverage_from_step,
                                  coverage_marginal=settings.gan_coverage_marginal,
                                  classifier=classifier, sample_labelled=sample_labelled)
            sidecar = read_checkpoint_sidecar(work / "gan") or {}
            LOOP_SECONDS["minigan"] = float(sidecar.get("train_seconds", 0.0))
            provenance = {"step": str(sidecar.get("step", settings.gan_steps))}
            if sidecar.get("warm_start_step") is not None:
                provenance["continued_from_published_step"] = str(sidecar["warm_start_step"])
            save_generator_safetensors(g_ema, tmp / PUBLISHED_GENERATOR, dtype=torch.float16,
                                       extra_metadata=provenance)
            d_state = load_training_checkpoint_discriminator_state(work / "gan")
            save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in d_state.items()},
                      str(tmp / PUBLISHED_DISCRIMINATOR))
        _publish(tmp, root / STAGE_FOLDERS.get(stage, stage))
        # "seconds": this invocation; "train_seconds": each training loop's cumulative time over every process
        # that worked on it (a build resumed across sessions reports its whole cost there).
        info["stages"][stage] = {"seconds": round(time.time() - t0, 1), "device": device,
                                 "train_seconds": {k: round(v, 1) for k, v in LOOP_SECONDS.items()},
                                 "settings": settings.model_dump(), "versions": _versions(),
                                 "cpu": cpu_info()}
        tmp_info = info_path.with_suffix(".json.tmp")
        tmp_info.write_text(json.dumps(info, indent=2))
        os.replace(tmp_info, info_path)
    return info


# ----------------------------------------------------------------------------------------------- verifying
HELDOUT_SEED = 20_240_611  # never used by training streams
# tier -> (seeds per (style, object) pair, real images, GAN samples, DDIM steps)
VERIFY_TIERS = {"full": (2, 2400, 2000, SD_STEPS), "quick": (1, 1200, 500, SD_STEPS), "smoke": (1, 240, 100, 4)}


@torch.no_grad()
def classify(classifier: MiniClassifier, images: torch.Tensor, batch_size: int = 512):
    """``(style_probs, object_probs)`` for images in ``[-1, 1]``."""
    device = next(classifier.parameters()).device
    ps, po = [], []
    for i in range(0, len(images), batch_size):
        ls, lo = classifier(images[i : i + batch_size].to(device))
        ps.append(ls.softmax(-1).cpu())
        po.append(lo.softmax(-1).cpu())
    return torch.cat(ps), torch.cat(po)


def _heldout_real(n: int, seed: int = HELDOUT_SEED):
    from .dataset import sample_batch

    g = torch.Generator().manual_seed(seed)
    return sample_batch(n, g)


@torch.no_grad()
def verify(tier: str = "full", device: str = "cpu", root: Path | None = None) -> dict:
    """Measure the world: judge accuracy, MiniCLIP retrieval, MiniSD (and MiniGAN) quality.

    ``tier``: ``full`` (what the thresholds are judged on) uses 2 seeds per (style, object) pair, 2,400 real
    images and 2,000 GAN samples; ``quick`` 1 seed, 1,200 real, 500 GAN samples; ``smoke`` (tests of the
    machinery) a 4-step sampler, 240 real images and 100 GAN samples.
    """
    from evaluate.fid import classifier_fid

    from ..sd import sample_sd
    from . import concepts
    from .concepts import OBJECTS, STYLES
    from .dataset import grid_labels

    root = root or world_dir()
    if tier not in VERIFY_TIERS:
        raise ValueError(f"unknown tier {tier!r}; allowed: {', '.join(VERIFY_TIERS)}")
    seeds_per_pair, n_real, n_gan, steps = VERIFY_TIERS[tier]
    report: dict = {"tier": tier, "device": device}
    t_start = time.time()

    classifier = load_classifier(device, root)
    real, rs, ro = _heldout_real(n_real)
    ps, po = classify(classifier, real)
    report["classifier_style_acc"] = float((ps.argmax(1) == rs).float().mean())
    report["classifier_object_acc"] = float((po.argmax(1) == ro).float().mean())

    clip, processor = load_clip(device, root)
    text_emb = torch.nn.functional.normalize(_caption_embeddings(clip, processor, device), dim=-1)
    img_emb = torch.cat([projected(clip.get_image_features(pixel_values=real[i : i + 512].to(device)))
                         for i in range(0, len(real), 512)])
    img_emb = torch.nn.functional.normalize(img_emb, dim=-1)
    predicted = (img_emb @ text_emb.T).argmax(1).cpu()
    report["clip_top1"] = float((predicted == rs * len(OBJECTS) + ro).float().mean())

    sd_root = root / "sd"
    if (sd_root / "model_index.json").exists():
        pipe = load_minisd(device, root)
        s_idx, o_idx = grid_labels(seeds_per_pair)
        prompts = [concepts.template_prompt(STYLES[s], OBJECTS[o]) for s, o in zip(s_idx, o_idx)]
        seeds = list(range(len(prompts)))
        fake = sample_sd(pipe, prompts, seeds, num_inference_steps=steps, guidance_scale=SD_GUIDANCE)
        fs, fo = classify(classifier, fake)
        report["sd_style_acc"] = float((fs.argmax(1) == s_idx).float().mean())
        report["sd_object_acc"] = float((fo.argmax(1) == o_idx).float().mean())
        report["sd_object_acc_by_object"] = accuracy_by_label(fo.argmax(1), o_idx, OBJECTS)
        report["sd_object_confusions"] = top_confusions(fo.argmax(1), o_idx, OBJECTS)

        s_p, o_p = grid_labels(1)
        para = [concepts.HELDOUT_PARAPHRASES[k % 2].format(style=STYLES[s], object=OBJECTS[o])
                for k, (s, o) in enumerate(zip(s_p, o_p))]
        fake_p = sample_sd(pipe, para, [10_000 + k for k in range(len(para))], num_inference_steps=steps,
                           guidance_scale=SD_GUIDANCE)
        ps_p, po_p = classify(classifier, fake_p)
        report["sd_paraphrase_style_acc"] = float((ps_p.argmax(1) == s_p).float().mean())
        report["sd_paraphrase_object_acc"] = float((po_p.argmax(1) == o_p).float().mean())
        report["sd_paraphrase_object_acc_by_object"] = accuracy_by_label(po_p.argmax(1), o_p, OBJECTS)
        report["sd_fid"] = classifier_fid(classifier, real, fake)

        # The same pipeline with a freshly initialised UNet: the floor any trained generator must beat.
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        pipe.unet = UNet2DConditionModel.from_config(pipe.unet.config).to(device)
        random_fake = sample_sd(pipe, prompts, seeds, num_inference_steps=steps, guidance_scale=SD_GUIDANCE)
        report["sd_random_fid"] = classifier_fid(classifier, real, random_fake)
        report["sd_samples"] = len(fake)

    gan_path = root / "gan" / "generator.safetensors"
    if gan_path.exists():
        report.update(verify_gan(classifier, real, gan_path, n_gan, device))
    report["seconds"] = round(time.time() - t_start, 1)
    report["checks"] = check_thresholds(report)
    report["passed"] = all(report["checks"].values())
    return report


def accuracy_by_label(predicted: torch.Tensor, truth: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Accuracy per true label (diagnostics next to the headline accuracy; not judged)."""
    return {name: round(float((predicted[truth == k] == k).float().mean()), 4)
            for k, name in enumerate(names) if bool((truth == k).any())}


def top_confusions(predicted: torch.Tensor, truth: torch.Tensor, names: list[str], top: int = 5) -> list[dict]:
    """The most frequent (true -> predicted) mistakes, with their share of that true label's samples."""
    wrong = predicted != truth
    ranked = Counter(zip(truth[wrong].tolist(), predicted[wrong].tolist())).most_common(top)
    return [{"true": names[t], "predicted": names[p], "share": round(n / int((truth == t).sum()), 4)}
            for (t, p), n in ranked]


# The bars the world must clear (issues "MiniCanvas" and "StyleGAN2/MiniGAN"); judged on the full tier.
THRESHOLDS_MIN = {
    "classifier_style_acc": 0.98, "classifier_object_acc": 0.98, "clip_top1": 0.90,
    "sd_style_acc": 0.90, "sd_object_acc": 0.90,
    "sd_paraphrase_style_acc": 0.75, "sd_paraphrase_object_acc": 0.75,
    "gan_confident_frac": 0.80,
}
THRESHOLDS_MAX = {"gan_object_tv": 0.25, "gan_style_tv": 0.25}


def check_thresholds(report: dict) -> dict[str, bool]:
    checks = {k: report[k] >= v for k, v in THRESHOLDS_MIN.items() if k in report}
    checks.update({k: report[k] <= v for k, v in THRESHOLDS_MAX.items() if k in report})
    for prefix in ("sd", "gan"):
        if f"{prefix}_fid" in report:
            checks[f"{prefix}_fid_x10_le_random"] = report[f"{prefix}_fid"] * 10 <= report[f"{prefix}_random_fid"]
    return checks


@torch.no_grad()
def verify_gan(classifier, real, gan_path: Path, n: int, device: str) -> dict:
    from evaluate.fid import classifier_fid

    from ..stylegan2_io import load_generator_safetensors

    g = load_generator_safetensors(gan_path, device=device).eval()
    gen = torch.Generator(device).manual_seed(HELDOUT_SEED)
    z = torch.randn(n, g.style_dim, generator=gen, device=device)
    fake = torch.cat([g([z[i : i + 250]], randomize_noise=False)[0].clamp(-1, 1).cpu() for i in range(0, n, 250)])
    ps, po = classify(classifier, fake)
    out = {}
    for key, probs in (("style", ps), ("object", po)):
        k = probs.shape[1]
        share = torch.bincount(probs.argmax(1), minlength=k).float() / n
        out[f"gan_{key}_tv"] = float(0.5 * (share - 1 / k).abs().sum())
    out["gan_confident_frac"] = float(((ps.max(1).values >= 0.9) & (po.max(1).values >= 0.9)).float().mean())
    out["gan_fid"] = classifier_fid(classifier, real, fake)
    torch.manual_seed(0)
    random_g = type(g).from_config(g.config).to(device).eval()
    random_fake = torch.cat([random_g([z[i : i + 250]], randomize_noise=False)[0].clamp(-1, 1).cpu()
                             for i in range(0, n, 250)])
    out["gan_random_fid"] = classifier_fid(classifier, real, random_fake)
    out["gan_samples"] = n
    return out
