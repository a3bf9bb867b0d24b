"""Is a meta-learned start good only for the number of adaptation steps it was trained with (issue 17)?

Cost: per checkpoint, ``(sum of the multiples) x T`` inner steps and one query pass per episode and multiple, plus
``--power-iterations`` Hessian-vector products per curvature task: about 6 min on Omniglot 20-way Conv4-32, one
thread, 100 episodes and multiples 1, 3, 10.

The contrastive rule estimates the meta-gradient of the query loss at the inner *solution*; MAML differentiates
the ``T``-step adaptation users run. Where the rule's premise holds, adapting longer than ``T`` steps moves a
task's fast weights towards the solution the rule trained for, so the query metric should hold or improve. This
script reads the checkpoints of one meta-training run and, at each, on the first ``--episodes`` fixed meta-test
episodes:

- adapts each task from the meta-learned start with the run's inner optimizer for ``m x T`` steps, for each
  multiple ``m`` of ``--multiples`` (default 1, 3, 10), and for each length of ``--steps`` (e.g. 10, what MAML users
  run; every run starts from zero velocity, as at test time), and reports the query accuracy (classification) or
  loss (regression), and the inner loss ``L_in`` reached;
- with ``--solved DELTA``, adapts until each task's inner gradient norm is at most ``DELTA`` (at most
  ``--solved-cap`` steps) and reports the same, the mean steps taken and the share of tasks left unsolved: the
  start's accuracy where the rule's premise, a solved inner problem, holds;
- estimates the largest eigenvalue of the inner loss's Hessian at the start (power iteration on
  Hessian-vector products, averaged over ``--curvature-tasks`` tasks) beside the inner optimizer's stability
  limit: heavy-ball SGD with learning rate ``eta`` and momentum ``mu`` diverges along a direction of curvature
  above ``2 (1 + mu) / eta`` on a quadratic.

    python -m benchmarks.diagnostics.adaptation_horizon \\
        --config configs/reproduce/omniglot_20way_long/complex_synapse__contrastive_linear.yaml \\
        --checkpoints runs/long/omniglot_20way_long/complex_synapse__contrastive_linear.step=*.ckpt \\
        --set=--data.root=../shared/data/omniglot
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from benchmarks.diagnostics.run_checkpoints import add_run_arguments, each_checkpoint, load_run, print_table
from lightning_contrastive.evaluation import frozen_meta, query_metrics
from lightning_contrastive.inner import minimise
from lightning_contrastive.module import MetaLearningModule
from lightning_contrastive.tasks import Params, Task, split_batch


def top_curvature(objective: Callable[[Params], Tensor], at: Params, iterations: int, seed: int = 0) -> float:
    """The eigenvalue of largest magnitude of ``objective``'s Hessian at ``at``: the Rayleigh quotient after
    ``iterations`` steps of power iteration, one Hessian-vector product (a backward through the gradient, which is
    taken once) each."""
    generator = torch.Generator().manual_seed(seed)
    leaves = {name: p.detach().requires_grad_() for name, p in at.items()}
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in leaves.values()]
    with torch.enable_grad():
        gradient = torch.autograd.grad(objective(leaves), list(leaves.values()), create_graph=True)
    quotient = 0.0
    for _ in range(iterations):
        norm = torch.sqrt(sum((v * v).sum() for v in vector))
        vector = [v / norm for v in vector]
        product = torch.autograd.grad(gradient, list(leaves.values()), vector, retain_graph=True)
        quotient = float(sum((p * v).sum() for p, v in zip(product, vector, strict=True)))
        vector = [p.detach() for p in product]
    return quotient


def horizon_row(
    module: MetaLearningModule,
    tasks: Sequence[Task],
    lengths: Sequence[int],
    curvature_tasks: int,
    iterations: int,
    solved: tuple[float, int] | None = None,
) -> dict[str, float]:
    """One checkpoint's row: the query metric and ``L_in`` after each adaptation length, after adapting to the
    ``solved = (tolerance, cap)`` rule (with its mean steps and unsolved share), and the start's curvature."""
    learner, estimator = module.learner, module.estimator
    meta = frozen_meta(learner, estimator)
    optimizer = estimator.inner_optimizer
    metric = "accuracy" if learner.loss_name == "cross_entropy" else "query_loss"

    def inner_loss(task: Task) -> Callable[[Params], Tensor]:
        return lambda fast: learner.inner_loss(fast, meta, task.support)

    runs = [(f"{length}", length, None) for length in lengths]
    if solved is not None:
        runs.append((f"solved to {solved[0]:g}", solved[1], solved[0]))
    row: dict[str, float] = {}
    for label, steps, tolerance in runs:
        phases = [
            minimise(inner_loss(task), learner.init_fast(meta), steps, optimizer, tolerance=tolerance) for task in tasks
        ]
        values = query_metrics(learner, estimator, list(tasks), [phase.params for phase in phases])[metric]
        row[f"{metric} after {label}"] = float(values.mean()) * (100 if metric == "accuracy" else 1)
        with torch.no_grad():
            inner_losses = [float(inner_loss(task)(phase.params)) for task, phase in zip(tasks, phases, strict=True)]
        row[f"L_in after {label}"] = sum(inner_losses) / len(inner_losses)
        if tolerance is not None:
            row["steps to solve"] = sum(int(phase.steps) for phase in phases) / len(phases)
            row["unsolved %"] = 100 * sum(not bool(phase.solved) for phase in phases) / len(phases)
    start = learner.init_fast(meta)
    curvatures = [top_curvature(inner_loss(task), start, iterations) for task in tasks[:curvature_tasks]]
    row["top curvature at the start"] = sum(curvatures) / len(curvatures)
    # Heavy-ball SGD's limit; an L-BFGS run (no momentum, a line search) has none.
    momentum = getattr(optimizer, "momentum", None)
    row["stability limit 2(1+mu)/lr"] = math.nan if momentum is None else 2 * (1 + momentum) / optimizer.lr
    return row


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--episodes", type=int, default=100, help="fixed meta-test episodes (default 100)")
    parser.add_argument("--multiples", type=int, nargs="*", default=[1, 3, 10], help="adaptation lengths / T")
    parser.add_argument("--steps", type=int, nargs="*", default=[], help="adaptation lengths in steps (e.g. 10)")
    parser.add_argument("--solved", type=float, metavar="DELTA", help="also adapt until the gradient norm is <= DELTA")
    parser.add_argument("--solved-cap", type=int, default=1000, help="the --solved adaptation's cap (default 1000)")
    parser.add_argument("--curvature-tasks", type=int, default=4, help="episodes for the curvature (default 4)")
    parser.add_argument("--power-iterations", type=int, default=25, help="per curvature task (default 25)")
    args = parser.parse_args(argv)
    counts = (args.episodes, args.curvature_tasks, args.power_iterations, args.solved_cap, *args.multiples, *args.steps)
    if min(counts) < 1:
        parser.error(
            "--episodes, --curvature-tasks, --power-iterations, --solved-cap, --multiples and --steps must be >= 1; "
            f"got {counts}."
        )
    if args.solved is not None and not args.solved > 0:
        parser.error(f"--solved must be a gradient norm > 0; got {args.solved}.")
    if not args.multiples and not args.steps and args.solved is None:
        parser.error("Nothing to adapt: give --multiples, --steps or --solved.")
    cli = load_run(args)
    cli.datamodule.setup("test")
    tasks: list[Task] = []
    for batch in cli.datamodule.test_dataloader():  # the run's fixed meta-test episodes, in order
        tasks += split_batch(batch)
        if len(tasks) >= args.episodes:
            break
    tasks = tasks[: args.episodes]
    curvature_tasks = min(args.curvature_tasks, len(tasks))
    rows = []
    steps = cli.model.estimator.adaptation_steps
    lengths = sorted({*(multiple * steps for multiple in args.multiples), *args.steps})
    solved = None if args.solved is None else (args.solved, args.solved_cap)
    for step in each_checkpoint(cli, args.checkpoints):
        row = horizon_row(cli.model, tasks, lengths, curvature_tasks, args.power_iterations, solved)
        rows.append({"meta-step": step, **row})
        print(rows[-1], flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
