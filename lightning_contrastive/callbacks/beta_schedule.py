"""Annealing the contrastive rule's nudging strength beta over meta-training."""

from __future__ import annotations

import math
from typing import Any, Literal

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_contrastive.callbacks._utils import SettingsCallback, meta_learning_module
from lightning_contrastive.estimators import Contrastive

ScheduleKind = Literal["linear", "geometric"]


class BetaSchedule(SettingsCallback):
    """Anneal ``beta`` of a :class:`~lightning_contrastive.Contrastive` estimator from ``start`` to ``end``.

    At meta-step ``t`` (``trainer.global_step``) with ``s = min(t / steps, 1)``:

    - ``"linear"``: ``beta_t = start + s (end - start)``;
    - ``"geometric"``: ``beta_t = start (end / start)^s``, i.e. a constant factor per step, the natural choice
      for a quantity whose effect (an O(beta) or O(beta^2) bias against an O(delta / beta) convergence error)
      is felt on a log scale;

    and ``beta_t = end`` once ``t >= steps``. The value is set on the module's estimator before every training
    step and logged as ``train/beta``. A large early beta gives robust estimates while the phases are poorly
    converged; a small late beta removes the bias.

    The schedule is a function of the step alone, and its state (the last step and beta applied) is saved in
    checkpoints through :meth:`state_dict`: a resumed run sets the same beta before its first step, and continues
    with exactly the values of an uninterrupted run.

    Args:
        start: beta at step 0, > 0.
        end: beta from step ``steps`` on, > 0.
        steps: meta-steps over which beta moves from ``start`` to ``end``, >= 1.
        kind: ``"linear"`` or ``"geometric"`` interpolation.
    """

    def __init__(self, start: float, end: float, steps: int, kind: ScheduleKind = "geometric") -> None:
        for name, value in (("start", start), ("end", end)):
            if isinstance(value, bool) or not value > 0:
                raise ValueError(f"BetaSchedule {name} must be > 0 (a nudging strength); got {value!r}.")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"BetaSchedule steps must be an integer >= 1; got {steps!r}.")
        if kind not in ("linear", "geometric"):
            raise ValueError(f'BetaSchedule kind must be "linear" or "geometric"; got {kind!r}.')
        self.start = float(start)
        self.end = float(end)
        self.steps = steps
        self.kind = kind
        self.applied: tuple[int, float] | None = None

    def beta(self, step: int) -> float:
        """``beta_t`` at meta-step ``step``."""
        progress = min(step / self.steps, 1.0)
        if self.kind == "linear":
            return self.start + progress * (self.end - self.start)
        return self.start * math.exp(progress * math.log(self.end / self.start))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        estimator = meta_learning_module(self, pl_module).estimator
        if not isinstance(estimator, Contrastive):
            raise MisconfigurationException(
                f"BetaSchedule anneals the beta of the Contrastive estimator, but the module uses "
                f"{type(estimator).__name__}, which has none. Remove the callback or use Contrastive."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.applied is not None:  # restored from a checkpoint: the estimator is back where it was saved
            self._set(pl_module, self.applied[1])

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        beta = self.beta(step)
        self._set(pl_module, beta)
        self.applied = (step, beta)
        pl_module.log("train/beta", beta)

    def state_dict(self) -> dict[str, Any]:
        """The last meta-step and beta applied (``None`` before training), for checkpoints."""
        return {"applied": self.applied}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = state_dict["applied"]

    def _set(self, pl_module: pl.LightningModule, beta: float) -> None:
        meta_learning_module(self, pl_module).estimator.beta = beta
