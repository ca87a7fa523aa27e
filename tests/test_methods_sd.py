"""The SD erasure methods (ESD, SalUn, AdvUnlearn, UCE) and their shared pieces, on tiny SD-1.5- and SD-2-shaped
pipelines: two steps of every method on both, and unit tests of the maths that could be wrong."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from erasure.base import ErasureResult, RunContext
from erasure.config import Target, load_job_config
from erasure.losses import denoising_target, esd_loss, esd_target
from erasure.null_space import KeptInputs
from erasure.param_sets import is_cross_attention, unet_parameter_names
from erasure.registry import get_method
from erasure.saliency import mask_gradients, top_fraction_mask
from erasure.text_embeddings import encode_prompts
from erasure.trajectory import ddim_scheduler, initial_noise, sample_trajectories, sample_until

SD_METHODS = ("esd", "salun", "advunlearn", "uce")
TARGET = Target.parse("style:lower")
ANCHOR = Target.parse("style:wider")
RETAIN = ["newer", "wider", "low"]

# Two optimisation steps (or the closed form) of every method, with the smallest data that exercises each path.
TWO_STEPS: dict[str, dict[str, Any]] = {
    "esd": {"iterations": 2, "batch_size": 2, "ddim_steps": 3, "trajectories": 2, "prompts": "target"},
    "salun": {
        "forget_images": 2, "retain_images": 2, "generation_steps": 2, "batch_size": 2, "epochs": 2,
        "retain_prompts": RETAIN, "prompts": "target", "pseudo_label": "random",
    },
    "advunlearn": {
        "iterations": 2, "warmup_iterations": 1, "attack_steps": 2, "ddim_steps": 3, "trajectories": 2,
        "retain_trajectories": 2, "retain_batch": 2, "retain_prompts": RETAIN, "prompts": "target",
    },
    "uce": {"preserve_prompts": RETAIN, "prompts": "target"},
}  # fmt: skip


# ----------------------------------------------------------------------------------------------- tiny pipelines


def _unet_config(arch: str) -> dict[str, Any]:
    """The UNet config of SD-1.5 (``runwayml/stable-diffusion-v1-5``) or SD-2.x (``stabilityai/stable-diffusion-2``)
    with only the widths shrunk: channels 320/640/1280/1280 -> 8/8/16/16, 32 norm groups -> 4, text width
    768/1024 -> 16, 64 px latents -> 8 px, and (SD-2) 5/10/20/20 heads -> 2/2/4/4."""
    config: dict[str, Any] = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (8, 8, 16, 16),
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 4,
        "norm_eps": 1e-5,
        "cross_attention_dim": 16,
        "attention_head_dim": 2,
    }
    if arch == "sd2":
        config.update(attention_head_dim=(2, 2, 4, 4), use_linear_projection=True, upcast_attention=True)
    return config


def build_pipeline(arch: str, tmp: Path):
    """A random SD-1.5- or SD-2-shaped pipeline (SD-2: v-prediction scheduler, GELU text encoder), 8-token prompts."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tiny_sd import build_tiny_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer(tmp / f"tokenizer-{arch}", model_max_length=8)
    unet = UNet2DConditionModel(**_unet_config(arch))
    vae = AutoencoderKL(
        block_out_channels=[4, 4],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=2,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=21,
            eos_token_id=22,
            pad_token_id=22,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=8,
            hidden_act="gelu" if arch == "sd2" else "quick_gelu",
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if arch == "sd2" else "epsilon",
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("sd-archs")
    return {arch: build_pipeline(arch, tmp) for arch in ("sd15", "sd2")}


def context(tmp_path: Path, progress: Any = None, checkpoint_every: int = 1000, anchor: Target | None = None):
    return RunContext(
        seed=0,
        device=torch.device("cpu"),
        precision="fp32",
        checkpoint_dir=tmp_path / "checkpoints",
        checkpoint_every=checkpoint_every,
        progress=progress or (lambda step, total, **scalars: None),
        log=lambda line: None,
        anchor=anchor,
    )


def run(method: str, pipe: Any, tmp_path: Path, anchor: Target | None = None, **params: Any) -> ErasureResult:
    cls = get_method(method)
    return cls().erase(
        pipe, TARGET, cls.Params(**{**TWO_STEPS[method], **params}), context(tmp_path, anchor=anchor)
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def differing(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    after = module.state_dict()
    return {name for name, value in before.items() if not torch.equal(value, after[name])}


# ----------------------------------------------------------------------------------- two steps of every method


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd15", "sd2"])
@pytest.mark.parametrize("method", SD_METHODS)
def test_two_steps_of_every_method_on_sd15_and_sd2_shapes(
    method: str, arch: str, pipelines, tmp_path
) -> None:
    pipe = copy.deepcopy(pipelines[arch])
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    steps: list[int] = []
    cls = get_method(method)
    ctx = context(tmp_path, progress=lambda step, total, **scalars: steps.append(step), anchor=ANCHOR)
    result = cls().erase(pipe, TARGET, cls.Params(**TWO_STEPS[method]), ctx)
    assert isinstance(result, ErasureResult) and steps and steps[-1] >= 2
    for component, tensors in result.changed.items():
        state = components[component].state_dict()
        for name, tensor in tensors.items():
            assert tensor.shape == state[name].shape and torch.isfinite(tensor).all(), f"{component}.{name}"
    assert all(isinstance(v, float) and not math.isnan(v) for v in result.metrics.values())


# ----------------------------------------------------------------------------------------------------- ESD maths


def test_esd_target_matches_a_hand_computation() -> None:
    uncond, cond = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    # eps(c0) - eta (eps(c) - eps(c0)) with eta = 2:  1 - 2 (3 - 1) = -3;  2 - 2 (1 - 2) = 4
    assert esd_target(uncond, cond, 2.0).tolist() == [-3.0, 4.0]
    assert esd_target(uncond, cond, 0.0).tolist() == [1.0, 2.0]
    trained = torch.zeros(2, requires_grad=True)
    loss = esd_loss(trained, uncond, cond, 2.0)
    assert loss.item() == pytest.approx((9 + 16) / 2)
    loss.backward()
    assert trained.grad.tolist() == [3.0, -4.0]  # d/dx mean((x - target)^2) = (x - target) for 2 entries


def test_v_prediction_targets_are_velocities(pipelines) -> None:
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    eps_scheduler, v_scheduler = pipelines["sd15"].scheduler, pipelines["sd2"].scheduler
    assert torch.equal(denoising_target(eps_scheduler, x0, noise, t), noise)
    abar = v_scheduler.alphas_cumprod[t].view(2, 1, 1, 1)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    torch.testing.assert_close(denoising_target(v_scheduler, x0, noise, t), expected)


@pytest.mark.parametrize("arch", ["sd15", "sd2"])
def test_stored_trajectory_states_are_the_partial_ddim_samples(arch: str, pipelines) -> None:
    pipe = pipelines[arch]
    scheduler = ddim_scheduler(pipe.scheduler.config, 4)
    assert scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["lower style", "newer"])
    empty = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])[0]
    noise = initial_noise(2, pipe.unet, torch.Generator().manual_seed(1))
    bank = sample_trajectories(pipe.unet, scheduler, noise, cond, empty, 3.0)
    assert bank.latents.shape == (2, 4, 4, 8, 8) and torch.equal(bank.latents[:, 0], noise)
    for k in (0, 2, 3):
        partial = sample_until(pipe.unet, scheduler, noise, cond, empty, 3.0, k)
        torch.testing.assert_close(bank.latents[:, k], partial, rtol=1e-5, atol=1e-6)


def test_esd_x_trains_only_cross_attention_and_esd_u_only_the_rest(pipelines, tmp_path) -> None:
    for variant in ("esd-x", "esd-u"):
        pipe = copy.deepcopy(pipelines["sd15"])
        before = snapshot(pipe.unet)
        result = run("esd", pipe, tmp_path / variant, train_method=variant)
        changed = set(result.changed["unet"])
        assert changed == set(unet_parameter_names(pipe.unet, variant))
        moved = differing(before, pipe.unet)
        assert moved and moved <= changed
        if variant == "esd-x":
            assert all(is_cross_attention(name) for name in changed)
        else:
            assert not any(is_cross_attention(name) for name in changed)
            assert not any(
                name.startswith(("time_embedding.", "conv_out.", "conv_norm_out.")) for name in changed
            )
        for name, tensor in result.changed["unet"].items():
            assert torch.equal(tensor, pipe.unet.state_dict()[name])


def test_esd_with_the_compvis_sampler_trains_the_same_parameters(pipelines, tmp_path) -> None:
    """``sampler: current`` (the paper's code): x_t from the model being trained, targets from a frozen copy."""
    pipe = copy.deepcopy(pipelines["sd2"])
    before = snapshot(pipe.unet)
    result = run("esd", pipe, tmp_path, sampler="current")
    assert set(result.changed["unet"]) == set(unet_parameter_names(pipe.unet, "esd-x"))
    assert differing(before, pipe.unet) <= set(result.changed["unet"])


def test_killed_esd_job_resumes_bit_identical(pipelines, tmp_path) -> None:
    params = get_method("esd").Params(**{**TWO_STEPS["esd"], "iterations": 6})
    method = get_method("esd")()
    uninterrupted = method.erase(copy.deepcopy(pipelines["sd15"]), TARGET, params, context(tmp_path / "a"))

    class Killed(Exception):
        pass

    def kill_at_step_5(step: int, total: int, **scalars: float) -> None:
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        method.erase(
            copy.deepcopy(pipelines["sd15"]), TARGET, params, context(tmp_path / "b", kill_at_step_5, 2)
        )
    assert (tmp_path / "b" / "checkpoints" / "training_state.safetensors").is_file()
    resumed_from: list[int] = []
    resumed = method.erase(
        copy.deepcopy(pipelines["sd15"]),
        TARGET,
        params,
        context(tmp_path / "b", lambda step, total, **s: resumed_from.append(step), 2),
    )
    assert resumed_from[0] == 5  # steps 1-4 came from the checkpoint
    for name, tensor in uninterrupted.changed["unet"].items():
        assert torch.equal(tensor, resumed.changed["unet"][name]), name
    # The loss history is checkpointed too: the resumed run reports the same losses, not only those after step 4.
    assert resumed.metrics["final_loss"] == uninterrupted.metrics["final_loss"]


def test_a_checkpoint_of_another_job_is_ignored(pipelines, tmp_path) -> None:
    params = get_method("esd").Params(**{**TWO_STEPS["esd"], "iterations": 3})
    other = get_method("esd").Params(**{**TWO_STEPS["esd"], "iterations": 3, "lr": 1e-3})
    method = get_method("esd")()
    method.erase(copy.deepcopy(pipelines["sd15"]), TARGET, other, context(tmp_path, checkpoint_every=1))
    steps: list[int] = []
    method.erase(
        copy.deepcopy(pipelines["sd15"]),
        TARGET,
        params,
        context(tmp_path, lambda step, total, **s: steps.append(step), checkpoint_every=1),
    )
    assert steps[0] == 1


# ------------------------------------------------------------------------------------------------- SalUn maths


def test_saliency_mask_keeps_exactly_the_top_fraction() -> None:
    torch.manual_seed(0)
    scores = {"a.weight": torch.randn(7, 5), "b.bias": torch.randn(13), "c.weight": torch.randn(3, 3, 2)}
    total = sum(s.numel() for s in scores.values())
    for fraction in (0.5, 0.3, 1.0):
        masks = top_fraction_mask(scores, fraction)
        assert sum(int(m.sum()) for m in masks.values()) == round(fraction * total)
        kept = torch.cat([scores[n].abs()[masks[n]] for n in scores])
        dropped = torch.cat([scores[n].abs()[~masks[n]] for n in scores])
        if len(dropped):
            assert kept.min() >= dropped.max()  # global ranking, not per tensor
    params = {name: torch.nn.Parameter(torch.zeros_like(s)) for name, s in scores.items()}
    for param in params.values():
        param.grad = torch.ones_like(param)
    masks = top_fraction_mask(scores, 0.5)
    mask_gradients(params, masks)
    assert all(torch.equal(params[n].grad, masks[n].float()) for n in params)


def test_salun_leaves_unmasked_weights_untouched(pipelines, tmp_path) -> None:
    pipe = copy.deepcopy(pipelines["sd15"])
    before = snapshot(pipe.unet)
    result = run("salun", pipe, tmp_path, mask_fraction=0.1)
    assert 0.09 < result.metrics["mask_fraction_kept"] < 0.11
    moved_entries = sum(int((before[n] != pipe.unet.state_dict()[n]).sum()) for n in before)
    total = sum(t.numel() for t in before.values())
    assert 0 < moved_entries <= round(0.1 * total)


def test_salun_retain_data_draws_only_the_retain_set_from_its_own_source(
    pipelines, tmp_path, monkeypatch
) -> None:
    import erasure.methods.salun as salun_module
    from erasure.forget_data import LatentSet, concept_prompts

    calls: list[tuple[str, list[str], int]] = []

    def fake(source: str):
        def make(pipe, prompts, *args):
            names = prompts if isinstance(prompts, list) else prompts.prompts
            n, seed = args[-2:] if source == "minicanvas_dataset" else args[:2]
            calls.append((source, names, seed))
            return LatentSet(torch.zeros(n, 4, 8, 8), torch.zeros(n, dtype=torch.long), names)

        return make

    monkeypatch.setattr(salun_module, "generate_latents", fake("generated"))
    monkeypatch.setattr(salun_module, "minicanvas_dataset_latents", fake("minicanvas_dataset"))
    sets = concept_prompts(Target.parse("object:circle"), None, "minicanvas")
    params = salun_module.SalUnParams(forget_images=3, retain_images=5, retain_data="minicanvas_dataset")
    forget, retain = salun_module.SalUn._data(pipelines["sd15"], sets, params, context(tmp_path))
    assert calls == [("generated", sets.forget, 0), ("minicanvas_dataset", sets.retain, 1)]
    assert (len(forget), len(retain)) == (3, 5)
    calls.clear()
    salun_module.SalUn._data(
        pipelines["sd15"], sets, params.model_copy(update={"retain_data": None}), context(tmp_path)
    )
    assert [source for source, _, _ in calls] == ["generated", "generated"]  # null: as `data`
    calls.clear()
    plain = concept_prompts(TARGET, None, "target", retain_prompts=RETAIN)  # no MiniCanvas labels
    with pytest.raises(ValueError, match="MiniCanvas prompts"):
        salun_module.SalUn._data(pipelines["sd15"], plain, params, context(tmp_path))
    assert calls == []  # refused before the forget latents were generated


def test_salun_next_label_is_the_following_concept_cyclically() -> None:
    from erasure.forget_data import concept_prompts
    from generators.minicanvas.concepts import OBJECTS, STYLES

    ember = concept_prompts(Target.parse(f"style:{STYLES[0]}"), None, "minicanvas")
    assert ember.next_concept == STYLES[1]
    assert ember.next_substitutes()[0] == ember.forget[0].replace(STYLES[0], STYLES[1])
    assert concept_prompts(Target.parse(f"style:{STYLES[-1]}"), None, "minicanvas").next_concept == STYLES[0]
    assert concept_prompts(Target.parse(f"object:{OBJECTS[0]}"), None, "minicanvas").next_concept == OBJECTS[1]
    with pytest.raises(ValueError, match="concept list"):
        concept_prompts(TARGET, None, "target", retain_prompts=RETAIN).next_substitutes()


def test_salun_next_label_without_a_concept_list_asks_for_an_anchor(pipelines, tmp_path) -> None:
    pipe = copy.deepcopy(pipelines["sd15"])
    before = snapshot(pipe.unet)
    with pytest.raises(ValueError, match="pseudo_label: random"):
        run("salun", pipe, tmp_path, pseudo_label="next")
    assert not differing(before, pipe.unet)
    run("salun", pipe, tmp_path, pseudo_label="next", anchor=ANCHOR)  # a substitute concept is enough
    assert differing(before, pipe.unet)


# --------------------------------------------------------------------------------------------------- UCE maths


def test_uce_closed_form_maps_the_target_keys_to_the_anchors(pipelines, tmp_path) -> None:
    from erasure.methods.uce import aligned, concept_end, cross_attention_projections

    pipe = copy.deepcopy(pipelines["sd15"])
    old = {
        name: layer.weight.detach().clone()
        for name, layer in cross_attention_projections(pipe.unet, True).items()
    }
    result = run("uce", pipe, tmp_path, anchor=ANCHOR, preserve_scale=0.0, lamb=1e-6)
    tok, te = pipe.tokenizer, pipe.text_encoder
    target_emb, anchor_emb = encode_prompts(tok, te, [TARGET.prompt, ANCHOR.prompt])
    c_target, c_anchor = aligned(
        target_emb,
        anchor_emb,
        concept_end(tok, "{concept} style", TARGET.name),
        concept_end(tok, "{concept} style", ANCHOR.name),
    )
    assert set(result.changed["unet"]) == {f"{name}.weight" for name in old}
    for name, w_old in old.items():
        w_new = result.changed["unet"][f"{name}.weight"]
        wanted = c_anchor @ w_old.T
        before = (c_target @ w_old.T - wanted).norm()
        after = (c_target @ w_new.T - wanted).norm()
        assert after < 1e-3 * before, name


def test_uce_without_anchor_edits_towards_the_empty_prompt(pipelines, tmp_path) -> None:
    pipe = copy.deepcopy(pipelines["sd2"])
    result = run("uce", pipe, tmp_path, technique="tensor")
    edited = result.changed["unet"]
    assert edited and all(name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for name in edited)
    assert all(torch.isfinite(w).all() for w in edited.values())


def test_uce_preserve_term_keeps_preserved_prompts() -> None:
    from erasure.methods.uce import closed_form_edit

    torch.manual_seed(0)
    w = torch.randn(6, 10)
    c_erase, v_erase = torch.randn(2, 10), torch.randn(2, 6)
    c_keep = torch.randn(5, 10)
    new = closed_form_edit(w, c_erase, v_erase, c_keep, erase_scale=1.0, preserve_scale=1e3, lamb=1e-6)
    torch.testing.assert_close(c_erase @ new.T, v_erase, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(c_keep @ new.T, c_keep @ w.T, rtol=1e-3, atol=1e-3)


# -------------------------------------------------------------------------------------------- AdvUnlearn scope


def test_advunlearn_changes_only_text_encoder_layers(pipelines, tmp_path) -> None:
    pipe = copy.deepcopy(pipelines["sd15"])
    unet_before, te_before = snapshot(pipe.unet), snapshot(pipe.text_encoder)
    result = run("advunlearn", pipe, tmp_path)
    assert set(result.changed) == {"text_encoder"}
    assert not differing(unet_before, pipe.unet)
    moved = differing(te_before, pipe.text_encoder)
    assert moved and all(
        n.removeprefix("text_model.").startswith(("encoder.layers.", "final_layer_norm.")) for n in moved
    )
    assert result.metrics["attack_rounds"] == 1.0  # one step of warm-up, then one attacked step


@pytest.mark.parametrize("sampler", ["frozen", "current"])
def test_esd_null_space_option_keeps_the_unconditional_output(pipelines, tmp_path, sampler) -> None:
    """``keep_unconditional: null_space`` (with esd-x-strict): the keys/values move, but not on the empty prompt's
    token states, so the UNet's unconditional output stays put; the same run without it moves that output."""
    from tiny_sd import empty_states, unconditional_output

    base = pipelines["sd15"]
    empty = empty_states(base)
    before = unconditional_output(base.unet, empty)
    drift = {}
    for keep in ("off", "null_space"):
        pipe = copy.deepcopy(base)
        original = snapshot(pipe.unet)
        result = run(
            "esd", pipe, tmp_path / keep, sampler=sampler, train_method="esd-x-strict", keep_unconditional=keep,
            null_space_tol=1e-6, lr=1e-2, iterations=3,
        )  # fmt: skip
        updates = [tensor - original[name] for name, tensor in result.changed["unet"].items()]
        total = sum(float(u.norm()) for u in updates)
        assert total > 0
        after = unconditional_output(pipe.unet, empty)
        on_empty = sum(float((u @ empty.T).norm()) for u in updates) / total
        drift[keep] = (on_empty, float((after - before).abs().max()))
    assert drift["null_space"][0] < 1e-4 < drift["off"][0]
    assert drift["null_space"][1] < 1e-4 < drift["off"][1]


def test_esd_retain_option_holds_the_unconditional_output_back(pipelines, tmp_path) -> None:
    """``keep_unconditional: retain`` adds the empty prompt's MSE to the frozen output at the same states: with a
    large weight the unconditional output moves much less than in the same run without it."""
    from tiny_sd import empty_states, unconditional_output

    base = pipelines["sd15"]
    empty = empty_states(base)
    before = unconditional_output(base.unet, empty)
    drift = {}
    for keep in ("off", "retain"):
        pipe = copy.deepcopy(base)
        params = {"keep_unconditional": keep, "unconditional_weight": 100.0, "lr": 1e-3, "iterations": 6}
        run("esd", pipe, tmp_path / keep, **params)
        after = unconditional_output(pipe.unet, empty)
        drift[keep] = float((after - before).pow(2).mean())
    assert 0 < drift["retain"] < drift["off"] / 4


def test_esd_null_space_option_refuses_weights_that_do_not_read_the_text(pipelines) -> None:
    """esd-x also trains to_q/to_out, which read the image features: keeping the empty prompt's output by a
    projection of the text inputs cannot hold there, so the params are refused before any work."""
    with pytest.raises(ValueError, match="esd-x-strict"):
        get_method("esd").Params(keep_unconditional="null_space", train_method="esd-x")
    with pytest.raises(ValueError, match="does not read"):  # the shared piece checks the weights' shapes too
        KeptInputs(dict(pipelines["sd15"].unet.named_parameters()), torch.zeros(3, 16), 1e-2)
    assert get_method("esd").Params(keep_unconditional=False).keep_unconditional == "off"


@pytest.mark.parametrize("sampler", ["frozen", "current"])
def test_esd_caption_reference_replaces_the_empty_prompt(pipelines, tmp_path, sampler) -> None:
    """``reference: caption`` negates from 'style' (the prompt 'lower style' without 'lower') instead of ∅."""
    plain, captioned = copy.deepcopy(pipelines["sd15"]), copy.deepcopy(pipelines["sd15"])
    run("esd", plain, tmp_path / "empty", sampler=sampler)
    before = snapshot(captioned.unet)
    run("esd", captioned, tmp_path / "caption", sampler=sampler, reference="caption")
    assert differing(before, captioned.unet)
    assert differing(snapshot(plain.unet), captioned.unet)


def test_esd_others_reference_puts_each_other_concept_in_the_targets_place(pipelines) -> None:
    """``reference: others``: for each concept prompt, the same caption with every other style (none naming the
    target); a state of prompt ``i`` draws among prompt ``i``'s references only, and over draws reaches them all."""
    from erasure.forget_data import References, concept_prompts, esd_references

    pipe = pipelines["sd15"]
    sets = concept_prompts(Target.parse("style:Ember"), None, "minicanvas")
    references = esd_references(pipe.tokenizer, pipe.text_encoder, sets, "others")
    n = len(sets.others)
    assert references.per_prompt == n == 11 and len(references.prompts) == len(sets.templates) * n
    first = references.prompts.prompts[:n]
    assert first == [sets.templates[0].replace("{concept}", other) for other in sets.others]
    assert not any("Ember" in prompt for prompt in references.prompts.prompts)

    class Rows:  # PromptEmbeddings stand-in whose row i is the number i
        embeddings = torch.arange(len(sets.templates) * n)

        def __getitem__(self, index):
            return self.embeddings[index]

    drawn = References(Rows(), n).draw(torch.tensor([0, 3] * 200), torch.Generator().manual_seed(0))
    assert set(drawn[0::2].tolist()) == set(range(n))  # prompt 0: all its references, and only those
    assert set(drawn[1::2].tolist()) <= set(range(3 * n, 4 * n))


def test_others_reference_needs_the_other_concepts(pipelines, tmp_path) -> None:
    with pytest.raises(ValueError, match="others"):
        run("esd", copy.deepcopy(pipelines["sd15"]), tmp_path, reference="others")
    with pytest.raises(ValueError, match="others"):
        run("advunlearn", copy.deepcopy(pipelines["sd15"]), tmp_path, concept_prompts="captions", reference="others")


def test_advunlearn_captions_negate_from_the_caption_without_the_target(pipelines, tmp_path) -> None:
    """With prompts='target' the caption is the target's own prompt ('lower style'), so ``captions`` differs from
    ``name`` only in the ESD target's reference branch: 'style' instead of the empty prompt."""
    name_pipe, caption_pipe = copy.deepcopy(pipelines["sd15"]), copy.deepcopy(pipelines["sd15"])
    unet_before = snapshot(caption_pipe.unet)
    run("advunlearn", name_pipe, tmp_path / "name")
    result = run("advunlearn", caption_pipe, tmp_path / "captions", concept_prompts="captions")
    assert set(result.changed) == {"text_encoder"} and not differing(unet_before, caption_pipe.unet)
    assert differing(snapshot(name_pipe.text_encoder), caption_pipe.text_encoder)


def test_advunlearn_embedding_keep_term_holds_retain_and_empty_prompt_embeddings(pipelines, tmp_path) -> None:
    """``embedding_keep_weight`` pulls the retain prompts' and the empty prompt's per-token embeddings back towards
    the original encoder's; off (0), the adversarial ESD steps move them freely."""
    prompts = [*RETAIN, ""]
    original = pipelines["sd15"]
    before = encode_prompts(original.tokenizer, original.text_encoder, prompts)
    drift = {}
    for weight in (0.0, 1e4):
        pipe = copy.deepcopy(original)
        run("advunlearn", pipe, tmp_path / str(weight), iterations=8, lr=1e-2, embedding_keep_weight=weight,
            embedding_keep_batch=3)
        after = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
        drift[weight] = float((after - before).pow(2).mean())
    assert drift[0.0] > 0
    assert drift[1e4] < 0.5 * drift[0.0]


# ------------------------------------------------------------------------------------------------- configs


SHIPPED = sorted((Path(__file__).resolve().parent.parent / "configs" / "jobs").glob("*.yaml"))


@pytest.mark.parametrize(
    "config", [p for p in SHIPPED if p.stem in (*SD_METHODS, "quickstart")], ids=lambda p: p.name
)
@pytest.mark.parametrize("method", SD_METHODS)
def test_shipped_sd_configs_take_every_method_and_target(config: Path, method: str) -> None:
    """Any shipped SD job runs any SD method on any target; a job's own method params (e.g. esd.yaml's caption
    prompts) are validated for its method and dropped (``method.params={}``) when another method is swapped in."""
    own = load_job_config(config, [])
    for target in ("style:Cinder", "object:circle"):
        swap = ["method.params={}"] if method != own.method.name else []
        job = load_job_config(config, [f"target={target}", f"method.name={method}", "seed=3", *swap])
        assert (job.method.name, job.target.spec, job.seed) == (method, target, 3)
        expected = own.method.params if method == own.method.name else get_method(method).Params()
        assert job.method.params == expected
