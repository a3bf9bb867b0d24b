"""The solvers and measurements of :mod:`benchmarks.diagnostics.solvability`: each solver runs a counted objective
until its budget of gradient evaluations is spent, and :func:`solve` records the residual at every evaluated point.

Cost: what the objective costs per evaluation, times the budget; L-BFGS adds its two-loop recursion (10-35% more
CPU per evaluation than momentum SGD on Conv4-32).

``lbfgs-lockstep`` is the library's own solver, :class:`~lightning_contrastive.InnerLBFGS` run by
:func:`~lightning_contrastive.inner.minimise` (one evaluation per iteration, backtracking Armijo line search), fed the
counted objective through an autograd function whose backward is the counted gradient.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_contrastive import InnerLBFGS, InnerSGD
from lightning_contrastive.inner import minimise

Flat = Tensor
"""All fast weights of one task as one vector."""
Evaluate = Callable[[Flat], tuple[Tensor, Flat]]
"""A counted objective: the point's ``L_in`` and gradient (raises :class:`BudgetSpent` after the last one)."""


class BudgetSpent(Exception):  # noqa: N818 (a signal that ends every solver's loop, not an error)
    """Raised by the counted objective once it has made its budget of gradient evaluations."""


# ---------------------------------------------------------------------------------------------------------------
# Solvers: each runs until the counted objective raises BudgetSpent. They move in the coordinates ``z`` of the
# problem (``phi = start + scale * z``), where the objective's gradient is ``scale * dL/dphi``.


def momentum_sgd(lr: float, momentum: float = 0.9) -> Callable[[Evaluate, Flat], None]:
    """The library's inner optimizer, :class:`~lightning_contrastive.InnerSGD`, one step per evaluation."""
    optimizer = InnerSGD(lr, momentum)

    def run(evaluate: Evaluate, z: Flat) -> None:
        velocity = [torch.zeros_like(z)]
        while True:
            _, gradient = evaluate(z)
            optimizer.update_([z], [gradient], velocity)

    return run


def lbfgs(history: int = 20) -> Callable[[Evaluate, Flat], None]:
    """``torch.optim.LBFGS`` with a strong-Wolfe line search and no stopping test of its own (the budget stops it)."""

    def run(evaluate: Evaluate, z: Flat) -> None:
        z.requires_grad_()
        optimizer = torch.optim.LBFGS(
            [z],
            lr=1.0,
            max_iter=1_000_000,
            max_eval=1_000_000,
            tolerance_grad=0.0,
            tolerance_change=0.0,
            history_size=history,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            loss, gradient = evaluate(z.detach())
            z.grad = gradient
            return loss

        while True:  # a step returns early only when its direction is no descent direction; it then restarts
            optimizer.step(closure)

    return run


def lockstep_lbfgs(lr: float = 0.01, history: int = 10) -> Callable[[Evaluate, Flat], None]:
    """The library's :class:`~lightning_contrastive.InnerLBFGS` through ``minimise``, with no tolerance (the budget
    stops it): every evaluation it makes, accepted or rejected, counts."""
    solver = InnerLBFGS(lr, history)

    def run(evaluate: Evaluate, z: Flat) -> None:
        minimise(lambda params: _Counted.apply(params["z"], evaluate), {"z": z}, 1 << 30, solver)

    return run


class _Counted(torch.autograd.Function):
    """``z -> L`` through the counted objective, whose gradient comes with its value (no second evaluation)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, z: Tensor, evaluate: Evaluate) -> Tensor:
        with torch.enable_grad():  # a Function's forward runs without grad; the counted objective takes its own
            loss, gradient = evaluate(z.detach())
        ctx.save_for_backward(gradient)
        return loss

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, upstream: Tensor) -> tuple[Tensor, None]:
        (gradient,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return upstream * gradient, None


def nesterov_restart(lr: float) -> Callable[[Evaluate, Flat], None]:
    """Nesterov's accelerated gradient ``x_k = y - lr g(y)``, ``y <- x_k + k / (k + 3) (x_k - x_(k-1))``, with the
    adaptive gradient restart of O'Donoghue and Candes (2015): ``k`` returns to 0 whenever ``g(y) . (x_k - x_(k-1))
    > 0`` (the momentum points uphill). It needs no function values, so each step costs one evaluation."""

    def run(evaluate: Evaluate, z: Flat) -> None:
        previous, look_ahead, k = z.clone(), z, 0
        while True:
            _, gradient = evaluate(look_ahead)
            current = look_ahead - lr * gradient
            k = 0 if float(gradient @ (current - previous)) > 0 else k + 1
            look_ahead = current + k / (k + 3) * (current - previous)
            previous = current
            z.copy_(current)

    return run


def adam(lr: float) -> Callable[[Evaluate, Flat], None]:
    """``torch.optim.Adam`` at a fixed learning rate, one step per evaluation."""

    def run(evaluate: Evaluate, z: Flat) -> None:
        z.requires_grad_()
        optimizer = torch.optim.Adam([z], lr=lr)
        while True:
            _, z.grad = evaluate(z.detach())
            optimizer.step()

    return run


SOLVERS: dict[str, Callable[[Evaluate, Flat], None]] = {
    "sgd-0.01": momentum_sgd(0.01),
    "sgd-0.05": momentum_sgd(0.05),
    "lbfgs": lbfgs(),
    "lbfgs-lockstep": lockstep_lbfgs(),
    "nesterov-0.01": nesterov_restart(0.01),
    "adam-0.001": adam(1e-3),
}


# ---------------------------------------------------------------------------------------------------------------
# One solve, with every evaluation recorded.


@dataclass
class Trace:
    """What a solve evaluated: per evaluation, the residual ``||dL/dphi||``, ``L_in`` and the CPU seconds so far;
    and the points evaluated last and half-way through the budget."""

    residuals: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    last_point: Flat | None = None
    halfway_point: Flat | None = None

    def late_drift(self, start: Flat) -> float:
        """How far the second half of the budget moved the point, relative to how far the whole solve moved it:
        ``||phi_N - phi_(N/2)|| / ||phi_N - phi_0||``. Small when the iterates have settled, even where the
        residual has not fallen (a minimum on a ReLU or max-pool kink, where the gradient does not vanish)."""
        assert self.last_point is not None and self.halfway_point is not None
        return float((self.last_point - self.halfway_point).norm() / (self.last_point - start).norm())

    def evaluations_to(self, ratio: float) -> int | None:
        """The number of evaluations up to the first point with residual ``<= ratio x`` the start's, or None."""
        bound = ratio * self.residuals[0]
        return next((i + 1 for i, r in enumerate(self.residuals) if r <= bound), None)


def solve(
    loss: Callable[[Flat], Tensor],
    start: Flat,
    solver: Callable[[Evaluate, Flat], None],
    evaluations: int,
    scale: Flat | None = None,
) -> Trace:
    """Run ``solver`` on ``loss`` from ``start`` for ``evaluations`` gradient evaluations and return the trace.

    The solver works on ``z`` with ``phi = start + scale * z`` (``scale`` 1 by default); the residual recorded is
    always the Euclidean gradient norm in ``phi``.
    """
    if evaluations < 1:
        raise ValueError(f"evaluations must be >= 1; got {evaluations}.")
    scale = torch.ones_like(start) if scale is None else scale
    trace = Trace()
    began = time.process_time()

    def evaluate(z: Flat) -> tuple[Tensor, Flat]:
        point = (start + scale * z.detach()).requires_grad_()
        value = loss(point)
        (gradient,) = torch.autograd.grad(value, point)
        trace.residuals.append(float(gradient.norm()))
        trace.losses.append(float(value.detach()))
        trace.seconds.append(time.process_time() - began)
        trace.last_point = point.detach()
        if len(trace.residuals) == (evaluations + 1) // 2:
            trace.halfway_point = trace.last_point
        if len(trace.residuals) >= evaluations:
            raise BudgetSpent
        return value.detach(), scale * gradient

    try:
        with torch.enable_grad():
            solver(evaluate, torch.zeros_like(start))
    except BudgetSpent:
        pass
    return trace


def curvature_extremes(loss: Callable[[Flat], Tensor], at: Flat, iterations: int, seed: int = 0) -> tuple[float, float]:
    """The lowest and highest Hessian eigenvalues of ``loss`` at ``at``, by power iteration (``iterations``
    Hessian-vector products each): first on ``H``, which finds the eigenvalue ``m`` of largest magnitude, then on
    ``H - m I``, which finds the other end of the spectrum. A negative lowest one means the problem is not convex
    there (the pull does not dominate the loss's negative curvature)."""
    point = at.detach().requires_grad_()
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(loss(point), point, create_graph=True)
    generator = torch.Generator().manual_seed(seed)

    def largest(shift: float) -> float:
        vector, quotient = torch.randn(at.shape, generator=generator, dtype=at.dtype), math.nan
        for _ in range(iterations):
            vector = vector / vector.norm()
            (product,) = torch.autograd.grad(gradient, point, vector, retain_graph=True)
            product = product - shift * vector
            quotient = float(product @ vector)
            vector = product.detach()
        return quotient + shift

    first = largest(0.0)
    second = largest(first)
    return min(first, second), max(first, second)


# ---------------------------------------------------------------------------------------------------------------
# Networks, start states and problems.
