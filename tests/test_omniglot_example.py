"""``examples/omniglot_5way.py`` and the ``configs/omniglot`` files, on the real shared Omniglot images.

The smoke test runs the example end to end on each configuration shrunk to tiny settings, and checks that
the console script, given the same configuration, reproduces both of its numbers. The slow test runs the
example as shipped and checks that meta-training beats the untrained start by at least 15 accuracy points.
Set ``LIGHTNING_CONTRASTIVE_OMNIGLOT_ROOT`` to read the images from elsewhere.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lightning_contrastive.cli import MetaLearningCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "omniglot"
EXAMPLE_FILE = CONFIGS.parents[1] / "examples" / "omniglot_5way.py"
NETWORK_ARGUMENT = {"contrastive_5way1shot": "backbone", "dual_system_5way1shot": "primary"}
"""Where each shipped configuration's learner takes its Conv4."""


def tiny(config: str) -> list[str]:
    """A shipped configuration shrunk to two meta-steps of a 4-channel Conv4 and 10 evaluation episodes."""
    return [
        f"--config={CONFIGS / f'{config}.yaml'}",
        "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false",
        f"--model.learner.init_args.{NETWORK_ARGUMENT[config]}.init_args.channels=4",
        "--model.estimator.init_args.inner_steps=3",
        "--model.estimator.init_args.nudged_steps=2",
        "--data.batch_size=2",
        "--data.num_train_tasks=4",
        "--data.num_eval_tasks=10",
        "--data.eval_batch_size=5",
    ]


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("omniglot_5way", EXAMPLE_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


example = load_example()


@pytest.fixture(scope="module")
def root() -> Path:
    found = example.default_root()
    if not any(found.glob("images_*")):
        pytest.skip(f"No Omniglot archives in {found}; point {example.ROOT_ENV_VAR} at their folder.")
    return found


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The configuration's checkpoint folder is relative: keep it, and the CLI's logs, out of the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["omniglot_5way.py"])


def console_test(config: str, *overrides: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """``lightning-contrastive test`` on the tiny ``config``: the metrics it logs and the meta-parameters it tests."""
    cli = MetaLearningCLI(args=["test", *tiny(config), *overrides])
    metrics = {name: float(value) for name, value in cli.trainer.callback_metrics.items()}
    return metrics, {name: p.detach().clone() for name, p in cli.model.learner.named_meta_parameters()}


@pytest.mark.parametrize("config", sorted(NETWORK_ARGUMENT))
def test_the_example_runs_a_config_and_the_console_script_reproduces_both_numbers(
    config: str, root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cached = f"--data.cache_dir={tmp_path / 'cache'}"
    comparison = example.main(["--root", str(root), cached, *tiny(config)])
    printed = capsys.readouterr().out
    assert "channels=4" in printed and "inner_steps=3" in printed and "10 fixed meta-test episodes" in printed
    assert "start (untrained)" in printed and "meta-trained (2 steps)" in printed
    assert f"{100 * comparison.win:+.1f} points" in printed
    for score in (comparison.untrained, comparison.trained):
        assert 0 <= score.mean <= 1 and math.isfinite(score.ci95) and score.ci95 > 0
    assert set(comparison.seconds) == {"read images", "test untrained", "meta-train", "test meta-trained"}
    assert (tmp_path / "checkpoints" / f"omniglot_{config}" / "last.ckpt").is_file()

    untrained, start = console_test(config, f"--data.root={root}", cached)
    trained, meta_trained = console_test(config, f"--data.root={root}", cached, "--ckpt_path=last")
    assert untrained["test/accuracy"] == pytest.approx(comparison.untrained.mean, abs=1e-6)
    assert trained["test/accuracy"] == pytest.approx(comparison.trained.mean, abs=1e-6)
    assert trained["test/accuracy_ci95"] == pytest.approx(comparison.trained.ci95, abs=1e-6)
    moved = {name for name in start if not torch.equal(start[name], meta_trained[name])}
    # The checkpoint holds meta-trained weights and strengths (conv biases feed BatchNorm, which cancels them).
    assert {name for name in start if name.endswith("weight")} <= moved


def test_the_root_comes_from_the_environment_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(example.ROOT_ENV_VAR, str(tmp_path))
    assert example.default_root() == tmp_path
    monkeypatch.delenv(example.ROOT_ENV_VAR)
    assert example.default_root() == example.DEFAULT_ROOT


@pytest.mark.slow
def test_meta_training_beats_the_untrained_start_by_15_points(root: Path) -> None:
    comparison = example.main(["--root", str(root)])  # configs/omniglot/contrastive_5way1shot.yaml as shipped
    assert comparison.win >= 0.15, comparison
    assert comparison.trained.mean - comparison.trained.ci95 > comparison.untrained.mean + comparison.untrained.ci95
