"""LearningCurve: points on the fixed test episodes along meta-training, a training clock without them, a budget."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_contrastive.callbacks.learning_curve import LearningCurve
from lightning_contrastive.data import SinusoidDataModule


def data(eval_tasks: int = 20) -> SinusoidDataModule:
    return SinusoidDataModule(shots=5, test_shots=5, batch_size=2, num_eval_tasks=eval_tasks, eval_batch_size=10)


def trainer(tmp_path: Path, callbacks: list[pl.Callback], max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )


def test_points_at_the_start_every_n_steps_and_the_end_equal_trainer_test(small_module, tmp_path: Path) -> None:
    curve = LearningCurve(every_n_steps=2)
    module, datamodule = small_module(), data()
    run = trainer(tmp_path, [curve], max_steps=5)
    run.fit(module, datamodule)
    assert [point.meta_step for point in curve.points] == [0, 2, 4, 5]
    assert all(point.episodes == 20 for point in curve.points)
    seconds = [point.train_seconds for point in curve.points]
    assert seconds == sorted(seconds) and seconds[0] < seconds[1]
    assert curve.points[0].metrics != curve.points[-1].metrics  # meta-training moved the metric
    (tested,) = run.test(module, datamodule, verbose=False)
    for name, value in curve.points[-1].metrics.items():
        assert value == pytest.approx(tested[f"test/{name}"], rel=1e-6), name


def test_meta_training_is_the_same_with_and_without_the_curve(small_module, tmp_path: Path) -> None:
    trained = []
    for callbacks in ([], [LearningCurve(every_n_steps=1)]):
        module = small_module()
        trainer(tmp_path, callbacks, max_steps=4).fit(module, data())
        trained.append({name: p.detach().clone() for name, p in module.learner.named_meta_parameters()})
    for name, value in trained[0].items():
        assert torch.equal(value, trained[1][name]), name


def test_a_training_time_budget_stops_meta_training_and_excludes_the_evaluations(small_module, tmp_path: Path) -> None:
    tiny = LearningCurve(every_n_steps=100, max_train_seconds=1e-6, clock="cpu")
    run = trainer(tmp_path, [tiny], max_steps=50)
    run.fit(small_module(), data())
    assert run.global_step == 1 and [point.meta_step for point in tiny.points] == [0, 1]
    # 400 evaluation episodes cost far more CPU time than the budget: counted, they would stop training at step 1.
    budget = 1.0  # several meta-steps even on a loaded machine (a step took up to 0.1 CPU s under contention)
    curve = LearningCurve(every_seconds=0.25, max_train_seconds=budget, clock="cpu")
    run = trainer(tmp_path, [curve], max_steps=10_000)
    before = time.process_time()
    run.fit(small_module(), data(eval_tasks=400))
    uncounted = time.process_time() - before - curve.points[-1].train_cpu_seconds  # the evaluations, set-up
    assert uncounted > budget and run.global_step > 3
    assert curve.points[-1].train_cpu_seconds >= budget and curve.points[-2].train_cpu_seconds < budget
    assert 0 < run.global_step < 10_000


def test_a_resumed_run_continues_its_curve_and_its_clock(small_module, tmp_path: Path) -> None:
    first = LearningCurve(every_n_steps=2)
    run = trainer(tmp_path, [first], max_steps=3)
    run.fit(small_module(), data())
    run.save_checkpoint(tmp_path / "step3.ckpt")
    resumed = LearningCurve(every_n_steps=2)
    trainer(tmp_path, [resumed], max_steps=5).fit(small_module(), data(), ckpt_path=tmp_path / "step3.ckpt")
    assert [point.meta_step for point in resumed.points] == [0, 2, 3, 4, 5]
    assert resumed.points[:3] == first.points
    assert resumed.points[3].train_seconds > first.points[-1].train_seconds


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "needs every_n_steps or every_seconds"),
        ({"every_n_steps": 0}, "every_n_steps must be an integer >= 1"),
        ({"every_seconds": -1.0}, "every_seconds must be a number of seconds > 0"),
        ({"every_n_steps": 5, "max_train_seconds": float("nan")}, "max_train_seconds must be a number of seconds > 0"),
        ({"every_n_steps": 5, "clock": "gpu"}, 'clock must be "wall" or "cpu"'),
        ({"every_n_steps": 5, "episodes": "train"}, 'episodes must be "test" or "val"'),
    ],
)
def test_bad_settings_raise(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LearningCurve(**settings)
