"""Speed switches (:mod:`erasure.speed`): each optimised path gives the reference path's losses, gradients and
weights within floating-point tolerance, on a tiny random SD-1.5-shaped pipeline."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from erasure.base import RunContext
from erasure.config import Target
from erasure.registry import get_method
from erasure.speed import SpeedConfig, apply_to_backbone
from erasure.trajectory import ddim_scheduler, partial_trajectories, predict

TARGET = Target.parse("style:lower")
RETAIN = ["newer", "wider", "low"]

# A few steps of each method whose frozen-model work `speed.reuse` keeps.
STEPS: dict[str, dict[str, Any]] = {
    "esd": {"iterations": 3, "batch_size": 3, "ddim_steps": 4, "trajectories": 3, "prompts": "target"},
    "advunlearn": {
        "iterations": 3, "warmup_iterations": 1, "attack_steps": 2, "ddim_steps": 4, "trajectories": 3,
        "retain_trajectories": 3, "retain_batch": 2, "retain_prompts": RETAIN, "prompts": "target",
        # Off here: the term uses no frozen-model work that `speed.reuse` keeps. With it on, the paths' losses still
        # agreed to 1e-4 but 3 of 8 entries of one tensor differed by up to 2e-6 after 3 steps (atol 1e-6).
        "embedding_keep_weight": 0.0,
    },
    "doco": {
        "iterations": 3, "warmup": 1, "batch_size": 2, "retain_batch": 2, "ddim_steps": 4, "trajectories": 3,
        "retain_trajectories": 3, "disc_width": 8, "prompts": "target", "retain_prompts": RETAIN,
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory):
    from diffusers import StableDiffusionPipeline
    from tiny_sd import build_tiny_pipeline

    folder = build_tiny_pipeline(tmp_path_factory.mktemp("speed") / "pipeline")
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)


def erase(method: str, pipe, speed: SpeedConfig, tmp_path: Path):
    """Run ``method`` on a copy of ``pipe`` with ``speed``; return the result and the per-step losses."""
    pipe = copy.deepcopy(pipe)
    apply_to_backbone(pipe, speed)
    losses: list[dict[str, float]] = []
    ctx = RunContext(
        seed=0,
        device=torch.device("cpu"),
        precision="fp32",
        checkpoint_dir=tmp_path / "checkpoints",
        checkpoint_every=1000,
        progress=lambda step, total, **scalars: losses.append(scalars),
        log=lambda line: None,
        speed=speed,
    )
    cls = get_method(method)
    return cls().erase(pipe, TARGET, cls.Params(**STEPS[method]), ctx), losses


@pytest.mark.parametrize("method", sorted(STEPS))
def test_reference_and_optimised_paths_train_the_same_weights(method: str, pipeline, tmp_path: Path) -> None:
    optimised, fast_losses = erase(method, pipeline, SpeedConfig(), tmp_path / "fast")
    reference, ref_losses = erase(method, pipeline, SpeedConfig.reference(), tmp_path / "ref")
    assert len(fast_losses) == len(ref_losses) == STEPS[method]["iterations"]
    for fast, ref in zip(fast_losses, ref_losses, strict=True):
        assert fast.keys() == ref.keys()
        for key in fast:
            assert fast[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    for component, tensors in reference.changed.items():
        assert optimised.changed[component].keys() == tensors.keys()
        for name, tensor in tensors.items():
            torch.testing.assert_close(optimised.changed[component][name], tensor, rtol=1e-4, atol=1e-6)
    # The runs really trained (the comparison is not between two unchanged models).
    original = dict(getattr(pipeline, next(iter(reference.changed))).state_dict())
    assert any(
        not torch.equal(t, original[n]) for n, t in reference.changed[next(iter(reference.changed))].items()
    )


@pytest.mark.parametrize("negatives", [False, True], ids=["empty-prompt", "per-trajectory-negatives"])
def test_recomputed_states_equal_the_kept_ones(pipeline, negatives: bool) -> None:
    unet = pipeline.unet
    scheduler = ddim_scheduler(pipeline.scheduler.config, 5)
    size, width = unet.config.sample_size, unet.config.cross_attention_dim
    noise = torch.randn((4, 4, size, size), generator=torch.Generator().manual_seed(0))
    cond = torch.randn((4, 6, width), generator=torch.Generator().manual_seed(1))
    uncond = torch.randn(((4,) if negatives else ()) + (6, width), generator=torch.Generator().manual_seed(2))
    index = torch.tensor([0, 1, 0, 1])
    kept = partial_trajectories(unet, scheduler, noise, cond, uncond, 3.0, index, reuse=True)
    recomputed = partial_trajectories(unet, scheduler, noise, cond, uncond, 3.0, index, reuse=False)
    p, k = torch.tensor([3, 0, 2, 2]), torch.tensor([4, 0, 2, 3])
    # Kept states come from a batch of 4, recomputed ones from batches of 1: fp32 kernels may block (and so round)
    # the two differently, by a few 1e-6 on some CPUs; a wrong state or step is off by orders of magnitude more.
    close = {"rtol": 1e-4, "atol": 2e-5}
    for a, b in zip(kept.states(p, k), recomputed.states(p, k), strict=True):
        torch.testing.assert_close(a, b, **close)
    torch.testing.assert_close(kept.clean(p), recomputed.clean(p), **close)
    # Both draw the same states from the same generator.
    draws = [bank.draw(3, torch.Generator().manual_seed(5)) for bank in (kept, recomputed)]
    for a, b in zip(*draws, strict=True):
        torch.testing.assert_close(a, b, **close)
    if negatives:  # trajectory i is guided away from uncond[i] and no other
        moved = uncond.clone()
        moved[1] += 1.0
        other = partial_trajectories(unet, scheduler, noise, cond, moved, 3.0, index, reuse=True)
        changed = (other.final - kept.final).flatten(1).abs().amax(1) > 1e-4
        assert changed.tolist() == [False, True, False, False]


@pytest.mark.parametrize("switch", ["attention", "gradient_checkpointing"])
def test_attention_kernels_and_checkpointing_keep_outputs_and_gradients(switch: str, pipeline) -> None:
    optimised = {"attention": SpeedConfig(attention="sdpa"), "gradient_checkpointing": SpeedConfig(
        attention="plain", gradient_checkpointing=True)}[switch]  # fmt: skip
    results = []
    for speed in (SpeedConfig.reference(), optimised):
        pipe = copy.deepcopy(pipeline)
        apply_to_backbone(pipe, speed)
        pipe.unet.train()  # gradient checkpointing is active in training mode only
        ids = pipe.tokenizer(["lower newer"], padding="max_length", return_tensors="pt").input_ids
        cond = pipe.text_encoder(ids)[0]
        size = pipe.unet.config.sample_size
        latents = torch.randn((2, 4, size, size), generator=torch.Generator().manual_seed(0))
        out = predict(pipe.unet, latents, torch.tensor(500), cond.expand(2, -1, -1))
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in pipe.unet.named_parameters() if p.grad is not None}
        grads.update(
            {f"te.{n}": p.grad.clone() for n, p in pipe.text_encoder.named_parameters() if p.grad is not None}
        )
        results.append((out.detach(), grads))
    (ref_out, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_switches_reach_the_models(pipeline) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    pipe = copy.deepcopy(pipeline)
    apply_to_backbone(pipe, SpeedConfig.reference())
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor}
    assert pipe.text_encoder.config._attn_implementation == "eager"
    apply_to_backbone(pipe, SpeedConfig(gradient_checkpointing=True))
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor2_0}
    assert pipe.text_encoder.config._attn_implementation == "sdpa"
    assert pipe.unet.is_gradient_checkpointing and pipe.text_encoder.is_activation_checkpointing
