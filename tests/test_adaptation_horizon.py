"""``benchmarks.diagnostics.adaptation_horizon``'s curvature estimate against the exact Hessian spectrum."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

REPOSITORY = Path(__file__).resolve().parents[1]
horizon = importlib.import_module("benchmarks.diagnostics.adaptation_horizon")


def test_top_curvature_is_the_largest_hessian_eigenvalue() -> None:
    """A non-quadratic loss over two named tensors: power iteration on Hessian-vector products gives the top
    eigenvalue of the dense Hessian (``torch.autograd.functional.hessian``) at the point."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    targets = torch.randn(30, generator=generator, dtype=torch.float64)
    at = {
        "w": torch.randn(4, 3, generator=generator, dtype=torch.float64),
        "v": torch.randn(3, generator=generator, dtype=torch.float64),
    }

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((torch.tanh(inputs @ params["w"]) @ params["v"] - targets) ** 2).mean()

    def flat_loss(flat: torch.Tensor) -> torch.Tensor:
        return loss({"w": flat[:12].reshape(4, 3), "v": flat[12:]})

    dense = torch.autograd.functional.hessian(flat_loss, torch.cat([at["w"].flatten(), at["v"]]))
    eigenvalues = torch.linalg.eigvalsh(dense)
    largest = eigenvalues[eigenvalues.abs().argmax()]
    assert abs(eigenvalues[-1]) > 1.5 * abs(eigenvalues[-2])  # a gap, so 200 iterations converge
    assert horizon.top_curvature(loss, at, 200) == pytest.approx(float(largest), rel=1e-6)
