"""The contrastive rule with phases that stop when solved: ``Contrastive(tolerance=...)``.

The estimate's error for phases solved to a gradient norm ``delta`` is predicted as ``O(delta / beta) + O(beta^2)``
(symmetric rule). On the float64 complex-synapse logistic regression of ``test_beta_scaling.py`` (a smooth,
non-quadratic inner problem with an exact meta-gradient from Newton's method and the implicit function theorem) both
terms are read off as least-squares slopes of the log error.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from lightning_contrastive import ComplexSynapse, Contrastive, Implicit, meta_gradient
from lightning_contrastive.data.sinusoid import SinusoidTasks
from lightning_contrastive.inner import joint_norm
from lightning_contrastive.module import MetaLearningModule
from lightning_contrastive.tasks import Split, Task

_spec = importlib.util.spec_from_file_location("beta_scaling", Path(__file__).resolve().parent / "test_beta_scaling.py")
beta_scaling = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(beta_scaling)  # type: ignore[union-attr]

CAP = 5000  # generous: every phase here stops on its tolerance long before


Problem = tuple[ComplexSynapse, dict, torch.Tensor]


class Unresolved(Contrastive):
    """The rule without its nudge resolution: every phase stops at the tolerance alone, so the nudged phases'
    residual is the tolerance, whose effect on the estimate the law below isolates."""

    NUDGE_RESOLUTION = math.inf


def relative_error(beta: float, tolerance: float, problem: Problem) -> float:
    return relative_error_and_steps(Unresolved, beta, tolerance, problem)[0]


def relative_error_and_steps(
    rule: type[Contrastive], beta: float, tolerance: float, problem: Problem
) -> tuple[float, dict[str, int]]:
    """The estimate's relative error to the exact meta-gradient, and the steps of the first task's phases."""
    learner, batch, exact = problem
    estimator = rule(beta=beta, inner_steps=CAP, nudged_steps=CAP, inner_lr=0.1, tolerance=tolerance)
    found = flatten(meta_gradient(learner, estimator, batch))
    steps = estimator.task_estimate(learner, dict(learner.named_meta_parameters()), first_task(batch)).steps
    return float((found - exact).norm() / exact.norm()), {name: int(count) for name, count in steps.items()}


def flatten(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """The meta-gradient as one vector ``[omega, log_lambda]``, in the order of the exact one."""
    names = beta_scaling.names(grads)
    return torch.cat([grads[f"{kind}.{name}"].flatten() for kind in ("omega", "lambda") for name in names])


def first_task(batch: dict) -> Task:
    (xs, ys), (xq, yq) = batch["train"], batch["test"]
    return Task(Split(xs[0], ys[0]), Split(xq[0], yq[0]))


def slope(xs: tuple[float, ...], errors: list[float]) -> float:
    return beta_scaling.log_log_slope(xs, errors)


@pytest.fixture(scope="module")
def logistic() -> Problem:
    return beta_scaling.logistic()


def test_the_error_grows_like_the_tolerance_over_beta(logistic: Problem) -> None:
    tolerances = (1e-3, 1e-4, 1e-5, 1e-6)
    by_tolerance = [relative_error(0.01, tolerance, logistic) for tolerance in tolerances]
    # Measured 1.06e-1, 1.43e-2, 1.34e-3, 1.57e-4: slope 0.97 in delta at beta 0.01 (the bias is 1.8e-6 there).
    assert slope(tolerances, by_tolerance) == pytest.approx(1.0, abs=0.15), by_tolerance
    betas = (0.03, 0.01, 0.003)
    by_beta = [relative_error(beta, 1e-4, logistic) for beta in betas]
    # Measured 4.9e-3, 1.4e-2, ...: at a loose tolerance the delta / beta term dominates, slope -1 in beta.
    assert slope(betas, by_beta) == pytest.approx(-1.0, abs=0.2), by_beta


def test_at_a_tight_tolerance_only_the_beta_squared_bias_is_left(logistic: Problem) -> None:
    betas = (0.1, 0.03, 0.01)
    found = [relative_error(beta, 1e-9, logistic) for beta in betas]
    # Measured 1.85e-4, 1.66e-5, 1.84e-6: slope 2.0, the symmetric rule's bias.
    assert slope(betas, found) == pytest.approx(2.0, abs=0.15), found


def test_phases_report_their_steps_and_residuals_and_adapt_stops_by_the_same_rule(logistic: Problem) -> None:
    learner, batch, _ = logistic
    estimator = Contrastive(beta=0.01, inner_steps=CAP, nudged_steps=CAP, inner_lr=0.1, tolerance=1e-6)
    meta = dict(learner.named_meta_parameters())
    task = first_task(batch)
    result = estimator.task_estimate(learner, meta, task)
    assert set(result.steps) == {"free", "nudged_pos", "nudged_neg"}
    for phase in result.steps:
        assert bool(result.solved[phase]) and float(result.residuals[phase]) <= 1e-6
        assert 0 < int(result.steps[phase]) < CAP
    # A nudged phase starts O(beta) from its solution: it needs fewer steps than the free one.
    assert int(result.steps["nudged_pos"]) < int(result.steps["free"])
    adapted = estimator.adapt(learner, meta, task.support)
    assert bool(adapted.solved) and int(adapted.steps) == int(result.steps["free"])


def smooth_learner() -> ComplexSynapse:
    """A tanh network on sinusoid tasks: its phases reach small residuals (a ReLU one's gradient jumps at the kinks,
    and momentum SGD on it stalls at residuals around 0.1 on some tasks: measured 4 of 6 at 2000 steps)."""
    torch.manual_seed(0)
    return ComplexSynapse(nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)), loss="mse", init_lambda=1.0)


def sinusoid_batch(tasks: int, seed: int = 0) -> dict:
    family = SinusoidTasks(num_tasks=tasks, shots=5, test_shots=5, seed=seed)
    return default_collate([family[i] for i in range(tasks)])


def test_vmapped_tasks_stopping_at_different_steps_equal_the_loop() -> None:
    learner = smooth_learner().double()
    estimator = Contrastive(beta=0.05, inner_steps=400, nudged_steps=200, inner_lr=0.02, tolerance=1e-5)
    batch = {key: tuple(t.double() for t in value) for key, value in sinusoid_batch(4).items()}
    looped = meta_gradient(learner, estimator, batch, batched=False)
    vmapped = meta_gradient(learner, estimator, batch, batched=True)
    for name in looped:
        torch.testing.assert_close(vmapped[name], looped[name], rtol=1e-9, atol=1e-12)


def test_tolerance_is_checked_and_refuses_a_subsampled_nudge() -> None:
    with pytest.raises(ValueError, match="tolerance must be None"):
        Contrastive(tolerance=0.0)
    with pytest.raises(ValueError, match="tolerance and query_subsample do not go together"):
        Contrastive(nudge="full", query_subsample=4, tolerance=1e-4)


def fit_one_epoch(estimator: Contrastive, batches: int) -> pl.Trainer:
    module = MetaLearningModule(smooth_learner(), estimator)
    data = DataLoader([sinusoid_batch(3, seed=b) for b in range(batches)], batch_size=None)
    run = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    run.fit(module, data)
    return run


def test_training_logs_steps_and_residuals_and_warns_once_when_phases_end_unsolved() -> None:
    unreachable = Contrastive(beta=0.05, inner_steps=5, nudged_steps=3, inner_lr=0.01, tolerance=1e-9)
    with pytest.warns(UserWarning, match=r"inner phases \(100%\) reached their step cap") as caught:
        run = fit_one_epoch(unreachable, batches=4)
    assert sum("reached their step cap" in str(w.message) for w in caught) == 1
    logged = run.logged_metrics
    assert float(logged["inner/unsolved"]) == 1.0
    assert float(logged["inner/free_steps"]) == 5 and float(logged["inner/nudged_neg_steps_max"]) == 3
    assert float(logged["inner/free_residual"]) > 1e-9

    reachable = Contrastive(beta=0.05, inner_steps=2000, nudged_steps=2000, inner_lr=0.02, tolerance=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = fit_one_epoch(reachable, batches=4)  # 24 nudged phases: over the warning's minimum of 20
    assert not any("reached their step cap" in str(w.message) for w in caught)
    logged = run.logged_metrics
    assert float(logged["inner/unsolved"]) == 0.0 and float(logged["inner/free_residual_max"]) <= 1e-2
    assert 0 < float(logged["inner/nudged_pos_steps"]) < float(logged["inner/free_steps"]) < 2000
    assert math.isfinite(float(logged["train/query_loss"]))
    assert not any("nudged phases" in str(w.message) for w in caught)  # beta 0.05 moves them beyond 1e-2


@pytest.mark.parametrize("tolerance", [1e-1, 1e-2])
@pytest.mark.parametrize("beta", [1e-2, 1e-3])
def test_the_nudged_phases_resolve_a_nudge_smaller_than_the_tolerance(
    logistic: Problem, tolerance: float, beta: float
) -> None:
    """At a tolerance above the nudge (``beta |dL_query/dphi|``) the nudged phases start within it: stopped on the
    tolerance alone they take no step, and the estimate loses its contrastive term (relative error 0.72-1.0
    measured). Stopped also at NUDGE_RESOLUTION of the nudge they resolve it whatever the tolerance (0.7-8%
    measured), even from a free phase stopped after 4 steps at 0.1: its residual enters only at second order."""
    resolved, steps = relative_error_and_steps(Contrastive, beta, tolerance, logistic)
    assert resolved < Contrastive.NUDGE_RESOLUTION and min(steps["nudged_pos"], steps["nudged_neg"]) > 10
    unresolved, steps = relative_error_and_steps(Unresolved, beta, tolerance, logistic)
    assert unresolved > 0.5 and max(steps["nudged_pos"], steps["nudged_neg"]) <= 2


@pytest.mark.parametrize("nudge", ["linear", "full"])
def test_cancelling_the_free_residual_gives_the_implicit_gradient_where_the_free_phase_stopped(
    logistic: Problem, nudge: str
) -> None:
    """A free phase stopped unsolved (3 steps, residual 0.25). With ``cancel_free_residual`` the nudged phases
    solved to 1e-8 give Implicit's estimate at the same ``phi_0`` (relative difference 2.5e-6 measured: the beta^2
    bias), where the paper's rule, whose nudged phases finish the free solve, differs from it by 5.7%. Stopped at
    the nudge resolution (tolerance 0.1) they take 34 steps instead of 96 (measured)."""
    learner, batch, _ = logistic
    at_free_end = flatten(meta_gradient(learner, Implicit(inner_steps=3, inner_lr=0.1, cg_steps=200), batch))

    def estimate(cancel: bool, tolerance: float) -> tuple[torch.Tensor, dict[str, int]]:
        rule = Contrastive(
            beta=0.01,
            inner_steps=3,
            nudged_steps=CAP,
            inner_lr=0.1,
            nudge=nudge,
            tolerance=tolerance,
            cancel_free_residual=cancel,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the free phase ends unsolved by design
            found = flatten(meta_gradient(learner, rule, batch))
        steps = rule.task_estimate(learner, dict(learner.named_meta_parameters()), first_task(batch)).steps
        return (found - at_free_end).norm() / at_free_end.norm(), {name: int(n) for name, n in steps.items()}

    cancelled, _ = estimate(True, 1e-8)
    paper, _ = estimate(False, 1e-8)
    assert cancelled < 1e-4 and paper > 1e-2, (cancelled, paper)
    _, cancelled_steps = estimate(True, 0.1)
    _, paper_steps = estimate(False, 0.1)
    assert cancelled_steps["free"] == paper_steps["free"] == 3
    assert 2 * cancelled_steps["nudged_pos"] < paper_steps["nudged_pos"], (cancelled_steps, paper_steps)


@pytest.mark.parametrize("nudge", ["linear", "full"])
def test_with_the_free_residual_cancelled_each_nudged_objective_starts_at_exactly_its_nudge(
    logistic: Problem, nudge: str
) -> None:
    """At ``phi_0`` either nudge's objective has gradient ``r + beta g`` (``r`` the free phase's residual, ``g``
    the query gradient); with ``r`` cancelled it is ``beta g``, what :class:`InnerLoopMonitor` then shows."""
    learner, batch, _ = logistic
    meta, task = dict(learner.named_meta_parameters()), first_task(batch)
    rule = Contrastive(beta=0.01, inner_steps=3, inner_lr=0.1, nudge=nudge, cancel_free_residual=True)
    origin = rule.adapt(learner, meta, task.support).params
    detached = {name: p.detach() for name, p in meta.items()}
    residual = torch.func.grad(lambda phi: learner.inner_loss(phi, detached, task.support))(origin)
    query = torch.func.grad(lambda phi: learner.query_loss(phi, detached, task.query))(origin)
    for name, objective in rule.nudged_objectives(learner, meta, task, origin).items():
        sign = 1.0 if name == "nudged_pos" else -1.0
        gradient = torch.func.grad(objective)(origin)
        for key in origin:
            torch.testing.assert_close(gradient[key], sign * 0.01 * query[key], rtol=1e-10, atol=1e-12)
    assert float(joint_norm(residual.values())) > 0.1  # a residual was cancelled


def test_implicit_stops_its_inner_phase_by_the_same_rule(logistic: Problem) -> None:
    learner, batch, exact = logistic
    for tolerance, bound in ((1e-3, 1e-1), (1e-9, 1e-7)):
        estimator = Implicit(inner_steps=CAP, inner_lr=0.1, cg_steps=40, tolerance=tolerance)
        found = flatten(meta_gradient(learner, estimator, batch))
        assert float((found - exact).norm() / exact.norm()) < bound
    result = estimator.task_estimate(learner, dict(learner.named_meta_parameters()), first_task(batch))
    assert bool(result.solved["free"]) and 0 < int(result.steps["free"]) < CAP
    with pytest.raises(ValueError, match="tolerance must be None"):
        Implicit(tolerance=-1.0)


def test_training_metrics_of_an_estimator_that_reports_no_phases() -> None:
    """A custom estimator may build its TaskEstimate by hand, with no steps, residuals or solved flags."""
    from lightning_contrastive.estimation import MetaEstimate
    from lightning_contrastive.estimators.base import TaskEstimate
    from lightning_contrastive.evaluation import training_metrics, unsolved_phases

    learner = smooth_learner()
    meta = dict(learner.named_meta_parameters())
    task = Task(Split(torch.randn(5, 1), torch.randn(5, 1)), Split(torch.randn(5, 1), torch.randn(5, 1)))
    fast = learner.init_fast(meta)
    by_hand = TaskEstimate(learner.query_loss(fast, meta, task.query), fast, {"free": torch.tensor(1.0)})
    result = MetaEstimate(by_hand.surrogate, [by_hand], [0], [], [task])
    metrics = training_metrics(learner, Contrastive(tolerance=1e-3), result)
    assert set(metrics) == {"train/query_loss", "inner/free"} and unsolved_phases(result).numel() == 0
