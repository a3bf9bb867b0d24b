"""The gradient-quality study (``python -m benchmarks.gradient_quality``) in its quick form: the exact meta-gradient
is right, and each estimator approaches it as theory says."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, Path, dict]:
    benchmark = importlib.import_module("benchmarks.gradient_quality")
    out = tmp_path_factory.mktemp("gradient_quality")
    path = benchmark.run(out, quick=True, figure=out / "gradient_quality.png")
    return benchmark, path, json.loads(path.read_text())


def test_the_exact_gradient_is_exact(quick_run: tuple[ModuleType, Path, dict]) -> None:
    _, _, results = quick_run
    assert results["exact"]["hessian_positive_definite"]
    assert max(results["exact"]["inner_gradient_norm_per_task"]) < 1e-10
    assert results["finite_difference_check"]["relative_error"] < 1e-5


def test_contrastive_bias_shrinks_like_beta_and_beta_squared(quick_run: tuple[ModuleType, Path, dict]) -> None:
    _, _, results = quick_run
    sweep = results["beta_sweep"]
    smallest = sweep["betas"].index(min(sweep["betas"]))
    for prefix in ("", "linear_"):  # the full nudge, then the linear one
        one_sided, symmetric = f"{prefix}one_sided", f"{prefix}symmetric"
        assert 0.8 < sweep[f"{one_sided}_slope"] < 1.2 and 1.8 < sweep[f"{symmetric}_slope"] < 2.2
        for rule in (one_sided, symmetric):
            assert sweep[rule][smallest]["cosine"] > 0.99
        assert sweep[symmetric][smallest]["relative_error"] < sweep[one_sided][smallest]["relative_error"]


def test_estimators_against_inner_steps(quick_run: tuple[ModuleType, Path, dict]) -> None:
    _, _, results = quick_run
    rows = results["steps_sweep"]["rows"]
    maml = [row["relative_error"] for row in rows["maml"]]
    assert maml == sorted(maml, reverse=True) and maml[-1] < 1e-3  # the truncated loop approaches the solution
    for method in ("implicit", "contrastive_symmetric", "contrastive_linear_symmetric"):
        assert rows[method][-1]["cosine"] > 0.99
    # First-order MAML and Reptile are biased whatever the steps: their error stays large.
    assert rows["first_order_maml"][-1]["relative_error"] > 0.1 and rows["reptile"][-1]["cosine"] < 0.99
    assert "learn_lambda=False" in results["steps_sweep"]["reptile_refused_with_learned_strengths"]


def test_the_report_and_figure(quick_run: tuple[ModuleType, Path, dict]) -> None:
    benchmark, path, results = quick_run
    text = benchmark.report(path)
    assert "python -m benchmarks.gradient_quality --out DIR" in text and "positive definite: True" in text
    assert f"{results['beta_sweep']['symmetric_slope']:.2f}" in text
    assert (path.parent / "gradient_quality.png").stat().st_size > 10_000
