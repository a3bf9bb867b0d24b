"""Where do the linear and full nudges part: at the query gradient's movement along an unconverged free path, or at
the kinks of ReLU and max-pooling? A diagnostic estimator for ``python -m benchmarks.meta_step --sections
agreement``: the linear nudge with its query gradient read along the path the free dynamics would take, instead of
once at the free solution.

Cost: the linear nudge's, plus ``K`` support steps for the path and ``K`` query passes for its gradients, against
the symmetric full nudge's ``2K`` query passes.

The linear nudge descends ``L_in(phi) + beta <g(phi_0), phi - phi_0>`` from ``phi_0``; the full nudge descends
``L_in(phi) + beta L_query(phi)``. At small beta both nudged runs stay within O(beta) of the free dynamics continued
from ``phi_0``, ``psi_0 = phi_0, psi_1, ..., psi_{K-1}`` (``K = nudged_steps``, the same SGD restarted with zero
velocity), so the full nudge's force at step ``t`` is ``beta g(psi_t) + O(beta^2)``. Where the free phase has
converged, ``psi_t = phi_0`` and the two nudges share a limit; where it has not, they differ by how far ``g`` moves
along the path. :class:`PathForcedNudge` descends ``L_in(phi) + beta <g(psi_t), phi - phi_0>`` at step ``t``:

- on a network whose loss gradient is continuous it is the full nudge's small-beta limit: the symmetric difference
  cancels the O(beta^2) force error, since both nudged runs see it with the same sign;
- with ReLU or max-pooling, what still separates it from the full nudge is the units that switch between the
  ``+beta`` and ``-beta`` runs, where ``g`` jumps.

So the agreement section splits the linear nudge's disagreement with the full nudge into the moving query gradient
(linear against path-forced) and the kinks (path-forced against full). A diagnostic, not a training estimator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_contrastive import Contrastive
from lightning_contrastive.estimators.base import TaskEstimate, detached
from lightning_contrastive.estimators.contrastive import _linear_objective
from lightning_contrastive.inner import Phase, minimise
from lightning_contrastive.learners.base import Learner
from lightning_contrastive.tasks import Params, Task


class PathForcedNudge(Contrastive):
    """``Contrastive(nudge="linear")`` with the force ``beta g(psi_t)`` along the free path; see the module's text."""

    batchable = False  # it records the path in a Python list; the agreement section runs one task

    def __init__(self, **settings: Any) -> None:
        if settings.get("cancel_free_residual"):
            raise ValueError(
                "PathForcedNudge builds its own nudged objectives along the free path, without the free residual's "
                "cancellation: drop cancel_free_residual."
            )
        super().__init__(nudge="linear", **settings)

    def free_path(self, learner: Learner, meta: Params, task: Task, origin: Params) -> list[Params]:
        """``psi_0 = origin, ..., psi_{K-1}``: where the free dynamics, restarted from ``origin`` with zero velocity,
        take their ``K = nudged_steps`` steps. It is the nudged phases' own loop at beta 0, recorded at each step's
        start (a first-order phase evaluates its objective once per step, on parameters it then updates in place)."""
        path: list[Params] = []

        def recorded(fast: Params) -> Tensor:
            path.append({name: p.detach().clone() for name, p in fast.items()})
            return learner.inner_loss(fast, meta, task.support)

        minimise(recorded, origin, self.nudged_steps, self.nudged_optimizer)
        return path

    def task_estimate(self, learner: Learner, meta: Params, task: Task) -> TaskEstimate:
        frozen = detached(meta)
        free = self.adapt(learner, meta, task.support)
        query_gradient = torch.func.grad(lambda fast: learner.query_loss(fast, frozen, task.query))
        forces = [query_gradient(point) for point in self.free_path(learner, frozen, task, free.params)]

        def objective(beta: float) -> Callable[[Params], Tensor]:
            step_objectives = iter(
                _linear_objective(learner, frozen, task.support, free.params, force, beta) for force in forces
            )
            return lambda fast: next(step_objectives)(fast)  # a first-order phase evaluates it once per step

        def difference_term(phase: Phase, beta: float) -> Tensor:
            return learner.inner_loss(phase.params, meta, task.support)

        direct = learner.query_loss(free.params, meta, task.query)  # L_query(sg phi_0, theta), as the linear nudge
        # Its nudged steps follow the free path's forces step by step: a fixed count, never a tolerance.
        return self._estimate(free, objective, difference_term, direct, tolerance=None)
