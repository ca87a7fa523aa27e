"""``erasure-studio export``: turn a run into a standalone model folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from erasure.errors import UserError
from erasure.runs import open_finished_run, read_run_config, read_run_weights, remove_stale_partials
from generators.loading import backbone_components
from generators.registry import resolve_backbone

EXPORT_FORMATS = ("diffusers",)


def export_diffusers(run: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the run's base pipeline with the run's changed tensors applied, as a diffusers pipeline folder.

    The base is the ``backbone`` of the run's config.resolved.yaml; the result opens with plain
    ``StableDiffusionPipeline.from_pretrained(out)``. The folder is written under a temporary name and renamed.
    """
    run = open_finished_run(run)
    out = Path(out)
    spec = read_run_config(run).get("backbone")
    if not isinstance(spec, str):
        raise UserError(f"{run}: config.resolved.yaml has no backbone")
    try:
        backbone = resolve_backbone(spec)
    except ValueError as err:
        raise UserError(f"{run}: base backbone {spec!r} is not available: {err}") from None
    if backbone.kind != "sd":
        raise UserError(
            f"{run}: --format diffusers needs a diffusion (sd) run; backbone {spec} is {backbone.kind}"
        )
    if not backbone.path.exists():
        raise UserError(f"{run}: base pipeline {backbone.path} does not exist")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not overwrite:
            raise UserError(f"{out} already exists; pass --overwrite to replace it")
        if not (out / "model_index.json").is_file():
            raise UserError(f"{out} exists and is not a diffusers pipeline folder; it is never overwritten")

    from diffusers import StableDiffusionPipeline

    from generators.one_step import load_marker, save_marker

    pipe = StableDiffusionPipeline.from_pretrained(backbone.path, local_files_only=True)
    load_marker(pipe, backbone.path)
    components = backbone_components(pipe)
    for component, tensors in read_run_weights(run).items():
        if component not in components:
            raise UserError(f"{run}: weights/{component}.safetensors names no component of {spec}")
        result = components[component].load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise UserError(
                f"{run}: weights/{component}.safetensors has tensors the base {component} lacks: "
                f"{', '.join(result.unexpected_keys[:5])}"
            )

    remove_stale_partials(out)  # left by an export that was killed
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    replaced = out.parent / f".{out.name}.replaced-{os.getpid()}"
    try:
        pipe.save_pretrained(partial, safe_serialization=True)
        save_marker(pipe, partial)  # one_step.json for a one-step generator (SFD)
        if out.exists():
            os.rename(out, replaced)
        os.rename(partial, out)
    except BaseException:
        if replaced.exists() and not out.exists():
            os.rename(replaced, out)
        raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(replaced, ignore_errors=True)
    return out
