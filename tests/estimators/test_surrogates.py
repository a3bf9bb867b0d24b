"""Each estimator's surrogate has exactly the gradient its equation defines.

The reference runs the same inner phases with ``inner.minimise`` and evaluates every estimate term
by itself: for the complex synapse ``dL_in/domega = -lambda (phi - omega)`` and
``dL_in/dlog_lambda = lambda (phi - omega)^2 / 2``, so the contrastive, implicit and Reptile estimates
are explicit per-synapse formulas; the query gradients come from autograd at fixed fast weights.
Small float64 MLP, cross-entropy, unconverged phases (the identities hold at any step count).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_contrastive import ComplexSynapse, Contrastive, FirstOrderMAML, Implicit, InnerSGD, Reptile, Task
from lightning_contrastive import meta_gradient as compute_meta_gradient
from lightning_contrastive.inner import Phase, minimise
from lightning_contrastive.tasks import Params, split_batch

LR, MOMENTUM, FREE_STEPS, NUDGED_STEPS, BETA = 0.1, 0.9, 20, 10, 0.1
INNER_SGD = InnerSGD(LR, MOMENTUM)


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


def detached_meta(learner: ComplexSynapse) -> Params:
    return {name: p.detach() for name, p in learner.meta_parameters().items()}


def free_phase(learner: ComplexSynapse, task: Task, steps: int = FREE_STEPS) -> Phase:
    meta = detached_meta(learner)
    return minimise(
        lambda fast: learner.inner_loss(fast, meta, task.support), learner.init_fast(meta), steps, INNER_SGD
    )


def nudged_phase(learner: ComplexSynapse, task: Task, start: Params, beta: float) -> Phase:
    meta = detached_meta(learner)

    def augmented(fast: Params) -> Tensor:
        return learner.inner_loss(fast, meta, task.support) + beta * learner.query_loss(fast, meta, task.query)

    return minimise(augmented, start, NUDGED_STEPS, INNER_SGD)


def regulariser_gradient(learner: ComplexSynapse, fast: Params) -> Params:
    """``dR/dtheta`` at ``fast``, explicitly: ``-lambda (phi - omega)`` and ``lambda (phi - omega)^2 / 2``."""
    meta = detached_meta(learner)
    grads = {}
    for name in learner.fast_names:
        strength, offset = meta[f"lambda.{name}"].exp(), fast[name] - meta[f"omega.{name}"]
        grads[f"omega.{name}"] = -strength * offset
        grads[f"lambda.{name}"] = 0.5 * strength * offset.square()
    return grads


def query_gradient(learner: ComplexSynapse, task: Task, fast: Params) -> Params:
    """``dL_query/dphi`` at fixed ``fast``."""
    leaves = {name: p.clone().requires_grad_() for name, p in fast.items()}
    loss = learner.query_loss(leaves, detached_meta(learner), task.query)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))


def assert_gradients_equal(actual: Params, expected: Params) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)  # same names, shapes, dtypes and values


@pytest.mark.parametrize("symmetric", [False, True], ids=["one-sided", "symmetric"])
def test_contrastive_gradient_is_the_difference_of_phase_gradients(symmetric: bool) -> None:
    """One-sided ``g = [dL_beta/dtheta(phi_beta) - dL_0/dtheta(phi_0)] / beta``,
    symmetric ``g = [dL_beta/dtheta(phi_beta) - dL_-beta/dtheta(phi_-beta)] / (2 beta)``.

    The query loss of the complex synapse does not depend on ``theta``, so ``dL_beta/dtheta = dR/dtheta``.
    """
    learner, batch = make_problem()
    (task,) = split_batch(batch)
    free = free_phase(learner, task)
    plus = regulariser_gradient(learner, nudged_phase(learner, task, free.params, BETA).params)
    if symmetric:
        minus = regulariser_gradient(learner, nudged_phase(learner, task, free.params, -BETA).params)
        expected = {name: (plus[name] - minus[name]) / (2 * BETA) for name in plus}
    else:
        base = regulariser_gradient(learner, free.params)
        expected = {name: (plus[name] - base[name]) / BETA for name in plus}
    estimator = Contrastive(BETA, symmetric, FREE_STEPS, NUDGED_STEPS, "full", LR, MOMENTUM)
    assert_gradients_equal(compute_meta_gradient(learner, estimator, batch), expected)


def test_contrastive_nudged_lr_drives_the_nudged_phases() -> None:
    learner, batch = make_problem()
    (task,) = split_batch(batch)
    free = free_phase(learner, task)
    meta = detached_meta(learner)
    nudged = minimise(
        lambda fast: learner.inner_loss(fast, meta, task.support) + BETA * learner.query_loss(fast, meta, task.query),
        free.params,
        NUDGED_STEPS,
        InnerSGD(0.02, MOMENTUM),
    )
    plus, base = regulariser_gradient(learner, nudged.params), regulariser_gradient(learner, free.params)
    expected = {name: (plus[name] - base[name]) / BETA for name in plus}
    estimator = Contrastive(BETA, False, FREE_STEPS, NUDGED_STEPS, "full", LR, MOMENTUM, nudged_lr=0.02)
    assert_gradients_equal(compute_meta_gradient(learner, estimator, batch), expected)


def test_first_order_maml_gradient_is_the_query_gradient_at_the_adapted_weights() -> None:
    learner, batch = make_problem()
    (task,) = split_batch(batch)
    adapted = free_phase(learner, task).params
    expected = {f"omega.{name}": g for name, g in query_gradient(learner, task, adapted).items()}
    expected |= {f"lambda.{name}": torch.zeros_like(adapted[name]) for name in learner.fast_names}
    estimator = FirstOrderMAML(FREE_STEPS, LR, MOMENTUM)
    assert_gradients_equal(compute_meta_gradient(learner, estimator, batch), expected)


def test_reptile_gradient_is_omega_minus_the_adapted_weights() -> None:
    learner, batch = make_problem(learn_lambda=False)
    (task,) = split_batch(batch)
    adapted = free_phase(learner, task).params
    meta = detached_meta(learner)
    expected = {f"omega.{name}": meta[f"omega.{name}"] - adapted[name] for name in learner.fast_names}
    assert_gradients_equal(compute_meta_gradient(learner, Reptile(FREE_STEPS, LR, MOMENTUM), batch), expected)


def test_implicit_gradient_matches_an_explicit_hessian_solve() -> None:
    """``w = H^-1 dL_query/dphi`` with the full Hessian ``H`` of ``L_in``;
    then ``g_omega = lambda w`` and ``g_log_lambda = -lambda (phi - omega) w``.
    """
    learner, batch = make_problem()
    (task,) = split_batch(batch)
    adapted = free_phase(learner, task, steps=60).params
    meta = detached_meta(learner)
    names, shapes = list(adapted), [p.shape for p in adapted.values()]
    sizes = [p.numel() for p in adapted.values()]

    def inner_loss(flat: Tensor) -> Tensor:
        fast = {n: chunk.view(s) for n, chunk, s in zip(names, flat.split(sizes), shapes, strict=True)}
        return learner.inner_loss(fast, meta, task.support)

    flat_adapted = torch.cat([p.flatten() for p in adapted.values()])
    hessian = torch.autograd.functional.hessian(inner_loss, flat_adapted)
    assert torch.linalg.eigvalsh(hessian).min() > 0.1  # a minimum: the implicit function theorem applies
    rhs = torch.cat([g.flatten() for g in query_gradient(learner, task, adapted).values()])
    solved = dict(zip(names, torch.linalg.solve(hessian, rhs).split(sizes), strict=True))

    expected = {}
    for name, shape in zip(names, shapes, strict=True):
        strength, w = meta[f"lambda.{name}"].exp(), solved[name].view(shape)
        expected[f"omega.{name}"] = strength * w
        expected[f"lambda.{name}"] = -strength * (adapted[name] - meta[f"omega.{name}"]) * w
    estimator = Implicit(inner_steps=60, inner_lr=LR, inner_momentum=MOMENTUM, cg_steps=3 * len(flat_adapted))
    torch.testing.assert_close(compute_meta_gradient(learner, estimator, batch), expected, rtol=1e-7, atol=1e-10)
