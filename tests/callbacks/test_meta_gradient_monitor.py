"""MetaGradientMonitor: meta-gradient norms and update ratios per group, against the module's own meta-gradient."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from lightning_contrastive import ComplexSynapse, DualSystem
from lightning_contrastive.callbacks import MetaGradientMonitor
from lightning_contrastive.networks import MLP


def group_norms(tensors: dict[str, torch.Tensor], group: str) -> float:
    return float(torch.cat([t.flatten() for name, t in tensors.items() if name.startswith(f"{group}.")]).norm())


def test_logs_the_norm_of_the_meta_gradient_and_the_update_ratio_per_group(fit, small_module, sinusoid_batches) -> None:
    learner = ComplexSynapse(MLP(hidden=(16,)), loss="mse", init_lambda=2.0)  # log-strengths != 0: a defined ratio
    module, batches = small_module(learner=learner, optimizer=partial(torch.optim.SGD, lr=0.1)), sinusoid_batches(3)
    before = {name: p.detach().clone() for name, p in module.learner.named_meta_parameters()}
    gradient = module.meta_gradient(batches[0])  # what the first step applies

    logged = fit(module, batches, [MetaGradientMonitor(every_n_steps=2)])

    assert logged["meta_grad/norm/omega"].keys() == {0, 2}  # every 2 meta-steps, from step 0
    everything = torch.cat([g.flatten() for g in gradient.values()])
    assert logged["meta_grad/norm"][0] == pytest.approx(float(everything.norm()), rel=1e-5)
    for group in ("omega", "lambda"):
        assert logged[f"meta_grad/norm/{group}"][0] == pytest.approx(group_norms(gradient, group), rel=1e-5)
        expected_ratio = 0.1 * group_norms(gradient, group) / group_norms(before, group)  # SGD: update = -lr g
        assert logged[f"meta_grad/update_ratio/{group}"][0] == pytest.approx(expected_ratio, rel=1e-4)


def test_the_norm_is_read_before_clipping_and_the_ratio_after(fit, small_module, sinusoid_batches) -> None:
    module, batches = small_module(optimizer=partial(torch.optim.SGD, lr=0.1)), sinusoid_batches(1)
    before = torch.cat([p.detach().flatten() for _, p in module.learner.named_meta_parameters()])
    norm = float(torch.cat([g.flatten() for g in module.meta_gradient(batches[0]).values()]).norm())

    logged = fit(module, batches, [MetaGradientMonitor(every_n_steps=1)], gradient_clip_val=norm / 4)

    assert logged["meta_grad/norm"][0] == pytest.approx(norm, rel=1e-5)
    assert logged["meta_grad/update_ratio"][0] == pytest.approx(0.1 * (norm / 4) / float(before.norm()), rel=1e-4)


def test_groups_are_the_first_component_of_the_meta_parameter_names(fit, small_module, sinusoid_batches) -> None:
    module = small_module(learner=DualSystem(MLP(hidden=(8,)), loss="mse"))
    logged = fit(module, sinusoid_batches(1), [MetaGradientMonitor(every_n_steps=1)])
    norms = {name for name in logged if name.startswith("meta_grad/norm")}
    assert norms == {"meta_grad/norm", "meta_grad/norm/primary", "meta_grad/norm/init"}
    assert all(logged[name][0] > 0 for name in norms)


def test_the_update_ratio_of_an_all_zero_group_is_nan(fit, small_module, sinusoid_batches) -> None:
    logged = fit(small_module(), sinusoid_batches(1), [MetaGradientMonitor(every_n_steps=1)])  # log(lambda = 1) = 0
    assert math.isnan(logged["meta_grad/update_ratio/lambda"][0])
    assert logged["meta_grad/update_ratio/omega"][0] > 0


def test_every_n_steps_must_be_a_positive_integer() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        MetaGradientMonitor(every_n_steps=0)
