"""BetaSchedule: the annealed beta is the one training uses, is logged, and survives a checkpoint resume exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_contrastive import MAML, Contrastive, meta_gradient
from lightning_contrastive.callbacks import BetaSchedule


def contrastive(beta: float) -> Contrastive:
    return Contrastive(beta=beta, inner_steps=5, nudged_steps=3, inner_lr=0.01)


def test_linear_and_geometric_schedules_interpolate_and_then_hold() -> None:
    linear, geometric = BetaSchedule(0.1, 0.02, steps=4, kind="linear"), BetaSchedule(0.1, 0.001, steps=4)
    assert [linear.beta(t) for t in range(6)] == pytest.approx([0.1, 0.08, 0.06, 0.04, 0.02, 0.02])
    assert [geometric.beta(t) for t in range(6)] == pytest.approx([0.1, 10**-1.5, 0.01, 10**-2.5, 1e-3, 1e-3])


def test_training_uses_and_logs_the_scheduled_beta(fit, small_module, sinusoid_batches) -> None:
    batches, betas = sinusoid_batches(3), [0.1, 0.1 * 0.1**0.5, 0.01]
    module = small_module(estimator=contrastive(beta=0.5))  # the schedule overrides it from step 0 on

    logged = fit(module, batches, [BetaSchedule(0.1, 0.01, steps=2)])

    assert logged["train/beta"] == pytest.approx(dict(enumerate(betas)))
    assert module.estimator.beta == pytest.approx(0.01)
    replay = small_module()  # the same start, stepped by hand with SGD (lr 0.1) and each step's beta
    for batch, beta in zip(batches, betas, strict=True):
        gradient = meta_gradient(replay.learner, contrastive(beta), batch)
        with torch.no_grad():
            for name, p in replay.learner.named_meta_parameters():
                p -= 0.1 * gradient[name]
    for (name, trained), (_, replayed) in zip(
        module.learner.named_meta_parameters(), replay.learner.named_meta_parameters(), strict=True
    ):
        torch.testing.assert_close(trained, replayed, rtol=1e-4, atol=1e-6, msg=name)


def test_a_resumed_run_continues_with_exactly_the_same_betas_and_weights(
    fit, small_module, sinusoid_batches, tmp_path: Path
) -> None:
    batches = sinusoid_batches(2)  # two meta-steps per epoch: the checkpoint at step 2 closes an epoch
    saved = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_top_k=-1)
    straight = small_module()
    straight_logged = fit(
        straight, batches, [BetaSchedule(0.2, 0.01, steps=3), saved], max_steps=4, enable_checkpointing=True
    )
    checkpoint = tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"
    (applied_step, applied_beta) = torch.load(checkpoint, weights_only=True)["callbacks"]["BetaSchedule"]["applied"]
    assert (applied_step, applied_beta) == (1, pytest.approx(0.2 * 0.05 ** (1 / 3)))

    schedule, resumed = BetaSchedule(0.2, 0.01, steps=3), small_module()
    resumed_logged = fit(
        resumed, batches, [schedule], max_steps=4, ckpt_path=checkpoint, directory=tmp_path / "resumed"
    )

    assert resumed_logged["train/beta"] == {2: straight_logged["train/beta"][2], 3: pytest.approx(0.01)}
    assert schedule.applied == (3, pytest.approx(0.01))
    for (name, p), (_, q) in zip(
        straight.learner.named_meta_parameters(), resumed.learner.named_meta_parameters(), strict=True
    ):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_bad_settings_and_estimators_without_beta_are_refused(fit, small_module, sinusoid_batches) -> None:
    for kwargs, match in (
        ({"start": 0.0, "end": 0.1, "steps": 10}, "start must be > 0"),
        ({"start": 0.1, "end": 0.1, "steps": 0}, "steps must be an integer >= 1"),
        ({"start": 0.1, "end": 0.1, "steps": 10, "kind": "cosine"}, "kind must be"),
    ):
        with pytest.raises(ValueError, match=match):
            BetaSchedule(**kwargs)
    with pytest.raises(MisconfigurationException, match="MAML, which has none"):
        fit(small_module(estimator=MAML(inner_steps=2)), sinusoid_batches(1), [BetaSchedule(0.1, 0.01, steps=5)])
