"""Reptile (Nichol et al., 2018)."""

from __future__ import annotations

from lightning_contrastive.estimators.base import TaskEstimate
from lightning_contrastive.estimators.maml import _InnerStepsEstimator
from lightning_contrastive.learners.base import Learner
from lightning_contrastive.tasks import Params, Task


class Reptile(_InnerStepsEstimator):
    """Reptile: move each initialisation toward the weights it adapted to.

    ``g = theta_init - phi_T``, where ``phi_T`` is ``inner_steps`` steps on the inner loss of the
    support set from ``theta_init``; plain descent on ``g`` with learning rate ``eps`` is Reptile's
    ``theta <- theta + eps (phi_T - theta)``. The query set is not used. Defined only when every
    meta-parameter is an initialisation of a fast weight (``Learner.initialisations``); strengths
    or slow weights have no Reptile update. Memory is one forward and backward pass.
    """

    def check_learner(self, learner: Learner) -> None:
        starts = set(learner.initialisations().values())
        others = [name for name, _ in learner.named_meta_parameters() if name not in starts]
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise ValueError(
                f"Reptile is defined only for meta-parameters that are initialisations of fast weights, but "
                f"{type(learner).__name__} also meta-learns {shown}, which no fast weight starts from. "
                "Use Contrastive, MAML, FirstOrderMAML or Implicit instead (for ComplexSynapse, "
                "learn_lambda=False also makes Reptile valid)."
            )

    def task_estimate(self, learner: Learner, meta: Params, task: Task) -> TaskEstimate:
        phase = self.adapt(learner, meta, task.support)
        surrogate = sum(
            (meta[start] * (meta[start] - phase.params[fast]).detach()).sum()
            for fast, start in learner.initialisations().items()
        )
        return TaskEstimate.from_phases(surrogate, phase.params, {"free": phase})  # type: ignore[arg-type]
