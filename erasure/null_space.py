"""Edits of linear maps that leave the outputs on chosen inputs unchanged: null-space projection.

A linear layer ``y = W e`` keeps its output on every input in a set ``K`` exactly when its update ``dW`` satisfies
``dW e = 0`` for all ``e`` in ``K``, i.e. when ``dW`` vanishes on ``span(K)``. :class:`NullSpaceProjection` takes an
update onto that null space, ``dW <- dW (I - V V^T)`` with ``V`` an orthonormal basis of ``span(K)``. AlphaEdit (Fang
et al., "AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models", ICLR 2025) projects its edits the
same way onto the null space of preserved keys; here it serves the cross-attention keys/values of a diffusion UNet,
whose inputs are the text encoder's token states. Projecting the *accumulated* update ``W - W0`` after each optimiser
step (rather than the gradient) keeps the constraint under Adam, whose per-element scaling leaves the gradient's
subspace.

``rel_tol`` sets which directions count as part of ``span(K)``: singular values of ``K`` above ``rel_tol`` times the
largest. Smaller values keep the outputs more exactly and leave the edit fewer directions.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

NullSpaceTolerance = Annotated[
    float,
    Field(
        gt=0,
        lt=1,
        description="keep_unconditional=null_space: token-state directions with singular value above this "
        "fraction of the largest are kept fixed.",
    ),
]
"""A method parameter: :class:`NullSpaceProjection`'s ``rel_tol`` for the empty prompt's token states."""


class NullSpaceProjection:
    """Projects updates of linear weights ``[d_out, d_in]`` onto the null space of ``keys`` ``[m, d_in]``."""

    def __init__(self, keys: torch.Tensor, rel_tol: float = 1e-3) -> None:
        if keys.ndim != 2:
            raise ValueError(f"keys must be [m, d_in]; got shape {tuple(keys.shape)}")
        if not 0 < rel_tol < 1:
            raise ValueError(f"rel_tol must lie in (0, 1); got {rel_tol}")
        _, s, vh = torch.linalg.svd(keys.detach().double(), full_matrices=False)
        basis = vh[s > rel_tol * s[0]]  # [rank, d_in], orthonormal rows spanning the kept inputs
        self.rank = basis.shape[0]
        eye = torch.eye(keys.shape[1], dtype=torch.float64, device=keys.device)
        self.complement = (eye - basis.T @ basis).to(keys.dtype)

    def project_update(self, weight: torch.Tensor, original: torch.Tensor) -> None:
        """In place: ``weight <- original + (weight - original) (I - V V^T)``."""
        with torch.no_grad():
            complement = self.complement.to(weight.device, torch.float32)
            update = (weight.float() - original.float()) @ complement
            weight.copy_((original.float() + update).to(weight.dtype))


class KeptInputs:
    """Keeps the outputs of trained text-reading weights on given inputs across training.

    ``trained`` maps names to linear weights ``[d_out, d_in]`` that read ``d_in``-wide inputs (a cross-attention's
    ``to_k``/``to_v``, which read the text encoder's token states); ``keys`` ``[m, d_in]`` are the inputs whose
    outputs must not move (e.g. the empty prompt's token states, the unconditional branch of classifier-free
    guidance). Build it before training starts (and before a checkpoint is resumed): it records the weights as
    they are then and, after every optimiser step, :meth:`project` takes each weight's accumulated update onto the
    null space of ``keys``.
    """

    def __init__(self, trained: dict[str, torch.Tensor], keys: torch.Tensor, rel_tol: float) -> None:
        keys = keys.detach().float()
        for name, tensor in trained.items():
            if tensor.ndim != 2 or tensor.shape[1] != keys.shape[-1]:
                raise ValueError(
                    f"{name} {tuple(tensor.shape)} does not read the {keys.shape[-1]}-wide inputs whose outputs are "
                    "kept; train only the weights that read them (e.g. train_method esd-x-strict: attn2 to_k/to_v)"
                )
        self.projection = NullSpaceProjection(keys, rel_tol)
        self.trained = trained
        self.originals = {name: tensor.detach().clone() for name, tensor in trained.items()}

    @property
    def rank(self) -> int:
        """Input directions held fixed."""
        return self.projection.rank

    def project(self) -> None:
        """In place, every trained weight: ``W <- W0 + (W - W0)(I - V V^T)``."""
        for name, tensor in self.trained.items():
            self.projection.project_update(tensor, self.originals[name])
