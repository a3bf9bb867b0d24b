"""The library's inner solvers on a vmapped meta-batch, as training runs them (issue 26): ``InnerLBFGS`` against
``InnerSGD`` through :func:`~lightning_contrastive.inner.minimise` under ``torch.vmap``, on real Omniglot 20-way
1-shot tasks with the fixed pull of :mod:`benchmarks.diagnostics.solvability`.

For each network and start state, and each solver:

- **to tolerance**: the meta-batch's phase with an absolute tolerance of ``ratio x`` the tasks' mean starting residual
  (``ratio`` 1e-1 and 1e-2), capped at ``--cap`` evaluations: the evaluations each task used (``minimise``'s
  ``steps``: updates for SGD, gradient evaluations for L-BFGS), how many tasks were solved, and the CPU seconds of the
  whole vmapped phase (it runs until its last task is solved, or to the cap);
- **per evaluation**: CPU milliseconds per evaluation of a fixed-length phase (``--per-eval`` evaluations, no
  tolerance), vmapped over the meta-batch and on one task unbatched: the solver's overhead over the objective.

- **phases** (``--phases``): the whole contrastive estimate of each task, ``Contrastive(solver=...)`` with the
  symmetric linear nudge at ``beta = 0.03`` (the authors'), every phase to ``1e-2`` of the mean starting residual with
  caps of ``--cap``: the evaluations each phase used (free, nudged +beta, nudged -beta) and the CPU seconds, unbatched.

The trained starts are :mod:`~benchmarks.diagnostics.solvability`'s (same cache, same flags). Cost: about 6 CPU
minutes with the defaults (3 tasks, cap 300) on one thread.

    OMP_NUM_THREADS=1 python -m benchmarks.diagnostics.solver_speed --out outputs/solver_speed.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from benchmarks import omniglot_root
from benchmarks.diagnostics.solvability import PULL, Cell, build_network, start_weights, study_data
from lightning_contrastive import ComplexSynapse, Contrastive, InnerLBFGS, InnerSGD, Split, Task
from lightning_contrastive.inner import minimise
from lightning_contrastive.tasks import Params

SOLVERS: dict[str, InnerSGD | InnerLBFGS] = {
    "sgd-0.01": InnerSGD(0.01, 0.9),
    "sgd-0.05": InnerSGD(0.05, 0.9),
    "lbfgs-lockstep": InnerLBFGS(0.01),
}
RATIOS = (1e-1, 1e-2)


def meta_batch_phase(
    network: str, omega: dict[str, Tensor], args: argparse.Namespace, xs: Tensor, ys: Tensor
) -> Callable[[InnerSGD | InnerLBFGS, int, float | None, bool], tuple[Tensor, Tensor, Tensor, float]]:
    """``(solver, cap, tolerance, vmapped) -> (steps, residual, solved, CPU s)`` of the free phase of the complex
    synapse on the support sets ``xs, ys`` (one row per task), from ``omega``."""
    learner = ComplexSynapse(build_network(network, args.channels, args.ways, args.seed), init_lambda=PULL)
    meta = {name: p.detach() for name, p in learner.meta_parameters().items()}
    meta.update({f"omega.{name}": w for name, w in omega.items()})

    def one_task(solver: InnerSGD | InnerLBFGS, cap: int, tolerance: float | None) -> Callable[..., tuple]:
        def phase(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            support = Split(x, y)

            def objective(fast: Params) -> Tensor:
                return learner.inner_loss(fast, meta, support)

            found = minimise(objective, learner.init_fast(meta), cap, solver, tolerance=tolerance)
            return found.steps, found.residual, found.solved

        return phase

    def run(
        solver: InnerSGD | InnerLBFGS, cap: int, tolerance: float | None, vmapped: bool
    ) -> tuple[Tensor, Tensor, Tensor, float]:
        phase = one_task(solver, cap, tolerance)
        began = time.process_time()
        if vmapped:
            steps, residual, solved = torch.vmap(phase)(xs, ys)
        else:
            steps, residual, solved = phase(xs[0], ys[0])
        return steps, residual, solved, time.process_time() - began

    return run


def contrastive_phases(
    network: str, omega: dict[str, Tensor], args: argparse.Namespace, tasks: Sequence[Task], tolerance: float
) -> list[dict[str, object]]:
    """Per solver (``sgd`` at lr 0.01, momentum 0.9; ``lbfgs`` with first step 0.01) and task: the steps each phase of
    the contrastive estimate used to reach ``tolerance``, whether it did, and the CPU seconds of the estimate."""
    learner = ComplexSynapse(build_network(network, args.channels, args.ways, args.seed), init_lambda=PULL)
    meta = {name: p.detach() for name, p in learner.meta_parameters().items()}
    meta.update({f"omega.{name}": w for name, w in omega.items()})
    rows = []
    for solver in ("sgd", "lbfgs"):
        estimator = Contrastive(
            beta=0.03, inner_steps=args.cap, inner_lr=0.01, inner_momentum=0.9, tolerance=tolerance, solver=solver
        )
        for index, task in enumerate(tasks):
            began = time.process_time()
            found = estimator.task_estimate(learner, meta, task)
            rows.append(
                {
                    "solver": solver,
                    "task": index,
                    "steps": {phase: int(steps) for phase, steps in found.steps.items()},
                    "solved": {phase: bool(solved) for phase, solved in found.solved.items()},
                    "cpu_s": time.process_time() - began,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def starting_residuals(run: Callable[..., tuple[Tensor, Tensor, Tensor, float]]) -> Tensor:
    """Each task's ``||dL_in/dphi||`` at ``omega``: one SGD evaluation's residual."""
    _, residual, _, _ = run(InnerSGD(1e-12), 1, None, True)
    return residual


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    """Print and return the rows of the tables (or, with ``--phases``, of the phases)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=omniglot_root())
    parser.add_argument("--states", nargs="+", choices=["untrained", "trained"], default=["untrained", "trained"])
    parser.add_argument("--nets", nargs="+", default=["batch-relu", "batch-smooth"])
    parser.add_argument("--solvers", nargs="+", choices=list(SOLVERS), default=list(SOLVERS))
    parser.add_argument("--tasks", type=int, default=3, help="tasks in the meta-batch (default 3)")
    parser.add_argument("--cap", type=int, default=300, help="evaluations at most per phase (default 300)")
    parser.add_argument("--per-eval", type=int, default=20, help="evaluations of the per-evaluation timing")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--meta-steps", type=int, default=200, help="as solvability's trained start")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path("outputs/solvability"), help="solvability's trained starts")
    parser.add_argument("--out", type=Path, default=Path("outputs/solver_speed.json"))
    parser.add_argument("--quick", action="store_true", help="Conv4-8, 2 tasks, cap 30, untrained batch-relu only")
    parser.add_argument(
        "--phases",
        nargs="?",
        const="trained/batch-smooth",
        metavar="STATE/NET",
        help="instead of the tables: every phase of the contrastive estimate (default trained/batch-smooth)",
    )
    args = parser.parse_args(argv)
    args.checkpoint = {}
    if args.quick:
        args.channels, args.tasks, args.cap, args.per_eval = 8, 2, 30, 5
        args.states, args.nets = ["untrained"], args.nets[:1]
    torch.set_num_threads(1)
    data, tasks = study_data(args)
    xs, ys = torch.stack([t.support.x for t in tasks]), torch.stack([t.support.y for t in tasks])
    if args.phases:
        state, _, network = args.phases.partition("/")
        omega = start_weights(Cell(state, network, "reference", "any"), args, data)
        r0 = starting_residuals(meta_batch_phase(network, omega, args, xs, ys))
        phases = contrastive_phases(network, omega, args, tasks, RATIOS[-1] * float(r0.mean()))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(phases, indent=1))
        return phases
    rows = []
    for state in args.states:
        for network in args.nets:
            omega = start_weights(Cell(state, network, "reference", "any"), args, data)  # trained: cached or trained
            run = meta_batch_phase(network, omega, args, xs, ys)
            r0 = starting_residuals(run)
            for name in args.solvers:
                solver = SOLVERS[name]
                row: dict[str, object] = {"state": state, "network": network, "solver": name, "r0": r0.tolist()}
                for ratio in RATIOS:
                    tolerance = ratio * float(r0.mean())
                    steps, residual, solved, seconds = run(solver, args.cap, tolerance, True)
                    row[f"to {ratio:g}"] = {
                        "tolerance": tolerance,
                        "steps": steps.tolist(),
                        "solved": int(solved.sum()),
                        "final r/r0": (residual / r0).tolist(),
                        "cpu_s": seconds,
                    }
                _, _, _, vmapped = run(solver, args.per_eval, None, True)
                _, _, _, alone = run(solver, args.per_eval, None, False)
                row["ms per eval (vmapped batch)"] = 1000 * vmapped / args.per_eval
                row["ms per eval (one task)"] = 1000 * alone / args.per_eval
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(markdown(rows, args.tasks, args.cap))
    return rows


def markdown(rows: Sequence[dict], tasks: int, cap: int) -> str:
    """The rows as a markdown table: steps per task (solved of the meta-batch) and CPU s at each ratio."""
    header = ["state", "network", "solver"]
    header += [f"evals to {r:g} r0 (solved/{tasks})" for r in RATIOS] + [f"CPU s to {r:g} r0" for r in RATIOS]
    header += ["ms/eval vmapped", "ms/eval one task"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["state"], row["network"], row["solver"]]
        for ratio in RATIOS:
            found = row[f"to {ratio:g}"]
            cells.append(f"{', '.join(str(s) for s in found['steps'])} ({found['solved']}/{tasks})")
        cells += [f"{row[f'to {r:g}']['cpu_s']:.1f}" for r in RATIOS]
        cells += [f"{row['ms per eval (vmapped batch)']:.0f}", f"{row['ms per eval (one task)']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n(cap {cap} evaluations; a task at the cap is unsolved)"


if __name__ == "__main__":
    main()
