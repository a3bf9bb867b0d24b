"""What the learner tests share: every test starts from the same state of torch's global generator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def seeded_torch() -> Iterator[None]:
    """Seed torch's global generator before each test, and give the previous state back after.

    Networks built without a generator (``nn.Linear``, ``nn.Conv2d``) draw their weights from it, and torch 2.13
    seeds it differently in every process (``torch.initial_seed()`` changes from run to run): unseeded, such a test
    meets a different network on every run, and an assertion that holds for most networks fails on some runs.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield
