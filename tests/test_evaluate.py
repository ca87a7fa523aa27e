"""The evaluator end to end on a tiny untrained MiniCanvas world: generation cache, the attack, suites, protocols,
the CLI. Numbers measured on random models are meaningless; these tests check machinery and definitions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from erasure.attacks import (
    _SampledEmbedding,
    attack_timesteps,
    build_prefix_prompt,
    denoising_loss,
    encode_images,
    encode_with_prefix,
    init_prefix,
    optimize_prefix_embeddings,
    optimize_prefix_tokens,
    optimize_prefix_tokens_batch,
    project_to_simplex,
)
from erasure.base import ErasureMethod
from erasure.cli import app
from erasure.config import Target
from evaluate.api import flatten, run_suites
from evaluate.cache import GenerationCache, model_fingerprint
from evaluate.judges import FunctionJudge
from evaluate.robustness import AttackSettings, attack_prompts
from evaluate.sampling import SamplerSettings, SDSampler
from evaluate.subject import EvalSubject, load_subject

runner = CliRunner()
SMOKE = SamplerSettings(steps=2, guidance=5.0)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_world import build_tiny_world

    return build_tiny_world(tmp_path_factory.mktemp("world") / "world")


@pytest.fixture
def world_env(tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny world as the MiniCanvas world, and a generation cache under tmp_path."""
    monkeypatch.setenv("ERASURE_STUDIO_WORLD", str(tiny_world))
    monkeypatch.setenv("ERASURE_STUDIO_CACHE", str(tmp_path / "cache"))
    return tiny_world


@pytest.fixture(scope="session")
def tiny_pipe(tiny_world: Path):
    from generators.sd import load_sd_pipeline

    return load_sd_pipeline(tiny_world / "sd")


# ------------------------------------------------------------------------------------------------------ cache


def test_cache_hit_returns_identical_images_without_calling_the_pipeline(
    tiny_pipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = GenerationCache(tmp_path / "cache")
    sampler = SDSampler(tiny_pipe, cache)
    prompts, seeds = ["A circle image in Ember style.", "A star image in Ink style."], [1, 2]
    first = sampler.images(prompts, seeds, SMOKE)
    assert cache.misses == 2 and cache.hits == 0
    files = list((tmp_path / "cache").rglob("*"))
    assert sum(p.suffix == ".safetensors" for p in files) == 2
    assert not [p for p in files if p.name.endswith(".tmp")]  # atomic writes leave no temp files

    def no_generation(*args: object, **kwargs: object) -> None:
        raise AssertionError("the pipeline was called for a cached image")

    monkeypatch.setattr("evaluate.sampling.sample_sd", no_generation)
    again = SDSampler(tiny_pipe, cache).images(prompts, seeds, SMOKE)
    assert torch.equal(first, again) and cache.hits == 2

    # Anything that changes the image is part of the key: seed, sampler settings.
    monkeypatch.undo()
    sampler.images(prompts[:1], [3], SMOKE)
    sampler.images(prompts[:1], [1], SamplerSettings(steps=3, guidance=5.0))
    assert cache.misses == 4


def test_model_fingerprint_follows_the_weights(tiny_pipe) -> None:
    before = model_fingerprint(tiny_pipe)
    assert model_fingerprint(tiny_pipe) == before  # memoised
    bias = tiny_pipe.unet.conv_in.bias
    with torch.no_grad():
        bias += 1.0
    try:
        assert model_fingerprint(tiny_pipe) == before  # memo: in-place edits need refresh=True
        assert model_fingerprint(tiny_pipe, refresh=True) != before
    finally:
        with torch.no_grad():
            bias -= 1.0
        model_fingerprint(tiny_pipe, refresh=True)


# ----------------------------------------------------------------------------------------------------- attack

CONCEPT, OTHER = "A circle image in Ember style.", "A square image in Lagoon style."


@pytest.fixture(scope="module")
def two_concept_model(tiny_world: Path):
    """The tiny world's pipeline drawing one of two flat-colour images: CONCEPT's prompt gives the first with
    probability 0.95, OTHER's the second with probability 0.95 (an exact model, see two_concepts.py; not erased)."""
    from two_concepts import TwoConceptDenoiser

    from generators.sd import load_sd_pipeline

    pipe = load_sd_pipeline(tiny_world / "sd")
    images = torch.tensor([[0.9, -0.6, -0.8], [-0.7, -0.2, 0.9]]).view(2, 3, 1, 1).expand(2, 3, 32, 32)
    images = images.contiguous()
    with torch.no_grad():
        raw = pipe.vae.encode(images).latent_dist.mean
        pipe.vae.register_to_config(scaling_factor=float(0.05 / raw.std()))
        tokens = pipe.tokenizer([CONCEPT, OTHER], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                return_tensors="pt").input_ids
        cond = pipe.text_encoder(tokens)[0]
        model = TwoConceptDenoiser(embed_dim=cond.shape[-1])
        gap = cond.mean(1)[0] - cond.mean(1)[1]
        model.direction.copy_(gap / gap.norm())
        model.concepts.copy_(raw * pipe.vae.config.scaling_factor)
        model.alphas.copy_(pipe.scheduler.alphas_cumprod)
        score_concept, score_other = model.score(cond)
        model.mid.fill_(float(score_concept + score_other) / 2)
        model.beta.fill_(float(torch.log(torch.tensor(19.0)) / ((score_concept - score_other) / 2)))
        drawn = pipe.vae.decode(raw).sample.clamp(-1, 1)
    pipe.unet = model
    return pipe, images, drawn


@pytest.mark.parametrize("space", ["tokens", "embeddings"])
def test_the_attack_raises_asr_on_a_model_that_was_not_erased(two_concept_model, space: str) -> None:
    pipe, images, drawn = two_concept_model
    sampler = SDSampler(pipe)
    settings = SamplerSettings(steps=10, guidance=1.0)

    def nearest(generated: torch.Tensor, concept: object) -> torch.Tensor:
        """Judge: is the image nearer to the concept's image than to the other one?"""
        to_concept = (generated - drawn[0]).pow(2).flatten(1).mean(1)
        to_other = (generated - drawn[1]).pow(2).flatten(1).mean(1)
        return to_concept < to_other

    judge = FunctionJudge(nearest)
    concept = Target.parse("style:Ember")
    seeds = [0, 1, 2]
    # The model shows the concept for its own prompt, and not for the other prompt.
    assert judge.shows(sampler.images([CONCEPT] * 3, seeds, settings), concept).all()

    # UnlearnDiffAtk on the other prompt, towards the concept's image: 5 prefix tokens (or embeddings), lr 0.01.
    attack = AttackSettings(steps=40, check_every=10, seed=0, space=space)
    outcome = attack_prompts(sampler, judge, concept, [OTHER] * 3, seeds, images[:1].expand(3, -1, -1, -1),
                             settings, attack)
    assert outcome.pre_attack.tolist() == [False, False, False]
    assert outcome.attacked.tolist() == [True, True, True]
    assert outcome.rates() == {"pre_asr": 0.0, "asr": 1.0}
    if space == "tokens":  # attacked side by side or in smaller groups: the same attacks
        for batch_size in (1, 2):
            grouped = attack_prompts(sampler, judge, concept, [OTHER] * 3, seeds, images[:1].expand(3, -1, -1, -1),
                                     settings, AttackSettings(steps=40, check_every=10, batch_size=batch_size))
            assert grouped.attacked.tolist() == [True, True, True]
            assert [len(lo) for lo in grouped.losses] == [len(lo) for lo in outcome.losses]
            for got, want in zip(grouped.losses, outcome.losses):
                assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-6)
        with pytest.raises(ValueError, match="batch_size"):
            AttackSettings(batch_size=0)
        return

    # The attack objective goes down (measured on the same noise and timesteps before and after).
    latents = encode_images(pipe.vae, images[:1])
    result = optimize_prefix_embeddings(pipe, OTHER, latents, steps=40, generator=torch.Generator().manual_seed(1))
    assert len(result.losses) == 40 and not result.stopped_early
    prompt = build_prefix_prompt(pipe.tokenizer, OTHER, 5)
    init = init_prefix(pipe.text_encoder, 5, torch.Generator().manual_seed(1))  # the attack's own start

    def fixed_loss(prefix: torch.Tensor) -> float:
        with torch.no_grad():
            return float(denoising_loss(pipe, prompt, prefix, latents.expand(256, -1, -1, -1),
                                        torch.Generator().manual_seed(2)))

    assert fixed_loss(result.prefix) < 0.5 * fixed_loss(init)
    assert result.prompt_embeds.shape == (1, pipe.tokenizer.model_max_length, 16)


def test_the_token_attack_judges_typed_prompts_and_stops_at_the_first_success(two_concept_model) -> None:
    pipe = two_concept_model[0]
    latents = encode_images(pipe.vae, two_concept_model[1][:1])
    judged: list[torch.Tensor] = []

    def never(embeds: torch.Tensor) -> bool:
        judged.append(embeds)
        return False

    result = optimize_prefix_tokens(pipe, OTHER, latents, k=3, iterations=5, blocks=2,
                                    generator=torch.Generator().manual_seed(0), check=never)
    assert (result.steps, result.blocks, len(judged), result.succeeded) == (10, 2, 2, False)
    # What is judged is the prompt's own ids with vocabulary tokens in the prefix slots, encoded as typed text is.
    length = pipe.tokenizer.model_max_length
    plain = pipe.tokenizer(OTHER, padding="max_length", max_length=length, return_tensors="pt").input_ids
    assert result.prompt_ids[0, 1:4].tolist() == result.tokens.tolist()
    assert torch.equal(result.prompt_ids[0, 4:], plain[0, 1 : length - 3])
    assert 0 <= int(result.tokens.min()) and int(result.tokens.max()) < len(pipe.tokenizer)
    with torch.no_grad():
        assert torch.allclose(judged[-1], pipe.text_encoder(result.prompt_ids)[0])
    assert result.text == pipe.tokenizer.decode(result.tokens.tolist())

    calls: list[int] = []
    stopped = optimize_prefix_tokens(pipe, OTHER, latents, k=3, iterations=5, blocks=4,
                                     generator=torch.Generator().manual_seed(0),
                                     check=lambda embeds: calls.append(1) is None)
    assert (stopped.succeeded, stopped.blocks, stopped.steps, len(calls)) == (True, 1, 5, 1)


def test_simplex_projection_solves_unlearndiffatks_bisection_exactly() -> None:
    rows = torch.randn(4, 300, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.05 + 1 / 300
    projected = project_to_simplex(rows)
    assert (projected >= 0).all() and torch.allclose(projected.sum(-1), torch.ones(4, dtype=torch.float64))
    for row, got in zip(rows, projected):  # the reference: bisection on mu with sum(clip(a - mu, 0, 1)) = 1
        low, high = float(row.min()) - 1, float(row.max())
        while high - low > 1e-12:
            mid = (low + high) / 2
            low, high = (mid, high) if float((row - mid).clamp(0, 1).sum()) > 1 else (low, mid)
        assert torch.allclose(got, (row - high).clamp(0, 1), atol=1e-9)
    on_simplex = torch.softmax(torch.randn(3, 50, dtype=torch.float64), -1)
    assert torch.allclose(project_to_simplex(on_simplex), on_simplex)


def test_prompts_attacked_side_by_side_are_each_attacked_as_alone(two_concept_model) -> None:
    pipe, images = two_concept_model[:2]
    prompts = [OTHER, CONCEPT, OTHER]
    latents = encode_images(pipe.vae, images[[0, 1, 0]])
    succeeds_at = {0: None, 1: 1, 2: 2}  # the judgement (1st, 2nd...) at which each prompt's attack succeeds
    calls: list[list[int]] = []
    judged = {i: 0 for i in succeeds_at}

    def check(indices: list[int], embeds: torch.Tensor) -> list[bool]:
        calls.append(list(indices))
        assert embeds.shape[0] == len(indices)
        for i in indices:
            judged[i] += 1
        return [judged[i] == succeeds_at[i] for i in indices]

    finished: list[tuple[int, int]] = []
    together = optimize_prefix_tokens_batch(
        pipe, prompts, latents, k=3, iterations=4, blocks=3,
        generators=[torch.Generator().manual_seed(10 + i) for i in range(3)], check=check,
        on_finish=lambda i, result: finished.append((i, result.steps)),
    )
    assert calls == [[0, 1, 2], [0, 2], [0]]  # a prompt that succeeded is neither attacked nor judged again
    assert finished == [(1, 4), (2, 8), (0, 12)]  # reported as each attack ends
    for i, prompt in enumerate(prompts):
        count = {"n": 0}

        def alone_check(embeds: torch.Tensor, i: int = i, count: dict = count) -> bool:
            count["n"] += 1
            return count["n"] == succeeds_at[i]

        alone = optimize_prefix_tokens(pipe, prompt, latents[i : i + 1], k=3, iterations=4, blocks=3,
                                       generator=torch.Generator().manual_seed(10 + i), check=alone_check)
        got = together[i]
        assert (got.steps, got.blocks, got.succeeded) == (alone.steps, alone.blocks, alone.succeeded)
        assert got.tokens.tolist() == alone.tokens.tolist() and got.text == alone.text
        assert torch.allclose(torch.tensor(got.losses), torch.tensor(alone.losses), rtol=1e-4, atol=1e-6)
    assert [r.steps for r in together] == [12, 4, 8]
    with pytest.raises(ValueError, match="target latents"):
        optimize_prefix_tokens_batch(pipe, prompts, latents[:2])


def test_simplex_projection_reads_only_the_largest_entries_and_matches_a_full_sort() -> None:
    def full_sort(rows: torch.Tensor) -> torch.Tensor:
        ordered = rows.sort(dim=-1, descending=True).values
        excess = ordered.cumsum(-1) - 1
        rank = torch.arange(1, rows.shape[-1] + 1, dtype=rows.dtype)
        kept = (ordered - excess / rank > 0).sum(-1, keepdim=True)
        return (rows - excess.gather(-1, kept - 1) / kept).clamp_min(0)

    g = torch.Generator().manual_seed(0)
    n = 20_000
    wide = 1 / n + torch.rand(3, n, generator=g) * 1e-6  # nearly uniform: the support is almost every entry
    peaked = torch.rand(3, n, generator=g) * 0.01 - 0.005  # a few hundred entries above the threshold
    peaked[:, :5] += torch.tensor([0.5, 0.3, 0.2, 0.1, 0.05])
    middle = torch.rand(3, n, generator=g) * 0.0064  # a support of about 2,500 (sqrt(2n / 0.0064)): widened once
    for rows in (wide, peaked, middle, torch.cat([wide, peaked])):
        assert torch.equal(project_to_simplex(rows), full_sort(rows))
    assert int((project_to_simplex(wide) > 0).sum(-1).min()) > 10_000
    assert 1_024 < int((project_to_simplex(middle) > 0).sum(-1).max()) < 4_096


def test_token_attack_schedule_and_straight_through_gradient() -> None:
    assert attack_timesteps(1000, 50) == list(range(10, 1000, 20))  # the reference's sampled_t (n_samples 50)
    assert attack_timesteps(1000, 2) == [250, 750]
    assert attack_timesteps(1000, 5) == [100, 300, 500, 700, 900]
    with pytest.raises(ValueError, match="multiple"):
        AttackSettings(steps=50, check_every=20)
    assert AttackSettings(steps=100, check_every=20).blocks == 5 and AttackSettings(check_every=0).blocks == 1

    probs = torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    table = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, -1.0]])
    embedding = _SampledEmbedding.apply(probs, table, torch.Generator().manual_seed(0))
    assert embedding.tolist() == [[0.0, 2.0]]  # the only token with probability: its row of the table
    (embedding * torch.tensor([[1.0, 0.25]])).sum().backward()
    # The gradient of its one-hot ([1, 0.25] @ table.T = [1, 0.5, 2.75]) passed straight through, clipped to [-1, 1].
    assert probs.grad.tolist() == [[1.0, 0.5, 1.0]]


def test_prefix_embeddings_sit_after_the_start_token(tiny_pipe) -> None:
    prompt = build_prefix_prompt(tiny_pipe.tokenizer, "A circle image in Ember style.", 5)
    length = tiny_pipe.tokenizer.model_max_length
    plain = tiny_pipe.tokenizer("A circle image in Ember style.", padding="max_length", max_length=length,
                                return_tensors="pt").input_ids
    assert prompt.input_ids.shape == (1, length)
    assert torch.equal(prompt.input_ids[0, 6:], plain[0, 1 : length - 5])
    prefix = torch.randn(5, 16, requires_grad=True)
    embeds = encode_with_prefix(tiny_pipe.text_encoder, prompt, prefix)
    (grad,) = torch.autograd.grad(embeds.sum(), [prefix])  # differentiable in the prefix
    assert grad.abs().sum() > 0
    # Positions before the prefix (the start token) do not depend on it: the text encoder is causal.
    other = encode_with_prefix(tiny_pipe.text_encoder, prompt, torch.randn(5, 16))
    assert torch.allclose(embeds[:, 0], other[:, 0]) and not torch.allclose(embeds[:, 6], other[:, 6])

    # The attack touches no model parameter's .grad (AdvUnlearn trains the text encoder around it).
    latents = torch.randn(1, 4, 16, 16)
    result = optimize_prefix_embeddings(tiny_pipe, "A circle image in Ember style.", latents, steps=2,
                                        generator=torch.Generator().manual_seed(0))
    assert len(result.losses) == 2 and result.prefix.shape == (5, 16)
    assert all(p.grad is None for p in [*tiny_pipe.unet.parameters(), *tiny_pipe.text_encoder.parameters()])


def test_a_teacher_attack_batches_its_targets_without_changing_the_attack(tiny_pipe) -> None:
    """With a teacher and no stop check, every step's noise and teacher target are drawn up front and the teacher
    runs batched (AdvUnlearn's inner attack): the same prefix, losses and generator state as one draw per step."""
    unet, prompt = tiny_pipe.unet, "A circle image in Ember style."
    cond = encode_with_prefix(tiny_pipe.text_encoder, build_prefix_prompt(tiny_pipe.tokenizer, prompt, 3),
                              torch.zeros(3, 16))
    calls: list[int] = []

    def teacher(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(x_t.shape[0])
        return unet(x_t, t, encoder_hidden_states=cond.expand(x_t.shape[0], -1, -1)).sample

    latents = torch.randn(2, 4, 16, 16)
    init = torch.randn(3, 16)
    results, states = [], []
    for check in (None, lambda embeds: False):  # a check (never due at check_every=0) keeps the per-step path
        generator = torch.Generator().manual_seed(4)
        results.append(optimize_prefix_embeddings(tiny_pipe, prompt, latents, k=3, steps=10, lr=0.05,
                                                  generator=generator, init=init, teacher=teacher, check=check))
        states.append(torch.randn(3, generator=generator))
    batched, stepwise = results
    assert calls == [16, 4] + [2] * 10  # 10 steps x 2 latents in batches of 8 steps, then one call per step
    assert torch.allclose(batched.prefix, stepwise.prefix, atol=1e-5)
    assert batched.losses == pytest.approx(stepwise.losses, rel=1e-4)
    assert not torch.allclose(batched.prefix, init)  # the attack moved
    assert torch.equal(states[0], states[1])  # the generator is left where the step-by-step attack leaves it


# ----------------------------------------------------------------------------------------------------- suites

CANVAS_KEYS = {"ua", "ira", "cra", "fid", "clip_score"}
HUB_KEYS = {"target_proportion", "quality_fid", "alignment", "selective_alignment", "pinpoint", "multilingual",
            "pre_attack_asr", "attack_asr"}
GAN_KEYS = {"target_frac_before", "target_frac_after", "fid", "fid_ratio", "kept_share", "clip_unlearning"}


@pytest.mark.slow
def test_canvas_and_hub_smoke_report_every_key_and_reuse_the_cache(world_env: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    subject = load_subject("minicanvas-sd", torch.device("cpu"))
    cache = GenerationCache(tmp_path / "cache")
    report = run_suites(subject, Target.parse("style:Ember"), ["canvas", "hub"], "smoke", cache=cache,
                        log=lambda line: None)
    assert set(report.results["canvas"]) == CANVAS_KEYS
    assert set(report.results["hub"]) == HUB_KEYS
    values = flatten(report.results)
    for key in ("canvas.ua", "canvas.ira", "canvas.cra", "hub.target_proportion", "hub.pinpoint",
                "hub.selective_alignment", "hub.multilingual", "hub.pre_attack_asr", "hub.attack_asr"):
        assert 0.0 <= values[key] <= 1.0, key
    assert values["hub.attack_asr"] >= values["hub.pre_attack_asr"]
    assert values["canvas.fid"] >= 0 and 0 <= values["canvas.clip_score"] <= 100
    assert values["hub.quality_fid"] == pytest.approx(0.0, abs=1e-6)  # an unchanged model against itself
    assert cache.misses > 0

    # Evaluating again generates nothing (the attack's own generations are never cached, so canvas only).
    monkeypatch.setattr("evaluate.sampling.sample_sd", lambda *a, **k: pytest.fail("regenerated"))
    again = run_suites(load_subject("minicanvas-sd", torch.device("cpu")), Target.parse("style:Ember"), ["canvas"],
                       "smoke", cache=cache, log=lambda line: None)
    assert again.results["canvas"] == report.results["canvas"]


@pytest.mark.slow
def test_gan_suite_compares_original_and_erased_generators(world_env: Path, tmp_path: Path) -> None:
    from evaluate.subject import subject_from_weights
    from generators.registry import resolve_backbone

    backbone = resolve_backbone("minicanvas-gan")
    zero = {"generator": {"input.input": torch.zeros(1, 4, 4, 4)}}
    subject = subject_from_weights(backbone, zero, torch.device("cpu"))
    report = run_suites(subject, Target.parse("object:circle"), ["gan"], "smoke",
                        cache=GenerationCache(tmp_path / "c"), log=lambda line: None)
    got = report.results["gan"]
    assert set(got) == GAN_KEYS
    assert 0 <= got["target_frac_before"] <= 1 and 0 <= got["target_frac_after"] <= 1
    assert 0 <= got["kept_share"] <= 1 and got["clip_unlearning"] > 0  # zeroed input: the samples changed
    assert got["fid"] > 0 and 0 < got["fid_ratio"] < float("inf")


@pytest.mark.slow
def test_unlearncanvas_protocol_with_tiny_stand_ins(world_env: Path, tmp_path: Path) -> None:
    """UnlearnCanvas' protocol path: ViT judges from checkpoints, Inception from a file, dataset JPEGs, local CLIP."""
    import timm
    from PIL import Image
    from torchvision.models import inception_v3

    from evaluate.fid import InceptionFeatures
    from evaluate.protocols import (
        UNLEARNCANVAS_OBJECTS,
        UNLEARNCANVAS_STYLES,
        CanvasTier,
        UnlearnCanvasAssets,
        UnlearnCanvasProtocol,
    )

    kwargs = {"img_size": 32, "patch_size": 16, "embed_dim": 16, "depth": 1, "num_heads": 2}
    paths = {}
    for axis, names in (("style", UNLEARNCANVAS_STYLES), ("object", UNLEARNCANVAS_OBJECTS)):
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=len(names), **kwargs)
        paths[axis] = tmp_path / f"{axis}50.pth"
        torch.save({"model_state_dict": model.state_dict()}, paths[axis])
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tmp_path / "inc.pth")
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1), (38, 2)]  # (38 = Seed_Images)
    for s, o in pairs:
        folder = tmp_path / "data" / UNLEARNCANVAS_STYLES[s] / UNLEARNCANVAS_OBJECTS[o]
        folder.mkdir(parents=True)
        Image.new("RGB", (40, 40), (30 * s % 255, 90, 40 * o)).save(folder / "1.jpg")

    class Small(UnlearnCanvasProtocol):
        """The real protocol on five pairs, 32 px and 2 DDIM steps; Inception fed 75 px (its minimum)."""

        def pairs(self, tier: str) -> list[tuple[int, int]]:
            return pairs

        def fid_features(self) -> torch.nn.Module:
            return InceptionFeatures(self.assets.inception_weights, input_size=75)

    settings = SamplerSettings(steps=2, guidance=9.0, height=32, width=32, scheduler="ddim")
    assets = UnlearnCanvasAssets(paths["style"], paths["object"], tmp_path / "inc.pth", tmp_path / "data",
                                 world_env / "clip", judge_arch="vit_tiny_patch16_224")
    protocol = Small(assets, tiers={"smoke": CanvasTier((188,), settings, 1)}, judge_kwargs=kwargs)
    assert protocol.prompt("Van_Gogh", "Cats") == "A Cats image in Van Gogh style."
    subject = load_subject(str(world_env / "sd"), torch.device("cpu"))
    scheduler = subject.model.scheduler
    report = run_suites(subject, Target.parse("style:Abstractionism"), ["canvas"], "smoke", protocol=protocol,
                        log=lambda line: None)
    assert set(report.results["canvas"]) == CANVAS_KEYS
    assert subject.model.scheduler is scheduler  # sampled with a DDIM copy, then restored

    missing = UnlearnCanvasProtocol(UnlearnCanvasAssets(), tiers={"smoke": CanvasTier((188,), settings, 1)})
    from erasure.errors import UserError

    with pytest.raises(UserError, match="--style-classifier"):
        missing.judge()
    with pytest.raises(UserError, match="--inception-weights"):
        missing.fid_features()


# -------------------------------------------------------------------------------------------------------- CLI


def test_evaluate_needs_a_model_and_a_judgeable_target(world_env: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--suite", "canvas"])
    assert result.exit_code == 2 and "SOURCE argument or --model" in result.output
    result = runner.invoke(app, ["evaluate", "--model", "minicanvas-sd", "--suite", "canvas", "--target", "text:a cat"])
    assert result.exit_code == 2 and "style:<name> or object:<name>" in result.output
    result = runner.invoke(app, ["evaluate", "--model", "minicanvas-sd", "--suite", "nope", "--target", "style:Ember"])
    assert result.exit_code == 2 and "unknown evaluation suite 'nope'" in result.output
    result = runner.invoke(app, ["evaluate", "--model", "minicanvas-sd", "--suite", "canvas", "--target", "style:Nope"])
    assert result.exit_code == 2 and "not a style of the minicanvas protocol" in result.output


@pytest.mark.slow
def test_erase_runs_its_suites_and_evaluate_reads_the_run(
    world_env: Path, tmp_path: Path, shift_method: type[ErasureMethod]
) -> None:
    job = {
        "name": "shifted", "seed": 0, "device": "cpu", "backbone": "minicanvas-sd",
        "method": {"name": "test_shift", "params": {"shift": 0.5, "steps": 1}},
        "target": "style:Ember", "evaluate": {"suites": ["canvas"], "tier": "smoke"},
    }  # fmt: skip
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job))
    run = tmp_path / "run"
    result = runner.invoke(app, ["erase", str(config), "--out", str(run)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"method", "efficiency", "canvas"}
    assert set(metrics["canvas"]) == CANVAS_KEYS
    assert set(metrics["efficiency"]) == {"erase_time_s", "peak_mem_mb", "storage_mb"}
    assert metrics["efficiency"]["storage_mb"] > 0 and metrics["efficiency"]["peak_mem_mb"] > 0
    env = json.loads((run / "env.json").read_text())
    assert "evaluate.canvas" in env["timings_s"]

    # `evaluate RUN` re-applies the run's weights on its base backbone and takes the run's target.
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["evaluate", str(run), "--suite", "canvas", "--tier", "smoke", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["target"] == "style:Ember" and report["tier"] == "smoke"
    assert report["canvas"] == metrics["canvas"]  # same weights, same seeds: same numbers


def test_run_subject_applies_the_saved_tensors(tmp_path: Path, tiny_pipeline: Path,
                                              shift_method: type[ErasureMethod]) -> None:
    job = {"name": "s", "device": "cpu", "backbone": str(tiny_pipeline), "target": "text:a red car",
           "method": {"name": "test_shift", "params": {"shift": 0.25, "steps": 1}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert runner.invoke(app, ["erase", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "run")]).exit_code == 0
    subject = load_subject(str(tmp_path / "run"), torch.device("cpu"))
    assert isinstance(subject, EvalSubject) and subject.is_erased
    shifted = subject.model.unet.conv_in.bias - subject.original().unet.conv_in.bias
    assert torch.allclose(shifted, torch.full_like(shifted, 0.25))
