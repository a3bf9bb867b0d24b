"""Few-shot evaluation protocol: the mean of a per-episode metric and its 95% confidence interval."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor

Z_95 = 1.959963984540054
"""The two-sided 95% quantile of the standard normal distribution."""


def mean_and_ci95(values: Tensor) -> tuple[Tensor, Tensor]:
    """The mean of per-episode ``values`` and the half-width of its normal 95% confidence interval.

    ``ci95 = 1.96 * std / sqrt(n)`` with the unbiased standard deviation, the convention of the
    few-shot literature (results are reported as ``mean ± ci95`` over e.g. 600 episodes). The interval
    is undefined (NaN) for fewer than two episodes.
    """
    values = values.detach().flatten().to(torch.promote_types(values.dtype, torch.float32))
    if values.numel() == 0:
        raise ValueError("No episodes to aggregate: the evaluation set produced no per-episode values.")
    if values.numel() < 2:
        return values.mean(), values.new_full((), math.nan)
    return values.mean(), Z_95 * values.std() / math.sqrt(values.numel())


class EpisodeMetrics:
    """Per-episode metrics collected over an evaluation epoch, summarised as mean and 95% CI at its end.

    Values are kept as a list of per-batch tensors (one entry per episode) and concatenated only in
    :meth:`summary`, which takes an optional ``gather`` (e.g. ``LightningModule.all_gather``) so that under
    DDP every rank's episodes enter the statistics, not a mean of per-rank means.
    """

    def __init__(self) -> None:
        self._values: defaultdict[str, list[Tensor]] = defaultdict(list)

    def update(self, **per_episode: Tensor) -> None:
        """Record one batch: each keyword is a metric name and a tensor with one value per episode."""
        for name, values in per_episode.items():
            self._values[name].append(values.detach().flatten())

    def summary(self, gather: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """``{name: mean, name_ci95: half-width}`` over every recorded episode."""
        result = {}
        for name, chunks in self._values.items():
            values = torch.cat(chunks)
            if gather is not None:
                values = gather(values).flatten()
            result[name], result[f"{name}_ci95"] = mean_and_ci95(values)
        return result

    def reset(self) -> None:
        """Forget every recorded episode, ready for the next epoch."""
        self._values.clear()
