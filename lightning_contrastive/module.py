"""The LightningModule that meta-trains any learner with any meta-gradient estimator."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_utilities import apply_to_collection
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_contrastive.estimators.base import Estimator
from lightning_contrastive.evaluation import EpisodeMetrics, print_results
from lightning_contrastive.faults import InnerFault
from lightning_contrastive.learners.base import Learner
from lightning_contrastive.meta_gradient import FaultPolicy, cast_task, compute_dtype, estimate, ieee_float32
from lightning_contrastive.meta_gradient import meta_gradient as estimated_meta_gradient
from lightning_contrastive.tasks import Params, Task, split_batch

log = logging.getLogger(__name__)


class MetaLearningModule(pl.LightningModule):
    """Meta-trains ``learner`` with the meta-gradients of ``estimator``, inside Lightning's automatic optimization.

    Batches are torchmeta-format episodes ``{"train": (x, y), "test": (x, y)}`` with a leading task
    dimension: ``"train"`` is each task's support set, ``"test"`` its query set.

    **Where the estimate enters.** :meth:`training_step` returns ``estimate(learner, estimator, batch).surrogate``,
    the tasks' mean surrogate, whose gradient with respect to the learner's meta-parameters is the
    estimated meta-gradient ``g`` (for the contrastive rule the surrogate is
    ``[L_beta(sg phi_beta, theta) - L_0(sg phi_0, theta)] / beta``; its value is meaningless, its gradient is ``g``).
    Lightning then treats it like any loss: the precision plugin scales it, ``backward`` writes ``g`` into
    ``.grad`` (divided by ``accumulate_grad_batches`` and summed over the accumulated batches), DDP
    all-reduces it, ``gradient_clip_val`` clips it, ``on_before_optimizer_step`` callbacks see it, and the
    outer optimizer steps on it, followed by any LR scheduler. No second-order graph is built unless the
    estimator itself needs one (MAML). :meth:`optimizer_step` then calls ``learner.after_meta_step()``, the
    learner's chance to restore constraints on its meta-parameters.

    **Faults.** After a training batch's inner phases have run, their fault flags are read once (no per-step
    host sync): a phase that produced NaN or inf, or a nudged phase that diverged (see ``Contrastive``'s
    ``divergence_ratio``). With ``on_inner_fault="stop"`` (default)
    :class:`~lightning_contrastive.faults.InnerLoopError` is raised from ``training_step``, naming each failed
    task and phase, before any backward pass or optimizer step: the meta-parameters and every checkpoint
    already written stay as they were. With ``"skip"`` the failed tasks are left out of the meta-batch's mean,
    logged as warnings and counted (``train/skipped_tasks`` per step, ``train/skipped_tasks_total`` since the
    start, kept in checkpoints); a batch whose tasks all failed makes no optimizer step (under DDP it
    contributes a zero meta-gradient, so that the processes stay in step).

    **Evaluation.** Validation and test adapt to each task's support set with ``estimator.adapt`` and
    score the query set; they log the mean over all evaluation episodes and its 95% confidence interval
    (``val/query_loss``, ``val/query_loss_ci95``, and ``val/accuracy``, ``val/accuracy_ci95`` for
    classification; ``test/...`` alike); ``trainer.validate`` and ``trainer.test`` (with ``verbose=True``, the
    default) also print them as a table, with the number of episodes. Adaptation needs autograd, which is
    re-enabled locally, so the default ``Trainer()`` (evaluation under ``torch.inference_mode``) works unchanged.

    **Checkpoints.** Under ``LightningCLI`` the hyperparameters saved are the parsed configuration
    (``class_path``/``init_args`` of learner, estimator, optimizer and scheduler), so
    ``MetaLearningModule.load_from_checkpoint(path)`` rebuilds the module by itself. Objects built in
    Python (modules, estimator instances, optimizer callables, which may be lambdas) are not stored in the
    checkpoint; pass them again: ``load_from_checkpoint(path, learner=..., estimator=...)``.

    Args:
        learner: what is meta-learned, e.g. :class:`~lightning_contrastive.ComplexSynapse`.
        estimator: how its meta-gradient is estimated, e.g. :class:`~lightning_contrastive.Contrastive`.
        optimizer: builds the outer optimizer from the meta-parameters (default ``torch.optim.Adam``, lr 1e-3).
        lr_scheduler: builds an LR scheduler from the outer optimizer; none by default.
        lr_scheduler_interval: step the scheduler after every meta-step (``"step"``, the unit in which
            meta-training is usually measured) or after every training epoch (``"epoch"``). A
            ``ReduceLROnPlateau`` scheduler monitors ``val/query_loss``.
        on_inner_fault: ``"stop"`` (raise) or ``"skip"`` (drop and count) a task whose inner phases failed.
        batched: how a training batch's tasks run: ``True`` together under ``torch.func.vmap``, ``False`` one
            after another, ``None`` (default) as :func:`~lightning_contrastive.meta_gradient.choose_batched`
            picks for the learner, the estimator and the device (vmapped, except convolutions on the CPU).
    """

    def __init__(
        self,
        learner: Learner,
        estimator: Estimator,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        on_inner_fault: FaultPolicy = "stop",
        batched: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(learner, Learner):
            raise ValueError(f"learner must be a lightning_contrastive Learner; got {type(learner).__name__}.")
        if not isinstance(estimator, Estimator):
            raise ValueError(f"estimator must be a lightning_contrastive Estimator; got {type(estimator).__name__}.")
        estimator.check_learner(learner)  # e.g. Reptile with learned strengths: fail now, not at the first batch
        if lr_scheduler_interval not in ("step", "epoch"):
            raise ValueError(f'lr_scheduler_interval must be "step" or "epoch"; got {lr_scheduler_interval!r}.')
        if on_inner_fault not in ("stop", "skip"):
            raise ValueError(f'on_inner_fault must be "stop" or "skip"; got {on_inner_fault!r}.')
        if batched and not estimator.batchable:
            raise ValueError(
                f"batched=True, but {type(estimator).__name__} cannot run under torch.func.vmap "
                "(Estimator.batchable is False). Leave batched=None to let the library choose."
            )
        self.save_hyperparameters(
            ignore=[] if _built_by_lightning_cli() else ["learner", "estimator", "optimizer", "lr_scheduler"]
        )
        self.learner = learner
        self.estimator = estimator
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.on_inner_fault = on_inner_fault
        self.batched = batched
        self.skipped_tasks_total = 0
        self.classification = learner.loss_name == "cross_entropy"
        self.val_episodes = EpisodeMetrics()
        self.test_episodes = EpisodeMetrics()

    # ---------------------------------------------------------------- the estimate, outside Lightning
    def meta_gradient(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The estimator's meta-gradient on ``batch``, keyed like ``learner.named_meta_parameters()``.

        Needs no Trainer and changes no state (no ``.grad`` is written). The update Lightning applies
        after one training step with SGD and no clipping is ``-lr`` times this.
        """
        with _autograd_enabled(self.device.type):
            return estimated_meta_gradient(self.learner, self.estimator, _plain_tensors(batch))

    def adapt(self, x_support: Tensor, y_support: Tensor) -> nn.Module:
        """Adapt to one task's support set; returns a plain ``nn.Module`` carrying the task's adapted weights.

        ``x_support`` is ``(examples, *features)`` and ``y_support`` ``(examples,)`` class labels or
        ``(examples, out_dim)`` targets, without a task dimension. The module computes
        ``learner.predict(phi*, theta, x)`` with ``phi* = estimator.adapt(...)`` and is independent of this
        module (later meta-updates do not change it). Works under ``torch.no_grad`` and ``inference_mode``.
        """
        if x_support.dim() < 2 or y_support.dim() < 1:
            raise ValueError(
                f"adapt takes one task's support set, x (examples, *features) and y (examples[, out_dim]); got "
                f"x {tuple(x_support.shape)} and y {tuple(y_support.shape)}."
            )
        support = (x_support.unsqueeze(0), y_support.unsqueeze(0))
        _, (fast,) = self._adapt_each({"train": support, "test": support})  # the query set is not used
        return self.learner.as_module(fast)

    # ---------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        """Return the estimator's surrogate for ``batch``; Lightning's backward turns it into the meta-gradient.

        Logs the mean over the batch's tasks of the query loss after adaptation (``train/query_loss``,
        ``train/accuracy``) and of each inner phase's final objective (``inner/free``, ``inner/nudged_pos``, ...).
        Returns ``None`` (no optimizer step) when every task failed under ``on_inner_fault="skip"`` on one process.
        """
        with _seeded_by_position(self.current_epoch, batch_idx, self.global_rank, self.device):
            result = estimate(self.learner, self.estimator, batch, batched=self.batched, on_fault=self.on_inner_fault)
        if self.on_inner_fault == "skip":
            self._count_skipped(result.skipped)
        if not result.tasks:
            return result.surrogate if self.trainer.world_size > 1 else None
        every_task = self._tasks(batch)
        tasks = [every_task[i] for i in result.kept]
        per_episode = self._query_metrics(tasks, [task.adapted for task in result.tasks])
        inner_losses = {
            f"inner/{phase}": torch.stack([task.inner_losses[phase] for task in result.tasks]).mean()
            for phase in result.tasks[0].inner_losses
        }
        self.log("train/query_loss", per_episode.pop("query_loss").mean(), prog_bar=True, batch_size=len(tasks))
        self.log_dict({f"train/{name}": values.mean() for name, values in per_episode.items()}, batch_size=len(tasks))
        self.log_dict(inner_losses, batch_size=len(tasks))
        return result.surrogate

    def _count_skipped(self, skipped: list[InnerFault]) -> None:
        """Warn about each skipped task and log this step's and the run's counts."""
        for fault in skipped:
            log.warning("Skipped a task at step %d: %s", self.global_step, fault.describe())
        self.skipped_tasks_total += len(skipped)
        self.log("train/skipped_tasks", float(len(skipped)), reduce_fx="sum", batch_size=1)
        self.log("train/skipped_tasks_total", float(self.skipped_tasks_total), batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skipped_tasks_total"] = self.skipped_tasks_total

    def on_after_backward(self) -> None:
        """Under DDP, stop a meta-step in which some meta-parameters got no meta-gradient, before it is applied.

        Estimators may leave meta-parameters alone (first-order MAML: the strengths). DDP, unless it looks for
        such parameters (``find_unused_parameters``), then all-reduces no gradient at all in that step: each
        process would apply its own meta-gradient and the copies drift apart (DDP only fails at the next step).
        """
        ddp = self.trainer.strategy.model
        if not isinstance(ddp, DistributedDataParallel) or ddp.find_unused_parameters:
            return
        missing = [name for name, p in self.learner.named_meta_parameters() if p.requires_grad and p.grad is None]
        if missing:
            raise MisconfigurationException(
                f"{type(self.estimator).__name__} gives no meta-gradient to {len(missing)} meta-parameters "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), and DDP, not told to expect that, "
                "averages no gradient in such a step. Use Trainer(strategy='ddp_find_unused_parameters_true') (or "
                "DDPStrategy(find_unused_parameters=True)), or stop learning them (e.g. learn_lambda=False)."
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint from an incompatible configuration, naming the keys that differ.

        Runs before the weights are loaded, for ``Trainer.fit(..., ckpt_path=...)`` and ``load_from_checkpoint``
        alike. Incompatible: the checkpoint's tensors do not fit this module (missing, extra or reshaped), or the
        configuration saved with it (under LightningCLI) differs in the learner or the outer optimizer, whose
        state would be restored into the wrong parameters or the wrong algorithm. The estimator and schedules may
        change (e.g. more inner steps at test time). Also restores the count of skipped tasks.
        """
        saved, current = checkpoint.get("state_dict", {}), self.state_dict()
        problems = [f"{key}: missing from the checkpoint" for key in sorted(current.keys() - saved.keys())]
        problems += [f"{key}: in the checkpoint, not in this module" for key in sorted(saved.keys() - current.keys())]
        problems += [
            f"{key}: shape {tuple(saved[key].shape)} in the checkpoint, {tuple(current[key].shape)} here"
            for key in sorted(saved.keys() & current.keys())
            if saved[key].shape != current[key].shape
        ]
        saved_config = checkpoint.get("hyper_parameters", {})
        for section in ("learner", "optimizer"):
            if section in saved_config and section in self.hparams:
                problems += [
                    f"model.{key}: {then!r} in the checkpoint, {now!r} here"
                    for key, then, now in _config_differences(saved_config[section], self.hparams[section], section)
                ]
        if problems:
            raise ValueError(
                "The checkpoint does not fit this module's configuration:\n  " + "\n  ".join(problems) + "\n"
                "Resume or evaluate with the configuration it was saved with (the config.yaml next to the logs)."
            )
        self.skipped_tasks_total = checkpoint.get("skipped_tasks_total", 0)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Optimizer | LightningOptimizer,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Step the outer optimizer on the accumulated, clipped meta-gradient, then ``learner.after_meta_step()``."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.learner.after_meta_step()

    def configure_optimizers(self) -> OptimizerLRScheduler:
        optimizer = self.optimizer_factory([p for _, p in self.learner.named_meta_parameters()])
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = {
            "scheduler": self.lr_scheduler_factory(optimizer),
            "interval": self.lr_scheduler_interval,
            "monitor": "val/query_loss",
        }
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ---------------------------------------------------------------- evaluation
    def on_validation_epoch_start(self) -> None:
        self.val_episodes.reset()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Adapt to each task's support set and record its query loss (and accuracy) per episode."""
        self.val_episodes.update(**self._evaluate(batch))

    def on_validation_epoch_end(self) -> None:
        self._log_summary("val", self.val_episodes)

    def on_test_epoch_start(self) -> None:
        self.test_episodes.reset()

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """As :meth:`validation_step`, for the test episodes."""
        self.test_episodes.update(**self._evaluate(batch))

    def on_test_epoch_end(self) -> None:
        self._log_summary("test", self.test_episodes)

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """Adapt to each task's support set and predict its query inputs: ``(tasks, query examples, outputs)``.

        The query targets are not used (any placeholder of the right shape will do).
        """
        tasks, adapted = self._adapt_each(batch)
        meta = self._frozen_meta()
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            return torch.stack(
                [self.learner.predict(fast, meta, task.query.x) for task, fast in zip(tasks, adapted, strict=True)]
            )

    # ---------------------------------------------------------------- helpers
    def _frozen_meta(self) -> Params:
        """The meta-parameters, detached and in the estimators' compute dtype."""
        dtype = compute_dtype(self.learner)
        return {name: p.detach().to(dtype) for name, p in self.learner.named_meta_parameters()}

    def _tasks(self, batch: Mapping[str, Any]) -> list[Task]:
        """``batch`` split into tasks (``ValueError`` if malformed), cast to the estimators' compute dtype."""
        dtype = compute_dtype(self.learner)
        return [cast_task(task, dtype) for task in split_batch(batch)]

    def _checked_tasks(self, batch: Mapping[str, Any]) -> list[Task]:
        """:meth:`_tasks`, with every task's targets checked against the learner's loss (``ValueError``)."""
        tasks = self._tasks(batch)
        meta = self._frozen_meta()
        for task in tasks:
            self.learner.check_task(task, meta)
        return tasks

    def _query_metrics(self, tasks: list[Task], adapted: list[Params]) -> dict[str, Tensor]:
        """Per-episode query loss (and accuracy for classification) at each task's adapted fast parameters."""
        meta = self._frozen_meta()
        losses, accuracies = [], []
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            for task, fast in zip(tasks, adapted, strict=True):
                losses.append(self.learner.query_loss(fast, meta, task.query))
                if self.classification:
                    prediction = self.learner.predict(fast, meta, task.query.x)
                    accuracies.append((prediction.argmax(-1) == task.query.y).float().mean())
        metrics = {"query_loss": torch.stack(losses)}
        if self.classification:
            metrics["accuracy"] = torch.stack(accuracies)
        return metrics

    def _adapt_each(self, batch: Mapping[str, Any]) -> tuple[list[Task], list[Params]]:
        """Every task of ``batch`` (checked and cast) and its fast parameters after ``estimator.adapt``.

        Runs with autograd re-enabled on copies of the batch's tensors, so it works under ``no_grad`` and
        ``inference_mode`` alike.
        """
        with _autograd_enabled(self.device.type), ieee_float32():
            tasks = self._checked_tasks(_plain_tensors(batch))
            meta = self._frozen_meta()
            return tasks, [self.estimator.adapt(self.learner, meta, task.support).params for task in tasks]

    def _evaluate(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Adapt to every task of ``batch`` and return its per-episode query metrics."""
        return self._query_metrics(*self._adapt_each(batch))

    def _log_summary(self, stage: Literal["val", "test"], episodes: EpisodeMetrics) -> None:
        """Log mean and 95% CI of every per-episode metric, over all ranks' episodes.

        At the end of a ``validate`` or ``test`` run (not of the validations inside ``fit``) that was asked to be
        verbose, also print them as a table with the number of episodes, on rank zero.
        """
        summaries = {f"{stage}/{name}": summary for name, summary in episodes.summary(gather=self.all_gather).items()}
        for name, summary in summaries.items():
            self.log(name, summary.mean, prog_bar=name == f"{stage}/query_loss")
            self.log(f"{name}_ci95", summary.ci95)
        evaluation_run = TrainerFn.VALIDATING if stage == "val" else TrainerFn.TESTING
        loop = self.trainer.validate_loop if stage == "val" else self.trainer.test_loop
        if self.trainer.state.fn == evaluation_run and loop.verbose:
            title = "Meta-validation" if stage == "val" else "Meta-test"
            print_results(f"{title} results, mean and 95% CI over the episodes:", summaries)


def _built_by_lightning_cli() -> bool:
    """Whether ``LightningCLI`` is instantiating the module, handing ``save_hyperparameters`` its parsed config.

    Lightning exposes this only through a context variable, read here rather than guessed from the arguments.
    """
    return _given_hyperparameters.get() is not None


@contextmanager
def _autograd_enabled(device_type: str) -> Iterator[None]:
    """Autograd on (even inside ``no_grad`` or ``inference_mode``) and autocast off, for inner-loop adaptation."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
        yield


def _plain_tensors(batch: Any) -> Any:
    """Copies of ``batch``'s tensors usable by autograd: tensors created under ``inference_mode`` are not.

    Call inside :func:`_autograd_enabled`.
    """
    return apply_to_collection(batch, Tensor, lambda t: t.clone() if t.is_inference() else t)


@contextmanager
def _seeded_by_position(epoch: int, batch_idx: int, rank: int, device: torch.device) -> Iterator[None]:
    """Inside, torch's global generator is seeded from ``(seed, epoch, batch_idx, rank)``; after, it is restored.

    An estimator's random draws (``Contrastive(query_subsample=...)``, dropout in a backbone) then depend on the
    training position alone: a run resumed from a checkpoint repeats them exactly with no generator state in the
    checkpoint, and DDP processes draw differently. ``seed`` is ``seed_everything``'s (``PL_GLOBAL_SEED``).
    """
    entropy = [int(os.environ.get("PL_GLOBAL_SEED", 0)), epoch, batch_idx, rank]
    seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(seed)
        yield


def _config_differences(saved: Any, current: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, current value)`` for every leaf where two parsed configurations differ."""
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        return [
            difference
            for key in sorted(saved.keys() | current.keys(), key=str)
            for difference in _config_differences(saved.get(key), current.get(key), f"{prefix}.{key}")
        ]
    return [] if saved == current else [(prefix, saved, current)]
