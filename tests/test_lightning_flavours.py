"""Both Lightning packages in one environment: ``pytorch_lightning`` and the unified ``lightning``.

Each flavour (``lightning_contrastive`` on ``pytorch_lightning``, ``lightning_contrastive.lightning`` on
``lightning.pytorch``) fits, validates, tests and resumes with its own Trainer, callbacks and loggers; a mix that
cannot work gets an error that says what to import; the core imports neither package.
"""

from __future__ import annotations

import csv
import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lightning_contrastive import ComplexSynapse, Contrastive, MetaLearningModule
from lightning_contrastive.networks import MLP

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class Flavour:
    """One Lightning package and our classes built on it."""

    lightning: ModuleType  # pytorch_lightning or lightning.pytorch
    module: type
    callbacks: ModuleType
    data: ModuleType
    loggers: ModuleType


def load_flavour(lightning: str, ours: str) -> Flavour:
    """The Lightning package ``lightning`` and our package ``ours`` built on it."""
    return Flavour(
        importlib.import_module(lightning),
        importlib.import_module(ours).MetaLearningModule,
        *(importlib.import_module(f"{ours}.{name}") for name in ("callbacks", "data", "loggers")),
    )


FLAVOURS = {
    "pytorch_lightning": load_flavour("pytorch_lightning", "lightning_contrastive"),
    "lightning": load_flavour("lightning.pytorch", "lightning_contrastive.lightning"),
}


@pytest.fixture(params=list(FLAVOURS))
def flavour(request: pytest.FixtureRequest) -> Flavour:
    return FLAVOURS[request.param]


def tiny_module(flavour: Flavour) -> MetaLearningModule:
    torch.manual_seed(0)
    return flavour.module(
        ComplexSynapse(MLP(hidden=[8]), loss="mse"), Contrastive(beta=0.1, inner_steps=3, nudged_steps=2)
    )


def tiny_data(flavour: Flavour) -> object:
    return flavour.data.SinusoidDataModule(batch_size=2, num_eval_tasks=4, eval_batch_size=4, seed=0)


def trainer(flavour: Flavour, tmp_path: Path, max_steps: int, *callbacks: object) -> object:
    """The flavour's Trainer with its own ModelCheckpoint (last.ckpt every step) and CSVLogger, plus ours."""
    checkpoint = flavour.lightning.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=1
    )
    return flavour.lightning.Trainer(
        max_steps=max_steps,
        callbacks=[checkpoint, *callbacks],
        logger=[
            flavour.lightning.loggers.CSVLogger(tmp_path),
            flavour.loggers.OfflineFallbackWandbLogger(save_dir=tmp_path, mode="disabled"),
        ],
        log_every_n_steps=1,
        val_check_interval=2,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_fit_validate_test_and_resume_with_each_packages_trainer(flavour: Flavour, tmp_path: Path) -> None:
    module, data = tiny_module(flavour), tiny_data(flavour)
    fit = trainer(
        flavour,
        tmp_path,
        2,
        flavour.callbacks.MetaGradientMonitor(every_n_steps=1),
        flavour.callbacks.BetaSchedule(start=0.1, end=0.05, steps=2),
    )
    fit.fit(module, data)
    assert fit.global_step == 2
    with (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").open() as file:  # the package's CSVLogger
        logged = {name for row in csv.DictReader(file) for name, value in row.items() if value}
    assert {"train/query_loss", "val/query_loss", "meta_grad/norm", "train/beta"} <= logged, logged
    (validated,) = fit.validate(module, data)
    (tested,) = fit.test(module, data)
    assert validated["val/query_loss"] > 0 and tested["test/query_loss"] > 0

    last = tmp_path / "checkpoints" / "last.ckpt"
    restored = flavour.module.load_from_checkpoint(last, learner=module.learner, estimator=module.estimator)
    for (name, saved), (_, loaded) in zip(
        module.learner.named_meta_parameters(), restored.learner.named_meta_parameters(), strict=True
    ):
        torch.testing.assert_close(loaded, saved, rtol=0, atol=0, msg=name)
    resumed_module = tiny_module(flavour)
    resumed = trainer(flavour, tmp_path / "resumed", 3, flavour.callbacks.BetaSchedule(start=0.1, end=0.05, steps=2))
    resumed.fit(resumed_module, tiny_data(flavour), ckpt_path=last)
    assert resumed.global_step == 3  # continued from step 2, not from scratch
    assert resumed_module.estimator.beta == pytest.approx(0.05)  # the callback's state came back too


@pytest.mark.parametrize("ours", list(FLAVOURS))
def test_a_module_of_the_other_package_is_refused_by_the_trainer(ours: str, tmp_path: Path) -> None:
    """Lightning rejects it before any hook of ours runs; this is the message users see
    (``docs/getting-started/installation.md``)."""
    other = FLAVOURS["lightning" if ours == "pytorch_lightning" else "pytorch_lightning"]
    with pytest.raises(TypeError, match=r"`model` must be a `LightningModule`.*got `MetaLearningModule`"):
        trainer(other, tmp_path, 1).fit(tiny_module(FLAVOURS[ours]), tiny_data(other))


@pytest.mark.parametrize("ours", list(FLAVOURS))
def test_our_callback_of_the_other_package_names_the_import_to_use(ours: str, tmp_path: Path) -> None:
    other = "lightning" if ours == "pytorch_lightning" else "pytorch_lightning"
    callback = FLAVOURS[ours].callbacks.MetaGradientMonitor(every_n_steps=1)
    expected = {"lightning": "lightning_contrastive.lightning", "pytorch_lightning": "lightning_contrastive"}[other]
    message = rf"built on {ours}, but this Trainer is {other}'s.*`from {expected}\.callbacks\.meta_gradient_monitor "
    with pytest.raises(TypeError, match=message):
        trainer(FLAVOURS[other], tmp_path, 1, callback).fit(tiny_module(FLAVOURS[other]), tiny_data(FLAVOURS[other]))


def test_the_cli_of_each_flavour_builds_that_flavour_from_a_shipped_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Short class names in the configs (``ModelCheckpoint``, ``OfflineFallbackWandbLogger``, ``MetaGradientMonitor``,
    ``SinusoidDataModule``) resolve to the running CLI's package, with both flavours imported in this process."""
    monkeypatch.setattr(sys, "argv", ["lightning-contrastive"])  # the CLI's arguments are `args`, not pytest's
    arguments = [f"--config={CONFIGS / 'sinusoid' / 'contrastive.yaml'}", f"--trainer.default_root_dir={tmp_path}"]
    for package, other, cli_module in (
        ("pytorch_lightning", "lightning.pytorch", "lightning_contrastive.cli"),
        ("lightning.pytorch", "pytorch_lightning", "lightning_contrastive.lightning.cli"),
    ):
        cli = importlib.import_module(cli_module).MetaLearningCLI(args=arguments, run=False)
        for built in [cli.trainer, cli.model, cli.datamodule, *cli.trainer.callbacks, *cli.trainer.loggers]:
            modules = [cls.__module__ for cls in type(built).__mro__]
            assert any(name.startswith(f"{package}.") for name in modules), (package, built)
            assert not any(name.startswith(f"{other}.") for name in modules), (package, built)
        assert type(cli.model.estimator) is Contrastive  # the core is shared
        # the parsed configuration became the hyperparameters, so load_from_checkpoint rebuilds the module alone
        assert cli.model.hparams["learner"]["class_path"] == "lightning_contrastive.ComplexSynapse"


def imported_lightning_packages(*steps: list[str]) -> list[set[str]]:
    """In one fresh interpreter: after importing each step's modules in turn, which Lightning packages are loaded."""
    report = "print(*{'lightning', 'pytorch_lightning'} & set(sys.modules), sep=',')\n"
    code = "import sys\n" + "".join(f"for m in {modules!r}: __import__(m)\n{report}" for modules in steps)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [set(filter(None, line.split(","))) for line in run.stdout.splitlines()]


def test_the_core_imports_no_lightning_package_and_each_flavour_only_its_own() -> None:
    core = ["lightning_contrastive"]
    core += [
        f"lightning_contrastive.{m}" for m in ("learners", "estimators", "meta_gradient", "evaluation", "checkpoints")
    ]
    facing = ["module", "cli", "callbacks", "data", "loggers"]
    unified = [f"lightning_contrastive.lightning.{m}" for m in facing]
    assert imported_lightning_packages(core, unified) == [set(), {"lightning"}]
    assert imported_lightning_packages([f"lightning_contrastive.{m}" for m in facing]) == [{"pytorch_lightning"}]


def test_with_only_the_unified_package_its_flavour_works_and_the_other_says_what_to_import() -> None:
    """``pytorch_lightning`` made unimportable: the ``lightning`` flavour trains, the default names its alternative."""
    code = """
import sys
sys.modules["pytorch_lightning"] = None  # as if not installed
import lightning as L
from lightning_contrastive.lightning import ComplexSynapse, FirstOrderMAML, MetaLearningModule
from lightning_contrastive.lightning.data import SinusoidDataModule
from lightning_contrastive.networks import MLP
module = MetaLearningModule(ComplexSynapse(MLP(hidden=[4]), loss="mse"), FirstOrderMAML(inner_steps=2))
trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0)
trainer.fit(module, SinusoidDataModule(batch_size=2, num_eval_tasks=2))
print("steps", trainer.global_step)
try:
    from lightning_contrastive import MetaLearningModule
except ImportError as error:
    print(error)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "steps 1" in run.stdout
    assert "use `from lightning_contrastive.lightning import MetaLearningModule`" in run.stdout
