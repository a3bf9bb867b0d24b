"""Can the complex synapse's inner problem be solved to a small residual in an affordable number of gradient
evaluations? (issue 26, part 1)

On real Omniglot 20-way 1-shot tasks (the fixed meta-test episodes of the library's ``OmniglotDataModule``) the
inner problem of :class:`~lightning_contrastive.ComplexSynapse` with a fixed pull is

    ``L_in(phi) = CE(f(x_s; phi), y_s) + sum_i lambda_i / 2 (phi_i - omega_i)^2``,   ``lambda_i = 0.5``,

on a Conv4 backbone, and ``phi = omega`` at the start. For each cell (start state x network x problem x solver)
and each task this script runs a solver from ``omega`` for a budget of gradient evaluations and records, at every
evaluated point, the residual ``r = ||dL_in/dphi||_2`` (over all fast weights, the yardstick of
``minimise(tolerance=...)``) and ``L_in``. A cell's table row gives the evaluations to the first point whose
residual is at most 1e-1, 1e-2 and 1e-3 of the starting residual, the final ratio, ``L_in`` at the last point, the
query accuracy there, and the CPU time the budget took.

- **Solvers**: the library's momentum SGD (``InnerSGD``: ``sgd-0.01``, ``sgd-0.05``, momentum 0.9, zero starting
  velocity); L-BFGS with a strong-Wolfe line search (``torch.optim.LBFGS``, history 20, on a flat view; every
  function-and-gradient evaluation of its line search counts); Nesterov's accelerated gradient with adaptive
  gradient restart (O'Donoghue and Candes, 2015: the momentum resets whenever ``g . (x_k - x_(k-1)) > 0``); and Adam.
- **Networks** (``norm-units``): ``batch``, ``instance`` (per-image ``GroupNorm``) or ``none`` (normalisation
  removed), with ``relu`` (ReLU, max-pool) or ``smooth`` (GELU, average pool) units.
- **States**: ``untrained`` (the network's initialisation) and ``trained``: the same initialisation after
  ``--meta-steps`` meta-steps of first-order MAML (10 inner steps of momentum SGD, lr 0.05, momentum 0.9; Adam
  1e-3; meta-batch 2, the fixed pull), cached under ``--cache``, or the ``omega`` of a run's ``--checkpoint``.
- **Problems** (remedies): ``reference`` (the pull above); ``own-scale``: every convolution weight that feeds a
  normalisation is pulled in its own scale, ``lambda / ||omega_l||^2`` per layer ``l`` (the loss sees only its
  direction ``w / ||w||``), and solved in the coordinates ``phi_l = omega_l + ||omega_l|| z_l`` where that pull is
  ``lambda / 2 ||z_l||^2``; ``strong-pull``: ``lambda = 5`` on every weight; ``fixed-readout``: the linear head
  stays at ``omega`` and only the body adapts; ``readout-only``: only the head adapts (a convex problem: the
  control that shows what a solver reaches when the problem allows it); and ``no-norm``, which swaps the network
  for its ``none-`` counterpart.

Cost: one gradient evaluation of Conv4-32 on a 20-image support set takes 15-20 ms on one CPU thread, so a cell of
3 tasks x 400 evaluations about 20-25 s. The default table (2 states x 3 networks x 5 solvers, then 5 remedies x 2
networks x 2 solvers, then a float64 check: 216 solves) took 36 min of one core on a shared 2-core machine: 25 min
of solves, 9 min meta-training the five networks' trained starts (once; cached), 2 min of curvature estimates.
``--quick`` (Conv4-8, one task, 40 evaluations) runs in about 10 s. Results are appended to ``--out`` (JSON lines)
as each run ends, and runs already there are skipped, so an interrupted table resumes; the markdown table is
printed at the end (``docs/results/solvability.md`` holds the findings).

    OMP_NUM_THREADS=1 python -m benchmarks.diagnostics.solvability --out outputs/solvability.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks import omniglot_root
from benchmarks.diagnostics.solvers import (
    SOLVERS,
    Flat,
    curvature_extremes,
    solve,
)
from lightning_contrastive import ComplexSynapse, FirstOrderMAML, Split, Task, estimate, split_batch
from lightning_contrastive.data import OmniglotDataModule
from lightning_contrastive.networks import Conv4

PULL = 0.5
"""The fixed strength ``lambda`` of the authors' Omniglot runs."""
STRONG_PULL = 5.0
"""The ``strong-pull`` remedy's ``lambda``, ten times the authors'."""
PROBLEMS = ("reference", "own-scale", "strong-pull", "fixed-readout", "readout-only")
TOLERANCES = (1e-1, 1e-2, 1e-3)
"""Residuals relative to the start that the table reports the evaluations to."""


def build_network(name: str, channels: int, ways: int, seed: int) -> nn.Module:
    """``Conv4`` named ``<norm>-<units>``: norm ``batch``, ``instance`` or ``none``; units ``relu`` or ``smooth``."""
    norm, _, units = name.partition("-")
    if norm not in ("batch", "instance", "none") or units not in ("relu", "smooth"):
        raise ValueError(f"A network is <batch|instance|none>-<relu|smooth>, e.g. batch-relu; got {name!r}.")
    torch.manual_seed(seed)
    network = Conv4(1, ways, channels, norm="batch" if norm == "none" else norm, smooth=units == "smooth")
    if norm == "none":
        for index, layer in enumerate(network.features):
            if isinstance(layer, nn.BatchNorm2d):
                network.features[index] = nn.Identity()
    return network


def normalised_weights(network: nn.Module) -> list[str]:
    """The convolution weights that feed a normalisation layer: the loss sees only their direction."""
    names = []
    layers = list(network.features)
    for index, layer in enumerate(layers[:-1]):
        if isinstance(layer, nn.Conv2d) and isinstance(layers[index + 1], nn.BatchNorm2d | nn.GroupNorm):
            names.append(f"features.{index}.weight")
    return names


def meta_train(
    network: nn.Module, data: OmniglotDataModule, steps: int, seed: int
) -> tuple[dict[str, Tensor], float, float]:
    """``omega`` after ``steps`` meta-steps of first-order MAML from ``network``'s weights (10 inner steps of
    momentum SGD at lr 0.05, momentum 0.9, under the fixed pull; Adam 1e-3 outside), the CPU seconds it took, and
    the mean query loss after adaptation over its last 20 meta-batches."""
    torch.manual_seed(seed)
    learner = ComplexSynapse(network, init_lambda=PULL, learn_lambda=False)
    estimator = FirstOrderMAML(inner_steps=10, inner_lr=0.05, inner_momentum=0.9)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    began, query_losses = time.process_time(), []
    data.setup("fit")
    for _, batch in zip(range(steps), data.train_dataloader(), strict=False):
        optimizer.zero_grad()
        result = estimate(learner, estimator, batch, batched=False)  # its value is the mean query loss
        result.surrogate.backward()
        optimizer.step()
        query_losses.append(float(result.surrogate.detach()))
    omega = {name: w.detach().clone() for name, w in learner.omega.named_parameters()}
    return omega, {
        "cpu_seconds": time.process_time() - began,
        "first_query_loss": statistics.fmean(query_losses[:20]),
        "last_query_loss": statistics.fmean(query_losses[-20:]),
    }


@dataclass(frozen=True)
class Problem:
    """One task's inner problem over the flat fast weights: ``loss(phi)``, the ``start`` ``omega``, the per-weight
    ``scale`` of the solver's coordinates (``phi = start + scale * z``), and the query ``accuracy`` at a point."""

    loss: Callable[[Flat], Tensor]
    start: Flat
    scale: Flat
    accuracy: Callable[[Flat], float]


def inner_problem(network: nn.Module, omega: Mapping[str, Tensor], task: Task, kind: str) -> Problem:
    """The :class:`ComplexSynapse` inner loss of ``task`` from ``omega``, as the remedy ``kind`` changes it."""
    learner = ComplexSynapse(network, init_lambda=PULL, learn_lambda=True)
    dtype = next(iter(omega.values())).dtype
    learner.to(dtype)
    meta = {name: p.detach() for name, p in learner.meta_parameters().items()}
    meta.update({f"omega.{name}": w for name, w in omega.items()})
    fast_names = list(learner.fast_names)
    scales = {name: 1.0 for name in fast_names}
    if kind == "own-scale":
        normalised = normalised_weights(network)
        if not normalised:
            raise ValueError("The own-scale pull needs a network with normalisation; this one has none.")
        for name in normalised:
            norm = float(omega[name].norm())
            meta[f"lambda.{name}"] = torch.full_like(omega[name], math.log(PULL / norm**2))
            scales[name] = norm
    elif kind == "strong-pull":
        for name in fast_names:
            meta[f"lambda.{name}"] = torch.full_like(omega[name], math.log(STRONG_PULL))
    elif kind == "fixed-readout":
        fast_names = [name for name in fast_names if not name.startswith("head.")]
    elif kind == "readout-only":
        fast_names = [name for name in fast_names if name.startswith("head.")]
    elif kind != "reference":
        raise ValueError(f"A problem is one of {', '.join(PROBLEMS)}; got {kind!r}.")
    fixed = {name: omega[name] for name in learner.fast_names if name not in fast_names}
    shapes = [omega[name].shape for name in fast_names]
    sizes = [omega[name].numel() for name in fast_names]
    support = Split(task.support.x.to(dtype), task.support.y)
    query = Split(task.query.x.to(dtype), task.query.y)

    def unflatten(flat: Flat) -> dict[str, Tensor]:
        parts = torch.split(flat, sizes)
        return {**fixed, **{n: p.view(s) for n, p, s in zip(fast_names, parts, shapes, strict=True)}}

    def loss(flat: Flat) -> Tensor:
        return learner.inner_loss(unflatten(flat), meta, support)

    def accuracy(flat: Flat) -> float:
        with torch.no_grad():
            logits = learner.predict(unflatten(flat), meta, query.x)
        return float((logits.argmax(-1) == query.y).double().mean())

    start = torch.cat([omega[name].reshape(-1) for name in fast_names])
    scale = torch.cat([torch.full((omega[name].numel(),), scales[name], dtype=dtype) for name in fast_names])
    return Problem(loss, start, scale, accuracy)


# ---------------------------------------------------------------------------------------------------------------
# The table.

REMEDY_NETWORK = {"no-norm": lambda name: "none-" + name.partition("-")[2]}
"""Remedies that change the network rather than the problem (the network they swap in)."""


@dataclass(frozen=True)
class Cell:
    """One row of the table: where the problem starts, on which network, which problem, which solver, which dtype."""

    state: str
    network: str
    problem: str
    solver: str
    dtype: str = "float32"

    def key(self) -> str:
        return "/".join(asdict(self).values())


def plan(args: argparse.Namespace) -> list[Cell]:
    """Every cell the flags ask for: the main grid, then each remedy on its networks, then the float64 check."""
    cells = [Cell(s, n, "reference", v) for s in args.states for n in args.nets for v in args.solvers]
    for remedy in args.remedies:
        for state in args.states:
            for network in args.remedy_nets:
                if remedy in REMEDY_NETWORK:
                    cells += [Cell(state, REMEDY_NETWORK[remedy](network), "reference", v) for v in args.remedy_solvers]
                else:
                    cells += [Cell(state, network, remedy, v) for v in args.remedy_solvers]
    cells += [Cell(s, args.nets[0], "reference", v, "float64") for s in args.states for v in args.float64_solvers]
    return list(dict.fromkeys(cells))


def run(cell: Cell, problem: Problem, evaluations: int) -> dict[str, object]:
    """One solve of one task's problem: the trace and its summary, as a JSON-ready record."""
    trace = solve(problem.loss, problem.start, SOLVERS[cell.solver], evaluations, problem.scale)
    assert trace.last_point is not None
    return {
        "evaluations_to": {str(t): trace.evaluations_to(t) for t in TOLERANCES},
        "start_residual": trace.residuals[0],
        "final_ratio": trace.residuals[-1] / trace.residuals[0],
        "min_ratio": min(trace.residuals) / trace.residuals[0],
        "late_drift": trace.late_drift(problem.start),
        "start_loss": trace.losses[0],
        "final_loss": trace.losses[-1],
        "query_accuracy": problem.accuracy(trace.last_point),
        "seconds": trace.seconds[-1],
        "residuals": trace.residuals,
        "losses": trace.losses,
    }


def summarise(records: Sequence[Mapping[str, object]]) -> list[dict[str, str]]:
    """One table row per cell (in the order first seen): means and spreads over its tasks."""
    by_cell: dict[str, list[Mapping[str, object]]] = {}
    for record in records:
        by_cell.setdefault(str(record["cell"]), []).append(record)
    rows = []
    for key, runs in by_cell.items():
        state, network, problem, solver, dtype = key.split("/")
        row = {"state": state, "network": network, "problem": problem, "solver": solver, "dtype": dtype}
        row["tasks"] = str(len(runs))
        row["r0"] = _spread([float(r["start_residual"]) for r in runs], "{:.3g}")
        for end, column in enumerate(("Hessian min", "Hessian max")):
            values = [r["curvature"][end] for r in runs if r["curvature"] is not None]  # type: ignore[index]
            row[column] = _spread([float(v) for v in values], "{:.3g}") if values else "n/a"
        for tolerance in TOLERANCES:
            reached = [r["evaluations_to"][str(tolerance)] for r in runs]  # type: ignore[index]
            row[f"evals to {tolerance:g}"] = _reached(reached)
        row["final r/r0"] = _spread([float(r["final_ratio"]) for r in runs], "{:.3g}")
        row["min r/r0"] = _spread([float(r["min_ratio"]) for r in runs], "{:.3g}")
        drifts = [float(r["late_drift"]) for r in runs if "late_drift" in r]
        row["late drift"] = _spread(drifts, "{:.2g}") if drifts else "n/a"
        row["L_in start"] = _spread([float(r["start_loss"]) for r in runs], "{:.3g}")
        row["L_in final"] = _spread([float(r["final_loss"]) for r in runs], "{:.3g}")
        row["query acc %"] = _spread([100 * float(r["query_accuracy"]) for r in runs], "{:.0f}")
        row["CPU s"] = _spread([float(r["seconds"]) for r in runs], "{:.1f}")
        rows.append(row)
    return rows


def _spread(values: Sequence[float], form: str) -> str:
    """``mean ± sd`` over the tasks (the value alone for one task); NaN or infinite values, left by a solve that
    diverged, are left out and counted."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "diverged"
    text = (
        form.format(finite[0])
        if len(finite) == 1
        else f"{form.format(statistics.fmean(finite))} ± {form.format(statistics.stdev(finite))}"
    )
    return text if len(finite) == len(values) else f"{text} ({len(values) - len(finite)} diverged)"


def _reached(evaluations: Sequence[int | None]) -> str:
    """``mean ± sd`` of the evaluations where every task reached the tolerance, ``mean (k/n)`` where some did, or
    ``-``."""
    hits = [e for e in evaluations if e is not None]
    if not hits:
        return "-"
    text = _spread([float(e) for e in hits], "{:.0f}")
    return text if len(hits) == len(evaluations) else f"{text} ({len(hits)}/{len(evaluations)})"


def markdown(rows: Sequence[Mapping[str, str]]) -> str:
    """``rows`` as a markdown table."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The command line.


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    solvers = list(SOLVERS)
    parser.add_argument("--root", type=Path, default=omniglot_root())
    parser.add_argument("--states", nargs="+", choices=["untrained", "trained"], default=["untrained", "trained"])
    parser.add_argument(
        "--nets",
        nargs="+",
        default=["batch-relu", "batch-smooth", "instance-relu"],
        help="<batch|instance|none>-<relu|smooth> (default: batch-relu batch-smooth instance-relu)",
    )
    parser.add_argument("--solvers", nargs="+", choices=solvers, default=solvers)
    parser.add_argument(
        "--remedies",
        nargs="*",
        choices=[*PROBLEMS[1:], *REMEDY_NETWORK],
        default=[*PROBLEMS[1:], *REMEDY_NETWORK],
    )
    parser.add_argument("--remedy-nets", nargs="+", default=["batch-relu", "batch-smooth"], help="networks to remedy")
    parser.add_argument("--remedy-solvers", nargs="+", choices=solvers, default=["sgd-0.05", "lbfgs"])
    parser.add_argument(
        "--float64-solvers",
        nargs="*",
        choices=solvers,
        default=["lbfgs"],
        help="rerun these on the first network in float64 (precision check)",
    )
    parser.add_argument("--tasks", type=int, default=3, help="meta-test episodes per cell (default 3)")
    parser.add_argument("--evals", type=int, default=400, help="gradient evaluations per solve (default 400)")
    parser.add_argument("--channels", type=int, default=32, help="Conv4 channels (default 32)")
    parser.add_argument("--ways", type=int, default=20, help="classes per task (default 20)")
    parser.add_argument("--meta-steps", type=int, default=200, help="first-order MAML steps for the trained start")
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NET=PATH",
        help="take NET's trained omega from a MetaLearningModule checkpoint instead of meta-training",
    )
    parser.add_argument(
        "--power-iterations", type=int, default=20, help="per end of the Hessian spectrum at the start (0: skip)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path("outputs/solvability"), help="trained starts")
    parser.add_argument("--out", type=Path, default=Path("outputs/solvability.jsonl"), help="per-run records")
    parser.add_argument("--quick", action="store_true", help="Conv4-8, one task, 40 evaluations, untrained only")
    args = parser.parse_args(argv)
    if args.quick:
        args.channels, args.tasks, args.evals, args.states = 8, 1, 40, ["untrained"]
        args.nets, args.remedy_nets, args.power_iterations = args.nets[:1], args.nets[:1], 3
    if min(args.tasks, args.evals, args.channels, args.meta_steps) < 1 or args.power_iterations < 0:
        parser.error("--tasks, --evals, --channels and --meta-steps must be >= 1, --power-iterations >= 0.")
    for network in [*args.nets, *args.remedy_nets]:
        build_network(network, 1, 2, 0)  # a bad name fails here, before any work
    args.checkpoint = dict(_pair(text, parser) for text in args.checkpoint)
    return args


def _pair(text: str, parser: argparse.ArgumentParser) -> tuple[str, Path]:
    network, separator, path = text.partition("=")
    if not separator:
        parser.error(f"--checkpoint takes NET=PATH (e.g. batch-relu=runs/x.ckpt); got {text!r}.")
    return network, Path(path)


def trained_omega(network: str, args: argparse.Namespace, data: OmniglotDataModule) -> dict[str, Tensor]:
    """``network``'s trained start: from its ``--checkpoint``, else from the cache, else meta-trained (and cached)."""
    if network in args.checkpoint:
        state = torch.load(args.checkpoint[network], map_location="cpu", weights_only=False)["state_dict"]
        prefix = "learner.omega."
        return {name.removeprefix(prefix): w for name, w in state.items() if name.startswith(prefix)}
    path = args.cache / f"{network}-c{args.channels}-w{args.ways}-fomaml{args.meta_steps}-seed{args.seed}.pt"
    if not path.is_file():
        omega, summary = meta_train(
            build_network(network, args.channels, args.ways, args.seed), data, args.meta_steps, args.seed
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"omega": omega, **summary}, path)
        print(
            f"meta-trained {network}: {args.meta_steps} steps in {summary['cpu_seconds']:.0f} CPU s; query loss "
            f"after 10 steps {summary['first_query_loss']:.3f} (first 20 meta-batches) -> "
            f"{summary['last_query_loss']:.3f} (last 20)",
            flush=True,
        )
    return torch.load(path, weights_only=True)["omega"]


def study_data(args: argparse.Namespace) -> tuple[OmniglotDataModule, list[Task]]:
    """The study's Omniglot data (``--root``, ``--ways``, ``--seed``; its training tasks meta-train the ``trained``
    starts) and its first ``args.tasks`` fixed meta-test episodes, which every solver and cell runs on."""
    data = OmniglotDataModule(
        root=str(args.root),
        ways=args.ways,
        shots=1,
        test_shots=5,
        batch_size=2,
        eval_batch_size=args.tasks,
        num_train_tasks=2 * args.meta_steps,
        num_eval_tasks=args.tasks,
        seed=args.seed,
    )
    data.setup("test")
    return data, split_batch(next(iter(data.test_dataloader())))[: args.tasks]


def main(argv: Sequence[str] | None = None) -> str:
    """Run every planned cell not yet in ``--out``; print and return the markdown table of all of them."""
    args = parse(argv)
    torch.set_num_threads(1)
    data, tasks = study_data(args)
    settings = {"evals": args.evals, "channels": args.channels, "meta_steps": args.meta_steps, "seed": args.seed}
    done = {}
    if args.out.is_file():
        for line in args.out.read_text().splitlines():
            record = json.loads(line)
            if all(record[name] == value for name, value in settings.items()):
                done[(record["cell"], record["task"])] = record
    # The Hessian's extremes depend on the problem, not the solver: computed once per problem and task.
    curvatures = {(_problem_key(key), task): record["curvature"] for (key, task), record in done.items()}
    records = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for cell in plan(args):
        omega: dict[str, Tensor] | None = None
        for index, task in enumerate(tasks):
            if (cell.key(), index) in done:
                records.append(done[(cell.key(), index)])
                continue
            if omega is None:
                omega = start_weights(cell, args, data)
            problem = inner_problem(
                build_network(cell.network, args.channels, args.ways, args.seed), omega, task, cell.problem
            )
            where = (_problem_key(cell.key()), index)
            if where not in curvatures:
                curvatures[where] = (
                    curvature_extremes(problem.loss, problem.start, args.power_iterations)
                    if args.power_iterations
                    else None
                )
            record = {"cell": cell.key(), "task": index, **settings, "curvature": curvatures[where]}
            record.update(run(cell, problem, args.evals))
            with args.out.open("a") as file:
                file.write(json.dumps(record) + "\n")
            records.append(record)
            print(
                f"{cell.key()} task {index}: r/r0 {record['final_ratio']:.3g} (min {record['min_ratio']:.3g}), "
                f"L_in {record['start_loss']:.3f} -> {record['final_loss']:.3f}, {record['seconds']:.1f} s",
                flush=True,
            )
    table = markdown(summarise(records))
    print(table)
    return table


def start_weights(cell: Cell, args: argparse.Namespace, data: OmniglotDataModule) -> dict[str, Tensor]:
    """``omega`` of ``cell``'s start state, in its dtype: the network's initialisation, or the trained start."""
    if cell.state == "trained":
        omega = trained_omega(cell.network, args, data)
    else:
        network = build_network(cell.network, args.channels, args.ways, args.seed)
        omega = {name: p.detach() for name, p in network.named_parameters()}
    return {name: w.to(getattr(torch, cell.dtype)) for name, w in omega.items()}


def _problem_key(cell_key: str) -> str:
    """A cell's key without its solver: state, network, problem and dtype."""
    state, network, problem, _, dtype = cell_key.split("/")
    return "/".join((state, network, problem, dtype))


if __name__ == "__main__":
    main()
