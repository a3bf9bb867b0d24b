"""Learner.meta_learned_network: what was meta-learned, as a plain copy of the user's module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_contrastive import ComplexSynapse, DualSystem, Learner
from lightning_contrastive.networks import MLP, Conv4
from lightning_contrastive.tasks import Params


class NormedMLP(nn.Module):
    """Hidden layers whose modulation sits on a LayerNorm, a plain Linear and a BatchNorm1d, with Dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 6)
        self.norm = nn.LayerNorm(6)
        self.second = nn.Linear(6, 5)
        self.third = nn.Linear(5, 4)
        self.batch_norm = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)
        self.readout = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.first(x)))
        h = torch.tanh(self.second(h))
        return self.readout(self.drop(torch.relu(self.batch_norm(self.third(h)))))


class SmallConv(nn.Module):
    """Conv + BatchNorm2d, conv + LayerNorm over (channels, height, width), and a readout, for 1x4x4 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1)
        self.ln = nn.LayerNorm((2, 4, 4))
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.ln(self.conv2(h)))
        return self.head(h.flatten(1))


def perturbed(learner: Learner, generator: torch.Generator) -> Learner:
    """``learner`` with every meta-parameter moved at random, so that no start sits at a neutral value."""
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return learner


def starting_prediction(learner: Learner, x: torch.Tensor) -> torch.Tensor:
    meta: Params = {name: p.detach() for name, p in learner.meta_parameters().items()}
    return learner.predict(learner.init_fast(meta), meta, x)


def assert_plain_copy(exported: nn.Module, fresh: nn.Module, x: torch.Tensor, expected: torch.Tensor) -> None:
    """``exported`` is the user's class, holds only torch objects, equals ``expected`` on ``x``, and its state
    dict loads strictly into ``fresh``, which then gives the same outputs."""
    assert type(exported) is type(fresh)
    assert all(type(m).__module__.startswith("torch.nn") for m in list(exported.modules())[1:])  # no library objects
    assert all(type(p) is nn.Parameter for p in exported.parameters())
    with torch.no_grad():
        # Float rounding only: folding reassociates products (measured at most 4.8e-7 on outputs up to 5.3).
        torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-5)
        fresh.load_state_dict(exported.state_dict(), strict=True)
        for mine, theirs in zip(fresh.modules(), exported.modules(), strict=True):
            mine.train(theirs.training)  # the modes plain_network documents
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)


def test_complex_synapse_exports_its_backbone_at_omega() -> None:
    generator = torch.Generator().manual_seed(0)
    learner = perturbed(ComplexSynapse(Conv4(ways=3, channels=4, image_size=16)), generator)
    x = torch.randn(6, 1, 16, 16, generator=generator)
    exported = learner.meta_learned_network()
    omega = {name.removeprefix("omega."): p for name, p in learner.meta_parameters().items() if "omega." in name}
    assert all(torch.equal(p, omega[name]) for name, p in exported.named_parameters())
    assert_plain_copy(exported, Conv4(ways=3, channels=4, image_size=16), x, starting_prediction(learner, x))


@pytest.mark.parametrize(
    ("make_primary", "shape", "modulator"),
    [
        (MLP, (7, 1), "per_neuron"),
        (NormedMLP, (7, 3), "per_neuron"),
        (NormedMLP, (7, 3), "network"),
        (SmallConv, (5, 1, 4, 4), "per_neuron"),
    ],
)
def test_dual_system_folds_its_starting_modulation_into_the_primary(make_primary, shape, modulator: str) -> None:
    generator = torch.Generator().manual_seed(1)
    code_size = 3 if modulator == "network" else None
    learner = perturbed(DualSystem(make_primary(), modulator=modulator, code_size=code_size), generator)
    x = torch.randn(shape, generator=generator)
    exported = learner.meta_learned_network()
    assert_plain_copy(exported, make_primary(), x, starting_prediction(learner, x))
    readout = exported.get_submodule(learner.readout_layer)
    assert torch.equal(readout.weight, learner.meta_parameters()["init.readout.weight"])  # unmodulated start


@pytest.mark.parametrize(
    ("primary", "match"),
    [
        (nn.Sequential(nn.Linear(2, 3, bias=False), nn.Tanh(), nn.Linear(3, 1)), r"'0' \(Linear\).*no bias"),
        (
            nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, affine=False), nn.Linear(3, 1)),
            r"'1' \(BatchNorm1d\).*no weight and bias",
        ),
    ],
)
def test_a_site_with_nowhere_to_hold_the_modulation_is_refused(primary: nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DualSystem(primary).meta_learned_network()


def test_a_learner_without_an_export_says_what_to_override() -> None:
    class Bare(Learner):
        def init_fast(self, meta: Params) -> Params:
            return {}

        def predict(self, fast: Params, meta: Params, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(NotImplementedError, match="override it"):
        Bare("mse").meta_learned_network()
