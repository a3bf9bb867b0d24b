"""What the diagnostic callbacks share: meta-parameter groups, logging at a chosen step, the module check."""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_contrastive._repr import settings_repr
from lightning_contrastive.compat.flavours import check_same_lightning
from lightning_contrastive.module import MetaLearningModule


class SettingsCallback(Callback):
    """A callback whose ``repr`` is its constructor call with its settings: ``BetaSchedule(start=0.1, end=0.01, ...)``.

    Each setting is read back from the attribute named after its constructor argument (every callback here keeps its
    arguments under their own names); what a run accumulates (held batches, traces, curve points) is not a setting
    and stays out, so the ``repr`` of a callback is the same before and after training.
    """

    def __repr__(self) -> str:
        # A subclass may take ``**kwargs`` or keep an argument under another name: those are left out, not fatal.
        arguments = list(inspect.signature(type(self).__init__).parameters.values())[1:]
        named = (p.name for p in arguments if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        return settings_repr(self, {name: getattr(self, name) for name in named if hasattr(self, name)})


def check_every_n_steps(every_n_steps: int) -> None:
    """Raise ``ValueError`` unless ``every_n_steps`` is a whole number >= 1."""
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"every_n_steps must be an integer >= 1 (meta-steps between two logs); got {every_n_steps!r}.")


def meta_learning_module(callback: Callback, pl_module: pl.LightningModule) -> MetaLearningModule:
    """``pl_module``, checked to be a :class:`MetaLearningModule` (``MisconfigurationException`` otherwise).

    A callback built on the other Lightning package than the Trainer's gets a ``TypeError`` naming the import to use.
    """
    check_same_lightning(callback, pl_module)
    if not isinstance(pl_module, MetaLearningModule):
        raise MisconfigurationException(
            f"{type(callback).__name__} reads a learner and an estimator, so it needs a "
            f"lightning_contrastive.MetaLearningModule; got {type(pl_module).__name__}. Remove the callback."
        )
    return pl_module


def meta_parameter_group(name: str) -> str:
    """The group of a meta-parameter: the first component of its dotted name (``omega``, ``lambda``, ``primary``...)."""
    return name.split(".", 1)[0]


def flat_groups(named: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """Each group's tensors flattened into one float64 vector, in name order, plus ``""`` for all of them at once.

    Float64, so that norms and inner products of many small float32 entries lose nothing to round-off.
    """
    members: defaultdict[str, list[Tensor]] = defaultdict(list)
    for name, tensor in named:
        flat = tensor.detach().flatten().double()
        members[meta_parameter_group(name)].append(flat)
        members[""].append(flat)
    return {group: torch.cat(tensors) for group, tensors in members.items()}


def ratio(numerator: Tensor, denominator: Tensor) -> float:
    """``numerator / denominator`` as a float; NaN where the denominator is zero (the ratio is undefined there)."""
    return float(numerator / denominator) if float(denominator) > 0 else math.nan


def metric_name(prefix: str, group: str, suffix: str = "") -> str:
    """``prefix/group/suffix``, with empty parts left out: the all-parameters group ``""`` logs as ``prefix/suffix``."""
    return "/".join(part for part in (prefix, group, suffix) if part)


def log_to_loggers(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Send ``metrics`` to every logger of ``trainer`` now, at ``step``.

    Unlike ``LightningModule.log``, which reaches the loggers only on the steps that ``log_every_n_steps``
    selects, this logs whenever a callback has computed something (loggers are rank-zero-only already).
    """
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)
