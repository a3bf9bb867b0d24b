"""The sinusoid task family: torchmeta's batch format, the task distribution, and seeding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_contrastive.data.sinusoid import SinusoidDataModule, SinusoidTasks
from lightning_contrastive.tasks import split_batch


def first_batch(loader: torch.utils.data.DataLoader) -> dict[str, tuple[Tensor, Tensor]]:
    return next(iter(loader))


def fit_sinusoid(x: Tensor, y: Tensor) -> tuple[float, float, Tensor]:
    """Least-squares ``y = a sin x + b cos x`` = ``A sin(x - p)``: returns ``A``, ``p`` and the residuals."""
    features = torch.cat([x.sin(), x.cos()], dim=-1).double()
    solution = torch.linalg.lstsq(features, y.double()).solution
    a, b = solution.flatten().tolist()
    return math.hypot(a, b), math.atan2(-b, a), y.double() - features @ solution


def test_batches_have_torchmeta_format() -> None:
    data = SinusoidDataModule(shots=5, test_shots=7, batch_size=3, eval_batch_size=4, num_eval_tasks=10)
    train = first_batch(data.train_dataloader())
    assert set(train) == {"train", "test"}
    (xs, ys), (xq, yq) = train["train"], train["test"]
    assert xs.shape == ys.shape == (3, 5, 1) and xq.shape == yq.shape == (3, 7, 1)
    assert xs.dtype == ys.dtype == torch.float32
    assert len(split_batch(train)) == 3
    val = first_batch(data.val_dataloader())
    assert val["train"][0].shape == (4, 5, 1) and val["test"][0].shape == (4, 7, 1)
    assert sum(len(batch["train"][0]) for batch in data.test_dataloader()) == 10


def test_tasks_are_sinusoids_with_amplitude_phase_and_inputs_in_range() -> None:
    tasks = SinusoidTasks(num_tasks=50, shots=10, test_shots=10, seed=3)
    amplitudes, phases = [], []
    for episode in tasks:
        x = torch.cat([episode["train"][0], episode["test"][0]])
        y = torch.cat([episode["train"][1], episode["test"][1]])
        assert x.min() >= -5 and x.max() <= 5
        amplitude, phase, residual = fit_sinusoid(x, y)
        assert residual.abs().max() < 1e-5  # support and query lie on one noiseless sinusoid
        amplitudes.append(amplitude)
        phases.append(phase)
    assert min(amplitudes) >= 0.1 - 1e-4 and max(amplitudes) <= 5 + 1e-4
    assert min(phases) >= -1e-4 and max(phases) <= math.pi + 1e-4
    assert max(amplitudes) - min(amplitudes) > 3 and max(phases) - min(phases) > 2  # spread over the ranges


def test_noise_has_the_requested_standard_deviation() -> None:
    tasks = SinusoidTasks(num_tasks=20, shots=200, test_shots=1, seed=0, noise_std=0.3)
    residuals = torch.cat([fit_sinusoid(*episode["train"])[2] for episode in tasks])
    assert residuals.std().item() == pytest.approx(0.3, rel=0.1)


def test_task_sets_are_fixed_by_the_seed_and_distinct_across_splits() -> None:
    data, same, other = (SinusoidDataModule(batch_size=4, num_eval_tasks=8, seed=seed) for seed in (0, 0, 1))

    def x(loader: torch.utils.data.DataLoader) -> Tensor:
        return first_batch(loader)["train"][0]

    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        torch.testing.assert_close(x(getattr(data, loader)()), x(getattr(same, loader)()))
        assert not torch.equal(x(getattr(data, loader)()), x(getattr(other, loader)()))
    assert not torch.equal(x(data.val_dataloader()), x(data.test_dataloader()))
    assert not torch.equal(x(data.train_dataloader()), x(data.val_dataloader()))
    # Evaluation sets are identical every epoch; the training stream is reshuffled.
    torch.testing.assert_close(x(data.val_dataloader()), x(data.val_dataloader()))
    train = data.train_dataloader()
    assert not torch.equal(x(train), x(train))


def test_predict_set_reuses_test_supports_with_query_inputs_on_a_grid() -> None:
    data = SinusoidDataModule(shots=5, noise_std=0.1, num_predict_tasks=3, predict_points=50, eval_batch_size=3)
    predict, test = first_batch(data.predict_dataloader()), first_batch(data.test_dataloader())
    torch.testing.assert_close(predict["train"], test["train"])
    torch.testing.assert_close(predict["test"][0], torch.linspace(-5, 5, 50).view(1, 50, 1).expand(3, 50, 1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shots": 0}, "shots must be an integer >= 1"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"num_eval_tasks": 0}, "num_tasks must be an integer >= 1"),
        ({"amplitude_range": (5.0, 0.1)}, "amplitude_range"),
        ({"input_range": (1.0, 1.0)}, "input_range"),
        ({"noise_std": -0.1}, "noise_std must be >= 0"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SinusoidDataModule(**kwargs)
