"""The LightningModule that meta-trains any learner with any meta-gradient estimator."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_contrastive.checkpoints import check_checkpoint_fits
from lightning_contrastive.estimation import FaultPolicy, estimate
from lightning_contrastive.estimation import meta_gradient as estimated_meta_gradient
from lightning_contrastive.estimators.base import Estimator
from lightning_contrastive.evaluation import (
    EpisodeMetrics,
    adapt_tasks,
    autograd_enabled,
    frozen_meta,
    plain_tensors,
    print_results,
    query_metrics,
)
from lightning_contrastive.faults import InnerFault
from lightning_contrastive.learners.base import Learner

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

    **Checkpoints.** Under ``LightningCLI`` the hyperparameters saved are the parsed configuration
    (``class_path``/``init_args`` of learner, estimator, optimizer and scheduler), so
    ``MetaLearningModule.load_from_checkpoint(path)`` rebuilds the module by itself. Objects built in
    Python (modules, estimator instances, optimizer callables, which may be lambdas) are not stored in the
    checkpoint; pass them again: ``load_from_checkpoint(path, learner=..., estimator=...)``. A checkpoint that does
    not fit the module is refused before loading (:mod:`lightning_contrastive.checkpoints`).

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
            unless ``OMP_NUM_THREADS`` is set in the environment, which then decides; an integer: that many;
            ``None``: torch's setting, untouched. Why one: the inner loops are long chains of small operations,
            which extra threads slow down on a loaded CPU: on 2 busy cores a sinusoid MLP meta-step took 2.1-2.3 s
            with torch's default (2 threads) against 0.16-0.29 s with one, a 32-channel Conv4 step 1.7-11 s against
            0.4-0.9 s (README, "Threads").
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
        if not isinstance(learner, Learner):
            raise ValueError(f"learner must be a lightning_contrastive Learner; got {type(learner).__name__}.")
        if not isinstance(estimator, Estimator):
            raise ValueError(f"estimator must be a lightning_contrastive Estimator; got {type(estimator).__name__}.")
        estimator.check_learner(learner)  # e.g. Reptile with learned strengths: fail now, not at the first batch
        if lr_scheduler_interval not in ("step", "epoch"):
            raise ValueError(f'lr_scheduler_interval must be "step" or "epoch"; got {lr_scheduler_interval!r}.')
        if on_inner_fault not in ("stop", "skip"):
            raise ValueError(f'on_inner_fault must be "stop" or "skip"; got {on_inner_fault!r}.')
        if not (cpu_threads in ("auto", None) or (type(cpu_threads) is int and cpu_threads >= 1)):
            raise ValueError(f'cpu_threads must be "auto", None or an integer >= 1; got {cpu_threads!r}.')
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
        self.cpu_threads = cpu_threads
        self._threads_before: int | None = None
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
        with autograd_enabled(self.device.type):
            return estimated_meta_gradient(self.learner, self.estimator, plain_tensors(batch))

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
        _, (fast,) = adapt_tasks(self.learner, self.estimator, {"train": support, "test": support})  # query unused
        return self.learner.as_module(fast)

    def forward(self, x_support: Tensor, y_support: Tensor, x_query: Tensor) -> Tensor:
        """Adapt to one task's support set and predict its query inputs: ``module(x_s, y_s, x_q)``.

        A meta-learner has no prediction without a task, so ``module(x)`` alone is a ``TypeError``; the network
        every task starts from is :meth:`meta_learned_network`, and a task's adapted network :meth:`adapt`.
        Shapes as in :meth:`adapt`; returns ``(query examples, outputs)``.
        """
        return self.adapt(x_support, y_support)(x_query)

    def meta_learned_network(self) -> nn.Module:
        """What was meta-learned, as a plain copy of the user's network class (``learner.meta_learned_network()``).

        For :class:`~lightning_contrastive.ComplexSynapse` the backbone at ``omega``; for
        :class:`~lightning_contrastive.DualSystem` the primary network with its starting modulation and readout
        folded in. Its ``state_dict()`` loads into a fresh instance of that class: no library needed to use it.
        """
        return self.learner.meta_learned_network()

    def export(self, directory: str | os.PathLike[str]) -> dict[str, Path]:
        """Write what was learned as plain PyTorch files into ``directory`` (created if needed); returns their paths.

        - ``network.pt``: ``meta_learned_network().state_dict()``, to load into a fresh instance of the user's
          network class (``net.load_state_dict(torch.load(path, weights_only=True))``);
        - ``meta_parameters.pt``: every meta-parameter by name, ``{name: tensor}`` as in
          ``learner.named_meta_parameters()`` (e.g. ``omega.*`` and ``lambda.*`` log-strengths, or ``primary.*``,
          ``init.*``), for what the network cannot hold.

        Both are plain ``dict[str, Tensor]`` on the CPU, loadable with ``torch.load(..., weights_only=True)``
        without this library. A task's adapted network is :meth:`adapt` (save its ``state_dict()`` likewise).
        """
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"network": folder / "network.pt", "meta_parameters": folder / "meta_parameters.pt"}
        network = {name: t.detach().cpu() for name, t in self.meta_learned_network().state_dict().items()}
        torch.save(network, paths["network"])
        meta = {name: p.detach().cpu().clone() for name, p in self.learner.named_meta_parameters()}
        torch.save(meta, paths["meta_parameters"])
        return paths

    # ---------------------------------------------------------------- threads
    def setup(self, stage: str) -> None:
        """Apply the ``cpu_threads`` policy for this run (on the CPU only)."""
        threads = 1 if self.cpu_threads == "auto" and "OMP_NUM_THREADS" not in os.environ else self.cpu_threads
        if isinstance(threads, int) and self.trainer.strategy.root_device.type == "cpu":
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)

    def teardown(self, stage: str) -> None:
        """Give torch back the thread count it had before :meth:`setup`."""
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

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
        tasks = result.inputs
        per_episode = query_metrics(self.learner, self.estimator, tasks, [task.adapted for task in result.tasks])
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
        self.val_episodes.update(
            **query_metrics(self.learner, self.estimator, *adapt_tasks(self.learner, self.estimator, batch))
        )

    def on_validation_epoch_end(self) -> None:
        self._log_summary("val", self.val_episodes)

    def on_test_epoch_start(self) -> None:
        self.test_episodes.reset()

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """As :meth:`validation_step`, for the test episodes."""
        self.test_episodes.update(
            **query_metrics(self.learner, self.estimator, *adapt_tasks(self.learner, self.estimator, batch))
        )

    def on_test_epoch_end(self) -> None:
        self._log_summary("test", self.test_episodes)

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """Adapt to each task's support set and predict its query inputs: ``(tasks, query examples, outputs)``.

        The query targets are not used (any placeholder of the right shape will do).
        """
        tasks, adapted = adapt_tasks(self.learner, self.estimator, batch)
        meta = frozen_meta(self.learner, self.estimator)
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            return torch.stack(
                [self.learner.predict(fast, meta, task.query.x) for task, fast in zip(tasks, adapted, strict=True)]
            )

    # ---------------------------------------------------------------- helpers
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
            loop.verbose = False  # Lightning's own table (no CI, no episodes) would follow; every run resets it


def _built_by_lightning_cli() -> bool:
    """Whether ``LightningCLI`` is instantiating the module, handing ``save_hyperparameters`` its parsed config.

    Lightning exposes this only through a context variable, read here rather than guessed from the arguments.
    """
    return _given_hyperparameters.get() is not None


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
