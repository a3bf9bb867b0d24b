"""The meta-step benchmark's problems and methods: each backbone with its hand-written forward pass for the floor, the
task family, and how each method's meta-gradient is computed on a batch (what one worker process measures)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.contrastive_floor import Forward, contrastive_floor, conv4_forward, mlp_forward
from benchmarks.diagnostics.path_nudge import PathForcedNudge
from lightning_contrastive import MAML, ComplexSynapse, Contrastive, Estimator, FirstOrderMAML, Implicit, Reptile
from lightning_contrastive.estimation import meta_gradient
from lightning_contrastive.networks import MLP, Conv4
from lightning_contrastive.tasks import split_batch

CONTRASTIVE_METHODS = {  # method -> (symmetric, nudge)
    "contrastive": (False, "full"),
    "contrastive-sym": (True, "full"),
    "contrastive-linear": (False, "linear"),
    "contrastive-sym-linear": (True, "linear"),
}
PATH_FORCED = "contrastive-sym-path"  # the agreement section's diagnostic (path_nudge), not a training estimator
METHODS = (*CONTRASTIVE_METHODS, "floor", "floor-sym", "maml", "fomaml", "implicit", "reptile")
INNER_LR, INNER_MOMENTUM, INIT_LAMBDA, QUERIES_PER_CLASS = 0.01, 0.9, 0.5, 15
Grads = dict[str, Tensor]


@dataclass(frozen=True)
class Problem:
    """A benchmark problem: the backbone, its hand-written forward pass for the floor, and the task family."""

    description: str
    network: Callable[[], nn.Module]
    forward: Forward
    loss: str
    beta: float
    ways: int | None = None  # None: sinusoid regression

    @property
    def is_conv(self) -> bool:
        return self.ways is not None


PROBLEMS = {
    "conv5": Problem(
        "Conv4, Omniglot 5-way 1-shot", lambda: Conv4(1, 5, 64, 28), conv4_forward, "cross_entropy", 0.1, 5
    ),
    "conv20": Problem(
        "Conv4, Omniglot 20-way 1-shot", lambda: Conv4(1, 20, 64, 28), conv4_forward, "cross_entropy", 0.03, 20
    ),
    # Smooth units (GELU, average pooling): a loss gradient continuous in the weights, for the agreement section.
    "conv20-smooth": Problem(
        "Conv4 with GELU and average pooling, Omniglot 20-way 1-shot",
        lambda: Conv4(1, 20, 64, 28, smooth=True),
        partial(conv4_forward, smooth=True),
        "cross_entropy",
        0.03,
        20,
    ),
    # beta 0.1 lets the symmetric rule's -beta phase diverge on 2 of the 25 sinusoid tasks within 50 nudged steps.
    "sinusoid": Problem("MLP 1-40-40-1, sinusoid 10-shot", MLP, mlp_forward, "mse", 0.03),
}


def build_learner(problem: Problem, learn_lambda: bool) -> ComplexSynapse:
    torch.manual_seed(0)  # every worker starts from the same omega
    return ComplexSynapse(problem.network(), problem.loss, init_lambda=INIT_LAMBDA, learn_lambda=learn_lambda)  # type: ignore[arg-type]


def make_estimator(method: str, steps: int, beta: float, options: dict[str, Any]) -> Estimator:
    """The engine's estimator for ``method`` with ``T = steps`` (``options`` override its arguments)."""
    settings = {"beta": beta, "inner_steps": steps, "nudged_steps": max(1, steps // 2), **options}
    if method == PATH_FORCED:
        return PathForcedNudge(**settings)
    if method in CONTRASTIVE_METHODS:
        symmetric, nudge = CONTRASTIVE_METHODS[method]
        return Contrastive(symmetric=symmetric, nudge=nudge, **settings)
    estimators = {"maml": MAML, "fomaml": FirstOrderMAML, "implicit": Implicit, "reptile": Reptile}
    return estimators[method](inner_steps=steps, **options)


def make_meta_step(
    problem: Problem, method: str, steps: int, options: dict[str, Any], batch: dict
) -> Callable[[], Grads]:
    """A closure computing one meta-gradient on ``batch``, keyed like the learner's meta-parameters."""
    learner = build_learner(problem, learn_lambda=method != "reptile")
    if not method.startswith("floor"):
        estimator = make_estimator(method, steps, problem.beta, options)
        # Skip, not stop: Implicit's solve meets negative curvature on these conv nets (an inner-loop fault), and
        # its cost is measured all the same; a meta-gradient whose tasks all failed is zero and shows as "faulted".
        return lambda: meta_gradient(learner, estimator, batch, on_fault="skip")
    names = learner.fast_names
    omega = [learner.get_parameter(f"omega.{name}").detach() for name in names]
    log_strength = [learner.get_parameter(f"lambda.{name}").detach() for name in names]
    loss = F.cross_entropy if problem.loss == "cross_entropy" else F.mse_loss
    tasks = split_batch(batch)

    def floor_step() -> Grads:
        total = [torch.zeros_like(w) for w in omega + log_strength]
        for task in tasks:
            omega_grad, strength_grad = contrastive_floor(
                problem.forward,
                loss,
                omega,
                log_strength,
                (task.support.x, task.support.y),
                (task.query.x, task.query.y),
                beta=problem.beta,
                inner_steps=steps,
                nudged_steps=options.get("nudged_steps", max(1, steps // 2)),
                lr=INNER_LR,
                momentum=INNER_MOMENTUM,
                symmetric=method == "floor-sym",
            )
            torch._foreach_add_(total, omega_grad + strength_grad)
        keys = [f"omega.{name}" for name in names] + [f"lambda.{name}" for name in names]
        return {key: g / len(tasks) for key, g in zip(keys, total, strict=True)}

    return floor_step


def make_batch(problem: Problem, tasks: int, omniglot: Path) -> tuple[dict, str]:
    """A seeded meta-batch of ``tasks`` tasks, and where it came from."""
    if problem.ways is None:
        from lightning_contrastive.data.sinusoid import SinusoidTasks

        episodes = [SinusoidTasks(tasks, shots=10, test_shots=10, seed=0)[i] for i in range(tasks)]
        batch = {key: tuple(torch.stack([e[key][j] for e in episodes]) for j in range(2)) for key in ("train", "test")}
        return batch, "seeded sinusoid tasks"
    if not omniglot.exists():
        x = torch.rand(tasks, problem.ways * (1 + QUERIES_PER_CLASS), 1, 28, 28)
        y = torch.arange(problem.ways).repeat(tasks, 1 + QUERIES_PER_CLASS)
        n = problem.ways
        return {"train": (x[:, :n], y[:, :n]), "test": (x[:, n:], y[:, n:])}, f"random images ({omniglot} not found)"
    from lightning_contrastive.data.omniglot import OmniglotDataModule

    data = OmniglotDataModule(
        str(omniglot), ways=problem.ways, shots=1, test_shots=QUERIES_PER_CLASS, batch_size=tasks, seed=0
    )
    data.setup()
    return next(iter(data.train_dataloader())), f"Omniglot images from {omniglot}"
