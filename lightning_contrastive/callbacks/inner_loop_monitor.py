"""The inner loop seen from inside: the loss along every phase, and how far each phase is from converged."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from torch import Tensor

from lightning_contrastive.callbacks.held_batch import HeldBatchDiagnostic
from lightning_contrastive.estimation import cast_task, compute_dtype
from lightning_contrastive.estimators import Contrastive, Estimator
from lightning_contrastive.inner import InnerLBFGS, InnerSGD, joint_norm, minimise
from lightning_contrastive.learners.base import Learner
from lightning_contrastive.module import MetaLearningModule
from lightning_contrastive.tasks import Params, split_batch


@dataclass(frozen=True)
class PhaseTrace:
    """One inner phase, averaged over the tasks of a batch.

    Attributes:
        losses: ``(steps,)``: the phase's objective at each step's parameters, before that step's update (the last
            entry is the ``inner/<phase>`` value that the module logs in training).
        residual_grad_norm: ``|d objective / d phi|`` at the phase's final parameters: zero at an exact minimum.
        steps: the updates the phase applied: its step count, or fewer where it stopped on the estimator's tolerance
            (after which its ``losses`` stay at the solved value).
    """

    losses: Tensor
    residual_grad_norm: Tensor
    steps: Tensor


def trace_inner_phases(learner: Learner, estimator: Estimator, batch: Mapping[str, Any]) -> dict[str, PhaseTrace]:
    """Re-run ``estimator``'s inner phases on every task of ``batch``, recording the objective at every step.

    The phases are the estimator's own: for :class:`~lightning_contrastive.Contrastive` the free phase
    (``inner_steps`` on ``L_in``) and the nudged phase(s) (``nudged_steps`` on ``Contrastive.nudged_objectives``:
    ``L_in +- beta <g, phi - phi_0>`` for the linear nudge, ``L_in +- beta L_query`` for the full one, each minus
    ``<r, phi - phi_0>`` with ``Contrastive(cancel_free_residual=True)``, warm-started from the free solution),
    named ``free``, ``nudged_pos``, ``nudged_neg``; for any other estimator the adaptation phase
    (``adaptation_steps`` on ``L_in``), named ``free``. Each runs with the
    estimator's inner optimizer through the engine's :func:`~lightning_contrastive.inner.minimise` at the
    detached meta-parameters, in the estimator's compute dtype, so its values are those of training (except with
    ``Contrastive(query_subsample=...)``, whose nudged steps see random subsets of the queries: here they see all
    of them, the objective the subsets estimate).
    Cost: one more first-order run of the phases, plus one gradient per phase for the residual; no state changes.
    """
    dtype = compute_dtype(learner, estimator)
    device_type = next(learner.parameters()).device.type
    per_task: dict[str, list[PhaseTrace]] = {}
    with torch.enable_grad(), torch.autocast(device_type, enabled=False):
        meta = {name: p.detach().to(dtype) for name, p in learner.named_meta_parameters()}
        for task in (cast_task(task, dtype) for task in split_batch(batch)):
            free, trace = _traced(
                lambda fast, task=task: learner.inner_loss(fast, meta, task.support),
                learner.init_fast(meta),
                estimator.adaptation_steps,
                estimator.inner_optimizer,
                estimator.adaptation_tolerance,
            )
            per_task.setdefault("free", []).append(trace)
            if isinstance(estimator, Contrastive):
                tolerance = estimator.nudged_tolerance(learner, meta, task, free)
                for phase, objective in estimator.nudged_objectives(learner, meta, task, free).items():
                    _, trace = _traced(objective, free, estimator.nudged_steps, estimator.nudged_optimizer, tolerance)
                    per_task.setdefault(phase, []).append(trace)
    return {
        phase: PhaseTrace(
            losses=torch.stack([trace.losses for trace in traces]).mean(0),
            residual_grad_norm=torch.stack([trace.residual_grad_norm for trace in traces]).mean(),
            steps=torch.stack([trace.steps for trace in traces]).float().mean(),
        )
        for phase, traces in per_task.items()
    }


def _traced(
    objective: Callable[[Params], Tensor],
    start: Params,
    steps: int,
    optimizer: InnerSGD | InnerLBFGS,
    tolerance: float | Tensor | None,
) -> tuple[Params, PhaseTrace]:
    """One phase of one task by :func:`minimise`: its final parameters, and its trace (``steps`` losses long)."""
    losses: list[Tensor] = []

    def recorded(params: Params) -> Tensor:
        loss = objective(params)
        losses.append(loss.detach())
        return loss

    phase = minimise(recorded, start, steps, optimizer, tolerance=tolerance)
    losses += losses[-1:] * (steps - len(losses))  # a phase that stopped when solved stays there
    at_final = {name: p.detach().requires_grad_() for name, p in phase.params.items()}
    residual = torch.autograd.grad(objective(at_final), list(at_final.values()))
    norm = joint_norm(residual)
    return phase.params, PhaseTrace(losses=torch.stack(losses), residual_grad_norm=norm, steps=phase.steps)  # type: ignore[arg-type]


class InnerLoopMonitor(HeldBatchDiagnostic):
    """Every ``every_n_steps`` meta-steps, trace the inner phases on the held batch: their loss curves and residuals.

    The contrastive estimate is only as good as its phases are converged: with the free phase stopped at a
    gradient norm ``delta`` the one-sided rule's error grows like ``delta / beta``, on top of its O(beta) bias
    (the symmetric rule's two nudged phases share that error, which cancels to first order, leaving an error
    that does not grow as beta shrinks; see ``examples/beta_sweep.py``). This callback re-runs the phases (see
    :func:`trace_inner_phases`) on the first training batch it saw, kept, and logs, averaged over its tasks:

    - ``inner/<phase>_residual_grad_norm``: ``|d objective / d phi|`` at the end of each phase (``free``,
      ``nudged_pos``, ``nudged_neg``), zero when it converged;
    - ``inner/<phase>_steps_used``: the updates each phase applied, fewer than its step count where the estimator's
      ``tolerance`` stopped it (the module logs both for every training batch too: ``inner/<phase>_steps``,
      ``inner/<phase>_residual``);
    - ``inner/free_residual_over_beta`` (contrastive estimators): the free residual divided by ``beta``, the
      size of the error it causes up to a constant (with ``cancel_free_residual`` the error it causes is instead
      that of the implicit gradient at ``phi_0`` rather than at the solution);
    - with a W&B logger, ``inner/loss_curve``: a line plot of each phase's objective against the inner step
      (nudged phases continue from the free phase's last step).

    The latest traces stay in :attr:`traces`. Cost per diagnosis: one more first-order run of the phases on the
    held batch; the engine's own inner loop is untouched.

    Args:
        every_n_steps: meta-steps between two traces.
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        super().__init__(every_n_steps)
        self.traces: dict[str, PhaseTrace] = {}

    def diagnose(
        self, trainer: pl.Trainer, pl_module: MetaLearningModule, batch: Mapping[str, Any]
    ) -> dict[str, float]:
        estimator = pl_module.estimator
        self.traces = trace_inner_phases(pl_module.learner, estimator, batch)
        metrics = {f"inner/{phase}_residual_grad_norm": float(t.residual_grad_norm) for phase, t in self.traces.items()}
        metrics |= {f"inner/{phase}_steps_used": float(t.steps) for phase, t in self.traces.items()}
        if isinstance(estimator, Contrastive):
            metrics["inner/free_residual_over_beta"] = metrics["inner/free_residual_grad_norm"] / estimator.beta
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                log_loss_curves(logger, self.traces, trainer.global_step)
        return metrics


def log_loss_curves(logger: WandbLogger, traces: Mapping[str, PhaseTrace], step: int) -> None:
    """Log ``traces`` to W&B as one line plot, ``inner/loss_curve``: objective against inner step, one line per phase.

    Nudged phases start where the free phase stopped, so they are drawn from its last step on.
    """
    import wandb  # only with a W&B logger, which has imported it already

    inner_steps = len(traces["free"].losses)
    xs, ys = [], []
    for phase, trace in traces.items():
        first = 0 if phase == "free" else inner_steps
        xs.append(list(range(first, first + len(trace.losses))))
        ys.append(trace.losses.tolist())
    plot = wandb.plot.line_series(
        xs=xs, ys=ys, keys=list(traces), title=f"Inner loss on the held batch at meta-step {step}", xname="inner step"
    )
    logger.experiment.log({"inner/loss_curve": plot, "trainer/global_step": step})
