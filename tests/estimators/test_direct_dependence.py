"""A query loss that depends on a meta-parameter directly, not only through the adapted weights.

``ScaledFeatures`` learns, per task, fast features ``W`` (``k x d``) pulled toward a meta-learned
start ``W0`` with a meta-learned strength, and reads them out through a meta-learned head ``h``
that the query loss uses too: ``f(x) = h^T W x``. Its inner problem is quadratic in ``W``, so
``phi*(theta)`` is a linear solve, and autograd through that solve gives the exact meta-gradient,
direct term ``dL_query/dh`` included. The contrastive rule carries that term in ``beta dL_query/dtheta``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_contrastive import MAML, Contrastive, Estimator, Implicit, Learner, meta_gradient
from lightning_contrastive.tasks import Params, Split

FEATURES, HIDDEN, SUPPORT, QUERY, TASKS = 3, 2, 8, 10, 2
META_NAMES = ("start", "head", "log_strength")


class ScaledFeatures(Learner):
    """Fast features ``W`` from a meta start ``W0``, read out by a meta head ``h``: ``f(x) = h^T W x``.

    ``L_in = mse(f(x_s), y_s) + exp(log_strength) / 2 ||W - W0||^2``; ``L_query = mse(f(x_q), y_q)``.
    """

    def __init__(self) -> None:
        super().__init__("mse")
        self.start = nn.Parameter(0.5 * torch.randn(HIDDEN, FEATURES, dtype=torch.float64))
        self.head = nn.Parameter(torch.tensor([1.0, -0.7], dtype=torch.float64))
        self.log_strength = nn.Parameter(torch.tensor(0.2, dtype=torch.float64))

    def init_fast(self, meta: Params) -> Params:
        return {"features": meta["start"]}

    def predict(self, fast: Params, meta: Params, x: Tensor) -> Tensor:
        return (x @ fast["features"].T @ meta["head"]).unsqueeze(-1)

    def regulariser(self, fast: Params, meta: Params) -> Tensor:
        return 0.5 * meta["log_strength"].exp() * (fast["features"] - meta["start"]).square().sum()


def make_problem() -> tuple[ScaledFeatures, dict[str, tuple[Tensor, Tensor]]]:
    torch.manual_seed(2)
    xs = torch.randn(TASKS, SUPPORT, FEATURES, dtype=torch.float64)
    xq = torch.randn(TASKS, QUERY, FEATURES, dtype=torch.float64)
    true_weights = torch.randn(TASKS, FEATURES, 1, dtype=torch.float64)
    return ScaledFeatures(), {"train": (xs, xs @ true_weights), "test": (xq, xq @ true_weights)}


def design(x: Tensor, head: Tensor) -> Tensor:
    """``Z`` with ``f(x) = Z vec(W)``: row ``i`` is ``h x_i^T`` flattened."""
    return (head[None, :, None] * x[:, None, :]).reshape(x.shape[0], -1)


def solution(learner: ScaledFeatures, meta: Params, x: Tensor, y: Tensor) -> Tensor:
    """``vec(W*)``, differentiable in ``meta``: ``(2/n Z^T Z + lambda I) w = 2/n Z^T y + lambda vec(W0)``."""
    z, strength = design(x, meta["head"]), meta["log_strength"].exp()
    system = 2 / x.shape[0] * z.T @ z + strength * torch.eye(z.shape[1], dtype=z.dtype)
    return torch.linalg.solve(system, 2 / x.shape[0] * z.T @ y[:, 0] + strength * meta["start"].flatten())


def exact_meta_gradient(learner: ScaledFeatures, batch: dict[str, tuple[Tensor, Tensor]]) -> Params:
    """Autograd through the exact inner solution, averaged over tasks."""
    meta = learner.meta_parameters()
    (xs, ys), (xq, yq) = batch["train"], batch["test"]
    losses = []
    for task in range(TASKS):
        phi = solution(learner, meta, xs[task], ys[task])
        losses.append((design(xq[task], meta["head"]) @ phi - yq[task, :, 0]).square().mean())
    grads = torch.autograd.grad(torch.stack(losses).mean(), list(meta.values()))
    return dict(zip(meta, grads, strict=True))


def as_vector(grads: Params) -> Tensor:
    return torch.cat([grads[name].flatten() for name in META_NAMES])


def relative_error(estimate: Tensor, exact: Tensor) -> float:
    return float((estimate - exact).norm() / exact.norm())


STEPS, LR = 400, 0.05
CONTRASTIVE = Contrastive(beta=1e-3, symmetric=True, inner_steps=STEPS, nudged_steps=STEPS, inner_lr=LR)
ONE_SIDED = Contrastive(beta=1e-4, symmetric=False, inner_steps=STEPS, nudged_steps=STEPS, inner_lr=LR)
FULL_NUDGE = Contrastive(beta=1e-3, symmetric=True, nudge="full", inner_steps=STEPS, nudged_steps=STEPS, inner_lr=LR)
FULL_ONE_SIDED = Contrastive(
    beta=1e-4, symmetric=False, nudge="full", inner_steps=STEPS, nudged_steps=STEPS, inner_lr=LR
)
IMPLICIT = Implicit(inner_steps=STEPS, inner_lr=LR, cg_steps=2 * FEATURES * HIDDEN)
MAML_UNROLLED = MAML(inner_steps=STEPS, inner_lr=LR)


@pytest.mark.parametrize(
    "estimator",
    [CONTRASTIVE, ONE_SIDED, FULL_NUDGE, FULL_ONE_SIDED, IMPLICIT, MAML_UNROLLED],
    ids=[
        "contrastive-linear-symmetric",
        "contrastive-linear-one-sided",
        "contrastive-full-symmetric",
        "contrastive-full-one-sided",
        "implicit",
        "maml",
    ],
)
def test_estimators_include_the_direct_dependence(estimator: Estimator) -> None:
    learner, batch = make_problem()
    exact = as_vector(exact_meta_gradient(learner, batch))
    estimate = as_vector(meta_gradient(learner, estimator, batch))
    assert torch.cosine_similarity(estimate, exact, dim=0) > 0.9999
    assert relative_error(estimate, exact) < 1e-3


def test_contrastive_and_implicit_agree_with_each_other() -> None:
    learner, batch = make_problem()
    contrastive = as_vector(meta_gradient(learner, CONTRASTIVE, batch))
    implicit = as_vector(meta_gradient(learner, IMPLICIT, batch))
    assert torch.cosine_similarity(contrastive, implicit, dim=0) > 0.9999


class WithoutDirectTerm(ScaledFeatures):
    """The same learner with the query loss's direct path to the head cut: what dropping the direct term computes."""

    def query_loss(self, fast: Params, meta: Params, query: Split) -> Tensor:
        return super().query_loss(fast, {**meta, "head": meta["head"].detach()}, query)


@pytest.mark.parametrize("estimator", [CONTRASTIVE, FULL_NUDGE], ids=["linear-nudge", "full-nudge"])
def test_dropping_the_direct_term_would_be_detected(estimator: Contrastive) -> None:
    """The head's direct gradient is a large part of the total: without it the contrastive estimate is far off."""
    learner, batch = make_problem()
    exact = exact_meta_gradient(learner, batch)
    estimate = meta_gradient(learner, estimator, batch)
    torch.testing.assert_close(estimate["head"], exact["head"], rtol=1e-3, atol=0)

    cut = WithoutDirectTerm()
    cut.load_state_dict(learner.state_dict())
    without_direct = meta_gradient(cut, estimator, batch)
    assert relative_error(without_direct["head"], exact["head"]) > 0.5
    assert relative_error(as_vector(without_direct), as_vector(exact)) > 0.1
