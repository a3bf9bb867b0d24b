"""Callbacks that observe meta-training (meta-gradients, inner loops, estimator agreement, learning curves)
or steer it (beta).

Each works from YAML under ``trainer.callbacks`` (``class_path: lightning_contrastive.callbacks.<Name>``, or
the short name with the ``lightning-contrastive`` CLI) and needs a
:class:`~lightning_contrastive.MetaLearningModule`. Their metrics are namespaced ``meta_grad/...``,
``inner/...`` and ``train/...``.
"""

from lightning_contrastive.callbacks.beta_schedule import BetaSchedule
from lightning_contrastive.callbacks.estimator_agreement import EstimatorAgreement
from lightning_contrastive.callbacks.held_batch import HeldBatchDiagnostic
from lightning_contrastive.callbacks.inner_loop_monitor import InnerLoopMonitor, PhaseTrace, trace_inner_phases
from lightning_contrastive.callbacks.learning_curve import CurvePoint, LearningCurve
from lightning_contrastive.callbacks.meta_gradient_monitor import MetaGradientMonitor

__all__ = [
    "BetaSchedule",
    "CurvePoint",
    "EstimatorAgreement",
    "HeldBatchDiagnostic",
    "InnerLoopMonitor",
    "LearningCurve",
    "MetaGradientMonitor",
    "PhaseTrace",
    "trace_inner_phases",
]
