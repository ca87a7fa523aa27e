"""Which parameters a method trains, chosen by parameter name so the choice works on any diffusers SD UNet
(SD-1.x, SD-2.x, MiniSD) and any transformers ``CLIPTextModel``.

UNet sets (ESD, Gandikota et al. 2023, ``train-scripts/train-esd.py`` ``--train_method``):

* ``esd-x`` (CompVis ``xattn``): every parameter of the cross-attention modules (``attn2``: to_q, to_k, to_v,
  to_out). The paper's ESD-x, used for artistic styles.
* ``esd-x-strict`` (diffusers port): only the cross-attention key and value projections ``attn2.to_k/to_v``.
* ``esd-u`` (CompVis ``noxattn``): everything except cross-attention, the time embedding and the final output
  layer (CompVis ``out.``, diffusers ``conv_norm_out``/``conv_out``). The paper's ESD-u, used for objects and
  nudity. (The 2024 diffusers port of ESD instead takes every Linear/Conv module outside ``attn2``, i.e. also the
  time embedding and ``conv_out`` but no normalisation layers; we follow the paper's CompVis code.)
* ``full``: every UNet parameter (SalUn's ``--train_method full``).

Text-encoder set (AdvUnlearn, Zhang et al. 2024, ``utils/util.py`` ``param_choices``, ``text_encoder_full``):
all transformer layers (``encoder.layers.*``) and ``final_layer_norm``; token and position embeddings stay
frozen. ``component`` narrows the layers to their MLPs (``ffn``) or self-attention (``attn``).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

UnetParamSet = Literal["esd-x", "esd-x-strict", "esd-u", "full"]
UNET_PARAM_SETS: tuple[str, ...] = get_args(UnetParamSet)
TextEncoderComponent = Literal["all", "ffn", "attn"]

CROSS_ATTENTION = "attn2"
# ESD-u leaves these alone: the time (and class/added) embeddings and the final output layer.
_ESD_U_EXCLUDED_PREFIXES = (
    "time_embedding.",
    "class_embedding.",
    "add_embedding.",
    "conv_norm_out.",
    "conv_out.",
)


def is_cross_attention(name: str) -> bool:
    """Whether a UNet parameter name belongs to a cross-attention module (``...attn2...``)."""
    return CROSS_ATTENTION in name.split(".")


def unet_parameter_names(unet: nn.Module, which: UnetParamSet) -> list[str]:
    """Names (as in ``unet.named_parameters()`` and ``state_dict()``) of the parameters in set ``which``."""
    if which not in UNET_PARAM_SETS:
        raise ValueError(f"unknown UNet parameter set {which!r}; allowed: {', '.join(UNET_PARAM_SETS)}")
    names = []
    for name, _ in unet.named_parameters():
        parts = name.split(".")
        if which == "esd-x":
            keep = is_cross_attention(name)
        elif which == "esd-x-strict":
            keep = any(
                parts[i] == CROSS_ATTENTION and parts[i + 1] in ("to_k", "to_v")
                for i in range(len(parts) - 1)
            )
        elif which == "esd-u":
            keep = not is_cross_attention(name) and not name.startswith(_ESD_U_EXCLUDED_PREFIXES)
        else:
            keep = True
        if keep:
            names.append(name)
    if not names:
        raise ValueError(f"the UNet has no parameters in set {which!r} (no cross-attention layers?)")
    return names


def text_encoder_parameter_names(
    text_encoder: nn.Module, component: TextEncoderComponent = "all"
) -> list[str]:
    """AdvUnlearn's ``text_encoder_full`` set: transformer layers (+ final layer norm when ``component='all'``).

    Works with both the transformers 4 (``text_model.encoder...``) and 5 (``encoder...``) layouts of
    ``CLIPTextModel``.
    """
    names = []
    for name, _ in text_encoder.named_parameters():
        local = name.removeprefix("text_model.")
        if local.startswith("final_layer_norm."):
            keep = component == "all"
        elif local.startswith("encoder.layers."):
            keep = (
                component == "all"
                or (component == "ffn" and ".mlp." in local)
                or (component == "attn" and ".self_attn." in local)
            )
        else:  # token and position embeddings
            keep = False
        if keep:
            names.append(name)
    if not names:
        raise ValueError("the text encoder has no transformer-layer parameters (is it a CLIPTextModel?)")
    return names


def train_only(module: nn.Module, names: list[str]) -> dict[str, nn.Parameter]:
    """Set ``requires_grad`` on exactly the named parameters of ``module`` (all others frozen); return them."""
    wanted = set(names)
    params = dict(module.named_parameters())
    missing = wanted - set(params)
    if missing:
        raise KeyError(f"no such parameters: {sorted(missing)[:5]}")
    for name, param in params.items():
        param.requires_grad_(name in wanted)
    return {name: params[name] for name in names}


def changed_tensors(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of trained parameters, for :class:`erasure.base.ErasureResult`."""
    return {name: param.detach().to("cpu", copy=True).contiguous() for name, param in params.items()}


class ParameterSubset(nn.Module):
    """A module whose ``state_dict`` is exactly some parameters of another module (shared, not copied).

    Lets :mod:`erasure.training_state` checkpoint only what a method trains (e.g. ESD-x's cross-attention) instead
    of a whole SD UNet; loading the state writes back into the original parameters.
    """

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterDict({name.replace(".", "/"): param for name, param in params.items()})
