"""Learning curves: the meta-test metric along meta-training, against meta-steps and training time."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_contrastive.callbacks._utils import (
    SettingsCallback,
    check_every_n_steps,
    log_to_loggers,
    meta_learning_module,
)
from lightning_contrastive.evaluation import EpisodeMetrics

Clock = Literal["wall", "cpu"]


@dataclass(frozen=True)
class CurvePoint:
    """The evaluation metrics at one point of meta-training.

    Attributes:
        meta_step: optimizer steps taken so far (``trainer.global_step``).
        train_seconds: wall-clock seconds of meta-training so far, evaluations excluded.
        train_cpu_seconds: the process's CPU seconds of meta-training so far, evaluations excluded.
        metrics: mean and 95% confidence half-width over the evaluation episodes (``query_loss``,
            ``query_loss_ci95``, and ``accuracy``, ``accuracy_ci95`` for classification).
        episodes: how many evaluation episodes entered the metrics.
    """

    meta_step: int
    train_seconds: float
    train_cpu_seconds: float
    metrics: dict[str, float]
    episodes: int


class LearningCurve(SettingsCallback):
    """Evaluates the module on the data module's fixed test (or validation) episodes at regular points of meta-training.

    A point is taken before the first meta-step, every ``every_n_steps`` meta-steps and/or every ``every_seconds``
    seconds of training time, and when training ends; each records the meta-step, the training time by both clocks
    and the metrics with their 95% intervals (:class:`CurvePoint`, kept in :attr:`points` and logged as
    ``curve/<metric>``). The evaluation is :meth:`MetaLearningModule.test_step` (or ``validation_step``) over the
    whole loader, in eval mode, so the last point equals what ``trainer.test`` then reports. Its cost (one
    adaptation per episode) is excluded from both clocks, and it leaves the random number generators as it found
    them, so training is the same with or without the callback.

    ``max_train_seconds`` stops meta-training once the training time reaches it (checked after each meta-step):
    equal-time comparisons give every estimator the same budget. ``clock="cpu"`` measures the process's CPU time,
    which for a one-thread process is the wall-clock it would take on a core of its own: unlike ``"wall"`` it does
    not grow when other processes share the cores, so runs side by side on a busy machine get equal budgets.

    The points and the clocks are saved in checkpoints: a run resumed with ``ckpt_path`` continues its curve and
    its budget. Single process only (the clocks and the stop are per process).

    Args:
        every_n_steps: meta-steps between two points; ``None`` for none by steps.
        every_seconds: training seconds (by ``clock``) between two points; ``None`` for none by time.
        max_train_seconds: stop meta-training after this many training seconds (by ``clock``); ``None``: no limit.
        clock: ``"wall"`` or ``"cpu"`` (see above): the clock of ``every_seconds`` and ``max_train_seconds``.
        episodes: evaluate on the ``"test"`` or the ``"val"`` episodes.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_seconds: float | None = None,
        max_train_seconds: float | None = None,
        clock: Clock = "wall",
        episodes: Literal["test", "val"] = "test",
    ) -> None:
        if every_n_steps is None and every_seconds is None:
            raise ValueError("LearningCurve needs every_n_steps or every_seconds (or both) to know when to evaluate.")
        if every_n_steps is not None:
            check_every_n_steps(every_n_steps)
        for name, value in (("every_seconds", every_seconds), ("max_train_seconds", max_train_seconds)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a number of seconds > 0; got {value!r}.")
        if clock not in ("wall", "cpu"):
            raise ValueError(f'clock must be "wall" or "cpu"; got {clock!r}.')
        if episodes not in ("test", "val"):
            raise ValueError(f'episodes must be "test" or "val"; got {episodes!r}.')
        self.every_n_steps = every_n_steps
        self.every_seconds = every_seconds
        self.max_train_seconds = max_train_seconds
        self.clock = clock
        self.episodes = episodes
        self.points: list[CurvePoint] = []
        self._trained = {"wall": 0.0, "cpu": 0.0}  # training seconds before this fit started (a resumed run)
        self._started = {"wall": 0.0, "cpu": 0.0}
        self._evaluating = {"wall": 0.0, "cpu": 0.0}  # seconds spent in this callback's evaluations since then

    # ------------------------------------------------------------------ clocks
    def train_seconds(self, clock: Clock | None = None) -> float:
        """Training seconds so far by ``clock`` (default: the callback's), evaluations excluded."""
        clock = clock or self.clock
        return self._trained[clock] + _now(clock) - self._started[clock] - self._evaluating[clock]

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        meta_learning_module(self, pl_module)
        if trainer.world_size > 1:
            raise MisconfigurationException(
                "LearningCurve measures one process's training time and stops it by that clock; it cannot keep "
                f"{trainer.world_size} processes in step. Run it on one device, or remove it."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = {clock: _now(clock) for clock in ("wall", "cpu")}
        self._evaluating = {"wall": 0.0, "cpu": 0.0}
        if not self.points or self.points[-1].meta_step != trainer.global_step:
            self._take_point(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        last = self.points[-1]
        if trainer.global_step == last.meta_step:  # gradient accumulation: no meta-step yet
            return
        elapsed = self.train_seconds()
        due_by_steps = self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0
        last_seconds = last.train_cpu_seconds if self.clock == "cpu" else last.train_seconds
        due_by_time = self.every_seconds is not None and elapsed - last_seconds >= self.every_seconds
        if self.max_train_seconds is not None and elapsed >= self.max_train_seconds:
            trainer.should_stop = True  # the point is taken in on_train_end
        elif due_by_steps or due_by_time:
            self._take_point(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.points[-1].meta_step != trainer.global_step:
            self._take_point(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            "points": [asdict(point) for point in self.points],
            "trained": {clock: self.train_seconds(clock) for clock in ("wall", "cpu")},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = [CurvePoint(**point) for point in state_dict["points"]]
        self._trained = dict(state_dict["trained"])

    # ------------------------------------------------------------------ evaluation
    def _take_point(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = {clock: self.train_seconds(clock) for clock in ("wall", "cpu")}
        before = {clock: _now(clock) for clock in ("wall", "cpu")}
        metrics, count = self._evaluate(trainer, pl_module)
        for clock in ("wall", "cpu"):
            self._evaluating[clock] += _now(clock) - before[clock]
        point = CurvePoint(trainer.global_step, seconds["wall"], seconds["cpu"], metrics, count)
        self.points.append(point)
        log_to_loggers(trainer, {f"curve/{name}": value for name, value in metrics.items()}, point.meta_step)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict[str, float], int]:
        """Mean and 95% CI of every per-episode metric over the whole evaluation loader, and the episode count."""
        module = meta_learning_module(self, pl_module)
        datamodule = trainer.datamodule
        if datamodule is None:
            raise MisconfigurationException(
                "LearningCurve evaluates on the data module's fixed episodes; pass a LightningDataModule to fit "
                "(trainer.fit(model, datamodule=...))."
            )
        loader = datamodule.test_dataloader() if self.episodes == "test" else datamodule.val_dataloader()
        step = module.test_step if self.episodes == "test" else module.validation_step
        store: EpisodeMetrics = module.test_episodes if self.episodes == "test" else module.val_episodes
        device = module.device
        was_training = module.training
        module.eval()
        store.reset()
        try:
            with (
                torch.no_grad(),
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type),
            ):
                for index, batch in enumerate(loader):
                    step(module.transfer_batch_to_device(batch, device, 0), index)
            summaries = store.summary()
        finally:
            store.reset()
            module.train(was_training)
        metrics: dict[str, float] = {}
        for name, summary in summaries.items():
            metrics[name], metrics[f"{name}_ci95"] = float(summary.mean), float(summary.ci95)
        return metrics, next(iter(summaries.values())).episodes


def _now(clock: Clock) -> float:
    return time.perf_counter() if clock == "wall" else time.process_time()
