"""SFD (score forgetting distillation into a one-step generator) on the tiny random SD pipeline: the SiD loss
pieces, the forgetting switch of the teacher's prompt, the one-step sampler, the run's output through the
evaluator / UI / export paths, and resume after a kill."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from erasure.base import RunContext
from erasure.config import Target, validate_job
from erasure.forget_data import ConceptPrompts
from erasure.methods.sfd import SFD, SFDParams, SFDPrompts, fake_score_loss, sid_generator_loss
from generators import one_step
from generators.sd import load_sd_pipeline, sample_sd

TARGET = Target.parse("style:lower")
ANCHOR = Target.parse("style:wider")
TINY: dict[str, Any] = {
    "iterations": 2, "batch_size": 2, "forget_batch_size": 1, "warmup_steps": 2, "warmup_samples": 4,
    "warmup_batch_size": 2, "ddim_steps": 2, "prompts": "target", "t_init": 500,
}  # fmt: skip


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


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory):
    from tiny_sd import build_tiny_pipeline

    return load_sd_pipeline(build_tiny_pipeline(tmp_path_factory.mktemp("sfd") / "pipeline"))


@contextmanager
def unet_calls(unet: torch.nn.Module) -> Iterator[list[dict[str, Any]]]:
    """Records every forward call of ``unet`` (its batch size and text conditions)."""
    calls: list[dict[str, Any]] = []

    def hook(module, args, kwargs):
        calls.append({"n": args[0].shape[0], "cond": kwargs["encoder_hidden_states"].detach().clone()})

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------- SiD maths


def test_sid_generator_loss_matches_a_hand_computation_and_vanishes_when_the_scores_agree() -> None:
    x_g = torch.tensor([[1.0, 3.0]])
    y_real = torch.tensor([[2.0, 1.0]])
    y_fake = torch.tensor([[0.0, 2.0]])
    weight = (abs(1 - 2) + abs(3 - 1)) / 2  # sg[mean |x_g - y_real|]
    diff = y_real - y_fake  # [2, -1]
    by_hand = (diff * ((y_real - x_g) - 1.2 * diff)).sum() / weight  # [2*(1-2.4), -1*(-2+1.2)] -> -2
    assert torch.allclose(sid_generator_loss(x_g, y_real, y_fake, 1.2), by_hand.reshape(1))
    alpha_one = (diff * (y_fake - x_g)).sum() / weight
    assert torch.allclose(sid_generator_loss(x_g, y_real, y_fake, 1.0), alpha_one.reshape(1))
    assert torch.equal(sid_generator_loss(x_g, y_real, y_real.clone(), 1.2), torch.zeros(1))


def test_fake_score_loss_decreases_on_fixed_generated_data(pipe) -> None:
    fake = copy.deepcopy(pipe.unet).requires_grad_(True)
    abar = one_step.alphas_cumprod(pipe.scheduler)
    g = torch.Generator().manual_seed(0)
    x_g = torch.randn(4, 4, 16, 16, generator=g)
    eps = torch.randn(x_g.shape, generator=g)
    t = torch.tensor([100, 300, 600, 900])
    cond = torch.randn(4, 77, 8, generator=g)
    x_t = one_step.add_noise(abar, x_g, eps, t)
    optimizer = torch.optim.Adam(fake.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = fake_score_loss(fake(x_t, t, encoder_hidden_states=cond).sample, eps).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_x0_prediction_inverts_the_forward_process_for_eps_and_v() -> None:
    abar = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    x0, eps, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([5, 500, 990])
    x_t = one_step.add_noise(abar, x0, eps, t)
    assert torch.allclose(one_step.predicted_x0("epsilon", abar, x_t, eps, t), x0, atol=1e-4)
    a = abar[t].float().view(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert torch.allclose(one_step.predicted_x0("v_prediction", abar, x_t, v, t), x0, atol=1e-4)


# ----------------------------------------------------------------------------------------------- forgetting


def _sets(anchor: str | None) -> ConceptPrompts:
    return ConceptPrompts(
        templates=["{concept} style", "low {concept}"],
        target="lower",
        anchor=anchor,
        others=["newer", "wider"],
        retain=["newer style", "wider style", "low newer"],
    )


def rows_in(rows, table: torch.Tensor) -> bool:
    """Whether every row of ``rows`` is one of the rows of ``table``."""
    return all(any(torch.equal(r, e) for e in table) for r in rows)


@pytest.mark.parametrize("override", ["anchor", "random", "empty"])
def test_forget_rows_condition_the_teacher_on_the_override_and_remain_rows_on_their_own_prompt(
    pipe, override: str
) -> None:
    prompts = SFDPrompts(pipe.tokenizer, pipe.text_encoder, _sets("wider"), override)  # type: ignore[arg-type]
    batch = prompts.draw(5, 4, torch.Generator().manual_seed(1))
    assert batch.forget.tolist() == [False] * 5 + [True] * 4
    remain, forget = ~batch.forget, batch.forget
    assert torch.equal(batch.teacher_cond[remain], batch.cond[remain])
    # G and the fake score see the forget prompt; the teacher sees another one
    assert rows_in(batch.cond[forget], prompts.forget.embeddings)
    assert not any(rows_in([r], prompts.forget.embeddings) for r in batch.teacher_cond[forget])
    expected = {"anchor": ["wider style", "low wider"], "random": ["newer style", "wider style", "low newer",
                "low wider"], "empty": [""]}[override]  # fmt: skip
    assert set(prompts.overrides.prompts) == set(expected)
    assert rows_in(batch.teacher_cond[forget], prompts.overrides.embeddings)


def test_sid_step_asks_the_teacher_with_the_override_only_for_forget_prompts(pipe) -> None:
    params = SFDParams(**{**TINY, "teacher_guidance": 1.0, "batch_size": 3, "forget_batch_size": 2})
    prompts = SFDPrompts(pipe.tokenizer, pipe.text_encoder, _sets("wider"), "anchor")
    generator_net, fake, teacher = (copy.deepcopy(pipe.unet) for _ in range(3))
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-4) for m in (generator_net, fake)]
    abar = one_step.alphas_cumprod(pipe.scheduler)
    rng = torch.Generator().manual_seed(0)
    before = {k: v.clone() for k, v in generator_net.state_dict().items()}
    with unet_calls(teacher) as teacher_seen, unet_calls(fake) as fake_seen:
        SFD._sid_step(
            generator_net, fake, teacher, prompts, prompts.empty, params, 980, abar, "epsilon",
            optimizers[0], optimizers[1], rng, torch.device("cpu"),
        )  # fmt: skip
    # replay the draws: the generator step's batch is the second draw of the step
    replay = torch.Generator().manual_seed(0)
    prompts.draw(3, 2, replay)
    for shape in ((5, 4, 16, 16),) * 2:
        torch.randn(shape, generator=replay)
    torch.randint(20, 980, (5,), generator=replay)
    batch = prompts.draw(3, 2, replay)
    (teacher_call,) = teacher_seen
    assert torch.equal(teacher_call["cond"], batch.teacher_cond)
    assert torch.equal(teacher_call["cond"][:3], batch.cond[:3])
    assert not torch.equal(teacher_call["cond"][3:], batch.cond[3:])
    assert torch.equal(fake_seen[-1]["cond"], batch.cond)  # the fake score sees the forget prompts themselves
    assert any(not torch.equal(before[k], v) for k, v in generator_net.state_dict().items())


# ------------------------------------------------------------------------------------------- one-step sampling


def test_one_step_sampler_is_deterministic_per_seed_and_calls_the_unet_once(pipe) -> None:
    marked = copy.copy(pipe)
    marked.__dict__.pop("_erasure_one_step", None)
    one_step.mark(marked, 500)
    prompts, seeds = ["lower style", "newer style", "lower style"], [3, 3, 4]
    with unet_calls(marked.unet) as calls:
        images = sample_sd(marked, prompts, seeds, num_inference_steps=7, guidance_scale=5.0)
    assert len(calls) == 1 and calls[0]["n"] == 3
    assert images.shape == (3, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    again = sample_sd(marked, prompts[:1], seeds[:1], num_inference_steps=2, guidance_scale=1.0)
    assert torch.allclose(again[0], images[0], atol=1e-5)  # independent of the batch and of steps/guidance
    assert not torch.allclose(images[0], images[2])  # another seed, another image
    with unet_calls(pipe.unet) as calls:
        sample_sd(pipe, prompts[:1], seeds[:1], num_inference_steps=4, guidance_scale=5.0)
    assert len(calls) == 4  # the unmarked pipeline still samples with its scheduler
    with pytest.raises(ValueError):
        one_step.mark(marked, 1000)


# ------------------------------------------------------------------------------------------------ a whole run


def _job(backbone: Path, **params: Any):
    return validate_job(
        {"name": "sfd-tiny", "device": "cpu", "backbone": str(backbone), "target": TARGET.spec,
         "anchor": ANCHOR.spec, "method": {"name": "sfd", "params": {**TINY, **params}},
         "evaluate": {"suites": []}, "checkpoint_every": 1000},
        source="test",
    )  # fmt: skip


def test_run_output_samples_in_one_unet_call_through_evaluator_ui_and_export(tiny_pipeline, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    from erasure.export import export_diffusers
    from erasure.runner import run_erase
    from erasure.runs import read_run_weights
    from evaluate.sampling import SamplerSettings, SDSampler
    from evaluate.subject import load_subject
    from generators.registry import resolve_backbone
    from ui.models import ModelPool, Sampling
    from ui.prompts import Item

    run = run_erase(_job(tiny_pipeline), tmp_path / "run", echo=lambda line: None)
    assert sorted(p.name for p in (run / "weights").iterdir()) == ["one_step.safetensors", "unet.safetensors"]

    subject = load_subject(str(run), torch.device("cpu"))
    assert one_step.one_step_timestep(subject.model) == 500
    assert one_step.one_step_timestep(subject.original()) is None
    settings = SamplerSettings(steps=5, guidance=5.0)
    prompts, seeds = ["lower style", "newer style"], [1, 2]
    with unet_calls(subject.model.unet) as calls:
        images = SDSampler(subject.model).images(prompts, seeds, settings)
    assert len(calls) == 1 and images.shape == (2, 3, 32, 32)

    pool = ModelPool(torch.device("cpu"))  # the UI swaps the run's weights into a shared base pipeline
    items = [Item(concept="text:" + p, prompt=p, seed=s) for p, s in zip(prompts, seeds)]
    before, after = pool.before_after(resolve_backbone(str(tiny_pipeline)), read_run_weights(run), items,
                                      Sampling(steps=5, guidance=5.0))  # fmt: skip
    assert torch.allclose(after, images, atol=1e-5) and not torch.allclose(before, images, atol=1e-3)
    base = next(iter(pool._loaded.values())).model
    assert one_step.one_step_timestep(base) is None  # the marker is swapped out again with the weights

    out = export_diffusers(run, tmp_path / "exported")
    assert (out / one_step.MARKER_FILE).is_file()
    StableDiffusionPipeline.from_pretrained(out, local_files_only=True)  # still an ordinary pipeline folder
    exported = load_sd_pipeline(out)
    assert one_step.one_step_timestep(exported) == 500
    assert torch.allclose(sample_sd(exported, prompts, seeds, num_inference_steps=5, guidance_scale=5.0),
                          images, atol=1e-5)  # fmt: skip


def test_killed_sfd_job_resumes_bit_identical(pipe, tmp_path) -> None:
    params = SFDParams(**{**TINY, "warmup_steps": 3, "iterations": 3})
    method = SFD()
    uninterrupted = method.erase(copy.deepcopy(pipe), TARGET, params, context(tmp_path / "a", anchor=ANCHOR))

    class Killed(Exception):
        pass

    def kill_at_step_3(step: int, total: int, **scalars: float) -> None:
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        method.erase(copy.deepcopy(pipe), TARGET, params, context(tmp_path / "b", kill_at_step_3, 2, ANCHOR))
    resumed_from: list[int] = []
    resumed = method.erase(
        copy.deepcopy(pipe),
        TARGET,
        params,
        context(tmp_path / "b", lambda step, total, **s: resumed_from.append(step), 2, ANCHOR),
    )
    assert resumed_from[0] == 3  # steps 1-2 came from the checkpoint; the warm start's data is rebuilt
    for name, tensor in uninterrupted.changed["unet"].items():
        assert torch.equal(tensor, resumed.changed["unet"][name]), name
    assert torch.equal(resumed.changed["one_step"]["t_init"], torch.tensor([500]))
    assert resumed.metrics == uninterrupted.metrics  # loss means over the whole run, restored from the checkpoint
