"""``export RUN --format diffusers``: a full pipeline folder that plain from_pretrained opens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from erasure.cli import app

CHANGED = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
runner = CliRunner()


def make_run(
    folder: Path, backbone: Path, weights: dict[str, dict[str, torch.Tensor]], finished: bool = True
) -> Path:
    """A hand-made run folder, as `erase` would write it."""
    (folder / "weights").mkdir(parents=True)
    (folder / "samples").mkdir()
    config = {"name": folder.name, "backbone": str(backbone), "method": {"name": "hand_made", "params": {}}}
    (folder / "config.resolved.yaml").write_text(yaml.safe_dump(config))
    for component, tensors in weights.items():
        save_file(tensors, folder / "weights" / f"{component}.safetensors")
    if finished:
        (folder / "metrics.json").write_text(json.dumps({"method": {}, "suites": {}}))
    return folder


def unet_state(pipeline: Path) -> dict[str, torch.Tensor]:
    return load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")


def test_export_applies_the_changed_tensors_to_a_full_pipeline(tmp_path: Path, tiny_pipeline: Path) -> None:
    from diffusers import StableDiffusionPipeline

    base = unet_state(tiny_pipeline)
    new_value = torch.full_like(base[CHANGED], 0.125)
    run = make_run(tmp_path / "run", tiny_pipeline, {"unet": {CHANGED: new_value}})
    out = tmp_path / "exported"

    result = runner.invoke(app, ["export", str(run), "--format", "diffusers", "--out", str(out)])

    assert result.exit_code == 0, result.output
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    state = pipe.unet.state_dict()
    assert torch.equal(state[CHANGED], new_value)
    other = "conv_in.weight"
    assert torch.equal(state[other], base[other])
    assert torch.equal(unet_state(tiny_pipeline)[CHANGED], base[CHANGED])  # the base is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "run"]


def test_export_refuses_an_existing_folder_unless_overwrite(tmp_path: Path, tiny_pipeline: Path) -> None:
    base = unet_state(tiny_pipeline)
    run = make_run(tmp_path / "run", tiny_pipeline, {"unet": {CHANGED: base[CHANGED] + 1}})
    out = tmp_path / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    refused = runner.invoke(app, ["export", str(run), "--out", str(out)])
    assert refused.exit_code == 1 and "already exists" in refused.output
    still_refused = runner.invoke(app, ["export", str(run), "--out", str(out), "--overwrite"])
    assert still_refused.exit_code == 1 and "not a diffusers pipeline folder" in still_refused.output
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("finished", "weights", "message"),
    [
        (False, {}, "not a finished run"),
        (True, {"unet": {"no.such.tensor": torch.zeros(1)}}, "no.such.tensor"),
        (True, {"refiner": {"w": torch.zeros(1)}}, "names no component"),
    ],
    ids=["unfinished-run", "unknown-tensor", "unknown-component"],
)
def test_export_refuses_bad_runs(
    tmp_path: Path,
    tiny_pipeline: Path,
    finished: bool,
    weights: dict[str, dict[str, torch.Tensor]],
    message: str,
) -> None:
    run = make_run(tmp_path / "run", tiny_pipeline, weights, finished=finished)
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "exported")])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "exported").exists()
