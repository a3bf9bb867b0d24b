"""The contrastive meta-learning rule (Zucchet et al., NeurIPS 2022), with the paper's nudge and a linearised one."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator
from typing import ClassVar, Literal

import torch
from torch import Tensor

from lightning_contrastive._deprecations import renamed_argument
from lightning_contrastive.estimators.base import Estimator, Solver, TaskEstimate, detached, inner_solver
from lightning_contrastive.inner import (
    Phase,
    check_steps,
    check_tolerance,
    inside_function_transform,
    joint_norm,
    minimise,
)
from lightning_contrastive.learners.base import Learner
from lightning_contrastive.tasks import Params, Split, Task

Nudge = Literal["linear", "full"]
Precision = Literal["float32", "float64"]
_FREE_STEPS_RENAMED = (
    "Contrastive.free_steps is deprecated and will be removed in the next release: it was renamed inner_steps."
)


class Contrastive(Estimator):
    """Two-phase contrastive estimate of the meta-gradient: first-order, constant memory in the steps.

    1. free phase: ``inner_steps`` inner steps on ``L_in`` from the learner's start give ``phi_0``;
    2. nudged phase(s): ``nudged_steps`` steps warm-started from ``phi_0`` on a nudged objective give
       ``phi_beta`` (and ``phi_-beta`` for the symmetric rule);
    3. the estimate is read off the difference between the phases.

    **Linear nudge** (``nudge="linear"``, the default). One forward and backward pass over the query set at
    ``phi_0`` gives ``g = dL_query/dphi(phi_0, theta)``; the nudged phases descend
    ``L_in(phi, theta) + beta <g, phi - phi_0>`` (and ``- beta``), which never evaluates the query set, so a
    nudged step costs a free step. Estimate, symmetric:
    ``[dL_in/dtheta(phi_beta) - dL_in/dtheta(phi_-beta)] / (2 beta) + dL_query/dtheta(phi_0, theta)``;
    one-sided: ``[dL_in/dtheta(phi_beta) - dL_in/dtheta(phi_0)] / beta + dL_query/dtheta(phi_0, theta)``. The
    last term is the query loss's direct dependence on ``theta`` (the dual system's slow weights; zero for the
    complex synapse). At convergence ``phi_+-beta = phi_0 -+ beta H^-1 g + beta^2 c + O(beta^3)``, with ``c``
    from third derivatives of ``L_in`` alone, so the symmetric difference cancels ``c``.

    **Full nudge** (``nudge="full"``, the paper's). The nudged phases descend
    ``L_beta = L_in + beta L_query``; estimate, one-sided
    ``[dL_beta/dtheta(phi_beta) - dL_0/dtheta(phi_0)] / beta``, symmetric
    ``[dL_beta/dtheta(phi_beta) - dL_-beta/dtheta(phi_-beta)] / (2 beta)``, where the ``beta dL_query/dtheta``
    term carries the direct dependence. Every nudged step evaluates the query set (or ``query_subsample`` of it),
    which dominates when the query set is much larger than the support set (Omniglot 20-way 1-shot: 300 queries
    against 20 support images, so a nudged step costs about 15-20 free ones).

    Both nudges have bias O(beta) one-sided and O(beta^2) symmetric, plus O(delta / beta) when the phases are
    solved only to accuracy ``delta`` (a smaller beta needs better-converged phases), and the same limit as
    beta -> 0: the implicit meta-gradient. The surrogate is the matching difference of losses at the detached
    phase solutions, e.g. ``[L_in(sg phi_beta, theta) - L_in(sg phi_-beta, theta)] / (2 beta)
    + L_query(sg phi_0, theta)`` for the symmetric linear nudge, so that ``dS/dtheta`` is the estimate.

    Cost: ``inner_steps + nudged_steps`` (one-sided) or ``inner_steps + 2 nudged_steps`` (symmetric)
    first-order steps, or fewer where the phases reach ``tolerance``, plus one query pass (linear) and one ``L_in``
    gradient (``cancel_free_residual``); memory is that of one forward and backward pass, whatever the number of
    steps.

    Args:
        beta: nudging strength, > 0.
        symmetric: nudge at ``+beta`` and ``-beta`` (lower bias) instead of ``+beta`` only.
        inner_steps: inner steps of the free phase (also the steps of :meth:`adapt`).
        nudged_steps: inner steps of each nudged phase; ``None`` (default) takes ``inner_steps``. Measured
            (``docs/reproduce/findings.md``, "Defaults"): as long as the free phase was better in five of the eight
            comparisons (Omniglot 20-way, linear nudge, 250 meta-steps: 74.4% against 64.2% with half as many), but on
            the sinusoid quickstart half as many won clearly (MSE 0.61 against 3.00): worth tuning per problem.
        nudge: ``"linear"`` (query gradient frozen at ``phi_0``) or ``"full"`` (the query loss itself).
        inner_lr: learning rate of the free phase.
        inner_momentum: momentum of every phase.
        nudged_lr: learning rate of the nudged phases; ``None`` uses ``inner_lr``.
        query_subsample: full nudge only: evaluate each nudged step's query loss on this many queries drawn at
            random without replacement (from torch's global generator), an unbiased estimate of its gradient
            at ``query_subsample / len(query)`` of the cost; ``None`` (default) uses every query.
        divergence_ratio: a nudged phase counts as diverged (a fault, see ``TaskEstimate.faults``) when its
            objective moves by more than this many times ``|L_in(phi_0)| + beta |L_query(phi_0)|``. A nudge moves
            the solution by O(beta); a larger move is a step size too large for the nudged objective or an
            objective unbounded below (e.g. ``L_in - beta L_query`` with MSE on an unbounded network). The scale
            adds magnitudes, so losses of either sign (a log-likelihood, say) cannot cancel it to zero.
        precision: the dtype of the phases and of the contrastive difference, at least the learner's:
            ``"float64"`` for a beta so small (below about 1e-3 for float32 models) that the difference of
            float32 losses loses its digits; it costs about twice the time on CPUs.
        tolerance: stop each phase (free, nudged, and :meth:`adapt` at evaluation) at the first point whose
            gradient norm ``||d objective / d phi||_2`` is at most this, with ``inner_steps`` / ``nudged_steps`` as
            caps; ``None`` (default) runs every step. Absolute, not relative: the estimate's error is
            ``O(delta / beta) + O(beta^2)`` for nudged phases solved to ``delta ~ tolerance / mu`` (``mu`` the inner
            problem's smallest curvature). So each nudged phase stops at the tighter of ``tolerance`` and
            :attr:`NUDGE_RESOLUTION` ``beta |g|`` (``g = dL_query/dphi`` at ``phi_0``, per task): a nudge smaller
            than the tolerance is still resolved, where a nudged phase that starts within ``tolerance`` would take
            no step and drop its term of the difference. The free phase's residual enters the symmetric estimate
            only at second order (both nudged phases solve their own problems wherever they start); with
            ``cancel_free_residual`` the nudged phases ignore it, and it moves only the point (``phi_0``) whose
            implicit gradient is estimated.
            Steps used, residuals and unsolved phases are logged (``inner/<phase>_steps``, ``..._residual``).
            Not with ``query_subsample``, whose random subsets keep the nudged gradient from settling.
        solver: ``"sgd"`` (default): momentum SGD (``inner_lr``, ``inner_momentum``) in every phase; ``"lbfgs"``:
            :class:`~lightning_contrastive.inner.InnerLBFGS` in every phase (free, nudged, :meth:`adapt`), first-order
            and vmappable, its first step ``-inner_lr g`` (``-nudged_lr g`` in the nudged phases) and
            ``inner_momentum`` ignored; ``inner_steps`` and ``nudged_steps`` then count gradient evaluations. The
            phases are solves, so any solver that reaches the minimum gives the same estimate; L-BFGS gets there in
            fewer evaluations on smooth, near-convex problems. On a non-convex one it may not be the same minimum:
            on the smooth Omniglot Conv4 its nudged phases went 2-5x farther from ``phi_0`` than SGD's and the
            ``-beta`` one did not reach the tolerance (``docs/results/solvability.md``), so SGD stays the default.
            Not with ``query_subsample`` (a line search needs one objective).
        cancel_free_residual: subtract the free phase's residual gradient ``r = dL_in/dphi(phi_0)`` from every
            nudged objective, which then descends ``objective(phi) - <r, phi - phi_0>``. Its solution at
            ``beta = 0`` is ``phi_0`` itself, so the nudged phases resolve only their response to the nudge, not
            the rest of the free solve, and the estimate is the implicit gradient at ``phi_0`` (what
            :class:`~lightning_contrastive.Implicit` computes there) up to the rule's bias in beta, however far
            from solved the free phase ended; a nudged phase then starts at a residual of exactly ``beta |g|``
            (either nudge, ``g = dL_query/dphi(phi_0)``). Costs one gradient evaluation of ``L_in`` per task.
            ``False`` (default) keeps the paper's rule, whose nudged phases also finish the free solve: the
            estimate then targets the inner solution, which they reach only as far as their steps allow.
        free_steps: deprecated alias of ``inner_steps`` (its former name), accepted for one release with a
            ``DeprecationWarning``; passing both with different values is a ``ValueError``. Pass ``inner_steps``.
    """

    batchable = True

    NUDGE_RESOLUTION: ClassVar[float] = 0.1
    """With a tolerance, a nudged phase also stops no later than at a residual of this fraction of its nudge,
    ``beta |dL_query/dphi(phi_0)|``: a relative error of about this much in the response to the nudge."""

    def __init__(
        self,
        beta: float = 0.1,
        symmetric: bool = True,
        inner_steps: int = 100,
        nudged_steps: int | None = None,
        nudge: Nudge = "linear",
        inner_lr: float = 0.01,
        inner_momentum: float = 0.9,
        nudged_lr: float | None = None,
        query_subsample: int | None = None,
        divergence_ratio: float = 10.0,
        precision: Precision = "float32",
        tolerance: float | None = None,
        solver: Solver = "sgd",
        cancel_free_residual: bool = False,
        free_steps: int | None = None,  # when removed: configs and checkpoints saved meanwhile hold free_steps: null
    ) -> None:
        super().__init__(inner_lr, inner_momentum, solver)
        inner_steps = renamed_argument("Contrastive", "free_steps", free_steps, "inner_steps", inner_steps, 100)
        if isinstance(beta, bool) or not beta > 0:
            raise ValueError(f"beta must be > 0 (the strength of the nudge toward the query loss); got {beta!r}.")
        check_steps("inner_steps", inner_steps)
        nudged_steps = inner_steps if nudged_steps is None else nudged_steps
        check_steps("nudged_steps", nudged_steps)
        if nudge not in ("linear", "full"):
            raise ValueError(f'nudge must be "linear" or "full"; got {nudge!r}.')
        if query_subsample is not None:
            check_steps("query_subsample", query_subsample)
            if nudge == "linear":
                raise ValueError(
                    "query_subsample applies only to nudge='full': the linear nudge never evaluates the query set "
                    "inside its nudged phases. Drop query_subsample, or pass nudge='full'."
                )
        check_tolerance("tolerance", tolerance)
        if solver == "lbfgs" and query_subsample is not None:
            raise ValueError(
                "solver='lbfgs' and query_subsample do not go together: a line search compares objective values, "
                "and each nudged evaluation would see a different random subset of the queries. Drop one of them."
            )
        if tolerance is not None and query_subsample is not None:
            raise ValueError(
                "tolerance and query_subsample do not go together: a nudged step on a random subset of the queries "
                "never brings the full objective's gradient norm to a tolerance. Drop one of them."
            )
        if isinstance(divergence_ratio, bool) or not divergence_ratio > 0:
            raise ValueError(f"divergence_ratio must be > 0; got {divergence_ratio!r}.")
        if precision not in ("float32", "float64"):
            raise ValueError(f'precision must be "float32" or "float64"; got {precision!r}.')
        self.beta = float(beta)
        self.symmetric = symmetric
        self.inner_steps = inner_steps
        self.nudged_steps = nudged_steps
        self.nudge = nudge
        self.nudged_optimizer = inner_solver(solver, inner_lr if nudged_lr is None else nudged_lr, inner_momentum)
        self.solver = solver
        self.query_subsample = query_subsample
        self.divergence_ratio = float(divergence_ratio)
        self.precision = precision
        self.tolerance = None if tolerance is None else float(tolerance)
        self.cancel_free_residual = cancel_free_residual

    @property
    def adaptation_steps(self) -> int:
        return self.inner_steps

    @property
    def adaptation_tolerance(self) -> float | None:
        return self.tolerance

    @property
    def free_steps(self) -> int:
        """Deprecated alias of ``inner_steps`` (its former name), kept for one release."""
        warnings.warn(_FREE_STEPS_RENAMED, DeprecationWarning, stacklevel=2)
        return self.inner_steps

    @free_steps.setter
    def free_steps(self, steps: int) -> None:
        warnings.warn(_FREE_STEPS_RENAMED, DeprecationWarning, stacklevel=2)
        self.inner_steps = steps

    @property
    def minimum_dtype(self) -> torch.dtype:
        return torch.float64 if self.precision == "float64" else torch.float32

    def task_estimate(self, learner: Learner, meta: Params, task: Task) -> TaskEstimate:
        free = self.adapt(learner, meta, task.support)
        if self.nudge == "linear":
            return self._linear_nudge(learner, meta, task, free)
        return self._full_nudge(learner, meta, task, free)

    def nudged_objectives(
        self, learner: Learner, meta: Params, task: Task, origin: Params
    ) -> dict[str, Callable[[Params], Tensor]]:
        """What each nudged phase descends from ``origin = phi_0``, at fixed ``meta``, by the name its loss and fault
        are reported under: ``nudged_pos`` (``+beta``) and, when symmetric, ``nudged_neg`` (``-beta``).

        Linear nudge: ``L_in + beta <g, phi - phi_0>``, ``g`` computed here (one query pass); full nudge:
        ``L_in + beta L_query`` on every query (the objective that ``query_subsample`` estimates). For diagnostics
        (:class:`~lightning_contrastive.callbacks.InnerLoopMonitor`); :meth:`task_estimate` builds the same ones.
        """
        frozen = detached(meta)
        shift = self._free_residual(learner, frozen, task, origin)
        if self.nudge == "linear":
            query_grad, _ = _query_gradient(learner, frozen, origin, task.query)
            return {
                name: _shifted(
                    _linear_objective(learner, frozen, task.support, origin, query_grad, beta), shift, origin
                )
                for name, beta in self._betas().items()
            }
        every_query = itertools.repeat(task.query)
        return {
            name: _shifted(_full_objective(learner, frozen, task.support, every_query, beta), shift, origin)
            for name, beta in self._betas().items()
        }

    def nudged_tolerance(self, learner: Learner, meta: Params, task: Task, origin: Params) -> Tensor | None:
        """The gradient norm at which the nudged phases from ``origin = phi_0`` stop: the tighter of ``tolerance``
        and ``NUDGE_RESOLUTION * beta * |dL_query/dphi(phi_0)|`` (``None`` without a tolerance). One query pass; for
        diagnostics (:class:`~lightning_contrastive.callbacks.InnerLoopMonitor`), as :meth:`nudged_objectives`."""
        if self.tolerance is None:
            return None
        return self._resolved(_query_gradient(learner, detached(meta), origin, task.query)[0])

    def _resolved(self, query_grad: Params) -> Tensor | None:
        """:meth:`nudged_tolerance` for the query gradient ``g`` at ``phi_0`` (a tensor, per task under ``vmap``)."""
        if self.tolerance is None:
            return None
        return torch.clamp(self.NUDGE_RESOLUTION * self.beta * joint_norm(query_grad.values()), max=self.tolerance)

    def _free_residual(self, learner: Learner, meta: Params, task: Task, origin: Params) -> Params | None:
        """``r = dL_in/dphi(phi_0)`` (detached) at the detached ``meta``, when ``cancel_free_residual``."""
        if not self.cancel_free_residual:
            return None
        with torch.enable_grad():
            gradient = torch.func.grad(lambda phi: learner.inner_loss(phi, meta, task.support))(detached(origin))
        return detached(gradient)

    def _betas(self) -> dict[str, float]:
        return {"nudged_pos": self.beta, **({"nudged_neg": -self.beta} if self.symmetric else {})}

    def _linear_nudge(self, learner: Learner, meta: Params, task: Task, free: Phase) -> TaskEstimate:
        frozen = detached(meta)
        query_grad, direct = _query_gradient(learner, meta, free.params, task.query)
        shift = self._free_residual(learner, frozen, task, free.params)

        def objective(beta: float) -> Callable[[Params], Tensor]:
            return _shifted(
                _linear_objective(learner, frozen, task.support, free.params, query_grad, beta), shift, free.params
            )

        def difference_term(phase: Phase, beta: float) -> Tensor:
            return learner.inner_loss(phase.params, meta, task.support)

        return self._estimate(free, objective, difference_term, direct, tolerance=self._resolved(query_grad))

    def _full_nudge(self, learner: Learner, meta: Params, task: Task, free: Phase) -> TaskEstimate:
        frozen = detached(meta)
        shift = self._free_residual(learner, frozen, task, free.params)

        def objective(beta: float) -> Callable[[Params], Tensor]:
            queries = self._nudged_queries(task.query)
            return _shifted(_full_objective(learner, frozen, task.support, queries, beta), shift, free.params)

        def difference_term(phase: Phase, beta: float) -> Tensor:
            inner = learner.inner_loss(phase.params, meta, task.support)
            return inner + beta * learner.query_loss(phase.params, meta, task.query) if beta else inner

        tolerance = self.nudged_tolerance(learner, meta, task, free.params)
        return self._estimate(free, objective, difference_term, tolerance=tolerance)

    def _estimate(
        self,
        free: Phase,
        objective: Callable[[float], Callable[[Params], Tensor]],
        difference_term: Callable[[Phase, float], Tensor],
        direct: Tensor | None = None,
        *,
        tolerance: Tensor | None,
    ) -> TaskEstimate:
        """The surrogate and faults of either nudge.

        ``objective(beta)`` is what a nudged phase descends, warm-started from ``phi_0`` with zero velocity;
        ``difference_term(phase, beta)`` is the loss, live in
        ``theta``, at the phase's detached solution whose difference between phases, over ``beta`` (one-sided) or
        ``2 beta`` (symmetric), is the estimate; ``tolerance`` stops the nudged phases (:meth:`nudged_tolerance`);
        ``direct`` (linear nudge) is ``L_query(sg phi_0, theta)``, added once.
        """

        def nudged(beta: float) -> Phase:
            return minimise(objective(beta), free.params, self.nudged_steps, self.nudged_optimizer, tolerance=tolerance)

        plus = nudged(self.beta)
        # The divergence scale |L_in(phi_0)| + beta |L_query(phi_0)|, with the free phase's last objective for
        # L_in(phi_0); the full nudge's first step evaluated L_in + beta L_query at phi_0, so its query term is free.
        query_term = self.beta * direct.detach().abs() if direct is not None else (plus.start_loss - free.loss).abs()
        scale = free.loss.abs() + query_term
        phases = {"free": free, "nudged_pos": plus}
        if self.symmetric:
            phases["nudged_neg"] = minus = nudged(-self.beta)
            surrogate = (difference_term(plus, self.beta) - difference_term(minus, -self.beta)) / (2 * self.beta)
        else:
            surrogate = (difference_term(plus, self.beta) - difference_term(free, 0.0)) / self.beta
        if direct is not None:
            surrogate = surrogate + direct
        diverged = {name: self._diverged(phase, scale) for name, phase in phases.items() if name != "free"}
        return TaskEstimate.from_phases(surrogate, free.params, phases, diverged)

    def _diverged(self, phase: Phase, scale: Tensor) -> Tensor:
        """Whether a nudged phase moved its objective by more than ``divergence_ratio * scale``."""
        return (phase.loss - phase.start_loss).abs() > self.divergence_ratio * scale

    def _nudged_queries(self, query: Split) -> Iterator[Split]:
        """The query set of each full-nudge step: all of it, or a fresh random ``query_subsample`` of it.

        The subsets are drawn up front, one row of indices per step, so the loop never syncs with the host.
        """
        count = len(query.y)
        if self.query_subsample is None or self.query_subsample >= count:
            return itertools.repeat(query)
        rows = torch.rand(self.nudged_steps, count, device=query.y.device).argsort(dim=1)[:, : self.query_subsample]
        return (Split(query.x[indices], query.y[indices]) for indices in rows)


def _linear_objective(
    learner: Learner, meta: Params, support: Split, origin: Params, query_grad: Params, beta: float
) -> Callable[[Params], Tensor]:
    """``phi -> L_in(phi, meta) + beta <g, phi - phi_0>``: the linear nudge's phase objective (no query set in it)."""

    def objective(fast: Params) -> Tensor:
        # The nudge first: the order in which autograd accumulates the terms' gradients sets their last bits.
        pull = _displacement(query_grad, fast, origin)
        return learner.inner_loss(fast, meta, support) + beta * pull

    return objective


def _full_objective(
    learner: Learner, meta: Params, support: Split, queries: Iterator[Split], beta: float
) -> Callable[[Params], Tensor]:
    """``phi -> L_in(phi, meta) + beta L_query(phi, meta)``, each call on the next query set of ``queries``."""
    return lambda fast: learner.inner_loss(fast, meta, support) + beta * learner.query_loss(fast, meta, next(queries))


def _shifted(objective: Callable[[Params], Tensor], shift: Params | None, origin: Params) -> Callable[[Params], Tensor]:
    """``phi -> objective(phi) - <shift, phi - phi_0>`` (``objective`` itself when ``shift`` is ``None``)."""
    if shift is None:
        return objective
    return lambda fast: objective(fast) - _displacement(shift, fast, origin)


def _displacement(direction: Params, fast: Params, origin: Params) -> Tensor:
    """``<direction, phi - phi_0>`` over every fast parameter."""
    return sum((direction[name] * (p - origin[name])).sum() for name, p in fast.items())


def _query_gradient(learner: Learner, meta: Params, fast: Params, query: Split) -> tuple[Params, Tensor]:
    """``g = dL_query/dphi(fast, theta)`` (detached) and ``L_query(sg fast, theta)``, live in ``meta``.

    Outside ``torch.func`` transforms one forward pass serves both; under ``vmap`` the fast gradient comes from
    ``torch.func.grad``, which sees through batched tensors where ``torch.autograd.grad`` cannot.
    """
    with torch.enable_grad():
        if inside_function_transform():
            frozen = detached(meta)
            gradient = torch.func.grad(lambda phi: learner.query_loss(phi, frozen, query))(detached(fast))
            return detached(gradient), learner.query_loss(detached(fast), meta, query)
        leaves = {name: p.detach().requires_grad_() for name, p in fast.items()}
        loss = learner.query_loss(leaves, meta, query)
        grads = torch.autograd.grad(loss, list(leaves.values()), retain_graph=loss.grad_fn is not None)
        return dict(zip(leaves, grads, strict=True)), loss
