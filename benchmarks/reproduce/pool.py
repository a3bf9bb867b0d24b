"""The pool: every pending cell in a fresh single-threaded process (peak RSS cannot be reset), the most expensive
first, and the gradient-quality stage as one more job; the run's commands and machine recorded in ``run.json``."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks import REPOSITORY, cpu_model
from benchmarks.reproduce.cell import CellResult, write_json
from benchmarks.reproduce.configs import smoke_overrides
from benchmarks.reproduce.estimates import Measurements
from benchmarks.reproduce.suites import GRADIENT_QUALITY, RUN_INFO, SEED, SMOKE, SUITES, Cell


def worker_environment() -> dict[str, str]:
    """This environment, with one thread per process and this repository first on ``PYTHONPATH``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH", "")]))
    return env


def run_logged(command: Sequence[str], log: Path) -> int:
    """Run ``command`` from the repository root with :func:`worker_environment`, its output in ``log``; its status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as stream:
        process = subprocess.run(
            command, stdout=stream, stderr=subprocess.STDOUT, env=worker_environment(), cwd=REPOSITORY
        )
    return process.returncode


def launch_cell(cell: Cell, out: Path, overrides: Sequence[str], keep_checkpoints: bool = False) -> str:
    """Run ``cell`` in a fresh subprocess; if it dies without writing its JSON, record that as its failure."""
    path = cell.result_path(out)
    log = path.with_suffix(".log")
    command = [sys.executable, "-m", "benchmarks.reproduce", "--run-cell", cell.suite, cell.learner, cell.estimator]
    command += ["--out", str(out), *(f"--set={override}" for override in overrides)]
    command += ["--keep-checkpoints"] if keep_checkpoints else []
    status = run_logged(command, log)
    if not path.exists():
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        reason = f"process exited with code {status}: {tail[0]}"
        write_json(path, asdict(CellResult(cell.suite, cell.learner, cell.estimator, status="failed", reason=reason)))
    return f"{cell.suite}/{cell.name}: {json.loads(path.read_text())['status']}"


def launch_gradient_quality(out: Path, quick: bool) -> str:
    """Run ``python -m benchmarks.gradient_quality --out OUT/gradient_quality`` in a subprocess.

    ``quick`` (a smoke run) runs its ``--quick`` form and keeps its figure in that folder, away from the report's.
    """
    folder = out / GRADIENT_QUALITY
    command = [sys.executable, "-m", "benchmarks.gradient_quality", "--out", str(folder)]
    command += ["--quick", "--figure", str(folder / "gradient_quality.png")] if quick else []
    return f"{GRADIENT_QUALITY}: exit code {run_logged(command, folder / 'stage.log')}"


def machine() -> dict[str, Any]:
    """CPU model, core count, Python and torch versions of this machine, and the threads each worker uses."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads_per_worker": 1,
    }


def reproduce(
    cells: Sequence[Cell],
    out: Path,
    workers: int,
    smoke: bool,
    extra: Sequence[str],
    gradient_quality: bool,
    keep_checkpoints: bool = False,
    command: str = "",
    measurements: Measurements | None = None,
) -> list[str]:
    """Run every cell whose JSON is missing (and the gradient-quality stage) on a pool of ``workers`` processes.

    The most expensive jobs start first (the gradient-quality stage, then the cells by ``measurements``, those no
    run has measured before the others), so that the pool's last minutes are not spent on one long job. ``command``
    is recorded in ``run.json``. Returns one status line per job.
    """
    pending = [cell for cell in cells if not cell.result_path(out).exists()]
    print(
        f"{len(cells) - len(pending)} of {len(cells)} cells already done in {out}; running {len(pending)}.", flush=True
    )
    info_path = out / RUN_INFO
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.setdefault("commands", []).append(command)
    info.update(
        machine=machine(), smoke=smoke, seed=SEED, suites={name: asdict(suite) for name, suite in SUITES.items()}
    )
    info["smoke_budget"] = SMOKE if smoke else None
    write_json(info_path, info)
    if measurements is not None:
        pending.sort(key=lambda cell: -(measurements.cell_seconds(cell) or math.inf))
    lines: list[str] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = [pool.submit(launch_gradient_quality, out, smoke)] if gradient_quality else []
        jobs += [
            pool.submit(launch_cell, cell, out, [*(smoke_overrides(cell) if smoke else []), *extra], keep_checkpoints)
            for cell in pending
        ]
        for job in jobs:
            lines.append(job.result())
            print(lines[-1], flush=True)
    return lines
