"""Weights & Biases for real, offline: what a run through the CLI leaves on disk, and the no-credentials fallback.

Every test points HOME at ``tmp_path`` (no netrc, no wandb settings) and never reaches the network: runs are
offline (or disabled), and the offline run's ``.wandb`` file is read back with wandb's own protobuf records.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import wandb
from wandb.proto import wandb_internal_pb2

from lightning_contrastive.callbacks import InnerLoopMonitor
from lightning_contrastive.cli import MetaLearningCLI
from lightning_contrastive.loggers import OfflineFallbackWandbLogger, wandb_credentials_found

REPOSITORY = Path(__file__).resolve().parents[1]
CREDENTIAL_VARIABLES = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL")
NAMESPACES = ("train/", "val/", "test/", "meta_grad/", "inner/")
LIGHTNING_AND_WANDB_KEYS = {"epoch", "trainer/global_step"}  # besides wandb's own "_step", "_runtime", ...


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No W&B credentials anywhere, a HOME without netrc, the working directory in tmp_path, a fresh wandb session.

    wandb reads its environment variables once per process, when its session starts; ending the session after
    each test makes the next test's environment the one wandb sees.
    """
    end_wandb_session()
    for name in (*CREDENTIAL_VARIABLES, "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-contrastive"])  # the CLI reads no pytest flags
    yield
    end_wandb_session()


def end_wandb_session() -> None:
    """Finish the current run (which writes it out) and end wandb's session, whose settings came from the env."""
    wandb.finish()
    wandb.teardown()


@dataclass(frozen=True)
class OfflineRun:
    """What an offline run wrote: its resolved config, the names of everything it logged, and its files folder."""

    config: dict[str, Any]
    logged: set[str]
    files: Path


def read_offline_run(save_dir: Path) -> OfflineRun:
    """Read the only offline run under ``save_dir/wandb`` from its ``.wandb`` file.

    Offline runs write neither ``config.yaml`` nor ``wandb-summary.json``; the ``.wandb`` file is wandb's
    LevelDB-style log of ``Record`` protobufs: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of
    chunks, each a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last) and its data; a block's
    tail shorter than a chunk header is padding.
    """
    (path,) = save_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, position, pending, config, logged = path.read_bytes(), 7, b"", {}, set()
    assert data.startswith(b":W&B")
    while position + 7 <= len(data):
        if (room := 32768 - position % 32768) < 7:
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.HasField("run"):
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif record.HasField("config"):
                for item in record.config.update:
                    config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif record.HasField("history"):
                logged |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return OfflineRun(config=config, logged=logged, files=path.parent / "files")


def sync_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if "wandb sync" in record.getMessage()]


# ------------------------------------------------------------------ the shipped config, through the CLI
def test_a_cli_run_logs_the_whole_config_and_namespaced_metrics(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = MetaLearningCLI(
        args=[
            "fit",
            f"--config={REPOSITORY / 'configs' / 'sinusoid' / 'contrastive.yaml'}",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--data.batch_size=2",
            "--data.num_eval_tasks=4",
            "--data.eval_batch_size=4",
        ]
    )
    end_wandb_session()
    run = read_offline_run(tmp_path)

    # The resolved CLI config, not only the module's hyperparameters.
    assert run.config["seed_everything"] == 0
    assert run.config["trainer"]["max_steps"] == 2
    assert run.config["trainer"]["logger"]["class_path"].endswith("OfflineFallbackWandbLogger")
    assert [callback["class_path"].rsplit(".", 1)[1] for callback in run.config["trainer"]["callbacks"]] == [
        "ModelCheckpoint",
        "MetaGradientMonitor",
        "InnerLoopMonitor",
        "EstimatorAgreement",
    ]
    assert run.config["model"]["estimator"]["init_args"]["beta"] == 0.03
    assert run.config["data"]["init_args"]["batch_size"] == 2

    # Metrics from the module and from every callback, each in its namespace.
    metrics = {name for name in run.logged if not name.startswith("_")}
    assert {
        "train/query_loss",
        "val/query_loss",
        "val/query_loss_ci95",
        "inner/free",
        "inner/nudged_neg",
        "inner/free_residual_grad_norm",
        "inner/free_residual_over_beta",
        "meta_grad/norm/omega",
        "meta_grad/update_ratio/lambda",
        "meta_grad/agreement/omega/cosine",
        "meta_grad/agreement/relative_error",
    } <= metrics
    outside = {name for name in metrics if not name.startswith(NAMESPACES)} - LIGHTNING_AND_WANDB_KEYS
    assert not outside, f"metrics outside the train/val/test/meta_grad/inner namespaces: {outside}"

    # The inner loss curve as a W&B line plot, holding the monitor's traces.
    (monitor,) = [callback for callback in cli.trainer.callbacks if isinstance(callback, InnerLoopMonitor)]
    (table,) = run.files.glob("media/table/inner/loss_curve_table_*.table.json")
    rows = json.loads(table.read_text())["data"]
    for phase, trace in monitor.traces.items():
        assert [value for _, line, value in rows if line == phase] == pytest.approx(trace.losses.tolist())
    inner_steps = len(monitor.traces["free"].losses)
    assert next(step for step, line, _ in rows if line == "nudged_pos") == inner_steps  # nudged phases continue it


# ------------------------------------------------------------------ the fallback and who decides the mode
def test_without_credentials_the_logger_falls_back_to_offline_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    logger = OfflineFallbackWandbLogger(project="fallback", save_dir=tmp_path)
    run = logger.experiment
    logger.log_metrics({"train/loss": 1.0}, step=0)
    assert logger.experiment is run

    assert logger.fell_back_to_offline and run.settings.mode == "offline"
    assert "WANDB_MODE" not in os.environ  # decided for this run only, not for the process
    (message,) = sync_messages(caplog)
    assert "\n" not in message and message.endswith(f"wandb sync {run.settings.sync_dir}")
    end_wandb_session()
    assert read_offline_run(tmp_path).logged >= {"train/loss", "trainer/global_step"}


def test_a_mode_set_by_the_user_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = OfflineFallbackWandbLogger(project="disabled", save_dir=tmp_path)
    logger.log_metrics({"train/loss": 1.0}, step=0)
    assert not logger.fell_back_to_offline and logger.experiment.disabled
    assert not (tmp_path / "wandb").exists() and not sync_messages(caplog)
    end_wandb_session()

    monkeypatch.setenv("WANDB_MODE", "online")  # asked for online without credentials: wandb's own error, no fallback
    with pytest.raises(wandb.errors.UsageError, match="No API key"):
        _ = OfflineFallbackWandbLogger(project="online", save_dir=tmp_path).experiment
    assert not sync_messages(caplog)


def test_credentials_are_looked_for_where_wandb_looks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert not wandb_credentials_found()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_credentials_found()
    monkeypatch.delenv("WANDB_API_KEY")

    netrc = tmp_path / ".netrc"  # what `wandb login` writes
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'k' * 40}\n")
    netrc.chmod(0o600)
    assert wandb_credentials_found()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # a key for another server does not count
    assert not wandb_credentials_found()
    monkeypatch.delenv("WANDB_BASE_URL")
    monkeypatch.setenv("NETRC", str(tmp_path / "elsewhere"))  # $NETRC replaces ~/.netrc
    assert not wandb_credentials_found()


# ------------------------------------------------------------------ the beta sweep's figure
def test_the_beta_sweep_writes_its_figure_and_logs_it_to_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = importlib.util.spec_from_file_location("beta_sweep", REPOSITORY / "examples" / "beta_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "beta_sweep", sweep)  # its dataclasses look their module up there
    spec.loader.exec_module(sweep)

    sweep.main(["--steps", "5", "--num-betas", "3", "--output", str(tmp_path / "sweep.png"), "--wandb"])
    end_wandb_session()

    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")
    run = read_offline_run(tmp_path / "lightning_logs")
    media = {name.removesuffix("/_type") for name in run.logged if name.endswith("/_type")}
    assert {"beta_sweep/figure", "beta_sweep/errors"} <= media
    assert {"beta_sweep/slope/one-sided/5_steps", "beta_sweep/slope/symmetric/5_steps"} <= run.logged
    assert list(run.files.glob("media/images/beta_sweep/figure*.png"))
    assert run.config["step_counts"] == [5]
