"""Exact resume: a run stopped after n meta-steps and resumed for n more ends where a run of 2n steps does.

A checkpoint must carry everything the next step depends on: meta-parameters, the outer optimizer's state and
its LR schedule, callbacks' state (the beta schedule), the data sampler's position, and the random draws.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from lightning_contrastive import ComplexSynapse, Contrastive
from lightning_contrastive.callbacks import BetaSchedule
from lightning_contrastive.cli import MetaLearningCLI
from lightning_contrastive.data import OmniglotDataModule, SinusoidDataModule
from lightning_contrastive.module import MetaLearningModule
from lightning_contrastive.networks import MLP

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIGS = REPOSITORY / "configs" / "sinusoid"
OMNIGLOT = Path(os.environ.get("LIGHTNING_CONTRASTIVE_OMNIGLOT_ROOT", REPOSITORY.parent / "shared/data/omniglot"))
STEPS = 4  # n: the interrupted run stops after n meta-steps and resumes for n more

# Resuming mid-epoch from a data module that restores its own position: Lightning cannot see that.
pytestmark = pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")


def sinusoid() -> SinusoidDataModule:
    """3 meta-batches per epoch, so that 2n steps cross two epoch boundaries and n stops mid-epoch."""
    return SinusoidDataModule(shots=5, test_shots=6, batch_size=2, num_train_tasks=6, num_eval_tasks=4)


def omniglot(cache_dir: Path) -> OmniglotDataModule:
    return OmniglotDataModule(
        root=str(OMNIGLOT),
        ways=3,
        shots=1,
        test_shots=2,
        batch_size=2,
        num_train_tasks=6,
        num_eval_tasks=4,
        image_size=14,
        cache_dir=str(cache_dir),
    )


def module(
    backbone: Callable[[], nn.Module], loss: str, init_seed: int, query_subsample: int | None = None
) -> MetaLearningModule:
    """Adam (stateful) with a step LR schedule, so that a resume that lost either would take other steps."""
    torch.manual_seed(init_seed)
    return MetaLearningModule(
        ComplexSynapse(backbone(), loss=loss, init_lambda=1.0),
        # nudge="full": the nudged phases evaluate the query set, where query_subsample draws at random
        Contrastive(
            beta=0.1, inner_steps=4, nudged_steps=2, inner_lr=0.02, nudge="full", query_subsample=query_subsample
        ),
        optimizer=partial(torch.optim.Adam, lr=0.01),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.5),
    )


def sinusoid_module(init_seed: int, query_subsample: int | None = None) -> MetaLearningModule:
    return module(partial(MLP, hidden=(8,)), "mse", init_seed, query_subsample)


def omniglot_module(init_seed: int) -> MetaLearningModule:
    return module(lambda: nn.Sequential(nn.Flatten(), nn.Linear(14 * 14, 3)), "cross_entropy", init_seed)


def fit(
    meta_learner: MetaLearningModule,
    datamodule: pl.LightningDataModule,
    max_steps: int,
    checkpoints: Path,
    ckpt_path: Path | None = None,
) -> pl.Trainer:
    """Fit with a beta schedule (a stateful callback) and a validation every epoch, saving last.ckpt every step."""
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=[
            BetaSchedule(start=0.3, end=0.05, steps=2 * STEPS),
            pl.callbacks.ModelCheckpoint(checkpoints, save_last=True, every_n_train_steps=1),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=checkpoints,
    )
    trainer.fit(meta_learner, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def meta_parameters(meta_learner: MetaLearningModule) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in meta_learner.learner.named_meta_parameters()}


def assert_resume_is_exact(
    build_module: Callable[[int], MetaLearningModule], build_data: Callable[[], pl.LightningDataModule], tmp_path: Path
) -> None:
    uninterrupted = build_module(0)
    fit(uninterrupted, build_data(), 2 * STEPS, tmp_path / "uninterrupted")

    fit(build_module(0), build_data(), STEPS, tmp_path / "interrupted")
    resumed = build_module(1)  # another initialisation: everything must come from the checkpoint
    trainer = fit(resumed, build_data(), 2 * STEPS, tmp_path / "resumed", tmp_path / "interrupted" / "last.ckpt")

    assert trainer.global_step == 2 * STEPS
    expected, actual = meta_parameters(uninterrupted), meta_parameters(resumed)
    assert all(torch.equal(actual[name], expected[name]) for name in expected), "resumed run took other steps"
    assert resumed.estimator.beta == uninterrupted.estimator.beta
    start = meta_parameters(build_module(0))
    assert not any(torch.equal(expected[name], start[name]) for name in start)  # training moved every parameter


def test_sinusoid_run_resumed_mid_epoch_ends_with_the_parameters_of_an_uninterrupted_run(tmp_path: Path) -> None:
    assert_resume_is_exact(sinusoid_module, sinusoid, tmp_path)


@pytest.mark.skipif(not (OMNIGLOT / "images_background_small1.zip").is_file(), reason="Omniglot zips not found")
def test_omniglot_run_resumed_mid_epoch_ends_with_the_parameters_of_an_uninterrupted_run(tmp_path: Path) -> None:
    assert_resume_is_exact(omniglot_module, partial(omniglot, tmp_path / "omniglot-cache"), tmp_path)


def test_random_draws_of_the_estimator_repeat_after_a_resume(tmp_path: Path) -> None:
    """``query_subsample`` draws queries at random in every nudged step: a resume must repeat those draws."""
    assert_resume_is_exact(partial(sinusoid_module, query_subsample=3), sinusoid, tmp_path)


def test_loading_a_checkpoint_of_another_architecture_names_the_mismatching_keys(tmp_path: Path) -> None:
    trained = sinusoid_module(0)
    fit(trained, sinusoid(), 1, tmp_path)
    wider = MetaLearningModule(ComplexSynapse(MLP(hidden=(16,)), loss="mse"), trained.estimator)
    with pytest.raises(ValueError, match=r"omega\.layers\.0\.weight: shape \(8, 1\) in the checkpoint, \(16, 1\) here"):
        wider.on_load_checkpoint(torch.load(tmp_path / "last.ckpt", weights_only=True))


# ------------------------------------------------------------------ through the CLI
@pytest.fixture
def bare_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI gets its arguments through ``args`` only; pytest's own flags are not for it."""
    monkeypatch.setattr(sys, "argv", ["lightning-contrastive"])


def cli_run(checkpoints: Path, max_steps: int) -> list[str]:
    """The shipped sinusoid config, a few small steps, saving ``last.ckpt`` in ``checkpoints`` after every step."""
    return [
        f"--config={CONFIGS / 'contrastive.yaml'}",
        f"--trainer.max_steps={max_steps}",
        f"--trainer.default_root_dir={checkpoints.parent}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks=ModelCheckpoint",
        f"--trainer.callbacks.dirpath={checkpoints}",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.every_n_train_steps=1",
        "--model.learner.init_args.backbone.init_args.hidden=[8]",
        "--model.estimator.init_args.inner_steps=4",
        "--model.estimator.init_args.nudged_steps=2",
        "--data.batch_size=2",
        "--data.num_eval_tasks=2",
    ]


@pytest.mark.usefixtures("bare_command_line")
def test_cli_fit_with_ckpt_path_last_continues_exactly(tmp_path: Path) -> None:
    uninterrupted = MetaLearningCLI(args=["fit", *cli_run(tmp_path / "a" / "checkpoints", 2 * STEPS)])
    checkpoints = tmp_path / "b" / "checkpoints"
    MetaLearningCLI(args=["fit", *cli_run(checkpoints, STEPS)])
    resumed = MetaLearningCLI(args=["fit", *cli_run(checkpoints, 2 * STEPS), "--ckpt_path=last"])
    assert resumed.trainer.global_step == 2 * STEPS
    expected, actual = meta_parameters(uninterrupted.model), meta_parameters(resumed.model)
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


@pytest.mark.usefixtures("bare_command_line")
def test_cli_resume_with_an_incompatible_config_names_the_mismatching_keys(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    MetaLearningCLI(args=["fit", *cli_run(checkpoints, 1)])
    other = [*cli_run(checkpoints, 2), "--model.learner.init_args.backbone.init_args.hidden=[16]", "--ckpt_path=last"]
    with pytest.raises(ValueError, match=r"(?s)shape \(8, 1\) in the checkpoint.*init_args\.hidden: \[8\] in the"):
        MetaLearningCLI(args=["fit", *other])


@pytest.mark.usefixtures("bare_command_line")
def test_a_run_killed_by_sigterm_leaves_a_last_checkpoint_that_loads_and_resumes(tmp_path: Path) -> None:
    """Lightning's SIGTERM handler lets the current meta-step finish, and checkpoints are written atomically."""
    checkpoints, log = tmp_path / "checkpoints", tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "lightning_contrastive.cli", "fit", *cli_run(checkpoints, 100_000)]
    environment = {key: value for key, value in os.environ.items() if key != "LOCAL_RANK"}
    with (
        log.open("w") as stderr,
        subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=stderr) as run,
    ):
        deadline = time.monotonic() + 120
        while not (checkpoints / "last.ckpt").exists():
            assert run.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.2)
        time.sleep(1.0)  # a few more steps overwrite last.ckpt: the signal lands at any point of one
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)
    # Lightning's handler, not the default action, ended it: it finished the step and exited cleanly (status 0).
    assert run.returncode == 0 and "Received SIGTERM" in log.read_text(), log.read_text()[-4000:]

    checkpoint = torch.load(checkpoints / "last.ckpt", weights_only=True)
    steps_done = checkpoint["global_step"]
    assert steps_done >= 1 and checkpoint["SinusoidDataModule"]["tasks_done"] == 2 * steps_done
    restored = MetaLearningModule.load_from_checkpoint(checkpoints / "last.ckpt")  # rebuilt from the saved config
    assert isinstance(restored.estimator, Contrastive)
    resumed = MetaLearningCLI(args=["fit", *cli_run(checkpoints, steps_done + 1), "--ckpt_path=last"])
    assert resumed.trainer.global_step == steps_done + 1
