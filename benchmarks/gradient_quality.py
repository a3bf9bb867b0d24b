"""How close each estimator's meta-gradient is to the exact one, against beta and against inner steps.

Problem: a ``ComplexSynapse`` (learned log-strengths, ``lambda = 3`` everywhere) over a smooth 1-16-16-1 tanh
MLP in float64, on 4 sinusoid tasks (10 support and 10 query points, seed 0). The strength is large enough that
every task's inner loss is strongly convex at its minimum: the dense Hessian there is checked positive definite.

The exact meta-gradient is the implicit-function-theorem gradient at the exactly solved inner problem,
computed independently of the library's estimators:

    ``phi*``: heavy-ball descent, then Newton steps on the dense Hessian until ``|grad L_in| < 1e-12``;
    ``g = dL_q/dtheta - (d^2 L_in / dtheta dphi)^T H^-1 dL_q/dphi``, with ``H`` the dense Hessian of ``L_in``
    at ``phi*`` (``torch.func.hessian``) and ``torch.linalg.solve``,

averaged over the tasks, and checked against central finite differences of the converged query loss on the
meta-parameter coordinates with the largest gradients. Every estimator runs through
``lightning_contrastive.meta_gradient`` with the same inner SGD (lr 0.1, momentum 0.7, in the range where
heavy-ball converges fast for this Hessian spectrum), and is scored by its cosine and relative error
``|g_est - g| / |g|`` to the exact gradient:

- versus ``beta``: ``Contrastive`` one-sided and symmetric with converged phases (``CONVERGED_STEPS`` free and
  nudged steps); the bias is O(beta) and O(beta^2), and the fitted log-log slopes should be ~1 and ~2;
- versus inner steps ``T`` at ``T_SWEEP_BETA``: ``Contrastive`` (``T`` free and ``T`` nudged steps),
  ``MAML`` and ``FirstOrderMAML`` (``T`` steps), ``Implicit`` (``T`` steps, 50 CG steps), and ``Reptile`` on the
  ``learn_lambda=False`` variant of the learner (its exact gradient is the omega part of the same gradient:
  with the strengths fixed at their value the inner problem is the same). MAML's ``T``-step gradient is exact
  for the truncated loop, not for the converged solution; measuring it against the converged gradient is
  the point.

Runs on one torch thread: 50 s to 2 minutes in full (idle to busy cores), ~10 s with ``--quick``.

    python -m benchmarks.gradient_quality --out DIR             # writes DIR/gradient_quality.json
    python -m benchmarks.gradient_quality --out DIR --quick     # fewer betas and step counts
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from benchmarks import REPOSITORY
from lightning_contrastive import MAML, ComplexSynapse, Contrastive, FirstOrderMAML, Implicit, InnerLoopError, Reptile
from lightning_contrastive.data.sinusoid import SinusoidTasks
from lightning_contrastive.estimation import cast_task, meta_gradient
from lightning_contrastive.estimators.base import Estimator
from lightning_contrastive.tasks import Params, Task, split_batch

DEFAULT_FIGURE = REPOSITORY / "docs" / "gradient_quality.png"

SEED = 0
NUM_TASKS = 4
SHOTS = 10
WIDTH = 16
INIT_LAMBDA = 3.0
INNER_LR = 0.1
INNER_MOMENTUM = 0.7
INNER_SGD = {"inner_lr": INNER_LR, "inner_momentum": INNER_MOMENTUM}  # every estimator's inner optimizer
CONVERGED_STEPS = 250  # free and nudged steps per phase in the beta sweep: the residual is at float64 round-off
T_SWEEP_BETA = 0.01
CG_STEPS = 50
GRADIENT_TOLERANCE = 1e-12
NEWTON_REGION = 1e-3
FIT_RANGE = (1e-3, 1e-1)  # the betas the slopes are fitted on: past the phases' floor, before higher orders
FD_STEP = 1e-5
# Up to ~0.3: from beta ~0.5 the symmetric rule's -beta phase diverges on one task (``L_in - beta L_q`` loses its
# minimum once the nudge outweighs the strengths' pull), and the library raises its inner-loop fault.
BETAS = {"full": [10.0 ** (k / 4) for k in range(-16, -1)], "quick": [1e-3, 1e-2, 1e-1]}
STEPS = {"full": [5, 10, 20, 50, 100, 200, 500, 1000], "quick": [5, 20, 100]}


def make_problem(learn_lambda: bool = True) -> tuple[ComplexSynapse, dict[str, Any]]:
    """The float64 tanh-MLP complex synapse and its meta-batch of sinusoid tasks (both fixed by ``SEED``)."""
    torch.manual_seed(SEED)
    network = nn.Sequential(nn.Linear(1, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 1))
    learner = ComplexSynapse(network.double(), loss="mse", init_lambda=INIT_LAMBDA, learn_lambda=learn_lambda)
    tasks = SinusoidTasks(NUM_TASKS, SHOTS, SHOTS, seed=SEED)
    batch = default_collate([tasks[i] for i in range(NUM_TASKS)])
    return learner.double(), batch


def float64_tasks(batch: Mapping[str, Any]) -> list[Task]:
    """The batch's tasks with float64 inputs and targets, as the estimators see them for a float64 learner."""
    return [cast_task(task, torch.float64) for task in split_batch(batch)]


class Flat:
    """Maps the learner's fast weights to one flat vector and back, so that dense Hessians are plain matrices."""

    def __init__(self, learner: ComplexSynapse) -> None:
        self.names = learner.fast_names
        omega = dict(learner.omega.named_parameters())
        self.shapes = [omega[name].shape for name in self.names]

    def unflatten(self, flat: Tensor) -> Params:
        parts = torch.split(flat, [math.prod(shape) for shape in self.shapes])
        return {name: part.view(shape) for name, part, shape in zip(self.names, parts, self.shapes, strict=True)}

    def flatten(self, params: Params) -> Tensor:
        return torch.cat([params[name].reshape(-1) for name in self.names])


@dataclass(frozen=True)
class InnerSolution:
    """A task's exactly solved inner problem: ``phi*`` (flat), ``|grad L_in|`` there, and the dense Hessian there."""

    phi: Tensor
    gradient_norm: float
    hessian: Tensor


def solve_inner(learner: ComplexSynapse, meta: Params, task: Task, start: Tensor) -> InnerSolution:
    """``phi*`` to ``|grad L_in| < GRADIENT_TOLERANCE``, from ``start``.

    Heavy-ball descent (until ``|grad| < NEWTON_REGION``; none from a warm start) brings ``phi`` into Newton's
    region of quadratic convergence; Newton steps on the dense Hessian (one ``torch.func.hessian`` and one solve
    each, O(n^3) for n fast weights) finish the job.
    """
    flat = Flat(learner)
    frozen = {name: p.detach() for name, p in meta.items()}

    def inner(phi: Tensor) -> Tensor:
        return learner.inner_loss(flat.unflatten(phi), frozen, task.support)

    phi, velocity = start.detach().clone(), torch.zeros_like(start)
    for _ in range(2000):
        gradient = torch.func.grad(inner)(phi)
        if gradient.norm() < NEWTON_REGION:
            break
        velocity = INNER_MOMENTUM * velocity + gradient
        phi = phi - INNER_LR * velocity
    for _ in range(50):
        gradient, hessian = torch.func.grad(inner)(phi), torch.func.hessian(inner)(phi)
        if gradient.norm() < GRADIENT_TOLERANCE:
            return InnerSolution(phi, gradient.norm().item(), hessian)
        phi = phi - torch.linalg.solve(hessian, gradient)
    raise RuntimeError(f"Newton did not reach |grad| < {GRADIENT_TOLERANCE}: {gradient.norm():.2e}.")


def exact_meta_gradient(learner: ComplexSynapse, batch: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The IFT meta-gradient at the exact inner solutions, averaged over tasks, and the solutions' diagnostics.

    Per task: ``v = H^-1 dL_q/dphi`` by a dense solve, then ``g = dL_q/dtheta - d/dtheta (dL_in/dphi . v)`` with
    ``v`` held fixed (one double-backward pass).
    """
    flat = Flat(learner)
    meta = {name: p.detach().clone().requires_grad_() for name, p in learner.named_meta_parameters()}
    start = flat.flatten(learner.init_fast(meta)).detach()
    total = {name: torch.zeros_like(p) for name, p in meta.items()}
    smallest_eigenvalues, gradient_norms = [], []
    tasks = float64_tasks(batch)
    for task in tasks:
        solved = solve_inner(learner, meta, task, start)
        solution = solved.phi.clone().requires_grad_()
        query_loss = learner.query_loss(flat.unflatten(solution), meta, task.query)
        query_grad, *direct = torch.autograd.grad(query_loss, [solution, *meta.values()], allow_unused=True)
        adjoint = torch.linalg.solve(solved.hessian, query_grad)
        inner_loss = learner.inner_loss(flat.unflatten(solution), meta, task.support)
        (inner_grad,) = torch.autograd.grad(inner_loss, solution, create_graph=True)
        mixed = torch.autograd.grad(inner_grad @ adjoint, list(meta.values()), allow_unused=True)
        for (name, p), d, m in zip(meta.items(), direct, mixed, strict=True):
            total[name] += (torch.zeros_like(p) if d is None else d) - (torch.zeros_like(p) if m is None else m)
        smallest_eigenvalues.append(torch.linalg.eigvalsh(solved.hessian)[0].item())
        gradient_norms.append(solved.gradient_norm)
    diagnostics = {
        "hessian_min_eigenvalue_per_task": smallest_eigenvalues,
        "hessian_positive_definite": all(e > 0 for e in smallest_eigenvalues),
        "inner_gradient_norm_per_task": gradient_norms,
    }
    return {name: g / len(tasks) for name, g in total.items()}, diagnostics


def converged_query_loss(learner: ComplexSynapse, meta: Params, tasks: list[Task], starts: list[Tensor]) -> float:
    """The meta-objective ``mean_tasks L_q(phi*(theta))`` with each ``phi*`` solved from a warm start."""
    flat = Flat(learner)
    losses = []
    for task, start in zip(tasks, starts, strict=True):
        phi = solve_inner(learner, meta, task, start).phi
        losses.append(learner.query_loss(flat.unflatten(phi), meta, task.query).item())
    return sum(losses) / len(losses)


def finite_difference_check(
    learner: ComplexSynapse, batch: Mapping[str, Any], exact: dict[str, Tensor], per_group: int = 3
) -> dict[str, Any]:
    """Central differences of the converged meta-objective on the ``per_group`` largest-gradient coordinates of
    ``omega`` and of ``lambda``, and their relative error ``|fd - g| / |g|`` to the IFT gradient there."""
    flat = Flat(learner)
    meta = {name: p.detach().clone() for name, p in learner.named_meta_parameters()}
    tasks = float64_tasks(batch)
    starts = [solve_inner(learner, meta, task, flat.flatten(learner.init_fast(meta))).phi for task in tasks]
    coordinates = []
    for group in ("omega.", "lambda."):
        names = [name for name in exact if name.startswith(group)]
        values = torch.cat([exact[name].reshape(-1) for name in names])
        sizes = [exact[name].numel() for name in names]
        for index in values.abs().topk(per_group).indices.tolist():
            for name, size in zip(names, sizes, strict=True):
                if index < size:
                    coordinates.append((name, index))
                    break
                index -= size
    analytic, numeric = [], []
    for name, index in coordinates:
        values = []
        for sign in (1.0, -1.0):
            shifted = {key: value.clone() for key, value in meta.items()}
            shifted[name].view(-1)[index] += sign * FD_STEP
            values.append(converged_query_loss(learner, shifted, tasks, starts))
        numeric.append((values[0] - values[1]) / (2 * FD_STEP))
        analytic.append(exact[name].view(-1)[index].item())
    a, n = torch.tensor(analytic, dtype=torch.float64), torch.tensor(numeric, dtype=torch.float64)
    return {
        "coordinates": [f"{name}[{index}]" for name, index in coordinates],
        "ift": analytic,
        "finite_difference": numeric,
        "step": FD_STEP,
        "relative_error": ((n - a).norm() / a.norm()).item(),
    }


def compare(estimate: dict[str, Tensor], exact: dict[str, Tensor]) -> dict[str, float]:
    """Cosine and relative error of ``estimate`` to ``exact``, over the meta-parameters ``estimate`` has."""
    names = list(estimate)
    g = torch.cat([estimate[name].reshape(-1) for name in names])
    e = torch.cat([exact[name].reshape(-1) for name in names])
    return {
        "cosine": torch.nn.functional.cosine_similarity(g, e, dim=0).item(),
        "relative_error": ((g - e).norm() / e.norm()).item(),
    }


def fit_slope(betas: list[float], errors: list[float]) -> float:
    """Least-squares slope of ``log error`` against ``log beta`` over ``FIT_RANGE``."""
    points = [
        (math.log(b), math.log(e)) for b, e in zip(betas, errors, strict=True) if FIT_RANGE[0] <= b <= FIT_RANGE[1]
    ]
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


CONTRASTIVE_RULES = {  # name -> (symmetric, nudge)
    "one_sided": (False, "full"),
    "symmetric": (True, "full"),
    "linear_one_sided": (False, "linear"),
    "linear_symmetric": (True, "linear"),
}


def beta_sweep(
    learner: ComplexSynapse, batch: Mapping[str, Any], exact: dict[str, Tensor], betas: list[float]
) -> dict[str, Any]:
    """Contrastive one-sided and symmetric, with the full and the linear nudge, with converged phases, at every beta."""
    sweep: dict[str, Any] = {"betas": betas, "inner_steps": CONVERGED_STEPS, "nudged_steps": CONVERGED_STEPS}
    for rule, (symmetric, nudge) in CONTRASTIVE_RULES.items():
        rows = []
        for beta in betas:
            estimator = Contrastive(
                beta=beta,
                symmetric=symmetric,
                nudge=nudge,
                inner_steps=CONVERGED_STEPS,
                nudged_steps=CONVERGED_STEPS,
                **INNER_SGD,
            )
            rows.append(compare(meta_gradient(learner, estimator, batch), exact))
        sweep[rule] = rows
        sweep[f"{rule}_slope"] = fit_slope(betas, [row["relative_error"] for row in rows])
    return sweep


def step_estimators(steps: int) -> dict[str, Estimator]:
    """Every estimator at ``steps`` inner steps, with the benchmark's inner SGD."""
    contrastive = {"beta": T_SWEEP_BETA, "inner_steps": steps, "nudged_steps": steps, **INNER_SGD}
    return {
        **{
            f"contrastive_{rule}": Contrastive(symmetric=symmetric, nudge=nudge, **contrastive)
            for rule, (symmetric, nudge) in CONTRASTIVE_RULES.items()
        },
        "maml": MAML(inner_steps=steps, **INNER_SGD),
        "first_order_maml": FirstOrderMAML(inner_steps=steps, **INNER_SGD),
        "implicit": Implicit(inner_steps=steps, cg_steps=CG_STEPS, **INNER_SGD),
        "reptile": Reptile(inner_steps=steps, **INNER_SGD),
    }


def steps_sweep(
    learner: ComplexSynapse, batch: Mapping[str, Any], exact: dict[str, Tensor], steps: list[int]
) -> dict[str, Any]:
    """Every estimator at every number of inner steps; Reptile on the ``learn_lambda=False`` learner."""
    fixed_strengths, _ = make_problem(learn_lambda=False)
    omega_only = {name: g for name, g in exact.items() if name.startswith("omega.")}
    try:
        Reptile().check_learner(learner)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    sweep: dict[str, Any] = {
        "steps": steps,
        "beta": T_SWEEP_BETA,
        "cg_steps": CG_STEPS,
        "contrastive_nudged_steps": "T",
        "reptile_learner": "learn_lambda=False (omega only)",
        "reptile_refused_with_learned_strengths": refusal,
        "rows": {},
    }
    for count in steps:
        for method, estimator in step_estimators(count).items():
            target, reference = (fixed_strengths, omega_only) if method == "reptile" else (learner, exact)
            try:
                result = compare(meta_gradient(target, estimator, batch), reference)
            except InnerLoopError as error:  # e.g. Implicit at an unconverged point where the Hessian is indefinite
                result = {"cosine": math.nan, "relative_error": math.nan, "faulted_tasks": len(error.faults)}
            sweep["rows"].setdefault(method, []).append(result)
    return sweep


def step_cell(row: dict[str, float]) -> str:
    """``cosine / relative error``, or how many tasks faulted (the library's inner-loop fault) instead."""
    if "faulted_tasks" in row:
        return f"fault ({row['faulted_tasks']:.0f} of {NUM_TASKS} tasks)"
    return f"{row['cosine']:.4f} / {row['relative_error']:.1e}"


def plot(results: dict[str, Any], figure: Path) -> None:
    """Relative error against beta (log-log) and against inner steps, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    beta = results["beta_sweep"]
    for rule, marker in zip(CONTRASTIVE_RULES, "osvD", strict=True):
        errors = [row["relative_error"] for row in beta[rule]]
        label = f"{rule.replace('_', ' ')}{'' if rule.startswith('linear') else ' (full nudge)'}"
        left.loglog(beta["betas"], errors, marker=marker, label=f"{label}, slope {beta[f'{rule}_slope']:.2f}")
    left.axvspan(*FIT_RANGE, color="0.92", zorder=0, label="fit range")
    left.set(
        xlabel="beta",
        ylabel="relative error to exact meta-gradient",
        title=f"Contrastive, converged phases ({CONVERGED_STEPS} steps)",
    )
    left.legend()
    steps = results["steps_sweep"]
    for method, rows in steps["rows"].items():
        right.loglog(
            steps["steps"], [row["relative_error"] for row in rows], marker="o", label=method.replace("_", " ")
        )
    right.set(
        xlabel="inner steps T",
        ylabel="relative error to exact meta-gradient",
        title=f"versus inner steps (beta {steps['beta']})",
    )
    right.legend(fontsize=8)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)
    plt.close(fig)


def run(out_dir: Path, quick: bool, figure: Path = DEFAULT_FIGURE) -> Path:
    """Compute the exact gradient, its finite-difference check and both sweeps; write the JSON and the figure."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    mode = "quick" if quick else "full"
    learner, batch = make_problem()
    exact, diagnostics = exact_meta_gradient(learner, batch)
    results: dict[str, Any] = {
        "mode": mode,
        "problem": {
            "network": f"1-{WIDTH}-{WIDTH}-1 tanh MLP, float64",
            "learner": f"ComplexSynapse(loss='mse', init_lambda={INIT_LAMBDA}, learn_lambda=True)",
            "meta_parameters": sum(p.numel() for _, p in learner.named_meta_parameters()),
            "tasks": f"{NUM_TASKS} sinusoid tasks, {SHOTS} support / {SHOTS} query points, seed {SEED}",
            "inner_sgd": {"lr": INNER_LR, "momentum": INNER_MOMENTUM},
        },
        "exact": {**diagnostics, "norm": torch.cat([g.reshape(-1) for g in exact.values()]).norm().item()},
        "finite_difference_check": finite_difference_check(learner, batch, exact, per_group=2 if quick else 3),
        "beta_sweep": beta_sweep(learner, batch, exact, BETAS[mode]),
        "steps_sweep": steps_sweep(learner, batch, exact, STEPS[mode]),
    }
    results["seconds"] = time.perf_counter() - started
    plot(results, figure)
    results["figure"] = str(figure.relative_to(REPOSITORY)) if figure.is_relative_to(REPOSITORY) else str(figure)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gradient_quality.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def report(json_path: Path) -> str:
    """A markdown section: the problem, the finite-difference check, both sweeps and how to reproduce them."""
    r = json.loads(json_path.read_text())
    fd, exact, beta, steps = r["finite_difference_check"], r["exact"], r["beta_sweep"], r["steps_sweep"]
    eigenvalues = ", ".join(f"{e:.3f}" for e in exact["hessian_min_eigenvalue_per_task"])
    lines = [
        "## Gradient quality against the exact meta-gradient",
        "",
        f"Problem: {r['problem']['learner']} over a {r['problem']['network']} "
        f"({r['problem']['meta_parameters']} meta-parameters), {r['problem']['tasks']}; inner SGD lr "
        f"{r['problem']['inner_sgd']['lr']}, momentum {r['problem']['inner_sgd']['momentum']} for every estimator.",
        f"Exact gradient: implicit function theorem at inner solutions solved to |grad| <= "
        f"{max(exact['inner_gradient_norm_per_task']):.1e}, dense Hessian and `torch.linalg.solve`. The Hessian "
        f"at every solution is positive definite: {exact['hessian_positive_definite']} (smallest eigenvalues "
        f"{eigenvalues}).",
        f"Finite-difference check (central, step {fd['step']:g}, on {len(fd['coordinates'])} coordinates: "
        f"{', '.join(fd['coordinates'])}): relative error {fd['relative_error']:.1e}.",
        "",
        f"### Versus beta (Contrastive, {beta['inner_steps']} free / {beta['nudged_steps']} nudged steps)",
        "",
        f"Fitted log-log slopes of the relative error over beta in [{FIT_RANGE[0]:g}, {FIT_RANGE[1]:g}] "
        "(theory: 1 one-sided, 2 symmetric): "
        + ", ".join(f"{rule.replace('_', ' ')} **{beta[f'{rule}_slope']:.2f}**" for rule in CONTRASTIVE_RULES)
        + ". Without `linear`: the paper's full nudge.",
        "",
        *table(
            ["beta", *(f"{rule.replace('_', ' ')} rel. error" for rule in CONTRASTIVE_RULES)],
            [
                [f"{b:.2g}", *(f"{beta[rule][i]['relative_error']:.2e}" for rule in CONTRASTIVE_RULES)]
                for i, b in enumerate(beta["betas"])
            ],
        ),
        "",
        f"### Versus inner steps T (beta {steps['beta']}; Contrastive T free / T nudged steps; Implicit "
        f"{steps['cg_steps']} CG steps)",
        "",
        "Cosine / relative error to the converged exact gradient. Reptile is refused on this learner (learned "
        "strengths have no Reptile update), so it runs on the `learn_lambda=False` variant and is compared on the "
        "omega part, the exact gradient of that variant; its update `omega - phi_T` is a direction, not a "
        "gradient estimate, so its cosine is the measure. MAML's gradient is exact for its T-step loop, not for "
        "the converged solution.",
        "",
        *table(
            ["method", *[f"T={t}" for t in steps["steps"]]],
            [[method.replace("_", " "), *(step_cell(row) for row in rows)] for method, rows in steps["rows"].items()],
        ),
        "",
        f"![gradient quality]({r['figure']})",
        "",
        f"Reproduce ({r['seconds']:.0f} s, {r['mode']} run, one thread): "
        "`python -m benchmarks.gradient_quality --out DIR` (add `--quick` for a ~10 s check).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gradient_quality.json")
    parser.add_argument("--quick", action="store_true", help="fewer betas and step counts (a few seconds)")
    parser.add_argument("--figure", type=Path, default=DEFAULT_FIGURE, help="where the figure goes")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    path = run(args.out, args.quick, args.figure.resolve())
    print(report(path))


if __name__ == "__main__":
    main()
