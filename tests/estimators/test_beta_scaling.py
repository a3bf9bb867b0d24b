"""The contrastive rule's bias shrinks like beta (one-sided) and beta^2 (symmetric), for both nudges.

With phases converged to round-off the only error left is the bias, whose order is read off as the
least-squares slope of log(error) against log(beta). The exact meta-gradients are computed here,
independently of the library: in closed form for a complex-synapse linear regression (quadratic inner
problem), and by Newton's method plus the implicit function theorem with a dense Hessian for a
complex-synapse logistic regression (non-quadratic inner problem).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_contrastive import ComplexSynapse, Contrastive, meta_gradient

FEATURES, SUPPORT, QUERY, CLASSES = 3, 12, 15, 3
QUADRATIC_BETAS = (0.04, 0.02, 0.01, 0.005, 0.0025)  # small enough for the leading-order bias to dominate
LOGISTIC_BETAS = (0.4, 0.2, 0.1, 0.05, 0.025)
Batch = dict[str, tuple[Tensor, Tensor]]


def regression() -> tuple[ComplexSynapse, Batch, Tensor]:
    """A float64 one-task regression without bias, its batch and the exact meta-gradient ``[omega, log_lambda]``."""
    torch.manual_seed(1)
    learner = ComplexSynapse(nn.Linear(FEATURES, 1, bias=False).double(), loss="mse", init_lambda=1.0)
    with torch.no_grad():
        learner.get_parameter("lambda.weight").uniform_(-0.7, 0.7)
    xs = torch.randn(1, 8, FEATURES, dtype=torch.float64)
    xq = torch.randn(1, 10, FEATURES, dtype=torch.float64)
    true_weight = torch.randn(FEATURES, 1, dtype=torch.float64)
    ys, yq = xs @ true_weight + 0.3, xq @ true_weight - 0.3  # offsets make the query gradient large

    omega = learner.get_parameter("omega.weight").detach().flatten()
    strengths = learner.get_parameter("lambda.weight").detach().flatten().exp()
    system = 2 / 8 * xs[0].T @ xs[0] + torch.diag(strengths)
    phi = torch.linalg.solve(system, 2 / 8 * xs[0].T @ ys[0, :, 0] + strengths * omega)
    u = torch.linalg.solve(system, 2 / 10 * xq[0].T @ (xq[0] @ phi - yq[0, :, 0]))
    exact = torch.cat([strengths * u, -(phi - omega) * u * strengths])
    return learner, {"train": (xs, ys), "test": (xq, yq)}, exact


def logistic() -> tuple[ComplexSynapse, Batch, Tensor]:
    """A float64 one-task 3-class logistic regression and its exact meta-gradient ``[omega, log_lambda]``.

    ``L_in(phi) = CE(softmax(X_s W^T + b), y_s) + sum_i lambda_i / 2 (phi_i - omega_i)^2`` with ``phi = [W, b]``,
    written out here; ``phi*`` by Newton's method to round-off; with ``u = H^-1 dL_query/dphi(phi*)`` the
    meta-gradient is ``dL/domega = lambda u`` and ``dL/dlog_lambda = -(phi* - omega) u lambda``.
    """
    torch.manual_seed(2)
    learner = ComplexSynapse(nn.Linear(FEATURES, CLASSES).double(), loss="cross_entropy", init_lambda=1.0)
    with torch.no_grad():
        for log_strength in learner.get_submodule("lambda").parameters():
            log_strength.uniform_(-0.7, 0.7)
        for weight in learner.get_submodule("omega").parameters():
            weight.mul_(3)  # far from the origin, so that the softmax's curvature varies along the nudge
    xs, ys = torch.randn(1, SUPPORT, FEATURES, dtype=torch.float64), torch.randint(0, CLASSES, (1, SUPPORT))
    xq, yq = torch.randn(1, QUERY, FEATURES, dtype=torch.float64), torch.randint(0, CLASSES, (1, QUERY))

    meta = {name: p.detach() for name, p in learner.named_meta_parameters()}
    omega = torch.cat([meta["omega.weight"].flatten(), meta["omega.bias"]])
    strengths = torch.cat([meta["lambda.weight"].flatten(), meta["lambda.bias"]]).exp()

    def logits(phi: Tensor, x: Tensor) -> Tensor:
        weight, bias = phi[: FEATURES * CLASSES].view(CLASSES, FEATURES), phi[FEATURES * CLASSES :]
        return x @ weight.T + bias

    def inner(phi: Tensor) -> Tensor:
        return F.cross_entropy(logits(phi, xs[0]), ys[0]) + (strengths / 2 * (phi - omega) ** 2).sum()

    def query(phi: Tensor) -> Tensor:
        return F.cross_entropy(logits(phi, xq[0]), yq[0])

    phi = omega.clone()
    for _ in range(30):
        gradient = torch.autograd.functional.jacobian(inner, phi)
        phi = phi - torch.linalg.solve(torch.autograd.functional.hessian(inner, phi), gradient)
    assert torch.autograd.functional.jacobian(inner, phi).norm() < 1e-12
    u = torch.linalg.solve(
        torch.autograd.functional.hessian(inner, phi), torch.autograd.functional.jacobian(query, phi)
    )
    exact = torch.cat([strengths * u, -(phi - omega) * u * strengths])
    return learner, {"train": (xs, ys), "test": (xq, yq)}, exact


def errors(problem: tuple[ComplexSynapse, Batch, Tensor], betas: tuple[float, ...], **settings: object) -> list[float]:
    """Relative errors of converged contrastive estimates (400 steps per phase) at each beta."""
    learner, batch, exact = problem
    found = []
    for beta in betas:
        estimator = Contrastive(beta=beta, inner_steps=400, nudged_steps=400, **settings)  # type: ignore[arg-type]
        grads = meta_gradient(learner, estimator, batch)
        estimate = torch.cat(
            [grads[f"{kind}.{name}"].flatten() for kind in ("omega", "lambda") for name in names(grads)]
        )
        found.append(float((estimate - exact).norm() / exact.norm()))
    return found


def names(grads: dict[str, Tensor]) -> list[str]:
    """The backbone's parameter names (``weight``, and ``bias`` where there is one), in order."""
    return [key.removeprefix("omega.") for key in grads if key.startswith("omega.")]


def log_log_slope(betas: tuple[float, ...], errors: list[float]) -> float:
    """Least-squares slope of ``log(error)`` against ``log(beta)``."""
    xs, ys = [math.log(b) for b in betas], [math.log(e) for e in errors]
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True)) / sum((x - x_mean) ** 2 for x in xs)


ORDERS = pytest.mark.parametrize(("symmetric", "order"), [(False, 1.0), (True, 2.0)], ids=["one-sided", "symmetric"])


@ORDERS
@pytest.mark.parametrize("nudge", ["linear", "full"])
def test_bias_has_the_predicted_order_in_beta_on_a_non_quadratic_inner_problem(
    nudge: str, symmetric: bool, order: float
) -> None:
    found = errors(logistic(), LOGISTIC_BETAS, nudge=nudge, symmetric=symmetric, inner_lr=0.1)
    assert all(larger > smaller for larger, smaller in itertools.pairwise(found)), found
    # Measured slopes: 0.98-1.00 (one-sided) and 1.99-2.00 (symmetric) for both nudges.
    assert log_log_slope(LOGISTIC_BETAS, found) == pytest.approx(order, abs=0.1), found


@ORDERS
def test_full_nudge_bias_has_the_predicted_order_on_a_quadratic_inner_problem(symmetric: bool, order: float) -> None:
    found = errors(regression(), QUADRATIC_BETAS, nudge="full", symmetric=symmetric, inner_lr=0.05)
    assert all(larger > smaller for larger, smaller in itertools.pairwise(found)), found
    assert log_log_slope(QUADRATIC_BETAS, found) == pytest.approx(order, abs=0.25), found


def test_symmetric_linear_nudge_is_exact_when_the_inner_problem_is_quadratic_in_phi() -> None:
    """``phi_+-beta = phi_0 -+ beta H^-1 g`` exactly, and the central difference of ``dL_in/dtheta``, at most
    quadratic in ``phi``, is exact: no bias at any beta (the full nudge keeps its beta^2 bias here)."""
    found = errors(regression(), (1.0, *QUADRATIC_BETAS), nudge="linear", symmetric=True, inner_lr=0.05)
    assert max(found) < 1e-6, found  # measured 8.5e-8, the phases' convergence floor, at every beta


def test_one_sided_linear_nudge_keeps_an_order_beta_bias_on_the_quadratic_problem() -> None:
    """``dL_in/dlog_lambda = lambda/2 (phi - omega)^2`` is quadratic in ``phi``: a one-sided difference keeps
    ``lambda/2 |phi_beta - phi_0|^2 / beta = O(beta)``."""
    found = errors(regression(), QUADRATIC_BETAS, nudge="linear", symmetric=False, inner_lr=0.05)
    assert log_log_slope(QUADRATIC_BETAS, found) == pytest.approx(1.0, abs=0.1), found  # measured 1.00


def test_linear_and_full_nudges_agree_on_converged_phases() -> None:
    learner, batch, exact = logistic()
    settings = {"beta": 0.01, "inner_steps": 400, "nudged_steps": 400, "inner_lr": 0.1}
    linear, full = (
        torch.cat([g.flatten() for g in meta_gradient(learner, Contrastive(nudge=nudge, **settings), batch).values()])
        for nudge in ("linear", "full")
    )
    assert torch.cosine_similarity(linear, full, dim=0) > 0.99999  # measured 1 - 1e-9
    # The linear nudge's bias is the smaller one (measured relative errors 1.9e-6 against 6.1e-6).
    assert (
        errors((learner, batch, exact), (0.01,), nudge="linear", inner_lr=0.1)[0]
        < errors((learner, batch, exact), (0.01,), nudge="full", inner_lr=0.1)[0]
    )
