"""Meta-training and evaluation under Lightning's DDP strategies on CPU, for ``tests/test_ddp.py``.

Run as ``python tests/scripts/ddp_meta_step.py OUT_DIR [--estimators ...] [--steps N] [--strategy S]
[--evaluate EPISODES]``. Lightning's ``ddp`` strategies re-run this same command line for every other
process (which is why the tests cannot start them inside pytest), and every process runs the whole script:

- for each estimator: one float64 module, and ``--steps`` meta-steps with SGD on :func:`data`'s
  meta-batches split over 2 processes (gloo), under the strategy in :data:`STRATEGIES`. Every process
  saves the batches it trained on to ``OUT_DIR/<estimator>-rank<r>.pt``; process 0 also saves the
  meta-parameters after training to ``OUT_DIR/<estimator>-parameters.pt``.
- with ``--poison-rank R``: the modules skip faulty tasks (``on_inner_fault="skip"``) and process R's tasks
  get NaN support targets before each step, so that all of them fail there while the other process trains.
- with ``--evaluate EPISODES``: ``Trainer.validate`` of the last module on that many validation episodes.
  Every process saves the batches it evaluated to ``OUT_DIR/evaluated-rank<r>.pt`` and process 0 the
  logged metrics to ``OUT_DIR/validated.pt``.

:func:`module` and :func:`data` are also what the tests build the single-process reference from.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_contrastive import MAML, ComplexSynapse, Contrastive, Estimator, FirstOrderMAML
from lightning_contrastive.data import SinusoidDataModule
from lightning_contrastive.module import MetaLearningModule
from lightning_contrastive.networks import MLP

ESTIMATORS: dict[str, Callable[[], Estimator]] = {
    "contrastive": lambda: Contrastive(beta=0.1, inner_steps=5, nudged_steps=3, inner_lr=0.02),
    "fomaml": lambda: FirstOrderMAML(inner_steps=3, inner_lr=0.02),
    "maml": lambda: MAML(inner_steps=3, inner_lr=0.02),
}
STRATEGIES = {"fomaml": "ddp_find_unused_parameters_true"}
"""Lightning's plain ``"ddp"`` unless listed. First-order MAML gives the strengths no meta-gradient, and in
a step where a parameter gets none DDP all-reduces nothing unless told to look for such parameters."""
LEARNING_RATE = 0.1


def module(estimator: str, on_inner_fault: str = "stop") -> MetaLearningModule:
    """A complex synapse on a 1-8-1 MLP with learned strengths, in float64, meta-trained by SGD."""
    torch.manual_seed(0)
    learner = ComplexSynapse(MLP(hidden=(8,)), loss="mse", init_lambda=1.0, learn_lambda=True)
    optimizer = partial(torch.optim.SGD, lr=LEARNING_RATE)
    return MetaLearningModule(
        learner,
        ESTIMATORS[estimator](),
        optimizer=optimizer,
        on_inner_fault=on_inner_fault,  # type: ignore[arg-type]
    ).double()


def data(num_eval_tasks: int = 8) -> SinusoidDataModule:
    """Meta-batches of 4 sinusoid tasks (2 per process on 2) and ``num_eval_tasks`` validation episodes."""
    return SinusoidDataModule(
        shots=5, test_shots=5, batch_size=4, num_train_tasks=64, num_eval_tasks=num_eval_tasks, eval_batch_size=3
    )


class BatchRecorder(pl.Callback):
    """Keeps every training and validation batch this process sees, in order."""

    def __init__(self) -> None:
        self.batches: list[Mapping[str, Any]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batches.append(batch)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.batches.append(batch)


class Poison(pl.Callback):
    """Puts NaN into every support target of process ``rank``'s training batches, before the step sees them."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_rank == self.rank:
            batch["train"][1].fill_(float("nan"))


def trainer(recorder: BatchRecorder, strategy: str, *callbacks: pl.Callback, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        precision="64-true",
        callbacks=[*callbacks, recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def meta_parameters(meta_learner: MetaLearningModule) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in meta_learner.learner.named_meta_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--estimators", nargs="*", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--strategy", help="the strategy for every estimator (default: STRATEGIES, else ddp)")
    parser.add_argument("--evaluate", type=int, metavar="EPISODES", help="then validate on this many episodes")
    parser.add_argument("--poison-rank", type=int, help="skip faulty tasks, and make every task of this rank fail")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the processes share the machine's cores

    meta_learner = None
    poison = () if args.poison_rank is None else (Poison(args.poison_rank),)
    for name in args.estimators:
        meta_learner, recorder = module(name, "stop" if args.poison_rank is None else "skip"), BatchRecorder()
        strategy = args.strategy or STRATEGIES.get(name, "ddp")
        run = trainer(recorder, strategy, *poison, max_steps=args.steps, limit_val_batches=0)
        run.fit(meta_learner, datamodule=data())
        torch.save(recorder.batches, args.out_dir / f"{name}-rank{run.global_rank}.pt")
        if run.is_global_zero:
            torch.save(meta_parameters(meta_learner), args.out_dir / f"{name}-parameters.pt")
    if args.evaluate is not None and meta_learner is not None:
        recorder = BatchRecorder()
        run = trainer(recorder, "ddp")
        (validated,) = run.validate(meta_learner, datamodule=data(args.evaluate), verbose=False)
        torch.save(recorder.batches, args.out_dir / f"evaluated-rank{run.global_rank}.pt")
        if run.is_global_zero:
            torch.save(validated, args.out_dir / "validated.pt")


if __name__ == "__main__":
    main()
