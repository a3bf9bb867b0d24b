"""The contrastive meta-learning rule (Zucchet et al., NeurIPS 2022)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch import Tensor

from lightning_contrastive.estimators.base import Estimator, TaskEstimate, detached
from lightning_contrastive.inner import InnerSGD, Phase, check_steps, minimise
from lightning_contrastive.learners.base import Learner
from lightning_contrastive.tasks import Params, Split, Task


class Contrastive(Estimator):
    """Two-phase contrastive estimate of the meta-gradient: first-order, constant memory in the steps.

    With the augmented loss ``L_beta(phi, theta) = L_in(phi, theta) + beta L_query(phi, theta)``:

    1. free phase: ``inner_steps`` inner steps on ``L_0 = L_in`` from the learner's start give ``phi_0``;
    2. nudged phase(s): ``nudged_steps`` steps on ``L_beta`` warm-started from ``phi_0`` give ``phi_beta``
       (and ``phi_-beta`` for the symmetric rule);
    3. estimate, one-sided: ``g = [dL_beta/dtheta(phi_beta, theta) - dL_0/dtheta(phi_0, theta)] / beta``,
       symmetric: ``g = [dL_beta/dtheta(phi_beta, theta) - dL_-beta/dtheta(phi_-beta, theta)] / (2 beta)``.

    The surrogate is ``S = [L_beta(sg phi_beta, theta) - L_0(sg phi_0, theta)] / beta`` (symmetric:
    ``[L_beta(sg phi_beta, theta) - L_-beta(sg phi_-beta, theta)] / (2 beta)``), so ``dS/dtheta = g``
    and the ``beta dL_query/dtheta`` term carries any direct dependence of the query loss on ``theta``.
    Bias is O(beta) one-sided and O(beta^2) symmetric, plus O(delta / beta) when the phases are solved
    only to accuracy ``delta``: a smaller beta needs better-converged phases.

    Cost: ``inner_steps + nudged_steps`` (one-sided) or ``inner_steps + 2 nudged_steps`` (symmetric)
    first-order steps, each nudged step also evaluating the query set; memory is that of one forward
    and backward pass, whatever the number of steps. The query evaluations dominate when the query set
    is much larger than the support set (Omniglot 20-way 1-shot: 300 queries against 20 support images,
    so a nudged step costs about 20 free ones). Two knobs cut them: fewer ``nudged_steps`` (the nudged
    phases warm-start from ``phi_0`` and only move by O(beta)), and ``query_subsample``, which evaluates
    each nudged step's query loss on a fresh random subset of the queries: an unbiased estimate of its
    gradient, at ``query_subsample / len(query)`` of the cost. The surrogate still uses every query.

    Args:
        beta: nudging strength, > 0.
        symmetric: nudge at ``+beta`` and ``-beta`` (lower bias) instead of ``+beta`` only.
        inner_steps: inner steps of the free phase (also the steps of :meth:`adapt`).
        nudged_steps: inner steps of each nudged phase.
        inner_lr: learning rate of the free phase.
        inner_momentum: momentum of every phase.
        nudged_lr: learning rate of the nudged phases; ``None`` uses ``inner_lr``.
        query_subsample: evaluate each nudged step's query loss on this many queries drawn at random
            without replacement (from torch's global generator, so ``torch.manual_seed`` fixes them);
            ``None`` (default) uses every query, as does a number >= the task's query count.
        divergence_ratio: a nudged phase counts as diverged (a fault, see ``TaskEstimate.faults``) when its
            objective moves by more than this many times ``L_in + beta L_query`` at ``phi_0``. A nudge is meant to
            move the solution by O(beta), and with nonnegative losses a descent on ``L_beta`` from ``phi_0`` can
            lower it by at most that much; a larger move is a step size too large for the nudged objective, or
            an ``L_-beta`` unbounded below (e.g. MSE on an unbounded network).
    """

    batchable = True

    def __init__(
        self,
        beta: float = 0.1,
        symmetric: bool = True,
        inner_steps: int = 100,
        nudged_steps: int = 50,
        inner_lr: float = 0.01,
        inner_momentum: float = 0.9,
        nudged_lr: float | None = None,
        query_subsample: int | None = None,
        divergence_ratio: float = 10.0,
    ) -> None:
        super().__init__(inner_lr, inner_momentum)
        if isinstance(beta, bool) or not beta > 0:
            raise ValueError(f"beta must be > 0 (the strength of the nudge toward the query loss); got {beta!r}.")
        check_steps("inner_steps", inner_steps)
        check_steps("nudged_steps", nudged_steps)
        if query_subsample is not None:
            check_steps("query_subsample", query_subsample)
        if isinstance(divergence_ratio, bool) or not divergence_ratio > 0:
            raise ValueError(f"divergence_ratio must be > 0; got {divergence_ratio!r}.")
        self.beta = float(beta)
        self.symmetric = symmetric
        self.inner_steps = inner_steps
        self.nudged_steps = nudged_steps
        self.nudged_optimizer = InnerSGD(inner_lr if nudged_lr is None else nudged_lr, inner_momentum)
        self.query_subsample = query_subsample
        self.divergence_ratio = float(divergence_ratio)

    @property
    def adaptation_steps(self) -> int:
        return self.inner_steps

    def task_estimate(self, learner: Learner, meta: Params, task: Task) -> TaskEstimate:
        frozen = detached(meta)

        def augmented(fast: Params, theta: Params, beta: float, query: Split = task.query) -> Tensor:
            loss = learner.inner_loss(fast, theta, task.support)
            return loss + beta * learner.query_loss(fast, theta, query) if beta else loss

        def nudged(beta: float) -> Phase:
            queries = self._nudged_queries(task.query)
            return minimise(
                lambda fast: augmented(fast, frozen, beta, next(queries)),
                free.params,
                self.nudged_steps,
                self.nudged_optimizer,
            )

        free = self.adapt(learner, meta, task.support)
        plus = nudged(self.beta)
        nudge_scale = plus.start_loss.abs()  # L_in + beta L_query at phi_0, which bounds |L_-beta(phi_0)| too
        faults = {"free": ~free.finite, "nudged_pos": self._failed(plus, nudge_scale)}
        if self.symmetric:
            minus = nudged(-self.beta)
            surrogate = (augmented(plus.params, meta, self.beta) - augmented(minus.params, meta, -self.beta)) / (
                2 * self.beta
            )
            inner_losses = {"free": free.loss, "nudged_pos": plus.loss, "nudged_neg": minus.loss}
            faults["nudged_neg"] = self._failed(minus, nudge_scale)
        else:
            surrogate = (augmented(plus.params, meta, self.beta) - augmented(free.params, meta, 0.0)) / self.beta
            inner_losses = {"free": free.loss, "nudged_pos": plus.loss}
        return TaskEstimate(surrogate=surrogate, adapted=free.params, inner_losses=inner_losses, faults=faults)

    def _failed(self, phase: Phase, scale: Tensor) -> Tensor:
        """Whether a nudged phase went non-finite or moved its objective by more than ``divergence_ratio * scale``."""
        return ~phase.finite | ((phase.loss - phase.start_loss).abs() > self.divergence_ratio * scale)

    def _nudged_queries(self, query: Split) -> Iterator[Split]:
        """The query set of each nudged step: all of it, or a fresh random ``query_subsample`` of it.

        The subsets are drawn up front, one row of indices per step, so the loop never syncs with the host.
        """
        count = len(query.y)
        if self.query_subsample is None or self.query_subsample >= count:
            return itertools.repeat(query)
        rows = torch.rand(self.nudged_steps, count, device=query.y.device).argsort(dim=1)[:, : self.query_subsample]
        return (Split(query.x[indices], query.y[indices]) for indices in rows)
