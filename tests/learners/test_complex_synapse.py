"""The complex-synapse learner: its parameters, its dtypes, its BatchNorm policy and the user's module."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_contrastive import ComplexSynapse, Contrastive, FirstOrderMAML, estimate, meta_gradient

_spec = importlib.util.spec_from_file_location("references", Path(__file__).resolve().parents[1] / "references.py")
references = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(references)  # type: ignore[union-attr]

FEATURES, CLASSES = 3, 2
ESTIMATOR = Contrastive(beta=0.1, inner_steps=5, nudged_steps=3)


def batch_norm_network() -> nn.Sequential:
    """Linear -> BatchNorm -> Tanh -> Linear, with running statistics far from any batch's and a frozen bias."""
    torch.manual_seed(5)
    network = nn.Sequential(nn.Linear(FEATURES, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, CLASSES))
    network[1].running_mean.fill_(5.0)
    network[1].running_var.fill_(0.1)
    network[3].bias.requires_grad_(False)
    return network


def classification_batch(tasks: int = 2) -> dict[str, tuple[Tensor, Tensor]]:
    return {
        "train": (torch.randn(tasks, 6, FEATURES), torch.randint(0, CLASSES, (tasks, 6))),
        "test": (torch.randn(tasks, 8, FEATURES), torch.randint(0, CLASSES, (tasks, 8))),
    }


def shifted(batch: dict[str, tuple[Tensor, Tensor]], shift: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    return {key: (x + shift, y) for key, (x, y) in batch.items()}


def test_wrapping_and_meta_learning_leave_the_users_module_untouched() -> None:
    network = batch_norm_network().eval()
    state = copy.deepcopy(network.state_dict())
    flags = {name: p.requires_grad for name, p in network.named_parameters()}

    learner = ComplexSynapse(network)
    meta_gradient(learner, ESTIMATOR, classification_batch())
    learner.as_module(learner.init_fast(learner.meta_parameters()))(torch.randn(5, FEATURES))
    with torch.no_grad():
        for omega in learner.get_submodule("omega").parameters():
            omega.add_(1.0)  # an outer step on the learner

    assert not network.training
    assert {name: p.requires_grad for name, p in network.named_parameters()} == flags
    for name, value in network.state_dict().items():
        assert torch.equal(value, state[name]), name  # weights and running statistics alike
    assert all(p.grad is None for p in network.parameters())


def test_meta_parameters_start_from_the_current_weights_under_backbone_names() -> None:
    network = batch_norm_network()
    learner = ComplexSynapse(network, init_lambda=0.25)
    meta = learner.meta_parameters()
    weights = dict(network.named_parameters())
    assert list(meta) == [f"omega.{name}" for name in weights] + [f"lambda.{name}" for name in weights]
    for name, weight in weights.items():
        assert torch.equal(meta[f"omega.{name}"], weight)
        assert meta[f"omega.{name}"].data_ptr() != weight.data_ptr()
        assert torch.equal(meta[f"lambda.{name}"], torch.full_like(weight, math.log(0.25)))
    assert all(p.requires_grad for p in meta.values())  # frozen backbone weights are meta-learned too


def test_fixed_strengths_have_no_meta_parameters() -> None:
    learner = ComplexSynapse(batch_norm_network(), init_lambda=0.25, learn_lambda=False)
    assert all(name.startswith("omega.") for name, _ in learner.named_meta_parameters())
    fast = {name: p + 1.0 for name, p in learner.init_fast(learner.meta_parameters()).items()}
    total = sum(p.numel() for p in fast.values())
    torch.testing.assert_close(learner.regulariser(fast, learner.meta_parameters()), torch.tensor(0.125 * total))
    gradient = meta_gradient(learner, FirstOrderMAML(inner_steps=2), classification_batch())
    assert set(gradient) == {name for name, _ in learner.named_meta_parameters()}


def reference_gradient(learner: ComplexSynapse, batch: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """ESTIMATOR's symmetric linear-nudge estimate for :func:`batch_norm_network`, written out in float64
    (``tests/references.py``) at the learner's meta-parameters, averaged over the batch's tasks."""
    names = [f"{layer}.{kind}" for layer in ("0", "1", "3") for kind in ("weight", "bias")]

    def network(weights: dict[str, Tensor], x: Tensor) -> Tensor:
        hidden = references.batch_norm(
            x @ weights["0.weight"].T + weights["0.bias"], weights["1.weight"], weights["1.bias"]
        )
        return torch.tanh(hidden) @ weights["3.weight"].T + weights["3.bias"]

    theta = {name: p.detach().double() for name, p in learner.meta_parameters().items()}
    estimates = []
    for i in range(len(batch["train"][0])):
        task = (batch["train"][0][i].double(), batch["train"][1][i], batch["test"][0][i].double(), batch["test"][1][i])
        problem = references.complex_synapse(network, names, task, "cross_entropy")
        estimates.append(
            references.contrastive(
                problem, theta, beta=0.1, symmetric=True, nudge="linear", steps=5, nudged_steps=3, lr=0.01, momentum=0.9
            )
        )
    return {name: sum(e[name] for e in estimates) / len(estimates) for name in theta}


@pytest.mark.parametrize(
    ("dtype", "bound"),
    [
        (torch.float32, 2e-4),
        (torch.float64, 1e-12),
    ],  # relative error to the float64 reference: measured 3.4e-5, 6.1e-15
)
def test_meta_gradient_has_the_learners_dtype(dtype: torch.dtype, bound: float) -> None:
    learner = ComplexSynapse(batch_norm_network().to(dtype))
    batch = classification_batch()
    gradient = meta_gradient(learner, ESTIMATOR, batch)  # float32 inputs are cast to the learner's
    assert all(gradient[name].dtype == dtype for name, _ in learner.named_meta_parameters())
    assert (
        references.relative_error({n: g.double() for n, g in gradient.items()}, reference_gradient(learner, batch))
        < bound
    )


def test_a_half_precision_learner_is_estimated_in_float32() -> None:
    """The bfloat16 learner's estimate is the float32 one, rounded: within bfloat16's rounding of the float64
    reference (measured 1.4e-3 relative; asserted 1e-2), where phases run in bfloat16 would be off by ~eps/beta."""
    learner = ComplexSynapse(batch_norm_network().to(torch.bfloat16))
    batch = classification_batch()
    gradient = meta_gradient(learner, ESTIMATOR, batch)
    in_float32 = meta_gradient(copy.deepcopy(learner).float(), ESTIMATOR, batch)
    for name, g in gradient.items():
        assert g.dtype == torch.bfloat16
        assert torch.equal(g, in_float32[name].to(torch.bfloat16)), name
    assert (
        references.relative_error({n: g.double() for n, g in gradient.items()}, reference_gradient(learner, batch))
        < 1e-2
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_always_normalises_with_batch_statistics(training: bool) -> None:
    """A constant input shift before Linear -> BatchNorm cancels under batch statistics (never under running ones)."""
    learner = ComplexSynapse(batch_norm_network()).train(training)
    meta = learner.meta_parameters()
    fast = learner.init_fast(meta)
    x, shift = torch.randn(7, FEATURES), torch.tensor([3.0, -2.0, 0.5])
    torch.testing.assert_close(learner.predict(fast, meta, x + shift), learner.predict(fast, meta, x))
    torch.testing.assert_close(learner.predict(fast, meta, x), learner.train(not training).predict(fast, meta, x))
    assert list(learner.buffers()) == []  # no running statistics to update

    learner.train(training)
    batch = classification_batch()
    expected = meta_gradient(learner, ESTIMATOR, batch)
    torch.testing.assert_close(expected["omega.0.bias"], torch.zeros(4), rtol=0, atol=1e-6)  # cancelled by BN
    torch.testing.assert_close(meta_gradient(learner, ESTIMATOR, shifted(batch, shift)), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_as_module_is_a_plain_copy_of_the_adapted_network(training: bool) -> None:
    network = batch_norm_network()
    learner = ComplexSynapse(network)
    adapted = estimate(learner, ESTIMATOR, classification_batch(tasks=1)).tasks[0].adapted
    meta_names = [name for name, _ in learner.named_meta_parameters()]
    module = learner.as_module(adapted).train(training)
    assert [name for name, _ in learner.named_meta_parameters()] == meta_names
    assert type(module) is nn.Sequential
    assert dict(module.named_parameters()).keys() == dict(network.named_parameters()).keys()
    x = torch.randn(5, FEATURES)
    torch.testing.assert_close(module(x), learner.predict(adapted, learner.meta_parameters(), x))

    expected = learner.predict(adapted, learner.meta_parameters(), x)
    with torch.no_grad():
        module[0].weight.zero_()  # the module owns its weights
    assert adapted["0.weight"].abs().sum() > 0
    torch.testing.assert_close(learner.predict(adapted, learner.meta_parameters(), x), expected)
