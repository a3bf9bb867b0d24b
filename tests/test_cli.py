"""The ``lightning-contrastive`` console script and the shipped sinusoid configs, run for real in tmp_path."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_contrastive import MAML, Reptile
from lightning_contrastive.cli import MetaLearningCLI, main
from lightning_contrastive.module import MetaLearningModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sinusoid"
EVERY_SHIPPED_CONFIG = sorted(
    path for folder in ("sinusoid", "omniglot", "paper") for path in (CONFIGS.parent / folder).glob("*.yaml")
)
ESTIMATORS = ["Contrastive", "MAML", "FirstOrderMAML", "Implicit", "Reptile"]
SHIPPED_CONFIGS = ["contrastive", "contrastive_one_sided", "maml", "fomaml", "implicit", "reptile", "dual_system"]


@pytest.fixture(autouse=True)
def bare_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI gets its arguments through ``args`` only, as from a shell; pytest's own flags are not for it.

    Runs in ``tmp_path``, where the configs' fixed checkpoint folders (``checkpoints/...``) then land.
    """
    monkeypatch.setattr(sys, "argv", ["lightning-contrastive"])
    monkeypatch.chdir(tmp_path)


def tiny_run(tmp_path: Path, config: str = "contrastive", max_steps: int = 2) -> list[str]:
    """A shipped config shrunk to a few steps on a few tasks, logging to CSV and checkpointing in ``tmp_path``."""
    return [
        f"--config={CONFIGS / f'{config}.yaml'}",
        f"--trainer.max_steps={max_steps}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.val_check_interval=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--data.batch_size=2",
        "--data.num_eval_tasks=4",
        "--data.eval_batch_size=4",
    ]


def logged_columns(tmp_path: Path) -> dict[str, list[float]]:
    """Every metric the CSVLogger wrote, by name, in order."""
    (metrics,) = tmp_path.glob("lightning_logs/version_0/metrics.csv")
    columns: dict[str, list[float]] = {}
    with metrics.open() as file:
        for row in csv.DictReader(file):
            for name, value in row.items():
                if value:
                    columns.setdefault(name, []).append(float(value))
    return columns


@pytest.mark.parametrize("config", SHIPPED_CONFIGS)
def test_every_shipped_config_fits_and_logs(config: str, tmp_path: Path) -> None:
    main(["fit", *tiny_run(tmp_path, config)])
    logged = logged_columns(tmp_path)
    inner = {"contrastive": ["free", "nudged_pos", "nudged_neg"], "contrastive_one_sided": ["free", "nudged_pos"]}
    for name in ["train/query_loss", "val/query_loss", "val/query_loss_ci95"] + [
        f"inner/{phase}" for phase in inner.get(config, ["free"])
    ]:
        assert len(logged[name]) >= 1 and all(torch.isfinite(torch.tensor(logged[name]))), name
    assert logged["step"][-1] >= 1  # both meta-steps ran
    assert (tmp_path / "lightning_logs" / "version_0" / "config.yaml").is_file()
    assert [path.name for path in (tmp_path / "checkpoints" / f"sinusoid_{config}").iterdir()] == ["last.ckpt"]


def test_the_estimator_swaps_with_one_flag(tmp_path: Path) -> None:
    cli = MetaLearningCLI(args=["fit", *tiny_run(tmp_path, max_steps=1), "--model.estimator=MAML"])
    estimator = cli.model.estimator
    assert type(estimator) is MAML
    assert estimator.inner_optimizer.lr == 0.005  # carried over from the config's Contrastive
    assert estimator.inner_steps == 20  # the config's inner steps: a swap keeps the inner learning
    assert cli.trainer.global_step == 1


def inner_learning(estimator: object) -> tuple[int, float, float]:
    """What a swap must keep: the inner steps, learning rate and momentum."""
    return estimator.inner_steps, estimator.inner_optimizer.lr, estimator.inner_optimizer.momentum


@pytest.mark.parametrize("config", EVERY_SHIPPED_CONFIG, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_every_estimator_swap_keeps_the_configs_inner_learning(config: Path, tmp_path: Path) -> None:
    """``--model.estimator X`` on any shipped config runs X with the config's inner steps, lr and momentum."""
    arguments = [f"--config={config}", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    configured = inner_learning(MetaLearningCLI(args=arguments, run=False).model.estimator)
    for name in ESTIMATORS:
        try:
            swapped = MetaLearningCLI(args=[*arguments, f"--model.estimator={name}"], run=False).model.estimator
        except ValueError as refusal:  # Reptile on a learner with meta-parameters that are not initialisations
            assert name == "Reptile" and "Reptile is defined only for" in str(refusal), (name, refusal)
            continue
        assert type(swapped).__name__ == name
        assert inner_learning(swapped) == configured, name


def test_a_mistyped_estimator_names_the_valid_ones_in_a_few_lines(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={CONFIGS / 'contrastive.yaml'}", "--model.estimator=MAMl"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    (listed,) = [line for line in error.splitlines() if line.startswith("Valid names: ")]
    # Every estimator imported so far resolves by its short name, so one a test defined may be listed too.
    assert {"Contrastive", "FirstOrderMAML", "Implicit", "MAML", "Reptile"} <= set(
        listed.removeprefix("Valid names: ").split(" (")[0].split(", ")
    )
    assert "MAMl" in error and "--help" in error
    assert len(error.splitlines()) < 10, error  # not the whole usage


def test_reptile_with_learned_strengths_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="learn_lambda=False"):
        MetaLearningCLI(args=["fit", *tiny_run(tmp_path, "reptile"), "--model.learner.init_args.learn_lambda=true"])
    cli = MetaLearningCLI(args=tiny_run(tmp_path, "reptile"), run=False)
    assert type(cli.model.estimator) is Reptile


def test_a_second_run_in_the_same_directory_overwrites_its_config(tmp_path: Path) -> None:
    for _ in range(2):  # without a logger, both runs save config.yaml to default_root_dir itself
        main(["fit", *tiny_run(tmp_path, max_steps=1), "--trainer.logger=false"])
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["trainer"]["max_steps"] == 1


def test_lr_scheduler_from_yaml_steps_after_every_meta_step(tmp_path: Path) -> None:
    scheduler = tmp_path / "scheduler.yaml"
    scheduler.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "lr_scheduler": {
                        "class_path": "torch.optim.lr_scheduler.StepLR",
                        "init_args": {"step_size": 1, "gamma": 0.5},
                    }
                }
            }
        )
    )
    cli = MetaLearningCLI(args=["fit", *tiny_run(tmp_path, max_steps=3), f"--config={scheduler}"])
    (optimizer,) = cli.trainer.optimizers
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.003 * 0.5**3)


def test_checkpoint_reloads_without_arguments_and_feeds_every_subcommand(tmp_path: Path) -> None:
    cli = MetaLearningCLI(args=["fit", *tiny_run(tmp_path)])
    checkpoint = tmp_path / "checkpoints" / "sinusoid_contrastive" / "last.ckpt"
    restored = MetaLearningModule.load_from_checkpoint(checkpoint)  # learner and estimator from their class_path
    assert repr(restored.estimator) == repr(cli.model.estimator)
    for (name, trained), (_, loaded) in zip(
        cli.model.learner.named_meta_parameters(), restored.learner.named_meta_parameters(), strict=True
    ):
        torch.testing.assert_close(loaded, trained, msg=name)

    for subcommand, metric in (("validate", "val/query_loss"), ("test", "test/query_loss")):
        run = MetaLearningCLI(args=[subcommand, *tiny_run(tmp_path / subcommand), f"--ckpt_path={checkpoint}"])
        assert metric in run.trainer.callback_metrics
    run = MetaLearningCLI(args=["predict", *tiny_run(tmp_path / "predict"), f"--ckpt_path={checkpoint}"])
    assert run.trainer.predict_loop.predictions[0].shape == (4, 100, 1)  # the predict set's query grid


def test_print_config_shows_the_whole_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={CONFIGS / 'contrastive.yaml'}", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["estimator"]["init_args"]["beta"] == 0.03
    assert printed["model"]["optimizer"]["class_path"] == "torch.optim.Adam"
    assert printed["data"]["init_args"]["num_eval_tasks"] == 600


def test_fit_then_test_last_evaluates_the_trained_module_and_prints_one_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trained = MetaLearningCLI(args=["fit", *tiny_run(tmp_path)]).model
    capsys.readouterr()
    tested = MetaLearningCLI(args=["test", *tiny_run(tmp_path / "test"), "--ckpt_path=last"]).model
    for (name, expected), (_, loaded) in zip(
        trained.learner.named_meta_parameters(), tested.learner.named_meta_parameters(), strict=True
    ):
        torch.testing.assert_close(loaded, expected, rtol=0, atol=0, msg=name)
    printed = capsys.readouterr().out
    assert printed.count("test/query_loss ") == 1, printed  # our table (with the CI and episodes), not Lightning's too
    assert "Meta-test results" in printed


@pytest.mark.parametrize(
    ("ckpt_path", "message"),
    [
        ("last", "no last checkpoint found ("),
        ("best", "--ckpt_path best refers to the best checkpoint of a `fit` in the same process"),
        ("missing.ckpt", "--ckpt_path missing.ckpt: no such file"),
    ],
)
def test_evaluating_a_checkpoint_that_does_not_exist_fails_clearly(
    ckpt_path: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for subcommand in ("test", "validate"):
        with pytest.raises(SystemExit) as exit_info:
            main([subcommand, *tiny_run(tmp_path), f"--ckpt_path={ckpt_path}"])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert message in error and (ckpt_path != "last" or "checkpoints/sinusoid_contrastive)" in error), error
