"""Few-shot evaluation protocol: the mean of a per-episode metric and its 95% confidence interval."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from pytorch_lightning.utilities import rank_zero_only
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


@dataclass(frozen=True)
class MetricSummary:
    """A per-episode metric over a whole evaluation set.

    Attributes:
        mean: its mean over the episodes.
        ci95: the half-width of the mean's 95% confidence interval (:func:`mean_and_ci95`).
        episodes: how many episodes entered it.
    """

    mean: Tensor
    ci95: Tensor
    episodes: int


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

    def summary(self, gather: Callable[[Tensor], Tensor] | None = None) -> dict[str, MetricSummary]:
        """Every metric's :class:`MetricSummary` over every recorded episode, by name."""
        result = {}
        for name, chunks in self._values.items():
            values = torch.cat(chunks)
            if gather is not None:
                values = gather_episodes(values, gather)
            result[name] = MetricSummary(*mean_and_ci95(values), episodes=values.numel())
        return result

    def reset(self) -> None:
        """Forget every recorded episode, ready for the next epoch."""
        self._values.clear()


def results_table(summaries: Mapping[str, MetricSummary]) -> str:
    """An aligned text table with one row per metric: ``metric | mean | ± 95% CI | episodes``."""
    header = ("metric", "mean", "± 95% CI", "episodes")
    rows = [(name, f"{float(s.mean):.4g}", f"{float(s.ci95):.2g}", str(s.episodes)) for name, s in summaries.items()]
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:  # names flush left, numbers flush right
        name, *numbers = cells
        return " | ".join([name.ljust(widths[0]), *(n.rjust(w) for n, w in zip(numbers, widths[1:], strict=True))])

    rule = "-+-".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


@rank_zero_only
def print_results(title: str, summaries: Mapping[str, MetricSummary]) -> None:
    """Print ``title`` and :func:`results_table` of ``summaries``, on global rank zero only."""
    print(f"\n{title}\n{results_table(summaries)}\n")


def gather_episodes(values: Tensor, gather: Callable[[Tensor], Tensor]) -> Tensor:
    """Every process's 1-d per-episode ``values``, concatenated in rank order.

    Processes may hold different numbers of episodes (an evaluation set that does not divide by their number
    is split unevenly rather than padded with repeated episodes), but ``gather`` (``LightningModule.all_gather``)
    needs one shape on every process: each pads its values to the longest, and the padding is cut off again.
    Outside DDP ``gather`` returns its input and so does this.
    """
    counts = gather(torch.tensor(values.numel(), device=values.device)).flatten()
    padded = values.new_zeros(int(counts.max()))
    padded[: values.numel()] = values
    rows = gather(padded).reshape(len(counts), -1)
    return torch.cat([row[:count] for row, count in zip(rows, counts.tolist(), strict=True)])
