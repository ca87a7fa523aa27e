"""Test-only erasure methods for the batch tests, usable in-process (fixtures) and in a killed subprocess.

``python tests/batch_plugin.py batch CONFIG ...`` registers the methods and runs the real CLI, so a test can kill
a batch mid-cell with SIGKILL.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field
from torch import nn

from erasure.base import ErasureMethod, ErasureResult, MethodParams, RunContext
from erasure.resume import TrainingCheckpoints, job_fingerprint


class SlowTrainParams(MethodParams):
    steps: int = Field(6, ge=1)
    lr: float = Field(0.1, gt=0)
    sleep_s: float = Field(0.0, ge=0)


class SlowTrain(ErasureMethod):
    """Trains an offset of the UNet's conv_in.bias towards random noise, checkpointing through erasure.resume."""

    name = "test_slow_train"
    backbone_kind = "sd"
    description = "Test-only: a resumable training loop on one UNet bias."
    Params = SlowTrainParams

    def erase(self, backbone: Any, target: Any, params: SlowTrainParams, ctx: RunContext) -> ErasureResult:
        bias = backbone.unet.conv_in.bias.detach().float().cpu()
        offset = nn.Linear(1, bias.numel(), bias=False)
        nn.init.zeros_(offset.weight)
        optimizer = torch.optim.SGD(offset.parameters(), lr=params.lr)
        noise = torch.Generator().manual_seed(ctx.seed)
        checkpoints = TrainingCheckpoints(
            ctx, job_fingerprint(self.name, params, target, ctx),
            modules={"offset": offset}, optimizers={"sgd": optimizer}, generators={"noise": noise},
        )  # fmt: skip
        loss = torch.tensor(0.0)
        for step in range(checkpoints.resume() + 1, params.steps + 1):
            goal = torch.randn(bias.numel(), generator=noise)
            loss = ((offset.weight[:, 0] - goal) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ctx.progress(step, params.steps, loss=loss.item())
            checkpoints.step_done(step, params.steps)
            time.sleep(params.sleep_s)
        new_bias = bias + offset.weight[:, 0].detach()
        return ErasureResult(
            changed={"unet": {"conv_in.bias": new_bias}}, metrics={"final_loss": loss.item()}
        )


class FailOnDogParams(MethodParams):
    pass


class FailOnDog(ErasureMethod):
    """Like a method that breaks on one concept: raises for targets naming a dog, else shifts one bias."""

    name = "test_fail_on_dog"
    backbone_kind = "sd"
    description = "Test-only: fails for targets that name a dog."
    Params = FailOnDogParams

    def erase(self, backbone: Any, target: Any, params: FailOnDogParams, ctx: RunContext) -> ErasureResult:
        if "dog" in target.name:
            raise RuntimeError(f"cannot erase {target.name!r}")
        bias = backbone.unet.conv_in.bias.detach().float().cpu()
        return ErasureResult(changed={"unet": {"conv_in.bias": bias + 1.0}})


if __name__ == "__main__":
    from erasure.cli import main
    from erasure.registry import register_method

    register_method(SlowTrain)
    main()
