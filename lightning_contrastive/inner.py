"""The inner optimizer that every estimator shares, and the loop that runs one inner phase.

Functional in the style of torchopt/optax: parameters and optimizer state are dicts of tensors, and
nothing is updated in place, so the same code serves first-order phases (no graph kept) and
MAML's differentiable unroll (graph kept through every step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_contrastive.tasks import Params


@dataclass(frozen=True)
class InnerSGD:
    """SGD with heavy-ball momentum, as ``torch.optim.SGD``: ``v <- mu v + g``, ``phi <- phi - lr v``.

    The velocity starts at zero at the beginning of every phase (a nudged phase warm-starts its
    parameters from the free solution, not its velocity).
    """

    lr: float
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"The inner learning rate must be > 0; got {self.lr}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"The inner momentum must lie in [0, 1); got {self.momentum}.")

    def init(self, params: Params) -> Params:
        """A zero velocity for each parameter."""
        return {name: torch.zeros_like(p) for name, p in params.items()}

    def update(self, params: Params, grads: Params, velocity: Params) -> tuple[Params, Params]:
        """One step; returns the new parameters and velocity (out of place, hence differentiable)."""
        velocity = {name: self.momentum * velocity[name] + grads[name] for name in params}
        return {name: p - self.lr * velocity[name] for name, p in params.items()}, velocity


@dataclass(frozen=True)
class Phase:
    """The outcome of one inner phase.

    Attributes:
        params: the fast parameters after the last step (detached unless the phase was differentiable).
        loss: the objective at the last step's parameters, i.e. before the final update (detached).
    """

    params: Params
    loss: Tensor


def check_steps(name: str, steps: int) -> None:
    """Raise ``ValueError`` unless an inner step count is a whole number >= 1."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {steps!r}.")


def minimise(
    objective: Callable[[Params], Tensor],
    start: Params,
    steps: int,
    optimizer: InnerSGD,
    *,
    differentiable: bool = False,
) -> Phase:
    """Run ``steps`` steps of ``optimizer`` on ``objective`` from ``start``.

    First-order (``differentiable=False``): ``start`` is detached and each step's graph is freed
    at once, so memory is that of one forward and backward pass whatever ``steps`` is.
    Differentiable: gradients are taken with ``create_graph=True`` and the returned parameters stay
    connected to ``start`` and to whatever ``objective`` closes over; memory grows linearly in ``steps``.
    """
    check_steps("steps", steps)
    params = {n: p if differentiable and p.requires_grad else p.detach().requires_grad_() for n, p in start.items()}
    velocity = optimizer.init(params)
    with torch.enable_grad():  # adaptation needs autograd even inside a caller's no_grad block
        for _ in range(steps):
            loss = objective(params)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=differentiable)
            with torch.set_grad_enabled(differentiable):
                params, velocity = optimizer.update(params, dict(zip(params, grads, strict=True)), velocity)
            if not differentiable:
                params = {name: p.requires_grad_() for name, p in params.items()}
    if not differentiable:
        params = {name: p.detach() for name, p in params.items()}
    return Phase(params=params, loss=loss.detach())
