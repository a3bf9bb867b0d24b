"""What the callback tests share, as fixtures: small sinusoid meta-batches, a small module, and ``fit``, which trains
with a real Trainer that logs to CSV and returns what was logged."""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, default_collate

from lightning_contrastive import ComplexSynapse, Contrastive, Estimator, Learner, MetaLearningModule
from lightning_contrastive.data.sinusoid import SinusoidTasks
from lightning_contrastive.networks import MLP

Batch = Mapping[str, Any]
Logged = dict[str, dict[int, float]]
"""Every metric a run logged: name -> {step: value}."""


def _sinusoid_batches(count: int, tasks: int = 2, seed: int = 0) -> list[Batch]:
    """``count`` meta-batches of ``tasks`` sinusoid tasks with 5 support and 5 query points each."""
    family = SinusoidTasks(num_tasks=count * tasks, shots=5, test_shots=5, seed=seed)
    return [default_collate([family[b * tasks + i] for i in range(tasks)]) for b in range(count)]


def _small_module(
    estimator: Estimator | None = None, learner: Learner | None = None, optimizer: Any = None
) -> MetaLearningModule:
    """A complex synapse on a 1-16-1 MLP, a short symmetric contrastive estimator and SGD with lr 0.1; seeded."""
    torch.manual_seed(0)
    return MetaLearningModule(
        learner=learner or ComplexSynapse(MLP(hidden=(16,)), loss="mse", init_lambda=1.0),
        estimator=estimator or Contrastive(beta=0.05, inner_steps=5, nudged_steps=3, inner_lr=0.01),
        optimizer=optimizer or partial(torch.optim.SGD, lr=0.1),
    )


@pytest.fixture
def sinusoid_batches() -> Callable[..., list[Batch]]:
    """``sinusoid_batches(count, tasks=2, seed=0)``: meta-batches of sinusoid tasks, 5 support and 5 query points."""
    return _sinusoid_batches


@pytest.fixture
def small_module() -> Callable[..., MetaLearningModule]:
    """``small_module(estimator=None, learner=None, optimizer=None)``: see :func:`_small_module`."""
    return _small_module


def trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer that logs every step to a CSVLogger in ``tmp_path``."""
    defaults: dict[str, Any] = {
        "logger": CSVLogger(tmp_path),
        "log_every_n_steps": 1,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def read_csv_metrics(directory: Path) -> Logged:
    """What a CSVLogger wrote to ``directory/metrics.csv``: name -> {step: value}."""
    logged: Logged = {}
    with (directory / "metrics.csv").open() as file:
        for row in csv.DictReader(file):
            step = int(row.pop("step"))
            for name, value in row.items():
                if value:
                    logged.setdefault(name, {})[step] = float(value)
    return logged


@pytest.fixture
def fit(tmp_path: Path) -> Callable[..., Logged]:
    """``fit(module, batches, callbacks, ckpt_path=None, directory=tmp_path, **trainer_kwargs)``: train for real on
    ``batches``, in order (one epoch; ``max_steps`` defaults to their number), and return what was logged."""

    def run(
        module: MetaLearningModule,
        batches: list[Batch],
        callbacks: list[pl.Callback],
        ckpt_path: Path | None = None,
        directory: Path = tmp_path,
        **kwargs: Any,
    ) -> Logged:
        run_trainer = trainer(directory, callbacks=callbacks, **{"max_steps": len(batches), **kwargs})
        run_trainer.fit(module, DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
        return read_csv_metrics(Path(run_trainer.logger.log_dir))

    return run
