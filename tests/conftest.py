"""Session-wide test settings: one intra-op thread, and every test starts from the same state of torch's generator."""

from collections.abc import Iterator

import pytest
import torch

# The tests use tiny tensors, for which torch's intra-op threads cost more than they save (up to
# 10x slower when the 2 CI cores are busy): one thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)


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
