"""How long cells will take, computed from what earlier runs measured, with no hand-kept table of costs.

A cell's worker-seconds are its meta-training (``meta_steps`` times the seconds per meta-step, or the ``time``
group's budget) plus its evaluations of the fixed meta-test episodes (the curve's points: ``curve_points + 1``; one
for an ``untrained`` cell). Both rates are read from per-cell JSONs of earlier runs:

- seconds per meta-step: the ``seconds_per_meta_step`` each cell measured in its process (failed cells included:
  their steps took time all the same), per :func:`cost_key` and estimator (Reptile with fixed strengths costs what
  Reptile does), the median over learners and suites;
- seconds per evaluation: a cell's wall-clock outside meta-training (``wall_s`` less the curve's last training
  clock) over its number of evaluations, per :func:`cost_key`, the median over the cells that were tested;
  process start-up and data loading are shared out over the evaluations.

Sources: the per-cell JSONs under ``--out`` (this machine: a run being resumed, or an earlier one) and the merged
JSON of the last reported run (``docs/reproduce/results.json``). Smoke runs are left out. A cell whose rates no
source holds (a new suite, or a new estimator) has no estimate: it is reported as unmeasured, never guessed, and
the pool starts it first.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.reproduce.suites import GRADIENT_QUALITY, RUN_INFO, SUITES, Cell, Suite, all_cells


def cost_key(suite: Suite) -> str:
    """The suites that share costs: same data and ways (``omniglot_20way`` for every 20-way suite, either split)."""
    return "_".join(suite.name.split("_")[:2])


def cost_estimator(estimator: str) -> str:
    """The estimator whose costs apply: Reptile with fixed strengths takes Reptile's meta-steps."""
    return estimator.removesuffix("_lambda_fixed")


def measured_results(source: Path) -> list[dict[str, Any]]:
    """The per-cell results of one source: a folder of per-cell JSONs (``--out``) or a merged JSON (``--report``'s);
    none if it is missing or holds a smoke run."""
    if source.is_file():
        merged = json.loads(source.read_text())
        if merged.get("run", {}).get("smoke"):
            return []
        return [result for rows in merged.get("results", {}).values() for result in rows]
    info = source / RUN_INFO
    if not source.is_dir() or (info.exists() and json.loads(info.read_text()).get("smoke")):
        return []
    paths = (cell.result_path(source) for cell in all_cells())
    return [json.loads(path.read_text()) for path in paths if path.exists()]


def evaluation_seconds(result: dict[str, Any]) -> float | None:
    """A cell's wall-clock outside meta-training per evaluation of the meta-test episodes, or ``None`` if it did
    not record what that needs."""
    wall, curve, steps = result.get("wall_s"), result.get("curve") or [], result.get("meta_steps", 0)
    if wall is None or not result.get("metrics"):  # not tested: refused, or crashed before its test
        return None
    if curve:
        training = curve[-1]["train_seconds"]
        evaluations = len(curve) + (curve[-1]["meta_step"] != steps)  # the test is a curve point when it can be
    elif steps:  # written before the learning curves: tested once after meta-training
        if result.get("seconds_per_meta_step") is None:
            return None
        training, evaluations = steps * result["seconds_per_meta_step"], 1
    else:  # untrained: tested once
        training, evaluations = 0.0, 1
    return max(wall - training, 0.0) / evaluations


@dataclass
class Measurements:
    """Seconds per meta-step and per evaluation measured by earlier runs, from ``sources``."""

    sources: list[Path] = field(default_factory=list)
    step: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (cost key, estimator) -> samples
    evaluation: dict[str, list[float]] = field(default_factory=dict)  # cost key -> samples
    gradient_quality: float | None = None  # the full gradient-quality stage's seconds, if one ran under a source

    @classmethod
    def read(cls, sources: Iterable[Path]) -> Measurements:
        """Every measurement in ``sources`` (see the module's text); a missing source adds nothing."""
        measurements = cls()
        for source in sources:
            results = measured_results(source)
            measurements.sources += [source] if results else []
            for result in results:
                key = cost_key(SUITES[result["suite"]]) if result.get("suite") in SUITES else None
                if key is None:
                    continue
                if result.get("seconds_per_meta_step") is not None:  # a diverged cell's steps cost time all the same
                    step = (key, cost_estimator(result["estimator"]))
                    measurements.step.setdefault(step, []).append(result["seconds_per_meta_step"])
                evaluation = evaluation_seconds(result)
                if evaluation is not None:
                    measurements.evaluation.setdefault(key, []).append(evaluation)
            stages = sorted((source / GRADIENT_QUALITY).glob("*.json")) if source.is_dir() else []
            for stage in (json.loads(path.read_text()) for path in stages):
                if stage.get("mode") == "full" and "seconds" in stage:
                    measurements.gradient_quality = stage["seconds"]
        return measurements

    def cell_seconds(self, cell: Cell) -> float | None:
        """The worker-seconds ``cell`` will take, or ``None`` where no source measured what it needs."""
        suite = SUITES[cell.suite]
        key = cost_key(suite)
        if key not in self.evaluation:
            return None
        evaluation = statistics.median(self.evaluation[key])
        if cell.estimator == "untrained":
            return evaluation
        if suite.train_seconds is not None:
            training = suite.train_seconds
        elif (key, cost_estimator(cell.estimator)) in self.step:
            training = suite.meta_steps * statistics.median(self.step[key, cost_estimator(cell.estimator)])
        else:
            return None
        return training + (suite.curve_points + 1) * evaluation

    def describe(self, cells: Sequence[Cell], workers: int, gradient_quality: bool) -> str:
        """One line for the start of a run: the estimated time, where it comes from and what it leaves out."""
        seconds = {cell: self.cell_seconds(cell) for cell in cells}
        unmeasured = [cell for cell, value in seconds.items() if value is None]
        known = sum(value for value in seconds.values() if value is not None)
        if cells and len(unmeasured) == len(cells):
            text = f"Estimated time: unknown (no earlier run measured what these {len(cells)} cells cost)"
        else:
            sources = ", ".join(str(source) for source in self.sources)
            text = f"Estimated time: {known / workers / 60:.0f} min of cells on {workers} workers (rates measured in "
            text += f"{sources})"
            if unmeasured:
                kinds = sorted({f"{cell.suite}/{cell.estimator}" for cell in unmeasured})
                text += f", plus {len(unmeasured)} cells no run has measured yet ({', '.join(kinds)})"
        if gradient_quality:
            stage = self.gradient_quality
            text += (
                " plus the gradient-quality stage (not measured yet)"
                if stage is None
                else f" plus the gradient-quality stage (~{stage / 60:.0f} min on one worker)"
            )
        return text + "."
