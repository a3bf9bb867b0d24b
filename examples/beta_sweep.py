"""How the contrastive meta-gradient's error depends on beta and on how well the inner phases converge (~1 minute).

    pip install -e ".[plots]" && python examples/beta_sweep.py [--wandb]

The problem has an exact meta-gradient: a complex-synapse linear regression (``f(x) = phi^T [x, 1]``, mean-squared
error, per-synapse strengths ``lambda``), whose inner problem is quadratic. With ``A = (2/n) Xs^T Xs``,
``b = (2/n) Xs^T ys`` and ``M = A + diag(lambda)``, the inner solution is ``phi* = M^-1 (b + lambda * omega)``; with
``v = (2/m) Xq^T (Xq phi* - yq)`` and ``u = M^-1 v`` the meta-gradient is ``dL/domega = lambda * u`` and
``dL/dlog_lambda = -(phi* - omega) * u * lambda``, averaged over tasks (solved here with ``torch.linalg.solve``).

The script sweeps beta, and the number of steps of every inner phase, for the one-sided and the symmetric
contrastive rule, and plots the relative error ``|g - g*| / |g*|`` against beta, log-log, with the slope of each
line over the small betas in its legend. Theory: with converged phases the error is the rule's bias, O(beta)
one-sided (slope 1) and O(beta^2) symmetric (slope 2); with phases stopped at a residual gradient ``delta`` the
one-sided error grows like ``delta / beta`` (slope -1). The symmetric rule levels off instead: both of its nudged
phases continue the unfinished free phase alike, and their difference cancels that continuation (exactly, for
this quadratic inner problem), leaving only the truncation of the response to the nudge. The figure goes to
``docs/beta_sweep.png`` and, with ``--wandb``, to a W&B run as well (offline when no API key is configured).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from tqdm import tqdm

from lightning_contrastive import ComplexSynapse, Contrastive, meta_gradient
from lightning_contrastive.loggers import OfflineFallbackWandbLogger

FEATURES, SUPPORT, QUERY, TASKS = 5, 10, 10, 4
INNER_LR = 0.05  # with momentum 0.9, 1000 steps converge every phase to round-off in float64
SLOPE_FIT_MAX_BETA = 1e-2  # slopes are fitted over the betas up to this one, where the asymptotics hold
RULES = {"one-sided": False, "symmetric": True}


@dataclass(frozen=True)
class Regression:
    """A float64 complex-synapse linear regression and the episodic batch it is meta-trained on."""

    learner: ComplexSynapse
    batch: dict[str, tuple[Tensor, Tensor]]


def regression(seed: int = 1) -> Regression:
    """Strengths spread over [e^-0.7, e^0.7]; target offsets of +-0.3 give the query loss a large gradient."""
    torch.manual_seed(seed)
    learner = ComplexSynapse(nn.Linear(FEATURES, 1).double(), loss="mse", init_lambda=1.0)
    with torch.no_grad():
        for log_strength in learner.get_submodule("lambda").parameters():
            log_strength.uniform_(-0.7, 0.7)
    xs = torch.randn(TASKS, SUPPORT, FEATURES, dtype=torch.float64)
    xq = torch.randn(TASKS, QUERY, FEATURES, dtype=torch.float64)
    weights = torch.randn(TASKS, FEATURES, 1, dtype=torch.float64)
    return Regression(learner, {"train": (xs, xs @ weights + 0.3), "test": (xq, xq @ weights - 0.3)})


def flat(tensors: dict[str, Tensor], learner: ComplexSynapse, kind: str) -> Tensor:
    """The ``kind`` (``omega`` or ``lambda``) tensors as one vector ``[weight, bias]``, the layout of ``[x, 1]``."""
    return torch.cat([tensors[f"{kind}.{name}"].detach().flatten() for name in learner.fast_names])


def exact_meta_gradient(problem: Regression) -> Tensor:
    """``[dL/domega, dL/dlog_lambda]`` in closed form (see the module docstring), averaged over tasks."""
    meta = problem.learner.meta_parameters()
    omega, strengths = flat(meta, problem.learner, "omega"), flat(meta, problem.learner, "lambda").exp()
    (xs, ys), (xq, yq) = problem.batch["train"], problem.batch["test"]
    per_task = []
    for task in range(TASKS):
        support, query = with_ones(xs[task]), with_ones(xq[task])
        system = 2 / SUPPORT * support.T @ support + torch.diag(strengths)
        phi = torch.linalg.solve(system, 2 / SUPPORT * support.T @ ys[task, :, 0] + strengths * omega)
        u = torch.linalg.solve(system, 2 / QUERY * query.T @ (query @ phi - yq[task, :, 0]))
        per_task.append(torch.cat([strengths * u, -(phi - omega) * u * strengths]))
    return torch.stack(per_task).mean(0)


def with_ones(x: Tensor) -> Tensor:
    """``[x, 1]``: the bias as one more feature."""
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)


def contrastive_error(problem: Regression, exact: Tensor, beta: float, symmetric: bool, steps: int) -> float:
    """``|g - g*| / |g*|`` for the contrastive rule with ``steps`` steps in the free and in each nudged phase."""
    # The full nudge, as docs/beta_sweep.png was made; python -m benchmarks.gradient_quality sweeps both nudges.
    estimator = Contrastive(
        beta=beta, symmetric=symmetric, inner_steps=steps, nudged_steps=steps, nudge="full", inner_lr=INNER_LR
    )
    gradient = meta_gradient(problem.learner, estimator, problem.batch)
    estimate = torch.cat([flat(gradient, problem.learner, kind) for kind in ("omega", "lambda")])
    return float((estimate - exact).norm() / exact.norm())


def log_log_slope(betas: list[float], errors: list[float]) -> float:
    """Least-squares slope of ``log(error)`` against ``log(beta)``."""
    x, y = torch.tensor(betas).log(), torch.tensor(errors).log()
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / x.square().sum())


def sweep(betas: list[float], step_counts: list[int]) -> dict[tuple[str, int], list[float]]:
    """Relative error at every beta, by (rule, steps)."""
    problem = regression()
    exact = exact_meta_gradient(problem)
    grid = [(rule, steps, beta) for rule in RULES for steps in step_counts for beta in betas]
    errors: dict[tuple[str, int], list[float]] = {}
    for rule, steps, beta in tqdm(grid, desc="beta sweep", unit="estimate"):
        errors.setdefault((rule, steps), []).append(contrastive_error(problem, exact, beta, RULES[rule], steps))
    return errors


def slope(betas: list[float], errors: list[float]) -> float:
    """The log-log slope over the betas up to :data:`SLOPE_FIT_MAX_BETA`."""
    small = [(beta, error) for beta, error in zip(betas, errors, strict=True) if beta <= SLOPE_FIT_MAX_BETA]
    return log_log_slope([beta for beta, _ in small], [error for _, error in small])


def signed(value: float) -> str:
    """``value`` to two decimals with its sign, and a flat slope as ``+0.00`` rather than ``-0.00``."""
    return f"{round(value, 2) + 0.0:+.2f}"  # -0.0 + 0.0 == +0.0


def figure(betas: list[float], errors: dict[tuple[str, int], list[float]]) -> Figure:
    """One log-log panel per rule, one line per number of inner steps, its small-beta slope in the legend."""
    step_counts = sorted({steps for _, steps in errors})
    colours = matplotlib.colormaps["viridis"](torch.linspace(0.0, 0.9, len(step_counts)).tolist())
    fig = Figure(figsize=(11, 4.6), layout="constrained")  # no pyplot: no display or global figure state needed
    axes = fig.subplots(1, len(RULES), sharey=True)
    for axis, rule in zip(axes, RULES, strict=True):
        for steps, colour in zip(step_counts, colours, strict=True):
            line = errors[(rule, steps)]
            label = f"{steps} steps/phase: slope {signed(slope(betas, line))}"
            axis.loglog(betas, line, "o-", color=colour, markersize=4, label=label)
        axis.axvspan(min(betas), SLOPE_FIT_MAX_BETA, color="0.93", zorder=0)
        expected = "O(beta): slope 1" if rule == "one-sided" else "O(beta^2): slope 2"
        axis.set_title(f"{rule} rule (bias {expected})")
        axis.set_xlabel("beta")
        axis.grid(True, which="major", alpha=0.3)
        axis.legend(fontsize=8, loc="lower right", title="slope fitted over the shaded betas", title_fontsize=8)
    axes[0].set_ylabel("relative error  |g - g*| / |g*|")
    fig.suptitle(
        "Contrastive meta-gradient against the exact one on a complex-synapse linear regression\n"
        "converged phases leave the rule's bias; short phases add residual / beta one-sided, a constant symmetric",
        fontsize=10,
    )
    return fig


def log_to_wandb(figure_path: Path, betas: list[float], errors: dict[tuple[str, int], list[float]]) -> None:
    """The figure, the errors as a table and their slopes, in one W&B run under ``lightning_logs/wandb``, as the
    shipped configs' runs (offline without an API key)."""
    logger = OfflineFallbackWandbLogger(project="lightning-contrastive", name="beta-sweep", save_dir="lightning_logs")
    logger.log_hyperparams(
        {"betas": betas, "step_counts": sorted({steps for _, steps in errors}), "inner_lr": INNER_LR}
    )
    logger.log_image("beta_sweep/figure", [str(figure_path)])
    rows = [
        [rule, steps, beta, error]
        for (rule, steps), line in errors.items()
        for beta, error in zip(betas, line, strict=True)
    ]
    logger.log_table("beta_sweep/errors", columns=["rule", "steps", "beta", "relative_error"], data=rows)
    logger.log_metrics(
        {f"beta_sweep/slope/{rule}/{steps}_steps": slope(betas, line) for (rule, steps), line in errors.items()}
    )
    logger.experiment.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 30, 100, 1000], help="inner steps per phase")
    parser.add_argument("--num-betas", type=int, default=13, help="betas, log-spaced over [1e-4, 1e-1]")
    parser.add_argument("--output", type=Path, default=Path("docs/beta_sweep.png"), help="where to write the PNG")
    parser.add_argument("--wandb", action="store_true", help="also log the figure and the numbers to W&B")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a 6-parameter regression: threads would only add overhead
    betas = torch.logspace(-4, -1, args.num_betas, dtype=torch.float64).tolist()
    errors = sweep(betas, args.steps)

    print(f"\nrelative error |g - g*| / |g*| ({', '.join(f'beta={beta:.2g}' for beta in betas)}):")
    for (rule, steps), line in errors.items():
        print(
            f"  {rule:>9} {steps:>5} steps: slope {signed(slope(betas, line))} | " + " ".join(f"{e:.1e}" for e in line)
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure(betas, errors).savefig(args.output, dpi=150)
    print(f"figure written to {args.output}")
    if args.wandb:
        log_to_wandb(args.output, betas, errors)


if __name__ == "__main__":
    main()
