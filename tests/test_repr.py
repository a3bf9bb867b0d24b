"""Everything a user builds prints: learners over every shipped backbone, estimators, the module, callbacks and
data modules each show what they are and their settings (``print(module)``, debuggers and pytest's reports call it)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

import lightning_contrastive.callbacks as callbacks
from lightning_contrastive.data.omniglot import OmniglotDataModule
from lightning_contrastive.data.sinusoid import SinusoidDataModule
from lightning_contrastive.estimators import MAML, Contrastive, Estimator, FirstOrderMAML, Implicit, Reptile
from lightning_contrastive.learners import ComplexSynapse, DualSystem, Learner
from lightning_contrastive.learners.base import ParameterTree
from lightning_contrastive.module import MetaLearningModule
from lightning_contrastive.networks import MLP, Conv4

BACKBONES: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "conv4": lambda: Conv4(channels=8),
    "conv4_smooth": lambda: Conv4(channels=8, smooth=True),
    "conv4_instance": lambda: Conv4(channels=8, norm="instance"),
    "conv4_instance_smooth": lambda: Conv4(channels=8, norm="instance", smooth=True),
}

LEARNERS: dict[str, tuple[Callable[[nn.Module], Learner], str]] = {  # each with the settings line its repr starts with
    "complex_synapse": (
        lambda backbone: ComplexSynapse(backbone, loss="mse", init_lambda=0.25),
        "loss='mse', init_lambda=0.25, learn_lambda=True",
    ),
    "complex_synapse_fixed_strengths": (
        lambda backbone: ComplexSynapse(backbone, learn_lambda=False),
        "loss='cross_entropy', init_lambda=0.5, learn_lambda=False",
    ),
    "dual_system": (
        lambda backbone: DualSystem(backbone, pull=0.25),
        "loss='cross_entropy', pull=0.25, modulator='per_neuron'",
    ),
    "dual_system_network": (
        lambda backbone: DualSystem(backbone, loss="mse", modulator="network", code_size=3),
        "loss='mse', pull=0.5, modulator='network', code_size=3",
    ),
}

WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)
REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("backbone_name", list(BACKBONES))
@pytest.mark.parametrize("learner_name", list(LEARNERS))
def test_every_learner_prints_its_settings_its_backbone_with_shapes_and_its_meta_parameters(
    learner_name: str, backbone_name: str
) -> None:
    backbone = BACKBONES[backbone_name]()
    make, settings = LEARNERS[learner_name]
    learner = make(backbone)
    parameters_before = dict(learner.named_parameters())

    printed = repr(learner)

    assert printed.startswith(f"{type(learner).__name__}(\n  {settings}\n")
    assert f"): {type(backbone).__name__}(" in printed
    for name, layer in backbone.named_modules():
        if not name or list(layer.children()):
            continue
        # the user's own layers, with their shapes (weight layers print as in the user's module: in and out sizes)
        shown = repr(layer) if isinstance(layer, WEIGHT_LAYERS) else f"{type(layer).__name__}("
        assert f"({name.rsplit('.', 1)[-1]}): {shown}" in printed, (name, printed)
    for name, parameter in learner.named_meta_parameters():
        group, key = name.split(".", 1)
        if isinstance(learner.get_submodule(group), ParameterTree):
            size = "x".join(str(n) for n in parameter.shape)
            assert f"({key}): Parameter containing: [torch.FloatTensor of size {size}]" in printed, name
    if isinstance(learner, DualSystem):
        for block in learner.modulated:
            assert f"\n    {block.layer}: {block.units} units" in printed
        assert f"\n  readout: {learner.readout_layer}\n" in printed

    # printing attaches nothing for good: same parameters, the network copy still parameter-free, the learner works
    assert repr(learner) == printed
    assert dict(learner.named_parameters()).keys() == parameters_before.keys()
    network_copy = learner.backbone if isinstance(learner, ComplexSynapse) else learner.network
    assert list(network_copy.parameters()) == []
    x = torch.randn(2, 1) if isinstance(backbone, MLP) else torch.randn(2, 1, 28, 28)
    meta = learner.meta_parameters()
    assert learner.predict(learner.init_fast(meta), meta, x).shape[0] == 2


def test_a_tasks_adapted_network_prints() -> None:
    learner = DualSystem(MLP(hidden=(4,)), loss="mse")
    adapted = learner.as_module(learner.init_fast(learner.meta_parameters()))
    printed = repr(adapted)
    assert printed.startswith("AdaptedNetwork(\n  (learner): DualSystem(\n    loss='mse', pull=0.5")
    assert "(readout.weight): Parameter containing: [torch.FloatTensor of size 1x4]" in printed


ESTIMATORS: dict[str, tuple[Estimator, list[str]]] = {  # each with settings its repr must show
    "contrastive": (
        Contrastive(beta=0.05, symmetric=False, inner_steps=7, nudged_steps=3, nudge="full"),
        ["beta=0.05", "symmetric=False", "inner_steps=7", "nudged_steps=3", "nudge='full'"],
    ),
    "maml": (MAML(inner_steps=3, inner_lr=0.1), ["inner_steps=3", "InnerSGD(lr=0.1, momentum=0.9)"]),
    "first_order_maml": (FirstOrderMAML(inner_steps=4, inner_momentum=0.5), ["inner_steps=4", "momentum=0.5"]),
    "implicit": (
        Implicit(inner_steps=5, cg_steps=6, cg_damping=0.1),
        ["inner_steps=5", "cg_steps=6", "cg_damping=0.1"],
    ),
    "reptile": (Reptile(inner_steps=2), ["inner_steps=2"]),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_prints_its_settings(name: str) -> None:
    estimator, settings = ESTIMATORS[name]
    printed = repr(estimator)
    assert printed.startswith(f"{type(estimator).__name__}(")
    assert all(setting in printed for setting in settings), printed


def test_the_module_prints_its_learner_and_its_estimator() -> None:
    learner = ComplexSynapse(Conv4(channels=8), learn_lambda=False)
    module = MetaLearningModule(learner, Contrastive(beta=0.05), on_inner_fault="skip")
    printed = repr(module)
    assert printed.startswith("MetaLearningModule(\n  estimator=Contrastive(")
    assert "beta=0.05" in printed and "on_inner_fault='skip'" in printed
    assert "(learner): ComplexSynapse(\n    loss='cross_entropy', init_lambda=0.5, learn_lambda=False\n" in printed
    assert "(0): Conv2d(1, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)" in printed


CALLBACKS: dict[str, Callback] = {  # every callback the package exports, with settings away from their defaults
    "BetaSchedule": callbacks.BetaSchedule(start=0.1, end=0.01, steps=50, kind="linear"),
    "EstimatorAgreement": callbacks.EstimatorAgreement(reference=Implicit(cg_steps=5), every_n_steps=3),
    "InnerLoopMonitor": callbacks.InnerLoopMonitor(every_n_steps=7),
    "LearningCurve": callbacks.LearningCurve(every_seconds=30.0, clock="cpu", episodes="val"),
    "MetaGradientMonitor": callbacks.MetaGradientMonitor(every_n_steps=9),
}


def is_callback_class(value: object) -> bool:
    """A callback a user can build (``HeldBatchDiagnostic`` is an abstract base)."""
    return inspect.isclass(value) and issubclass(value, Callback) and not inspect.isabstract(value)


def test_every_exported_callback_is_covered() -> None:
    exported = {name for name in callbacks.__all__ if is_callback_class(getattr(callbacks, name))}
    assert exported == set(CALLBACKS)


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_every_callback_prints_as_its_constructor_call(name: str) -> None:
    callback = CALLBACKS[name]
    expected = {
        "BetaSchedule": "BetaSchedule(start=0.1, end=0.01, steps=50, kind='linear')",
        "EstimatorAgreement": f"EstimatorAgreement(reference={Implicit(cg_steps=5)!r}, every_n_steps=3)",
        "InnerLoopMonitor": "InnerLoopMonitor(every_n_steps=7)",
        "LearningCurve": (
            "LearningCurve(every_n_steps=None, every_seconds=30.0, max_train_seconds=None, clock='cpu', episodes='val')"
        ),
        "MetaGradientMonitor": "MetaGradientMonitor(every_n_steps=9)",
    }[name]
    assert repr(callback) == expected


def shared_omniglot() -> Path | None:
    """The folder of the Omniglot small background zips, where tests/data/test_omniglot.py looks for them."""
    candidates = [os.environ.get("LIGHTNING_CONTRASTIVE_OMNIGLOT_ROOT"), REPOSITORY.parent / "shared/data/omniglot"]
    for candidate in filter(None, candidates):
        if (Path(candidate) / "images_background_small1.zip").is_file():
            return Path(candidate)
    return None


def test_the_sinusoid_data_module_prints_its_settings() -> None:
    printed = repr(SinusoidDataModule(shots=5, test_shots=7, batch_size=4, noise_std=0.1, seed=3))
    assert printed.startswith("SinusoidDataModule(")
    assert all(s in printed for s in ("shots=5", "test_shots=7", "batch_size=4", "noise_std=0.1", "seed=3")), printed


def test_the_omniglot_data_module_prints_its_settings() -> None:
    root = shared_omniglot()
    if root is None:
        pytest.skip("The Omniglot small background zips are not here; see tests/data/test_omniglot.py.")
    printed = repr(OmniglotDataModule(root=str(root), ways=3, shots=2, batch_size=4, image_size=20))
    assert printed.startswith("OmniglotDataModule(")
    assert all(s in printed for s in ("ways=3", "shots=2", "batch_size=4", "image_size=20")), printed


def test_a_callback_subclass_with_kwargs_or_renamed_settings_still_prints() -> None:
    class Threshold(callbacks.InnerLoopMonitor):
        def __init__(self, threshold: float, every_n_steps: int = 3, **kwargs: object) -> None:
            super().__init__(every_n_steps)
            self.limit = threshold  # kept under another name: left out of the repr, not an AttributeError

    assert repr(Threshold(0.5, extra=1)) == "Threshold(every_n_steps=3)"
