"""Old public names keep working for one release and warn, naming what replaced them (CHANGELOG.md).

- the module ``lightning_contrastive.meta_gradient``, now ``lightning_contrastive.estimation``, while
  ``lightning_contrastive.meta_gradient`` stays the function;
- ``Contrastive(free_steps=...)``, now ``inner_steps``: in Python, in YAML configs through the CLI, and in the
  saved configuration of a checkpoint written before the rename.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

import lightning_contrastive
from lightning_contrastive import Contrastive, estimation
from lightning_contrastive.cli import MetaLearningCLI
from lightning_contrastive.compat.flavours import FLAVOURED, MIRROR
from lightning_contrastive.module import MetaLearningModule


# ------------------------------------------------------------------ the module behind meta_gradient
def test_the_package_exports_the_function_meta_gradient_and_the_module_estimation() -> None:
    import lightning_contrastive.meta_gradient

    import lightning_contrastive.estimation as module

    assert lightning_contrastive.meta_gradient is estimation.meta_gradient
    assert callable(lightning_contrastive.meta_gradient) and not isinstance(
        lightning_contrastive.meta_gradient, ModuleType
    )
    assert module is estimation and module.ieee_float32 is estimation.ieee_float32


def test_importing_from_the_old_module_path_warns_and_gives_the_new_modules_objects() -> None:
    with pytest.warns(DeprecationWarning, match=r"lightning_contrastive\.estimation") as caught:
        from lightning_contrastive.meta_gradient import choose_batched, estimate
    assert estimate is estimation.estimate and choose_batched is estimation.choose_batched
    assert {Path(warning.filename) for warning in caught} == {Path(__file__)}  # points at the importing line
    assert lightning_contrastive.meta_gradient is estimation.meta_gradient  # the from-import did not rebind it
    with pytest.raises(ImportError, match="no_such_name"):  # a name it never had: an ImportError, no warning
        from lightning_contrastive.meta_gradient import no_such_name  # noqa: F401


def test_the_old_module_path_imported_first_in_a_fresh_interpreter_leaves_the_function_in_place() -> None:
    """Import order matters to a module shadowing a name: a fresh process imports the old path before the package."""
    program = (
        "import warnings\n"
        "import lightning_contrastive.meta_gradient\n"
        "import lightning_contrastive as lc\n"
        "from lightning_contrastive.estimation import MetaEstimate, meta_gradient\n"
        "assert lc.meta_gradient is meta_gradient, lc.meta_gradient\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from lightning_contrastive.meta_gradient import MetaEstimate as old\n"
        "assert old is MetaEstimate\n"
        "assert any('lightning_contrastive.estimation' in str(w.message) for w in caught), caught\n"
    )
    subprocess.run([sys.executable, "-c", program], check=True, timeout=120)


def packages() -> list[ModuleType]:
    """``lightning_contrastive`` and every package below it, with ``.lightning``'s mirrored ones."""
    found = [lightning_contrastive]
    for info in pkgutil.walk_packages(lightning_contrastive.__path__, f"{lightning_contrastive.__name__}."):
        if info.ispkg:
            found.append(importlib.import_module(info.name))
    return found + [importlib.import_module(f"{MIRROR}.{name}") for name in ("callbacks", "data")]


@pytest.mark.parametrize("package", packages(), ids=lambda package: package.__name__)
def test_no_package_exports_a_name_that_is_one_of_its_submodules(package: ModuleType) -> None:
    submodules = {info.name for info in pkgutil.iter_modules(package.__path__)}
    if package.__name__ == MIRROR:
        submodules |= set(FLAVOURED)
    assert not submodules & set(getattr(package, "__all__", ()))
    for name in submodules:
        submodule = importlib.import_module(f"{package.__name__}.{name}")
        assert getattr(package, name) is submodule, f"{package.__name__}.{name} is not the module {submodule}"


# ------------------------------------------------------------------ Contrastive(free_steps=...)
def test_free_steps_is_inner_steps_under_its_former_name_with_a_warning() -> None:
    with pytest.warns(DeprecationWarning, match=r"free_steps=\.\.\.\) is deprecated.*Pass inner_steps=30"):
        old = Contrastive(free_steps=30, nudged_steps=5)
    assert repr(old) == repr(Contrastive(inner_steps=30, nudged_steps=5))
    assert old.adaptation_steps == 30
    with pytest.warns(DeprecationWarning, match="free_steps"):
        assert Contrastive(free_steps=30).nudged_steps == 30  # the nudged phases' default follows it, as before


def test_free_steps_as_an_attribute_reads_and_writes_inner_steps_with_a_warning() -> None:
    estimator = Contrastive(inner_steps=7)
    with pytest.warns(DeprecationWarning, match="renamed inner_steps"):
        assert estimator.free_steps == 7
    with pytest.warns(DeprecationWarning, match="renamed inner_steps"):
        estimator.free_steps = 9
    assert estimator.inner_steps == 9 and estimator.adaptation_steps == 9


def test_free_steps_and_inner_steps_together_must_agree() -> None:
    conflict = r"both inner_steps=20 and its deprecated name free_steps=30"
    with pytest.raises(ValueError, match=conflict), pytest.warns(DeprecationWarning):
        Contrastive(inner_steps=20, free_steps=30)
    with pytest.warns(DeprecationWarning):
        assert Contrastive(inner_steps=30, free_steps=30).inner_steps == 30
    # the old name's value is checked as the new one's
    with pytest.raises(ValueError, match="inner_steps must be"), pytest.warns(DeprecationWarning):
        Contrastive(free_steps=0)


@pytest.fixture
def bare_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI gets its arguments through ``args`` only, run in ``tmp_path``; pytest's own flags are not for it."""
    monkeypatch.setattr(sys, "argv", ["lightning-contrastive"])
    monkeypatch.chdir(tmp_path)


def one_step_config(folder: Path, estimator: dict[str, object]) -> Path:
    """A config file in ``folder``: one meta-step of a small complex synapse on sinusoids with
    ``Contrastive(**estimator)``, saving ``last.ckpt`` in ``folder``."""
    config = {
        "trainer": {
            "max_steps": 1,
            "limit_val_batches": 0,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(folder),
            "callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"dirpath": str(folder), "save_last": True}}],
        },
        "model": {
            "learner": {
                "class_path": "lightning_contrastive.ComplexSynapse",
                "init_args": {
                    "backbone": {"class_path": "lightning_contrastive.networks.MLP", "init_args": {"hidden": [8]}},
                    "loss": "mse",
                },
            },
            "estimator": {"class_path": "lightning_contrastive.Contrastive", "init_args": estimator},
        },
        "data": {"class_path": "SinusoidDataModule", "init_args": {"batch_size": 2}},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.usefixtures("bare_command_line")
def test_a_yaml_config_with_free_steps_runs_through_the_cli_with_a_warning(tmp_path: Path) -> None:
    config = one_step_config(tmp_path, {"free_steps": 3, "nudged_steps": 2})  # as the previous release's said it
    with pytest.warns(DeprecationWarning, match="renamed inner_steps"):
        cli = MetaLearningCLI(args=["fit", f"--config={config}"])
    assert cli.model.estimator.inner_steps == 3 and cli.trainer.global_step == 1


@pytest.mark.usefixtures("bare_command_line")
def test_the_cli_help_marks_free_steps_deprecated(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        MetaLearningCLI(args=["fit", "--model.estimator.help", "Contrastive"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--model.estimator.free_steps FREE_STEPS deprecated alias of ``inner_steps``" in help_text


@pytest.fixture
def checkpoint_before_the_rename(bare_command_line: None, tmp_path: Path) -> Path:
    """A CLI checkpoint as the previous release wrote it: its estimator's saved arguments say ``free_steps``.

    Saved by today's code, then its configuration edited: ``inner_steps`` renamed back to ``free_steps``.
    """
    MetaLearningCLI(args=["fit", f"--config={one_step_config(tmp_path, {'inner_steps': 3, 'nudged_steps': 2})}"])
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    saved = checkpoint["hyper_parameters"]["estimator"]["init_args"]
    del saved["free_steps"]  # today's code saves the alias too, unset
    saved["free_steps"] = saved.pop("inner_steps")
    torch.save(checkpoint, tmp_path / "before_the_rename.ckpt")
    return tmp_path / "before_the_rename.ckpt"


def test_a_checkpoint_from_before_the_rename_loads_with_a_warning(checkpoint_before_the_rename: Path) -> None:
    checkpoint = torch.load(checkpoint_before_the_rename, weights_only=True)
    with pytest.warns(DeprecationWarning, match="renamed inner_steps"):
        module = MetaLearningModule.load_from_checkpoint(checkpoint_before_the_rename)
    assert isinstance(module.estimator, Contrastive) and module.estimator.inner_steps == 3
    assert module.state_dict().keys() == checkpoint["state_dict"].keys()
    assert all(torch.equal(tensor, checkpoint["state_dict"][key]) for key, tensor in module.state_dict().items())


def test_a_checkpoint_from_before_the_rename_that_does_not_fit_names_the_key(
    checkpoint_before_the_rename: Path,
) -> None:
    checkpoint = torch.load(checkpoint_before_the_rename, weights_only=True)
    checkpoint["hyper_parameters"]["learner"]["init_args"]["backbone"]["init_args"]["hidden"] = [16]
    torch.save(checkpoint, checkpoint_before_the_rename)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError, match=r"omega\.layers\.0\.weight: shape \(8, 1\) in the checkpoint, \(16, 1\)"):
            MetaLearningModule.load_from_checkpoint(checkpoint_before_the_rename)


def test_the_old_module_path_warns_only_for_names_it_has_and_star_imports_them() -> None:
    moved = sys.modules["lightning_contrastive.meta_gradient"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not hasattr(moved, "no_such_name")  # a plain AttributeError, no DeprecationWarning
    assert "estimate" in moved.__all__ and "meta_gradient" in moved.__all__
