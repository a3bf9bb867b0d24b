"""EstimatorAgreement: cosine and relative error against a reference estimator, on the first batch, kept."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_contrastive import Implicit, MetaLearningModule, Reptile, meta_gradient
from lightning_contrastive.callbacks import EstimatorAgreement

REFERENCE = Implicit(inner_steps=10, inner_lr=0.01, cg_steps=5)


def expected_agreement(module: MetaLearningModule, batch: dict) -> dict[str, float]:
    """The logged metrics, computed directly: both meta-gradients on ``batch``, compared per group and overall."""
    trained = meta_gradient(module.learner, module.estimator, batch)
    reference = meta_gradient(module.learner, REFERENCE, batch)
    expected = {}
    for group, prefix in (("omega", "omega."), ("lambda", "lambda."), (None, "")):
        g = torch.cat([v.flatten() for name, v in trained.items() if name.startswith(prefix)])
        r = torch.cat([v.flatten() for name, v in reference.items() if name.startswith(prefix)])
        stem = "meta_grad/agreement" if group is None else f"meta_grad/agreement/{group}"
        expected[f"{stem}/cosine"] = float(F.cosine_similarity(g, r, dim=0))
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


def test_the_default_reference_is_implicit_differentiation() -> None:
    assert type(EstimatorAgreement().reference) is Implicit


def test_a_reference_undefined_for_the_learner_fails_before_training(fit, small_module, sinusoid_batches) -> None:
    with pytest.raises(ValueError, match="Reptile is defined only"):
        fit(small_module(), sinusoid_batches(1), [EstimatorAgreement(reference=Reptile())])
    with pytest.raises(ValueError, match="must be a lightning_contrastive Estimator"):
        EstimatorAgreement(reference="implicit")  # type: ignore[arg-type]
