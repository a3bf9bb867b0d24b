"""Model-agnostic meta-learning: second-order (through the unrolled loop) and first-order."""

from __future__ import annotations

from lightning_contrastive.estimators.base import Estimator, TaskEstimate, detached
from lightning_contrastive.inner import check_steps, minimise
from lightning_contrastive.learners.base import Learner
from lightning_contrastive.tasks import Params, Task


class _InnerStepsEstimator(Estimator):
    """An estimator whose task adaptation is ``inner_steps`` steps on the inner loss."""

    batchable = True  # MAML, FirstOrderMAML and Reptile read no values on the host (tests/test_batched.py)

    def __init__(self, inner_steps: int = 100, inner_lr: float = 0.01, inner_momentum: float = 0.9) -> None:
        super().__init__(inner_lr, inner_momentum)
        check_steps("inner_steps", inner_steps)
        self.inner_steps = inner_steps

    @property
    def adaptation_steps(self) -> int:
        return self.inner_steps


class MAML(_InnerStepsEstimator):
    """Second-order MAML: backpropagation through the unrolled inner loop.

    ``phi_T(theta)`` is ``inner_steps`` differentiable steps on ``L_in`` from ``init_fast(theta)``, and
    ``g = d/dtheta L_query(phi_T(theta), theta)``, exact for the truncated inner loop, including every
    path through the start, the regulariser and the query loss. Memory grows linearly with
    ``inner_steps`` (every step's activations and gradients are kept for the backward pass).
    """

    def task_estimate(self, learner: Learner, meta: Params, task: Task) -> TaskEstimate:
        phase = minimise(
            lambda fast: learner.inner_loss(fast, meta, task.support),
            learner.init_fast(meta),
            self.inner_steps,
            self.inner_optimizer,
            differentiable=True,
        )
        return TaskEstimate.from_phases(
            learner.query_loss(phase.params, meta, task.query), detached(phase.params), {"free": phase}
        )


class FirstOrderMAML(_InnerStepsEstimator):
    """First-order MAML: the query gradient at the adapted parameters, passed straight through.

    ``g = (d phi_init / d theta)^T dL_query/dphi (phi_T) + dL_query/dtheta (phi_T, theta)``: the Jacobian
    of the inner loop is taken as the identity, so the query-loss gradient reaches the meta-parameters
    the fast weights start from, and meta-parameters used in the query loss get their direct gradient.
    Memory is one forward and backward pass, whatever ``inner_steps`` is.
    """

    def task_estimate(self, learner: Learner, meta: Params, task: Task) -> TaskEstimate:
        phase = self.adapt(learner, meta, task.support)
        start = learner.init_fast(meta)
        # phi_T in value, phi_init in gradient: the straight-through identity Jacobian.
        straight_through = {name: p + (phase.params[name] - p).detach() for name, p in start.items()}
        return TaskEstimate.from_phases(
            learner.query_loss(straight_through, meta, task.query), phase.params, {"free": phase}
        )
