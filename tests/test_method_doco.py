"""DoCo (erasure/methods/doco.py) and the gradient surgery it uses (erasure/gradient_surgery.py), on the tiny random
SD pipeline of tests/tiny_sd.py."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from erasure.base import RunContext
from erasure.config import Target
from erasure.gradient_surgery import clip_total_norm, grad_dot, grad_norm, project_conflicting
from erasure.methods.doco import PatchDiscriminator, adversarial_loss, discriminator_loss
from erasure.param_sets import unet_parameter_names
from erasure.registry import get_method

TARGET = Target.parse("style:lower")
RETAIN = ["newer", "wider", "low"]
SMALL: dict[str, Any] = {
    "iterations": 4,
    "warmup": 1,
    "batch_size": 2,
    "retain_batch": 2,
    "ddim_steps": 3,
    "trajectories": 4,
    "retain_trajectories": 3,
    "disc_width": 8,
    "prompts": "target",
    "retain_prompts": RETAIN,
}


# ---------------------------------------------------------------------------------------------- gradient surgery


def test_conflicting_gradients_are_projected_exactly() -> None:
    g_u = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])]
    g_r = [torch.tensor([-1.0, 1.0]), torch.tensor([3.0])]
    result = project_conflicting(g_u, g_r, form="pcgrad", scope="tensor")
    # first tensor: <u,r> = -1, |r|^2 = 2 -> u + r/2 = [0.5, 0.5]; second: <u,r> = 6 > 0, untouched
    assert result.grads[0].tolist() == [0.5, 0.5]
    assert result.grads[1] is g_u[1]
    assert (result.groups, result.projected) == (2, 1)
    assert float(torch.dot(result.grads[0], g_r[0])) == pytest.approx(0.0, abs=1e-7)
    assert g_u[0].tolist() == [1.0, 0.0]  # inputs are not modified
    # globally: <u,r> = -1 + 6 = 5 > 0, nothing to do
    assert project_conflicting(g_u, g_r, scope="global").projected == 0


def test_reference_form_subtracts_the_cosine_times_the_unit_retain_gradient() -> None:
    u, r = torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 1.0])
    cosine = -3.0 / (3.0 * 2**0.5)
    expected = u - cosine * r / 2**0.5
    result = project_conflicting([u], [r], form="doco", strength=1.0)
    torch.testing.assert_close(result.grads[0], expected)
    half = project_conflicting([u], [r], form="doco", strength=0.5)
    torch.testing.assert_close(half.grads[0], u - 0.5 * cosine * r / 2**0.5)


def test_non_conflicting_and_missing_gradients_are_untouched() -> None:
    g_u = [torch.tensor([1.0, 2.0]), None, torch.tensor([1.0]), torch.tensor([5.0, 5.0])]
    g_r = [torch.tensor([0.5, 0.1]), torch.tensor([1.0]), None, torch.zeros(2)]
    for scope in ("tensor", "global"):
        result = project_conflicting(g_u, g_r, scope=scope)
        assert result.projected == 0
        assert all(a is b for a, b in zip(result.grads, g_u))
    with pytest.raises(ValueError, match="length"):
        project_conflicting(g_u, g_r[:2])


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("form", ["pcgrad", "doco"])
def test_surgery_result_is_orthogonal_or_positive_to_the_retain_gradient(form: str, scope: str) -> None:
    generator = torch.Generator().manual_seed(0)
    conflicts = 0
    for _ in range(50):
        g_u = [torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)]
        g_r = [torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)]
        if form == "doco":  # the reference form is meant for clipped gradients (|g_u| <= 1)
            g_u = clip_total_norm(g_u, 1.0)
        result = project_conflicting(g_u, g_r, form=form, scope=scope)
        conflicts += result.projected
        groups = zip(result.grads, g_r) if scope == "tensor" else [(result.grads, g_r)]
        for out, r in groups:
            out, r = ([out], [r]) if scope == "tensor" else (out, r)
            assert float(grad_dot(out, r)) >= -1e-5
        if form == "pcgrad" and result.projected:
            # the projection removes only the conflicting part: what is left along g_u's own direction shrinks
            assert float(grad_norm(result.grads)) <= float(grad_norm(g_u)) + 1e-6
    assert conflicts > 10  # the random pairs did exercise the projection


def test_clip_total_norm_scales_only_large_gradients() -> None:
    grads = [torch.tensor([3.0]), None, torch.tensor([4.0])]
    clipped = clip_total_norm(grads, 1.0)
    assert clipped[1] is None
    assert float(grad_norm(clipped)) == pytest.approx(1.0, rel=1e-5)
    assert clip_total_norm(grads, 10.0)[0].item() == pytest.approx(3.0)


# ------------------------------------------------------------------------------------------------------- DoCo


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory):
    from diffusers import StableDiffusionPipeline
    from tiny_sd import build_tiny_pipeline

    folder = build_tiny_pipeline(tmp_path_factory.mktemp("doco") / "pipeline")
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)


def context(tmp_path: Path, progress: Any = None, checkpoint_every: int = 1000) -> RunContext:
    return RunContext(
        seed=0,
        device=torch.device("cpu"),
        precision="fp32",
        checkpoint_dir=tmp_path / "checkpoints",
        checkpoint_every=checkpoint_every,
        progress=progress or (lambda step, total, **scalars: None),
        log=lambda line: None,
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def moved(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    after = module.state_dict()
    return {name for name, value in before.items() if not torch.equal(value, after[name])}


def erase(pipe, tmp_path: Path, progress: Any = None, checkpoint_every: int = 1000, **params: Any):
    method = get_method("doco")
    return method().erase(
        pipe, TARGET, method.Params(**{**SMALL, **params}), context(tmp_path, progress, checkpoint_every)
    )


def test_doco_trains_only_cross_attention_keys_and_values(pipeline, tmp_path) -> None:
    pipe = copy.deepcopy(pipeline)
    unet_before, te_before, vae_before = snapshot(pipe.unet), snapshot(pipe.text_encoder), snapshot(pipe.vae)
    seen: list[dict[str, float]] = []
    result = erase(pipe, tmp_path, progress=lambda step, total, **scalars: seen.append(scalars))
    changed = set(result.changed["unet"])
    assert changed == set(unet_parameter_names(pipe.unet, "esd-x-strict"))
    assert all(name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for name in changed)
    motion = moved(unet_before, pipe.unet)
    assert motion and motion <= changed
    assert not moved(te_before, pipe.text_encoder) and not moved(vae_before, pipe.vae)
    for name, tensor in result.changed["unet"].items():
        assert torch.equal(tensor, pipe.unet.state_dict()[name])
    assert len(seen) == SMALL["iterations"]
    assert "g_loss" not in seen[0] and {"g_loss", "d_loss", "retain_loss", "projected"} <= set(seen[-1])
    assert {"final_d_loss", "final_g_loss", "final_retain_loss"} <= set(result.metrics)


def test_killed_doco_job_resumes_bit_identical(pipeline, tmp_path) -> None:
    uninterrupted = erase(copy.deepcopy(pipeline), tmp_path / "a", iterations=6, warmup=2)

    class Killed(Exception):
        pass

    def kill_at_step_5(step: int, total: int, **scalars: float) -> None:
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        erase(copy.deepcopy(pipeline), tmp_path / "b", kill_at_step_5, 2, iterations=6, warmup=2)
    assert (tmp_path / "b" / "checkpoints" / "training_state.safetensors").is_file()
    resumed_from: list[int] = []
    resumed = erase(
        copy.deepcopy(pipeline),
        tmp_path / "b",
        lambda step, total, **s: resumed_from.append(step),
        2,
        iterations=6,
        warmup=2,
    )
    assert resumed_from[0] == 5  # steps 1-4 came from the checkpoint (discriminator and both optimisers too)
    for name, tensor in uninterrupted.changed["unet"].items():
        assert torch.equal(tensor, resumed.changed["unet"][name]), name
    assert resumed.metrics == uninterrupted.metrics  # loss means over the whole run, restored from the checkpoint


def test_warm_up_trains_only_the_discriminator(pipeline, tmp_path) -> None:
    pipe = copy.deepcopy(pipeline)
    before = snapshot(pipe.unet)
    seen: list[dict[str, float]] = []
    result = erase(
        pipe, tmp_path, lambda step, total, **s: seen.append(s), iterations=3, warmup=3, forget_prompts="name"
    )
    assert not moved(before, pipe.unet)
    assert all(set(s) == {"d_loss"} for s in seen) and len(seen) == 3
    assert "final_g_loss" not in result.metrics and result.metrics["final_d_loss"] > 0


def test_discriminator_and_adversarial_losses_pull_fake_latents_into_the_real_domain() -> None:
    """The GAN game of DoCo on synthetic 16x16 latents: the discriminator learns to tell the anchor domain (mean
    +1) from the model's (a learnable mean, starting at -1), and the adversarial loss then moves the model's
    latents into the anchor domain."""
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(4, 16, width=8)
    assert discriminator(torch.zeros(2, 4, 16, 16)).shape == (2, 1, 3, 3)  # 3x3 patches, as on SD's 64x64
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    shift = torch.nn.Parameter(torch.tensor(-1.0))
    g_opt = torch.optim.Adam([shift], lr=0.05)
    generator = torch.Generator().manual_seed(1)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        real = torch.randn(8, 4, 16, 16, generator=generator) + 1.0
        return real, torch.randn(8, 4, 16, 16, generator=generator) + shift

    d_losses = []
    for _ in range(30):  # warm-up: discriminator only
        real, fake = batch()
        loss = discriminator_loss(discriminator, real, fake)
        d_opt.zero_grad()
        loss.backward()
        d_opt.step()
        d_losses.append(loss.item())
    assert d_losses[0] > 1.0 and max(d_losses[-5:]) < 0.3 * d_losses[0]
    assert shift.grad is None  # the discriminator loss does not reach the model
    g_losses = []
    for _ in range(40):
        real, fake = batch()
        loss = adversarial_loss(discriminator, fake)
        g_opt.zero_grad()
        loss.backward()
        g_opt.step()
        g_losses.append(loss.item())
        d_loss = discriminator_loss(discriminator, real, fake)
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
    assert sum(g_losses[-5:]) < sum(g_losses[:5])
    assert 0.5 < shift.item() < 1.5  # from -1 into the anchor domain around +1


def test_anchor_prompts_are_the_target_prompts_without_the_target(tmp_path) -> None:
    from dataclasses import replace

    from erasure.forget_data import concept_prompts, mentions
    from erasure.methods.doco import DoCo, DoCoParams

    ember, cinder = Target.parse("style:Ember"), Target.parse("style:Cinder")
    sets = concept_prompts(ember, None, "minicanvas")
    ctx = context(tmp_path)
    forget, anchored = DoCo._prompt_pairs(ember, sets, DoCoParams(), ctx)
    assert (forget[0], anchored[0]) == ("A circle image in Ember style.", "A circle image in style.")
    assert len(forget) == len(anchored) == len(sets.templates)
    assert all(mentions(f, "Ember") and not mentions(a, "Ember") for f, a in zip(forget, anchored))
    assert DoCo._prompt_pairs(ember, sets, DoCoParams(forget_prompts="name"), ctx) == (["Ember style"], [""])
    _, to_cinder = DoCo._prompt_pairs(ember, sets, DoCoParams(), replace(ctx, anchor=cinder))
    assert to_cinder[0] == "A circle image in Cinder style."
    _, fixed = DoCo._prompt_pairs(ember, sets, DoCoParams(anchor_prompt="a painting"), ctx)
    assert set(fixed) == {"a painting"}
    forget, others = DoCo._prompt_pairs(ember, sets, DoCoParams(anchor_from="others"), ctx)
    assert len(forget) == len(others) == len(sets.templates) * len(sets.others) == len(sets.templates) * 11
    assert forget[:11] == ["A circle image in Ember style."] * 11
    assert others[:11] == [f"A circle image in {style} style." for style in sets.others]
    assert all(mentions(f, "Ember") and not mentions(a, "Ember") for f, a in zip(forget, others))
    with pytest.raises(ValueError, match="other concepts"):
        DoCo._prompt_pairs(ember, replace(sets, others=[]), DoCoParams(anchor_from="others"), ctx)


def test_retain_loss_also_keeps_the_empty_prompts_output(pipeline) -> None:
    """With ``keep_unconditional: retain`` the retain loss is the mean of the retain prompts' MSE and the empty prompt's
    MSE at the same states, against the frozen model's outputs kept in the bank; without it, the prompts' alone."""
    from erasure.forget_data import prompt_trajectories
    from erasure.methods.doco import DoCo, DoCoParams
    from erasure.param_sets import train_only
    from erasure.text_embeddings import PromptEmbeddings
    from erasure.trajectory import ddim_scheduler, predict

    pipe = copy.deepcopy(pipeline)
    unet = pipe.unet.requires_grad_(False)
    prompts = PromptEmbeddings(pipe.tokenizer, pipe.text_encoder, RETAIN)
    scheduler = ddim_scheduler(pipe.scheduler.config, 3, unet.device)
    bank = prompt_trajectories(unet, scheduler, prompts, 4, 3.0, torch.Generator().manual_seed(0))
    trained = train_only(unet, unet_parameter_names(unet, "esd-x-strict"))
    with torch.no_grad():
        for tensor in trained.values():
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(1)))

    def retain_loss(keep_empty: bool) -> float:
        params = DoCoParams(**{**SMALL, "retain_batch": 3, "keep_unconditional": "retain" if keep_empty else "off"})
        generator = torch.Generator().manual_seed(2)
        loss, grads = DoCo._retain_gradient(unet, trained, bank, prompts, params, generator)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        return loss

    latents, timesteps, index, frozen_cond, frozen_uncond = bank.draw(3, torch.Generator().manual_seed(2))
    with torch.no_grad():
        empty = prompts.empty.unsqueeze(0).expand(3, -1, -1)
        cond_mse = F.mse_loss(predict(unet, latents, timesteps, prompts[index]), frozen_cond)
        uncond_mse = F.mse_loss(predict(unet, latents, timesteps, empty), frozen_uncond)
    assert uncond_mse > 0 and not torch.isclose(uncond_mse, cond_mse)
    assert retain_loss(False) == pytest.approx(cond_mse.item(), rel=1e-5)
    assert retain_loss(True) == pytest.approx((cond_mse + uncond_mse).item() / 2, rel=1e-5)


def test_null_space_keeps_the_empty_prompts_keys_values_and_output(pipeline, tmp_path) -> None:
    """``keep_unconditional: null_space``: every trained key/value update vanishes on the empty prompt's token
    states, so the UNet's unconditional output stays put; without it the same run moves that output."""
    from tiny_sd import empty_states, unconditional_output

    empty = empty_states(pipeline)
    before = unconditional_output(pipeline.unet, empty)
    drift = {}
    for keep in ("off", "null_space"):
        pipe = copy.deepcopy(pipeline)
        original = snapshot(pipe.unet)
        result = erase(pipe, tmp_path / keep, keep_unconditional=keep, null_space_tol=1e-6, lr=1e-2)
        updates = [tensor - original[name] for name, tensor in result.changed["unet"].items()]
        assert sum(float(u.norm()) for u in updates) > 0
        on_empty = sum(float((u @ empty.T).norm()) for u in updates) / sum(float(u.norm()) for u in updates)
        after = unconditional_output(pipe.unet, empty)
        drift[keep] = (on_empty, float((after - before).abs().max()))
    assert drift["null_space"][0] < 1e-4 < drift["off"][0]
    assert drift["null_space"][1] < 1e-4 < drift["off"][1]


def test_yaml_off_means_off_for_the_switches() -> None:
    """``surgery: off`` and ``keep_unconditional: off`` in YAML arrive as false; both read as "off", other values
    are still checked."""
    import yaml
    from pydantic import ValidationError

    from erasure.methods.doco import DoCoParams

    params = DoCoParams(**yaml.safe_load("surgery: off\nkeep_unconditional: off\n"))
    assert (params.surgery, params.keep_unconditional) == ("off", "off")
    with pytest.raises(ValidationError, match="keep_unconditional"):
        DoCoParams(keep_unconditional=True)
