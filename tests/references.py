"""Independent references for the tests: networks, inner losses and meta-gradient estimators written out from their
equations with plain torch, sharing no code with ``lightning_contrastive``, so that a test comparing the library with
them can fail.

A task's bilevel problem is a :class:`Problem`: where the fast parameters ``phi`` start, the inner loss
``L_in(phi, theta)`` and the query loss ``L_query(phi, theta)``, each a function of dicts of tensors keyed like the
library's fast and meta-parameters. The estimators below run their own heavy-ball loops on it; :func:`exact` gives
the implicit-function-theorem meta-gradient at a converged solution from dense matrices, and :func:`finite_difference`
checks it. Tests load this file by its path (they run under ``--import-mode=importlib``, without ``tests/`` on
``sys.path``): ``importlib.util.spec_from_file_location("references", <path>)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

Params = dict[str, Tensor]
Loss = Callable[[Params, Params], Tensor]
"""``(phi, theta) -> scalar``."""


class Problem(NamedTuple):
    start: Callable[[Params], Params]
    inner: Loss
    query: Loss


def detach(params: Params) -> Params:
    return {name: p.detach() for name, p in params.items()}


def gradient(loss: Tensor, params: Params, *, create_graph: bool = False) -> Params:
    """``d loss / d params``, zero where ``loss`` does not depend on a parameter."""
    if not loss.requires_grad:
        return {name: torch.zeros_like(p) for name, p in params.items()}
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params.items(), grads, strict=True)}


def flat(params: Params) -> Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflat(vector: Tensor, like: Params) -> Params:
    sizes = [p.numel() for p in like.values()]
    return {name: chunk.view(p.shape) for (name, p), chunk in zip(like.items(), vector.split(sizes), strict=True)}


# --- inner optimisation ------------------------------------------------------------------------------------------


def heavy_ball(
    objective: Callable[[Params], Tensor],
    start: Params,
    steps: int,
    lr: float,
    momentum: float,
    *,
    differentiable: bool = False,
) -> Params:
    """``steps`` of ``v <- momentum v + grad``, ``phi <- phi - lr v`` from zero velocity (``torch.optim.SGD``'s rule).

    First-order (the result is detached) unless ``differentiable``, which keeps the graph through every step.
    """
    phi = start if differentiable else {name: p.detach().requires_grad_() for name, p in start.items()}
    velocity = {name: torch.zeros_like(p) for name, p in phi.items()}
    for _ in range(steps):
        with torch.enable_grad():
            grads = gradient(objective(phi), phi, create_graph=differentiable)
        velocity = {name: momentum * velocity[name] + grads[name] for name in phi}
        phi = {name: phi[name] - lr * velocity[name] for name in phi}
        if not differentiable:
            phi = {name: p.detach().requires_grad_() for name, p in phi.items()}
    return phi if differentiable else detach(phi)


def newton(objective: Callable[[Params], Tensor], start: Params, steps: int = 30) -> Params:
    """Polish ``start``, near a minimum of ``objective``, to float64 precision by Newton's method with a dense
    Hessian (tiny problems). Raises ``AssertionError`` unless it ends at a minimum (zero gradient, Hessian > 0)."""
    vector = flat(start).detach()

    def flat_objective(v: Tensor) -> Tensor:
        return objective(unflat(v, start))

    for _ in range(steps):
        grad = torch.func.grad(flat_objective)(vector)
        if grad.norm() < 1e-12:
            break
        vector = vector - torch.linalg.solve(torch.func.hessian(flat_objective)(vector), grad)
    assert torch.func.grad(flat_objective)(vector).norm() < 1e-10, "Newton's method did not converge"
    assert torch.linalg.eigvalsh(torch.func.hessian(flat_objective)(vector)).min() > 0, "not a minimum"
    return unflat(vector, start)


# --- estimators --------------------------------------------------------------------------------------------------


def contrastive(
    problem: Problem,
    theta: Params,
    *,
    beta: float,
    symmetric: bool,
    nudge: str,
    steps: int,
    nudged_steps: int,
    lr: float,
    momentum: float,
    nudged_lr: float | None = None,
) -> Params:
    """The contrastive estimate, from its definition.

    Full nudge: phases on ``L_b = L_in + b L_query``; ``g = [dL_beta/dtheta(phi_beta) - dL_-beta/dtheta(phi_-beta)]
    / (2 beta)`` (one-sided: ``- dL_0/dtheta(phi_0)``, over ``beta``). Linear nudge: phases on
    ``L_in + b <dL_query/dphi(phi_0), phi - phi_0>``; the same differences of ``dL_in/dtheta``, plus
    ``dL_query/dtheta(phi_0)``. Every nudged phase starts at ``phi_0`` with zero velocity.
    """
    frozen = detach(theta)
    phi_0 = heavy_ball(lambda phi: problem.inner(phi, frozen), problem.start(frozen), steps, lr, momentum)
    if nudge == "full":

        def nudged_objective(phi: Params, b: float) -> Tensor:
            return problem.inner(phi, frozen) + b * problem.query(phi, frozen)

        def theta_gradient(phi: Params, b: float) -> Params:
            live = {name: p.clone().requires_grad_() for name, p in frozen.items()}
            return gradient(problem.inner(phi, live) + b * problem.query(phi, live), live)
    else:
        leaves = {name: p.clone().requires_grad_() for name, p in phi_0.items()}
        query_grad = gradient(problem.query(leaves, frozen), leaves)

        def nudged_objective(phi: Params, b: float) -> Tensor:
            return problem.inner(phi, frozen) + b * sum((query_grad[n] * (phi[n] - phi_0[n])).sum() for n in phi)

        def theta_gradient(phi: Params, b: float) -> Params:
            live = {name: p.clone().requires_grad_() for name, p in frozen.items()}
            return gradient(problem.inner(phi, live), live)

    def nudged(b: float) -> Params:
        return heavy_ball(lambda phi: nudged_objective(phi, b), phi_0, nudged_steps, nudged_lr or lr, momentum)

    plus = theta_gradient(nudged(beta), beta)
    if symmetric:
        minus = theta_gradient(nudged(-beta), -beta)
        estimate = {name: (plus[name] - minus[name]) / (2 * beta) for name in plus}
    else:
        base = theta_gradient(phi_0, 0.0)
        estimate = {name: (plus[name] - base[name]) / beta for name in plus}
    if nudge == "linear":
        live = {name: p.clone().requires_grad_() for name, p in frozen.items()}
        direct = gradient(problem.query(phi_0, live), live)
        estimate = {name: estimate[name] + direct[name] for name in estimate}
    return estimate


def maml(problem: Problem, theta: Params, *, steps: int, lr: float, momentum: float) -> Params:
    """``d/dtheta L_query(phi_T(theta), theta)`` through ``steps`` differentiable inner steps."""
    live = {name: p.detach().clone().requires_grad_() for name, p in theta.items()}
    phi_t = heavy_ball(
        lambda phi: problem.inner(phi, live), problem.start(live), steps, lr, momentum, differentiable=True
    )
    return gradient(problem.query(phi_t, live), live)


def first_order_maml(problem: Problem, theta: Params, *, steps: int, lr: float, momentum: float) -> Params:
    """``(d phi_init/dtheta)^T dL_query/dphi(phi_T) + dL_query/dtheta(phi_T)``: the inner loop's Jacobian taken as I."""
    frozen = detach(theta)
    phi_t = heavy_ball(lambda phi: problem.inner(phi, frozen), problem.start(frozen), steps, lr, momentum)
    leaves = {name: p.clone().requires_grad_() for name, p in phi_t.items()}
    live = {name: p.clone().requires_grad_() for name, p in frozen.items()}
    both = gradient(problem.query(leaves, live), {**{f"phi:{n}": p for n, p in leaves.items()}, **live})
    query_grad, direct = {n: both[f"phi:{n}"] for n in leaves}, {n: both[n] for n in live}
    start = problem.start(live)
    through_start = gradient(sum((start[n] * query_grad[n]).sum() for n in start), live)
    return {name: direct[name] + through_start[name] for name in live}


def exact(problem: Problem, theta: Params, phi: Params, damping: float = 0.0) -> Params:
    """The implicit-function-theorem meta-gradient at ``phi`` from dense matrices:
    ``g = dL_query/dtheta - J^T (H + damping I)^-1 dL_query/dphi``, ``H = d^2 L_in/dphi^2``,
    ``J = d^2 L_in/dphi dtheta``.

    Undamped, the derivative of ``L_query(phi*(theta), theta)`` when ``phi`` is the inner minimum ``phi*(theta)``.
    """
    theta_0, phi_0 = flat(theta).detach(), flat(phi).detach()

    def inner(p: Tensor, t: Tensor) -> Tensor:
        return problem.inner(unflat(p, phi), unflat(t, theta))

    def query(p: Tensor, t: Tensor) -> Tensor:
        return problem.query(unflat(p, phi), unflat(t, theta))

    hessian = torch.func.hessian(inner, argnums=0)(phi_0, theta_0)
    mixed = torch.func.jacrev(torch.func.grad(inner, argnums=0), argnums=1)(phi_0, theta_0)  # (phi, theta)
    query_phi, query_theta = torch.func.grad(query, argnums=(0, 1))(phi_0, theta_0)
    damped = hessian + damping * torch.eye(len(phi_0), dtype=hessian.dtype)
    return unflat(query_theta - mixed.T @ torch.linalg.solve(damped, query_phi), theta)


def solution(problem: Problem, theta: Params, descent: tuple[int, float, float] = (0, 0.0, 0.0)) -> Params:
    """``phi*(theta)``: the inner minimum, by Newton's method from the start, or from ``steps`` heavy-ball steps
    (``descent = (steps, lr, momentum)``) where Newton from the start would not find the minimum descent finds."""
    frozen = detach(theta)
    start = problem.start(frozen)
    steps, lr, momentum = descent
    if steps:
        start = heavy_ball(lambda phi: problem.inner(phi, frozen), start, steps, lr, momentum)
    return newton(lambda phi: problem.inner(phi, frozen), start)


def finite_difference(
    problem: Problem,
    theta: Params,
    direction: Params,
    step: float = 1e-5,
    descent: tuple[int, float, float] = (0, 0, 0),
) -> float:
    """``d/ds L_query(phi*(theta + s d), theta + s d)`` at ``s = 0`` by central differences, re-solving the inner
    problem to float64 precision at each point (error O(step^2) plus solver precision over ``step``)."""

    def outer(s: float) -> float:
        moved = {name: theta[name].detach() + s * direction[name] for name in theta}
        return float(problem.query(solution(problem, moved, descent), moved))

    return (outer(step) - outer(-step)) / (2 * step)


# --- networks and learners, written out --------------------------------------------------------------------------


def mlp(weights: Params, x: Tensor, layers: list[str], activation: Callable[[Tensor], Tensor]) -> Tensor:
    """``x -> act(x W0^T + b0) -> ... -> x Wn^T + bn`` with weights ``<layer>.weight`` and ``<layer>.bias``."""
    for i, layer in enumerate(layers):
        x = x @ weights[f"{layer}.weight"].T + weights[f"{layer}.bias"]
        if i < len(layers) - 1:
            x = activation(x)
    return x


def batch_norm(h: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalise every feature (dimension 1) with the batch's mean and biased variance, then scale and shift."""
    dims = [d for d in range(h.dim()) if d != 1]
    shape = [1, -1] + [1] * (h.dim() - 2)
    mean, variance = h.mean(dims, keepdim=True), h.var(dims, unbiased=False, keepdim=True)
    return (h - mean) / torch.sqrt(variance + eps) * weight.view(shape) + bias.view(shape)


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": lambda output, target: ((output - target) ** 2).mean(),
    "cross_entropy": lambda output, labels: -output.log_softmax(-1).gather(-1, labels[:, None]).mean(),
}


def complex_synapse(
    network: Callable[[Params, Tensor], Tensor],
    names: list[str],
    task: tuple[Tensor, Tensor, Tensor, Tensor],
    loss: str,
    strength: float | None = None,
) -> Problem:
    """``phi`` starts at ``omega``; ``L_in = loss(f(x_s; phi), y_s) + sum_i lambda_i / 2 (phi_i - omega_i)^2`` with
    ``lambda = exp(theta["lambda.<name>"])`` (or the fixed ``strength``); ``L_query = loss(f(x_q; phi), y_q)``."""
    x_s, y_s, x_q, y_q = task

    def regulariser(phi: Params, theta: Params) -> Tensor:
        total = 0.0
        for name in names:
            lam = theta[f"lambda.{name}"].exp() if strength is None else strength
            total = total + (lam / 2 * (phi[name] - theta[f"omega.{name}"]) ** 2).sum()
        return total  # type: ignore[return-value]

    return Problem(
        start=lambda theta: {name: theta[f"omega.{name}"] for name in names},
        inner=lambda phi, theta: LOSSES[loss](network(phi, x_s), y_s) + regulariser(phi, theta),
        query=lambda phi, theta: LOSSES[loss](network(phi, x_q), y_q),
    )


def dual_system(
    hidden: list[Callable[[Params, Tensor], Tensor]],
    layers: list[str],
    after: list[Callable[[Tensor], Tensor]],
    task: tuple[Tensor, Tensor, Tensor, Tensor],
    loss: str,
    pull: float,
    code: bool = False,
) -> Problem:
    """A primary network modulated per unit: for each hidden block ``k``, ``h = after_k(g_k * hidden_k(W, h) + s_k)``
    (``hidden_k`` the block's weight layer and any norm, ``after_k`` its activation and pooling), then the fast
    readout ``h V^T + c``. ``L_in = loss(f(x_s), y_s) + pull / 2 ||m - m0||^2`` over every fast parameter (readout
    included); ``L_query = loss(f(x_q), y_q)`` depends on the primary weights ``W`` directly.

    With ``code``: the gains and shifts are ``A code + a`` (``theta["modulator.*"]``), the fast variable the code.
    """
    x_s, y_s, x_q, y_q = task

    def forward(phi: Params, theta: Params, x: Tensor) -> Tensor:
        weights = {name.removeprefix("primary."): w for name, w in theta.items() if name.startswith("primary.")}
        if code:
            modulation = theta["modulator.weight"] @ phi["code"] + theta["modulator.bias"]
            half = modulation.numel() // 2
            gains, shifts, offset = modulation[:half], modulation[half:], 0
        h = x
        for block, layer, act in zip(hidden, layers, after, strict=True):
            h = block(weights, h)
            units = h.shape[1]
            if code:
                gain, shift = gains[offset : offset + units], shifts[offset : offset + units]
                offset += units
            else:
                gain, shift = phi[f"gain.{layer}"], phi[f"shift.{layer}"]
            view = [-1] + [1] * (h.dim() - 2)
            h = act(gain.view(view) * h + shift.view(view))
        return h @ phi["readout.weight"].T + phi["readout.bias"]

    def inner(phi: Params, theta: Params) -> Tensor:
        pulled = sum(((phi[name] - theta[f"init.{name}"]) ** 2).sum() for name in phi)
        return LOSSES[loss](forward(phi, theta, x_s), y_s) + pull / 2 * pulled

    return Problem(
        start=lambda theta: {name.removeprefix("init."): p for name, p in theta.items() if name.startswith("init.")},
        inner=inner,
        query=lambda phi, theta: LOSSES[loss](forward(phi, theta, x_q), y_q),
    )


def relative_error(actual: Params, expected: Params) -> float:
    """``|a - e| / |e|`` over all entries."""
    difference = flat({n: actual[n] - expected[n] for n in expected})
    return float(difference.norm() / flat(expected).norm())


def cosine(actual: Params, expected: Params) -> float:
    a, e = flat({n: actual[n] for n in expected}), flat(expected)
    return float(a @ e / (a.norm() * e.norm()))
