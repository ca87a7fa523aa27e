"""Null-space projection of linear-weight updates (erasure/null_space.py)."""

from __future__ import annotations

import pytest
import torch

from erasure.null_space import NullSpaceProjection


def test_projected_update_keeps_outputs_on_the_keys_and_changes_the_rest() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(5, 16, generator=g)  # rank 5 of 16
    original = torch.randn(8, 16, generator=g)
    weight = original + torch.randn(8, 16, generator=g)
    projection = NullSpaceProjection(keys, rel_tol=1e-6)
    assert projection.rank == 5
    projection.project_update(weight, original)
    mixes = torch.randn(3, 5, generator=g) @ keys  # any input in the keys' span
    torch.testing.assert_close(torch.cat([keys, mixes]) @ weight.T, torch.cat([keys, mixes]) @ original.T)
    # Inputs orthogonal to the keys see the update in full.
    q, _ = torch.linalg.qr(torch.cat([keys.T, torch.randn(16, 11, generator=g)], 1))
    outside = q[:, 5:].T
    assert ((outside @ (weight - original).T).norm() / (weight - original).norm()) > 0.99
    before = weight.clone()
    projection.project_update(weight, original)  # idempotent
    torch.testing.assert_close(weight, before)


def test_tolerance_drops_weak_directions_and_bad_inputs_are_refused() -> None:
    keys = torch.diag(torch.tensor([1.0, 0.1, 1e-4]))
    assert NullSpaceProjection(keys, rel_tol=1e-3).rank == 2
    assert NullSpaceProjection(keys, rel_tol=1e-5).rank == 3
    with pytest.raises(ValueError, match="m, d_in"):
        NullSpaceProjection(torch.zeros(3))
    with pytest.raises(ValueError, match="rel_tol"):
        NullSpaceProjection(keys, rel_tol=0.0)
