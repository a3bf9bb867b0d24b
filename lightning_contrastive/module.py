"""The LightningModule that meta-trains any learner with any meta-gradient estimator."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_contrastive.checkpoints import check_checkpoint_fits
from lightning_contrastive.estimation import FaultPolicy, check_estimation, estimate
from lightning_contrastive.estimation import meta_gradient as estimated_meta_gradient
from lightning_contrastive.estimators.base import Estimator
from lightning_contrastive.evaluation import (
    EpisodeMetrics,
    UnsolvedPhaseWarning,
    autograd_enabled,
    episode_metrics,
    plain_tensors,
    predict_queries,
    print_evaluation_run,
    training_metrics,
)
from lightning_contrastive.export import adapted_network, export_learned
from lightning_contrastive.faults import InnerFault
from lightning_contrastive.learners.base import Learner
from lightning_contrastive.runtime import ThreadPolicy, seeded_by_position

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
    default) also print them as a table, with the number of episodes (and Lightning's own table is left out).
    Adaptation needs autograd, which is re-enabled locally, so the default ``Trainer()`` (evaluation under
    ``torch.inference_mode``) works unchanged. The episode work is :mod:`lightning_contrastive.evaluation`'s.

    **Using what was learned.** ``module(x_support, y_support, x_query)`` adapts and predicts; :meth:`adapt` gives a
    task's adapted network, :meth:`meta_learned_network` the start of every task, :meth:`export` both as plain files.

    **Lightning packages.** This class is built on ``pytorch_lightning``; the same class on the unified ``lightning``
    package is ``lightning_contrastive.lightning.MetaLearningModule`` (:mod:`lightning_contrastive.compat.flavours`).

    **Checkpoints.** ``MetaLearningModule.load_from_checkpoint(path)`` rebuilds a module trained under ``LightningCLI``
    by itself; one built in Python needs its objects again (``load_from_checkpoint(path, learner=..., estimator=...)``);
    one that does not fit is refused before loading: :mod:`lightning_contrastive.checkpoints`.

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
            after another, ``None`` (default) as :func:`~lightning_contrastive.estimation.choose_batched`
            picks for the learner, the estimator and the device (vmapped, except convolutions on the CPU).
        cpu_threads: torch's intra-op threads while a Trainer runs this module on the CPU (``fit``, ``validate``,
            ``test``, ``predict``); the previous setting is restored when it ends. ``"auto"`` (default): one thread,
            unless ``OMP_NUM_THREADS`` is set; an integer: that many; ``None``: torch's setting, untouched. Why one,
            measured: :class:`~lightning_contrastive.runtime.ThreadPolicy`.
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
        cpu_threads: int | Literal["auto"] | None = "auto",
    ) -> None:
        super().__init__()
        check_estimation(learner, estimator, batched)  # fail now, not at the first batch
        if lr_scheduler_interval not in ("step", "epoch"):
            raise ValueError(f'lr_scheduler_interval must be "step" or "epoch"; got {lr_scheduler_interval!r}.')
        if on_inner_fault not in ("stop", "skip"):
            raise ValueError(f'on_inner_fault must be "stop" or "skip"; got {on_inner_fault!r}.')
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
        self.cpu_threads = cpu_threads
        self._threads = ThreadPolicy(cpu_threads)  # checks it
        self.skipped_tasks_total = 0
        self.unsolved_phases = UnsolvedPhaseWarning()
        self.classification = learner.loss_name == "cross_entropy"
        self.val_episodes = EpisodeMetrics()
        self.test_episodes = EpisodeMetrics()

    def extra_repr(self) -> str:
        """What ``print(module)`` shows beside the learner (a submodule): the settings that are not modules."""
        settings = ("estimator", "on_inner_fault", "batched", "cpu_threads", "lr_scheduler_interval")
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in settings)

    # ---------------------------------------------------------------- the estimate, outside Lightning
    def meta_gradient(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The estimator's meta-gradient on ``batch``, keyed like ``learner.named_meta_parameters()``.

        Needs no Trainer and changes no state (no ``.grad`` is written). The update Lightning applies
        after one training step with SGD and no clipping is ``-lr`` times this.
        """
        with autograd_enabled(self.device.type):
            return estimated_meta_gradient(self.learner, self.estimator, plain_tensors(batch))

    def adapt(self, x_support: Tensor, y_support: Tensor) -> nn.Module:
        """Adapt to one task's support set; returns a plain ``nn.Module`` carrying the task's adapted weights,
        independent of this module: :func:`~lightning_contrastive.export.adapted_network` (shapes, guarantees)."""
        return adapted_network(self.learner, self.estimator, x_support, y_support)

    def forward(self, x_support: Tensor, y_support: Tensor, x_query: Tensor) -> Tensor:
        """Adapt to one task's support set and predict its query inputs: ``module(x_s, y_s, x_q)``.

        A meta-learner has no prediction without a task, so ``module(x)`` alone is a ``TypeError``; the network
        every task starts from is :meth:`meta_learned_network`, and a task's adapted network :meth:`adapt`.
        Shapes as in :meth:`adapt`; returns ``(query examples, outputs)``.
        """
        return self.adapt(x_support, y_support)(x_query)

    def meta_learned_network(self) -> nn.Module:
        """What was meta-learned, as a plain copy of the user's network class whose ``state_dict()`` loads into a fresh
        instance of it, no library needed (``learner.meta_learned_network()``: for ``ComplexSynapse`` the backbone at
        ``omega``, for ``DualSystem`` the primary network with its starting modulation and readout folded in)."""
        return self.learner.meta_learned_network()

    def export(self, directory: str | os.PathLike[str]) -> dict[str, Path]:
        """Write what was learned as plain PyTorch files into ``directory``, ``network.pt`` (the
        :meth:`meta_learned_network`'s ``state_dict()``) and ``meta_parameters.pt``, loadable without this library;
        returns their paths: :func:`~lightning_contrastive.export.export_learned`."""
        return export_learned(self.learner, directory)

    # ---------------------------------------------------------------- threads
    def setup(self, stage: str) -> None:
        """Apply the ``cpu_threads`` policy for this run (on the CPU only); a ``fit`` counts unsolved phases afresh."""
        if stage == "fit":
            self.unsolved_phases.reset()
        if self.trainer.strategy.root_device.type == "cpu":
            self._threads = ThreadPolicy(self.cpu_threads)  # as set now, should it have changed since __init__
            self._threads.apply()

    def teardown(self, stage: str) -> None:
        """Give torch back the thread count it had before :meth:`setup`."""
        self._threads.restore()

    # ---------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        """Return the estimator's surrogate for ``batch``; Lightning's backward turns it into the meta-gradient.

        Logs :func:`~lightning_contrastive.evaluation.training_metrics` (query loss after adaptation, and each inner
        phase's final objective, steps and residual: ``inner/free``, ``inner/nudged_pos_residual``, ...), and warns
        once when too many phases end unsolved (:class:`~lightning_contrastive.evaluation.UnsolvedPhaseWarning`).
        Returns ``None`` (no optimizer step) when every task failed under ``on_inner_fault="skip"`` on one process.
        """
        with seeded_by_position(self.current_epoch, batch_idx, self.global_rank, self.device):
            result = estimate(self.learner, self.estimator, batch, batched=self.batched, on_fault=self.on_inner_fault)
        if self.on_inner_fault == "skip":
            self._count_skipped(result.skipped)
        if not result.tasks:
            return result.surrogate if self.trainer.world_size > 1 else None
        self.unsolved_phases.observe(self.estimator, result)
        metrics = training_metrics(self.learner, self.estimator, result)
        self.log("train/query_loss", metrics.pop("train/query_loss"), prog_bar=True, batch_size=len(result.tasks))
        self.log_dict(metrics, batch_size=len(result.tasks))
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
        """Refuse a checkpoint that does not fit this module (``ValueError`` naming the keys), before its weights load.

        For ``Trainer.fit(..., ckpt_path=...)`` and ``load_from_checkpoint`` alike; what must match is
        :func:`~lightning_contrastive.checkpoints.checkpoint_problems`'s. Also restores the count of skipped tasks.
        """
        check_checkpoint_fits(checkpoint, self.state_dict(), self.hparams)
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
        self.val_episodes.update(**episode_metrics(self.learner, self.estimator, batch))

    def on_validation_epoch_end(self) -> None:
        self._log_summary("val", self.val_episodes)

    def on_test_epoch_start(self) -> None:
        self.test_episodes.reset()

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """As :meth:`validation_step`, for the test episodes."""
        self.test_episodes.update(**episode_metrics(self.learner, self.estimator, batch))

    def on_test_epoch_end(self) -> None:
        self._log_summary("test", self.test_episodes)

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """Adapt to each task's support set and predict its query inputs: ``(tasks, query examples, outputs)``
        (:func:`~lightning_contrastive.evaluation.predict_queries`; the query targets are not used)."""
        return predict_queries(self.learner, self.estimator, batch)

    # ---------------------------------------------------------------- helpers
    def _log_summary(self, stage: Literal["val", "test"], episodes: EpisodeMetrics) -> None:
        """Log mean and 95% CI of every per-episode metric, over all ranks' episodes, and at the end of a verbose
        ``validate`` or ``test`` run print them (:func:`~lightning_contrastive.evaluation.print_evaluation_run`)."""
        summaries = {f"{stage}/{name}": summary for name, summary in episodes.summary(gather=self.all_gather).items()}
        for name, summary in summaries.items():
            self.log(name, summary.mean, prog_bar=name == f"{stage}/query_loss")
            self.log(f"{name}_ci95", summary.ci95)
        print_evaluation_run(self.trainer, stage, summaries)


def _built_by_lightning_cli() -> bool:
    """Whether ``LightningCLI`` is instantiating the module, handing ``save_hyperparameters`` its parsed config.

    Lightning exposes this only through a context variable, read here rather than guessed from the arguments.
    """
    return _given_hyperparameters.get() is not None
