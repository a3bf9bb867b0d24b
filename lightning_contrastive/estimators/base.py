"""The estimator interface: how a meta-gradient is read off a task's inner learning."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from lightning_contrastive.inner import InnerLBFGS, InnerSGD, Phase, minimise
from lightning_contrastive.learners.base import Learner
from lightning_contrastive.tasks import Params, Split, Task


@dataclass(frozen=True)
class TaskEstimate:
    """What an estimator makes of one task.

    Attributes:
        surrogate: a scalar whose gradient with respect to the learner's meta-parameters is this
            task's meta-gradient estimate (its value has no meaning of its own).
        adapted: the task's fast parameters after learning its support set (detached).
        inner_losses: the objective at the end of each inner phase, by phase name (detached).
        faults: by phase name, a boolean scalar tensor that is True when the phase failed: it produced NaN or
            inf, or (nudged phases) diverged. Kept on the device; :func:`~lightning_contrastive.estimation.estimate`
            reads all of a meta-batch's flags at once. An estimator that reports none is still checked through
            its surrogate.
        steps: by phase name, the inner updates the phase applied (an integer scalar tensor): its cap, or fewer
            where it stopped on a tolerance.
        residuals: by phase name, the gradient norm of the phase's objective where it ended (detached).
        solved: by phase name, a boolean scalar tensor, True when the phase stopped on its tolerance (always False
            for a phase that runs a fixed number of steps).
    """

    surrogate: Tensor
    adapted: Params
    inner_losses: dict[str, Tensor]
    faults: dict[str, Tensor] = field(default_factory=dict)
    steps: dict[str, Tensor] = field(default_factory=dict)
    residuals: dict[str, Tensor] = field(default_factory=dict)
    solved: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def from_phases(
        cls,
        surrogate: Tensor,
        adapted: Params,
        phases: Mapping[str, Phase],
        diverged: Mapping[str, Tensor] | None = None,
    ) -> TaskEstimate:
        """The estimate of a task learned in ``phases`` (by name, in the order they ran).

        Each phase's final objective becomes its ``inner_losses`` entry, its steps, residual and solved flag its
        entries of ``steps``, ``residuals`` and ``solved``, and its fault flag is "not finite", or "not finite or
        diverged" for the phases named in ``diverged`` (boolean scalar tensors).
        """
        diverged = diverged or {}
        faults = {name: ~phase.finite for name, phase in phases.items()}
        faults.update({name: faults[name] | flag for name, flag in diverged.items()})
        return cls(
            surrogate,
            adapted,
            inner_losses={name: phase.loss for name, phase in phases.items()},
            faults=faults,
            steps={name: phase.steps for name, phase in phases.items()},
            residuals={name: phase.residual for name, phase in phases.items()},
            solved={name: phase.solved for name, phase in phases.items()},
        )


PER_PHASE_FIELDS = ("inner_losses", "faults", "steps", "residuals", "solved")
"""The :class:`TaskEstimate` fields that hold one tensor per phase name."""


Solver = Literal["sgd", "lbfgs"]
"""The inner solvers an estimator that solves its phases can use: momentum SGD or lockstep L-BFGS."""


def inner_solver(solver: Solver, lr: float, momentum: float) -> InnerSGD | InnerLBFGS:
    """The inner optimizer named ``solver``: ``InnerSGD(lr, momentum)``, or ``InnerLBFGS(lr)`` (whose first step is
    ``-lr g``; it has no momentum, so ``momentum`` is ignored)."""
    sgd = InnerSGD(lr, momentum)  # checks both settings, so that a bad momentum fails whichever solver runs
    if solver == "sgd":
        return sgd
    if solver == "lbfgs":
        return InnerLBFGS(lr)
    raise ValueError(
        f'solver must be "sgd" (momentum SGD) or "lbfgs" (lockstep L-BFGS, for phases that are solves); got {solver!r}.'
    )


def detached(params: Params) -> Params:
    """``sg(params)``: the same values, cut from the graph."""
    return {name: p.detach() for name, p in params.items()}


class Estimator(ABC):
    """Produces a meta-gradient estimate for one task as a differentiable surrogate.

    Every estimator learns the task with the same inner optimizer, :class:`~lightning_contrastive.inner.InnerSGD`
    (``inner_lr``, ``inner_momentum``, with identical defaults everywhere), starting from
    ``learner.init_fast(theta)`` and minimising ``learner.inner_loss`` on the support set; those whose estimate
    assumes a solved inner problem (contrastive, implicit) may solve it with
    :class:`~lightning_contrastive.inner.InnerLBFGS` instead (``solver="lbfgs"``, which they expose; the others
    differentiate or follow the trajectory of the SGD loop itself, so they do not).
    """

    batchable: ClassVar[bool] = False
    """Whether :meth:`task_estimate` may run under ``torch.func.vmap`` over the tasks of a meta-batch.

    True only for estimators whose per-task work is a pure function of tensors: no host reads of tensor
    values (``.item()``, ``float(t)``), no Python branching on them, no in-place writes to tensors it did
    not create. Off by default, so that a new estimator is never vmapped before someone checks this.
    """

    def __init__(self, inner_lr: float = 0.01, inner_momentum: float = 0.9, solver: Solver = "sgd") -> None:
        self.inner_optimizer = inner_solver(solver, inner_lr, inner_momentum)

    @property
    @abstractmethod
    def adaptation_steps(self) -> int:
        """How many inner steps :meth:`adapt` takes."""

    @property
    def minimum_dtype(self) -> torch.dtype:
        """The narrowest dtype the inner phases and the surrogate may run in (the learner's, if wider, wins)."""
        return torch.float32

    @property
    def adaptation_tolerance(self) -> float | None:
        """The gradient norm at which :meth:`adapt` stops before ``adaptation_steps`` (``None``: it never does).

        Only estimators whose estimate assumes a solved inner problem (contrastive, implicit) stop on a tolerance;
        for MAML, first-order MAML and Reptile the ``adaptation_steps``-step loop is itself the objective.
        """
        return None

    def check_learner(self, learner: Learner) -> None:
        """Raise ``ValueError`` if this estimator is undefined for ``learner``; all are by default."""

    def adapt(self, learner: Learner, meta: Params, support: Split) -> Phase:
        """Learn a task's support set from the learner's start: ``phi* ~ argmin_phi L_in(phi, theta)``.

        ``adaptation_steps`` steps, or fewer where the phase reaches ``adaptation_tolerance``; the same rule in
        training (the free phase) and at evaluation, so the learner used at test time solves the problem the
        estimate assumed. First-order and detached from ``meta``: memory is one forward and backward pass.
        """
        frozen = detached(meta)
        return minimise(
            lambda fast: learner.inner_loss(fast, frozen, support),
            learner.init_fast(frozen),
            self.adaptation_steps,
            self.inner_optimizer,
            tolerance=self.adaptation_tolerance,
        )

    @abstractmethod
    def task_estimate(self, learner: Learner, meta: Params, task: Task) -> TaskEstimate:
        """This estimator's surrogate for one task; ``meta`` are the live meta-parameters."""

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({settings})"
