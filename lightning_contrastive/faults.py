"""Inner-loop faults: tasks whose inner phases produced NaN or inf, or whose nudged phases diverged.

Estimators flag each phase on the device (``TaskEstimate.faults``); :func:`find_faults` reads every flag of
a meta-batch in one host transfer, after all the inner loops have run, so no inner step ever waits for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lightning_contrastive.tasks import Task

if TYPE_CHECKING:  # estimators import this module for SOLVE
    from lightning_contrastive.estimators.base import TaskEstimate

ESTIMATE = "estimate"
"""The name under which a non-finite surrogate is reported when every phase the estimator flagged was sound."""
SOLVE = "solve"
"""The name under which ``Implicit`` reports a failed conjugate-gradient solve (not an inner phase of its own)."""


@dataclass(frozen=True)
class InnerFault:
    """One failed task of a meta-batch.

    Attributes:
        task: the task's index in the meta-batch.
        phase: the first phase that failed, by the estimator's name for it (``"free"``, ``"nudged_pos"``,
            ``"nudged_neg"``), or ``"estimate"`` for a non-finite surrogate after sound phases.
        final_objective: the phase's objective at its last step (``nan`` when the estimator does not report it).
        bad_data: which of the task's tensors hold NaN or inf (``"support x"``, ...), if any.
    """

    task: int
    phase: str
    final_objective: float
    bad_data: tuple[str, ...]

    def describe(self) -> str:
        """One line: the task, the phase, what went wrong and, where the data is at fault, which tensor."""
        if self.phase == ESTIMATE:
            what = "the estimate is NaN or inf although every inner phase stayed finite"
        elif self.phase == SOLVE:
            what = (
                "conjugate gradient met negative curvature or a growing residual, so phi* is not a minimum of "
                "L_in and the implicit gradient is meaningless (more inner steps, or Implicit(cg_damping > 0))"
            )
        elif math.isfinite(self.final_objective):
            what = f"phase {self.phase!r} diverged (its objective ended at {self.final_objective:.4g})"
        else:
            what = f"phase {self.phase!r} produced NaN or inf (final objective {self.final_objective})"
        if self.bad_data:
            what += f"; the task's {', '.join(self.bad_data)} hold NaN or inf values, so the data is at fault"
        return f"task {self.task}: {what}"


class InnerLoopError(RuntimeError):
    """Raised, before any meta-parameter is touched, when inner phases failed and the policy is to stop."""

    def __init__(self, faults: Sequence[InnerFault], num_tasks: int) -> None:
        self.faults = tuple(faults)
        lines = "\n  ".join(fault.describe() for fault in self.faults)
        super().__init__(
            f"Inner-loop fault in {len(self.faults)} of {num_tasks} tasks of this meta-batch; no meta-parameter was "
            f"updated.\n  {lines}\n"
            "Fixes: a smaller inner learning rate (or Contrastive(nudged_lr=...) for the nudged phases), a smaller "
            "beta, or more free steps so that the nudged phases start nearer a minimum. To drop such tasks and go "
            "on, counting them, pass on_inner_fault='skip' to MetaLearningModule (on_fault='skip' to estimate)."
        )


def find_faults(tasks: Sequence[Task], results: Sequence[TaskEstimate]) -> list[InnerFault]:
    """The failed tasks among ``results`` (the estimates of ``tasks``, in order), at most one fault per task.

    Reads the flags of the whole meta-batch in one device-to-host transfer; the values that describe a fault
    (objectives, which data tensors are bad) are read only for the tasks that failed.
    """
    phases = list(results[0].faults)
    flags = torch.stack(
        [torch.stack([*(r.faults[name] for name in phases), ~torch.isfinite(r.surrogate)]) for r in results]
    ).tolist()
    faults = []
    for index, (task_flags, task, result) in enumerate(zip(flags, tasks, results, strict=True)):
        if not any(task_flags):
            continue
        phase = [*phases, ESTIMATE][task_flags.index(True)]  # the earliest failure is the cause of the later ones
        objective = result.inner_losses.get(phase)
        support, query = task.support, task.query
        data = {"support x": support.x, "support y": support.y, "query x": query.x, "query y": query.y}
        faults.append(
            InnerFault(
                task=index,
                phase=phase,
                final_objective=math.nan if objective is None else float(objective),
                bad_data=tuple(
                    name for name, t in data.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
                ),
            )
        )
    return faults
