"""Gradient surgery: remove from one gradient the part that conflicts with another.

Used by DoCo's concept-preserving gradient (Wu et al., AAAI 2025, ``yongliang-wu/DoCo``, ``gradient_clip.py``
``adjust_gradient``): the unlearning gradient ``g_u`` loses its component along the retain (prior-preservation)
gradient ``g_r`` whenever the two point in opposite directions, so a step along the result does not increase the
retain loss to first order. Gradients are lists of per-parameter tensors (``None`` for a parameter without one),
as ``torch.autograd.grad(..., allow_unused=True)`` returns them.

Two forms of the correction, for ``cos = <g_u, g_r> / (|g_u| |g_r|) < 0``:

* ``pcgrad`` (PCGrad, Yu et al. 2020; the paper's description): ``g_u <- g_u - lambda <g_u, g_r> / |g_r|^2 g_r``.
  With ``lambda = 1`` the result is orthogonal to ``g_r``.
* ``doco`` (what the reference code computes): ``g_u <- g_u - lambda cos ĝ_r`` with ``ĝ_r = g_r / |g_r|``, i.e.
  PCGrad's correction divided by ``|g_u|``. Both agree when ``|g_u| = 1``; the reference clips ``g_u`` to norm
  at most 1 first, so its correction is at least PCGrad's and can overshoot past orthogonal.

``scope`` picks the groups the rule is applied to: ``tensor`` (per parameter tensor, as the reference) or
``global`` (all tensors as one flat vector).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Grads = Sequence[torch.Tensor | None]
SurgeryForm = Literal["pcgrad", "doco"]
SurgeryScope = Literal["tensor", "global"]

_EPS = 1e-12


def grad_dot(a: Grads, b: Grads) -> torch.Tensor:
    """``<a, b>`` over all tensors present in both lists (float64 accumulation)."""
    _check_lengths(a, b)
    total = torch.zeros((), dtype=torch.float64)
    for x, y in zip(a, b):
        if x is not None and y is not None:
            total = total + (x.double() * y.double()).sum().cpu()
    return total


def grad_norm(grads: Grads) -> torch.Tensor:
    """Euclidean norm of all tensors of ``grads`` together."""
    return grad_dot(grads, grads).sqrt()


def clip_total_norm(grads: Grads, max_norm: float) -> list[torch.Tensor | None]:
    """Scale ``grads`` so their total norm is at most ``max_norm`` (as ``torch.nn.utils.clip_grad_norm_``)."""
    norm = float(grad_norm(grads))
    scale = min(1.0, max_norm / (norm + 1e-6))
    return [None if g is None else g * scale for g in grads]


@dataclass
class SurgeryResult:
    grads: list[torch.Tensor | None]
    """The corrected unlearning gradient, one entry per input entry."""
    groups: int
    """Groups (tensors, or 1 for ``global``) where both gradients were present and non-zero."""
    projected: int
    """Of those, the groups that conflicted and were corrected."""


def project_conflicting(
    g_u: Grads,
    g_r: Grads,
    *,
    form: SurgeryForm = "pcgrad",
    scope: SurgeryScope = "tensor",
    strength: float = 1.0,
) -> SurgeryResult:
    """``g_u`` with its component conflicting with ``g_r`` removed (see the module docstring); inputs unchanged."""
    _check_lengths(g_u, g_r)
    if form not in ("pcgrad", "doco"):
        raise ValueError(f"unknown surgery form {form!r}; allowed: pcgrad, doco")
    if scope == "tensor":
        out: list[torch.Tensor | None] = []
        groups = projected = 0
        for u, r in zip(g_u, g_r):
            if u is None or r is None:
                out.append(u)
                continue
            coefficient = _coefficient([u], [r], form, strength)
            if coefficient is None:
                out.append(u)
                continue
            groups += 1
            if coefficient == 0.0:
                out.append(u)
            else:
                projected += 1
                out.append(u - coefficient * r)
        return SurgeryResult(out, groups, projected)
    if scope != "global":
        raise ValueError(f"unknown surgery scope {scope!r}; allowed: tensor, global")
    coefficient = _coefficient(g_u, g_r, form, strength)
    if coefficient is None:
        return SurgeryResult(list(g_u), 0, 0)
    if coefficient == 0.0:
        return SurgeryResult(list(g_u), 1, 0)
    out = [u if u is None or r is None else u - coefficient * r for u, r in zip(g_u, g_r)]
    return SurgeryResult(out, 1, 1)


def _coefficient(u: Grads, r: Grads, form: SurgeryForm, strength: float) -> float | None:
    """``c`` such that the corrected gradient is ``u - c r``: 0 without conflict, None when a side is zero."""
    dot = float(grad_dot(u, r))
    r_sq = float(grad_dot(r, r))
    u_sq = float(grad_dot(u, u))
    if r_sq <= _EPS or u_sq <= _EPS:
        return None
    if dot >= 0:
        return 0.0
    if form == "pcgrad":
        return strength * dot / r_sq
    cosine = dot / (u_sq**0.5 * r_sq**0.5)
    return strength * cosine / r_sq**0.5  # cos * r / |r|


def _check_lengths(a: Grads, b: Grads) -> None:
    if len(a) != len(b):
        raise ValueError(f"gradient lists differ in length: {len(a)} vs {len(b)}")
