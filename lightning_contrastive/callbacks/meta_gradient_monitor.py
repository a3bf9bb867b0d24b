"""Size of the meta-gradient and of the meta-update, per meta-parameter group."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_contrastive.callbacks._utils import (
    SettingsCallback,
    check_every_n_steps,
    flat_groups,
    log_to_loggers,
    meta_learning_module,
    metric_name,
    ratio,
)


class MetaGradientMonitor(SettingsCallback):
    """Every ``every_n_steps`` meta-steps, log the meta-gradient's norm and the update-to-parameter ratio per group.

    A group is the first component of a meta-parameter's name: ``omega`` and ``lambda`` for
    :class:`~lightning_contrastive.ComplexSynapse`, ``primary`` (the slow weights), ``init`` (the fast system's
    starting values) and ``modulator`` for :class:`~lightning_contrastive.DualSystem`. Logged, per group and,
    without the group part, over all meta-parameters:

    - ``meta_grad/norm/<group>``: ``|g|``, the L2 norm of the meta-gradient the outer optimizer is about to
      use, read in ``on_before_optimizer_step``: averaged over accumulated batches, unscaled by mixed
      precision, before gradient clipping. Parameters that got no gradient count as zero.
    - ``meta_grad/update_ratio/<group>``: ``|theta_after - theta_before| / |theta_before|`` across the optimizer
      step and ``learner.after_meta_step()`` (a healthy outer learning rate gives about 1e-3; NaN for an all-zero
      group). Costs one copy of the meta-parameters on the monitored steps.

    Args:
        every_n_steps: meta-steps between two logs.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        check_every_n_steps(every_n_steps)
        self.every_n_steps = every_n_steps
        self._pending: tuple[int, dict[str, float], dict[str, Tensor]] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        meta_learning_module(self, pl_module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        named = list(meta_learning_module(self, pl_module).learner.named_meta_parameters())
        gradients = flat_groups((name, torch.zeros_like(p) if p.grad is None else p.grad) for name, p in named)
        norms = {metric_name("meta_grad/norm", group): float(g.norm()) for group, g in gradients.items()}
        self._pending = (step, norms, flat_groups(named))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:  # no optimizer step on this batch, or not a monitored one
            return
        step, metrics, before = self._pending
        self._pending = None
        after = flat_groups(meta_learning_module(self, pl_module).learner.named_meta_parameters())
        for group, values in before.items():
            metrics[metric_name("meta_grad/update_ratio", group)] = ratio((after[group] - values).norm(), values.norm())
        log_to_loggers(trainer, metrics, step)
