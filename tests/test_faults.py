"""Faults in the inner loop: NaN or inf in a phase, a nudged phase that diverges, and the stop or skip policy.

Faults are injected into real tasks: a NaN in one task's targets, or one task's query inputs scaled up until
the nudged objective is too steep for the inner step size (the free phase, which does not see the query set,
stays sound).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_contrastive import (
    MAML,
    ComplexSynapse,
    Contrastive,
    Estimator,
    FirstOrderMAML,
    Implicit,
    InnerLoopError,
    InnerSGD,
    MetaLearningModule,
    Reptile,
    estimate,
    meta_gradient,
)
from lightning_contrastive.inner import minimise
from lightning_contrastive.networks import MLP
from lightning_contrastive.tasks import Params, Split, split_batch

Batch = dict[str, tuple[Tensor, Tensor]]
ESTIMATORS = {
    "contrastive": Contrastive(beta=0.1, inner_steps=10, nudged_steps=5, inner_lr=0.005),
    "contrastive-one-sided": Contrastive(beta=0.1, symmetric=False, inner_steps=10, nudged_steps=5, inner_lr=0.005),
    "contrastive-full": Contrastive(beta=0.1, nudge="full", inner_steps=10, nudged_steps=5, inner_lr=0.005),
    "contrastive-full-one-sided": Contrastive(
        beta=0.1, symmetric=False, nudge="full", inner_steps=10, nudged_steps=5, inner_lr=0.005
    ),
    "maml": MAML(inner_steps=5, inner_lr=0.005),
    "first-order-maml": FirstOrderMAML(inner_steps=5, inner_lr=0.005),
    # This ReLU MLP's Hessian is indefinite (Rayleigh quotients below -6 measured): damping keeps the solve sound.
    "implicit": Implicit(inner_steps=5, inner_lr=0.005, cg_steps=3, cg_damping=10.0),
    "reptile": Reptile(inner_steps=5, inner_lr=0.005),
}


def make_learner(estimator: Estimator | None = None) -> ComplexSynapse:
    torch.manual_seed(0)
    return ComplexSynapse(
        MLP(1, (8,), 1).double(), loss="mse", init_lambda=1.0, learn_lambda=not isinstance(estimator, Reptile)
    )


def sinusoid_batch(tasks: int = 3, seed: int = 1) -> Batch:
    """``tasks`` sine regression tasks, 5 support and 5 query points each, in float64."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, 10, 1, generator=generator, dtype=torch.float64) * 10 - 5
    amplitude = torch.rand(tasks, 1, 1, generator=generator, dtype=torch.float64) * 4 + 1
    y = amplitude * torch.sin(x)
    return {"train": (x[:, :5].clone(), y[:, :5].clone()), "test": (x[:, 5:].clone(), y[:, 5:].clone())}


def with_nan_target(batch: Batch, task: int) -> Batch:
    batch["train"][1][task, 0] = math.nan
    return batch


def with_steep_queries(batch: Batch, task: int, scale: float = 30.0) -> Batch:
    """``task``'s query inputs scaled by ``scale``: beta times the query loss's curvature outgrows the step size."""
    batch["test"][0][task] *= scale
    return batch


def without_task(batch: Batch, task: int) -> Batch:
    keep = [i for i in range(len(batch["train"][0])) if i != task]
    return {key: (x[keep], y[keep]) for key, (x, y) in batch.items()}


# ----------------------------------------------------------------------------------------------- the phase flags
def quadratic_phase(curvature: float, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """Plain gradient descent on ``0.5 a phi^2`` from ``phi = 1`` with step size 1: stable iff ``a < 2``."""
    phase = minimise(lambda p: 0.5 * curvature * (p["phi"] ** 2).sum(), {"phi": torch.ones(3)}, steps, InnerSGD(1.0))
    return phase.finite, phase.start_loss, phase.loss


def test_a_phase_flags_nan_and_inf_at_its_end() -> None:
    finite, start_loss, _ = quadratic_phase(curvature=0.5, steps=50)
    assert bool(finite)
    assert float(start_loss) == pytest.approx(0.5 * 0.5 * 3)  # the objective at the start

    finite, _, loss = quadratic_phase(curvature=1e3, steps=50)  # |1 - a| ** 50 overflows float32
    assert not bool(finite) and not math.isfinite(float(loss))


def test_the_flags_are_computed_without_reading_values_on_the_host() -> None:
    """Under ``vmap`` any host read (``.item()``, ``bool(t)``) raises: the flags must come out as batched tensors."""
    curvatures = torch.tensor([0.5, 1e3])

    def phase_finite(curvature: Tensor) -> Tensor:
        return minimise(
            lambda p: 0.5 * curvature * (p["phi"] ** 2).sum(), {"phi": torch.ones(3)}, 50, InnerSGD(1.0)
        ).finite

    assert torch.func.vmap(phase_finite)(curvatures).tolist() == [True, False]


# ------------------------------------------------------------------------------------------- estimate, stop policy
def test_sound_tasks_raise_no_fault() -> None:
    """No false alarm on 25 ordinary tasks with the shipped sinusoid inner settings, whichever path runs them."""
    for batched in (False, True):
        result = estimate(make_learner(), ESTIMATORS["contrastive"], sinusoid_batch(tasks=25), batched=batched)
        assert result.skipped == [] and result.kept == list(range(25))


@pytest.mark.parametrize("name", ESTIMATORS)
def test_nan_in_a_task_stops_with_an_error_naming_the_task_the_phase_and_the_data(name: str) -> None:
    estimator = ESTIMATORS[name]
    learner = make_learner(estimator)
    before = {key: p.detach().clone() for key, p in learner.named_meta_parameters()}
    for batched in (False, True) if estimator.batchable else (False,):
        with pytest.raises(InnerLoopError, match="1 of 3 tasks") as raised:
            estimate(learner, estimator, with_nan_target(sinusoid_batch(), task=1), batched=batched)
        (fault,) = raised.value.faults
        assert (fault.task, fault.phase, fault.bad_data) == (1, "free", ("support y",))
        message = str(raised.value)
        assert "task 1: phase 'free' produced NaN or inf" in message and "support y" in message
        assert "on_inner_fault='skip'" in message  # the way to go on
    assert all(torch.equal(p, before[key]) for key, p in learner.named_meta_parameters())


@pytest.mark.parametrize("name", [name for name in ESTIMATORS if name.startswith("contrastive")])
def test_a_diverging_nudged_phase_is_caught_while_the_free_phase_is_sound(name: str) -> None:
    estimator = ESTIMATORS[name]
    for batched in (False, True):
        with pytest.raises(InnerLoopError) as raised:
            estimate(make_learner(), estimator, with_steep_queries(sinusoid_batch(), task=2), batched=batched)
        (fault,) = raised.value.faults
        assert (fault.task, fault.phase, fault.bad_data) == (2, "nudged_pos", ())
        assert math.isfinite(fault.final_objective)  # caught by the divergence test, before any overflow
        assert "task 2: phase 'nudged_pos' diverged" in str(raised.value)


def test_the_divergence_ratio_sets_how_far_a_nudged_phase_may_move() -> None:
    batch = with_steep_queries(sinusoid_batch(), task=2, scale=3.0)
    lenient = Contrastive(beta=0.1, inner_steps=10, nudged_steps=5, inner_lr=0.005, divergence_ratio=1e6)
    strict = Contrastive(beta=0.1, inner_steps=10, nudged_steps=5, inner_lr=0.005, divergence_ratio=1e-3)
    assert estimate(make_learner(), lenient, batch).skipped == []
    with pytest.raises(InnerLoopError):
        estimate(make_learner(), strict, batch)
    with pytest.raises(ValueError, match="divergence_ratio must be > 0"):
        Contrastive(divergence_ratio=0.0)


class ShiftedLosses(ComplexSynapse):
    """The same learner with constants subtracted from its losses, as a log-likelihood might be: same gradients."""

    def __init__(self, inner_shift: float) -> None:
        super().__init__(MLP(1, (8,), 1).double(), loss="mse", init_lambda=1.0)
        self.inner_shift = inner_shift

    def inner_loss(self, fast: Params, meta: Params, support: Split) -> Tensor:
        return super().inner_loss(fast, meta, support) - self.inner_shift


@pytest.mark.parametrize("nudge", ["linear", "full"])
def test_the_divergence_scale_holds_for_losses_that_cancel_or_go_negative(nudge: str) -> None:
    """Shift ``L_in`` so that ``L_in + beta L_query`` is about 0 at ``phi_0``: a scale of that sum would flag every
    sound nudge; the scale ``|L_in| + beta |L_query|`` flags none, and the estimate is the unshifted one."""
    estimator = Contrastive(beta=0.1, nudge=nudge, inner_steps=10, nudged_steps=5, inner_lr=0.005)
    batch = without_task(without_task(sinusoid_batch(), task=2), task=1)
    torch.manual_seed(0)
    plain = ShiftedLosses(inner_shift=0.0)
    task = split_batch(batch)[0]
    meta = plain.meta_parameters()
    free = estimator.adapt(plain, meta, task.support)
    shift = float(free.loss + 0.1 * plain.query_loss(free.params, meta, task.query))
    shifted = ShiftedLosses(inner_shift=shift)
    shifted.load_state_dict(plain.state_dict())
    result = estimate(shifted, estimator, batch)
    assert result.skipped == []
    torch.testing.assert_close(
        meta_gradient(shifted, estimator, batch), meta_gradient(plain, estimator, batch), rtol=1e-9, atol=1e-12
    )


# ------------------------------------------------------------------------------------------- estimate, skip policy
@pytest.mark.parametrize("name", ["contrastive", "maml", "implicit"])
def test_skip_gives_the_meta_gradient_of_the_sound_tasks(name: str) -> None:
    estimator = ESTIMATORS[name]
    expected = meta_gradient(make_learner(), estimator, without_task(sinusoid_batch(), task=1), batched=False)
    for batched in (False, True) if estimator.batchable else (False,):
        faulty = with_nan_target(sinusoid_batch(), task=1)
        result = estimate(make_learner(), estimator, faulty, batched=batched, on_fault="skip")
        assert result.kept == [0, 2] and [fault.task for fault in result.skipped] == [1]
        actual = meta_gradient(make_learner(), estimator, faulty, batched=batched, on_fault="skip")
        for key, value in expected.items():
            assert torch.isfinite(actual[key]).all()
            torch.testing.assert_close(actual[key], value, rtol=1e-9, atol=1e-12)


def test_skipping_every_task_gives_a_zero_meta_gradient() -> None:
    batch = sinusoid_batch(tasks=2)
    batch["train"][1][:] = math.nan
    gradient = meta_gradient(make_learner(), ESTIMATORS["contrastive"], batch, on_fault="skip")
    assert all(torch.equal(g, torch.zeros_like(g)) for g in gradient.values())


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match='on_fault must be "stop" or "skip"'):
        estimate(make_learner(), ESTIMATORS["contrastive"], sinusoid_batch(), on_fault="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='on_inner_fault must be "stop" or "skip"'):
        MetaLearningModule(make_learner(), ESTIMATORS["contrastive"], on_inner_fault="ignore")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- in a Lightning run
FAULTY_STEP = 3  # the 0-based index of the meta-batch with a diverging task


def faulty_run(batches: int = 5) -> DataLoader:
    """Meta-batches of 3 tasks; the one at ``FAULTY_STEP`` has a task whose nudged phase diverges."""
    episodes = [sinusoid_batch(seed=seed) for seed in range(batches)]
    with_steep_queries(episodes[FAULTY_STEP], task=1)
    return DataLoader(episodes, batch_size=None)


def meta_learner(on_inner_fault: str = "stop") -> MetaLearningModule:
    return MetaLearningModule(
        make_learner(),
        ESTIMATORS["contrastive"],
        optimizer=partial(torch.optim.Adam, lr=0.01),
        on_inner_fault=on_inner_fault,  # type: ignore[arg-type]
    )


def trainer(checkpoints: Path, max_steps: int = 5) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        callbacks=[pl.callbacks.ModelCheckpoint(checkpoints, save_last=True, every_n_train_steps=1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=checkpoints,
    )


def meta_parameters(module: MetaLearningModule) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.learner.named_meta_parameters()}


def test_stop_policy_raises_before_the_step_and_leaves_the_last_checkpoint_intact(tmp_path: Path) -> None:
    module = meta_learner()
    with pytest.raises(InnerLoopError, match="task 1: phase 'nudged_pos' diverged"):
        trainer(tmp_path).fit(module, train_dataloaders=faulty_run())

    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == FAULTY_STEP  # written after the last sound step
    in_memory = meta_parameters(module)  # the failed step applied nothing
    for name, value in in_memory.items():
        assert torch.isfinite(value).all()
        assert torch.equal(checkpoint["state_dict"][f"learner.{name}"], value)

    resumed = meta_learner()  # the run goes on from the checkpoint once the data is sound
    trainer(tmp_path, max_steps=FAULTY_STEP + 1).fit(
        resumed,
        train_dataloaders=DataLoader([sinusoid_batch(seed=9)] * 5, batch_size=None),
        ckpt_path=tmp_path / "last.ckpt",
    )
    assert not torch.equal(meta_parameters(resumed)["omega.layers.0.weight"], in_memory["omega.layers.0.weight"])


def test_skip_policy_trains_on_and_counts_the_skipped_tasks(tmp_path: Path) -> None:
    module = meta_learner("skip")
    run = trainer(tmp_path)
    run.fit(module, train_dataloaders=faulty_run())

    assert run.global_step == 5 and module.skipped_tasks_total == 1
    assert run.callback_metrics["train/skipped_tasks_total"] == 1
    assert all(torch.isfinite(p).all() for p in meta_parameters(module).values())
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["skipped_tasks_total"] == 1


def test_a_batch_whose_tasks_all_fail_makes_no_meta_step(tmp_path: Path) -> None:
    failing = sinusoid_batch()
    failing["train"][1][:] = math.nan
    module = meta_learner("skip")
    trainer(tmp_path, max_steps=1).fit(module, train_dataloaders=DataLoader([sinusoid_batch()], batch_size=None))
    before = meta_parameters(module)

    trainer(tmp_path / "more", max_steps=2).fit(
        module, train_dataloaders=DataLoader([failing], batch_size=None), ckpt_path=tmp_path / "last.ckpt"
    )
    assert module.skipped_tasks_total == 3
    assert all(torch.equal(p, before[name]) for name, p in meta_parameters(module).items())  # Adam moved nothing
