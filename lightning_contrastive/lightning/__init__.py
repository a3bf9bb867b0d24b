"""``lightning_contrastive`` for the unified ``lightning`` package (``import lightning as L``, ``L.Trainer``).

The same API as ``lightning_contrastive`` (which is built on ``pytorch_lightning``), with every Lightning-facing
class built on ``lightning.pytorch``::

    import lightning as L
    from lightning_contrastive.lightning import ComplexSynapse, Contrastive, MetaLearningModule
    from lightning_contrastive.lightning.data import SinusoidDataModule
    from lightning_contrastive.lightning.callbacks import MetaGradientMonitor

    L.Trainer(max_steps=800, callbacks=[MetaGradientMonitor()]).fit(module, SinusoidDataModule())

``.callbacks``, ``.data``, ``.loggers`` and ``.cli`` mirror their ``lightning_contrastive`` namesakes; learners,
estimators and the other Lightning-free pieces are the same objects in both. How, and why this way:
:mod:`lightning_contrastive.compat.flavours`.
"""

from lightning_contrastive import (
    MAML,
    ComplexSynapse,
    Contrastive,
    DualSystem,
    Estimator,
    FirstOrderMAML,
    Implicit,
    InnerFault,
    InnerLBFGS,
    InnerLoopError,
    InnerSGD,
    Learner,
    MetaEstimate,
    Reptile,
    Split,
    Task,
    estimate,
    meta_gradient,
    split_batch,
)
from lightning_contrastive.compat.flavours import install_mirror

install_mirror()

from lightning_contrastive.lightning.module import MetaLearningModule  # noqa: E402  (served by the mirror)

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
