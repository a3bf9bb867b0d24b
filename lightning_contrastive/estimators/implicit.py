"""Implicit differentiation of the inner solution (iMAML, generalised)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_contrastive.estimators.base import TaskEstimate
from lightning_contrastive.estimators.maml import _InnerStepsEstimator
from lightning_contrastive.inner import check_steps
from lightning_contrastive.learners.base import Learner
from lightning_contrastive.tasks import Params, Task

Vectors = list[Tensor]


class Implicit(_InnerStepsEstimator):
    """The implicit-function meta-gradient, solved by conjugate gradient on Hessian-vector products.

    At an inner solution ``phi*`` (``inner_steps`` first-order steps on ``L_in``), the implicit
    function theorem gives

        ``g = dL_query/dtheta - (d^2 L_in / dtheta dphi) H^-1 dL_query/dphi``,  ``H = d^2 L_in / dphi^2``,

    for any learner, not only iMAML's proximal regulariser (for which it reduces to
    ``lambda (lambda I + H_support)^-1 dL_query/dphi``). ``w = H^-1 dL_query/dphi`` is found by
    ``cg_steps`` iterations of conjugate gradient on ``(H + cg_damping I) w = dL_query/dphi``, and the
    surrogate ``S = L_query(phi*, theta) - <dL_in/dphi(phi*, theta), sg w>`` has ``dS/dtheta = g``.
    Assumes ``phi*`` is a minimum (``H`` positive definite). Memory is one double-backward graph of
    the inner loss, whatever ``inner_steps`` is.
    """

    batchable = False  # conjugate gradient stops early on a host read of the residual

    def __init__(
        self,
        inner_steps: int = 100,
        inner_lr: float = 0.01,
        inner_momentum: float = 0.9,
        cg_steps: int = 20,
        cg_damping: float = 0.0,
    ) -> None:
        super().__init__(inner_steps, inner_lr, inner_momentum)
        check_steps("cg_steps", cg_steps)
        if not cg_damping >= 0:
            raise ValueError(f"cg_damping must be >= 0; got {cg_damping}.")
        self.cg_steps = cg_steps
        self.cg_damping = float(cg_damping)

    def task_estimate(self, learner: Learner, meta: Params, task: Task) -> TaskEstimate:
        phase = self.adapt(learner, meta, task.support)
        solution = {name: p.detach().requires_grad_() for name, p in phase.params.items()}
        fast = list(solution.values())
        with torch.enable_grad():
            query_loss = learner.query_loss(solution, meta, task.query)
            query_grad = torch.autograd.grad(query_loss, fast, retain_graph=True)
            inner_grad = torch.autograd.grad(learner.inner_loss(solution, meta, task.support), fast, create_graph=True)

            def damped_hvp(vectors: Vectors) -> Vectors:
                products = torch.autograd.grad(inner_grad, fast, grad_outputs=vectors, retain_graph=True)
                return [hv + self.cg_damping * v for hv, v in zip(products, vectors, strict=True)]

            solved = conjugate_gradient(damped_hvp, [g.detach() for g in query_grad], self.cg_steps)
            surrogate = query_loss - sum((g * w).sum() for g, w in zip(inner_grad, solved, strict=True))
        return TaskEstimate.from_phases(surrogate, phase.params, {"free": phase})


def conjugate_gradient(matvec: Callable[[Vectors], Vectors], rhs: Sequence[Tensor], steps: int) -> Vectors:
    """Solve ``A x = rhs`` for symmetric positive definite ``A`` given only ``matvec(v) = A v``.

    Runs at most ``steps`` iterations from ``x = 0`` and stops early once the residual has fallen
    to machine precision relative to ``rhs``. Vectors are lists of tensors (one per parameter).
    """

    def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        return sum((x * y).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]

    solution = [torch.zeros_like(r) for r in rhs]
    residual = [r.clone() for r in rhs]
    direction = [r.clone() for r in rhs]
    residual_norm = dot(residual, residual)
    floor = float(residual_norm) * torch.finfo(residual_norm.dtype).eps ** 2
    for _ in range(steps):
        if float(residual_norm) <= floor:
            break
        product = matvec(direction)
        step = residual_norm / dot(direction, product)
        solution = [x + step * d for x, d in zip(solution, direction, strict=True)]
        residual = [r - step * p for r, p in zip(residual, product, strict=True)]
        new_norm = dot(residual, residual)
        direction = [r + (new_norm / residual_norm) * d for r, d in zip(residual, direction, strict=True)]
        residual_norm = new_norm
    return solution
