"""The GAN erasure methods (Adapt-then-Unlearn, Text-to-Unlearn) on a tiny random StyleGAN2 with a stub judge and a
tiny random CLIP: the maths that could be wrong (repulsion, EWC, directional loss), what a run may change, resume,
and runs through the runner on a rosinality checkpoint path. Numbers measured here are meaningless; the machinery
is real."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor, nn

from erasure.base import ErasureResult, RunContext
from erasure.config import Target, load_job_config
from erasure.errors import UserError
from erasure.methods.adapt_then_unlearn import (
    AdaptThenUnlearnParams,
    build_judge,
    effective_gamma,
    estimate_fisher,
    ewc_parameter_names,
    ewc_penalty,
    repulsion_loss,
    repulsion_statistic,
)
from erasure.methods.text_to_unlearn import TextToUnlearnParams, directional_loss, trainable_names
from erasure.registry import get_method
from generators.stylegan2 import Discriminator, Generator

REPO = Path(__file__).resolve().parent.parent
SIZE, STYLE_DIM = 16, 16
CHANNELS = {4: 8, 8: 8, 16: 8}
CIRCLE = Target.parse("object:circle")

# Two steps of every stage, with the smallest data that exercises each path.
ATU_TINY: dict[str, Any] = {
    "adapted_models": 1, "negatives": 8, "adapt_iterations": 3, "fisher_samples": 4, "max_candidates": 256,
    "iterations": 4, "positive_candidates": 32, "batch_size": 4, "sample_batch": 16, "d_reg_every": 2,
    "g_reg_every": 2, "d_warmup": 2, "ema_half_life_steps": 1.0,
}  # fmt: skip
T2U_TINY: dict[str, Any] = {
    "iterations": 3, "batch_size": 4, "retain_batch": 4, "pool_size": 32, "sample_batch": 16, "prompts": "target",
    "neutral": ["blue"], "forget_threshold": 0.5, "retain_threshold": 0.5,
}  # fmt: skip


# ----------------------------------------------------------------------------------------------- tiny models


def tiny_generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return Generator(SIZE, STYLE_DIM, 2, channels=CHANNELS).eval()


def tiny_discriminator(seed: int = 1) -> Discriminator:
    torch.manual_seed(seed)
    return Discriminator(SIZE, channels=CHANNELS)


def redder_than_batch(images: Tensor, concept: Any = None) -> Tensor:
    """Stub judge (also used as ``judge_callable``): 'shows the target' = redder than the batch's median."""
    red = images[:, 0].float().mean(dim=(1, 2))
    return red > red.median()


class StubClassifier(nn.Module):
    """A MiniCanvas-shaped classifier (style and object logits): object 0 ('circle') for redder-than-median
    images, else object 1; it has one parameter so judges can find its device."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shows = redder_than_batch(x).float()
        objects = torch.full((len(x), 10), -10.0)
        objects[:, 0] = shows * self.scale
        objects[:, 1] = (1 - shows) * self.scale
        return torch.zeros(len(x), 12), objects


def stub_judge():
    from evaluate.judges import MiniCanvasJudge

    return MiniCanvasJudge(StubClassifier())


def build_tiny_clip(folder: Path) -> Path:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    from generators.minicanvas.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    text = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=16,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = CLIPVisionConfig(
        image_size=16,
        patch_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=16,
    )
    CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    ).save_pretrained(folder)
    images = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": 16},
        do_center_crop=True,
        crop_size={"height": 16, "width": 16},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    CLIPProcessor(image_processor=images, tokenizer=build_clip_tokenizer(16)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def rosinality_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rosinality train.py-style checkpoint: g, d, g_ema and both Adam states after one step."""
    from generators.stylegan2_io import save_rosinality_checkpoint

    g, d, g_ema = tiny_generator(2), tiny_discriminator(3), tiny_generator(4)
    g_optim = torch.optim.Adam(g.parameters(), lr=1e-3, betas=(0.0, 0.99))
    d_optim = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.0, 0.99))
    image, _ = g([torch.randn(4, STYLE_DIM)])
    (image.square().mean() + d(image.detach()).mean()).backward()
    g_optim.step()
    d_optim.step()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_rosinality_checkpoint(path, g_ema, g=g, d=d)
    data = torch.load(path, weights_only=True)
    data.update(g_optim=g_optim.state_dict(), d_optim=d_optim.state_dict())
    torch.save(data, path)
    return path


def context(
    tmp_path: Path, progress: Any = None, checkpoint_every: int = 1000, backbone_path: Path | None = None,
    log: Any = None,
) -> RunContext:  # fmt: skip
    return RunContext(
        seed=0,
        device=torch.device("cpu"),
        precision="fp32",
        checkpoint_dir=tmp_path / "checkpoints",
        checkpoint_every=checkpoint_every,
        progress=progress or (lambda step, total, **scalars: None),
        log=log or (lambda line: None),
        backbone_path=backbone_path,
    )


def atu(g: Generator, tmp_path: Path, **kwargs: Any) -> ErasureResult:
    ctx_kwargs = {
        k: kwargs.pop(k) for k in ("progress", "checkpoint_every", "backbone_path", "log") if k in kwargs
    }
    method = get_method("adapt_then_unlearn")(judge=stub_judge())
    return method.erase(
        g, CIRCLE, AdaptThenUnlearnParams(**{**ATU_TINY, **kwargs}), context(tmp_path, **ctx_kwargs)
    )


def t2u(g: Generator, tmp_path: Path, clip: Path, **kwargs: Any) -> ErasureResult:
    ctx_kwargs = {k: kwargs.pop(k) for k in ("progress", "checkpoint_every") if k in kwargs}
    params = TextToUnlearnParams(**{**T2U_TINY, "clip": str(clip), **kwargs})
    return get_method("text_to_unlearn")().erase(
        g, Target.parse("text:red"), params, context(tmp_path, **ctx_kwargs)
    )


class Killed(Exception):
    pass


def kill_at(step_to_kill: int):
    def progress(step: int, total: int, **scalars: float) -> None:
        if step == step_to_kill:
            raise Killed

    return progress


# ----------------------------------------------------------------------------------------------- repulsion


def test_repulsion_statistic_shape_scaling_and_zero_at_the_adapted_model() -> None:
    torch.manual_seed(0)
    theta = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    adapted = [{k: v + 0.1 * torch.randn_like(v) for k, v in theta.items()} for _ in range(2)]
    r = repulsion_statistic(theta, adapted)
    assert r.shape == () and r > 0
    by_hand = sum(sum((theta[n] - m[n]).pow(2).mean() for n in theta) / 2 for m in adapted) / 2 / 2
    assert torch.allclose(r, by_hand)
    # The released code's value/2*K precedence is K^2 times the average; the paper's squared L2 sums elements.
    assert torch.allclose(repulsion_statistic(theta, adapted, k_scaling="reference_code"), 4 * r)
    l2 = sum(sum((theta[n] - m[n]).pow(2).sum() for n in theta) for m in adapted) / 2 / 2
    assert torch.allclose(repulsion_statistic(theta, adapted, distance="squared_l2"), l2)
    assert repulsion_statistic(theta, [theta]) == 0


@pytest.mark.parametrize("form", ["el2", "nl2", "il2"])
def test_repulsion_forms_have_their_sign_and_their_gradient_pushes_away(form: str) -> None:
    torch.manual_seed(0)
    adapted = [{"w": torch.randn(4, 4)}]
    theta = {"w": (adapted[0]["w"] + 0.05 * torch.randn(4, 4)).requires_grad_(True)}
    r = repulsion_statistic(theta, adapted)
    loss = repulsion_loss(r, form, gamma=2.0)
    assert loss.shape == ()
    assert (loss > 0) if form in ("el2", "il2") else (loss < 0)
    (grad,) = torch.autograd.grad(loss, theta["w"])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # One gradient-descent step on the repulsion term moves away from the adapted weights.
    with torch.no_grad():
        stepped = {"w": theta["w"] - 1e-3 * grad / grad.abs().max()}
        assert repulsion_statistic(stepped, adapted) > r
    # Every form decreases as the distance grows.
    far, near = torch.tensor(0.5), torch.tensor(0.1)
    assert repulsion_loss(far, form, 2.0) < repulsion_loss(near, form, 2.0)
    if form == "el2":
        assert torch.allclose(
            repulsion_loss(torch.tensor(0.0), form, 2.0, el2_weight=100.0), torch.tensor(100.0)
        )


@pytest.mark.parametrize("form", ["el2", "nl2", "il2"])
def test_start_distance_units_read_r_over_r0_for_every_form(form: str) -> None:
    """In start-distance units each form is its absolute self evaluated at R / R0 (IL2 included: gamma R0 / R)."""
    r0 = 3e-4
    gamma = effective_gamma(form, 2.0, "start_distance", r0)
    for ratio in (1.0, 2.5):
        scaled = repulsion_loss(torch.tensor(ratio * r0, dtype=torch.float64), form, gamma)
        assert torch.allclose(scaled, repulsion_loss(torch.tensor(ratio, dtype=torch.float64), form, 2.0))
    assert effective_gamma(form, 2.0, "absolute", r0) == 2.0


# ----------------------------------------------------------------------------------------------- EWC


def test_ewc_penalty_is_zero_at_the_original_weights_and_positive_away() -> None:
    g, d = tiny_generator(), tiny_discriminator()
    names = ewc_parameter_names(g)
    assert names and all(n.startswith("convs.") for n in names)
    fisher = estimate_fisher(g, d, names, 4, 0.9, torch.Generator().manual_seed(0))
    assert set(fisher) == set(names)
    assert all((f >= 0).all() for f in fisher.values()) and sum(float(f.sum()) for f in fisher.values()) > 0
    assert all(p.grad is None for p in d.parameters())  # the estimate leaves D untouched
    params = dict(g.named_parameters())
    anchor = {n: params[n].detach().clone() for n in names}
    at_anchor = ewc_penalty(params, anchor, fisher, 5e8)
    assert at_anchor == 0
    (grad,) = torch.autograd.grad(at_anchor, params[names[0]])
    assert grad.abs().max() == 0
    moved = dict(params)
    moved.update({n: params[n].detach() + 0.01 for n in names})
    assert ewc_penalty(moved, anchor, fisher, 5e8) > 0
    moved_elsewhere = dict(params)
    moved_elsewhere["style.1.weight"] = params["style.1.weight"].detach() + 1.0  # not protected by EWC
    assert ewc_penalty(moved_elsewhere, anchor, fisher, 5e8) == 0


# ----------------------------------------------------------------------------------------------- Adapt-then-Unlearn


def test_adapt_then_unlearn_changes_only_the_generator_and_repels_it(tmp_path: Path) -> None:
    g = tiny_generator()
    before = copy.deepcopy(g.state_dict())
    lines: list[str] = []
    result = atu(g, tmp_path, repulsion="nl2", gamma=1e6, log=lines.append)
    assert set(result.changed) == {"generator"}
    changed = result.changed["generator"]
    assert set(changed) == {n for n, _ in g.named_parameters()}  # parameters only: noise/blur buffers stay
    assert all(changed[n].shape == before[n].shape for n in changed)
    assert any(not torch.equal(changed[n], before[n]) for n in changed)
    assert all(torch.equal(v, before[k]) for k, v in g.state_dict().items())  # the backbone was not touched
    metrics = result.metrics
    assert metrics["adapt0_negatives"] == 8 and metrics["positives"] > 0
    assert metrics["repulsion_R_final"] > metrics["repulsion_R_start"] > 0
    assert any("fresh one is warmed up" in line for line in lines)


def test_adapt_then_unlearn_reads_d_g_and_adam_states_from_a_rosinality_checkpoint(
    tmp_path: Path, rosinality_pt: Path
) -> None:
    from generators.stylegan2_io import load_rosinality_checkpoint

    g_ema = load_rosinality_checkpoint(rosinality_pt, load_g=False, load_d=False).g_ema
    lines: list[str] = []
    result = atu(g_ema, tmp_path, backbone_path=rosinality_pt, log=lines.append)
    assert any(f"weights from {rosinality_pt}" in line for line in lines)
    assert any("Adam states restored" in line for line in lines)
    assert not any("fresh one" in line for line in lines)
    assert set(result.changed) == {"generator"}


def test_discriminator_next_to_the_generator_and_from_a_minigan_training_folder(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from erasure.methods.adapt_then_unlearn import build_discriminator, load_gan_sources, restore_adam
    from generators.minigan import train_minigan
    from generators.stylegan2_io import save_generator_safetensors

    g, d = tiny_generator(), tiny_discriminator()
    save_generator_safetensors(g, tmp_path / "gan" / "generator.safetensors")
    assert load_gan_sources(None, tmp_path / "gan" / "generator.safetensors", print).d is None
    save_file(d.state_dict(), tmp_path / "gan" / "discriminator.safetensors")
    sources = load_gan_sources(None, tmp_path / "gan" / "generator.safetensors", print)
    loaded, pretrained = build_discriminator(sources, g)
    assert pretrained and all(torch.equal(v, d.state_dict()[k]) for k, v in loaded.state_dict().items())

    def real(n: int, generator: torch.Generator) -> Tensor:
        return torch.rand(n, 3, SIZE, SIZE, generator=generator) * 2 - 1

    train_minigan(real, tmp_path / "train", size=SIZE, steps=1, batch=4, channels=8, style_dim=STYLE_DIM,
                  n_mlp=2, progress=False, export_dtype=None)  # fmt: skip
    sources = load_gan_sources(str(tmp_path / "train"), None, print)
    trained_d, pretrained = build_discriminator(sources, tiny_generator())
    assert pretrained and sources.g is not None
    adam = torch.optim.Adam(trained_d.parameters())
    assert restore_adam(adam, sources.d_optim) and len(adam.state_dict()["state"]) > 0
    with pytest.raises(UserError, match="is for 16 px"):
        build_discriminator(sources, Generator(8, STYLE_DIM, 2, channels={4: 8, 8: 8}))


def test_adapt_then_unlearn_resumes_bit_identical_after_kills_in_both_stages(tmp_path: Path) -> None:
    params = {"adapted_models": 2, "adapt_iterations": 3, "iterations": 5, "gamma_units": "start_distance"}
    uninterrupted = atu(tiny_generator(), tmp_path / "a", **params)
    # Steps 1-3: adapted model 0, 4-6: adapted model 1, 7-11: unlearning. Checkpoints every 2 steps of a stage.
    for kill in (5, 10):
        with pytest.raises(Killed):
            atu(tiny_generator(), tmp_path / "b", progress=kill_at(kill), checkpoint_every=2, **params)
    checkpoints = tmp_path / "b" / "checkpoints"
    assert (checkpoints / "adapted_0.safetensors").is_file() and (
        checkpoints / "adapted_1.safetensors"
    ).is_file()
    assert (checkpoints / "unlearn" / "training_state.safetensors").is_file()
    steps: list[int] = []
    resumed = atu(
        tiny_generator(),
        tmp_path / "b",
        progress=lambda s, t, **k: steps.append(s),
        checkpoint_every=2,
        **params,
    )
    assert steps[0] == 11  # stage 1 came from its files, unlearning steps 1-4 from the checkpoint
    for name, tensor in uninterrupted.changed["generator"].items():
        assert torch.equal(tensor, resumed.changed["generator"][name]), name


def test_adapted_cache_is_shared_by_runs_that_differ_only_in_stage_two(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first_steps: list[int] = []
    first = atu(tiny_generator(), tmp_path / "a", adapted_cache=str(cache), gamma=1.0,
                progress=lambda s, t, **k: first_steps.append(s))  # fmt: skip
    assert first_steps[0] == 1 and len(list(cache.glob("adapted-*.safetensors"))) == 1

    # Another gamma and repulsion form, another run folder: stage 1 comes from the cache.
    steps: list[int] = []
    lines: list[str] = []
    second = atu(tiny_generator(), tmp_path / "b", adapted_cache=str(cache), gamma=5.0, repulsion="nl2",
                 progress=lambda s, t, **k: steps.append(s), log=lines.append)  # fmt: skip
    assert steps[0] == ATU_TINY["adapt_iterations"] + 1
    assert any("loaded from" in line and str(cache) in line for line in lines)
    assert (tmp_path / "b" / "checkpoints" / "adapted_0.safetensors").is_file()
    assert first.metrics["adapt0_negatives"] == second.metrics["adapt0_negatives"]
    # ... and the same stage 1 with that gamma computed from scratch gives the same erased generator.
    fresh = atu(tiny_generator(), tmp_path / "c", gamma=5.0, repulsion="nl2")
    for name, tensor in fresh.changed["generator"].items():
        assert torch.equal(tensor, second.changed["generator"][name]), name

    # A stage-1 field (the learning rate) or other generator weights: adapted again, a second cache entry.
    steps.clear()
    atu(tiny_generator(), tmp_path / "d", adapted_cache=str(cache), lr=1e-3, progress=lambda s, t, **k: steps.append(s))
    assert steps[0] == 1 and len(list(cache.glob("adapted-*.safetensors"))) == 2
    steps.clear()
    atu(tiny_generator(seed=1), tmp_path / "e", adapted_cache=str(cache), progress=lambda s, t, **k: steps.append(s))
    assert steps[0] == 1 and len(list(cache.glob("adapted-*.safetensors"))) == 3


def test_judges_auto_minicanvas_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evaluate.judges import FunctionJudge, MiniCanvasJudge
    from generators.minicanvas.models import MiniClassifier
    from generators.minicanvas.paths import WORLD_ENV_VAR

    MiniClassifier(width=4, feature_dim=16).save(tmp_path / "world" / "classifier")
    monkeypatch.setenv(WORLD_ENV_VAR, str(tmp_path / "world"))
    ctx = context(tmp_path)
    assert isinstance(build_judge(AdaptThenUnlearnParams(), CIRCLE, ctx), MiniCanvasJudge)
    with pytest.raises(UserError, match="needs a judge"):
        build_judge(AdaptThenUnlearnParams(), Target.parse("text:eyeglasses"), ctx)
    judge = build_judge(
        AdaptThenUnlearnParams(judge="callable", judge_callable="test_methods_gan:redder_than_batch"),
        CIRCLE,
        ctx,
    )
    assert isinstance(judge, FunctionJudge)
    assert judge.shows(torch.rand(8, 3, 4, 4) * 2 - 1, CIRCLE).sum() == 4
    with pytest.raises(ValueError, match="judge_checkpoint"):
        AdaptThenUnlearnParams(judge="timm")
    with pytest.raises(ValueError, match="multiple of 4"):
        AdaptThenUnlearnParams(batch_size=6)


# ----------------------------------------------------------------------------------------------- Text-to-Unlearn


def test_directional_loss_is_one_minus_cosine() -> None:
    e_f = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    direction = torch.nn.functional.normalize(torch.randn(8), dim=0)
    along = torch.nn.functional.normalize(e_f + 0.5 * direction, dim=-1)
    against = torch.nn.functional.normalize(e_f - 0.5 * direction, dim=-1)
    assert directional_loss(along, e_f, direction) < 1 < directional_loss(against, e_f, direction)
    assert math.isclose(float(directional_loss(e_f, e_f, direction)), 1.0)  # no edit yet: cos = 0


def test_text_to_unlearn_lowers_the_directional_loss_and_trains_only_the_synthesis(
    tmp_path: Path, tiny_clip: Path
) -> None:
    g = tiny_generator()
    before = copy.deepcopy(g.state_dict())
    losses: list[float] = []
    result = t2u(g, tmp_path, tiny_clip, iterations=25, lr=0.01,
                 progress=lambda step, total, **s: losses.append(s["direction"]))  # fmt: skip
    assert math.isclose(losses[0], 1.0, abs_tol=1e-4)  # the twins start identical
    assert result.metrics["direction_loss_last"] < result.metrics["direction_loss_first"] - 0.05
    assert set(result.changed) == {"generator"}
    changed = result.changed["generator"]
    assert set(changed) == set(trainable_names(g, "synthesis"))
    assert not any(n.startswith(("style.", "to_rgb")) for n in changed)  # NADA: mapping and ToRGBs frozen
    assert any(not torch.equal(changed[n], before[n]) for n in changed)
    assert all(torch.equal(v, before[k]) for k, v in g.state_dict().items())
    assert result.metrics["forget_latents"] > 0 and result.metrics["retain_latents"] > 0


def test_directional_loss_floor_bounds_the_gradient_of_a_zero_edit() -> None:
    """The twins start identical: a zero edit must not produce a ~1/eps gradient (it froze Adam before)."""
    e_f = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    direction = torch.nn.functional.normalize(torch.randn(8), dim=0)
    e_t = e_f.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(directional_loss(e_t, e_f, direction, norm_floor=0.05), [e_t])
    assert 0 < float(grad.norm()) <= 1 / 0.05
    long_edit = e_f + 0.5 * direction
    assert math.isclose(float(directional_loss(long_edit, e_f, direction, 0.05)),
                        float(directional_loss(long_edit, e_f, direction)), rel_tol=1e-6)  # fmt: skip


def test_text_to_unlearn_keeps_training_after_the_first_step(tmp_path: Path, tiny_clip: Path) -> None:
    """Later steps move the weights too: with a frozen optimiser the change stays at one step's size."""
    g = tiny_generator()
    before = g.state_dict()
    lr_step = 0.002 * 4 / 5

    def moved(iterations: int, folder: str) -> float:
        changed = t2u(g, tmp_path / folder, tiny_clip, iterations=iterations, lr=0.002).changed["generator"]
        return max(float((v - before[k]).abs().max()) for k, v in changed.items())

    assert moved(1, "one") <= lr_step * 1.01
    assert moved(12, "twelve") > 3 * lr_step


def test_text_to_unlearn_resumes_bit_identical(tmp_path: Path, tiny_clip: Path) -> None:
    uninterrupted = t2u(tiny_generator(), tmp_path / "a", tiny_clip, iterations=5, direction="image")
    with pytest.raises(Killed):
        t2u(tiny_generator(), tmp_path / "b", tiny_clip, iterations=5, direction="image",
            progress=kill_at(3), checkpoint_every=2)  # fmt: skip
    steps: list[int] = []
    resumed = t2u(tiny_generator(), tmp_path / "b", tiny_clip, iterations=5, direction="image",
                  progress=lambda s, t, **k: steps.append(s), checkpoint_every=2)  # fmt: skip
    assert steps[0] == 3
    for name, tensor in uninterrupted.changed["generator"].items():
        assert torch.equal(tensor, resumed.changed["generator"][name]), name


def test_text_to_unlearn_needs_a_clip_off_minicanvas(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="needs a CLIP"):
        get_method("text_to_unlearn")().erase(
            tiny_generator(), Target.parse("text:red"), TextToUnlearnParams(), context(tmp_path)
        )


# ----------------------------------------------------------------------------------------------- runner and configs


@pytest.mark.parametrize("method", ["adapt_then_unlearn", "text_to_unlearn"])
def test_runner_erases_from_a_rosinality_checkpoint_path(
    method: str, tmp_path: Path, rosinality_pt: Path, tiny_clip: Path
) -> None:
    from erasure.runner import run_erase
    from generators.loading import load_backbone
    from generators.registry import resolve_backbone

    if method == "adapt_then_unlearn":
        params = {**ATU_TINY, "judge": "callable", "judge_callable": "test_methods_gan:redder_than_batch"}
    else:
        params = {**T2U_TINY, "clip": str(tiny_clip)}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "name": "gan-job", "backbone": str(rosinality_pt), "device": "cpu", "target": "text:red",
        "method": {"name": method, "params": params},
    }))  # fmt: skip
    run = run_erase(load_job_config(config), tmp_path / "run", echo=lambda line: None)
    from safetensors.torch import load_file

    saved = load_file(run / "weights" / "generator.safetensors")
    original = load_backbone(resolve_backbone(str(rosinality_pt)), torch.device("cpu"), "fp32").state_dict()
    assert saved and all(saved[k].shape == original[k].shape for k in saved)
    assert any(not torch.equal(saved[k], original[k]) for k in saved)


@pytest.mark.parametrize("name", ["adapt_then_unlearn", "text_to_unlearn"])
def test_shipped_gan_configs_target_an_object_and_evaluate_the_gan_suite(name: str) -> None:
    job = load_job_config(REPO / "configs" / "jobs" / f"{name}.yaml")
    assert job.method.name == name and job.backbone == "minicanvas-gan"
    assert job.target.kind == "object" and job.evaluate.suites == ["gan"] and job.evaluate.tier == "full"
