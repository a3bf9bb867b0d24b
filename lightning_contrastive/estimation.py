"""Meta-gradients of a learner on an episodic batch, from any estimator.

The module behind the function :func:`lightning_contrastive.meta_gradient`, under a name of its own so that
importing it gives this module, not the function. Its old path, ``lightning_contrastive.meta_gradient`` as a module,
is deprecated.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_contrastive.estimators.base import PER_PHASE_FIELDS, Estimator, TaskEstimate
from lightning_contrastive.faults import InnerFault, InnerLoopError, find_faults
from lightning_contrastive.learners.base import Learner
from lightning_contrastive.tasks import Params, Split, Task, split_batch


@dataclass(frozen=True)
class MetaEstimate:
    """An estimator's verdict on a meta-batch.

    Attributes:
        surrogate: the mean of the kept tasks' surrogates; its gradient with respect to the learner's
            meta-parameters is the estimated meta-gradient, averaged over those tasks (zero if none was kept).
        tasks: each kept task's :class:`TaskEstimate`, in batch order.
        kept: the kept tasks' indices in the batch (all of them unless faulty tasks were skipped).
        skipped: the faulty tasks that were left out (only under ``on_fault="skip"``).
        inputs: the kept tasks as the estimator saw them (split from the batch, cast to the compute dtype and
            checked), in the order of ``tasks``, so that a caller scoring them need not split the batch again.
    """

    surrogate: Tensor
    tasks: list[TaskEstimate]
    kept: list[int]
    skipped: list[InnerFault]
    inputs: list[Task]


def compute_dtype(learner: Learner, estimator: Estimator | None = None) -> torch.dtype:
    """The learner's parameter dtype, widened to at least ``estimator.minimum_dtype`` (float32 without one).

    Contrastive differences cancel at small beta, so inner phases never run in half precision.
    """
    dtype = next(p for _, p in learner.named_meta_parameters()).dtype
    return torch.promote_types(dtype, torch.float32 if estimator is None else estimator.minimum_dtype)


IEEE_GUARDED_BACKENDS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")
"""The ``torch.backends`` whose ``fp32_precision`` :func:`ieee_float32` holds at ``"ieee"``."""


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Run float32 matrix products and convolutions in true IEEE float32 inside the block, whatever the settings.

    cuDNN convolutions default to TF32 (``torch.backends.cudnn.conv.fp32_precision == "tf32"``), and
    ``torch.set_float32_matmul_precision("high")``, which Lightning advises on tensor-core GPUs, turns cuBLAS and
    oneDNN matrix products to TF32 too. TF32 keeps 10 mantissa bits: the contrastive estimate divides differences
    of such results by beta, and long inner loops compound them. On one H200 (``python -m benchmarks.meta_step
    --device cuda``, Conv4, 16 tasks, T=20) looped and vmapped meta-gradients, which differ only in rounding,
    disagreed by 3-26% of the largest entry under TF32 convolutions and by 0.1-7% in IEEE float32. Every backend of
    :data:`IEEE_GUARDED_BACKENDS` is set to ``"ieee"`` and restored to the caller's setting on exit.
    """
    backends = []
    for path in IEEE_GUARDED_BACKENDS:
        backend = torch.backends
        for part in path.split("."):
            backend = getattr(backend, part)
        backends.append(backend)
    previous = [backend.fp32_precision for backend in backends]
    try:
        for backend in backends:
            backend.fp32_precision = "ieee"
        yield
    finally:
        for backend, setting in zip(backends, previous, strict=True):
            backend.fp32_precision = setting


def cast_task(task: Task, dtype: torch.dtype) -> Task:
    """``task`` with floating-point inputs and targets cast to ``dtype`` (class labels unchanged)."""

    def cast(t: Tensor) -> Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    return Task(Split(cast(task.support.x), cast(task.support.y)), Split(cast(task.query.x), cast(task.query.y)))


def choose_batched(learner: Learner, estimator: Estimator, num_tasks: int) -> bool:
    """What ``batched=None`` picks: vmap over tasks for a batchable estimator and several tasks, unless the
    learner has convolutions and runs on the CPU; a loop over tasks otherwise.

    The rule is measured. On one CPU thread (``python -m benchmarks.meta_step``), for the 1-40-40-1 sinusoid MLP a
    vmapped meta-batch of 25 tasks ran the contrastive estimate 7-8x faster than the loop, whose cost is
    per-operator overhead; for Conv4 (2 tasks) vmap took 1.4-2x longer, as it turns each layer's per-task
    convolutions into one grouped convolution, which CPU kernels run slower than the separate ones. On one
    H100 the grouped convolutions win: at the full-size configs (``configs/paper/``, 200 free and 100 nudged
    steps) a symmetric contrastive meta-step took 12 s vmapped against about 120 s looped for Omniglot 5-way
    (meta-batch 32), 13 s against 55 s for 20-way (16 tasks) and 9 s against 14 s for miniImageNet (4 tasks),
    where the loop's thousands of small kernels leave the GPU idle. With a single task there is nothing to batch.
    """
    has_convolutions = any(isinstance(module, nn.modules.conv._ConvNd) for module in learner.modules())
    on_cpu = next(p for _, p in learner.named_meta_parameters()).device.type == "cpu"
    return estimator.batchable and num_tasks > 1 and not (has_convolutions and on_cpu)


FaultPolicy = Literal["stop", "skip"]


def check_estimation(learner: Learner, estimator: Estimator, batched: bool | None = None) -> None:
    """Raise ``ValueError`` unless ``estimator`` can estimate ``learner``'s meta-gradient as ``batched`` asks.

    Refused: objects that are not a lightning_contrastive ``Learner`` and ``Estimator``, an estimator undefined for
    the learner (:meth:`Estimator.check_learner`, e.g. Reptile with learned strengths), and ``batched=True`` with an
    estimator that cannot be vmapped.
    """
    if not isinstance(learner, Learner):
        raise ValueError(f"learner must be a lightning_contrastive Learner; got {type(learner).__name__}.")
    if not isinstance(estimator, Estimator):
        raise ValueError(f"estimator must be a lightning_contrastive Estimator; got {type(estimator).__name__}.")
    estimator.check_learner(learner)
    if batched and not estimator.batchable:
        raise ValueError(
            f"{type(estimator).__name__} cannot run batched: its per-task work is not marked safe for "
            "torch.func.vmap (Estimator.batchable is False). Pass batched=False, or batched=None to let the library "
            "choose."
        )


def estimate(
    learner: Learner,
    estimator: Estimator,
    batch: Mapping[str, Any],
    *,
    batched: bool | None = None,
    on_fault: FaultPolicy = "stop",
) -> MetaEstimate:
    """Run ``estimator`` on every task of a torchmeta-format ``batch`` and average the surrogates.

    Inner phases and surrogates run in float32 or wider with autocast and TF32 convolutions switched off
    (:func:`ieee_float32`), whatever the caller's precision. ``batched`` picks how the tasks are run: ``False``
    loops over them, ``True`` maps the estimator over them with ``torch.func.vmap`` (the same estimate, computed
    together; memory grows with the number of tasks), ``None`` picks by :func:`choose_batched`. Random draws
    inside an estimator (``Contrastive(query_subsample=...)``) differ between the two paths.

    Faults: once every task's phases have run, their fault flags (NaN or inf in a phase or the surrogate, a
    diverged nudged phase; see ``TaskEstimate.faults``) are read in one host transfer per meta-batch.
    ``on_fault="stop"`` raises :class:`~lightning_contrastive.faults.InnerLoopError` naming each failed task and
    phase; ``"skip"`` leaves those tasks out of the mean and lists them in ``MetaEstimate.skipped``.

    Raises ``ValueError`` for a malformed batch, targets that do not suit the learner's loss, or what
    :func:`check_estimation` refuses.
    """
    if on_fault not in ("stop", "skip"):
        raise ValueError(f'on_fault must be "stop" or "skip"; got {on_fault!r}.')
    tasks = split_batch(batch)
    check_estimation(learner, estimator, batched)
    if batched is None:
        batched = choose_batched(learner, estimator, len(tasks))
    dtype = compute_dtype(learner, estimator)
    live = learner.meta_parameters()
    device_type = next(iter(live.values())).device.type
    with torch.enable_grad(), torch.autocast(device_type, enabled=False), ieee_float32():
        meta = {name: p.to(dtype) for name, p in live.items()}
        tasks = [cast_task(task, dtype) for task in tasks]
        for task in tasks:  # every task is checked before any inner loop starts
            learner.check_task(task, meta)

        def task_estimates(chosen: list[Task]) -> list[TaskEstimate]:
            if batched:
                return vmapped_task_estimates(learner, estimator, meta, chosen)
            return [estimator.task_estimate(learner, meta, task) for task in chosen]

        results = task_estimates(tasks)
        kept, skipped = list(range(len(tasks))), find_faults(tasks, results)
        if skipped and on_fault == "stop":
            raise InnerLoopError(skipped, len(tasks))
        if skipped:
            failed = {fault.task for fault in skipped}
            kept = [i for i in kept if i not in failed]
            # Vmapped tasks share one backward graph, where a dropped task's NaNs would still reach the shared
            # meta-gradient (0 * nan), so the kept tasks are recomputed; looped tasks have separate graphs.
            results = task_estimates([tasks[i] for i in kept]) if batched and kept else [results[i] for i in kept]
        if results:
            surrogate = torch.stack([r.surrogate for r in results]).mean()
        else:  # every task failed: a surrogate whose gradient is zero, so that each meta-parameter still gets one
            surrogate = torch.stack([(0 * p).sum() for p in meta.values()]).sum()
    return MetaEstimate(surrogate=surrogate, tasks=results, kept=kept, skipped=skipped, inputs=[tasks[i] for i in kept])


def vmapped_task_estimates(
    learner: Learner, estimator: Estimator, meta: Params, tasks: list[Task]
) -> list[TaskEstimate]:
    """``estimator.task_estimate`` of every task, computed at once by ``torch.func.vmap`` over the tasks.

    The meta-parameters are shared (not mapped), so autograd differentiates the surrogates with respect
    to them through the map; each task draws its own random numbers (``randomness="different"``).
    """
    stacked = (
        torch.stack(parts)
        for parts in zip(*((t.support.x, t.support.y, t.query.x, t.query.y) for t in tasks), strict=True)
    )

    def one_task(
        support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Params, dict[str, dict[str, Tensor]]]:
        result = estimator.task_estimate(learner, meta, Task(Split(support_x, support_y), Split(query_x, query_y)))
        by_phase = {field: getattr(result, field) for field in PER_PHASE_FIELDS}
        return result.surrogate, result.adapted, by_phase

    surrogates, adapted, by_phase = torch.func.vmap(one_task, randomness="different")(*stacked)
    return [
        TaskEstimate(
            surrogate=surrogates[i],
            adapted={name: p[i] for name, p in adapted.items()},
            **{field: {name: value[i] for name, value in values.items()} for field, values in by_phase.items()},
        )
        for i in range(len(tasks))
    ]


def meta_gradient(
    learner: Learner,
    estimator: Estimator,
    batch: Mapping[str, Any],
    *,
    batched: bool | None = None,
    on_fault: FaultPolicy = "stop",
) -> dict[str, Tensor]:
    """The estimated meta-gradient, averaged over the tasks of ``batch``, keyed like ``named_meta_parameters()``.

    Changes no state: no ``.grad`` is written and the learner's parameters are untouched.
    Meta-parameters an estimator leaves alone (e.g. strengths under first-order MAML) get zeros.
    ``batched`` and ``on_fault`` are :func:`estimate`'s.
    """
    named = dict(learner.named_meta_parameters())
    result = estimate(learner, estimator, batch, batched=batched, on_fault=on_fault)
    with torch.autocast(result.surrogate.device.type, enabled=False):  # backward in the estimate's precision
        grads = torch.autograd.grad(result.surrogate, list(named.values()), allow_unused=True)
    return {
        name: torch.zeros_like(p) if g is None else g.to(p.dtype)
        for (name, p), g in zip(named.items(), grads, strict=True)
    }
