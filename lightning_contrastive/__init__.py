"""Contrastive meta-learning (Zucchet et al., NeurIPS 2022) and its reference estimators, for PyTorch Lightning."""

from lightning_contrastive.estimators import MAML, Contrastive, Estimator, FirstOrderMAML, Implicit, Reptile
from lightning_contrastive.faults import InnerFault, InnerLoopError
from lightning_contrastive.inner import InnerSGD
from lightning_contrastive.learners import ComplexSynapse, DualSystem, Learner
from lightning_contrastive.meta_gradient import MetaEstimate, estimate, meta_gradient
from lightning_contrastive.module import MetaLearningModule
from lightning_contrastive.tasks import Split, Task, split_batch

__all__ = [
    "MAML",
    "ComplexSynapse",
    "Contrastive",
    "DualSystem",
    "Estimator",
    "FirstOrderMAML",
    "Implicit",
    "InnerFault",
    "InnerLoopError",
    "InnerSGD",
    "Learner",
    "MetaEstimate",
    "MetaLearningModule",
    "Reptile",
    "Split",
    "Task",
    "estimate",
    "meta_gradient",
    "split_batch",
]
__version__ = "0.1.0"
