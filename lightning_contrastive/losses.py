"""Task losses by name, and the one-off check that targets suit them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LossName = Literal["cross_entropy", "mse"]
LossFn = Callable[[Tensor, Tensor], Tensor]

_LOSSES: dict[str, LossFn] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


def get_loss(name: str) -> LossFn:
    """The mean-reduced loss called ``name`` (``"cross_entropy"`` or ``"mse"``)."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise ValueError(f"Unknown loss {name!r}; choose one of {sorted(_LOSSES)}.") from None


def check_targets(name: str, prediction: Tensor, target: Tensor, where: str) -> None:
    """Raise ``ValueError`` unless ``target`` suits loss ``name`` for a model output ``prediction``.

    Called once per task before the inner loop, never inside it, so that the check costs one host
    synchronisation per task rather than one per inner step.
    """
    if name == "cross_entropy":
        if target.dtype.is_floating_point or target.dtype == torch.bool or target.dim() != 1:
            raise ValueError(
                f"{where}: cross_entropy needs integer class labels of shape (examples,) per task; got "
                f"{target.dtype} of shape {tuple(target.shape)}. Use loss='mse' for regression targets."
            )
        classes = prediction.shape[-1]
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= classes:
            raise ValueError(
                f"{where}: labels range over [{low}, {high}] but the network has {classes} outputs, so "
                f"labels must lie in [0, {classes - 1}]. Relabel each task's classes 0..N-1 or widen the "
                "output layer."
            )
    elif prediction.shape != target.shape:
        raise ValueError(
            f"{where}: mse needs targets shaped like the network's output {tuple(prediction.shape)}; got "
            f"{tuple(target.shape)}. Regression targets in a batch are (tasks, examples, out_dim)."
        )
