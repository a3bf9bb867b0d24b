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
        loss: the objective at the last evaluated parameters (detached): the returned ones when the phase stopped
            on its tolerance, one step before them when it ran all its steps.
        start_loss: the objective at the starting parameters (detached).
        finite: a boolean scalar tensor, False when ``loss`` or any final parameter is NaN or infinite.
            Non-finite values are absorbing under gradient steps (a NaN or inf gradient leaves NaN or inf in the
            parameters it touches for good), so this one end-of-phase check catches a fault at any step, without
            reading a value on the host inside the loop.
        steps: the number of updates applied (an integer scalar tensor): all of them, or fewer when the phase
            reached its tolerance.
        residual: the gradient norm ``||dL/dphi||_2`` of the objective at the last evaluated parameters (detached),
            over all fast parameters: how far from solved the phase ended.
        solved: a boolean scalar tensor, True when ``residual <= tolerance`` (always False without a tolerance).
    """

    params: Params
    loss: Tensor
    start_loss: Tensor
    finite: Tensor
    steps: Tensor
    residual: Tensor
    solved: Tensor


def check_steps(name: str, steps: int) -> None:
    """Raise ``ValueError`` unless an inner step count is a whole number >= 1."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {steps!r}.")


def check_tolerance(name: str, tolerance: float | None) -> None:
    """Raise ``ValueError`` unless a phase tolerance is ``None`` or a number > 0."""
    if tolerance is not None and (isinstance(tolerance, bool) or not tolerance > 0):
        raise ValueError(f"{name} must be None (run every step) or a gradient norm > 0; got {tolerance!r}.")


CHECK_EVERY = 10
"""How many steps a phase with a tolerance runs between two reads of its stopping flag on the host.

The flag itself is updated on the device at every step and freezes a solved phase there (masked updates), so the
result does not depend on this number; it only bounds the wasted work after the last task is solved
(``CHECK_EVERY - 1`` masked steps at most) against one device synchronisation per ``CHECK_EVERY`` steps.
"""


def minimise(
    objective: Callable[[Params], Tensor],
    start: Params,
    steps: int,
    optimizer: InnerSGD,
    *,
    differentiable: bool = False,
    tolerance: float | None = None,
) -> Phase:
    """Run ``optimizer`` on ``objective`` from ``start`` for ``steps`` steps, or until solved to ``tolerance``.

    First-order (``differentiable=False``): ``start`` is detached and each step's graph is freed
    at once, so memory is that of one forward and backward pass whatever ``steps`` is.
    Differentiable: gradients are taken with ``create_graph=True`` and the returned parameters stay
    connected to ``start`` and to whatever ``objective`` closes over; memory grows linearly in ``steps``.

    **Tolerance** (first-order only: a differentiable phase is the trajectory itself). The phase stops at the
    first parameters ``phi_t`` whose gradient norm ``||dL/dphi(phi_t)||_2`` (over all fast parameters) is at most
    ``tolerance``, and returns them, with ``steps`` as the cap. The residual is absolute, not relative to the
    start: a nudged phase starts ``O(beta)`` from its solution, and what bounds the contrastive estimate's error
    (``O(delta / beta)``) is the distance of each phase from its own solution, ``delta <= residual / mu`` on a
    ``mu``-strongly convex objective, the same yardstick for the free and the nudged phases. A solved phase stops
    moving at once (its update is masked on the device), and the loop reads the flag on the host only every
    :data:`CHECK_EVERY` steps, so under ``vmap`` each task stops where it is solved and the meta-batch's loop ends
    when every task is (or at the cap); the result is the same looped or vmapped.

    Inside a ``torch.func`` transform (``vmap`` over tasks) gradients come from ``torch.func.grad_and_value``,
    which sees through batched tensors where ``torch.autograd.grad`` cannot; outside, ``autograd.grad`` is
    used, which costs about half as much per step on small networks. Without a tolerance the loop never reads a
    tensor's value on the host, so it never waits for an accelerator.
    """
    check_steps("steps", steps)
    check_tolerance("tolerance", tolerance)
    if differentiable and tolerance is not None:
        raise ValueError(
            "A differentiable phase runs a fixed number of steps (its objective is the unrolled trajectory); "
            "pass tolerance=None, or differentiable=False."
        )
    with torch.enable_grad():  # adaptation needs autograd even inside a caller's no_grad block
        if inside_function_transform():
            return _minimise_transformed(objective, start, steps, optimizer, differentiable, tolerance)
        if differentiable:
            return _minimise_unrolled(objective, start, steps, optimizer)
        return _minimise_first_order(objective, start, steps, optimizer, tolerance)


def _minimise_first_order(
    objective: Callable[[Params], Tensor], start: Params, steps: int, optimizer: InnerSGD, tolerance: float | None
) -> Phase:
    params = {name: p.detach().clone().requires_grad_() for name, p in start.items()}  # the copy updated in place
    leaves = list(params.values())
    velocity = [torch.zeros_like(p) for p in leaves]
    stop = _Stopping(tolerance, steps, leaves[0])
    start_loss = None
    for step in range(steps):
        loss = objective(params)
        start_loss = loss.detach() if start_loss is None else start_loss
        grads = torch.autograd.grad(loss, leaves)
        moving = stop.observe(grads, step)
        if moving is not None:  # a solved phase's gradient and velocity are zeroed: it stays where it was solved
            torch._foreach_mul_(velocity, moving)
            torch._foreach_mul_(grads, moving)  # autograd's fresh tensors: scaled in place, no allocation per step
        optimizer.update_(leaves, grads, velocity)
        if stop.all_solved(step):
            break
    return stop.phase({name: p.detach() for name, p in params.items()}, start_loss, loss)  # type: ignore[arg-type]


def _minimise_unrolled(objective: Callable[[Params], Tensor], start: Params, steps: int, optimizer: InnerSGD) -> Phase:
    params = {name: p if p.requires_grad else p.detach().requires_grad_() for name, p in start.items()}
    velocity = optimizer.init(params)
    stop = _Stopping(None, steps, next(iter(params.values())))
    start_loss = None
    for step in range(steps):
        loss = objective(params)
        start_loss = loss.detach() if start_loss is None else start_loss
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        stop.observe(grads, step)
        params, velocity = optimizer.update(params, dict(zip(params, grads, strict=True)), velocity)
    return stop.phase(params, start_loss, loss)  # type: ignore[arg-type]


def _minimise_transformed(
    objective: Callable[[Params], Tensor],
    start: Params,
    steps: int,
    optimizer: InnerSGD,
    differentiable: bool,
    tolerance: float | None,
) -> Phase:
    params = start if differentiable else {name: p.detach() for name, p in start.items()}
    velocity = optimizer.init(params)
    gradient_and_loss = torch.func.grad_and_value(objective)
    stop = _Stopping(tolerance, steps, next(iter(params.values())))
    start_loss = None
    for step in range(steps):
        # Outer autograd records the step only when differentiable; the grad transform works either way.
        with torch.set_grad_enabled(differentiable):
            grads, loss = gradient_and_loss(params)
            start_loss = loss.detach() if start_loss is None else start_loss
            moving = stop.observe(list(grads.values()), step)
            if moving is not None:  # per task under vmap: a solved task's gradient and velocity are zeroed
                grads = {name: g * moving for name, g in grads.items()}
                velocity = {name: v * moving for name, v in velocity.items()}
            params, velocity = optimizer.update(params, grads, velocity)
        if stop.all_solved(step):
            break
    return stop.phase(params, start_loss, loss)  # type: ignore[arg-type]


class _Stopping:
    """A phase's stopping rule: the residual of each evaluated point, the solved flag, and the steps applied.

    Without a tolerance only the last step's residual is computed (one norm per phase), and nothing is masked.
    """

    def __init__(self, tolerance: float | None, steps: int, like: Tensor) -> None:
        self.tolerance = tolerance
        self.cap = steps
        self.solved = torch.zeros((), dtype=torch.bool, device=like.device)
        # Without a tolerance every step is applied: the count is known up front, no per-step tensor op needed.
        self.applied = torch.full((), 0 if tolerance is not None else steps, dtype=torch.long, device=like.device)
        self.residual = torch.zeros((), dtype=like.dtype, device=like.device)

    def observe(self, grads: Sequence[Tensor], step: int) -> Tensor | None:
        """Record the residual at step ``step``'s point; the 0/1 factor that masks its update, or ``None``."""
        if self.tolerance is None:
            if step == self.cap - 1:
                self.residual = _norm(grads)
            return None
        residual = _norm(grads)
        # A solved phase's gradient is zeroed, so its residual is kept from the step that solved it.
        self.residual = torch.where(self.solved, self.residual, residual)
        self.solved = self.solved | (residual <= self.tolerance)
        self.applied = self.applied + (~self.solved).long()
        return (~self.solved).to(residual.dtype)

    def all_solved(self, step: int) -> bool:
        """Whether every task of the phase is solved; read on the host every :data:`CHECK_EVERY` steps only."""
        if self.tolerance is None or (step + 1) % CHECK_EVERY:
            return False
        return bool(_unbatched(self.solved).all())

    def phase(self, params: Params, start_loss: Tensor, loss: Tensor) -> Phase:
        """The :class:`Phase`, with its finiteness checked on the device (a few reductions, no host read)."""
        checks = [torch.isfinite(loss).all()] + [torch.isfinite(p).all() for p in params.values()]
        return Phase(
            params=params,
            loss=loss.detach(),
            start_loss=start_loss,
            finite=torch.stack(checks).all(),
            steps=self.applied,
            residual=self.residual.detach(),
            solved=self.solved,
        )


def _norm(tensors: Sequence[Tensor]) -> Tensor:
    """The Euclidean norm of a list of tensors taken as one vector (detached)."""
    return torch.stack([t.detach().square().sum() for t in tensors]).sum().sqrt()


def _unbatched(flag: Tensor) -> Tensor:
    """``flag`` with every ``vmap`` level peeled off: all tasks' values, so that one host read covers the batch.

    torch has no public way to read a batched tensor on the host (as of 2.13); functorch's unwrapping is used.
    """
    while torch._C._functorch.is_batchedtensor(flag):
        flag = torch._C._functorch.get_unwrapped(flag)
    return flag


def inside_function_transform() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ...) is active around this call.

    Read from functorch's interpreter stack; torch has no public query for it (as of 2.13).
    """
    return torch._C._functorch.peek_interpreter_stack() is not None
