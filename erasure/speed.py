"""Speed switches of a job (``speed:`` in its YAML): optimisations that keep the method's maths.

Each switch has a *reference* setting — the faithful, plain path of the papers' code — and the studio's default.
``bench/erasure_speed.py`` times both in one process; tests check that both give the same losses and gradients
within floating-point tolerance (``tests/test_speed.py``).

=========================  ===========  ==========  ==================================================================
switch                     reference    default     what it does
=========================  ===========  ==========  ==================================================================
``reuse``                  false        true        Frozen-model work is done once and kept: the partial DDIM
                                                    trajectories and the frozen teacher's outputs at every state
                                                    (:class:`erasure.trajectory.Trajectories`; ESD, AdvUnlearn,
                                                    DoCo). Off: every drawn state is sampled again from its noise
                                                    by the frozen model and the teacher is queried again, as the
                                                    CompVis ESD code does each iteration.
``attention``              plain        sdpa        ``torch.nn.functional.scaled_dot_product_attention`` (flash /
                                                    memory-efficient kernels where the device has them) instead of
                                                    the explicit softmax(QKᵀ)V in the UNet and the text encoder.
``autocast``               none         none        ``bf16``: run the method under ``torch.autocast`` (weights and
                                                    optimiser states stay fp32). A GPU option; fp16 is not offered
                                                    because its gradients would need loss scaling.
``gradient_checkpointing`` false        false       Recompute UNet / text-encoder activations in the backward pass:
                                                    less memory, ~30% more compute. For memory-bound GPUs.
``compile``                false        false       ``torch.compile`` the UNet (in place; weights keep their names).
=========================  ===========  ==========  ==================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

Attention = Literal["sdpa", "plain"]
Autocast = Literal["none", "bf16"]


class SpeedConfig(BaseModel):
    """The ``speed:`` block of a job. Defaults are the studio's optimised path; :meth:`reference` the faithful one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reuse: bool = Field(
        True,
        description="Keep frozen-model work (partial trajectories, teacher outputs) instead of recomputing it "
        "every step.",
    )
    attention: Attention = Field(
        "sdpa", description="sdpa (fused attention kernels) or plain (explicit softmax)."
    )
    autocast: Autocast = Field("none", description="bf16: run the method under torch.autocast (GPU option).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    compile: bool = Field(False, description="torch.compile the UNet.")

    @classmethod
    def reference(cls) -> SpeedConfig:
        """The faithful reference path: nothing reused, plain attention, fp32, no compilation."""
        return cls(
            reuse=False, attention="plain", autocast="none", gradient_checkpointing=False, compile=False
        )


def apply_to_backbone(backbone, speed: SpeedConfig) -> None:
    """Set attention kernels, gradient checkpointing and compilation on a diffusers pipeline's UNet and text
    encoder (other backbones have no such parts and are left as they are)."""
    unet = getattr(backbone, "unet", None)
    text_encoder = getattr(backbone, "text_encoder", None)
    if unet is not None:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0() if speed.attention == "sdpa" else AttnProcessor())
        if speed.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if speed.compile:
            unet.compile()
    if text_encoder is not None:
        text_encoder.set_attn_implementation("sdpa" if speed.attention == "sdpa" else "eager")
        if speed.gradient_checkpointing:
            # transformers 5 renamed it (the old name still works, with a deprecation warning)
            enable = getattr(text_encoder, "activation_checkpointing_enable", None)
            (enable or text_encoder.gradient_checkpointing_enable)()


@contextlib.contextmanager
def autocast(speed: SpeedConfig, device: torch.device) -> Iterator[None]:
    """``torch.autocast`` in bf16 when the job asks for it; otherwise nothing."""
    if speed.autocast == "none":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield
