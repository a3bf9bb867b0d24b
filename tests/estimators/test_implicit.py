"""Implicit's conjugate gradient: exact on positive definite systems, a fault where its assumptions fail.

Conjugate gradient is checked against ``torch.linalg.solve`` on explicit matrices; its failure flags (a direction of
negative curvature, a residual that grew or went NaN) against matrices built to trigger them, and their margins against
a Hessian with a zero eigenvalue (a bias that BatchNorm cancels) that rounding must not turn into a fault; and the
fault path against a ReLU network whose inner Hessian is indefinite.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


@pytest.mark.parametrize("seed", range(3))
def test_conjugate_gradient_flags_negative_curvature_far_below_any_real_eigenvalue(seed: int) -> None:
    """An eigenvalue of -1e-9 (3e-10 of the largest) is negative curvature, not rounding: the margin (1024 eps,
    2.3e-13) is far below it, whichever basis the matrix is written in."""
    rotation, _ = torch.linalg.qr(
        torch.randn(DIMENSION, DIMENSION, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    eigenvalues = torch.tensor([3.0, 2.0, 1.0, 0.5, -1e-9, 1.5], dtype=torch.float64)
    matrix = rotation @ torch.diag(eigenvalues) @ rotation.T
    result = conjugate_gradient(lambda v: [matrix @ v[0]], [torch.ones(DIMENSION, dtype=torch.float64)], 2 * DIMENSION)
    assert result.failed


def batch_norm_cancelled_bias(seed: int) -> tuple[Callable[[list[Tensor]], list[Tensor]], list[Tensor], list[str]]:
    """The Hessian-vector product of a conv (with bias) -> BatchNorm -> tanh -> linear readout classifier in its conv
    bias and readout, under cross-entropy plus a unit pull on the readout, and a query gradient as right-hand side.

    The Hessian is positive definite on the readout and zero on the conv bias, which BatchNorm subtracts; the
    right-hand side is given 1e-12 of its norm along that bias, the rounding that a gradient computed with
    cancellation carries there."""
    generator = torch.Generator().manual_seed(seed)
    network = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(48, 3),
    ).double()
    weights = {
        name: torch.randn(p.shape, generator=generator, dtype=torch.float64) for name, p in network.named_parameters()
    }
    fast = {name: weights.pop(name) for name in ("0.bias", "4.weight", "4.bias")}
    x, x_query = torch.randn(2, 6, 1, 4, 4, generator=generator, dtype=torch.float64)
    y = torch.arange(3).repeat(2)

    def loss(params: dict[str, Tensor], inputs: Tensor) -> Tensor:
        return F.cross_entropy(torch.func.functional_call(network, weights | params, (inputs,)), y)

    def inner(params: dict[str, Tensor]) -> Tensor:
        return loss(params, x) + 0.5 * (params["4.weight"].square().sum() + params["4.bias"].square().sum())

    _, hessian_vector_product = torch.func.vjp(torch.func.grad(inner), fast)
    rhs = torch.func.grad(lambda params: loss(params, x_query))(fast)
    size = sum(t.square().sum() for t in rhs.values()).sqrt()
    rhs["0.bias"] = rhs["0.bias"] + 1e-12 * size * torch.randn(3, generator=generator, dtype=torch.float64)
    names = list(fast)

    def matvec(vectors: list[Tensor]) -> list[Tensor]:
        (products,) = hessian_vector_product(dict(zip(names, vectors, strict=True)))
        return list(products.values())

    return matvec, list(rhs.values()), names


@pytest.mark.parametrize("seed", [0, 2, 4, 5])
def test_a_bias_that_batch_norm_cancels_ends_the_solve_without_a_fault(seed: int) -> None:
    """Along the cancelled bias the Hessian's curvature is rounding: without a margin the solve faulted on these
    seeds (and on 9 of the first 12), by the sign of rounding or by a step of rounding over rounding that made the
    residual grow. With it, the direction is flat and the solve ends without a fault, the system solved where the
    Hessian is definite (the readout); what it moved along the bias, the Hessian ignores."""
    matvec, rhs, names = batch_norm_cancelled_bias(seed)
    result = conjugate_gradient(matvec, rhs, 60)
    assert not result.failed
    products = dict(zip(names, matvec(result.solution), strict=True))
    targets = dict(zip(names, rhs, strict=True))
    readout_residual = torch.cat([(products[name] - targets[name]).flatten() for name in ("4.weight", "4.bias")])
    assert readout_residual.norm() < 1e-6 * torch.cat([t.flatten() for t in rhs]).norm()


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
    with pytest.raises(InnerLoopError, match="conjugate gradient met") as raised:
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
