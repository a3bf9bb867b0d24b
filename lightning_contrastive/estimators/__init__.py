"""Estimators: how a meta-gradient is obtained from a task's inner learning. Any one works with any learner."""

from lightning_contrastive.estimators.base import Estimator, TaskEstimate
from lightning_contrastive.estimators.contrastive import Contrastive
from lightning_contrastive.estimators.implicit import Implicit
from lightning_contrastive.estimators.maml import MAML, FirstOrderMAML
from lightning_contrastive.estimators.reptile import Reptile

__all__ = ["MAML", "Contrastive", "Estimator", "FirstOrderMAML", "Implicit", "Reptile", "TaskEstimate"]
