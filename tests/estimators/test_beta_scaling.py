"""The contrastive rule's bias shrinks like beta (one-sided) and beta^2 (symmetric).

On a complex-synapse linear regression the exact meta-gradient is known in closed form (see
``test_closed_form.py``); with phases converged to round-off the only error left is the bias, whose
order is read off as the least-squares slope of log(error) against log(beta).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from lightning_contrastive import ComplexSynapse, Contrastive, meta_gradient

FEATURES, SUPPORT, QUERY = 3, 8, 10
BETAS = (0.04, 0.02, 0.01, 0.005, 0.0025)  # small enough for the leading-order bias to dominate


def problem() -> tuple[ComplexSynapse, dict[str, tuple[Tensor, Tensor]], Tensor]:
    """A float64 one-task regression without bias, its batch and the exact meta-gradient ``[omega, log_lambda]``."""
    torch.manual_seed(1)
    learner = ComplexSynapse(nn.Linear(FEATURES, 1, bias=False).double(), loss="mse", init_lambda=1.0)
    with torch.no_grad():
        learner.get_parameter("lambda.weight").uniform_(-0.7, 0.7)
    xs = torch.randn(1, SUPPORT, FEATURES, dtype=torch.float64)
    xq = torch.randn(1, QUERY, FEATURES, dtype=torch.float64)
    true_weight = torch.randn(FEATURES, 1, dtype=torch.float64)
    ys, yq = xs @ true_weight + 0.3, xq @ true_weight - 0.3  # offsets make the query gradient large

    omega = learner.get_parameter("omega.weight").detach().flatten()
    strengths = learner.get_parameter("lambda.weight").detach().flatten().exp()
    system = 2 / SUPPORT * xs[0].T @ xs[0] + torch.diag(strengths)
    phi = torch.linalg.solve(system, 2 / SUPPORT * xs[0].T @ ys[0, :, 0] + strengths * omega)
    u = torch.linalg.solve(system, 2 / QUERY * xq[0].T @ (xq[0] @ phi - yq[0, :, 0]))
    exact = torch.cat([strengths * u, -(phi - omega) * u * strengths])
    return learner, {"train": (xs, ys), "test": (xq, yq)}, exact


def log_log_slope(betas: tuple[float, ...], errors: list[float]) -> float:
    """Least-squares slope of ``log(error)`` against ``log(beta)``."""
    xs, ys = [math.log(b) for b in betas], [math.log(e) for e in errors]
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True)) / sum((x - x_mean) ** 2 for x in xs)


@pytest.mark.parametrize(("symmetric", "order"), [(False, 1.0), (True, 2.0)], ids=["one-sided", "symmetric"])
def test_contrastive_bias_has_the_predicted_order_in_beta(symmetric: bool, order: float) -> None:
    learner, batch, exact = problem()
    errors = []
    for beta in BETAS:
        estimator = Contrastive(beta=beta, symmetric=symmetric, inner_steps=300, nudged_steps=300, inner_lr=0.05)
        grads = meta_gradient(learner, estimator, batch)
        estimate = torch.cat([grads["omega.weight"].flatten(), grads["lambda.weight"].flatten()])
        errors.append(float((estimate - exact).norm() / exact.norm()))
    assert all(larger > smaller for larger, smaller in itertools.pairwise(errors)), errors
    assert log_log_slope(BETAS, errors) == pytest.approx(order, abs=0.25), errors
