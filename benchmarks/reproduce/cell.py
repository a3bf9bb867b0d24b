"""One cell in this process: meta-train and test it, resume it from its last curve point after an interruption,
time its meta-steps, and judge its result (:func:`judge`: an ``ok`` run with absurd numbers is a failure)."""

from __future__ import annotations

import json
import math
import os
import resource
import shlex
import shutil
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from benchmarks import OMNIGLOT_ROOT_ENV_VAR, REPOSITORY, omniglot_root
from benchmarks.reproduce.configs import cell_config, instantiate
from benchmarks.reproduce.suites import SUITES, Cell
from lightning_contrastive.callbacks.learning_curve import LearningCurve


@dataclass
class CellResult:
    """What one cell's JSON file holds. ``status``: ``ok``, ``n/a`` (refused pair) or ``failed`` (see :func:`judge`).

    ``curve``: the learning curve's points (``LearningCurve``'s ``CurvePoint`` as dicts: meta-step, training
    seconds by wall-clock and CPU time, metrics with 95% CIs), the first at the untrained start.
    """

    suite: str
    learner: str
    estimator: str
    status: str
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    seconds_per_meta_step: float | None = None
    meta_steps: int = 0
    train_cpu_seconds: float | None = None
    peak_rss_mib: float | None = None
    wall_s: float | None = None
    skipped_tasks: float | None = None
    resumed_at_step: int | None = None
    load_average: float | None = None  # the machine's 5-minute load average when the cell ended
    phases: dict[str, float] = field(default_factory=dict)  # PhaseRecord: inner steps used, residuals, unsolved share
    command: str = ""
    overrides: list[str] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)


DIVERGED_LOSS_FACTOR = 10.0
"""A trained cell whose meta-test query loss exceeds this many times its untrained start's has failed (diverged)."""
MAX_SKIPPED_FRACTION = 0.05
"""A trained cell that skipped more than this fraction of its meta-training tasks (inner-loop faults) has failed."""


def judge(result: dict[str, Any], untrained_loss: float | None, meta_batch: int) -> tuple[str, str]:
    """The status and reason a cell's result deserves: an ``ok`` run whose numbers are absurd is a failure.

    Failed, in this order: a non-finite metric; a meta-test query loss (MSE, or cross-entropy) above
    ``DIVERGED_LOSS_FACTOR`` times ``untrained_loss``, the same network's from its untrained start on the same
    episodes (meta-training made it more than 10x worse: its meta-parameters diverged, e.g. 1.15e+22 against
    6.7); more than ``MAX_SKIPPED_FRACTION`` of its ``meta_steps * meta_batch`` meta-training tasks skipped for
    inner-loop faults (the meta-gradient then averages the tasks that happened not to fail). Other statuses and
    reasons are returned unchanged.
    """
    if result["status"] != "ok":
        return result["status"], result.get("reason", "")
    metrics = result.get("metrics", {})
    bad = [name for name, value in metrics.items() if not math.isfinite(value)]
    if bad:
        return "failed", f"diverged: non-finite {', '.join(bad)}"
    loss = metrics.get("query_loss")
    if loss is not None and untrained_loss is not None and loss > DIVERGED_LOSS_FACTOR * untrained_loss:
        return (
            "failed",
            f"diverged: query loss {loss:.3g} > {DIVERGED_LOSS_FACTOR:g}x the untrained start's {untrained_loss:.3g}",
        )
    tasks = result.get("meta_steps", 0) * meta_batch
    skipped = result.get("skipped_tasks") or 0.0
    if tasks and skipped > MAX_SKIPPED_FRACTION * tasks:
        return "failed", (
            f"unstable: {skipped:g} of {tasks} meta-training tasks skipped (more than {MAX_SKIPPED_FRACTION:.0%})"
        )
    return "ok", result.get("reason", "")


class StepTimer(pl.Callback):
    """Records each meta-step's wall-clock (batch start to batch end: estimate, backward, outer update).

    Also sums ``train/skipped_tasks`` over the steps when the module logs it (inner-loop faults skipped under
    ``on_inner_fault="skip"``).
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.skipped_tasks: float | None = None
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        skipped = trainer.callback_metrics.get("train/skipped_tasks")
        if skipped is not None:
            self.skipped_tasks = (self.skipped_tasks or 0.0) + float(skipped)


class PhaseRecord(pl.Callback):
    """The mean over meta-steps of what the inner phases used: ``inner/<phase>_steps`` and ``_residual`` (means over
    the meta-batch, and their ``_max``) and ``inner/unsolved`` (phases ended at their cap), as the module logs them.

    Kept across a resume in the checkpoint, so that a resumed cell's means still cover all its meta-steps.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        if not outputs or outputs.get("loss") is None:  # every task skipped: the metrics are still the last step's
            return
        for name, value in trainer.callback_metrics.items():
            if name.startswith("inner/") and name.removesuffix("_max").endswith(("_steps", "_residual", "unsolved")):
                self.sums[name] = self.sums.get(name, 0.0) + float(value)
                self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {name.removeprefix("inner/"): total / self.counts[name] for name, total in self.sums.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums, "counts": self.counts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sums, self.counts = dict(state_dict["sums"]), dict(state_dict["counts"])


class CheckpointAtCurvePoints(pl.Callback):
    """Saves a checkpoint to ``path`` after each new point of ``curve``, so that an interrupted cell resumes there.

    Written to a temporary file and renamed, so that an interruption never leaves half a checkpoint. With ``keep``,
    each one is also copied to ``<path stem>.step=<meta-step>.ckpt``, which the cell leaves behind (for the
    checkpoint diagnostics, ``benchmarks.diagnostics.estimate_drift`` and ``.adaptation_horizon``).
    """

    def __init__(self, curve: LearningCurve, path: Path, keep: bool = False) -> None:
        self.curve = curve
        self.path = path
        self.keep = keep
        self._saved = 0

    def on_train_start(self, *args: Any) -> None:
        self._saved = len(self.curve.points)  # the curve's hook ran first: its start point is not a new one

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if len(self.curve.points) > self._saved and not trainer.should_stop:
            partial = self.path.with_suffix(".ckpt.partial")
            trainer.save_checkpoint(partial)
            partial.replace(self.path)
            if self.keep:
                shutil.copyfile(self.path, self.path.with_name(f"{self.path.stem}.step={trainer.global_step}.ckpt"))
            self._saved = len(self.curve.points)


def run_cell(cell: Cell, overrides: Sequence[str], result_path: Path, keep_checkpoints: bool = False) -> CellResult:
    """Meta-train and test ``cell`` in this process (from the repository root); write its JSON to ``result_path``.

    Never raises for the cell's own failures: a refused pair is recorded as ``n/a`` with the ``ValueError`` of
    ``estimator.check_learner``, and any exception, or a result :func:`judge` calls absurd, as ``failed``.
    Meta-training saves a checkpoint next to ``result_path`` at each learning-curve point; a cell started again
    after an interruption resumes from it (its curve and its training clock included), and deletes it when done.
    Omniglot is read from ``$LIGHTNING_CONTRASTIVE_OMNIGLOT_ROOT`` when it is set, else from the config's
    ``../shared/data/omniglot``; a ``--data.root=...`` among ``overrides`` wins over both.
    """
    torch.set_num_threads(1)
    from lightning_contrastive.cli import MetaLearningCLI

    start = time.perf_counter()
    overrides = list(overrides)
    if SUITES[cell.suite].data == "omniglot" and os.environ.get(OMNIGLOT_ROOT_ENV_VAR):
        overrides.insert(0, f"--data.root={omniglot_root()}")  # else the config's ../shared/data/omniglot
    result = CellResult(cell.suite, cell.learner, cell.estimator, status="ok", overrides=overrides)
    subcommand = "test" if cell.estimator == "untrained" else "fit"
    result.command = shlex.join(
        ["lightning-contrastive", subcommand, "--config", str(cell.config.relative_to(REPOSITORY)), *overrides]
    )
    checkpoint = result_path.with_suffix(".ckpt")
    try:
        model = cell_config(cell)["model"]
        try:
            instantiate(model["estimator"]).check_learner(instantiate(model["learner"]))
        except ValueError as refusal:
            result.status, result.reason = "n/a", str(refusal)
        else:
            cli = MetaLearningCLI(args=[f"--config={cell.config}", *overrides], run=False, save_config_callback=None)
            timer = StepTimer()
            cli.trainer.callbacks.insert(0, timer)  # before the curve's hook: a step's time excludes its evaluation
            phases = PhaseRecord()
            cli.trainer.callbacks.append(phases)
            curve = next((c for c in cli.trainer.callbacks if isinstance(c, LearningCurve)), None)
            if cell.estimator != "untrained":
                if curve is not None:
                    cli.trainer.callbacks.append(CheckpointAtCurvePoints(curve, checkpoint, keep_checkpoints))
                resume = checkpoint if checkpoint.exists() else None
                if resume is not None:
                    result.resumed_at_step = int(torch.load(resume, weights_only=False)["global_step"])
                cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=resume)
            result.meta_steps = cli.trainer.global_step
            if curve is not None and curve.points and curve.points[-1].meta_step == result.meta_steps:
                result.metrics = dict(curve.points[-1].metrics)  # what trainer.test gives (tested): not run twice
            else:
                (metrics,) = cli.trainer.test(cli.model, cli.datamodule, verbose=False)
                result.metrics = {name.removeprefix("test/"): float(value) for name, value in metrics.items()}
            if len(timer.seconds) > 1:  # the first step pays one-off costs (allocations, lazy imports)
                result.seconds_per_meta_step = sum(timer.seconds[1:]) / (len(timer.seconds) - 1)
            result.skipped_tasks = cli.model.skipped_tasks_total or timer.skipped_tasks
            result.phases = phases.means()
            if curve is not None and curve.points:
                result.curve = [asdict(point) for point in curve.points]
                result.train_cpu_seconds = curve.points[-1].train_cpu_seconds
            untrained = result.curve[0]["metrics"].get("query_loss") if result.curve else None
            result.status, result.reason = judge(asdict(result), untrained, SUITES[cell.suite].meta_batch)
    except Exception as error:  # recorded, so that one cell cannot stop the reproduction
        traceback.print_exc()
        result.status, result.reason = "failed", f"{type(error).__name__}: {error}"
    result.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result.wall_s = time.perf_counter() - start
    result.load_average = os.getloadavg()[1]
    write_json(result_path, asdict(result))
    checkpoint.unlink(missing_ok=True)
    return result


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` atomically (a rename), so that an interrupted write never leaves a file that counts as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(data, indent=2, allow_nan=True))
    partial.replace(path)
