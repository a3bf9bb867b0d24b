"""Meta-gradients of a complex-synapse linear regression against their closed forms.

With ``f(x) = phi^T [x, 1]`` and the mean-squared error, the inner problem is quadratic:
``A = (2/n) Xs^T Xs``, ``b = (2/n) Xs^T ys``, ``M = A + diag(lambda)`` and
``phi* = M^-1 (b + lambda * omega)``. With ``v = (2/m) Xq^T (Xq phi* - yq)`` and ``u = M^-1 v`` the
exact meta-gradient is ``dL/domega = lambda * u`` and ``dL/dlog_lambda = -(phi* - omega) * u * lambda``,
averaged over tasks. Everything here is computed independently with ``torch.linalg.solve``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from lightning_contrastive import MAML, ComplexSynapse, Contrastive, Estimator, FirstOrderMAML, Implicit, Reptile
from lightning_contrastive import meta_gradient as compute_meta_gradient

FEATURES, SUPPORT, QUERY, TASKS = 4, 10, 12, 3
CONVERGED_STEPS, INNER_LR = 500, 0.05  # float64 with momentum 0.9: the phases converge to round-off


@dataclass(frozen=True)
class Regression:
    """A learner and the episodic batch it is meta-trained on."""

    learner: ComplexSynapse
    batch: dict[str, tuple[Tensor, Tensor]]


def regression(learn_lambda: bool = True) -> Regression:
    """A float64 linear regression (weight and bias) with per-synapse strengths spread over [e^-0.7, e^0.7]."""
    torch.manual_seed(0)
    learner = ComplexSynapse(nn.Linear(FEATURES, 1).double(), loss="mse", init_lambda=1.0, learn_lambda=learn_lambda)
    if learn_lambda:
        with torch.no_grad():
            for log_strength in learner.get_submodule("lambda").parameters():
                log_strength.uniform_(-0.7, 0.7)
    xs = torch.randn(TASKS, SUPPORT, FEATURES, dtype=torch.float64)
    xq = torch.randn(TASKS, QUERY, FEATURES, dtype=torch.float64)
    true_weights = torch.randn(TASKS, FEATURES, 1, dtype=torch.float64)
    ys = xs @ true_weights + 0.1 * torch.randn(TASKS, SUPPORT, 1, dtype=torch.float64)
    yq = xq @ true_weights + 0.1 * torch.randn(TASKS, QUERY, 1, dtype=torch.float64)
    return Regression(learner, {"train": (xs, ys), "test": (xq, yq)})


def with_ones(x: Tensor) -> Tensor:
    """``[x, 1]``: the bias as one more feature."""
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def flat(params: dict[str, Tensor], kind: str) -> Tensor:
    """``[weight, bias]`` of the ``kind`` (``omega`` or ``lambda``) meta-parameters as one vector."""
    return torch.cat([params[f"{kind}.weight"].flatten(), params[f"{kind}.bias"].flatten()]).detach()


@dataclass(frozen=True)
class Solution:
    """One task's inner solution ``phi*``, the query-loss gradient there ``v``, and ``M = A + diag(lambda)``."""

    phi: Tensor
    query_grad: Tensor
    system: Tensor


def solve_tasks(problem: Regression) -> list[Solution]:
    meta = problem.learner.meta_parameters()
    omega = flat(meta, "omega")
    strengths = flat(meta, "lambda").exp() if problem.learner.learn_lambda else torch.full_like(omega, 1.0)
    (xs, ys), (xq, yq) = problem.batch["train"], problem.batch["test"]
    solutions = []
    for task in range(TASKS):
        support, query = with_ones(xs[task]), with_ones(xq[task])
        system = 2 / SUPPORT * support.T @ support + torch.diag(strengths)
        phi = torch.linalg.solve(system, 2 / SUPPORT * support.T @ ys[task, :, 0] + strengths * omega)
        query_grad = 2 / QUERY * query.T @ (query @ phi - yq[task, :, 0])
        solutions.append(Solution(phi, query_grad, system))
    return solutions


def exact_meta_gradient(problem: Regression) -> Tensor:
    """``[dL/domega, dL/dlog_lambda]`` of the exact bilevel problem, averaged over tasks."""
    meta = problem.learner.meta_parameters()
    omega, strengths = flat(meta, "omega"), flat(meta, "lambda").exp()
    per_task = []
    for solution in solve_tasks(problem):
        u = torch.linalg.solve(solution.system, solution.query_grad)
        per_task.append(torch.cat([strengths * u, -(solution.phi - omega) * u * strengths]))
    return torch.stack(per_task).mean(0)


def estimated(problem: Regression, estimator: Estimator) -> Tensor:
    grads = compute_meta_gradient(problem.learner, estimator, problem.batch)
    kinds = ("omega", "lambda") if problem.learner.learn_lambda else ("omega",)
    return torch.cat([flat(grads, kind) for kind in kinds])


def relative_error(estimate: Tensor, exact: Tensor) -> float:
    return float((estimate - exact).norm() / exact.norm())


@pytest.mark.parametrize(
    "estimator",
    [
        *(
            Contrastive(
                beta=beta,
                symmetric=symmetric,
                nudge=nudge,
                inner_steps=CONVERGED_STEPS,
                nudged_steps=CONVERGED_STEPS,
                inner_lr=INNER_LR,
            )
            for nudge in ("linear", "full")
            for symmetric, beta in ((True, 1e-3), (False, 1e-4))
        ),
        Implicit(inner_steps=CONVERGED_STEPS, inner_lr=INNER_LR, cg_steps=2 * (FEATURES + 1)),
        MAML(inner_steps=CONVERGED_STEPS, inner_lr=INNER_LR),
    ],
    ids=[
        "contrastive-linear-symmetric",
        "contrastive-linear-one-sided",
        "contrastive-full-symmetric",
        "contrastive-full-one-sided",
        "implicit",
        "maml",
    ],
)
def test_converged_estimators_recover_the_exact_meta_gradient(estimator: Estimator) -> None:
    problem = regression()
    exact = exact_meta_gradient(problem)
    estimate = estimated(problem, estimator)
    assert torch.cosine_similarity(estimate, exact, dim=0) > 0.9999
    assert relative_error(estimate, exact) < 1e-3


def test_first_order_maml_passes_the_query_gradient_at_the_solution_to_omega() -> None:
    """FOMAML's closed form: ``dL/domega = v(phi*)``, and nothing for the strengths."""
    problem = regression()
    estimate = compute_meta_gradient(
        problem.learner, FirstOrderMAML(inner_steps=CONVERGED_STEPS, inner_lr=INNER_LR), problem.batch
    )
    expected = torch.stack([solution.query_grad for solution in solve_tasks(problem)]).mean(0)
    torch.testing.assert_close(flat(estimate, "omega"), expected, rtol=1e-8, atol=1e-10)
    assert not flat(estimate, "lambda").any()


def test_reptile_moves_omega_toward_the_inner_solution() -> None:
    """Reptile's closed form: ``g = omega - phi*``, with the fixed strength ``init_lambda``."""
    problem = regression(learn_lambda=False)
    estimate = estimated(problem, Reptile(inner_steps=CONVERGED_STEPS, inner_lr=INNER_LR))
    omega = flat(problem.learner.meta_parameters(), "omega")
    expected = torch.stack([omega - solution.phi for solution in solve_tasks(problem)]).mean(0)
    torch.testing.assert_close(estimate, expected, rtol=1e-8, atol=1e-10)
