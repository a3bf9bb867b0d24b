"""The evaluation protocol's printed results: mean, 95% CI and episode count per metric, at the end of validate/test."""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, default_collate

from lightning_contrastive import ComplexSynapse, Contrastive, MetaLearningModule
from lightning_contrastive.data.sinusoid import SinusoidTasks
from lightning_contrastive.evaluation import MetricSummary, results_table
from lightning_contrastive.networks import MLP


def module_and_episodes() -> tuple[MetaLearningModule, DataLoader]:
    """A small module and 2 batches of 3 sinusoid episodes."""
    torch.manual_seed(0)
    module = MetaLearningModule(
        ComplexSynapse(MLP(hidden=(8,)), loss="mse"),
        Contrastive(beta=0.05, inner_steps=5, nudged_steps=3, inner_lr=0.01),
        optimizer=partial(torch.optim.SGD, lr=0.1),
    )
    family = SinusoidTasks(num_tasks=6, shots=5, test_shots=5, seed=0)
    batches = [default_collate([family[3 * b + i] for i in range(3)]) for b in range(2)]
    return module, DataLoader(batches, batch_size=None)


def trainer(**kwargs: object) -> pl.Trainer:
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, **kwargs)


def test_results_table_aligns_metric_mean_interval_and_episodes() -> None:
    summaries = {
        "test/accuracy": MetricSummary(torch.tensor(0.98766), torch.tensor(0.00432), episodes=600),
        "test/query_loss": MetricSummary(torch.tensor(0.054321), torch.tensor(0.0123), episodes=600),
    }
    assert results_table(summaries).splitlines() == [
        "metric          |    mean | ± 95% CI | episodes",
        "----------------+---------+----------+---------",
        "test/accuracy   |  0.9877 |   0.0043 |      600",
        "test/query_loss | 0.05432 |    0.012 |      600",
    ]


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_validate_and_test_print_the_table_of_what_they_return(stage: str, capsys: pytest.CaptureFixture[str]) -> None:
    module, episodes = module_and_episodes()
    run = trainer()
    (result,) = getattr(run, stage)(module, episodes, verbose=True)
    printed = capsys.readouterr().out
    prefix = "val" if stage == "validate" else "test"
    assert f"Meta-{'validation' if stage == 'validate' else 'test'} results" in printed
    mean, ci95 = result[f"{prefix}/query_loss"], result[f"{prefix}/query_loss_ci95"]
    assert f"{prefix}/query_loss | {mean:.4g} | {ci95:>8.2g} |        6" in printed

    getattr(run, stage)(module, episodes, verbose=False)
    assert "results" not in capsys.readouterr().out


def test_the_validations_inside_fit_print_no_table(capsys: pytest.CaptureFixture[str]) -> None:
    module, episodes = module_and_episodes()
    trainer(max_steps=2, val_check_interval=1).fit(module, episodes, episodes)
    assert "results" not in capsys.readouterr().out
