"""Implicit's conjugate gradient: exact on positive definite systems, a fault where its assumptions fail.

Conjugate gradient is checked against ``torch.linalg.solve`` on explicit matrices; its failure flags (a direction of
non-positive curvature, a residual that grew or went NaN) against matrices built to trigger them; and the fault
path against a ReLU network whose inner Hessian is indefinite.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_contrastive import ComplexSynapse, Implicit, InnerLoopError, estimate
from lightning_contrastive.estimators.implicit import conjugate_gradient
from lightning_contrastive.networks import MLP
from lightning_contrastive.tasks import split_batch

DIMENSION = 6


def positive_definite(seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(DIMENSION, DIMENSION, generator=generator, dtype=torch.float64)
    return root @ root.T + 0.1 * torch.eye(DIMENSION, dtype=torch.float64)


def right_hand_side(seed: int) -> Tensor:
    return torch.randn(DIMENSION, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("steps", [DIMENSION, 5 * DIMENSION])
def test_conjugate_gradient_solves_a_positive_definite_system(steps: int) -> None:
    """Exact after ``DIMENSION`` iterations; further iterations leave the converged solution alone (no 0/0)."""
    matrix, rhs = positive_definite(0), right_hand_side(1)
    result = conjugate_gradient(lambda v: [matrix @ v[0]], [rhs], steps)
    assert not result.failed
    torch.testing.assert_close(result.solution[0], torch.linalg.solve(matrix, rhs), rtol=1e-9, atol=1e-10)


def test_conjugate_gradient_flags_non_positive_curvature() -> None:
    matrix = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5, -0.5, 1.5], dtype=torch.float64))
    result = conjugate_gradient(lambda v: [matrix @ v[0]], [torch.ones(DIMENSION, dtype=torch.float64)], DIMENSION)
    assert result.failed


def test_conjugate_gradient_flags_a_residual_that_is_not_finite() -> None:
    result = conjugate_gradient(lambda v: [v[0] * torch.nan], [torch.ones(DIMENSION, dtype=torch.float64)], 3)
    assert result.failed


def test_conjugate_gradient_runs_under_vmap_as_in_a_loop() -> None:
    """No value is read on the host, so a batch of systems solves under ``torch.func.vmap``."""
    matrices = torch.stack([positive_definite(seed) for seed in range(3)])
    rhs = torch.stack([right_hand_side(seed + 10) for seed in range(3)])

    def solve(matrix: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        result = conjugate_gradient(lambda v: [matrix @ v[0]], [b], 2 * DIMENSION)
        return result.solution[0], result.failed

    solutions, failed = torch.func.vmap(solve)(matrices, rhs)
    assert not failed.any()
    torch.testing.assert_close(solutions, torch.linalg.solve(matrices, rhs), rtol=1e-9, atol=1e-10)


def relu_regression() -> tuple[ComplexSynapse, dict[str, tuple[Tensor, Tensor]]]:
    """A ReLU MLP on one large-amplitude sine task: the residuals make the inner Hessian indefinite."""
    torch.manual_seed(0)
    learner = ComplexSynapse(MLP(1, (8,), 1).double(), loss="mse", init_lambda=1.0)
    x = torch.linspace(-5, 5, 10, dtype=torch.float64).reshape(1, 10, 1)
    y = 5 * torch.sin(x)
    return learner, {"train": (x[:, ::2].clone(), y[:, ::2].clone()), "test": (x[:, 1::2].clone(), y[:, 1::2].clone())}


def smallest_hessian_eigenvalue(learner: ComplexSynapse, batch: dict[str, tuple[Tensor, Tensor]], steps: int) -> float:
    """The inner Hessian's smallest eigenvalue at Implicit's inner solution, from a dense Hessian."""
    meta = {name: p.detach() for name, p in learner.named_meta_parameters()}
    task = split_batch(batch)[0]
    solution = Implicit(inner_steps=steps, inner_lr=0.005).adapt(learner, meta, task.support).params
    names, shapes = list(solution), [p.shape for p in solution.values()]

    def inner(flat: Tensor) -> Tensor:
        parts = dict(zip(names, flat.split([s.numel() for s in shapes]), strict=True))
        fast = {name: parts[name].view(shape) for name, shape in zip(names, shapes, strict=True)}
        return learner.inner_loss(fast, meta, task.support)

    flat = torch.cat([p.flatten() for p in solution.values()])
    return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(inner, flat))[0])


def test_an_indefinite_inner_hessian_is_a_fault_of_the_solve_and_damping_removes_it() -> None:
    learner, batch = relu_regression()
    assert smallest_hessian_eigenvalue(learner, batch, steps=20) < 0  # the premise: not a minimum
    with pytest.raises(InnerLoopError, match="conjugate gradient met non-positive curvature") as raised:
        estimate(learner, Implicit(inner_steps=20, inner_lr=0.005, cg_steps=20), batch)
    assert [fault.phase for fault in raised.value.faults] == ["solve"]
    skipped = estimate(learner, Implicit(inner_steps=20, inner_lr=0.005, cg_steps=20), batch, on_fault="skip")
    assert len(skipped.skipped) == 1 and skipped.kept == []
    # Damping beyond the most negative eigenvalue makes the system positive definite: no fault.
    damping = 1.0 - smallest_hessian_eigenvalue(learner, batch, steps=20)
    assert (
        estimate(learner, Implicit(inner_steps=20, inner_lr=0.005, cg_steps=20, cg_damping=damping), batch).skipped
        == []
    )
