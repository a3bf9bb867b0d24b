"""How closely the training estimator's meta-gradient agrees with a reference estimator's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_contrastive.callbacks._utils import flat_groups, meta_learning_module, metric_name, ratio
from lightning_contrastive.callbacks.held_batch import HeldBatchDiagnostic
from lightning_contrastive.estimation import meta_gradient
from lightning_contrastive.estimators import Estimator, Implicit
from lightning_contrastive.faults import InnerLoopError
from lightning_contrastive.module import MetaLearningModule


class EstimatorAgreement(HeldBatchDiagnostic):
    """Every ``every_n_steps`` meta-steps, compare the training estimator's meta-gradient ``g`` with a reference ``r``.

    Both are computed on the held batch (the first training batch seen, kept) at the current meta-parameters,
    and compared per meta-parameter group (``omega``, ``lambda``, ``primary``, ``init``, ... : the first component
    of the parameter's name) and over all meta-parameters:

    - ``meta_grad/agreement/<group>/cosine``: ``<g, r> / (|g| |r|)``, 1 when the directions agree;
    - ``meta_grad/agreement/<group>/relative_error``: ``|g - r| / |r|``, 0 when the estimates are equal;

    and ``meta_grad/agreement/cosine`` and ``.../relative_error`` for all groups at once. Either is NaN where
    it is undefined (a zero gradient). Use it to choose ``beta`` and the phase lengths of the contrastive rule
    against implicit differentiation, or to see how far first-order MAML strays.

    Cost per diagnosis: one meta-gradient of each estimator on the held batch; nothing else is slowed down.
    A diagnosis in which either estimator's inner loops fault (e.g. the reference's conjugate gradient meets
    negative curvature, early in training) logs nothing and warns, naming the fault: an observer does not stop
    the training it observes.

    Args:
        reference: the estimator to compare with; ``None`` uses :class:`~lightning_contrastive.Implicit` with its
            defaults (100 inner steps, 20 conjugate-gradient steps). Give it enough inner steps to converge,
            or the reference itself is off.
        every_n_steps: meta-steps between two comparisons.
    """

    def __init__(self, reference: Estimator | None = None, every_n_steps: int = 100) -> None:
        super().__init__(every_n_steps)
        if reference is not None and not isinstance(reference, Estimator):
            raise ValueError(
                f"reference must be a lightning_contrastive Estimator (e.g. Implicit(inner_steps=200)); "
                f"got {type(reference).__name__}."
            )
        self.reference = Implicit() if reference is None else reference

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # e.g. Reptile with learned strengths: fail before training, not at the first diagnosis
        self.reference.check_learner(meta_learning_module(self, pl_module).learner)

    def diagnose(
        self, trainer: pl.Trainer, pl_module: MetaLearningModule, batch: Mapping[str, Any]
    ) -> dict[str, float]:
        try:
            trained = flat_groups(meta_gradient(pl_module.learner, pl_module.estimator, batch).items())
            reference = flat_groups(meta_gradient(pl_module.learner, self.reference, batch).items())
        except InnerLoopError as fault:
            rank_zero_warn(f"EstimatorAgreement logs nothing at step {trainer.global_step}: {fault}")
            return {}
        metrics = {}
        for group, estimate in trained.items():
            cosine, relative_error = agreement(estimate, reference[group])
            metrics[metric_name("meta_grad/agreement", group, "cosine")] = cosine
            metrics[metric_name("meta_grad/agreement", group, "relative_error")] = relative_error
        return metrics


def agreement(estimate: Tensor, reference: Tensor) -> tuple[float, float]:
    """Cosine similarity ``<g, r> / (|g| |r|)`` and relative error ``|g - r| / |r|`` of two flat vectors."""
    cosine = ratio(torch.dot(estimate, reference), estimate.norm() * reference.norm())
    return cosine, ratio((estimate - reference).norm(), reference.norm())
