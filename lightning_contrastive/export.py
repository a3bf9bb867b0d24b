"""What was meta-learned, as plain PyTorch: a task's adapted network, and files that load without this library.

Lightning-free: :class:`~lightning_contrastive.MetaLearningModule`'s ``adapt`` and ``export`` are these.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_contrastive.estimators.base import Estimator
from lightning_contrastive.evaluation import adapt_tasks
from lightning_contrastive.learners.base import Learner


def adapted_network(learner: Learner, estimator: Estimator, x_support: Tensor, y_support: Tensor) -> nn.Module:
    """Adapt to one task's support set; returns a plain ``nn.Module`` carrying the task's adapted weights.

    ``x_support`` is ``(examples, *features)`` and ``y_support`` ``(examples,)`` class labels or
    ``(examples, out_dim)`` targets, without a task dimension. The module computes
    ``learner.predict(phi*, theta, x)`` with ``phi* = estimator.adapt(...)`` and is independent of the learner
    (later meta-updates do not change it). Works under ``torch.no_grad`` and ``inference_mode``.
    """
    if x_support.dim() < 2 or y_support.dim() < 1:
        raise ValueError(
            f"adapt takes one task's support set, x (examples, *features) and y (examples[, out_dim]); got "
            f"x {tuple(x_support.shape)} and y {tuple(y_support.shape)}."
        )
    support = (x_support.unsqueeze(0), y_support.unsqueeze(0))
    _, (fast,) = adapt_tasks(learner, estimator, {"train": support, "test": support})  # the query is not used
    return learner.as_module(fast)


def export_learned(learner: Learner, directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Write what ``learner`` meta-learned as plain PyTorch files into ``directory`` (created if needed); returns
    their paths.

    - ``network.pt``: ``learner.meta_learned_network().state_dict()``, to load into a fresh instance of the user's
      network class (``net.load_state_dict(torch.load(path, weights_only=True))``);
    - ``meta_parameters.pt``: every meta-parameter by name, ``{name: tensor}`` as in
      ``learner.named_meta_parameters()`` (e.g. ``omega.*`` and ``lambda.*`` log-strengths, or ``primary.*``,
      ``init.*``), for what the network cannot hold.

    Both are plain ``dict[str, Tensor]`` on the CPU, loadable with ``torch.load(..., weights_only=True)``
    without this library. A task's adapted network is :func:`adapted_network` (save its ``state_dict()`` likewise).
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"network": folder / "network.pt", "meta_parameters": folder / "meta_parameters.pt"}
    network = {name: t.detach().cpu() for name, t in learner.meta_learned_network().state_dict().items()}
    torch.save(network, paths["network"])
    meta = {name: p.detach().cpu().clone() for name, p in learner.named_meta_parameters()}
    torch.save(meta, paths["meta_parameters"])
    return paths
