"""The lockstep L-BFGS inner solver, ``InnerLBFGS``: on problems with known solutions, under ``vmap``, and wired into
the estimators whose phases are solves (``Contrastive(solver="lbfgs")``, ``Implicit(solver="lbfgs")``)."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lightning_contrastive import MAML, Contrastive, Implicit, InnerLBFGS, InnerSGD, meta_gradient
from lightning_contrastive.cli import MetaLearningCLI
from lightning_contrastive.inner import CHECK_EVERY, minimise
from lightning_contrastive.tasks import Params, Split, Task

_spec = importlib.util.spec_from_file_location(
    "beta_scaling", Path(__file__).resolve().parent / "estimators" / "test_beta_scaling.py"
)
beta_scaling = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(beta_scaling)  # type: ignore[union-attr]

DIMENSION = 40


def ill_conditioned(seed: int, condition: float = 100.0) -> tuple[Tensor, Tensor]:
    """A float64 SPD matrix with eigenvalues spread from 1 to ``condition`` (random eigenvectors), and a target."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(DIMENSION, DIMENSION, generator=generator, dtype=torch.float64))
    spectrum = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), DIMENSION, dtype=torch.float64)
    return basis @ torch.diag(spectrum) @ basis.T, torch.randn(DIMENSION, generator=generator, dtype=torch.float64)


def quadratic(hessian: Tensor, target: Tensor) -> Callable[[Params], Tensor]:
    """``x -> 1/2 (x - t)^T H (x - t)``: minimum ``t``, gradient ``H (x - t)``, ``1``-strongly convex here."""

    def objective(params: Params) -> Tensor:
        gap = params["x"] - target
        return 0.5 * gap @ (hessian @ gap)

    return objective


def counted(objective: Callable[[Params], Tensor]) -> tuple[Callable[[Params], Tensor], list[float]]:
    """``objective`` and the list of every value it returned, in order."""
    values: list[float] = []

    def recorded(params: Params) -> Tensor:
        value = objective(params)
        values.append(float(value.detach()))
        return value

    return recorded, values


def origin() -> Params:
    return {"x": torch.zeros(DIMENSION, dtype=torch.float64)}


def test_lbfgs_reaches_a_tolerance_in_fewer_evaluations_than_momentum_sgd_at_its_best() -> None:
    hessian, target = ill_conditioned(0)
    objective, values = counted(quadratic(hessian, target))
    solved = minimise(objective, origin(), 2000, InnerLBFGS(lr=0.01), tolerance=1e-8)
    assert bool(solved.solved) and float(solved.residual) <= 1e-8
    assert float((solved.params["x"] - target).norm()) <= 1e-8  # residual / smallest curvature (1)
    # Evaluations: the phase's count, and the objective's, stop within one host-check period of it.
    assert int(solved.steps) <= len(values) < int(solved.steps) + CHECK_EVERY
    # Momentum SGD at its best stable rate for curvatures up to 100 (lr 0.01, momentum 0.9).
    sgd = minimise(quadratic(hessian, target), origin(), 2000, InnerSGD(0.01, 0.9), tolerance=1e-8)
    assert bool(sgd.solved)
    # Measured: 116 L-BFGS evaluations against 437 SGD ones (condition number 100, 40 dimensions; heavy ball near its
    # optimal momentum for this conditioning, so this is SGD at its best on a quadratic).
    assert int(solved.steps) * 3 < int(sgd.steps), (int(solved.steps), int(sgd.steps))


def test_the_cap_counts_evaluations_and_is_never_exceeded() -> None:
    hessian, target = ill_conditioned(1, condition=1e4)
    objective, values = counted(quadratic(hessian, target))
    phase = minimise(objective, origin(), 25, InnerLBFGS(lr=0.01), tolerance=1e-12)
    assert len(values) == 25 and int(phase.steps) == 25 and not bool(phase.solved)
    fixed = minimise(quadratic(hessian, target), origin(), 25, InnerLBFGS(lr=0.01))  # no tolerance: the same run
    torch.testing.assert_close(phase.params, fixed.params, rtol=0, atol=0)
    assert int(fixed.steps) == 25 and float(fixed.residual) == pytest.approx(float(phase.residual), rel=1e-12)


def test_accepted_points_never_raise_the_objective() -> None:
    """Armijo: each base point is no worse than the last, though trials (rejected ones) may be."""
    hessian, target = ill_conditioned(2, condition=1e3)
    losses = []
    for steps in range(1, 60):
        phase = minimise(quadratic(hessian, target), origin(), steps, InnerLBFGS(lr=1.0))  # lr 1: first trial rejected
        losses.append(float(phase.loss))
        torch.testing.assert_close(phase.loss, quadratic(hessian, target)(phase.params), rtol=1e-12, atol=0)
    assert all(later <= earlier for earlier, later in itertools.pairwise(losses))
    assert losses[1] == losses[0]  # the first trial, a step of lr 1 against curvature up to 1000, was rejected
    assert losses[-1] < 1e-4 * losses[0]  # measured 4e-5 after 59 evaluations


def test_a_start_that_is_solved_or_not_finite_is_reported_as_such() -> None:
    """A solved start stops after its one evaluation, where it is; a NaN start is never accepted, so it is neither
    finite nor solved, and its residual is NaN, as momentum SGD reports it."""
    hessian, target = ill_conditioned(3)
    at_minimum = {"x": target.clone()}
    phase = minimise(quadratic(hessian, target), at_minimum, 50, InnerLBFGS(lr=0.01), tolerance=1e-8)
    assert bool(phase.solved) and int(phase.steps) == 1 and torch.equal(phase.params["x"], target)
    broken = {"x": torch.full((DIMENSION,), math.nan, dtype=torch.float64)}
    for optimizer in (InnerLBFGS(lr=0.01), InnerSGD(0.01, 0.9)):
        phase = minimise(quadratic(hessian, target), broken, 20, optimizer, tolerance=1e-8)
        assert not bool(phase.solved) and not bool(phase.finite) and math.isnan(float(phase.residual)), optimizer
        assert int(phase.steps) == 20


def test_vmapped_tasks_stopping_at_different_evaluations_equal_the_loop() -> None:
    """Diagonal quadratics, whose objective is elementwise work and one sum, so that vmapped and looped evaluations
    round alike: every decision agrees, and so do the points, to the last bit."""
    generator = torch.Generator().manual_seed(3)
    curvatures = torch.stack(
        [
            torch.logspace(0, exponent, DIMENSION, dtype=torch.float64)[torch.randperm(DIMENSION, generator=generator)]
            for exponent in (1.0, 2.0, 3.0)
        ]
    )
    targets = torch.randn(3, DIMENSION, generator=generator, dtype=torch.float64)

    def solve(curvature: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        objective = lambda params: 0.5 * (curvature * (params["x"] - target).square()).sum()  # noqa: E731
        phase = minimise(objective, origin(), 600, InnerLBFGS(lr=0.01), tolerance=1e-9)
        return phase.params["x"], phase.steps, phase.residual, phase.solved

    vmapped = torch.vmap(solve)(curvatures, targets)
    looped = [solve(c, t) for c, t in zip(curvatures, targets, strict=True)]
    for index, (x, steps, residual, solved) in enumerate(looped):
        assert bool(solved) and int(vmapped[1][index]) == int(steps)
        torch.testing.assert_close(vmapped[0][index], x, rtol=0, atol=0)
        torch.testing.assert_close(vmapped[2][index], residual, rtol=0, atol=0)
    assert len(set(vmapped[1].tolist())) == 3, vmapped[1]  # each task stopped at its own evaluation count


def test_a_solved_task_stays_where_it_was_solved_while_the_others_go_on() -> None:
    easy, hard = ill_conditioned(6, 2.0), ill_conditioned(7, 1e3)
    alone = minimise(quadratic(*easy), origin(), 300, InnerLBFGS(lr=0.1), tolerance=1e-6)

    def solve(hessian: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        phase = minimise(quadratic(hessian, target), origin(), 300, InnerLBFGS(lr=0.1), tolerance=1e-6)
        return phase.params["x"], phase.steps

    points, steps = torch.vmap(solve)(torch.stack([easy[0], hard[0]]), torch.stack([easy[1], hard[1]]))
    assert int(steps[0]) == int(alone.steps) < int(steps[1])
    # Frozen at the point it was solved at (up to the rounding of a batched matrix product), though the batch went on.
    torch.testing.assert_close(points[0], alone.params["x"], rtol=1e-12, atol=1e-15)


def test_lbfgs_is_first_order_only_and_checks_its_settings() -> None:
    hessian, target = ill_conditioned(0)
    with pytest.raises(ValueError, match="InnerLBFGS is first-order only"):
        minimise(quadratic(hessian, target), origin(), 5, InnerLBFGS(lr=0.1), differentiable=True)
    for bad, message in (
        (lambda: InnerLBFGS(lr=0.0), "initial step lr must be > 0"),
        (lambda: InnerLBFGS(lr=0.1, history=0), "history must be an integer >= 1"),
        (lambda: InnerLBFGS(lr=0.1, history=2.5), "history must be an integer >= 1"),  # type: ignore[arg-type]
        (lambda: InnerLBFGS(lr=0.1, armijo=1.0), "Armijo constant must lie in"),
        (lambda: Contrastive(solver="newton"), 'solver must be "sgd"'),  # type: ignore[arg-type]
        (lambda: Implicit(solver="adam"), 'solver must be "sgd"'),  # type: ignore[arg-type]
        (lambda: Contrastive(solver="lbfgs", nudge="full", query_subsample=2), "query_subsample do not go together"),
        (lambda: Implicit(solver="lbfgs", inner_momentum=1.5), "momentum must lie in"),  # ignored, still checked
    ):
        with pytest.raises(ValueError, match=message):
            bad()
    mixed = {"x": torch.zeros(2), "y": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(ValueError, match="share one dtype and device"):
        minimise(lambda p: p["x"].sum() + p["y"].sum(), mixed, 3, InnerLBFGS(lr=0.1))
    with pytest.raises(TypeError):
        MAML(solver="lbfgs")  # type: ignore[call-arg]  # MAML's objective is the SGD trajectory


@pytest.fixture(scope="module")
def logistic() -> tuple:
    return beta_scaling.logistic()


def relative_error(found: dict[str, Tensor], exact: Tensor) -> float:
    names = beta_scaling.names(found)
    flat = torch.cat([found[f"{kind}.{name}"].flatten() for kind in ("omega", "lambda") for name in names])
    return float((flat - exact).norm() / exact.norm())


def test_estimates_solved_by_lbfgs_match_the_implicit_gradient_and_the_sgd_solved_ones(logistic: tuple) -> None:
    """On the float64 logistic regression of ``test_beta_scaling.py`` (exact meta-gradient from Newton's method and
    the implicit function theorem), phases solved to 1e-9 by either solver give the same estimate, up to the
    ``O(delta / beta)`` of two solutions 1e-9 apart, and both sit at the symmetric rule's ``O(beta^2)`` bias."""
    learner, batch, exact = logistic
    settings = {"beta": 0.01, "inner_steps": 5000, "nudged_steps": 5000, "inner_lr": 0.1, "tolerance": 1e-9}
    by_lbfgs = meta_gradient(learner, Contrastive(**settings, solver="lbfgs"), batch)
    by_sgd = meta_gradient(learner, Contrastive(**settings), batch)
    # Measured 1.84e-6 for both: the bias at beta 0.01 (test_tolerance.py).
    assert relative_error(by_lbfgs, exact) < 3e-6
    for name in by_sgd:
        torch.testing.assert_close(by_lbfgs[name], by_sgd[name], rtol=1e-5, atol=1e-9)
    implicit = meta_gradient(learner, Implicit(inner_steps=5000, inner_lr=0.1, tolerance=1e-9, solver="lbfgs"), batch)
    assert relative_error(implicit, exact) < 1e-7


def test_the_solver_reaches_every_phase_and_uses_far_fewer_evaluations(logistic: tuple) -> None:
    learner, batch, _ = logistic
    meta = dict(learner.named_meta_parameters())
    (support_x, support_y), (query_x, query_y) = batch["train"], batch["test"]
    task = Task(Split(support_x[0], support_y[0]), Split(query_x[0], query_y[0]))
    settings = {"beta": 0.01, "inner_steps": 5000, "inner_lr": 0.1, "nudged_lr": 0.05, "tolerance": 1e-7}
    lbfgs, sgd = Contrastive(**settings, solver="lbfgs"), Contrastive(**settings)
    assert isinstance(lbfgs.inner_optimizer, InnerLBFGS) and lbfgs.inner_optimizer.lr == 0.1
    assert isinstance(lbfgs.nudged_optimizer, InnerLBFGS) and lbfgs.nudged_optimizer.lr == 0.05
    by_lbfgs, by_sgd = lbfgs.task_estimate(learner, meta, task), sgd.task_estimate(learner, meta, task)
    for phase in ("free", "nudged_pos", "nudged_neg"):
        assert bool(by_lbfgs.solved[phase]) and float(by_lbfgs.residuals[phase]) <= 1e-7
        # Measured: 13 / 11 / 11 L-BFGS evaluations against 281 / 189 / 200 SGD steps (free / nudged +- beta).
        assert int(by_lbfgs.steps[phase]) * 10 < int(by_sgd.steps[phase]), phase
    assert int(lbfgs.adapt(learner, meta, task.support).steps) == int(by_lbfgs.steps["free"])
    printed = repr(lbfgs)
    assert "solver='lbfgs'" in printed and "InnerLBFGS(lr=0.1" in printed


def test_the_solver_is_set_from_the_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-contrastive"])
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "sinusoid" / "contrastive.yaml"
    arguments = [f"--config={config}", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    estimator = MetaLearningCLI(
        args=[*arguments, "--model.estimator.init_args.solver=lbfgs"], run=False
    ).model.estimator
    assert isinstance(estimator, Contrastive) and estimator.solver == "lbfgs"
    assert isinstance(estimator.inner_optimizer, InnerLBFGS) and isinstance(estimator.nudged_optimizer, InnerLBFGS)
    with pytest.raises(SystemExit):  # jsonargparse refuses a name outside the Literal before building anything
        MetaLearningCLI(args=[*arguments, "--model.estimator.init_args.solver=newton"], run=False)
