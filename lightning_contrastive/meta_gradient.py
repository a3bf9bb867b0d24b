"""Meta-gradients of a learner on an episodic batch, from any estimator."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_contrastive.estimators.base import Estimator, TaskEstimate
from lightning_contrastive.learners.base import Learner
from lightning_contrastive.tasks import Split, Task, split_batch


@dataclass(frozen=True)
class MetaEstimate:
    """An estimator's verdict on a meta-batch.

    Attributes:
        surrogate: the mean of the tasks' surrogates; its gradient with respect to the learner's
            meta-parameters is the estimated meta-gradient, averaged over tasks.
        tasks: each task's :class:`TaskEstimate`, in batch order.
    """

    surrogate: Tensor
    tasks: list[TaskEstimate]


def compute_dtype(learner: Learner) -> torch.dtype:
    """The learner's parameter dtype, widened to at least float32.

    Contrastive differences cancel at small beta, so inner phases never run in half precision.
    """
    dtype = next(p for _, p in learner.named_meta_parameters()).dtype
    return torch.promote_types(dtype, torch.float32)


def cast_task(task: Task, dtype: torch.dtype) -> Task:
    """``task`` with floating-point inputs and targets cast to ``dtype`` (class labels unchanged)."""

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    return Task(Split(cast(task.support.x), cast(task.support.y)), Split(cast(task.query.x), cast(task.query.y)))


def estimate(learner: Learner, estimator: Estimator, batch: Mapping[str, Any]) -> MetaEstimate:
    """Run ``estimator`` on every task of a torchmeta-format ``batch`` and average the surrogates.

    Inner phases and surrogates run in float32 or wider with autocast switched off, whatever the
    caller's precision. Raises ``ValueError`` for a malformed batch, targets that do not suit the
    learner's loss, or an estimator that is undefined for the learner.
    """
    tasks = split_batch(batch)
    estimator.check_learner(learner)
    dtype = compute_dtype(learner)
    live = learner.meta_parameters()
    device_type = next(iter(live.values())).device.type
    with torch.enable_grad(), torch.autocast(device_type, enabled=False):
        meta = {name: p.to(dtype) for name, p in live.items()}
        tasks = [cast_task(task, dtype) for task in tasks]
        for task in tasks:  # every task is checked before any inner loop starts
            learner.check_task(task, meta)
        results = [estimator.task_estimate(learner, meta, task) for task in tasks]
        surrogate = torch.stack([r.surrogate for r in results]).mean()
    return MetaEstimate(surrogate=surrogate, tasks=results)


def meta_gradient(learner: Learner, estimator: Estimator, batch: Mapping[str, Any]) -> dict[str, Tensor]:
    """The estimated meta-gradient, averaged over the tasks of ``batch``, keyed like ``named_meta_parameters()``.

    Changes no state: no ``.grad`` is written and the learner's parameters are untouched.
    Meta-parameters an estimator leaves alone (e.g. strengths under first-order MAML) get zeros.
    """
    named = dict(learner.named_meta_parameters())
    result = estimate(learner, estimator, batch)
    with torch.autocast(result.surrogate.device.type, enabled=False):  # backward in the estimate's precision
        grads = torch.autograd.grad(result.surrogate, list(named.values()), allow_unused=True)
    return {
        name: torch.zeros_like(p) if g is None else g.to(p.dtype)
        for (name, p), g in zip(named.items(), grads, strict=True)
    }
