"""Does the contrastive estimate drift away from MAML's meta-gradient as meta-training moves (issue 17)?

Cost: per checkpoint, one meta-gradient of each of six estimators (MAML, four contrastive rules and the run's own;
seven with ``--implicit``) on each of
``--batches`` held training batches: about 25 s a batch on Omniglot 20-way Conv4-32, one thread.

Users adapt with ``T`` inner steps at test time, so the objective they get is ``L_query(phi_T(theta))``, whose
exact gradient is MAML's at ``T`` steps. The contrastive rule estimates the gradient of ``L_query(phi*(theta))``
at the inner *solution*, which ``T`` steps approach only where the inner problem is well conditioned. This script
reads the checkpoints of one meta-training run and, at each, on the same held training batches, compares:

- the contrastive estimate with the linear nudge (``T`` free / ``T`` nudged steps), with the full nudge, with the
  linear nudge at ``beta / 10`` (in the linear-response regime the two agree), and with the linear nudge and
  ``--long`` steps per phase, against MAML's ``T``-step meta-gradient (cosine over all
  meta-parameters);
- the norms of MAML's meta-gradient and of the ``T``-step linear estimate;
- how far ``T`` free steps are from the inner solution: ``|dL_in/dphi(phi_T)| / |dL_in/dphi(phi_0)|``, the
  gradient norm left after adaptation relative to the start (0 at a solution);
- ``|omega|`` over the convolutions, which BatchNorm makes scale-free: a growing norm shrinks the effective
  inner learning rate of those weights, so the same ``T`` steps converge less;
- the run's own estimator as configured (``run``: e.g. phases to a tolerance, issue 26) beside the rest;
- with ``--implicit DELTA``, every estimate's cosine to the implicit-function-theorem gradient at the inner solution
  as well (``Implicit`` with its phase solved to ``DELTA``, at most ``--implicit-cap`` steps, CG damped by
  ``--implicit-damping``): the gradient the contrastive rule estimates where its premise holds; with it, each
  estimate's norm relative to it and the run's cosine to it per meta-parameter group.

Keep a run's checkpoints (the reproduction's ``--keep-checkpoints``, or a ``ModelCheckpoint`` with
``save_top_k=-1``), then::

    python -m benchmarks.reproduce --only omniglot_20way_long --learners complex_synapse --estimators maml \\
        --keep-checkpoints --out runs/long
    python -m benchmarks.diagnostics.estimate_drift \\
        --config configs/reproduce/omniglot_20way_long/complex_synapse__maml.yaml \\
        --checkpoints runs/long/omniglot_20way_long/complex_synapse__maml.step=*.ckpt \\
        --set=--data.root=../shared/data/omniglot
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from benchmarks.diagnostics.run_checkpoints import add_run_arguments, each_checkpoint, load_run, print_table
from lightning_contrastive import MAML, Contrastive, Implicit
from lightning_contrastive.callbacks._utils import flat_groups, ratio
from lightning_contrastive.callbacks.estimator_agreement import agreement
from lightning_contrastive.estimation import meta_gradient
from lightning_contrastive.estimators import Estimator
from lightning_contrastive.evaluation import adapt_tasks, frozen_meta
from lightning_contrastive.module import MetaLearningModule


def estimators(
    reference: Estimator, beta: float, long: int, implicit: tuple[float, int, float] | None = None
) -> dict[str, Estimator]:
    """MAML at the run's inner steps and SGD, the contrastive rules compared with it on the same SGD, the run's own
    estimator, and with ``implicit = (tolerance, cap, damping)`` the solved implicit gradient."""
    steps = reference.adaptation_steps
    # MAML needs SGD: a run whose estimator solves with L-BFGS is compared on SGD at its initial step and no momentum.
    sgd = {
        "inner_lr": reference.inner_optimizer.lr,
        "inner_momentum": getattr(reference.inner_optimizer, "momentum", 0.0),
    }
    solved = {}
    if implicit is not None:
        tolerance, cap, damping = implicit
        solved["implicit"] = Implicit(inner_steps=cap, tolerance=tolerance, cg_damping=damping, **sgd)
    return {
        **solved,
        "run": reference,
        "maml": MAML(inner_steps=steps, **sgd),
        "linear": Contrastive(beta=beta, inner_steps=steps, nudge="linear", **sgd),
        "full": Contrastive(beta=beta, inner_steps=steps, nudge="full", **sgd),
        "linear_small_beta": Contrastive(beta=beta / 10, inner_steps=steps, nudge="linear", **sgd),
        "linear_long": Contrastive(beta=beta, inner_steps=long, nudge="linear", **sgd),
    }


def flat(grads: Mapping[str, Tensor]) -> Tensor:
    """Every meta-parameter's gradient, as one float64 vector (``flat_groups``' all-parameters group)."""
    return flat_groups(grads.items())[""]


def residual_ratio(module: MetaLearningModule, batch: Mapping[str, Any]) -> float:
    """Mean over tasks of ``|dL_in/dphi|`` after adaptation over the same at the learner's start."""
    learner, estimator = module.learner, module.estimator
    meta = frozen_meta(learner, estimator)
    tasks, adapted = adapt_tasks(learner, estimator, batch)

    def gradient_norm(fast: Mapping[str, Tensor], task: Any) -> float:
        leaves = {name: p.detach().requires_grad_() for name, p in fast.items()}
        with torch.enable_grad():
            grads = torch.autograd.grad(learner.inner_loss(leaves, meta, task.support), list(leaves.values()))
        return float(torch.cat([g.flatten() for g in grads]).norm())

    ratios = [
        gradient_norm(fast, task) / gradient_norm(learner.init_fast(meta), task)
        for task, fast in zip(tasks, adapted, strict=True)
    ]
    return sum(ratios) / len(ratios)


def conv_norm(module: MetaLearningModule) -> float:
    """``|omega|`` over the convolution weights (the 4-dimensional meta-parameters); NaN for a network without."""
    weights = [p for name, p in module.learner.named_meta_parameters() if name.startswith("omega") and p.dim() == 4]
    return float(torch.cat([w.detach().flatten() for w in weights]).norm()) if weights else math.nan


def compared_to_solved(estimates: Mapping[str, Mapping[str, Tensor]], solved: Mapping[str, Tensor]) -> dict[str, float]:
    """Each estimate's cosine and norm ratio to the solved implicit gradient, and the run's cosine per meta-parameter
    group: a group whose cosine is low is where the estimate's bias sits. The norm ratio matters to an outer SGD (a
    ratio below 1 is a shorter step at the same learning rate); Adam, which the reproduction uses, largely ignores
    it."""
    reference = flat_groups(solved.items())
    row: dict[str, float] = {}
    for name, grads in estimates.items():
        estimate = flat(grads)
        row[f"cos {name} to implicit"] = agreement(estimate, reference[""])[0]
        row[f"|{name}| / |implicit|"] = ratio(estimate.norm(), reference[""].norm())
    for group, vector in flat_groups(estimates["run"].items()).items():
        if group:
            row[f"cos run to implicit, {group}"] = agreement(vector, reference[group])[0]
    return row


def diagnose(
    module: MetaLearningModule,
    batches: Sequence[Mapping[str, Any]],
    beta: float,
    long: int,
    implicit: tuple[float, int, float] | None = None,
) -> dict[str, float]:
    """One row: cosines to MAML (and to the solved implicit gradient), norms and the free phase's residual,
    averaged over ``batches``' meta-gradients."""
    compared = estimators(module.estimator, beta, long, implicit)
    sums: dict[str, dict[str, Tensor]] = {}
    for batch in batches:
        for name, estimator in compared.items():
            grads = meta_gradient(module.learner, estimator, batch, on_fault="skip")
            total = sums.setdefault(name, {})
            for key, g in grads.items():
                total[key] = total.get(key, 0) + g / len(batches)
    solved = sums.pop("implicit", None)
    to_solved = {} if solved is None else compared_to_solved(sums, solved)
    maml = sums.pop("maml")
    row: dict[str, float] = {
        "|maml|": float(flat(maml).norm()),
        "|linear|": float(flat(sums["linear"]).norm()),
        "|linear beta/10|": float(flat(sums["linear_small_beta"]).norm()),
    }
    for name, grads in sums.items():
        row[f"cos {name}"] = agreement(flat(grads), flat(maml))[0]
    row["cos linear, linear_long"] = agreement(flat(sums["linear"]), flat(sums["linear_long"]))[0]
    row["residual after T"] = sum(residual_ratio(module, batch) for batch in batches) / len(batches)
    row["|omega conv|"] = conv_norm(module)
    return row | to_solved


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--batches", type=int, default=3, help="held training batches (default 3)")
    parser.add_argument("--beta", type=float, default=0.1, help="the contrastive rules' beta (default 0.1)")
    parser.add_argument("--long", type=int, default=100, help="steps per phase of linear_long (default 100)")
    parser.add_argument("--implicit", type=float, metavar="DELTA", help="compare with Implicit solved to DELTA")
    parser.add_argument("--implicit-cap", type=int, default=2000, help="its phase's cap (default 2000)")
    parser.add_argument("--implicit-damping", type=float, default=0.0, help="its CG damping (default 0)")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.long < 1 or not args.beta > 0:
        parser.error(f"--batches and --long must be >= 1 and --beta > 0; got {args.batches}, {args.long}, {args.beta}.")
    implicit = None
    if args.implicit is not None:
        if not args.implicit > 0 or args.implicit_cap < 1 or not args.implicit_damping >= 0:
            parser.error("--implicit must be > 0, --implicit-cap >= 1 and --implicit-damping >= 0.")
        implicit = (args.implicit, args.implicit_cap, args.implicit_damping)
    cli = load_run(args)
    cli.datamodule.setup("fit")
    batches = []
    for batch in cli.datamodule.train_dataloader():  # the same seeded batches for every checkpoint
        batches.append(batch)
        if len(batches) == args.batches:
            break
    rows = []
    for step in each_checkpoint(cli, args.checkpoints):
        rows.append({"meta-step": step, **diagnose(cli.model, batches, args.beta, args.long, implicit)})
        print(rows[-1], flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
