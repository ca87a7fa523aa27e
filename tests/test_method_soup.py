"""Diffusion Soup: the world's soup-base stage (style restriction), the soup maths, and the method end to end on a
tiny random MiniCanvas world (numbers measured on it are meaningless; the machinery and the maths are real)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from erasure.config import validate_job
from erasure.errors import ConfigError
from generators.minicanvas.concepts import STYLES
from generators.minicanvas.paths import WORLD_ENV_VAR

SHARDS = [["Lagoon", "Frost"], ["Meadow", "Candy"], ["Cocoa", "Comic"]]
BASE_STEPS, BASE_BATCH = 3, 4
TINY_JOB: dict[str, Any] = {
    "shard_steps": 2, "batch_size": 2, "warmup": 1, "eval_seeds": [0], "eval_steps": 2, "eval_base": True,
}  # fmt: skip


@pytest.fixture(scope="module")
def soup_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny world with its soup base built by ``world.build(only=["soup"])``, every rendered label recorded."""
    from tiny_world import build_tiny_world

    from generators.minicanvas import dataset, train, world
    from generators.minicanvas.train import StageSettings, WorldSettings

    base = tmp_path_factory.mktemp("soup")
    root = build_tiny_world(base / "world")
    settings = WorldSettings(soup_base=StageSettings(steps=BASE_STEPS, batch=BASE_BATCH, lr=1e-3, warmup=1, seed=8),
                             checkpoint_every=2)
    rendered: list[torch.Tensor] = []
    real_render = dataset.render

    def recording_render(style_idx, object_idx, generator, *args, **kwargs):
        rendered.append(style_idx.clone())
        return real_render(style_idx, object_idx, generator, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dataset, "render", recording_render)
        patch.setattr(train, "render", recording_render)  # the shared UNet trainer's reference
        info = world.build(only=["soup"], out_dir=root, work_dir=base / "work", settings=settings)
    return {"root": root, "work": base / "work", "info": info, "rendered": rendered, "tmp": base}


@pytest.fixture
def world_env(soup_world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(WORLD_ENV_VAR, str(soup_world["root"]))
    monkeypatch.setenv("ERASURE_STUDIO_CACHE", str(soup_world["tmp"] / "generations"))
    return soup_world["root"]


def _job(name: str, target: str, cache: Path, **params: Any):
    return validate_job(
        {"name": name, "device": "cpu", "backbone": "minicanvas-sd", "target": target,
         "method": {"name": "soup", "params": {**TINY_JOB, "cache_dir": str(cache), **params}},
         "evaluate": {"suites": []}, "checkpoint_every": 1},
        source="test",
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- world stage


def test_sample_labels_default_stream_is_unchanged_and_styles_restrict_it() -> None:
    from generators.minicanvas.concepts import OBJECTS
    from generators.minicanvas.dataset import sample_labels

    s, o = sample_labels(64, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    assert torch.equal(s, torch.randint(0, len(STYLES), (64,), generator=g))
    assert torch.equal(o, torch.randint(0, len(OBJECTS), (64,), generator=g))
    s, _ = sample_labels(500, torch.Generator().manual_seed(3), styles=[2, 7])
    assert set(s.tolist()) == {2, 7}
    with pytest.raises(ValueError):
        sample_labels(4, torch.Generator(), styles=[len(STYLES)])


def test_soup_stage_never_trains_on_shard_styles_and_ships_a_loadable_unet(soup_world: dict[str, Any]) -> None:
    from diffusers import StableDiffusionPipeline

    from generators.minicanvas.soup import read_soup_info, soup_base_dir, soup_pipeline

    root = soup_world["root"]
    seen = torch.cat(soup_world["rendered"])
    assert len(seen) == BASE_STEPS * BASE_BATCH  # one render per training step, nothing else drawn
    shard_idx = {STYLES.index(name) for shard in SHARDS for name in shard}
    assert not shard_idx & set(seen.tolist())
    info = read_soup_info(soup_base_dir(root))
    assert info["shards"] == SHARDS
    assert info["base_styles"] == ["Ember", "Cinder", "Dusk", "Neon", "Mosaic", "Ink"]
    assert "soup" in soup_world["info"]["stages"]
    assert (soup_world["work"] / "soup_base.state.safetensors").is_file()  # resumable like every stage
    unet_files = sorted(p.name for p in (soup_base_dir(root) / "unet").iterdir())
    assert "config.json" in unet_files and any(name.endswith(".safetensors") for name in unet_files)

    pipe = soup_pipeline(root)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.dtype == torch.float32
    sd = StableDiffusionPipeline.from_pretrained(root / "sd", local_files_only=True)
    differs = any(not torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(),
                                                        sd.unet.state_dict().values()))
    assert differs  # a UNet of its own, with MiniSD's other components


def test_world_settings_reject_bad_shards() -> None:
    from pydantic import ValidationError

    from generators.minicanvas.train import WorldSettings

    for shards in ([["Lagoon"]], [["Lagoon"], ["Lagoon", "Frost"]], [["Lagoon"], ["Dragon"]], [STYLES[:6], STYLES[6:]]):
        with pytest.raises(ValidationError):
            WorldSettings(soup_shards=shards)


# ----------------------------------------------------------------------------------------------- maths


def test_removing_a_shard_equals_the_mean_of_the_others() -> None:
    from erasure.methods.soup import soup_average, soup_remove

    torch.manual_seed(0)
    shapes = {"a.weight": (16, 8), "b.bias": (16,), "c.weight": (4, 4, 3, 3)}
    states = [{k: torch.randn(s) * 3 for k, s in shapes.items()} for _ in range(4)]
    states[0]["steps"] = torch.tensor([7])  # non-float tensors are carried, not averaged
    for state in states[1:]:
        state["steps"] = torch.tensor([7])
    soup = soup_average(states)
    for k in shapes:
        assert soup[k].dtype == torch.float32
        assert torch.allclose(soup[k], torch.stack([s[k] for s in states]).mean(0), atol=1e-6)
    for removed in range(4):
        rest = [s for i, s in enumerate(states) if i != removed]
        unlearned = soup_remove(soup, states[removed], len(states))
        for k in shapes:
            expected = torch.stack([s[k] for s in rest]).double().mean(0).float()
            assert (unlearned[k] - expected).abs().max() <= 1e-6
            assert (soup_average(rest)[k] - expected).abs().max() <= 1e-6
        assert torch.equal(unlearned["steps"], torch.tensor([7]))


# ----------------------------------------------------------------------------------------------- the method


def test_soup_job_removes_a_shard_and_a_second_job_reuses_the_cache(world_env: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from erasure.export import export_diffusers
    from erasure.io import load_tensors
    from erasure.runner import run_erase

    cache = tmp_path / "cache"
    steps: list[int] = []
    run = run_erase(_job("soup-a", "style:Meadow", cache), tmp_path / "runs" / "a", echo=lambda line: None,
                    on_progress=lambda step, total, scalars: steps.append(step))
    metrics = json.loads((run / "metrics.json").read_text())
    soup = metrics["soup"]
    assert soup["trained_steps"] == 3 * TINY_JOB["shard_steps"] == len(steps)
    assert soup["cache_hits"] == 0 and soup["num_shards"] == 3 and soup["removed_shard"] == 1
    for key in ("removed_ua", "kept_retention", "removal_seconds", "kept_acc_before", "kept_acc_after"):
        assert key in soup
    assert set(soup["before_acc"]) == set(soup["after_acc"]) == set(soup["base_acc"]) == {"shard_0", "shard_1",
                                                                                       "shard_2"}
    assert 0 <= soup["removed_ua"] <= 1 and soup["removed_ua"] == pytest.approx(1 - soup["after_acc"]["shard_1"])
    assert 0 <= soup["removal_seconds"] <= 10
    assert not any(key.startswith("soup.") for key in metrics["method"])  # lifted into the soup section

    # The run's UNet is the mean of the kept shards' fine-tunes, to fp32 rounding; the export opens as a pipeline.
    shard_files = sorted(cache.rglob("*.safetensors"))
    assert len(shard_files) == 3
    by_styles = {}
    for path in shard_files:
        tensors, meta = load_tensors(path)
        by_styles[tuple(json.loads(meta["soup_key"])["shard"])] = tensors
    kept = [by_styles[("Lagoon", "Frost")], by_styles[("Cocoa", "Comic")]]
    weights = load_tensors(run / "weights" / "unet.safetensors")[0]
    for key, value in weights.items():
        assert (value - (kept[0][key].double() + kept[1][key].double()).div(2).float()).abs().max() <= 1e-6
    exported = export_diffusers(run, tmp_path / "exported")
    pipe = StableDiffusionPipeline.from_pretrained(exported, local_files_only=True)
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], weights["conv_in.weight"])

    # Same base, shards and settings: every shard comes from the cache, no training step at all.
    steps.clear()
    run_b = run_erase(_job("soup-b", "style:frost", cache, eval_base=False, removal="average"),
                      tmp_path / "runs" / "b", echo=lambda line: None,
                      on_progress=lambda step, total, scalars: steps.append(step))
    soup_b = json.loads((run_b / "metrics.json").read_text())["soup"]
    assert soup_b["trained_steps"] == 0 and soup_b["cache_hits"] == 3 and steps == []
    assert soup_b["removed_shard"] == 0 and "base_acc" not in soup_b
    assert soup_b["before_acc"] == soup["before_acc"]  # the same soup, measured with the same seeds
    assert len(sorted(cache.rglob("*.safetensors"))) == 3


def test_shard_fine_tune_resumes_bit_identically(world_env: Path, tmp_path: Path) -> None:
    """A job killed mid-shard resumes from its checkpoint and stores the same shard as an uninterrupted job."""
    from erasure.io import load_tensors
    from erasure.runner import run_erase
    from erasure.runs import checkpoint_dir_for

    class Killed(Exception):
        pass

    def kill_at_2(step: int, total: int, scalars: dict[str, float]) -> None:
        if step == 2:
            raise Killed

    params = {"shard_steps": 3, "shards": [["Lagoon"], ["Frost"]], "eval_base": False}
    straight = tmp_path / "straight"
    run_erase(_job("soup-s", "style:Lagoon", straight, **params), tmp_path / "runs" / "s", echo=lambda line: None)
    resumed = tmp_path / "resumed"
    job, dest = _job("soup-r", "style:Lagoon", resumed, **params), tmp_path / "runs" / "r"
    with pytest.raises(Killed):
        run_erase(job, dest, echo=lambda line: None, on_progress=kill_at_2)
    assert (checkpoint_dir_for(dest) / "shard_0" / "training_state.safetensors").is_file()
    assert not resumed.exists()  # the interrupted shard never reached the cache
    steps: list[int] = []
    run_erase(job, dest, echo=lambda line: None, on_progress=lambda step, total, scalars: steps.append(step))
    assert steps == [3, 4, 5, 6]  # shard 0 from step 3 on, then all of shard 1
    a = {json.loads(m["soup_key"])["shard"][0]: t for t, m in map(load_tensors, straight.rglob("*.safetensors"))}
    b = {json.loads(m["soup_key"])["shard"][0]: t for t, m in map(load_tensors, resumed.rglob("*.safetensors"))}
    assert a.keys() == b.keys() == {"Lagoon", "Frost"}
    for style, tensors in a.items():
        assert all(torch.equal(value, b[style][k]) for k, value in tensors.items())


def test_soup_refuses_what_it_cannot_do(world_env: Path, tmp_path: Path, tiny_pipeline: Path) -> None:
    from erasure.runner import run_erase

    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match="in no shard"):
        run_erase(_job("x", "style:Ember", cache), tmp_path / "x", echo=lambda line: None)
    with pytest.raises(ConfigError, match="trained on"):
        run_erase(_job("y", "style:Ember", cache, shards=[["Ember"], ["Lagoon"]]), tmp_path / "y",
                  echo=lambda line: None)
    job = validate_job(
        {"name": "z", "device": "cpu", "backbone": str(tiny_pipeline), "target": "style:lower",
         "method": {"name": "soup", "params": {"cache_dir": str(cache)}}, "evaluate": {"suites": []}},
        source="test",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="only the MiniCanvas world"):
        run_erase(job, tmp_path / "z", echo=lambda line: None)
    assert not cache.exists()  # nothing trained
