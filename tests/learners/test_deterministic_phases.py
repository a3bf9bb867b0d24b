"""Deterministic phases (issue 16, item 6): train-mode randomness of the user's network never reaches a phase."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_contrastive import ComplexSynapse, Contrastive, DualSystem, meta_gradient
from lightning_contrastive.learners.base import Learner


def primary(dropout: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)  # the same weights with Dropout or without
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), dropout, nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def regression_batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 15, 1, generator=generator) * 10 - 5
    y = 2.0 * torch.sin(x - 0.5)
    return {"train": (x[:, :5], y[:, :5]), "test": (x[:, 5:], y[:, 5:])}


@pytest.mark.parametrize(
    "make_learner",
    [lambda net: ComplexSynapse(net, loss="mse"), lambda net: DualSystem(net, loss="mse")],
    ids=["complex_synapse", "dual_system"],
)
def test_a_dropout_network_gives_the_estimate_of_the_same_network_without_dropout(make_learner) -> None:
    estimator = Contrastive(beta=0.1, inner_steps=5, nudged_steps=3)
    reference: Learner = make_learner(primary(nn.Identity()))
    expected = meta_gradient(reference, estimator, regression_batch(), batched=False)
    learner: Learner = make_learner(primary(nn.Dropout(0.5))).train()  # as Lightning leaves it during fit
    for seed in (1, 2):  # a global seed that would change every Dropout mask
        torch.manual_seed(seed)
        estimate = meta_gradient(learner, estimator, regression_batch(), batched=False)
        for name, value in expected.items():
            torch.testing.assert_close(estimate[name], value, rtol=0, atol=0)
    assert all(module.training for module in learner.modules())  # each call gave the modes back
