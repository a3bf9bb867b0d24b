"""The functional inner optimizer and the loop that runs one inner phase."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_contrastive import InnerSGD
from lightning_contrastive.inner import minimise
from lightning_contrastive.tasks import Params

TARGET = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def rosenbrock_like(params: Params) -> Tensor:
    """A non-quadratic objective of two parameter tensors."""
    x, y = params["x"], params["y"]
    return ((x - TARGET).square().sum() + (y - x.square()).square().sum() + 0.1 * x.pow(4).sum()).squeeze()


def start() -> Params:
    return {"x": torch.tensor([0.3, 0.1, -0.4], dtype=torch.float64), "y": torch.zeros(3, dtype=torch.float64)}


def test_inner_sgd_matches_torch_sgd_with_momentum_step_for_step() -> None:
    lr, momentum = 0.05, 0.9
    reference = {name: p.clone().requires_grad_() for name, p in start().items()}
    torch_sgd = torch.optim.SGD(list(reference.values()), lr=lr, momentum=momentum)
    inner_sgd = InnerSGD(lr, momentum)
    params = start()
    velocity = inner_sgd.init(params)
    for _ in range(12):
        torch_sgd.zero_grad()
        rosenbrock_like(reference).backward()
        torch_sgd.step()
        leaves = {name: p.requires_grad_() for name, p in params.items()}
        grads = dict(zip(leaves, torch.autograd.grad(rosenbrock_like(leaves), list(leaves.values())), strict=True))
        params, velocity = inner_sgd.update({n: p.detach() for n, p in leaves.items()}, grads, velocity)
        for name, p in params.items():
            torch.testing.assert_close(p, reference[name].detach(), rtol=1e-14, atol=1e-14)


def test_velocity_starts_at_zero() -> None:
    velocity = InnerSGD(0.1, 0.9).init(start())
    assert all(torch.equal(v, torch.zeros(3, dtype=torch.float64)) for v in velocity.values())


def test_minimise_runs_the_optimizer_and_reports_the_loss_before_the_last_step() -> None:
    optimizer, steps = InnerSGD(0.05, 0.9), 7
    params, velocity = start(), InnerSGD(0.05, 0.9).init(start())
    for _ in range(steps):
        leaves = {name: p.requires_grad_() for name, p in params.items()}
        loss = rosenbrock_like(leaves)
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
        params, velocity = optimizer.update({n: p.detach() for n, p in leaves.items()}, grads, velocity)

    original = start()
    phase = minimise(rosenbrock_like, original, steps, optimizer)
    torch.testing.assert_close(phase.loss, loss.detach(), rtol=1e-14, atol=0)
    for name, p in phase.params.items():
        torch.testing.assert_close(p, params[name], rtol=1e-14, atol=1e-14)
        assert p.grad_fn is None and not p.requires_grad
    assert all(torch.equal(p, start()[name]) and not p.requires_grad for name, p in original.items())
    assert rosenbrock_like(phase.params) < 0.5 * rosenbrock_like(original)


def test_minimise_adapts_inside_no_grad_blocks() -> None:
    with torch.no_grad():
        phase = minimise(rosenbrock_like, start(), 5, InnerSGD(0.05))
    assert rosenbrock_like(phase.params) < rosenbrock_like(start())


def test_first_order_minimise_cuts_the_graph_to_the_start() -> None:
    theta = torch.tensor([0.3, 0.1, -0.4], dtype=torch.float64, requires_grad=True)
    phase = minimise(lambda p: (p["x"] - TARGET).square().sum(), {"x": 2 * theta}, 3, InnerSGD(0.1))
    assert phase.params["x"].grad_fn is None


def test_differentiable_minimise_keeps_the_graph_through_every_step() -> None:
    """Plain gradient descent on ``a/2 (x - c theta)^2``: ``x_T = (1 - lr a)^T (x_0 - c theta) + c theta``."""
    a, c, lr, steps = 3.0, 2.0, 0.1, 5
    x0 = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    phase = minimise(
        lambda p: 0.5 * a * (p["x"] - c * theta).square(), {"x": x0}, steps, InnerSGD(lr), differentiable=True
    )
    contraction = (1 - lr * a) ** steps
    torch.testing.assert_close(phase.params["x"].detach(), contraction * (x0 - c * theta).detach() + c * theta.detach())
    d_x0, d_theta = torch.autograd.grad(phase.params["x"], [x0, theta])
    torch.testing.assert_close(d_x0, torch.tensor(contraction, dtype=torch.float64))
    torch.testing.assert_close(d_theta, torch.tensor(c * (1 - contraction), dtype=torch.float64))


def test_differentiable_minimise_with_momentum_matches_a_hand_written_unroll() -> None:
    """Second-order derivatives through momentum steps equal those of the unrolled recursion written out by hand."""
    lr, momentum, steps = 0.05, 0.8, 6
    x0 = torch.tensor([0.3, 0.1, -0.4], dtype=torch.float64, requires_grad=True)
    y0 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    phase = minimise(rosenbrock_like, {"x": x0, "y": y0}, steps, InnerSGD(lr, momentum), differentiable=True)
    ours = torch.autograd.grad(phase.params["x"].sum() + phase.params["y"].square().sum(), [x0, y0])

    x, y = x0, y0
    vx, vy = torch.zeros_like(x0), torch.zeros_like(y0)
    for _ in range(steps):
        gx, gy = torch.autograd.grad(rosenbrock_like({"x": x, "y": y}), [x, y], create_graph=True)
        vx, vy = momentum * vx + gx, momentum * vy + gy
        x, y = x - lr * vx, y - lr * vy
    reference = torch.autograd.grad(x.sum() + y.square().sum(), [x0, y0])
    for actual, expected in zip(ours, reference, strict=True):
        assert actual.abs().sum() > 0
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


def test_differentiable_minimise_accepts_constant_starts() -> None:
    """A fast weight that starts at a constant (a zero readout) must not stop MAML from differentiating the rest."""
    theta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    start = {"x": 2 * theta, "readout": torch.zeros((), dtype=torch.float64)}
    phase = minimise(
        lambda p: (p["x"] - 1).square() + (p["readout"] - theta).square(), start, 3, InnerSGD(0.1), differentiable=True
    )
    assert torch.autograd.grad(phase.params["x"] + phase.params["readout"], theta)[0] != 0
