"""Bad settings and malformed batches raise ``ValueError`` early, with a message naming the problem."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_contrastive import (
    MAML,
    ComplexSynapse,
    Contrastive,
    FirstOrderMAML,
    Implicit,
    InnerSGD,
    Reptile,
    Task,
    meta_gradient,
)
from lightning_contrastive.estimators.base import TaskEstimate
from lightning_contrastive.inner import minimise
from lightning_contrastive.learners.base import Learner
from lightning_contrastive.losses import get_loss
from lightning_contrastive.tasks import Params

CLASSES, FEATURES = 3, 4


def classification_batch(tasks: int = 2, support: int = 6, query: int = 9) -> dict[str, Any]:
    return {
        "train": (torch.randn(tasks, support, FEATURES), torch.randint(0, CLASSES, (tasks, support))),
        "test": (torch.randn(tasks, query, FEATURES), torch.randint(0, CLASSES, (tasks, query))),
    }


def classifier() -> ComplexSynapse:
    return ComplexSynapse(nn.Linear(FEATURES, CLASSES))


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: Contrastive(beta=0.0), "beta must be > 0"),
        (lambda: Contrastive(beta=-0.1), "beta must be > 0"),
        (lambda: Contrastive(beta=True), "beta must be > 0"),
        (lambda: Contrastive(inner_steps=0), "inner_steps must be an integer >= 1"),
        (lambda: Contrastive(nudged_steps=-3), "nudged_steps must be an integer >= 1"),
        (lambda: Contrastive(inner_steps=2.5), "inner_steps must be an integer >= 1"),
        (lambda: Contrastive(inner_lr=0.0), "inner learning rate must be > 0"),
        (lambda: Contrastive(nudged_lr=-1.0), "inner learning rate must be > 0"),
        (lambda: Contrastive(inner_momentum=1.0), "momentum must lie in [0, 1)"),
        (lambda: MAML(inner_steps=0), "inner_steps must be an integer >= 1"),
        (lambda: FirstOrderMAML(inner_steps=True), "inner_steps must be an integer >= 1"),
        (lambda: Reptile(inner_steps=0), "inner_steps must be an integer >= 1"),
        (lambda: Implicit(cg_steps=0), "cg_steps must be an integer >= 1"),
        (lambda: Implicit(cg_damping=-1e-3), "cg_damping must be >= 0"),
        (lambda: InnerSGD(lr=-0.1), "inner learning rate must be > 0"),
        (lambda: minimise(lambda p: p["x"].sum(), {"x": torch.zeros(1)}, 0, InnerSGD(0.1)), "steps must be"),
        (lambda: ComplexSynapse(nn.Linear(2, 2), init_lambda=0.0), "init_lambda must be > 0"),
        (lambda: ComplexSynapse(nn.Linear(2, 2), init_lambda=-1.0), "init_lambda must be > 0"),
        (lambda: ComplexSynapse(nn.Linear(2, 2), loss="hinge"), "Unknown loss 'hinge'"),
        (lambda: get_loss("l1"), "Unknown loss"),
    ],
)
def test_bad_settings_are_rejected_at_construction(make: Callable[[], object], words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        make()


def drop(batch: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != key}


def replace(batch: dict[str, Any], key: str, index: int, value: torch.Tensor) -> dict[str, Any]:
    pair = list(batch[key])
    pair[index] = value
    return {**batch, key: tuple(pair)}


def regression_batch(target_shape: tuple[int, ...]) -> dict[str, Any]:
    return {
        "train": (torch.randn(2, 5, FEATURES), torch.randn(*target_shape)),
        "test": (torch.randn(2, 5, FEATURES), torch.randn(*target_shape)),
    }


GOOD = classification_batch()
MALFORMED_BATCHES = {
    "missing train": (drop(GOOD, "train"), "got ['test']"),
    "missing test": (drop(GOOD, "test"), "got ['train']"),
    "not a mapping": ([GOOD["train"], GOOD["test"]], 'must be a mapping with keys "train" (support set)'),
    "not a pair": ({**GOOD, "train": GOOD["train"][0]}, 'batch["train"] must be an (x, y) pair'),
    "no task dimension": (
        {**GOOD, "test": (GOOD["test"][0][0], GOOD["test"][1][0])},
        "needs a leading task dimension",
    ),
    "targets per input": (replace(GOOD, "train", 1, GOOD["train"][1][:, :-1]), "exactly one target"),
    "task counts": (
        replace(replace(GOOD, "test", 0, GOOD["test"][0][:1]), "test", 1, GOOD["test"][1][:1]),
        'batch["train"] holds 2 tasks but batch["test"] holds 1',
    ),
    "feature shapes": (replace(GOOD, "test", 0, torch.randn(2, 9, FEATURES + 1)), "Support and query sets disagree"),
    "label dtypes": (replace(GOOD, "test", 1, GOOD["test"][1].int()), "Support and query sets disagree"),
    "label out of range": (replace(GOOD, "test", 1, torch.full((2, 9), CLASSES)), "labels must lie in [0, 2]"),
    "negative label": (replace(GOOD, "train", 1, torch.full((2, 6), -1)), "support set: labels range over [-1, -1]"),
    "float labels": (
        replace(replace(GOOD, "train", 1, GOOD["train"][1].float()), "test", 1, GOOD["test"][1].float()),
        "cross_entropy needs integer class labels",
    ),
}


@pytest.mark.parametrize(("batch", "words"), MALFORMED_BATCHES.values(), ids=MALFORMED_BATCHES.keys())
def test_malformed_classification_batches_are_rejected(batch: Any, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        meta_gradient(classifier(), FirstOrderMAML(inner_steps=1), batch)


@pytest.mark.parametrize("target_shape", [(2, 5), (2, 5, 3)], ids=["no output dim", "too many outputs"])
def test_regression_targets_must_match_the_network_output(target_shape: tuple[int, ...]) -> None:
    learner = ComplexSynapse(nn.Linear(FEATURES, 1), loss="mse")
    with pytest.raises(ValueError, match=re.escape("mse needs targets shaped like the network's output (5, 1)")):
        meta_gradient(learner, MAML(inner_steps=1), regression_batch(target_shape))


def test_reptile_refuses_learned_strengths() -> None:
    with pytest.raises(
        ValueError, match=r"Reptile is defined only .* meta-learns lambda\.weight, lambda\.bias.*learn_lambda=False"
    ):
        meta_gradient(classifier(), Reptile(inner_steps=1), GOOD)


class CountingMAML(FirstOrderMAML):
    """First-order MAML that records how many tasks it adapted to."""

    def __init__(self) -> None:
        super().__init__(inner_steps=1)
        self.tasks_run = 0

    def task_estimate(self, learner: Learner, meta: Params, task: Task) -> TaskEstimate:
        self.tasks_run += 1
        return super().task_estimate(learner, meta, task)


def test_a_bad_last_task_is_caught_before_any_inner_loop_runs() -> None:
    batch = classification_batch(tasks=3)
    batch["test"][1][2, 0] = CLASSES  # only the last task's query set is bad
    estimator = CountingMAML()
    with pytest.raises(ValueError, match="query set: labels range over"):
        meta_gradient(classifier(), estimator, batch)
    assert estimator.tasks_run == 0
