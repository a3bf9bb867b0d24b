"""The inner optimizer that every estimator shares, and the loop that runs one inner phase.

Functional in the style of torchopt/optax: parameters and optimizer state are dicts of tensors. A
differentiable phase (MAML's unroll) updates out of place so that the graph runs through every step;
a first-order phase keeps no graph and updates one private copy of the parameters in place. Either
kind also runs inside ``torch.func`` transforms, so an estimator's per-task work can be vmapped over tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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

    def update_(self, params: list[Tensor], grads: Sequence[Tensor], velocity: list[Tensor]) -> None:
        """The same step in place, with three fused multi-tensor kernels and no new tensors (not differentiable)."""
        with torch.no_grad():
            torch._foreach_mul_(velocity, self.momentum)
            torch._foreach_add_(velocity, grads)
            torch._foreach_add_(params, velocity, alpha=-self.lr)


@dataclass(frozen=True)
class Phase:
    """The outcome of one inner phase.

    Attributes:
        params: the fast parameters after the last step (detached unless the phase was differentiable).
        loss: the objective at the last step's parameters, i.e. before the final update (detached).
        start_loss: the objective at the starting parameters (detached).
        finite: a boolean scalar tensor, False when ``loss`` or any final parameter is NaN or infinite.
            Non-finite values are absorbing under gradient steps (a NaN or inf gradient leaves NaN or inf in the
            parameters it touches for good), so this one end-of-phase check catches a fault at any step, without
            reading a value on the host inside the loop.
    """

    params: Params
    loss: Tensor
    start_loss: Tensor
    finite: Tensor


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

    Inside a ``torch.func`` transform (``vmap`` over tasks) gradients come from ``torch.func.grad_and_value``,
    which sees through batched tensors where ``torch.autograd.grad`` cannot; outside, ``autograd.grad`` is
    used, which costs about half as much per step on small networks. The loop never reads a tensor's value
    on the host, so it never waits for an accelerator.
    """
    check_steps("steps", steps)
    with torch.enable_grad():  # adaptation needs autograd even inside a caller's no_grad block
        if inside_function_transform():
            return _minimise_transformed(objective, start, steps, optimizer, differentiable)
        if differentiable:
            return _minimise_unrolled(objective, start, steps, optimizer)
        return _minimise_first_order(objective, start, steps, optimizer)


def _minimise_first_order(
    objective: Callable[[Params], Tensor], start: Params, steps: int, optimizer: InnerSGD
) -> Phase:
    params = {name: p.detach().clone().requires_grad_() for name, p in start.items()}  # the copy updated in place
    leaves = list(params.values())
    velocity = [torch.zeros_like(p) for p in leaves]
    start_loss = None
    for _ in range(steps):
        loss = objective(params)
        start_loss = loss.detach() if start_loss is None else start_loss
        optimizer.update_(leaves, torch.autograd.grad(loss, leaves), velocity)
    return _phase({name: p.detach() for name, p in params.items()}, start_loss, loss)  # type: ignore[arg-type]


def _minimise_unrolled(objective: Callable[[Params], Tensor], start: Params, steps: int, optimizer: InnerSGD) -> Phase:
    params = {name: p if p.requires_grad else p.detach().requires_grad_() for name, p in start.items()}
    velocity = optimizer.init(params)
    start_loss = None
    for _ in range(steps):
        loss = objective(params)
        start_loss = loss.detach() if start_loss is None else start_loss
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params, velocity = optimizer.update(params, dict(zip(params, grads, strict=True)), velocity)
    return _phase(params, start_loss, loss)  # type: ignore[arg-type]


def _minimise_transformed(
    objective: Callable[[Params], Tensor], start: Params, steps: int, optimizer: InnerSGD, differentiable: bool
) -> Phase:
    params = start if differentiable else {name: p.detach() for name, p in start.items()}
    velocity = optimizer.init(params)
    gradient_and_loss = torch.func.grad_and_value(objective)
    start_loss = None
    for _ in range(steps):
        # Outer autograd records the step only when differentiable; the grad transform works either way.
        with torch.set_grad_enabled(differentiable):
            grads, loss = gradient_and_loss(params)
            start_loss = loss.detach() if start_loss is None else start_loss
            params, velocity = optimizer.update(params, grads, velocity)
    return _phase(params, start_loss, loss)  # type: ignore[arg-type]


def _phase(params: Params, start_loss: Tensor, loss: Tensor) -> Phase:
    """A :class:`Phase`, with its finiteness checked on the device (a few reductions, no host read)."""
    checks = [torch.isfinite(loss).all()] + [torch.isfinite(p).all() for p in params.values()]
    return Phase(params=params, loss=loss.detach(), start_loss=start_loss, finite=torch.stack(checks).all())


def inside_function_transform() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ...) is active around this call.

    Read from functorch's interpreter stack; torch has no public query for it (as of 2.13).
    """
    return torch._C._functorch.peek_interpreter_stack() is not None
