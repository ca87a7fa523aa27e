"""SalUn weight saliency (Fan et al., ICLR 2024): which weights matter most for the concept to forget.

Reference: ``OPTML-Group/Unlearn-Saliency``, ``SD/train-scripts/generate_mask.py``. Over one pass of the forget
set, the gradients of the forgetting loss are *accumulated* (summed, signed) per parameter without any optimiser
step; the saliency is their absolute value; the mask keeps the top ``fraction`` of *all* entries, ranked globally
across every tensor (not per layer). During unlearning only masked entries receive gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def accumulate_gradients(
    params: dict[str, nn.Parameter], batches: Iterable[object], loss_fn: Callable[[object], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Sum of ``d loss_fn(batch) / d param`` over ``batches``, per parameter (float32, on the params' device)."""
    for param in params.values():
        param.grad = None
    for batch in batches:
        loss_fn(batch).backward()
    grads = {}
    for name, param in params.items():
        grad = param.grad
        grads[name] = torch.zeros_like(param, dtype=torch.float32) if grad is None else grad.detach().float()
        param.grad = None
    return grads


def top_fraction_mask(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Boolean masks that keep exactly ``round(fraction * N)`` of all ``N`` entries: those with the largest
    ``|score|`` across all tensors jointly (ties broken by ``torch.topk``)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    names = list(scores)
    flat = torch.cat([scores[name].detach().abs().flatten().float() for name in names])
    keep = round(fraction * flat.numel())
    mask_flat = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep > 0:
        mask_flat[torch.topk(flat, keep, sorted=False).indices] = True
    masks, offset = {}, 0
    for name in names:
        n = scores[name].numel()
        masks[name] = mask_flat[offset : offset + n].view_as(scores[name])
        offset += n
    return masks


def mask_gradients(params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
    """Zero the gradient of every entry outside the saliency mask (call between ``backward`` and ``step``)."""
    for name, param in params.items():
        if param.grad is not None:
            param.grad.mul_(masks[name].to(param.grad.dtype))
