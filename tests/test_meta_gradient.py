"""``estimate`` and ``meta_gradient``: averaging over tasks, no side effects, precision handling."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_contrastive import (
    MAML,
    ComplexSynapse,
    Contrastive,
    Estimator,
    FirstOrderMAML,
    Implicit,
    Reptile,
    estimate,
    meta_gradient,
)
from lightning_contrastive.tasks import Params, Split

_spec = importlib.util.spec_from_file_location("references", Path(__file__).resolve().parent / "references.py")
references = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(references)  # type: ignore[union-attr]

FEATURES, CLASSES, TASKS = 3, 3, 3
ESTIMATORS = {
    "contrastive": Contrastive(beta=0.1, inner_steps=6, nudged_steps=4, inner_lr=0.1),
    "maml": MAML(inner_steps=4, inner_lr=0.1),
    "first-order-maml": FirstOrderMAML(inner_steps=4, inner_lr=0.1),
    # Damped: one task's Hessian after 6 steps has an eigenvalue of -0.10 (conjugate gradient would flag it).
    "implicit": Implicit(inner_steps=6, inner_lr=0.1, cg_steps=20, cg_damping=0.2),
    "reptile": Reptile(inner_steps=4, inner_lr=0.1),
}


def make_learner(learn_lambda: bool = True, dtype: torch.dtype = torch.float64) -> ComplexSynapse:
    torch.manual_seed(6)
    network = nn.Sequential(nn.Linear(FEATURES, 5), nn.Tanh(), nn.Linear(5, CLASSES)).to(dtype)
    return ComplexSynapse(network, loss="cross_entropy", init_lambda=0.5, learn_lambda=learn_lambda)


def make_batch(tasks: int = TASKS, dtype: torch.dtype = torch.float64) -> dict[str, tuple[Tensor, Tensor]]:
    torch.manual_seed(7)
    return {
        "train": (torch.randn(tasks, 6, FEATURES, dtype=dtype), torch.randint(0, CLASSES, (tasks, 6))),
        "test": (torch.randn(tasks, 9, FEATURES, dtype=dtype), torch.randint(0, CLASSES, (tasks, 9))),
    }


def learner_for(estimator: Estimator) -> ComplexSynapse:
    return make_learner(learn_lambda=not isinstance(estimator, Reptile))


def written_out(learner: ComplexSynapse, batch: dict, task: int) -> references.Problem:
    """Task ``task`` of ``batch`` for :func:`make_learner`'s complex synapse, written out."""
    split = (batch["train"][0][task], batch["train"][1][task], batch["test"][0][task], batch["test"][1][task])
    strength = None if learner.learn_lambda else learner.init_lambda
    names = [f"{layer}.{kind}" for layer in ("0", "2") for kind in ("weight", "bias")]
    network = lambda weights, x: references.mlp(weights, x, ["0", "2"], torch.tanh)  # noqa: E731
    return references.complex_synapse(network, names, split, "cross_entropy", strength)


@pytest.mark.parametrize("estimator", ESTIMATORS.values(), ids=ESTIMATORS.keys())
def test_meta_gradient_changes_no_state(estimator: Estimator) -> None:
    learner = learner_for(estimator)
    before = copy.deepcopy(learner.state_dict())
    gradient = meta_gradient(learner, estimator, make_batch())
    assert list(gradient) == [name for name, _ in learner.named_meta_parameters()]
    for name, p in learner.named_meta_parameters():
        assert p.grad is None, name
        assert torch.equal(p, before[name]), name
        assert gradient[name].shape == p.shape and gradient[name].dtype == p.dtype
    assert any(g.abs().sum() > 0 for g in gradient.values())


def reptile_reference(problem: references.Problem, theta: Params) -> Params:
    """``omega - phi_T``."""
    adapted = references.heavy_ball(lambda phi: problem.inner(phi, theta), problem.start(theta), 4, 0.1, 0.9)
    return {f"omega.{name}": theta[f"omega.{name}"] - p for name, p in adapted.items()}


def implicit_reference(problem: references.Problem, theta: Params) -> Params:
    """The damped implicit gradient at the 6-step solution, from a dense Hessian solve."""
    adapted = references.heavy_ball(lambda phi: problem.inner(phi, theta), problem.start(theta), 6, 0.1, 0.9)
    return references.exact(problem, theta, adapted, damping=0.2)


REFERENCES = {  # the written-out counterpart of each of ESTIMATORS, and a relative-error bound (measured <= 1.2e-15)
    "contrastive": (
        lambda p, t: references.contrastive(
            p, t, beta=0.1, symmetric=True, nudge="linear", steps=6, nudged_steps=4, lr=0.1, momentum=0.9
        ),
        1e-12,
    ),
    "maml": (lambda p, t: references.maml(p, t, steps=4, lr=0.1, momentum=0.9), 1e-12),
    "first-order-maml": (lambda p, t: references.first_order_maml(p, t, steps=4, lr=0.1, momentum=0.9), 1e-12),
    "implicit": (implicit_reference, 1e-6),  # 20 conjugate-gradient steps: measured 9.8e-9
    "reptile": (reptile_reference, 1e-12),
}


@pytest.mark.parametrize("name", ESTIMATORS)
def test_the_surrogates_gradient_is_the_written_out_estimate(name: str) -> None:
    """What Lightning's automatic optimization puts in ``.grad`` from ``estimate(...).surrogate.backward()``, against
    the mean over tasks of each estimator's written-out reference (``tests/references.py``), and ``meta_gradient``."""
    estimator, (reference, bound) = ESTIMATORS[name], REFERENCES[name]
    learner, batch = learner_for(estimator), make_batch()
    estimate(learner, estimator, batch).surrogate.backward()
    backward = {name: torch.zeros_like(p) if p.grad is None else p.grad for name, p in learner.named_meta_parameters()}
    theta = {name: p.detach() for name, p in learner.meta_parameters().items()}
    per_task = [reference(written_out(learner, batch, task), theta) for task in range(TASKS)]
    expected = {name: torch.stack([g[name] for g in per_task]).mean(0) for name in per_task[0]}
    assert backward.keys() == theta.keys()
    assert references.relative_error(backward, expected) < bound
    torch.testing.assert_close(meta_gradient(learner, estimator, batch), backward)


@pytest.mark.parametrize("estimator", ESTIMATORS.values(), ids=ESTIMATORS.keys())
def test_meta_gradient_averages_the_tasks(estimator: Estimator) -> None:
    learner, batch = learner_for(estimator), make_batch()
    per_task = [
        meta_gradient(learner, estimator, {key: (x[i : i + 1], y[i : i + 1]) for key, (x, y) in batch.items()})
        for i in range(TASKS)
    ]
    mean = {name: torch.stack([task[name] for task in per_task]).mean(0) for name in per_task[0]}
    torch.testing.assert_close(meta_gradient(learner, estimator, batch), mean, rtol=1e-12, atol=1e-14)


def test_estimate_reports_each_tasks_adaptation() -> None:
    learner = make_learner()
    result = estimate(learner, ESTIMATORS["contrastive"], make_batch())
    assert result.surrogate.shape == ()
    assert len(result.tasks) == TASKS
    for task in result.tasks:
        assert set(task.adapted) == set(learner.fast_names)
        assert all(not p.requires_grad for p in task.adapted.values())
        assert set(task.inner_losses) == {"free", "nudged_pos", "nudged_neg"}


def test_meta_parameters_an_estimator_leaves_alone_get_zeros() -> None:
    learner = make_learner()
    gradient = meta_gradient(learner, ESTIMATORS["first-order-maml"], make_batch())
    for name, p in learner.named_meta_parameters():
        if name.startswith("lambda."):
            assert torch.equal(gradient[name], torch.zeros_like(p)), name
        else:
            assert gradient[name].abs().sum() > 0, name


@pytest.mark.parametrize("estimator", ESTIMATORS.values(), ids=ESTIMATORS.keys())
def test_autocast_does_not_change_the_meta_gradient(estimator: Estimator) -> None:
    learner, batch = make_learner(not isinstance(estimator, Reptile), torch.float32), make_batch(dtype=torch.float32)
    expected = meta_gradient(learner, estimator, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = meta_gradient(learner, estimator, batch)
    torch.testing.assert_close(under_autocast, expected, rtol=1e-6, atol=1e-8)  # dtypes included


def test_meta_gradient_works_inside_no_grad() -> None:
    """Lightning validates under ``torch.no_grad``; adaptation already re-enables autograd, the surrogate should too."""
    learner, batch, estimator = make_learner(), make_batch(), ESTIMATORS["contrastive"]
    expected = meta_gradient(learner, estimator, batch)
    with torch.no_grad():
        gradient = meta_gradient(learner, estimator, batch)
    torch.testing.assert_close(gradient, expected)


class PrecisionRecording(ComplexSynapse):
    """A complex synapse that records cuDNN's float32 convolution mode at every inner-loss evaluation."""

    def __init__(self) -> None:
        torch.manual_seed(6)
        network = nn.Sequential(nn.Linear(FEATURES, 5), nn.Tanh(), nn.Linear(5, CLASSES)).double()
        super().__init__(network, loss="cross_entropy", init_lambda=0.5)
        self.modes: set[str] = set()

    def inner_loss(self, fast: Params, meta: Params, support: Split) -> Tensor:
        self.modes.add(torch.backends.cudnn.conv.fp32_precision)
        return super().inner_loss(fast, meta, support)


def test_inner_loops_run_convolutions_in_ieee_float32_and_restore_the_setting() -> None:
    """cuDNN's default TF32 keeps 10 mantissa bits, which the contrastive difference divides by beta."""
    learner, before = PrecisionRecording(), torch.backends.cudnn.conv.fp32_precision
    meta_gradient(learner, ESTIMATORS["contrastive"], make_batch())
    assert learner.modes == {"ieee"}
    assert torch.backends.cudnn.conv.fp32_precision == before == "tf32"
