"""Inner phases that stop when solved: ``minimise(..., tolerance=...)`` on problems with known solutions."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from lightning_contrastive import InnerSGD
from lightning_contrastive.inner import CHECK_EVERY, minimise
from lightning_contrastive.tasks import Params

OPTIMIZER = InnerSGD(0.1, 0.5)


def quadratic(curvature: Tensor, target: Tensor) -> Callable[[Params], Tensor]:
    """``phi -> 1/2 sum_i c_i (x_i - t_i)^2``: minimum ``t``, gradient norm ``||c (x - t)||``, ``min c``-convex."""

    def objective(params: Params) -> Tensor:
        return 0.5 * (curvature * (params["x"] - target).square()).sum()

    return objective


def counting(objective: Callable[[Params], Tensor]) -> tuple[Callable[[Params], Tensor], list[None]]:
    """``objective`` and a list whose length is how many times it was evaluated."""
    calls: list[None] = []

    def counted(params: Params) -> Tensor:
        calls.append(None)
        return objective(params)

    return counted, calls


CURVATURE = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
TARGET = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def start() -> Params:
    return {"x": torch.zeros(3, dtype=torch.float64)}


@pytest.mark.parametrize("tolerance", [1e-2, 1e-4, 1e-8])
def test_a_phase_stops_within_its_tolerance_at_the_first_solved_step(tolerance: float) -> None:
    objective = quadratic(CURVATURE, TARGET)
    phase = minimise(objective, start(), 1000, OPTIMIZER, tolerance=tolerance)
    assert bool(phase.solved) and float(phase.residual) <= tolerance
    gradient = CURVATURE * (phase.params["x"] - TARGET)
    assert float(gradient.norm()) == pytest.approx(float(phase.residual), rel=1e-12)  # the residual at the result
    # Distance to the solution is bounded by residual / (smallest curvature) on a strongly convex quadratic.
    assert float((phase.params["x"] - TARGET).norm()) <= tolerance / float(CURVATURE.min())
    # The first solved step: one step fewer leaves the residual above the tolerance.
    steps = int(phase.steps)
    before = minimise(objective, start(), steps, OPTIMIZER)
    assert int(before.steps) == steps and float(before.residual) > tolerance
    torch.testing.assert_close(phase.loss, objective(phase.params), rtol=1e-12, atol=0)


def test_a_phase_never_runs_past_its_cap_and_says_it_is_unsolved() -> None:
    phase = minimise(quadratic(CURVATURE, TARGET), start(), 15, OPTIMIZER, tolerance=1e-12)
    assert int(phase.steps) == 15 and not bool(phase.solved) and float(phase.residual) > 1e-12
    fixed = minimise(quadratic(CURVATURE, TARGET), start(), 15, OPTIMIZER)
    torch.testing.assert_close(phase.params, fixed.params, rtol=0, atol=0)  # to the cap, the fixed-step phase
    assert not bool(fixed.solved) and int(fixed.steps) == 15


def test_an_easy_problem_with_a_generous_cap_costs_far_fewer_evaluations_with_a_tolerance() -> None:
    objective, calls = counting(quadratic(CURVATURE, TARGET))
    solved = minimise(objective, start(), 2000, OPTIMIZER, tolerance=1e-6)
    with_tolerance = len(calls)
    calls.clear()
    minimise(objective, start(), 2000, OPTIMIZER)
    assert len(calls) == 2000
    # Evaluations stop within one host-check period of the solved step.
    assert int(solved.steps) + 1 <= with_tolerance <= int(solved.steps) + CHECK_EVERY
    assert with_tolerance * 20 < 2000


def test_vmapped_tasks_stop_each_where_solved_and_equal_the_loop() -> None:
    curvatures = torch.tensor([[1.0, 2.0, 4.0], [0.3, 0.5, 1.0], [2.0, 3.0, 5.0]], dtype=torch.float64)
    targets = torch.tensor([[1.0, -2.0, 0.5], [0.2, 0.1, -0.3], [3.0, 1.0, 2.0]], dtype=torch.float64)

    def solve(curvature: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        phase = minimise(quadratic(curvature, target), start(), 500, OPTIMIZER, tolerance=1e-6)
        return phase.params["x"], phase.steps, phase.residual

    looped = [solve(c, t) for c, t in zip(curvatures, targets, strict=True)]
    vmapped = torch.func.vmap(solve, randomness="different")(curvatures, targets)
    steps = [int(s) for _, s, _ in looped]
    assert len(set(steps)) == 3  # different tasks stop at different steps
    torch.testing.assert_close(vmapped[0], torch.stack([x for x, _, _ in looped]), rtol=1e-12, atol=1e-14)
    assert vmapped[1].tolist() == steps
    assert (vmapped[2] <= 1e-6).all()


def test_a_differentiable_phase_refuses_a_tolerance() -> None:
    with pytest.raises(ValueError, match="differentiable phase runs a fixed number of steps"):
        minimise(quadratic(CURVATURE, TARGET), start(), 5, OPTIMIZER, differentiable=True, tolerance=1e-3)


@pytest.mark.parametrize("tolerance", [0.0, -1.0, True])
def test_a_tolerance_must_be_a_positive_gradient_norm(tolerance: float) -> None:
    with pytest.raises(ValueError, match="tolerance must be None"):
        minimise(quadratic(CURVATURE, TARGET), start(), 5, OPTIMIZER, tolerance=tolerance)
