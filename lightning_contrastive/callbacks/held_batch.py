"""The base of diagnostics that are re-computed every few meta-steps on one fixed training batch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_utilities import apply_to_collection
from torch import Tensor

from lightning_contrastive.callbacks._utils import (
    SettingsCallback,
    check_every_n_steps,
    log_to_loggers,
    meta_learning_module,
)
from lightning_contrastive.module import MetaLearningModule


class HeldBatchDiagnostic(SettingsCallback, ABC):
    """Every ``every_n_steps`` meta-steps, :meth:`diagnose` the module on a held batch and log the result.

    The held batch is the first training batch the callback sees, copied and kept for the whole run, so
    that successive values differ only because the meta-parameters changed, not because the tasks did.
    Diagnostics run at the start of a training batch, before that step's update, with the meta-parameters
    of meta-step ``trainer.global_step`` (0 included), and are logged at that step. They run on global rank
    zero only, outside the DDP wrapper, so they cost the other ranks nothing and trigger no collective, and
    they leave the random number generators as they found them: training is unchanged by the callback.

    Args:
        every_n_steps: meta-steps (optimizer steps) between two diagnoses.
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        check_every_n_steps(every_n_steps)
        self.every_n_steps = every_n_steps
        self.held_batch: Mapping[str, Any] | None = None
        self._last_diagnosed_step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        meta_learning_module(self, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        if self.held_batch is None:
            self.held_batch = apply_to_collection(batch, Tensor, lambda t: t.detach().clone())
        step = trainer.global_step
        # With gradient accumulation several batches share a meta-step: diagnose it once.
        if step % self.every_n_steps or step == self._last_diagnosed_step:
            return
        self._last_diagnosed_step = step
        device = pl_module.device
        # Estimators may draw random numbers (Contrastive's query_subsample): restore the generators afterwards,
        # so that training runs exactly as it would without the callback.
        with torch.random.fork_rng(
            devices=[] if device.type == "cpu" else [device.index or 0],
            device_type=None if device.type == "cpu" else device.type,
        ):
            metrics = self.diagnose(trainer, meta_learning_module(self, pl_module), self.held_batch)
        log_to_loggers(trainer, metrics, step)

    @abstractmethod
    def diagnose(
        self, trainer: pl.Trainer, pl_module: MetaLearningModule, batch: Mapping[str, Any]
    ) -> dict[str, float]:
        """The scalars to log for the current meta-parameters on ``batch``, by metric name."""
