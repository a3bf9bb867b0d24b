"""Process-wide torch state that a meta-training run borrows and gives back: the CPU threads and the global generator.

Lightning-free: :class:`~lightning_contrastive.MetaLearningModule` (of either Lightning package) calls these from its
hooks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch

CpuThreads = int | Literal["auto"] | None


class ThreadPolicy:
    """torch's intra-op thread count while a run uses the CPU, and the caller's setting given back after.

    ``"auto"``: one thread, unless ``OMP_NUM_THREADS`` is set in the environment, which then decides; an integer:
    that many; ``None``: torch's setting, untouched. Why one: the inner loops are long chains of small operations,
    which extra threads slow down on a loaded CPU: on 2 busy cores a sinusoid MLP meta-step took 2.1-2.3 s with
    torch's default (2 threads) against 0.16-0.29 s with one, a 32-channel Conv4 step 1.7-11 s against 0.4-0.9 s
    (``docs/guide/inner-loop.md``, "CPU threads").
    """

    def __init__(self, cpu_threads: CpuThreads = "auto") -> None:
        if not (cpu_threads in ("auto", None) or (type(cpu_threads) is int and cpu_threads >= 1)):
            raise ValueError(f'cpu_threads must be "auto", None or an integer >= 1; got {cpu_threads!r}.')
        self.cpu_threads = cpu_threads
        self._before: int | None = None

    def apply(self) -> None:
        """Set torch's thread count by the policy, remembering the current one (call only for a run on the CPU)."""
        threads = 1 if self.cpu_threads == "auto" and "OMP_NUM_THREADS" not in os.environ else self.cpu_threads
        if isinstance(threads, int):
            self._before = torch.get_num_threads()
            torch.set_num_threads(threads)

    def restore(self) -> None:
        """Give torch back the thread count it had before :meth:`apply`, if that changed it."""
        if self._before is not None:
            torch.set_num_threads(self._before)
            self._before = None


@contextmanager
def seeded_by_position(epoch: int, batch_idx: int, rank: int, device: torch.device) -> Iterator[None]:
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
