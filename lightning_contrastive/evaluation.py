"""Few-shot evaluation: adapting to each episode's support set, scoring its query set, and the protocol's summary.

Lightning-free (``rank_zero_only`` is ``lightning_utilities``'s, the object both Lightning packages set the rank
on), so one copy serves the module of either Lightning package.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning_utilities import apply_to_collection
from lightning_utilities.core.rank_zero import rank_zero_only, rank_zero_warn
from torch import Tensor

from lightning_contrastive.estimation import MetaEstimate, cast_task, compute_dtype, ieee_float32
from lightning_contrastive.estimators.base import Estimator
from lightning_contrastive.learners.base import Learner
from lightning_contrastive.tasks import Params, Task, split_batch

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


def print_evaluation_run(trainer: Any, stage: Literal["val", "test"], summaries: Mapping[str, MetricSummary]) -> None:
    """At the end of a ``validate`` or ``test`` run of ``trainer`` (not of the validations inside ``fit``) that was
    asked to be verbose, print ``summaries`` as a table with the number of episodes, on rank zero.

    Lightning's own table (no CI, no episodes) would follow; it is turned off for this run (every run resets it).
    Duck-typed on the Trainer of either Lightning package: ``trainer.state.fn`` is a ``str`` enum.
    """
    loop = trainer.validate_loop if stage == "val" else trainer.test_loop
    if trainer.state.fn == ("validate" if stage == "val" else "test") and loop.verbose:
        title = "Meta-validation" if stage == "val" else "Meta-test"
        print_results(f"{title} results, mean and 95% CI over the episodes:", summaries)
        loop.verbose = False


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


# ---------------------------------------------------------------- adapting and scoring episodes
@contextmanager
def autograd_enabled(device_type: str) -> Iterator[None]:
    """Autograd on (even inside ``no_grad`` or ``inference_mode``) and autocast off, for inner-loop adaptation."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
        yield


def plain_tensors(batch: Any) -> Any:
    """Copies of ``batch``'s tensors usable by autograd: tensors created under ``inference_mode`` are not.

    Call inside :func:`autograd_enabled`.
    """
    return apply_to_collection(batch, Tensor, lambda t: t.clone() if t.is_inference() else t)


def frozen_meta(learner: Learner, estimator: Estimator) -> Params:
    """The learner's meta-parameters, detached and in ``estimator``'s compute dtype, the dtype training adapts in."""
    dtype = compute_dtype(learner, estimator)
    return {name: p.detach().to(dtype) for name, p in learner.named_meta_parameters()}


def adapt_tasks(learner: Learner, estimator: Estimator, batch: Any) -> tuple[list[Task], list[Params]]:
    """Every task of ``batch`` (split, cast, its targets checked: ``ValueError``) and its fast parameters after
    ``estimator.adapt`` on its support set.

    Runs with autograd re-enabled on copies of the batch's tensors, so it works under ``no_grad`` and
    ``inference_mode`` alike, and with IEEE float32 convolutions, as the training estimate does.
    """
    meta = frozen_meta(learner, estimator)
    dtype = next(iter(meta.values())).dtype
    with autograd_enabled(next(iter(meta.values())).device.type), ieee_float32():
        tasks = [cast_task(task, dtype) for task in split_batch(plain_tensors(batch))]
        for task in tasks:
            learner.check_task(task, meta)
        return tasks, [estimator.adapt(learner, meta, task.support).params for task in tasks]


def query_metrics(
    learner: Learner, estimator: Estimator, tasks: list[Task], adapted: list[Params]
) -> dict[str, Tensor]:
    """Per-episode query loss, and accuracy for a classification learner, at each task's adapted fast parameters
    (``estimator``'s, so in its compute dtype).

    One value per task in each tensor: ``{"query_loss": (tasks,), "accuracy": (tasks,)}``.
    """
    meta = frozen_meta(learner, estimator)
    classification = learner.loss_name == "cross_entropy"
    losses, accuracies = [], []
    with torch.no_grad(), torch.autocast(next(iter(meta.values())).device.type, enabled=False):
        for task, fast in zip(tasks, adapted, strict=True):
            losses.append(learner.query_loss(fast, meta, task.query))
            if classification:
                prediction = learner.predict(fast, meta, task.query.x)
                accuracies.append((prediction.argmax(-1) == task.query.y).float().mean())
    metrics = {"query_loss": torch.stack(losses)}
    if classification:
        metrics["accuracy"] = torch.stack(accuracies)
    return metrics


def episode_metrics(learner: Learner, estimator: Estimator, batch: Any) -> dict[str, Tensor]:
    """:func:`query_metrics` of every task of ``batch`` after :func:`adapt_tasks`: one evaluation step."""
    return query_metrics(learner, estimator, *adapt_tasks(learner, estimator, batch))


def predict_queries(learner: Learner, estimator: Estimator, batch: Any) -> Tensor:
    """Adapt to each task's support set and predict its query inputs: ``(tasks, query examples, outputs)``.

    The query targets are not used (any placeholder of the right shape will do).
    """
    tasks, adapted = adapt_tasks(learner, estimator, batch)
    meta = frozen_meta(learner, estimator)
    with torch.no_grad(), torch.autocast(next(iter(meta.values())).device.type, enabled=False):
        return torch.stack(
            [learner.predict(fast, meta, task.query.x) for task, fast in zip(tasks, adapted, strict=True)]
        )


def training_metrics(learner: Learner, estimator: Estimator, result: MetaEstimate) -> dict[str, Tensor]:
    """What a training batch's kept tasks (``result.tasks``, at least one) did, averaged over them.

    - ``train/query_loss`` (and ``train/accuracy`` for classification): the query loss after adaptation;
    - ``inner/<phase>`` (``free``, ``nudged_pos``, ...): each inner phase's final objective;
    - ``inner/<phase>_steps`` and ``inner/<phase>_residual``, with their maxima ``..._max``: the updates each
      phase applied and the gradient norm where it ended, i.e. how far from solved;
    - ``inner/unsolved``, for an estimator with a tolerance: the share of phases that reached their cap unsolved.

    From what the estimate computed: no task is adapted again.
    """
    per_episode = query_metrics(learner, estimator, result.inputs, [task.adapted for task in result.tasks])
    metrics = {f"train/{name}": values.mean() for name, values in per_episode.items()}
    for phase in result.tasks[0].inner_losses:
        metrics[f"inner/{phase}"] = torch.stack([task.inner_losses[phase] for task in result.tasks]).mean()
    for name, field in (("steps", "steps"), ("residual", "residuals")):
        for phase in getattr(result.tasks[0], field):  # empty for an estimator that builds its own TaskEstimate
            values = torch.stack([getattr(task, field)[phase] for task in result.tasks]).float()
            metrics[f"inner/{phase}_{name}"] = values.mean()
            metrics[f"inner/{phase}_{name}_max"] = values.max()
    unsolved = unsolved_phases(result) if estimator.adaptation_tolerance is not None else None
    if unsolved is not None and unsolved.numel():
        metrics["inner/unsolved"] = unsolved.float().mean()
    return metrics


def unsolved_phases(result: MetaEstimate) -> Tensor:
    """One boolean per reported phase of every kept task: True where the phase reached its cap before its tolerance
    (empty where the estimator reports no phases)."""
    flags = [~solved for task in result.tasks for solved in task.solved.values()]
    return torch.stack(flags) if flags else torch.zeros(0, dtype=torch.bool)


UNSOLVED_WARNING_SHARE = 0.1
"""The share of inner phases ending unsolved above which :class:`UnsolvedPhaseWarning` warns, once per run."""


class UnsolvedPhaseWarning:
    """Warns once per run when more than :data:`UNSOLVED_WARNING_SHARE` of the phases so far ended unsolved.

    A phase that reaches its cap with a residual above the tolerance breaks the premise of the contrastive and
    implicit estimates (a solved inner problem), and the per-step metrics are easy to miss; counted over at least
    ``minimum_phases`` phases, so that the first batch alone does not decide.
    """

    def __init__(self, minimum_phases: int = 20) -> None:
        self.minimum_phases = minimum_phases
        self.reset()

    def reset(self) -> None:
        """Start counting afresh: at the start of every ``fit``."""
        self.phases = 0
        self.unsolved = 0
        self.warned = False

    def observe(self, estimator: Estimator, result: MetaEstimate) -> None:
        """Count ``result``'s phases (when ``estimator`` stops on a tolerance) and warn if the share is too high."""
        if estimator.adaptation_tolerance is None or self.warned or not result.tasks:
            return
        flags = unsolved_phases(result)  # one host read per meta-step, only while a tolerance is set
        self.phases += flags.numel()
        self.unsolved += int(flags.sum())
        if self.phases >= self.minimum_phases and self.unsolved > UNSOLVED_WARNING_SHARE * self.phases:
            self.warned = True
            rank_zero_warn(
                f"{self.unsolved} of {self.phases} inner phases ({self.unsolved / self.phases:.0%}) reached their step "
                f"cap before the tolerance {estimator.adaptation_tolerance:g} (the logged inner/<phase>_residual "
                "says how far from solved they ended): the estimate assumes solved phases, and its error grows like "
                "residual / beta. Raise the caps (inner_steps, nudged_steps), loosen the tolerance, or take a larger "
                "inner learning rate if the problem allows it."
            )
