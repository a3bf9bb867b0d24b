"""The solvability diagnostic (``benchmarks/diagnostics/solvability.py``): its solvers on problems with known
solutions, its evaluation count, and its table, end to end on real Omniglot tasks in quick mode."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from lightning_contrastive import InnerSGD
from lightning_contrastive.inner import minimise

REPOSITORY = Path(__file__).resolve().parents[1]
solvability = importlib.import_module("benchmarks.diagnostics.solvability")
solvers = importlib.import_module("benchmarks.diagnostics.solvers")
omniglot_root = importlib.import_module("benchmarks").omniglot_root
Cell, Problem, run = solvability.Cell, solvability.Problem, solvability.run
solve, curvature_extremes = solvers.solve, solvers.curvature_extremes
markdown, summarise = solvability.markdown, solvability.summarise

OMNIGLOT = omniglot_root()


def quadratic(eigenvalues: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` with the given spectrum in a random basis, and a vector ``b``, in float64."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(
        torch.randn(len(eigenvalues), len(eigenvalues), generator=generator, dtype=torch.float64)
    )
    matrix = basis @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ basis.T
    return matrix, torch.randn(len(eigenvalues), generator=generator, dtype=torch.float64)


MATRIX, VECTOR = quadratic(torch.logspace(0, 2, 30).tolist())  # condition number 100, L = 100


def ridge(x: torch.Tensor) -> torch.Tensor:
    """``x^T A x / 2 - b^T x``: minimised at ``A^-1 b``."""
    return 0.5 * x @ MATRIX @ x - VECTOR @ x


def test_lbfgs_reaches_a_tiny_residual_at_the_closed_form_solution() -> None:
    """Under 100 evaluations, line search included, where gradient descent at ``1/L`` would need about 1400."""
    trace = solve(ridge, torch.zeros(30, dtype=torch.float64), solvers.lbfgs(), 150)
    reached = trace.evaluations_to(1e-6)
    assert reached is not None and reached < 100
    assert trace.late_drift(torch.zeros(30, dtype=torch.float64)) < 1e-4  # settled in the first half of the budget
    assert trace.last_point is not None
    torch.testing.assert_close(trace.last_point, torch.linalg.solve(MATRIX, VECTOR), rtol=1e-5, atol=1e-6)


def test_nesterov_with_restart_converges_linearly_on_a_strongly_convex_problem() -> None:
    """At ``lr = 1/L`` the restarted method needs ``O(sqrt(kappa) log(1/eps))`` steps; plain gradient descent at the
    same rate would need ``kappa log(1/eps)``, about 1400 for 1e-6 here."""
    trace = solve(ridge, torch.zeros(30, dtype=torch.float64), solvers.nesterov_restart(0.01), 400)
    reached = trace.evaluations_to(1e-6)
    assert reached is not None and reached < 400


def test_momentum_sgd_is_the_librarys_inner_loop() -> None:
    """After ``n`` evaluations the last point is ``minimise``'s after ``n - 1`` steps of the same ``InnerSGD``."""
    start = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    trace = solve(ridge, start, solvers.momentum_sgd(0.01, 0.9), 25)
    phase = minimise(lambda params: ridge(params["x"]), {"x": start}, 24, InnerSGD(0.01, 0.9))
    assert trace.last_point is not None
    torch.testing.assert_close(trace.last_point, phase.params["x"])


@pytest.mark.parametrize("name", list(solvers.SOLVERS))
def test_every_solver_spends_exactly_its_budget(name: str) -> None:
    trace = solve(ridge, torch.zeros(30, dtype=torch.float64), solvers.SOLVERS[name], 37)
    assert len(trace.residuals) == len(trace.losses) == len(trace.seconds) == 37
    assert trace.residuals[0] == pytest.approx(float(VECTOR.norm()))


def test_a_change_of_coordinates_keeps_the_residual_in_the_fast_weights() -> None:
    """Solving in ``z`` with ``phi = start + scale * z`` reaches the same minimiser, and the residual recorded is
    the gradient norm in ``phi`` (at the start, ``||b||`` whatever the scale)."""
    scale = torch.linspace(0.5, 3.0, 30, dtype=torch.float64)
    trace = solve(ridge, torch.zeros(30, dtype=torch.float64), solvers.lbfgs(), 300, scale)
    assert trace.residuals[0] == pytest.approx(float(VECTOR.norm()))
    assert trace.evaluations_to(1e-6) is not None
    assert trace.last_point is not None  # within residual / smallest eigenvalue of the solution
    torch.testing.assert_close(trace.last_point, torch.linalg.solve(MATRIX, VECTOR), rtol=0, atol=1e-5)


def test_curvature_extremes_find_both_ends_of_an_indefinite_spectrum() -> None:
    matrix, _ = quadratic([-3.0, *torch.linspace(0.5, 10.0, 19).tolist()])
    low, high = curvature_extremes(lambda x: 0.5 * x @ matrix @ x, torch.zeros(20, dtype=torch.float64), 300)
    assert low == pytest.approx(-3.0, rel=1e-3)
    assert high == pytest.approx(10.0, rel=1e-3)


def test_the_table_reports_evaluations_to_each_tolerance() -> None:
    problem = Problem(ridge, torch.zeros(30, dtype=torch.float64), torch.ones(30, dtype=torch.float64), lambda x: 1.0)
    records = [
        {"cell": Cell("untrained", "quadratic", "reference", solver).key(), "curvature": (1.0, 100.0)}
        | run(Cell("untrained", "quadratic", "reference", solver), problem, 100)
        for solver in ("lbfgs", "adam-0.001")
    ]
    lines = markdown(summarise(records)).splitlines()
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(columns, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]
    assert [row["solver"] for row in rows] == ["lbfgs", "adam-0.001"]
    assert int(rows[0]["evals to 0.001"]) < 100
    assert rows[1]["evals to 0.001"] == "-"  # Adam at lr 1e-3 moves 0.1 per 100 steps at most: far from A^-1 b


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"no Omniglot archives at {OMNIGLOT}")
def test_quick_mode_runs_every_solver_and_remedy_on_real_tasks_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "records.jsonl"
    arguments = ["--quick", "--root", str(OMNIGLOT), "--out", str(out), "--cache", str(tmp_path)]
    table = solvability.main(arguments)
    lines = table.splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    cells = {(row[1], row[2], row[3], row[4]) for row in rows}
    assert {("batch-relu", "reference", solver, "float32") for solver in solvers.SOLVERS} <= cells
    assert {("batch-relu", "own-scale", "lbfgs", "float32"), ("none-relu", "reference", "lbfgs", "float32")} <= cells
    assert ("batch-relu", "reference", "lbfgs", "float64") in cells
    assert all(len(row) == len(lines[0].strip("|").split("|")) for row in rows)
    written = out.read_text().splitlines()
    assert solvability.main(arguments) == table  # a second run finds every record and reruns nothing
    assert out.read_text().splitlines() == written
