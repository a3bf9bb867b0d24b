"""Episodic batches in torchmeta's format, split into validated per-task views.

A meta-batch is ``{"train": (x, y), "test": (x, y)}`` with a leading task dimension, exactly what
torchmeta's ``BatchMetaDataLoader`` yields: ``x`` of shape ``(B, N*K, *features)``, ``y`` either
int64 class labels ``(B, N*K)`` or regression targets ``(B, K, out_dim)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

Params = dict[str, Tensor]
"""Fast or meta-parameters of one task, keyed by name."""


@dataclass(frozen=True)
class Split:
    """The inputs and targets of one task's support or query set."""

    x: Tensor
    y: Tensor


@dataclass(frozen=True)
class Task:
    """One episode: the support set the inner loop learns from and the query set it is judged on."""

    support: Split
    query: Split


def split_batch(batch: Mapping[str, Any]) -> list[Task]:
    """Validate a torchmeta-format meta-batch and return one :class:`Task` per leading index.

    Raises:
        ValueError: naming the problem, when a key is missing, an entry is not an ``(x, y)`` pair,
            the task counts disagree, or inputs and targets disagree in their number of examples.
    """
    if not isinstance(batch, Mapping) or not {"train", "test"} <= set(batch):
        found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            'An episodic batch must be a mapping with keys "train" (support set) and "test" '
            f"(query set), each an (x, y) pair, as torchmeta's BatchMetaDataLoader yields; got {found}."
        )
    splits: dict[str, tuple[Tensor, Tensor]] = {}
    for key in ("train", "test"):
        entry = batch[key]
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise ValueError(f'batch["{key}"] must be an (x, y) pair of tensors; got {type(entry).__name__}.')
        x, y = entry
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise ValueError(f'batch["{key}"] must hold tensors; got ({type(x).__name__}, {type(y).__name__}).')
        if x.dim() < 3 or y.dim() < 2:
            raise ValueError(
                f'batch["{key}"] needs a leading task dimension: x of shape (tasks, examples, *features) '
                f"and y of shape (tasks, examples[, out_dim]); got x {tuple(x.shape)} and y {tuple(y.shape)}. "
                "Add the task dimension with x.unsqueeze(0), y.unsqueeze(0) for a single task."
            )
        if x.shape[:2] != y.shape[:2]:
            raise ValueError(
                f'batch["{key}"] has {tuple(x.shape[:2])} (tasks, examples) in x but {tuple(y.shape[:2])} in y; '
                "every input needs exactly one target."
            )
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(
                f'batch["{key}"] holds {x.shape[0]} tasks of {x.shape[1]} examples; a meta-batch needs at least one '
                "task, and every task at least one support and one query example."
            )
        splits[key] = (x, y)
    (xs, ys), (xq, yq) = splits["train"], splits["test"]
    if xs.shape[0] != xq.shape[0]:
        raise ValueError(
            f'batch["train"] holds {xs.shape[0]} tasks but batch["test"] holds {xq.shape[0]}; '
            "each task needs both a support and a query set."
        )
    if xs.shape[2:] != xq.shape[2:] or ys.shape[2:] != yq.shape[2:] or ys.dtype != yq.dtype:
        raise ValueError(
            f"Support and query sets disagree: support x {tuple(xs.shape)}, y {tuple(ys.shape)} {ys.dtype}; "
            f"query x {tuple(xq.shape)}, y {tuple(yq.shape)} {yq.dtype}. Inputs must share their feature "
            "shape and targets their shape per example and dtype."
        )
    return [Task(Split(xs[i], ys[i]), Split(xq[i], yq[i])) for i in range(xs.shape[0])]
