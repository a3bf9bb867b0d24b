"""EstimatorAgreement observes: a reference whose inner loop faults makes it warn and log nothing, not stop training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from lightning_contrastive import Implicit
from lightning_contrastive.callbacks import EstimatorAgreement


def test_a_faulting_reference_skips_the_diagnosis_and_training_goes_on(
    fit: Callable[..., Any], small_module: Callable[..., Any], sinusoid_batches: Callable[..., Any]
) -> None:
    runaway = Implicit(inner_steps=20, inner_lr=1e4)  # the inner loop overflows: a NaN/inf fault on every task
    module = small_module()
    with pytest.warns(UserWarning, match=r"EstimatorAgreement logs nothing at step 0: Inner-loop fault in 2 of 2"):
        logged = fit(module, sinusoid_batches(3), callbacks=[EstimatorAgreement(reference=runaway, every_n_steps=1)])
    assert sorted(logged["train/query_loss"]) == [0, 1, 2]  # the steps logged: all three meta-steps ran
    assert not any(name.startswith("meta_grad/agreement") for name in logged)
