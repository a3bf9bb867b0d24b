"""InnerLoopMonitor: the inner phases' loss curves and residuals, against a hand-written heavy-ball loop."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_contrastive import ComplexSynapse, Contrastive, FirstOrderMAML, MetaLearningModule
from lightning_contrastive.callbacks import InnerLoopMonitor
from lightning_contrastive.tasks import Params, split_batch


def heavy_ball(objective, start: Params, steps: int, lr: float, momentum: float) -> tuple[Params, list[float], float]:
    """``v <- mu v + g``, ``phi <- phi - lr v``, written out: final parameters, loss before each step, residual norm."""
    params = {name: p.detach().clone() for name, p in start.items()}
    velocity = {name: torch.zeros_like(p) for name, p in params.items()}
    losses = []
    for _ in range(steps):
        leaves = {name: p.requires_grad_() for name, p in params.items()}
        loss = objective(leaves)
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
        losses.append(float(loss))
        velocity = {name: momentum * velocity[name] + grads[name] for name in params}
        params = {name: (p - lr * velocity[name]).detach() for name, p in params.items()}
    leaves = {name: p.requires_grad_() for name, p in params.items()}
    residual = torch.autograd.grad(objective(leaves), list(leaves.values()))
    return params, losses, float(torch.sqrt(sum(g.square().sum() for g in residual)))


def expected_traces(module: MetaLearningModule, batch: dict) -> dict[str, tuple[Tensor, float]]:
    """Each phase's mean loss curve and mean residual norm over the batch's tasks, by the names the monitor uses."""
    learner, estimator = module.learner, module.estimator
    meta = {name: p.detach() for name, p in learner.named_meta_parameters()}
    lr, momentum = estimator.inner_optimizer.lr, estimator.inner_optimizer.momentum
    per_phase: dict[str, list[tuple[list[float], float]]] = {}
    for task in split_batch(batch):

        def nudged(beta: float, origin: Params, task=task):
            """``L_in + beta L_query`` (full) or ``L_in + beta <dL_query/dphi(origin), phi - origin>`` (linear)."""
            if estimator.nudge == "full":
                return lambda fast: (
                    learner.inner_loss(fast, meta, task.support) + beta * learner.query_loss(fast, meta, task.query)
                )
            at = {name: p.detach().requires_grad_() for name, p in origin.items()}
            slope = torch.autograd.grad(learner.query_loss(at, meta, task.query), list(at.values()))
            return lambda fast: (
                learner.inner_loss(fast, meta, task.support)
                + beta * sum((g * (fast[name] - origin[name])).sum() for name, g in zip(origin, slope, strict=True))
            )

        free, losses, residual = heavy_ball(
            lambda fast, task=task: learner.inner_loss(fast, meta, task.support),
            learner.init_fast(meta),
            estimator.adaptation_steps,
            lr,
            momentum,
        )
        per_phase.setdefault("free", []).append((losses, residual))
        if isinstance(estimator, Contrastive):
            for phase, beta in (("nudged_pos", estimator.beta), ("nudged_neg", -estimator.beta)):
                _, losses, residual = heavy_ball(nudged(beta, free), free, estimator.nudged_steps, lr, momentum)
                per_phase.setdefault(phase, []).append((losses, residual))
    return {
        phase: (torch.tensor([losses for losses, _ in traces]).mean(0), sum(r for _, r in traces) / len(traces))
        for phase, traces in per_phase.items()
    }


@pytest.mark.parametrize("nudge", ["linear", "full"])
def test_logs_each_phase_residual_and_keeps_its_loss_curve(nudge, fit, small_module, sinusoid_batches) -> None:
    estimator = Contrastive(beta=0.05, inner_steps=5, nudged_steps=3, nudge=nudge, inner_lr=0.01)
    module, batches = small_module(estimator=estimator), sinusoid_batches(2)
    expected = expected_traces(small_module(estimator=estimator), batches[0])
    monitor = InnerLoopMonitor(every_n_steps=5)

    logged = fit(module, batches, [monitor])

    assert set(monitor.traces) == {"free", "nudged_pos", "nudged_neg"}
    for phase, (losses, residual) in expected.items():
        assert logged[f"inner/{phase}_residual_grad_norm"] == {0: pytest.approx(residual, rel=1e-4)}
        torch.testing.assert_close(monitor.traces[phase].losses, losses.float(), rtol=1e-4, atol=1e-6)
    beta = module.estimator.beta
    assert logged["inner/free_residual_over_beta"][0] == pytest.approx(expected["free"][1] / beta, rel=1e-4)
    # The curve ends where training's own free phase ended, on the same batch at the same step.
    assert float(monitor.traces["free"].losses[-1]) == pytest.approx(logged["inner/free"][0], rel=1e-5)


def test_estimators_without_nudged_phases_trace_their_adaptation(fit, small_module, sinusoid_batches) -> None:
    estimator = FirstOrderMAML(inner_steps=7, inner_lr=0.01)
    batches = sinusoid_batches(1)
    expected = expected_traces(small_module(estimator=estimator), batches[0])
    monitor = InnerLoopMonitor(every_n_steps=1)

    logged = fit(small_module(estimator=estimator), batches, [monitor])

    assert set(monitor.traces) == {"free"} and len(monitor.traces["free"].losses) == 7
    assert logged["inner/free_residual_grad_norm"][0] == pytest.approx(expected["free"][1], rel=1e-4)
    assert "inner/free_residual_over_beta" not in logged


def test_phases_that_stop_on_the_estimators_tolerance_show_their_steps(fit, small_module, sinusoid_batches) -> None:
    estimator = Contrastive(beta=0.05, inner_steps=400, nudged_steps=400, inner_lr=0.01, tolerance=0.05)
    # A smooth network: on the ReLU one momentum SGD stalls at residuals of 0.14-0.3 (the gradient jumps at kinks).
    learner = ComplexSynapse(nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)), loss="mse", init_lambda=1.0)
    monitor = InnerLoopMonitor(every_n_steps=1)

    logged = fit(small_module(estimator=estimator, learner=learner), sinusoid_batches(1), [monitor])

    for phase in ("free", "nudged_pos", "nudged_neg"):
        used = logged[f"inner/{phase}_steps_used"][0]
        assert 0 < used < 400 and float(monitor.traces[phase].steps) == used
        assert logged[f"inner/{phase}_residual_grad_norm"][0] <= 0.05
        assert len(monitor.traces[phase].losses) == 400  # a solved phase's curve stays at its solved value
    # Training's own free phase stopped by the same rule, on the same batch.
    assert logged["inner/free_steps"][0] == pytest.approx(logged["inner/free_steps_used"][0])
