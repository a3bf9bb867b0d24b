"""Implicit differentiation of the inner solution (iMAML, generalised)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lightning_contrastive.estimators.base import Estimator, Solver, TaskEstimate, detached
from lightning_contrastive.faults import SOLVE
from lightning_contrastive.inner import check_steps, check_tolerance
from lightning_contrastive.learners.base import Learner
from lightning_contrastive.tasks import Params, Task

Vectors = list[Tensor]


class Implicit(Estimator):
    """The implicit-function meta-gradient, solved by conjugate gradient on Hessian-vector products.

    At an inner solution ``phi*`` (``inner_steps`` first-order steps on ``L_in``), the implicit
    function theorem gives

        ``g = dL_query/dtheta - (d^2 L_in / dtheta dphi) H^-1 dL_query/dphi``,  ``H = d^2 L_in / dphi^2``,

    for any learner, not only iMAML's proximal regulariser (for which it reduces to
    ``lambda (lambda I + H_support)^-1 dL_query/dphi``). ``w = H^-1 dL_query/dphi`` is found by
    ``cg_steps`` iterations of conjugate gradient on ``(H + cg_damping I) w = dL_query/dphi``, and the
    surrogate ``S = L_query(phi*, theta) - <dL_in/dphi(phi*, theta), sg w>`` has ``dS/dtheta = g``.
    Memory is one double-backward graph of the inner loss, whatever ``inner_steps`` is.

    The theorem assumes ``phi*`` is a minimum (``H`` positive definite). Where it is not (an unconverged or
    indefinite point), conjugate gradient meets a direction of negative curvature or its residual grows,
    and its answer is arbitrary: either is reported as a fault of phase ``"solve"`` (see ``TaskEstimate.faults``),
    so the module's ``on_inner_fault`` policy stops or skips the task. ``cg_damping > 0`` makes ``H + cg_damping I``
    positive definite wherever ``H``'s eigenvalues exceed ``-cg_damping``, at the price of a bias; it stays 0 by
    default, so that the estimate is the theorem's. Measured: on the float64 tanh MLP of
    ``benchmarks/gradient_quality.py`` (no faults at any damping), damping 0.01 / 0.1 / 1 leaves relative errors
    of 1.2e-2 / 1.1e-1 / 4.4e-1 to the exact meta-gradient at 100 inner steps, against 1.5e-8 undamped. On the
    sinusoid ReLU MLP (1-40-40-1, lambda 1, lr 0.005) the inner Hessian is indefinite at 70% of tasks after 100
    inner steps (96% after 10), and damping 1 cuts that to 15% (86%): ReLU networks need damping or the skip
    policy with this estimator.

    ``tolerance`` stops the inner phase (in training and in :meth:`adapt`) at the first point whose gradient norm
    is at most it, with ``inner_steps`` as the cap, as :class:`~lightning_contrastive.Contrastive`'s does: the
    theorem holds at a solution, so a phase that stops when solved is the estimate's premise made a setting.
    The phase's steps and residual are reported like the contrastive phases'.

    ``solver="lbfgs"`` solves the inner phase with :class:`~lightning_contrastive.inner.InnerLBFGS` (first step
    ``-inner_lr g``, ``inner_momentum`` ignored, ``inner_steps`` counting gradient evaluations) instead of momentum
    SGD (``"sgd"``, the default): the theorem needs the solution, not the path to it.
    """

    batchable = True  # CG runs its fixed iterations with no host read; a tolerance reads one batch-wide flag

    def __init__(
        self,
        inner_steps: int = 100,
        inner_lr: float = 0.01,
        inner_momentum: float = 0.9,
        cg_steps: int = 20,
        cg_damping: float = 0.0,
        tolerance: float | None = None,
        solver: Solver = "sgd",
    ) -> None:
        super().__init__(inner_lr, inner_momentum, solver)
        check_steps("inner_steps", inner_steps)
        check_steps("cg_steps", cg_steps)
        check_tolerance("tolerance", tolerance)
        if not cg_damping >= 0:
            raise ValueError(f"cg_damping must be >= 0; got {cg_damping}.")
        self.inner_steps = inner_steps
        self.cg_steps = cg_steps
        self.cg_damping = float(cg_damping)
        self.tolerance = None if tolerance is None else float(tolerance)
        self.solver = solver

    @property
    def adaptation_steps(self) -> int:
        return self.inner_steps

    @property
    def adaptation_tolerance(self) -> float | None:
        return self.tolerance

    def task_estimate(self, learner: Learner, meta: Params, task: Task) -> TaskEstimate:
        phase = self.adapt(learner, meta, task.support)
        solution = detached(phase.params)
        frozen = detached(meta)

        def inner_gradient(fast: Params, theta: Params) -> Params:
            return torch.func.grad(lambda phi: learner.inner_loss(phi, theta, task.support))(fast)

        with torch.enable_grad():
            # Reverse over reverse: one graph of the inner gradient, reused by every Hessian-vector product.
            _, hessian_vector_product = torch.func.vjp(lambda phi: inner_gradient(phi, frozen), solution)

        def damped_hvp(vectors: Vectors) -> Vectors:
            (products,) = hessian_vector_product(dict(zip(solution, vectors, strict=True)))
            return [products[name] + self.cg_damping * v for name, v in zip(solution, vectors, strict=True)]

        with torch.enable_grad():
            query_grad = torch.func.grad(lambda phi: learner.query_loss(phi, frozen, task.query))(solution)
            solved = conjugate_gradient(damped_hvp, list(query_grad.values()), self.cg_steps)
            mixed = inner_gradient(solution, meta)  # live in theta: <dL_in/dphi, sg w> differentiates to the mixed term
            surrogate = learner.query_loss(solution, meta, task.query) - sum(
                (mixed[name] * w).sum() for name, w in zip(solution, solved.solution, strict=True)
            )
        found = TaskEstimate.from_phases(surrogate, phase.params, {"free": phase})
        return replace(found, faults={**found.faults, SOLVE: solved.failed})


ROUNDING_MARGIN = 1024
"""How many machine epsilons of relative difference :func:`conjugate_gradient`'s fault checks leave to rounding."""


@dataclass(frozen=True)
class ConjugateGradientResult:
    """What :func:`conjugate_gradient` found.

    Attributes:
        solution: the approximate solution, one tensor per parameter.
        failed: a boolean scalar tensor, True when an iteration met a direction of negative curvature
            (``p^T A p`` below zero by more than rounding: ``A`` is not positive semi-definite), or the final residual
            is larger than the right-hand side by more than rounding (the iteration diverged), or either is NaN; the
            solution is then meaningless.
    """

    solution: Vectors
    failed: Tensor


def conjugate_gradient(
    matvec: Callable[[Vectors], Vectors], rhs: Sequence[Tensor], steps: int
) -> ConjugateGradientResult:
    """Solve ``A x = rhs`` for symmetric positive (semi-)definite ``A`` given only ``matvec(v) = A v``.

    Runs exactly ``steps`` iterations from ``x = 0``; once the residual has fallen to machine precision relative
    to ``rhs``, a direction is flat, or an iteration failed, the remaining ones leave ``x`` unchanged. Nothing is read
    on the host, so no iteration waits for an accelerator and the solve runs under ``torch.func.vmap``. Vectors are
    lists of tensors (one per parameter).

    Each fault check compares two quantities with a margin at their own scale, ``ROUNDING_MARGIN`` (1024) times the
    dtype's machine epsilon ``eps`` (2.3e-13 relative in float64, 1.2e-4 in float32), so that rounding cannot decide it:

    - curvature: with ``scale`` the largest ``|p^T A p| / ||p||^2`` met so far (a Rayleigh quotient, so at most
      ``||A||``), a direction is *negative* where ``p^T A p < -1024 eps scale ||p||^2`` (a fault) and *flat* where
      ``|p^T A p|`` is within that margin: ``A`` is semi-definite along it (a zero eigenvalue: a bias that a
      normalisation cancels, the shared shift of softmax logits) and ``rhs`` has only rounding there, so the
      iteration ends, the system solved where ``A`` is definite, instead of a step of ``|r|^2 / (p^T A p)``,
      rounding over rounding, or a fault on the sign of rounding. What the solution holds along such a direction is
      arbitrary, and harmless where the flatness is a symmetry of the inner loss (as in both examples): its gradient
      has no component along the direction for any ``theta``, so the implicit estimate's mixed term ignores it.
      Why 1024 and not a few: a Hessian-vector product sums many rounded terms, and along a bias that BatchNorm
      cancels the computed Rayleigh quotient came out at up to 82 ``eps`` (float64) and 34 ``eps`` (float32) of a
      random direction's on a two-block conv net with 25 images, growing with the number of terms summed. Negative
      curvature is still caught wherever a direction's Rayleigh quotient is below ``-2.3e-13 scale`` (float64); an
      eigenvalue of -1e-9 of the largest was caught in every basis tried (tests/estimators/test_implicit.py).
    - growth: the final residual fails where ``|r|^2 > (1 + 1024 eps) |rhs|^2``, or is NaN: a squared norm of a
      vector that equals ``rhs`` up to rounding (no progress) is not growth; a real one is (an indefinite Hessian that
      conjugate gradient did not meet as negative curvature left ``|r|^2`` at 1.06 to 47 times ``|rhs|^2`` in the
      cases measured for issue 24).
    """

    def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        return sum((x * y).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]

    solution = [torch.zeros_like(r) for r in rhs]
    residual = [r.clone() for r in rhs]
    direction = [r.clone() for r in rhs]
    residual_norm = dot(residual, residual)
    dtype = residual_norm.dtype
    floor = residual_norm * torch.finfo(dtype).eps ** 2
    margin = ROUNDING_MARGIN * torch.finfo(dtype).eps
    scale = torch.zeros_like(residual_norm)
    failed = torch.zeros_like(residual_norm, dtype=torch.bool)
    flat = torch.zeros_like(failed)
    for _ in range(steps):
        product = matvec(direction)
        curvature = dot(direction, product)
        direction_norm = dot(direction, direction)
        scale = torch.maximum(scale, curvature.abs() / torch.where(direction_norm > 0, direction_norm, 1.0))
        tolerance = margin * scale * direction_norm
        active = (residual_norm > floor) & ~failed & ~flat
        failed = failed | (active & ~(curvature >= -tolerance))  # negative, or NaN
        flat = flat | (active & ~failed & (curvature <= tolerance))
        active = active & ~failed & ~flat
        step = torch.where(active, residual_norm / torch.where(active, curvature, 1.0), 0.0)
        solution = [x + step * d for x, d in zip(solution, direction, strict=True)]
        residual = [r - step * p for r, p in zip(residual, product, strict=True)]
        new_norm = dot(residual, residual)
        ratio = torch.where(active, new_norm / torch.where(active, residual_norm, 1.0), 0.0)
        direction = [torch.where(active, r + ratio * d, d) for r, d in zip(residual, direction, strict=True)]
        residual_norm = torch.where(active, new_norm, residual_norm)
    failed = failed | ~(residual_norm <= (1 + margin) * dot(rhs, rhs))  # grew past the right-hand side, or NaN
    return ConjugateGradientResult(solution, failed)
