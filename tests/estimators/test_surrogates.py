"""Each estimator's meta-gradient on the complex synapse equals its equation, evaluated by an independent reference.

The reference (``tests/references.py``) writes out the network, the inner loss and its own heavy-ball phases; here
``dL_in/domega = -lambda (phi - omega)`` and ``dL_in/dlog_lambda = lambda (phi - omega)^2 / 2`` are explicit, so the
contrastive, implicit and Reptile estimates are per-synapse formulas at the reference's phases, and query gradients
come from autograd on the written-out network at fixed fast weights. Small float64 MLP, cross-entropy, unconverged
phases (the identities hold at any step count), so agreement is to float64 rounding.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_contrastive import ComplexSynapse, Contrastive, FirstOrderMAML, Implicit, Reptile
from lightning_contrastive import meta_gradient as compute_meta_gradient

_spec = importlib.util.spec_from_file_location("references", Path(__file__).resolve().parents[1] / "references.py")
references = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(references)  # type: ignore[union-attr]
Params = dict[str, Tensor]

LR, MOMENTUM, FREE_STEPS, NUDGED_STEPS, BETA = 0.1, 0.9, 20, 10, 0.1
LAYERS = ["0", "2"]
NAMES = [f"{layer}.{kind}" for layer in LAYERS for kind in ("weight", "bias")]


def make_problem(learn_lambda: bool = True) -> tuple[ComplexSynapse, dict[str, tuple[Tensor, Tensor]]]:
    torch.manual_seed(4)
    network = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    learner = ComplexSynapse(network, loss="cross_entropy", init_lambda=1.0, learn_lambda=learn_lambda)
    if learn_lambda:
        with torch.no_grad():
            for log_strength in learner.get_submodule("lambda").parameters():
                log_strength.uniform_(-0.5, 0.5)
    xs, xq = torch.randn(1, 9, 3, dtype=torch.float64), torch.randn(1, 12, 3, dtype=torch.float64)
    return learner, {"train": (xs, torch.randint(0, 3, (1, 9))), "test": (xq, torch.randint(0, 3, (1, 12)))}


def written_out(learner: ComplexSynapse, batch: dict) -> references.Problem:
    task = (batch["train"][0][0], batch["train"][1][0], batch["test"][0][0], batch["test"][1][0])
    strength = None if learner.learn_lambda else learner.init_lambda
    network = lambda weights, x: references.mlp(weights, x, LAYERS, torch.tanh)  # noqa: E731
    return references.complex_synapse(network, NAMES, task, "cross_entropy", strength)


def theta(learner: ComplexSynapse) -> Params:
    return {name: p.detach() for name, p in learner.meta_parameters().items()}


def free_phase(learner: ComplexSynapse, problem: references.Problem, steps: int = FREE_STEPS) -> Params:
    meta = theta(learner)
    return references.heavy_ball(lambda phi: problem.inner(phi, meta), problem.start(meta), steps, LR, MOMENTUM)


def nudged_phase(
    learner: ComplexSynapse,
    problem: references.Problem,
    start: Params,
    pull: Params | None,
    beta: float,
    lr: float = LR,
) -> Params:
    """``NUDGED_STEPS`` from ``start`` on ``L_in + beta L_query`` (no pull) or ``L_in + beta <pull, phi - start>``."""
    meta = theta(learner)

    def objective(phi: Params) -> Tensor:
        if pull is None:
            return problem.inner(phi, meta) + beta * problem.query(phi, meta)
        return problem.inner(phi, meta) + beta * sum((pull[n] * (phi[n] - start[n])).sum() for n in phi)

    return references.heavy_ball(objective, start, NUDGED_STEPS, lr, MOMENTUM)


def regulariser_gradient(learner: ComplexSynapse, fast: Params) -> Params:
    """``dR/dtheta`` at ``fast``, explicitly: ``-lambda (phi - omega)`` and ``lambda (phi - omega)^2 / 2``."""
    meta = theta(learner)
    grads = {}
    for name in NAMES:
        strength, offset = meta[f"lambda.{name}"].exp(), fast[name] - meta[f"omega.{name}"]
        grads[f"omega.{name}"] = -strength * offset
        grads[f"lambda.{name}"] = 0.5 * strength * offset.square()
    return grads


def query_gradient(learner: ComplexSynapse, problem: references.Problem, fast: Params) -> Params:
    """``dL_query/dphi`` at fixed ``fast``."""
    leaves = {name: p.clone().requires_grad_() for name, p in fast.items()}
    return references.gradient(problem.query(leaves, theta(learner)), leaves)


def assert_gradients_equal(actual: Params, expected: Params) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)  # same names, shapes, dtypes and values


@pytest.mark.parametrize("nudge", ["full", "linear"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-sided", "symmetric"])
def test_contrastive_gradient_is_the_difference_of_phase_gradients(symmetric: bool, nudge: str) -> None:
    """One-sided ``g = [dL_in/dtheta(phi_beta) - dL_in/dtheta(phi_0)] / beta``, symmetric
    ``g = [dL_in/dtheta(phi_beta) - dL_in/dtheta(phi_-beta)] / (2 beta)``: the query loss of the complex synapse
    does not depend on ``theta``, so both nudges differentiate only the regulariser (and the linear nudge's direct
    term is zero). The nudges differ in the phases: ``L_in + beta L_query`` or ``L_in + beta <g_q, phi - phi_0>``.
    """
    learner, batch = make_problem()
    problem = written_out(learner, batch)
    free = free_phase(learner, problem)
    pull = query_gradient(learner, problem, free) if nudge == "linear" else None
    plus = regulariser_gradient(learner, nudged_phase(learner, problem, free, pull, BETA))
    if symmetric:
        minus = regulariser_gradient(learner, nudged_phase(learner, problem, free, pull, -BETA))
        expected = {name: (plus[name] - minus[name]) / (2 * BETA) for name in plus}
    else:
        base = regulariser_gradient(learner, free)
        expected = {name: (plus[name] - base[name]) / BETA for name in plus}
    estimator = Contrastive(
        beta=BETA, symmetric=symmetric, inner_steps=FREE_STEPS, nudged_steps=NUDGED_STEPS, nudge=nudge, inner_lr=LR,
        inner_momentum=MOMENTUM,
    )  # fmt: skip
    assert_gradients_equal(compute_meta_gradient(learner, estimator, batch), expected)


@pytest.mark.parametrize("nudge", ["full", "linear"])
def test_contrastive_nudged_lr_drives_the_nudged_phases(nudge: str) -> None:
    learner, batch = make_problem()
    problem = written_out(learner, batch)
    free = free_phase(learner, problem)
    pull = query_gradient(learner, problem, free) if nudge == "linear" else None
    nudged = nudged_phase(learner, problem, free, pull, BETA, lr=0.02)
    plus, base = regulariser_gradient(learner, nudged), regulariser_gradient(learner, free)
    expected = {name: (plus[name] - base[name]) / BETA for name in plus}
    estimator = Contrastive(
        beta=BETA, symmetric=False, inner_steps=FREE_STEPS, nudged_steps=NUDGED_STEPS, nudge=nudge, inner_lr=LR,
        inner_momentum=MOMENTUM, nudged_lr=0.02,
    )  # fmt: skip
    assert_gradients_equal(compute_meta_gradient(learner, estimator, batch), expected)


def test_first_order_maml_gradient_is_the_query_gradient_at_the_adapted_weights() -> None:
    learner, batch = make_problem()
    problem = written_out(learner, batch)
    adapted = free_phase(learner, problem)
    expected = {f"omega.{name}": g for name, g in query_gradient(learner, problem, adapted).items()}
    expected |= {f"lambda.{name}": torch.zeros_like(adapted[name]) for name in NAMES}
    estimator = FirstOrderMAML(FREE_STEPS, LR, MOMENTUM)
    assert_gradients_equal(compute_meta_gradient(learner, estimator, batch), expected)


def test_reptile_gradient_is_omega_minus_the_adapted_weights() -> None:
    learner, batch = make_problem(learn_lambda=False)
    problem = written_out(learner, batch)
    adapted = free_phase(learner, problem)
    meta = theta(learner)
    expected = {f"omega.{name}": meta[f"omega.{name}"] - adapted[name] for name in NAMES}
    assert_gradients_equal(compute_meta_gradient(learner, Reptile(FREE_STEPS, LR, MOMENTUM), batch), expected)


def test_implicit_gradient_matches_an_explicit_hessian_solve() -> None:
    """``w = H^-1 dL_query/dphi`` with the full Hessian ``H`` of ``L_in``;
    then ``g_omega = lambda w`` and ``g_log_lambda = -lambda (phi - omega) w``.
    """
    learner, batch = make_problem()
    problem = written_out(learner, batch)
    adapted = free_phase(learner, problem, steps=60)
    meta = theta(learner)
    hessian = torch.func.hessian(lambda v: problem.inner(references.unflat(v, adapted), meta))(references.flat(adapted))
    assert torch.linalg.eigvalsh(hessian).min() > 0.1  # a minimum: the implicit function theorem applies
    rhs = references.flat(query_gradient(learner, problem, adapted))
    solved = references.unflat(torch.linalg.solve(hessian, rhs), adapted)
    expected = {}
    for name in NAMES:
        strength = meta[f"lambda.{name}"].exp()
        expected[f"omega.{name}"] = strength * solved[name]
        expected[f"lambda.{name}"] = -strength * (adapted[name] - meta[f"omega.{name}"]) * solved[name]
    estimator = Implicit(inner_steps=60, inner_lr=LR, inner_momentum=MOMENTUM, cg_steps=3 * len(rhs))
    torch.testing.assert_close(compute_meta_gradient(learner, estimator, batch), expected, rtol=1e-7, atol=1e-10)
