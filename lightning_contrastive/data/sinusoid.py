"""Sinusoid regression (Finn et al., 2017), the standard toy task family of few-shot meta-learning.

A task is ``y = A sin(x - p)`` with amplitude ``A ~ U[0.1, 5]``, phase ``p ~ U[0, pi]`` and inputs
``x ~ U[-5, 5]``; it shows ``shots`` support points and is scored on ``test_shots`` query points.
Argument names follow torchmeta's ``torchmeta.toy.helpers.sinusoid``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_contrastive.data.episodic import MetaBatchDataModule

Episode = dict[str, tuple[Tensor, Tensor]]
Range = tuple[float, float]

_TRAIN_STREAM, _VAL_STREAM, _TEST_STREAM = 0, 1, 2


class SinusoidTasks(Dataset[Episode]):
    """``num_tasks`` sinusoid tasks; task ``i`` is a fixed function of ``(seed, stream, i)``.

    Each item is one episode ``{"train": (x, y), "test": (x, y)}`` with ``x``, ``y`` of shape
    ``(shots, 1)`` and ``(test_shots, 1)``; the default collate stacks a batch of them into torchmeta's
    ``(tasks, examples, 1)`` format. Every task draws from its own ``numpy`` generator seeded with
    ``(seed, stream, i)`` (independent streams by ``SeedSequence``), so an episode does not depend on
    which worker loads it, in which order, or how many tasks were drawn before it.

    Args:
        num_tasks: number of tasks.
        shots: support points per task.
        test_shots: query points per task.
        seed: the seed of the task family.
        stream: separates task sets that share a seed (train, validation, test).
        amplitude_range: ``A`` is uniform on this interval.
        phase_range: ``p`` is uniform on this interval.
        input_range: support and query inputs are uniform on this interval.
        noise_std: standard deviation of Gaussian noise added to every target.
        query_on_grid: place the query inputs evenly over ``input_range`` instead of at random (for
            plotting the adapted function); the support points are the same either way.
    """

    def __init__(
        self,
        num_tasks: int,
        shots: int,
        test_shots: int,
        seed: int,
        stream: int = _TRAIN_STREAM,
        amplitude_range: Range = (0.1, 5.0),
        phase_range: Range = (0.0, math.pi),
        input_range: Range = (-5.0, 5.0),
        noise_std: float = 0.0,
        query_on_grid: bool = False,
    ) -> None:
        for name, count in (("num_tasks", num_tasks), ("shots", shots), ("test_shots", test_shots)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {count!r}.")
        for name, (low, high) in (("amplitude_range", amplitude_range), ("phase_range", phase_range)):
            if not low <= high:
                raise ValueError(f"{name} must be (low, high) with low <= high; got {(low, high)}.")
        if not input_range[0] < input_range[1]:
            raise ValueError(f"input_range must be (low, high) with low < high; got {tuple(input_range)}.")
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0; got {noise_std}.")
        self.num_tasks = num_tasks
        self.shots = shots
        self.test_shots = test_shots
        self.seed = seed
        self.stream = stream
        self.amplitude_range = amplitude_range
        self.phase_range = phase_range
        self.input_range = input_range
        self.noise_std = noise_std
        self.query_on_grid = query_on_grid

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, index: int) -> Episode:
        if not 0 <= index < self.num_tasks:
            raise IndexError(f"Task index {index} out of range for {self.num_tasks} tasks.")
        rng = np.random.default_rng((self.seed, self.stream, index))
        amplitude = rng.uniform(*self.amplitude_range)
        phase = rng.uniform(*self.phase_range)

        def split(x: np.ndarray) -> tuple[Tensor, Tensor]:
            y = amplitude * np.sin(x - phase) + self.noise_std * rng.standard_normal(x.shape)
            return torch.from_numpy(x).float(), torch.from_numpy(y).float()

        # The support set is drawn first, so it does not depend on how the query set is chosen.
        support = split(rng.uniform(*self.input_range, size=(self.shots, 1)))
        if self.query_on_grid:
            x_query = np.linspace(*self.input_range, self.test_shots).reshape(-1, 1)
        else:
            x_query = rng.uniform(*self.input_range, size=(self.test_shots, 1))
        return {"train": support, "test": split(x_query)}


class SinusoidDataModule(MetaBatchDataModule):
    """Seeded sinusoid episodes in torchmeta's batch format: ``x``, ``y`` of shape ``(batch_size, shots, 1)``.

    - fit: ``num_train_tasks`` seeded training tasks (a fresh task per episode in practice), in an order
      reshuffled every epoch and fixed by ``seed`` and the epoch; validation: a fixed set of
      ``num_eval_tasks`` tasks;
    - test: another fixed set of ``num_eval_tasks`` tasks, disjoint from the validation set;
    - predict: the first ``num_predict_tasks`` test tasks, with ``predict_points`` query inputs evenly
      spaced over ``input_range`` (to plot the adapted functions).

    Under DDP each process loads a distinct share of every meta-batch and of the evaluation tasks, and
    a run resumed from a mid-epoch checkpoint sees the same tasks as one never interrupted
    (:class:`~lightning_contrastive.data.episodic.MetaBatchDataModule`).

    Args:
        shots: support points per task (K).
        test_shots: query points per task.
        batch_size: tasks per meta-batch in training, over all processes (a multiple of their number).
        eval_batch_size: tasks per batch in validation, test and predict, per process; ``None`` uses
            ``batch_size``.
        num_train_tasks: size of the training task set.
        num_eval_tasks: size of each of the validation and test task sets (600 is the usual protocol).
        num_predict_tasks: tasks in the predict set.
        predict_points: query inputs per predict task.
        amplitude_range: task amplitudes are uniform on this interval.
        phase_range: task phases are uniform on this interval.
        input_range: inputs are uniform on this interval.
        noise_std: standard deviation of Gaussian noise on the targets.
        seed: fixes every task set.
        num_workers: data loader worker processes (tasks are cheap to generate: 0 is usually fastest).
    """

    def __init__(
        self,
        shots: int = 10,
        test_shots: int = 10,
        batch_size: int = 25,
        eval_batch_size: int | None = None,
        num_train_tasks: int = 1_000_000,
        num_eval_tasks: int = 600,
        num_predict_tasks: int = 10,
        predict_points: int = 100,
        amplitude_range: Range = (0.1, 5.0),
        phase_range: Range = (0.0, math.pi),
        input_range: Range = (-5.0, 5.0),
        noise_std: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.save_hyperparameters()
        self.seed = seed
        family = {
            "shots": shots,
            "seed": seed,
            "amplitude_range": tuple(amplitude_range),
            "phase_range": tuple(phase_range),
            "input_range": tuple(input_range),
            "noise_std": noise_std,
        }
        # Built here (they are lazy) so that bad arguments fail at construction, not at the first batch.
        self.train_tasks = SinusoidTasks(num_train_tasks, test_shots=test_shots, stream=_TRAIN_STREAM, **family)
        self.val_tasks = SinusoidTasks(num_eval_tasks, test_shots=test_shots, stream=_VAL_STREAM, **family)
        self.test_tasks = SinusoidTasks(num_eval_tasks, test_shots=test_shots, stream=_TEST_STREAM, **family)
        self.predict_tasks = SinusoidTasks(
            num_predict_tasks, test_shots=predict_points, stream=_TEST_STREAM, query_on_grid=True, **family
        )

    def train_dataloader(self) -> DataLoader[Episode]:
        return self.train_loader(self.train_tasks, len(self.train_tasks), fresh_per_epoch=False, shuffle_seed=self.seed)

    def val_dataloader(self) -> DataLoader[Episode]:
        return self.eval_loader(self.val_tasks, len(self.val_tasks))

    def test_dataloader(self) -> DataLoader[Episode]:
        return self.eval_loader(self.test_tasks, len(self.test_tasks))

    def predict_dataloader(self) -> DataLoader[Episode]:
        return self.eval_loader(self.predict_tasks, len(self.predict_tasks))
