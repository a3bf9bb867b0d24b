"""The batched meta-batch (``torch.func.vmap`` over tasks) and the nudged phases' query subsampling.

A batched estimate must be the looped one computed differently: same meta-gradient to float64
precision, for every learner and estimator that can run batched. ``batched=None`` must pick by its
documented rule, and query subsampling must evaluate exactly the requested number of queries per
nudged step, use the whole query set in the surrogate, and average to the full estimate.
"""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_contrastive import (
    MAML,
    ComplexSynapse,
    Contrastive,
    DualSystem,
    Estimator,
    FirstOrderMAML,
    Implicit,
    InnerSGD,
    MetaLearningModule,
    Reptile,
    estimate,
    meta_gradient,
)
from lightning_contrastive.estimation import choose_batched
from lightning_contrastive.inner import minimise
from lightning_contrastive.tasks import Params, Split

Batch = dict[str, tuple[Tensor, Tensor]]
TASKS, SUPPORT, QUERY = 3, 6, 8


def mlp(out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, out)).double()


def classification_batch(tasks: int = TASKS, queries: int = QUERY, classes: int = 3) -> Batch:
    generator = torch.Generator().manual_seed(0)
    xs = torch.randn(tasks, SUPPORT, 2, dtype=torch.float64, generator=generator)
    xq = torch.randn(tasks, queries, 2, dtype=torch.float64, generator=generator)
    ys = torch.randint(0, classes, (tasks, SUPPORT), generator=generator)
    yq = torch.randint(0, classes, (tasks, queries), generator=generator)
    return {"train": (xs, ys), "test": (xq, yq)}


def complex_synapse(learn_lambda: bool = True) -> ComplexSynapse:
    torch.manual_seed(1)
    learner = ComplexSynapse(mlp(), init_lambda=0.7, learn_lambda=learn_lambda)
    if learn_lambda:
        with torch.no_grad():
            for log_strength in learner.get_submodule("lambda").parameters():
                log_strength.uniform_(-0.5, 0.5)
    return learner


ESTIMATORS = {
    "contrastive symmetric": lambda: Contrastive(beta=0.1, symmetric=True, inner_steps=6, nudged_steps=4, inner_lr=0.1),
    "contrastive one-sided": lambda: Contrastive(
        beta=0.1, symmetric=False, inner_steps=6, nudged_steps=4, inner_lr=0.1
    ),
    "contrastive symmetric, full nudge": lambda: Contrastive(
        beta=0.1, symmetric=True, inner_steps=6, nudged_steps=4, nudge="full", inner_lr=0.1
    ),
    "contrastive, every query drawn": lambda: Contrastive(
        inner_steps=4, nudged_steps=3, nudge="full", query_subsample=QUERY
    ),
    # Phases to a tolerance: each task stops where solved, the nudged ones at a tolerance computed from its own nudge.
    "contrastive to a tolerance": lambda: Contrastive(
        beta=0.1, inner_steps=60, nudged_steps=40, inner_lr=0.1, tolerance=0.05
    ),
    "contrastive to a tolerance, full nudge": lambda: Contrastive(
        beta=0.1, inner_steps=60, nudged_steps=40, nudge="full", inner_lr=0.1, tolerance=0.05
    ),
    "contrastive to a tolerance, L-BFGS": lambda: Contrastive(
        beta=0.1, inner_steps=30, nudged_steps=20, inner_lr=0.1, tolerance=0.05, solver="lbfgs"
    ),
    "contrastive to a tolerance, free residual cancelled": lambda: Contrastive(
        beta=0.1, inner_steps=60, nudged_steps=40, inner_lr=0.1, tolerance=0.05, cancel_free_residual=True
    ),
    "contrastive, full nudge, free residual cancelled": lambda: Contrastive(
        inner_steps=4, nudged_steps=3, nudge="full", cancel_free_residual=True
    ),
    "maml": lambda: MAML(inner_steps=4, inner_lr=0.1),
    "first-order maml": lambda: FirstOrderMAML(inner_steps=4, inner_lr=0.1),
    "implicit": lambda: Implicit(inner_steps=4, inner_lr=0.1, cg_steps=5),
}


class NotBatchable(FirstOrderMAML):
    """An estimator that has not been checked for ``torch.func.vmap`` (the default for a new one)."""

    batchable = False


def assert_same_gradients(batched: dict[str, Tensor], looped: dict[str, Tensor]) -> None:
    assert batched.keys() == looped.keys()
    assert any(g.abs().sum() > 0 for g in looped.values())
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_batched_meta_gradient_equals_the_loop_for_a_complex_synapse(name: str) -> None:
    learner, batch = complex_synapse(), classification_batch()
    looped = meta_gradient(learner, ESTIMATORS[name](), batch, batched=False)
    batched = meta_gradient(learner, ESTIMATORS[name](), batch, batched=True)
    assert_same_gradients(batched, looped)


def test_batched_reptile_equals_the_loop() -> None:
    learner, batch = complex_synapse(learn_lambda=False), classification_batch()
    looped = meta_gradient(learner, Reptile(inner_steps=5, inner_lr=0.1), batch, batched=False)
    batched = meta_gradient(learner, Reptile(inner_steps=5, inner_lr=0.1), batch, batched=True)
    assert_same_gradients(batched, looped)


@pytest.mark.parametrize("estimator", [Contrastive(beta=0.1, inner_steps=5, nudged_steps=3), MAML(3)])
def test_batched_meta_gradient_equals_the_loop_for_a_dual_system(estimator: Estimator) -> None:
    """The dual system's query loss depends on its slow weights directly, and it modulates through hooks."""
    torch.manual_seed(2)
    learner, batch = DualSystem(mlp(), pull=0.5), classification_batch()
    assert_same_gradients(
        meta_gradient(learner, estimator, batch, batched=True), meta_gradient(learner, estimator, batch, batched=False)
    )


def test_batched_estimate_reports_each_task_like_the_loop() -> None:
    learner, batch = complex_synapse(), classification_batch()
    estimator = Contrastive(beta=0.1, inner_steps=5, nudged_steps=3)
    looped, batched = (estimate(learner, estimator, batch, batched=flag) for flag in (False, True))
    torch.testing.assert_close(batched.surrogate, looped.surrogate, rtol=1e-12, atol=1e-12)
    for ours, reference in zip(batched.tasks, looped.tasks, strict=True):
        torch.testing.assert_close(ours.adapted, reference.adapted, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.inner_losses, reference.inner_losses, rtol=1e-12, atol=1e-12)
        assert all(p.grad_fn is None for p in ours.adapted.values())


@pytest.mark.parametrize("differentiable", [False, True])
def test_minimise_under_vmap_equals_a_loop_over_tasks(differentiable: bool) -> None:
    """``minimise`` switches to ``torch.func`` gradients inside vmap, first-order and unrolled alike."""
    theta = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1.0, 2.0], [-0.5, 0.3], [0.0, 4.0]], dtype=torch.float64)
    optimizer = InnerSGD(0.1, 0.8)

    def adapt(target: Tensor) -> Tensor:
        objective = lambda p: ((p["x"] - target).pow(4) + (p["x"] - theta).square()).sum()  # noqa: E731
        return minimise(objective, {"x": 2 * theta}, 5, optimizer, differentiable=differentiable).params["x"]

    looped, batched = torch.stack([adapt(t) for t in targets]), torch.func.vmap(adapt)(targets)
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
    assert batched.requires_grad == differentiable
    if differentiable:
        (d_looped,) = torch.autograd.grad(looped.square().sum(), theta)
        (d_batched,) = torch.autograd.grad(batched.square().sum(), theta)
        torch.testing.assert_close(d_batched, d_looped, rtol=1e-12, atol=1e-12)


def test_batched_none_picks_vmap_for_batchable_estimators_on_several_tasks_unless_convolutions_run_on_the_cpu() -> None:
    contrastive = Contrastive()
    convolutional = ComplexSynapse(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3)))
    assert choose_batched(complex_synapse(), contrastive, num_tasks=4)
    assert not choose_batched(complex_synapse(), contrastive, num_tasks=1)
    assert not choose_batched(convolutional, contrastive, num_tasks=4)
    assert not choose_batched(complex_synapse(), NotBatchable(), num_tasks=4)
    # Off the CPU (an accelerator; the meta device stands in for one here) grouped convolutions are the faster path.
    assert choose_batched(convolutional.to("meta"), contrastive, num_tasks=4)


def test_the_module_runs_its_tasks_as_batched_says() -> None:
    def one_sgd_step(batched: bool) -> dict[str, Tensor]:
        module = MetaLearningModule(
            complex_synapse(),
            Contrastive(beta=0.1, inner_steps=3, nudged_steps=2),
            optimizer=partial(torch.optim.SGD, lr=0.1),
            batched=batched,
        )
        trainer = pl.Trainer(
            max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
        )
        trainer.fit(module, train_dataloaders=DataLoader([classification_batch()], batch_size=None))
        return {name: p.detach() for name, p in module.learner.named_meta_parameters()}

    assert_same_gradients(one_sgd_step(batched=True), one_sgd_step(batched=False))
    with pytest.raises(ValueError, match=r"NotBatchable cannot run batched.*batched=None to let the library choose"):
        MetaLearningModule(complex_synapse(), NotBatchable(), batched=True)


def test_batched_true_with_an_estimator_that_cannot_be_vmapped_raises() -> None:
    with pytest.raises(ValueError, match=r"NotBatchable cannot run batched.*batched=False"):
        estimate(complex_synapse(), NotBatchable(inner_steps=2), classification_batch(), batched=True)


class QueryCounting(ComplexSynapse):
    """A complex synapse that records how many queries each evaluation of its query loss sees."""

    def __init__(self) -> None:
        torch.manual_seed(1)
        super().__init__(mlp(), init_lambda=0.7)
        self.query_sizes: list[int] = []

    def query_loss(self, fast: Params, meta: Params, query: Split) -> Tensor:
        self.query_sizes.append(len(query.y))
        return super().query_loss(fast, meta, query)


@pytest.mark.parametrize("symmetric", [False, True])
def test_query_subsample_evaluates_that_many_queries_per_nudged_step_and_all_in_the_surrogate(symmetric: bool) -> None:
    learner = QueryCounting()
    estimator = Contrastive(
        beta=0.1, symmetric=symmetric, inner_steps=3, nudged_steps=4, nudge="full", query_subsample=3
    )
    meta_gradient(learner, estimator, classification_batch(tasks=1), batched=False)
    phases = 2 if symmetric else 1
    assert learner.query_sizes == [3] * 4 * phases + [QUERY] * phases


def test_query_subsample_of_at_least_every_query_is_the_full_estimate() -> None:
    learner, batch = complex_synapse(), classification_batch()
    full = meta_gradient(learner, Contrastive(inner_steps=4, nudged_steps=3, nudge="full"), batch, batched=False)
    drawn = meta_gradient(
        learner, Contrastive(inner_steps=4, nudged_steps=3, nudge="full", query_subsample=QUERY + 5), batch
    )
    torch.testing.assert_close(drawn, full, rtol=1e-10, atol=1e-12)


def test_query_subsampled_estimates_average_to_the_full_estimate() -> None:
    """With one nudged step (no momentum) the omega estimate ``lambda (phi_beta - phi_0) / beta`` is linear
    in the step's query gradient, and the mean loss over a uniformly drawn subset is an unbiased estimate
    of the mean over all queries, so the subsampled estimates average to the full one."""
    learner, batch = complex_synapse(learn_lambda=False), classification_batch(tasks=2, queries=12)
    settings = {"beta": 0.1, "symmetric": False, "inner_steps": 3, "nudged_steps": 1, "inner_momentum": 0.0}
    settings["nudge"] = "full"
    full = meta_gradient(learner, Contrastive(**settings), batch, batched=True)
    torch.manual_seed(0)
    draws = [
        meta_gradient(learner, Contrastive(**settings, query_subsample=3), batch, batched=True) for _ in range(100)
    ]
    mean = {name: torch.stack([d[name] for d in draws]).mean(0) for name in full}
    single_error, mean_error = (
        torch.cat([(g[name] - full[name]).flatten() for name in full]).norm() for g in (draws[0], mean)
    )
    full_norm = torch.cat([g.flatten() for g in full.values()]).norm()
    assert single_error > 0.05 * full_norm  # a single draw is far off ...
    assert mean_error < 0.25 * single_error  # ... and 100 of them average close to the full estimate


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_query_subsample_must_be_a_whole_number_of_queries(bad: object) -> None:
    with pytest.raises(ValueError, match="query_subsample must be an integer >= 1"):
        Contrastive(nudge="full", query_subsample=bad)  # type: ignore[arg-type]
