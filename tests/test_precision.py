"""The precision the inner phases and the contrastive difference run in, whatever the caller's settings.

``torch.set_float32_matmul_precision("high")`` (Lightning's advice on tensor-core GPUs) turns float32 matrix
products to TF32; inside the estimate every guarded backend must be IEEE float32 and the caller's setting must
come back afterwards. ``Contrastive(precision="float64")`` runs a float32 learner's phases in float64.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_contrastive import ComplexSynapse, Contrastive, DualSystem, MetaLearningModule, meta_gradient
from lightning_contrastive.tasks import Params, Split

# Written out rather than imported, so that dropping a backend from the library's guard fails this test.
FLOAT32_BACKENDS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")


def backend(path: str) -> object:
    found: object = torch.backends
    for part in path.split("."):
        found = getattr(found, part)
    return found


def settings() -> dict[str, str]:
    return {path: backend(path).fp32_precision for path in FLOAT32_BACKENDS}  # type: ignore[attr-defined]


class Recording(ComplexSynapse):
    """A complex synapse that records the float32 precision settings and the dtype of every inner-loss evaluation."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)), loss="cross_entropy")
        self.seen: list[dict[str, str]] = []
        self.dtypes: set[torch.dtype] = set()

    def inner_loss(self, fast: Params, meta: Params, support: Split) -> Tensor:
        self.seen.append(settings())
        self.dtypes.add(support.x.dtype)
        return super().inner_loss(fast, meta, support)


def batch() -> dict[str, tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 3, generator=generator)
    y = torch.randint(0, 2, (2, 8), generator=generator)
    return {"train": (x[:, :4], y[:, :4]), "test": (x[:, 4:], y[:, 4:])}


@pytest.fixture
def tf32_matmuls() -> Iterator[None]:
    """The state ``torch.set_float32_matmul_precision("high")`` leaves, restored after the test."""
    before = torch.get_float32_matmul_precision()
    saved = settings()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)
    for path, setting in saved.items():
        backend(path).fp32_precision = setting  # type: ignore[attr-defined]


def test_matrix_products_and_convolutions_run_in_ieee_float32_and_the_setting_comes_back(tf32_matmuls: None) -> None:
    outside = settings()
    assert outside["cuda.matmul"] == "tf32" and outside["cudnn.conv"] == "tf32"  # the premise
    learner = Recording()
    meta_gradient(learner, Contrastive(beta=0.1, inner_steps=3), batch())
    assert learner.seen and all(seen == dict.fromkeys(FLOAT32_BACKENDS, "ieee") for seen in learner.seen)
    assert settings() == outside


def test_float64_precision_runs_a_float32_learner_in_float64_and_returns_float32_gradients() -> None:
    learner = Recording()
    single = meta_gradient(learner, Contrastive(beta=0.1, inner_steps=3), batch())
    assert learner.dtypes == {torch.float32}
    learner.dtypes.clear()
    double = meta_gradient(learner, Contrastive(beta=0.1, inner_steps=3, precision="float64"), batch())
    assert learner.dtypes == {torch.float64}
    assert all(g.dtype == torch.float32 for g in double.values())
    for name, g in single.items():  # the same estimate, to float32 rounding divided by beta
        torch.testing.assert_close(double[name], g, rtol=1e-4, atol=1e-5)


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match='precision must be "float32" or "float64"'):
        Contrastive(precision="float16")  # type: ignore[arg-type]


def test_a_float64_estimator_trains_and_evaluates_a_float32_dual_system_in_the_module() -> None:
    """The training step scores, and validation adapts, in the estimator's dtype: the dual system's slow weights
    enter its predictions, so meta-parameters left in float32 would meet float64 fast weights and inputs."""
    torch.manual_seed(0)
    module = MetaLearningModule(
        DualSystem(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)), loss="cross_entropy"),
        Contrastive(beta=0.1, inner_steps=3, precision="float64"),
    )
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    episodes = DataLoader([batch()], batch_size=None)
    trainer.fit(module, train_dataloaders=episodes, val_dataloaders=episodes)
    assert trainer.global_step == 1
    (result,) = trainer.validate(module, dataloaders=episodes, verbose=False)
    assert 0.0 <= result["val/accuracy"] <= 1.0
