"""Shared fixtures: offline Hugging Face, a test-only erasure method, a tiny random SD pipeline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import Field

from erasure.base import ErasureMethod, ErasureResult, MethodParams, RunContext
from erasure.registry import register_method, unregister_method

SHIFTED_TENSOR = "conv_in.bias"


class ShiftParams(MethodParams):
    shift: float = Field(0.5, gt=0)
    steps: int = Field(3, ge=1)


class ShiftBias(ErasureMethod):
    """Test-only method: adds ``shift`` to the UNet's conv_in.bias, reporting progress on the way."""

    name = "test_shift"
    backbone_kind = "sd"
    description = "Test-only: shifts one UNet bias."
    Params = ShiftParams

    def erase(self, backbone: Any, target: Any, params: ShiftParams, ctx: RunContext) -> ErasureResult:
        for step in range(1, params.steps + 1):
            ctx.progress(step, params.steps, loss=1.0 / step)
        bias = backbone.unet.conv_in.bias.detach().float().cpu()
        return ErasureResult(
            changed={"unet": {SHIFTED_TENSOR: bias + params.shift}}, metrics={"final_loss": 0.5}
        )


class ZeroParams(MethodParams):
    pass


class ZeroConstant(ErasureMethod):
    """Test-only GAN method: zeroes the generator's learned 4x4 constant input."""

    name = "test_zero_const"
    backbone_kind = "gan"
    description = "Test-only: zeroes the StyleGAN2 constant input."
    Params = ZeroParams

    def erase(self, backbone: Any, target: Any, params: ZeroParams, ctx: RunContext) -> ErasureResult:
        ctx.progress(1, 1)
        return ErasureResult(changed={"generator": {"input.input": torch.zeros_like(backbone.input.input)}})


@pytest.fixture
def gan_method() -> Iterator[type[ErasureMethod]]:
    register_method(ZeroConstant)
    yield ZeroConstant
    unregister_method(ZeroConstant.name)


@pytest.fixture
def tiny_gan_checkpoint(tmp_path: Path) -> Path:
    from generators.stylegan2 import Generator
    from generators.stylegan2_io import save_generator_safetensors

    torch.manual_seed(0)
    generator = Generator(size=8, style_dim=8, n_mlp=1, channels={4: 4, 8: 4})
    path = tmp_path / "g.safetensors"
    save_generator_safetensors(generator, path)
    return path


@pytest.fixture
def shift_method() -> Iterator[type[ErasureMethod]]:
    register_method(ShiftBias)
    yield ShiftBias
    unregister_method(ShiftBias.name)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_sd import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipeline")


@pytest.fixture
def base_state(tiny_pipeline: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors")
