"""EstimatorAgreement: cosine and relative error against a reference estimator, on the first batch, kept."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_contrastive import MAML, ComplexSynapse, Implicit, MetaLearningModule, Reptile, meta_gradient
from lightning_contrastive.callbacks import EstimatorAgreement

_spec = importlib.util.spec_from_file_location("references", Path(__file__).resolve().parents[1] / "references.py")
references = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(references)  # type: ignore[union-attr]

REFERENCE = MAML(inner_steps=5, inner_lr=0.01)


def written_out(
    batch: dict, task: int, layers: tuple[str, str] = ("layers.0", "layers.2"), activation=torch.relu
) -> references.Problem:
    """Task ``task`` of ``batch`` for a complex synapse with learned strengths on a two-layer MLP, MSE, in float64
    (by default the small module's ``MLP(hidden=(16,))``: Linear, ReLU, Linear)."""
    split = tuple(t[task].double() for key in ("train", "test") for t in batch[key])
    names = [f"{layer}.{kind}" for layer in layers for kind in ("weight", "bias")]
    network = lambda weights, x: references.mlp(weights, x, list(layers), activation)  # noqa: E731
    return references.complex_synapse(network, names, split, "mse")


def expected_agreement(module: MetaLearningModule, batch: dict) -> dict[str, float]:
    """The logged metrics, from written-out references: the small module's symmetric linear-nudge contrastive
    estimate (beta 0.05, 5 free and 3 nudged steps, lr 0.01) and MAML through 5 steps, per group and overall."""
    theta = {name: p.detach().double() for name, p in module.learner.meta_parameters().items()}

    def mean(estimates: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {name: sum(e[name] for e in estimates) / len(estimates) for name in estimates[0]}

    tasks = [written_out(batch, i) for i in range(len(batch["train"][0]))]
    trained = mean([
        references.contrastive(
            p, theta, beta=0.05, symmetric=True, nudge="linear", steps=5, nudged_steps=3, lr=0.01, momentum=0.9
        )
        for p in tasks
    ])  # fmt: skip
    reference = mean([references.maml(p, theta, steps=5, lr=0.01, momentum=0.9) for p in tasks])
    expected = {}
    for group, prefix in (("omega", "omega."), ("lambda", "lambda."), (None, "")):
        g = torch.cat([v.flatten() for name, v in trained.items() if name.startswith(prefix)])
        r = torch.cat([v.flatten() for name, v in reference.items() if name.startswith(prefix)])
        stem = "meta_grad/agreement" if group is None else f"meta_grad/agreement/{group}"
        expected[f"{stem}/cosine"] = float(g @ r / (g.norm() * r.norm()))
        expected[f"{stem}/relative_error"] = float((g - r).norm() / r.norm())
    return expected


def test_compares_with_the_reference_on_the_first_batch_every_n_steps(fit, small_module, sinusoid_batches) -> None:
    batches = sinusoid_batches(3)
    logged = fit(small_module(), batches, [EstimatorAgreement(reference=REFERENCE, every_n_steps=2)])

    # The same meta-parameters, step by step, without the callback (which changes nothing).
    at_step_2 = small_module()
    pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(
        at_step_2, DataLoader(batches[:2], batch_size=None)
    )
    for step, module in ((0, small_module()), (2, at_step_2)):
        for name, value in expected_agreement(module, batches[0]).items():  # the first batch, at both steps
            assert logged[name].keys() == {0, 2}, name
            assert logged[name][step] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, step)


def test_the_default_reference_is_the_implicit_gradient(sinusoid_batches) -> None:
    """On a problem whose inner loss its defaults (100 steps) nearly minimise, the default reference's meta-gradient
    is the exact implicit one (dense Hessian at the Newton-polished minimum): measured relative error 1.1e-2 (1.1e-2
    in float32 too; 3e-7 with 300 inner steps); asserted 2e-2. A wrong sign or a missing term is off by order 1."""
    reference = EstimatorAgreement().reference
    torch.manual_seed(0)
    learner = ComplexSynapse(
        nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double(), loss="mse", init_lambda=1.0
    )
    batch = {key: (x.double(), y.double()) for key, (x, y) in sinusoid_batches(1)[0].items()}
    theta = {name: p.detach() for name, p in learner.meta_parameters().items()}
    exact = []
    for task in range(2):
        problem = written_out(batch, task, ("0", "2"), torch.tanh)
        exact.append(references.exact(problem, theta, references.solution(problem, theta, (1000, 0.01, 0.9))))
    expected = {name: (exact[0][name] + exact[1][name]) / 2 for name in theta}
    assert references.relative_error(meta_gradient(learner, reference, batch), expected) < 2e-2
    assert isinstance(reference, Implicit)


def test_a_reference_undefined_for_the_learner_fails_before_training(fit, small_module, sinusoid_batches) -> None:
    with pytest.raises(ValueError, match="Reptile is defined only"):
        fit(small_module(), sinusoid_batches(1), [EstimatorAgreement(reference=Reptile())])
    with pytest.raises(ValueError, match="must be a lightning_contrastive Estimator"):
        EstimatorAgreement(reference="implicit")  # type: ignore[arg-type]
