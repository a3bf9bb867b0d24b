"""Contrastive meta-learning (Zucchet et al., NeurIPS 2022) and its reference estimators, for PyTorch Lightning.

The learners, estimators and meta-gradients import no Lightning package. ``MetaLearningModule`` (and
``.callbacks``, ``.data``, ``.loggers``, ``.cli``) here are built on ``pytorch_lightning``; the same classes built on
the unified ``lightning`` package are in :mod:`lightning_contrastive.lightning`.
"""

import sys
from typing import TYPE_CHECKING

from lightning_contrastive import estimation
from lightning_contrastive._deprecations import MovedModule
from lightning_contrastive.estimation import MetaEstimate, estimate, meta_gradient
from lightning_contrastive.estimators import MAML, Contrastive, Estimator, FirstOrderMAML, Implicit, Reptile
from lightning_contrastive.faults import InnerFault, InnerLoopError
from lightning_contrastive.inner import InnerLBFGS, InnerSGD
from lightning_contrastive.learners import ComplexSynapse, DualSystem, Learner
from lightning_contrastive.tasks import Split, Task, split_batch

if TYPE_CHECKING:  # imported on first use at run time (__getattr__ below); named here for type checkers
    from lightning_contrastive.module import MetaLearningModule

__all__ = [
    "MAML",
    "ComplexSynapse",
    "Contrastive",
    "DualSystem",
    "Estimator",
    "FirstOrderMAML",
    "Implicit",
    "InnerFault",
    "InnerLBFGS",
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

# The module behind `meta_gradient` was `lightning_contrastive.meta_gradient` until it got a name of its own; the old
# path works for one release (CHANGELOG.md). `lightning_contrastive.meta_gradient` itself stays the function.
sys.modules[f"{__name__}.meta_gradient"] = MovedModule(f"{__name__}.meta_gradient", estimation)


def __getattr__(name: str) -> object:
    """``MetaLearningModule``, imported on first use, so that the Lightning-free core imports no Lightning package."""
    if name != "MetaLearningModule":
        raise AttributeError(f"module 'lightning_contrastive' has no attribute {name!r}")
    try:
        from lightning_contrastive.module import MetaLearningModule
    except ModuleNotFoundError as missing:
        if missing.name != "pytorch_lightning":
            raise
        raise ImportError(
            "lightning_contrastive.MetaLearningModule is built on pytorch_lightning, which is not installed. With the "
            "unified package (`import lightning as L`) use `from lightning_contrastive.lightning import "
            "MetaLearningModule`; or `pip install pytorch-lightning`."
        ) from missing
    return MetaLearningModule
