"""The inner optimizers the estimators share, and the loop that runs one inner phase.

Functional in the style of torchopt/optax: parameters and optimizer state are dicts of tensors. A
differentiable phase (MAML's unroll) updates out of place so that the graph runs through every step;
a first-order phase keeps no graph and updates one private copy of the parameters in place. Either
kind also runs inside ``torch.func`` transforms, so an estimator's per-task work can be vmapped over tasks.
:class:`InnerSGD` (momentum SGD) serves every estimator; :class:`InnerLBFGS` (first-order only) solves the phases of
the estimators whose estimate assumes a solved inner problem (contrastive, implicit) in fewer gradient evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

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
class InnerLBFGS:
    """Limited-memory BFGS with a backtracking Armijo line search, run in lockstep: first-order only.

    A phase is a solve, not a trajectory, for the contrastive and implicit estimates, so any solver that reaches the
    minimum gives the same estimate; on a smooth, deterministic, full-batch inner problem this one gets there in fewer
    gradient evaluations than momentum SGD, with no rate to tune (measured, ``docs/results/solvability.md``: 2.4-3x
    fewer to 1e-1 of the starting residual on trained Omniglot Conv4s, about 10x on their convex readout-only problem,
    no faster than SGD at its best rate to 1e-2; 3-4x on ill-conditioned quadratics). The state of a task is a base
    point ``x`` with its objective ``f`` and gradient ``g``, a direction ``d``, a trial step ``t`` and the last
    ``history`` pairs ``(s_i, y_i)`` (all fast parameters flattened into one vector). Each iteration makes exactly one
    evaluation, at the trial point ``x + t d``, and then, per task:

    - *accepted* when ``f(x + t d) <= f + armijo t <g, d>`` (Armijo's sufficient decrease) and the gradient there is
      finite: the pair ``s = t d``, ``y = g(x + t d) - g`` is stored if ``<s, y> > sqrt(eps) ||s|| ||y||`` (a
      positive curvature along ``s``, which keeps the implied inverse Hessian positive definite on a non-convex
      objective), the trial becomes the base, ``d = -H g`` by the two-loop recursion with
      ``H_0 = <s, y> / <y, y> I`` of the newest pair (``lr I`` before the first pair, so the first step is an SGD step
      of rate ``lr``), and ``t = 1``;
    - *rejected* otherwise (NaN included): ``t <- t / 2``, same base (backtracking).

    Near a solution the decrease Armijo asks for falls below the rounding of ``f``; there a trial is accepted also on
    Hager and Zhang's approximate Wolfe condition, ``f(x + t d) <= f + 1e-6 |f|`` and
    ``<g(x + t d), d> <= (2 armijo - 1) <g, d>``, whose slope test decides what ``f`` no longer can.

    Where ``d`` is no descent direction (``<g, d> >= 0``, by rounding) or ``2^-30`` of a step (``MAX_HALVINGS``) was
    still rejected, the history is cleared and the direction restarts as ``-lr g``.

    **Why lockstep.** A line search that evaluates until it is satisfied makes a different number of evaluations per
    task, which a ``torch.func.vmap`` over the tasks of a meta-batch cannot express; here every task makes one
    evaluation per iteration and every decision is a ``torch.where`` on the device (no host read, no Python branch on a
    value), so the solver runs vmapped and unbatched alike, with the same numbers. The price is that a rejected trial
    costs a whole evaluation, where a strong-Wolfe search would interpolate.

    **Budget.** A phase's step count (``minimise``'s ``steps``, the estimators' ``inner_steps`` and ``nudged_steps``)
    counts *gradient evaluations*, accepted or not, and its residual ``||g||_2`` is measured at base (accepted) points.
    **Memory**: ``2 history`` copies of the fast weights per task for the pairs, plus five (base, gradient, direction,
    trial, trial gradient), whatever the number of evaluations; no graph is kept. A push of a pair briefly holds
    ``2 history`` more (each buffer is shifted out of place, one at a time), so the peak is about
    ``4 history + 5`` copies. **Cost** per evaluation beyond the
    objective: about ``8 history + 20`` vector operations over the flat weights (the two-loop recursion and the shift
    of the pair buffers). Every fast parameter must share one dtype and device.

    Attributes:
        lr: the step of the first (steepest-descent) direction, ``-lr g``, and of every restart; > 0.
        history: how many ``(s, y)`` pairs are kept; >= 1.
        armijo: the sufficient-decrease constant ``c_1``, in (0, 1).
    """

    lr: float
    history: int = 10
    armijo: float = 1e-4

    MAX_HALVINGS: ClassVar[int] = 30
    """Rejected halvings of one direction after which it restarts as steepest descent."""
    ROUNDING: ClassVar[float] = 1e-6
    """The relative rise of ``f`` that the approximate Wolfe condition leaves to rounding (Hager and Zhang's)."""

    def __post_init__(self) -> None:
        if isinstance(self.lr, bool) or not self.lr > 0:
            raise ValueError(f"The L-BFGS initial step lr must be > 0; got {self.lr!r}.")
        if isinstance(self.history, bool) or not isinstance(self.history, int) or self.history < 1:
            raise ValueError(f"The L-BFGS history must be an integer >= 1 (pairs kept); got {self.history!r}.")
        if isinstance(self.armijo, bool) or not 0 < self.armijo < 1:
            raise ValueError(f"The L-BFGS Armijo constant must lie in (0, 1); got {self.armijo!r}.")


@dataclass(frozen=True)
class Phase:
    """The outcome of one inner phase.

    Attributes:
        params: the fast parameters after the last step (detached unless the phase was differentiable).
        loss: the objective at the last evaluated parameters (detached): the returned ones when the phase stopped
            on its tolerance, one step before them when it ran all its steps (:class:`InnerLBFGS`: always at the
            returned parameters, its last accepted point).
        start_loss: the objective at the starting parameters (detached).
        finite: a boolean scalar tensor, False when ``loss`` or any final parameter is NaN or infinite.
            Non-finite values are absorbing under gradient steps (a NaN or inf gradient leaves NaN or inf in the
            parameters it touches for good), so this one end-of-phase check catches a fault at any step, without
            reading a value on the host inside the loop.
        steps: the number of updates applied (an integer scalar tensor): all of them, or fewer when the phase
            reached its tolerance (:class:`InnerLBFGS`: the gradient evaluations made, accepted or not).
        residual: the gradient norm ``||dL/dphi||_2`` of the objective at the last evaluated parameters (detached),
            over all fast parameters: how far from solved the phase ended (:class:`InnerLBFGS`: at the returned
            parameters).
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
    optimizer: InnerSGD | InnerLBFGS,
    *,
    differentiable: bool = False,
    tolerance: float | Tensor | None = None,
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
    when every task is (or at the cap); the result is the same looped or vmapped. A tensor ``tolerance`` (a scalar,
    per task under ``vmap``) is a tolerance computed from the task, as the contrastive nudged phases' is; it is
    not checked on the host.

    Inside a ``torch.func`` transform (``vmap`` over tasks) gradients come from ``torch.func.grad_and_value``,
    which sees through batched tensors where ``torch.autograd.grad`` cannot; outside, ``autograd.grad`` is
    used, which costs about half as much per step on small networks. Without a tolerance the loop never reads a
    tensor's value on the host, so it never waits for an accelerator.

    With :class:`InnerLBFGS` (first-order only) ``steps`` caps *gradient evaluations*, accepted or not, the phase's
    ``steps`` counts the evaluations it made up to and including the one that found it solved (the start's included,
    where momentum SGD counts the updates it applied), and the residual is that of the last accepted point, which is
    what it returns (NaN where no point was finite); one loop serves the unbatched and the transformed cases, with
    the gradient taken as above.
    """
    check_steps("steps", steps)
    if not isinstance(tolerance, Tensor):
        check_tolerance("tolerance", tolerance)
    if differentiable and tolerance is not None:
        raise ValueError(
            "A differentiable phase runs a fixed number of steps (its objective is the unrolled trajectory); "
            "pass tolerance=None, or differentiable=False."
        )
    if differentiable and isinstance(optimizer, InnerLBFGS):
        raise ValueError(
            "InnerLBFGS is first-order only: a differentiable phase is the unrolled SGD trajectory that MAML "
            "differentiates. Pass differentiable=False, or use InnerSGD."
        )
    with torch.enable_grad():  # adaptation needs autograd even inside a caller's no_grad block
        if isinstance(optimizer, InnerLBFGS):
            return _minimise_lbfgs(objective, start, steps, optimizer, tolerance)
        if inside_function_transform():
            return _minimise_transformed(objective, start, steps, optimizer, differentiable, tolerance)
        if differentiable:
            return _minimise_unrolled(objective, start, steps, optimizer)
        return _minimise_first_order(objective, start, steps, optimizer, tolerance)


def _minimise_first_order(
    objective: Callable[[Params], Tensor],
    start: Params,
    steps: int,
    optimizer: InnerSGD,
    tolerance: float | Tensor | None,
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
    tolerance: float | Tensor | None,
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


def _minimise_lbfgs(
    objective: Callable[[Params], Tensor],
    start: Params,
    steps: int,
    solver: InnerLBFGS,
    tolerance: float | Tensor | None,
) -> Phase:
    """:class:`InnerLBFGS` for ``steps`` evaluations (fewer once every task is solved), out of place throughout, so
    the same loop runs unbatched and under ``vmap``; the state starts with no base point (``f = inf``, ``t = 0``), so
    the first evaluation, at ``start``, is accepted as the first base like any other."""
    flat, unflatten = _flattener(start)
    gradient_and_loss = _flat_gradient(objective, unflatten)
    x = flat
    g = d = torch.zeros_like(x)
    zero = torch.zeros_like(x.sum())  # a scalar of the weights' dtype (per task under vmap)
    f, t, slope, halvings = zero + math.inf, zero, zero, zero
    pairs = _Pairs(solver.history, x)
    stop = _Stopping(tolerance, steps, x)
    residual = zero + math.nan  # no point accepted yet: a start that is never accepted (NaN) is never "solved"
    floor = torch.finfo(x.dtype).eps ** 0.5
    start_loss = None
    for step in range(steps):
        trial = x + t * d
        g_trial, f_trial = gradient_and_loss(trial)
        start_loss = f_trial if start_loss is None else start_loss
        g_square = (g_trial * g_trial).sum()
        # Armijo's decrease, or, where f's rounding hides it, Hager and Zhang's approximate Wolfe condition.
        sufficient = f_trial <= f + solver.armijo * t * slope
        approximate = (f_trial <= f + solver.ROUNDING * f.abs()) & (
            (g_trial * d).sum() <= (2 * solver.armijo - 1) * slope
        )
        accept = (sufficient | approximate) & torch.isfinite(g_square) & ~stop.solved
        s, y = trial - x, g_trial - g
        sy = (s * y).sum()
        pairs.push(s, y, sy, accept & (sy > floor * ((s * s).sum() * (y * y).sum()).sqrt()))
        x, f, g = torch.where(accept, trial, x), torch.where(accept, f_trial, f), torch.where(accept, g_trial, g)
        residual = torch.where(accept, g_square.sqrt(), residual)
        stop.observe_evaluation(residual)
        # The next trial: a new direction from an accepted point, half the step from a rejected one, steepest
        # descent again where the direction is no descent direction or was halved MAX_HALVINGS times.
        direction = pairs.direction(g, solver.lr)
        halvings = torch.where(accept, zero, halvings + 1)
        restart = (accept & ~((g * direction).sum() < 0)) | (halvings > solver.MAX_HALVINGS)
        pairs.clear(restart)
        d = torch.where(restart, -solver.lr * g, torch.where(accept, direction, d))
        slope = (g * d).sum()
        t = torch.where(accept | restart, zero + 1, 0.5 * t)
        halvings = torch.where(restart, zero, halvings)
        if stop.all_solved(step):
            break
    return stop.phase(unflatten(x), start_loss, f)  # type: ignore[arg-type]


class _Pairs:
    """The last ``history`` curvature pairs ``(s_i, y_i)`` of an L-BFGS solve, oldest first, with ``<s_i, y_i>`` and a
    validity flag per slot; a push shifts the buffers by one slot only where its flag is set (per task under vmap)."""

    def __init__(self, history: int, like: Tensor) -> None:
        self.s = torch.zeros((history, *like.shape), dtype=like.dtype, device=like.device)
        self.y = torch.zeros_like(self.s)
        self.sy = torch.ones(history, dtype=like.dtype, device=like.device)
        self.valid = torch.zeros(history, dtype=torch.bool, device=like.device)

    def push(self, s: Tensor, y: Tensor, sy: Tensor, store: Tensor) -> None:
        """Append the pair where ``store`` holds (dropping the oldest)."""

        def shifted(buffer: Tensor, new: Tensor) -> Tensor:
            return torch.where(store, torch.cat([buffer[1:], new.unsqueeze(0)]), buffer)

        # One buffer at a time, so that the transient copies a shift makes (2 ``history``) exist for one buffer only.
        self.s = shifted(self.s, s)
        self.y = shifted(self.y, y)
        self.sy, self.valid = shifted(self.sy, sy), shifted(self.valid, store)

    def clear(self, where: Tensor) -> None:
        """Forget every pair where ``where`` holds."""
        self.valid = self.valid & ~where

    def direction(self, g: Tensor, lr: float) -> Tensor:
        """``-H g`` by the two-loop recursion over the valid pairs, ``H_0 = <s, y> / <y, y>`` of the newest one
        (``lr`` with none); an invalid slot contributes nothing (its ``rho`` is 0)."""
        rho = torch.where(self.valid, 1 / torch.where(self.valid, self.sy, 1), 0)
        q, alphas = g, []
        for i in reversed(range(len(rho))):
            alpha = rho[i] * (self.s[i] * q).sum()
            q = torch.addcmul(q, alpha, self.y[i], value=-1)
            alphas.append(alpha)
        newest, newest_yy = self.valid[-1], (self.y[-1] * self.y[-1]).sum()
        scale = torch.where(newest, self.sy[-1] / torch.where(newest, newest_yy, 1), lr)
        r = scale * q
        for i, alpha in zip(range(len(rho)), reversed(alphas), strict=True):
            r = torch.addcmul(r, alpha - rho[i] * (self.y[i] * r).sum(), self.s[i])
        return -r


def _flattener(params: Params) -> tuple[Tensor, Callable[[Tensor], Params]]:
    """``params`` as one detached vector, and the map from such a vector back to named views of it."""
    tensors = list(params.values())
    if len({(p.dtype, p.device) for p in tensors}) > 1:
        raise ValueError(
            "InnerLBFGS solves for all fast parameters as one vector, so they must share one dtype and device; got "
            f"{sorted({f'{p.dtype} on {p.device}' for p in tensors})}. Cast the learner (e.g. learner.to(dtype))."
        )
    shapes, sizes = [p.shape for p in tensors], [p.numel() for p in tensors]

    def unflatten(flat: Tensor) -> Params:
        return {name: part.view(shape) for name, part, shape in zip(params, flat.split(sizes), shapes, strict=True)}

    return torch.cat([p.detach().reshape(-1) for p in tensors]), unflatten


def _flat_gradient(
    objective: Callable[[Params], Tensor], unflatten: Callable[[Tensor], Params]
) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """``flat -> (gradient, objective)`` at ``unflatten(flat)``, both detached: by ``torch.func.grad_and_value``
    inside a function transform, by ``torch.autograd.grad`` outside (as :func:`minimise` explains)."""
    if inside_function_transform():
        transformed = torch.func.grad_and_value(lambda flat: objective(unflatten(flat)))

        def evaluate_transformed(flat: Tensor) -> tuple[Tensor, Tensor]:
            with torch.no_grad():  # no outer graph: the grad transform needs none
                return transformed(flat)

        return evaluate_transformed

    def evaluate(flat: Tensor) -> tuple[Tensor, Tensor]:
        point = flat.detach().requires_grad_()
        loss = objective(unflatten(point))
        (gradient,) = torch.autograd.grad(loss, point)
        return gradient, loss.detach()

    return evaluate


class _Stopping:
    """A phase's stopping rule: the residual of each evaluated point, the solved flag, and the steps applied.

    Without a tolerance only the last step's residual is computed (one norm per phase), and nothing is masked.
    """

    def __init__(self, tolerance: float | Tensor | None, steps: int, like: Tensor) -> None:
        self.tolerance = tolerance
        self.cap = steps
        self.solved = torch.zeros((), dtype=torch.bool, device=like.device)
        # Without a tolerance every step is applied: the count is known up front, no per-step tensor op needed.
        self.applied = torch.full((), 0 if tolerance is not None else steps, dtype=torch.long, device=like.device)
        self.residual = torch.zeros((), dtype=like.dtype, device=like.device)

    def observe(self, grads: Sequence[Tensor], step: int) -> Tensor | None:
        """Record the residual at step ``step``'s point, before its update; the 0/1 factor that masks the update, or
        ``None``. The update counts as a step unless the point is solved."""
        if self.tolerance is None:
            if step == self.cap - 1:
                self.residual = joint_norm(grads)
            return None
        self._record(joint_norm(grads))
        self.applied = self.applied + (~self.solved).long()
        return (~self.solved).to(self.residual.dtype)

    def observe_evaluation(self, residual: Tensor) -> None:
        """Record the residual of the current base point after one L-BFGS evaluation, which counts as a step unless
        the phase was solved before it (the evaluation was made either way; a solved task only discards it)."""
        if self.tolerance is None:
            self.residual = residual
            return
        self.applied = self.applied + (~self.solved).long()
        self._record(residual)

    def _record(self, residual: Tensor) -> None:
        """Keep ``residual`` for the tasks not yet solved, and mark those it solves."""
        # A solved phase stops moving, so its residual is kept from the point that solved it.
        self.residual = torch.where(self.solved, self.residual, residual)
        self.solved = self.solved | (residual <= self.tolerance)

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


def joint_norm(tensors: Iterable[Tensor]) -> Tensor:
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
