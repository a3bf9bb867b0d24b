"""Reproduce the paper's comparison: every learner with every estimator, under equal budgets, side by side.

For each suite (sinusoid regression with 5 and 10 shots, Omniglot 5-way and 20-way 1-shot on held-out
characters, and 20-way on held-out alphabets), each learner (``ComplexSynapse``, ``DualSystem``) and each estimator
(``Contrastive`` one-sided, symmetric, and symmetric with the linear nudge, ``MAML``, ``FirstOrderMAML``,
``Implicit``, ``Reptile``), one *cell* meta-trains with ``MetaLearningModule`` and a plain ``pl.Trainer`` built by
the CLI from ``configs/reproduce/<suite>/<cell>.yaml`` and tests on the suite's fixed meta-test episodes (the same
for every cell), recording the meta-test metric with its 95% confidence interval, its learning curve (the same
metric at the untrained start and at regular points of meta-training, against meta-steps and training time:
``LearningCurve``), the wall-clock per meta-step and the peak resident memory of its process. A cell
``untrained`` per learner tests the same network adapted from its untrained start. Pairs an estimator refuses
(``estimator.check_learner`` raises ``ValueError``) are recorded as n/a with that error's text; ``ComplexSynapse``
with fixed strengths (``reptile_lambda_fixed``) gives Reptile a row anyway.

Three groups of suites (``--only`` takes groups and suite names):

- ``steps``, equal budgets: within a suite every estimator takes the same inner steps (MAML's unroll, Implicit's,
  first-order MAML's and Reptile's inner steps, and the contrastive free phase), the same inner SGD (lr,
  momentum), meta-steps, meta-batch, outer optimizer (Adam, also for Reptile, whose meta-gradient ``theta - phi_T``
  is usually applied by SGD), seed and meta-test episodes; the contrastive rule takes its nudged steps on top (per
  phase: twice for the symmetric rule). Test-time adaptation runs every estimator's ``adapt``: the same inner
  steps for all.
- ``time``, equal training time (issue 14): the same suites, but every estimator meta-trains for the same CPU
  time (``EQUAL_TIME_SECONDS``; one thread, evaluations excluded), with the curve evaluated at every fifth of it.
- ``long``, issue 17: Omniglot 20-way on both splits for 600 meta-steps, a curve point every 50.

    python benchmarks/reproduce.py                          # steps and time groups (~100 + ~110 min, 2 workers)
    python benchmarks/reproduce.py --only time              # the equal-time comparison alone
    python benchmarks/reproduce.py --only long --learners complex_synapse --out benchmarks/results/long
    python benchmarks/reproduce.py --only omniglot_20way_long --learners complex_synapse \
        --estimators contrastive_linear --set=--trainer.gradient_clip_val=1.0 --out benchmarks/results/clip1
    python benchmarks/reproduce.py --only omniglot_20way_long --estimators maml --keep-checkpoints
    python benchmarks/reproduce.py --report                 # RESULTS.md and docs/ figures from the JSONs
    python benchmarks/reproduce.py --smoke --out /tmp/smoke # everything tiny: checks the orchestration
    python benchmarks/reproduce.py --write-configs          # regenerate configs/reproduce/ from SUITES

The fourth line is a *variant*: one cell again with one setting changed, in a folder of its own, which
``--report --variants FOLDER...`` tabulates with its best curve point. Any CLI key works
(``--model.optimizer.init_args.lr``, ``--model.learner.init_args.learn_lambda=false``,
``--model.estimator.init_args.beta``, ``...nudged_steps``, ``--trainer.gradient_clip_val``).
The fifth keeps each cell's checkpoint at every curve point (``<cell>.step=<N>.ckpt``), which
``benchmarks/estimate_drift.py`` reads.

One cell by hand (what a worker runs, minus timing):
``OMP_NUM_THREADS=1 lightning-contrastive fit --config configs/reproduce/omniglot_5way/complex_synapse__maml.yaml``
then ``test`` with ``--ckpt_path`` (the configs turn checkpointing off; add ``--trainer.enable_checkpointing=true``).

Every cell runs in a fresh subprocess (peak RSS cannot be reset) with one torch thread and writes one JSON file
under ``--out``; a rerun skips cells whose JSON exists, and a cell interrupted in meta-training resumes from the
checkpoint it saved at its last curve point, so an interrupted reproduction resumes: run the same command again.
A cell that crashes, diverges or skips too many tasks (:func:`judge`) records why and shows as
``failed: <reason>`` without stopping the others. The gradient-quality stage (``benchmarks/gradient_quality.py``)
runs as one more job of the pool.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml

from lightning_contrastive.callbacks.learning_curve import LearningCurve

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIGS = REPOSITORY / "configs" / "reproduce"
DEFAULT_OUT = REPOSITORY / "benchmarks" / "results" / "reproduce"
OMNIGLOT_ROOT_ENV_VAR = "LIGHTNING_CONTRASTIVE_OMNIGLOT_ROOT"
OMNIGLOT_ROOTS = (REPOSITORY.parent / "shared" / "data" / "omniglot", Path("/work/shared/data/omniglot"))
GRADIENT_QUALITY = "gradient_quality"
RUN_INFO = "run.json"
SEED = 0


@dataclass(frozen=True)
class Suite:
    """One benchmark problem, the budget every estimator gets on it, and the estimators compared.

    ``inner_steps`` is every estimator's number of inner steps (the contrastive free phase); the contrastive
    rule adds ``nudged_steps`` per nudged phase (the linear nudge: ``inner_steps``). ``eval_tasks`` fixed
    meta-test episodes, seeded by ``SEED``. ``group``: ``steps`` (every estimator takes ``meta_steps``),
    ``time`` (every estimator meta-trains for ``train_seconds`` of CPU time, ``meta_steps`` only sizes the data)
    or ``long`` (issue 17's longer runs). Each cell records its learning curve at ``curve_points`` regular points
    after the untrained start (by meta-steps, or by training time in the ``time`` group).
    """

    name: str
    title: str
    data: str  # "sinusoid" or "omniglot"
    shots: int
    test_shots: int
    ways: int
    meta_steps: int
    meta_batch: int
    inner_steps: int
    nudged_steps: int
    inner_lr: float
    inner_momentum: float
    beta: float
    outer_lr: float
    eval_tasks: int
    eval_batch: int
    channels: int = 0  # Conv4 channels (Omniglot)
    init_lambda: float = 1.0  # ComplexSynapse starting strength
    pull: float = 1.0  # DualSystem pull toward the fast system's learned start
    cg_damping: float = 0.0  # Implicit's damping: the smallest that leaves its solves sound on the suite's nets
    split_by: str = "character"  # Omniglot: the meta-test holds unseen characters, or unseen alphabets
    group: str = "steps"
    train_seconds: float | None = None  # the ``time`` group's budget per cell
    curve_points: int = 2  # each point costs one pass over the eval episodes (28 s on 20-way)
    estimators: tuple[str, ...] = ()  # cells run on this suite; () for every one of ESTIMATORS

    @property
    def metric(self) -> str:
        """The metric the suite's table reports: ``accuracy`` for classification, else ``query_loss`` (MSE)."""
        return "accuracy" if self.data == "omniglot" else "query_loss"

    @property
    def curve_every_n_steps(self) -> int | None:
        """Meta-steps between two curve points (``None`` in the ``time`` group, whose points are by time)."""
        return None if self.train_seconds is not None else max(1, self.meta_steps // self.curve_points)

    @property
    def max_steps(self) -> int:
        """The Trainer's ``max_steps``: ``meta_steps``, or in the ``time`` group a cap far above any cell's reach."""
        return self.meta_steps if self.train_seconds is None else 50 * self.meta_steps


# Budgets measured on this machine (2 shared cores, one thread per worker, two workers), see the report:
# Omniglot Conv4-32, 10 inner / 5 nudged steps: 5-way meta-batch 4 costs ~0.9 s per symmetric contrastive
# meta-step, 0.55 s MAML, 0.7 s Implicit; 20-way (5 queries per class) meta-batch 2: 1.1 s, 0.65 s, 0.95 s;
# a meta-test episode 0.03 s (5-way) and 0.07 s (20-way). Sinusoid: 0.02-0.08 s per meta-step.
SINUSOID_5SHOT = Suite(
    name="sinusoid_5shot",
    title="Sinusoid regression, 5 shots",
    data="sinusoid",
    shots=5,
    test_shots=10,
    ways=1,
    meta_steps=600,
    meta_batch=5,
    inner_steps=20,
    nudged_steps=10,
    inner_lr=0.005,
    inner_momentum=0.9,
    beta=0.03,
    outer_lr=3e-3,
    cg_damping=10.0,  # as configs/sinusoid/implicit.yaml: undamped, 70-96% of these ReLU tasks are indefinite
    eval_tasks=600,
    eval_batch=100,
)
OMNIGLOT_5WAY = Suite(
    name="omniglot_5way",
    title="Omniglot 5-way 1-shot",
    data="omniglot",
    shots=1,
    test_shots=5,
    ways=5,
    meta_steps=300,
    meta_batch=4,
    inner_steps=10,
    nudged_steps=5,
    inner_lr=0.05,
    inner_momentum=0.9,
    beta=0.1,
    outer_lr=1e-3,
    eval_tasks=400,
    eval_batch=50,
    channels=32,
    init_lambda=0.5,
    pull=0.5,
    # Undamped, CG met non-positive curvature on 8 of 8 probed 20-way ComplexSynapse tasks at the untrained start
    # (1 of 8 on 5-way and on the dual system), 7 of 8 at damping 1, none at 5.
    cg_damping=5.0,
)
# 20 ways: half the meta-batch and 50 fewer meta-steps, as each 20-way task costs about 2.5x a 5-way one.
OMNIGLOT_20WAY = replace(
    OMNIGLOT_5WAY, name="omniglot_20way", title="Omniglot 20-way 1-shot", ways=20, meta_steps=250, meta_batch=2
)
EQUAL_STEPS = (
    SINUSOID_5SHOT,
    replace(SINUSOID_5SHOT, name="sinusoid_10shot", title="Sinusoid regression, 10 shots", shots=10),
    OMNIGLOT_5WAY,
    OMNIGLOT_20WAY,
    # Unseen alphabets (issue 17): the 20-way suite with whole alphabets held out for meta-test.
    replace(
        OMNIGLOT_20WAY,
        name="omniglot_20way_alphabet",
        title="Omniglot 20-way 1-shot, unseen alphabets",
        split_by="alphabet",
    ),
)

EQUAL_TIME_SECONDS = {
    "sinusoid_5shot": 30.0,
    "sinusoid_10shot": 30.0,
    "omniglot_5way": 150.0,
    "omniglot_20way": 240.0,
    "omniglot_20way_alphabet": 240.0,
}
"""The ``time`` group's budget per cell: CPU seconds of meta-training (one thread; evaluations excluded).

About what MAML needs for the equal-steps table's meta-steps (measured: 600 x 0.045 s on sinusoid, 300 x 0.5 s
on 5-way, 250 x 0.65 s on 20-way), the 20-way budget raised to about 370 MAML steps: issue 17 found the
estimators' order changing between 250 and 600 meta-steps there. CPU time rather than wall-clock, because the
cores are shared: a one-thread process's CPU time is the wall-clock it would take on a core of its own, so two
cells side by side, or other processes taking turns on the cores, do not change what a budget buys. It does not
undo contention for caches and memory: at a load average of 5 on the 2 cores (other sessions' work) a 20-way
meta-step took about 2x the CPU time measured on a quieter machine, and wall-clock 3x more again. Run the ``time``
group with nothing else on the machine (2 workers for 2 cores); each cell's JSON records the load average.
"""
EQUAL_TIME_ESTIMATORS = (
    "maml",
    "implicit",
    "fomaml",
    "reptile_lambda_fixed",
    "contrastive_symmetric",
    "contrastive_linear",
)
LONG_ESTIMATORS = ("maml", "implicit", "contrastive_symmetric", "contrastive_linear")
"""Issue 17's longer runs: MAML, which kept improving; the contrastive rule, which fell back; and Implicit, which
estimates the same equilibrium gradient as the contrastive rule: if it falls back too, the cause is the gradient
of the inner problem's solution (which 10 test-time steps do not reach), not the contrastive estimate of it."""
LONG_STEPS = 600

SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (
        *EQUAL_STEPS,
        *(
            replace(
                suite,
                name=f"{suite.name}_equal_time",
                title=f"{suite.title}, equal time",
                group="time",
                train_seconds=EQUAL_TIME_SECONDS[suite.name],
                curve_points=5,
                estimators=EQUAL_TIME_ESTIMATORS,
            )
            for suite in EQUAL_STEPS
        ),
        *(
            replace(
                suite,
                name=f"{suite.name}_long",
                title=f"{suite.title}, {LONG_STEPS} meta-steps",
                group="long",
                meta_steps=LONG_STEPS,
                curve_points=LONG_STEPS // 50,  # a point every 50 meta-steps
                estimators=LONG_ESTIMATORS,
            )
            for suite in EQUAL_STEPS
            if suite.name.startswith("omniglot_20way")
        ),
    )
}
GROUPS = ("steps", "time", "long")
"""Suite groups, also accepted by ``--only``. A run without ``--only`` runs ``steps`` and ``time``."""

LEARNERS = {"complex_synapse": "ComplexSynapse", "dual_system": "DualSystem"}
ESTIMATORS = {
    "untrained": "untrained start",
    "contrastive_symmetric": "Contrastive symmetric, full nudge",
    "contrastive_linear": "Contrastive symmetric, linear nudge",
    "contrastive_one_sided": "Contrastive one-sided, full nudge",
    "maml": "MAML",
    "implicit": "Implicit",
    "fomaml": "FirstOrderMAML",
    "reptile": "Reptile",
    "reptile_lambda_fixed": "Reptile (lambda fixed)",
}
"""Cell names and their labels, in table order. ``reptile_lambda_fixed`` exists for ComplexSynapse only.
``contrastive_symmetric`` and ``contrastive_one_sided`` use the paper's (full) nudge, ``contrastive_linear`` the
nudge linearised at the free solution with as many nudged steps as free ones (a nudged step then costs a free
one)."""
DEFAULT_CONTRASTIVE = "contrastive_linear"
"""The library's default contrastive rule, whose standing against every other estimator the report shows."""

SMOKE = {"meta_steps": 3, "train_seconds": 1.0, "inner_steps": 3, "nudged_steps": 2, "eval_tasks": 8, "eval_batch": 4}
"""``--smoke``: every suite shrunk to this, through CLI overrides on the same configs (``train_seconds``: the
``time`` group's budget, with ``10 * meta_steps`` as the cap)."""


@dataclass(frozen=True)
class Cell:
    """One run: a learner with an estimator on a suite."""

    suite: str
    learner: str
    estimator: str

    @property
    def name(self) -> str:
        return f"{self.learner}__{self.estimator}"

    @property
    def config(self) -> Path:
        return CONFIGS / self.suite / f"{self.name}.yaml"

    def result_path(self, out: Path) -> Path:
        return out / self.suite / f"{self.name}.json"


def all_cells() -> list[Cell]:
    """Every cell, in table order."""
    return [
        Cell(name, learner, estimator)
        for name, suite in SUITES.items()
        for learner in LEARNERS
        for estimator in ESTIMATORS
        if estimator in (suite.estimators or ESTIMATORS)
        and not (estimator == "reptile_lambda_fixed" and learner != "complex_synapse")
    ]


# ---------------------------------------------------------------------------------------------- configurations
def cell_config(cell: Cell) -> dict[str, Any]:
    """The LightningCLI configuration of ``cell``: what ``configs/reproduce/<suite>/<cell>.yaml`` holds."""
    suite = SUITES[cell.suite]
    if suite.data == "sinusoid":
        backbone = {
            "class_path": "lightning_contrastive.networks.MLP",
            "init_args": {"in_features": 1, "hidden": [40, 40], "out_features": 1},
        }
        loss = "mse"
        data = {
            "class_path": "lightning_contrastive.data.SinusoidDataModule",
            "init_args": {
                "shots": suite.shots,
                "test_shots": suite.test_shots,
                "batch_size": suite.meta_batch,
                "eval_batch_size": suite.eval_batch,
                "num_eval_tasks": suite.eval_tasks,
                "seed": SEED,
            },
        }
    else:
        backbone = {
            "class_path": "lightning_contrastive.networks.Conv4",
            "init_args": {"in_channels": 1, "ways": suite.ways, "channels": suite.channels, "image_size": 28},
        }
        loss = "cross_entropy"
        data = {
            "class_path": "lightning_contrastive.data.OmniglotDataModule",
            "init_args": {
                "root": "../shared/data/omniglot",
                "ways": suite.ways,
                "shots": suite.shots,
                "test_shots": suite.test_shots,
                "batch_size": suite.meta_batch,
                "eval_batch_size": suite.eval_batch,
                "num_train_tasks": suite.meta_steps * suite.meta_batch,  # every meta-training task is fresh
                "num_eval_tasks": suite.eval_tasks,
                "split_by": suite.split_by,
                "seed": SEED,
            },
        }
    if cell.learner == "complex_synapse":
        learner = {
            "class_path": "lightning_contrastive.ComplexSynapse",
            "init_args": {
                "backbone": backbone,
                "loss": loss,
                "init_lambda": suite.init_lambda,
                "learn_lambda": cell.estimator != "reptile_lambda_fixed",
            },
        }
    else:
        learner = {
            "class_path": "lightning_contrastive.DualSystem",
            "init_args": {"primary": backbone, "loss": loss, "pull": suite.pull, "modulator": "per_neuron"},
        }
    inner = {"inner_lr": suite.inner_lr, "inner_momentum": suite.inner_momentum}
    if cell.estimator.startswith("contrastive") or cell.estimator == "untrained":
        # The untrained start is tested with the symmetric rule's adapt: the same inner steps as every estimator.
        linear = cell.estimator == "contrastive_linear"
        estimator_args = {
            "beta": suite.beta,
            "symmetric": cell.estimator != "contrastive_one_sided",
            "inner_steps": suite.inner_steps,
            "nudged_steps": suite.inner_steps if linear else suite.nudged_steps,
            "nudge": "linear" if linear else "full",
            **inner,
        }
        estimator = {"class_path": "lightning_contrastive.Contrastive", "init_args": estimator_args}
    else:
        class_name = {"maml": "MAML", "fomaml": "FirstOrderMAML", "implicit": "Implicit"}.get(cell.estimator, "Reptile")
        damping = {"cg_damping": suite.cg_damping} if cell.estimator == "implicit" and suite.cg_damping else {}
        estimator = {
            "class_path": f"lightning_contrastive.{class_name}",
            "init_args": {"inner_steps": suite.inner_steps, **inner, **damping},
        }
    curve = {
        "class_path": "lightning_contrastive.callbacks.learning_curve.LearningCurve",
        "init_args": {
            "every_n_steps": suite.curve_every_n_steps,
            "every_seconds": None if suite.train_seconds is None else suite.train_seconds / suite.curve_points,
            "max_train_seconds": suite.train_seconds,
            "clock": "cpu",  # see EQUAL_TIME_SECONDS
        },
    }
    return {
        "seed_everything": SEED,
        "trainer": {
            "max_steps": 0 if cell.estimator == "untrained" else suite.max_steps,
            "limit_val_batches": 0,  # the test episodes are the measure; validating would only add time
            "callbacks": [] if cell.estimator == "untrained" else [curve],
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {
            "learner": learner,
            "estimator": estimator,
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": suite.outer_lr}},
            "on_inner_fault": "skip",  # a diverging task is counted in the table rather than ending the cell
        },
        "data": data,
    }


def config_text(cell: Cell) -> str:
    """The YAML file of ``cell``, with a header saying how it was made and how to run it."""
    subcommand = "test" if cell.estimator == "untrained" else "fit"
    header = (
        f"# {SUITES[cell.suite].title}: {LEARNERS[cell.learner]} with {ESTIMATORS[cell.estimator]}; generated by\n"
        "# `python benchmarks/reproduce.py --write-configs` from its SUITES table (edit there, not here).\n"
        f"#   OMP_NUM_THREADS=1 lightning-contrastive {subcommand} --config {cell.config.relative_to(REPOSITORY)}\n"
    )
    return header + yaml.safe_dump(cell_config(cell), sort_keys=False)


def write_configs() -> list[Path]:
    """(Re)write every cell's configuration file; returns their paths."""
    paths = []
    for cell in all_cells():
        cell.config.parent.mkdir(parents=True, exist_ok=True)
        cell.config.write_text(config_text(cell))
        paths.append(cell.config)
    return paths


def instantiate(spec: Any) -> Any:
    """Build the object a ``class_path``/``init_args`` entry describes (nested entries included)."""
    if isinstance(spec, dict) and "class_path" in spec:
        module_name, class_name = spec["class_path"].rsplit(".", 1)
        arguments = {key: instantiate(value) for key, value in spec.get("init_args", {}).items()}
        return getattr(importlib.import_module(module_name), class_name)(**arguments)
    return spec


def smoke_overrides(cell: Cell) -> list[str]:
    """CLI overrides that shrink ``cell`` to ``SMOKE``: a few meta-steps, inner steps and test episodes."""
    suite = SUITES[cell.suite]
    steps = [f"--model.estimator.inner_steps={SMOKE['inner_steps']}"]
    if cell.estimator.startswith("contrastive") or cell.estimator == "untrained":
        nudged = SMOKE["inner_steps"] if cell.estimator == "contrastive_linear" else SMOKE["nudged_steps"]
        steps.append(f"--model.estimator.nudged_steps={nudged}")
    data = [f"--data.num_eval_tasks={SMOKE['eval_tasks']}", f"--data.eval_batch_size={SMOKE['eval_batch']}"]
    if suite.data == "omniglot":
        data.append(f"--data.num_train_tasks={SMOKE['meta_steps'] * suite.meta_batch}")
    if cell.estimator == "untrained":
        return [*steps, *data]
    if suite.train_seconds is None:
        training = [f"--trainer.max_steps={SMOKE['meta_steps']}", "--trainer.callbacks.init_args.every_n_steps=1"]
    else:
        budget = SMOKE["train_seconds"]
        training = [
            f"--trainer.max_steps={10 * SMOKE['meta_steps']}",
            f"--trainer.callbacks.init_args.max_train_seconds={budget}",
            f"--trainer.callbacks.init_args.every_seconds={budget / 2}",
        ]
    return [*training, *steps, *data]


def omniglot_root() -> Path:
    """``$LIGHTNING_CONTRASTIVE_OMNIGLOT_ROOT``, else the first of ``OMNIGLOT_ROOTS`` that exists."""
    if os.environ.get(OMNIGLOT_ROOT_ENV_VAR):
        return Path(os.environ[OMNIGLOT_ROOT_ENV_VAR])
    return next((root for root in OMNIGLOT_ROOTS if root.is_dir()), OMNIGLOT_ROOTS[0])


# ---------------------------------------------------------------------------------------------- one cell
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


class CheckpointAtCurvePoints(pl.Callback):
    """Saves a checkpoint to ``path`` after each new point of ``curve``, so that an interrupted cell resumes there.

    Written to a temporary file and renamed, so that an interruption never leaves half a checkpoint. With ``keep``,
    each one is also copied to ``<path stem>.step=<meta-step>.ckpt``, which the cell leaves behind (for
    ``benchmarks/estimate_drift.py``).
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
    """Meta-train and test ``cell`` in this process and write its JSON to ``result_path``.

    Never raises for the cell's own failures: a refused pair is recorded as ``n/a`` with the ``ValueError`` of
    ``estimator.check_learner``, and any exception, or a result :func:`judge` calls absurd, as ``failed``.
    Meta-training saves a checkpoint next to ``result_path`` at each learning-curve point; a cell started again
    after an interruption resumes from it (its curve and its training clock included), and deletes it when done.
    """
    torch.set_num_threads(1)
    from lightning_contrastive.cli import MetaLearningCLI

    start = time.perf_counter()
    overrides = list(overrides)
    if SUITES[cell.suite].data == "omniglot":
        overrides.insert(0, f"--data.root={omniglot_root()}")
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


# ---------------------------------------------------------------------------------------------- orchestration
def worker_environment() -> dict[str, str]:
    """This environment, with one thread per process and this repository first on ``PYTHONPATH``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH", "")]))
    return env


def launch_cell(cell: Cell, out: Path, overrides: Sequence[str], keep_checkpoints: bool = False) -> str:
    """Run ``cell`` in a fresh subprocess; if it dies without writing its JSON, record that as its failure."""
    path = cell.result_path(out)
    log = path.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--run-cell", cell.suite, cell.learner, cell.estimator]
    command += ["--out", str(out), *(f"--set={override}" for override in overrides)]
    command += ["--keep-checkpoints"] if keep_checkpoints else []
    with log.open("w") as stream:
        process = subprocess.run(
            command, stdout=stream, stderr=subprocess.STDOUT, env=worker_environment(), cwd=REPOSITORY
        )
    if not path.exists():
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        reason = f"process exited with code {process.returncode}: {tail[0]}"
        write_json(path, asdict(CellResult(cell.suite, cell.learner, cell.estimator, status="failed", reason=reason)))
    return f"{cell.suite}/{cell.name}: {json.loads(path.read_text())['status']}"


def launch_gradient_quality(out: Path, quick: bool) -> str:
    """Run ``benchmarks/gradient_quality.py --out OUT/gradient_quality [--quick]`` in a subprocess."""
    folder = out / GRADIENT_QUALITY
    folder.mkdir(parents=True, exist_ok=True)
    script = REPOSITORY / "benchmarks" / "gradient_quality.py"
    if not script.exists():
        return f"{GRADIENT_QUALITY}: skipped ({script} not found)"
    command = [sys.executable, str(script), "--out", str(folder), *(["--quick"] if quick else [])]
    with (folder / "stage.log").open("w") as stream:
        process = subprocess.run(
            command, stdout=stream, stderr=subprocess.STDOUT, env=worker_environment(), cwd=REPOSITORY
        )
    return f"{GRADIENT_QUALITY}: exit code {process.returncode}"


def machine() -> dict[str, Any]:
    """CPU model, core count, Python and torch versions of this machine, and the threads each worker uses."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown",
    )
    return {
        "cpu": cpu,
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
) -> list[str]:
    """Run every cell whose JSON is missing (and the gradient-quality stage) on a pool of ``workers`` processes.

    The most expensive jobs start first (the gradient-quality stage, then the cells by :func:`estimate_seconds`), so
    that the pool's last minutes are not spent on one long job. Returns one status line per job.
    """
    pending = [cell for cell in cells if not cell.result_path(out).exists()]
    print(
        f"{len(cells) - len(pending)} of {len(cells)} cells already done in {out}; running {len(pending)}.", flush=True
    )
    info_path = out / RUN_INFO
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.setdefault("commands", []).append(shlex.join([Path(sys.executable).name, *sys.argv]))
    info.update(
        machine=machine(), smoke=smoke, seed=SEED, suites={name: asdict(suite) for name, suite in SUITES.items()}
    )
    info["smoke_budget"] = SMOKE if smoke else None
    write_json(info_path, info)
    pending.sort(key=lambda cell: -estimate_seconds([cell], MEASURED_SECONDS_PER_STEP))
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


def cost_key(suite: Suite) -> str:
    """The suite whose measured costs apply: its data and ways (``omniglot_20way`` for all the 20-way suites)."""
    return "_".join(suite.name.split("_")[:2])


def estimate_seconds(cells: Iterable[Cell], seconds_per_step: dict[str, dict[str, float]]) -> float:
    """Worker-seconds the cells need: start-up, meta-training (meta-steps times the measured seconds per meta-step,
    or the ``time`` group's budget) and every evaluation of the test episodes (the curve's points and the test)."""
    total = 0.0
    for cell in cells:
        suite = SUITES[cell.suite]
        evaluation = suite.eval_tasks * SECONDS_PER_EPISODE[cost_key(suite)]
        if cell.estimator == "untrained":
            total += STARTUP_SECONDS + evaluation
            continue
        step = seconds_per_step[cost_key(suite)].get(cell.estimator.removesuffix("_lambda_fixed"), 0.0)
        training = suite.train_seconds if suite.train_seconds is not None else suite.meta_steps * step
        total += STARTUP_SECONDS + training + (suite.curve_points + 1) * evaluation
    return total


STARTUP_SECONDS = 10.0
SECONDS_PER_EPISODE = {"sinusoid_5shot": 0.002, "sinusoid_10shot": 0.002, "omniglot_5way": 0.03, "omniglot_20way": 0.07}
"""Measured seconds per meta-test episode (one adaptation), for the time estimate."""
SINUSOID_SECONDS_PER_STEP = {
    "contrastive_symmetric": 0.06,
    "contrastive_linear": 0.06,  # not measured yet: about three first-order inner loops
    "contrastive_one_sided": 0.05,
    "maml": 0.045,
    "implicit": 0.09,
    "fomaml": 0.03,
    "reptile": 0.03,
}
MEASURED_SECONDS_PER_STEP = {
    "sinusoid_5shot": SINUSOID_SECONDS_PER_STEP,  # 5 or 10 support points: the same per-step cost
    "sinusoid_10shot": SINUSOID_SECONDS_PER_STEP,
    "omniglot_5way": {
        "contrastive_symmetric": 0.8,
        "contrastive_linear": 0.57,  # 1.15x MAML, measured side by side (both 2x slower at load 6)
        "contrastive_one_sided": 0.6,
        "maml": 0.5,
        "implicit": 0.6,
        "fomaml": 0.22,
        "reptile": 0.22,
    },
    "omniglot_20way": {
        "contrastive_symmetric": 1.1,
        "contrastive_linear": 0.7,  # 1.07x MAML, measured side by side (both 2x slower at load 6)
        "contrastive_one_sided": 0.8,
        "maml": 0.65,
        "implicit": 0.95,
        "fomaml": 0.25,
        "reptile": 0.25,
    },
}
"""Seconds per meta-step measured with these budgets (one thread, two processes at once), for the time estimate.
The keys are :func:`cost_key`'s; the 20-way figures serve its alphabet split too."""


# ---------------------------------------------------------------------------------------------- report
def load_results(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Every cell's JSON under ``out``, grouped by suite, in table order (missing cells are left out).

    Each ``ok`` result is judged again (:func:`judge`) against its untrained start: its curve's first point, or
    for a JSON without a curve the suite's ``untrained`` cell of the same learner. A JSON written before the rule
    existed is then reported as the rule says.
    """
    results: dict[str, list[dict[str, Any]]] = {}
    for cell in all_cells():
        path = cell.result_path(out)
        if path.exists():
            results.setdefault(cell.suite, []).append(json.loads(path.read_text()))
    for name, rows in results.items():
        untrained = {r["learner"]: r for r in rows if r["estimator"] == "untrained" and r["status"] == "ok"}
        for result in rows:
            start = result.get("curve") or [untrained.get(result["learner"], {})]
            reference = start[0].get("metrics", {}).get("query_loss")
            result["status"], result["reason"] = judge(result, reference, SUITES[name].meta_batch)
    return results


def metric_text(metrics: dict[str, float], suite: Suite) -> str:
    """``mean ± ci95`` of the suite's metric in ``metrics`` (accuracy in %), or ``""`` when there is none."""
    if suite.metric not in metrics:
        return ""
    scale = 100.0 if suite.metric == "accuracy" else 1.0
    mean, ci = scale * metrics[suite.metric], scale * metrics[suite.metric + "_ci95"]
    style = ".1f" if suite.metric == "accuracy" else (".3f" if abs(mean) < 1e4 else ".2e")  # a diverged MSE
    return f"{mean:{style}} ± {ci:{style}}"


def metric_cell(result: dict[str, Any], suite: Suite) -> str:
    """:func:`metric_text` of a cell's final metrics."""
    return metric_text(result.get("metrics", {}), suite)


def best_point(result: dict[str, Any], suite: Suite) -> str:
    """The curve's best point after the start, ``mean ± ci @ meta-step``: where a cell stopped improving."""
    points = [p for p in result.get("curve", [])[1:] if math.isfinite(p["metrics"].get(suite.metric, math.nan))]
    if not points:
        return ""
    sign = 1.0 if suite.metric == "accuracy" else -1.0
    best = max(points, key=lambda point: sign * point["metrics"][suite.metric])
    return f"{metric_text(best['metrics'], suite)} @ {best['meta_step']}"


OTHERS = (
    "maml",
    "implicit",
    "fomaml",
    "reptile_lambda_fixed",
    "contrastive_symmetric",
    "contrastive_linear",
    "contrastive_one_sided",
)
"""The estimators a contrastive rule is compared with in the standing tables (less itself, and those not run)."""


def standing_table(results: dict[str, list[dict[str, Any]]], estimator: str = DEFAULT_CONTRASTIVE) -> str:
    """Where ``estimator`` stands against every other trained estimator, per suite and learner.

    ``ahead``/``behind`` when the two 95% intervals do not overlap, ``level`` when they do; the difference is in
    accuracy points (higher is better) or MSE (lower is better). A comparison with a cell that did not finish
    ``ok`` shows that cell's status.
    """
    present = {r["estimator"] for rows in results.values() for r in rows}
    defined = set(all_cells())
    others = [e for e in OTHERS if e != estimator and e in present]
    rows = [
        "| suite | learner | " + " | ".join(ESTIMATORS[e] for e in others) + " |",
        "|---|---|" + "---|" * len(others),
    ]
    for name, suite_rows in results.items():
        suite = SUITES[name]
        scale, better = (100.0, 1.0) if suite.metric == "accuracy" else (1.0, -1.0)
        for learner in LEARNERS:
            cells = {r["estimator"]: r for r in suite_rows if r["learner"] == learner}
            if cells.get(estimator, {}).get("status") != "ok":
                continue
            ours = cells[estimator]["metrics"]
            verdicts = []
            for other in others:
                if cells.get(other, {}).get("status") != "ok":
                    exists = Cell(name, learner, other) in defined
                    verdicts.append(cells[other]["status"] if other in cells else "not run" if exists else "n/a")
                    continue
                theirs = cells[other]["metrics"]
                gap = better * scale * (ours[suite.metric] - theirs[suite.metric])
                overlap = scale * (ours[suite.metric + "_ci95"] + theirs[suite.metric + "_ci95"])
                verdict = "level" if abs(gap) <= overlap else ("ahead" if gap > 0 else "behind")
                verdicts.append(f"{verdict} ({gap:+.{1 if suite.metric == 'accuracy' else 3}f})")
            rows.append(f"| {suite.title} | {LEARNERS[learner]} | " + " | ".join(verdicts) + " |")
    return "\n".join(rows)


def standings(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """A captioned :func:`standing_table` per symmetric contrastive rule with results, the default rule first."""
    rules = [
        DEFAULT_CONTRASTIVE,
        *(e for e in ("contrastive_linear", "contrastive_symmetric") if e != DEFAULT_CONTRASTIVE),
    ]
    present = {r["estimator"] for rows in results.values() for r in rows}
    lines = []
    for rule in (rule for rule in rules if rule in present):
        default = " (the library's default)" if rule == DEFAULT_CONTRASTIVE else ""
        lines += ["", f"{ESTIMATORS[rule]}{default}:", "", standing_table(results, rule)]
    return lines


def status_cell(result: dict[str, Any]) -> str:
    """``ok``, ``n/a: <reason>`` or ``failed: <first 80 characters of the reason>``."""
    if result["status"] == "ok":
        skipped = result.get("skipped_tasks")
        return f"ok ({skipped:g} tasks skipped)" if skipped else "ok"
    reason = " ".join(result.get("reason", "").split())
    if result["status"] == "failed" and len(reason) > 80:
        reason = reason[:77] + "..."
    return f"{result['status']}: {reason}".replace("|", "\\|")


def suite_table(suite: Suite, results: Sequence[dict[str, Any]]) -> str:
    """The markdown table of one suite: a row per learner and estimator, with the metric at the end of training."""
    metric = "query accuracy (%)" if suite.metric == "accuracy" else "meta-test MSE"
    rows = [
        f"| learner | estimator | {metric} ± 95% CI | best point @ meta-step | meta-steps | s / meta-step | "
        "peak process RSS (MiB) | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        step, rss = result.get("seconds_per_meta_step"), result.get("peak_rss_mib")
        step_text = "" if step is None else f"{step:.3f}"
        rss_text = "" if rss is None or result["status"] == "n/a" else f"{rss:.0f}"
        steps_text = str(result["meta_steps"]) if result.get("meta_steps") else ""
        rows.append(
            f"| {LEARNERS[result['learner']]} | {ESTIMATORS[result['estimator']]} | {metric_cell(result, suite)} | "
            f"{best_point(result, suite)} | {steps_text} | {step_text} | {rss_text} | {status_cell(result)} |"
        )
    return "\n".join(rows)


def curve_table(
    results: Sequence[dict[str, Any]], columns: Sequence[str], label: Callable[[dict[str, Any]], Sequence[str]]
) -> str:
    """The metric ± 95% CI at every curve point (a column per meta-step), a row per result.

    ``columns`` name the leading columns and ``label(result)`` fills them.
    """
    steps = sorted({point["meta_step"] for r in results for point in r.get("curve", [])})
    rows = [
        "| " + " | ".join([*columns, *(f"step {step}" for step in steps)]) + " |",
        "|" + "---|" * (len(columns) + len(steps)),
    ]
    for result in results:
        at = {point["meta_step"]: point["metrics"] for point in result.get("curve", [])}
        cells = [metric_text(at[step], SUITES[result["suite"]]) if step in at else "" for step in steps]
        rows.append("| " + " | ".join([*label(result), *cells]) + " |")
    return "\n".join(rows)


def cell_label(result: dict[str, Any]) -> list[str]:
    """A result's learner and estimator, as the tables name them."""
    return [LEARNERS[result["learner"]], ESTIMATORS[result["estimator"]]]


def changed_settings(result: dict[str, Any]) -> list[str]:
    """A variant's overrides beyond its suite's config (the data root, set on every Omniglot cell, left out)."""
    return [o for o in result.get("overrides", []) if not o.startswith("--data.root=")]


def budget_lines(suites: dict[str, Any], names: Iterable[str]) -> list[str]:
    """One line per suite of ``names`` with its equal budget (``suites``: the run's suites, as dicts)."""
    lines = []
    for name in names:
        suite = suites[name]
        network = "MLP 1-40-40-1" if suite["data"] == "sinusoid" else f"Conv4 ({suite['channels']} channels)"
        split = f", split by {suite.get('split_by', 'character')}" if suite["data"] == "omniglot" else ""
        budget = (
            f"meta-batch {suite['meta_batch']} for {suite['train_seconds']:g} s of training (CPU time)"
            if suite.get("train_seconds")
            else f"{suite['meta_steps']} meta-steps x meta-batch {suite['meta_batch']}"
        )
        lines.append(
            f"- `{name}`: {network}{split}; {suite['shots']} shot(s), {suite['test_shots']} queries"
            f"{' per class' if suite['data'] == 'omniglot' else ''}; {budget}; "
            f"{suite['inner_steps']} inner steps for every estimator (contrastive: "
            f"+{suite['nudged_steps']} nudged steps per nudged phase, the linear nudge +{suite['inner_steps']}; beta "
            f"{suite['beta']}); inner SGD lr {suite['inner_lr']}, momentum {suite['inner_momentum']}; Adam lr "
            f"{suite['outer_lr']}; {suite['eval_tasks']} fixed meta-test episodes; ComplexSynapse init_lambda "
            f"{suite['init_lambda']}, DualSystem pull {suite['pull']}"
            + (f"; Implicit's CG damping {suite['cg_damping']:g}." if suite.get("cg_damping") else ".")
        )
    return lines


def gradient_quality_section(out: Path) -> str:
    """The gradient-quality section: ``gradient_quality.report(json)`` of the stage's JSON, if it ran.

    Hook for ``benchmarks/gradient_quality.py`` (``run(out_dir, quick) -> json path``, ``report(json) -> markdown``).
    """
    folder = out / GRADIENT_QUALITY
    found = sorted(folder.glob("*.json")) if folder.is_dir() else []
    script = REPOSITORY / "benchmarks" / "gradient_quality.py"
    if not found or not script.exists():
        return "## Gradient quality\n\nNot run (no JSON under `" + str(folder) + "`)."
    spec = importlib.util.spec_from_file_location(GRADIENT_QUALITY, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[GRADIENT_QUALITY] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.report(found[0])


def figure(results: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Each suite's metric with its 95% CI per learner and estimator (points with error bars), failed cells out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4.2 * max(len(names), 1), 4.2), squeeze=False)
    for axis, name in zip(axes[0], names, strict=False):
        suite = SUITES[name]
        scale = 100.0 if suite.metric == "accuracy" else 1.0
        for offset, (learner, color) in enumerate(zip(LEARNERS, ("tab:blue", "tab:orange"), strict=True)):
            rows = [r for r in results[name] if r["learner"] == learner and r["status"] == "ok"]
            positions = [list(ESTIMATORS).index(r["estimator"]) + 0.15 * (2 * offset - 1) for r in rows]
            axis.errorbar(
                positions,
                [scale * r["metrics"][suite.metric] for r in rows],
                yerr=[scale * r["metrics"][suite.metric + "_ci95"] for r in rows],
                fmt="o",
                color=color,
                capsize=3,
                label=LEARNERS[learner],
            )
        axis.set_xticks(range(len(ESTIMATORS)), list(ESTIMATORS.values()), rotation=60, ha="right", fontsize=8)
        axis.set_title(suite.title, fontsize=10)
        axis.set_ylabel("query accuracy (%)" if suite.metric == "accuracy" else "meta-test MSE (log scale)")
        if suite.metric != "accuracy":
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, path)


def curve_figure(results: dict[str, list[dict[str, Any]]], path: Path, by_time: bool) -> Path:
    """Learning curves, one panel per suite (columns) and learner (rows): the metric with its 95% CI band against
    training CPU seconds (``by_time``) or meta-steps, a line per estimator; cells that failed are dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(
        len(LEARNERS), max(len(names), 1), figsize=(4.0 * max(len(names), 1), 3.6 * len(LEARNERS)), squeeze=False
    )
    colors = dict(zip(ESTIMATORS, plt.get_cmap("tab10").colors, strict=False))
    for column, name in enumerate(names):
        suite = SUITES[name]
        scale = 100.0 if suite.metric == "accuracy" else 1.0
        for row, learner in enumerate(LEARNERS):
            axis = axes[row][column]
            for result in (r for r in results[name] if r["learner"] == learner and r.get("curve")):
                points = [p for p in result["curve"] if math.isfinite(p["metrics"].get(suite.metric, math.nan))]
                x = [p["train_cpu_seconds"] if by_time else p["meta_step"] for p in points]
                mean = [scale * p["metrics"][suite.metric] for p in points]
                ci = [scale * p["metrics"][suite.metric + "_ci95"] for p in points]
                color = colors[result["estimator"]]
                style = "-" if result["status"] == "ok" else "--"
                axis.plot(x, mean, style, marker="o", markersize=3, color=color, label=ESTIMATORS[result["estimator"]])
                low = [m - c for m, c in zip(mean, ci, strict=True)]
                high = [m + c for m, c in zip(mean, ci, strict=True)]
                axis.fill_between(x, low, high, color=color, alpha=0.15)
            axis.set_title(f"{suite.title}\n{LEARNERS[learner]}", fontsize=9)
            axis.set_xlabel("meta-training CPU seconds (one thread)" if by_time else "meta-steps", fontsize=8)
            axis.set_ylabel(
                "query accuracy (%)" if suite.metric == "accuracy" else "meta-test MSE (log scale)", fontsize=8
            )
            if suite.metric != "accuracy":
                axis.set_yscale("log")
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> Path:
    """Save ``fig`` to ``path`` (folders created) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def variants_section(folders: Sequence[Path]) -> tuple[str, list[dict[str, Any]]]:
    """The cells run again with overrides (``--set``) under each of ``folders``, as one table, and their JSONs.

    Each row shows its overrides beyond the suite's config, its final metric and best curve point, and the
    command that ran it.
    """
    rows, found = [], []
    for folder in folders:
        commands = (
            json.loads((folder / RUN_INFO).read_text()).get("commands", []) if (folder / RUN_INFO).exists() else []
        )
        for result in (r for suite_rows in load_results(folder).values() for r in suite_rows):
            suite = SUITES[result["suite"]]
            changed = changed_settings(result)
            # The command that ran this cell: it names the cell's suite and estimator, and its learner if it filters.
            command = next(
                (
                    c
                    for c in commands
                    if result["suite"] in c
                    and result["estimator"] in c
                    and (result["learner"] in c or "--learners" not in c)
                ),
                "",
            )
            step = result.get("seconds_per_meta_step")
            rows.append(
                f"| {suite.title} | {LEARNERS[result['learner']]} | {ESTIMATORS[result['estimator']]} | "
                f"{' '.join(f'`{o}`' for o in changed)} | {metric_cell(result, suite)} | {best_point(result, suite)} | "
                f"{'' if step is None else f'{step:.3f}'} | {status_cell(result)} | `{command}` |"
            )
            found.append(result)
    header = [
        "## Variants: single cells with overrides",
        "",
        "| suite | learner | estimator | overrides | metric ± 95% CI | best point @ meta-step | s / meta-step | status "
        "| command |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    long = [result for result in found if SUITES[result["suite"]].group == "long"]
    if long:  # where each variant of a longer run stopped improving
        columns = ["suite", "learner", "estimator", "overrides"]
        curves = curve_table(
            long,
            columns,
            lambda r: [SUITES[r["suite"]].title, *cell_label(r), " ".join(f"`{o}`" for o in changed_settings(r))],
        )
        rows += ["", "Learning curves of the variants of the longer runs:", "", curves]
    return "\n".join(header + rows), found


def report(
    out: Path,
    results_md: Path,
    figure_path: Path,
    merged_json: Path,
    findings: Path | None = None,
    variants: Sequence[Path] = (),
) -> str:
    """Render ``results_md`` (tables, command, machine, budgets, gradient quality), the figures and the merged JSON.

    One section per suite group that has results: equal meta-steps (``figure_path``), equal training time and
    the longer runs (their learning curves in ``<figure_path stem>_equal_time.png`` and ``..._curves.png``).
    ``findings``, a hand-written markdown file, is included after the run's description when it exists; the
    cells under ``variants`` (other ``--out`` folders, run with ``--set`` overrides) get a table of their own.
    """
    results = load_results(out)
    by_group = {group: {n: rows for n, rows in results.items() if SUITES[n].group == group} for group in GROUPS}
    info = json.loads((out / RUN_INFO).read_text()) if (out / RUN_INFO).exists() else {}
    suites = {name: asdict(suite) for name, suite in SUITES.items()} | info.get("suites", {})
    host = info.get("machine", {})
    loads = [r["load_average"] for rows in results.values() for r in rows if r.get("load_average") is not None]

    def image(path: Path, text: str) -> str:
        relative = path.relative_to(results_md.parent) if path.is_relative_to(results_md.parent) else None
        return f"![{text}]({relative})" if relative is not None else f"Figure: `{path}`"

    lines = [
        "# Reproduction: learners x estimators under equal budgets",
        "",
        "Generated by `python benchmarks/reproduce.py --report` from the per-cell JSON files of the run below.",
        "Every cell is configured by `configs/reproduce/<suite>/<learner>__<estimator>.yaml`"
        + (", shrunk by `--smoke` (not a result)." if info.get("smoke") else "."),
        "",
        "- command(s): "
        + "; ".join(
            f"`{command}`" + (f" (launched {count} times: resumed)" if count > 1 else "")
            for command, count in Counter(info.get("commands", ["unknown"])).items()
        ),
        f"- machine: {host.get('cpu', '?')}, {host.get('cores', '?')} cores (shared with other work), Python "
        f"{host.get('python', '?')}, torch {host.get('torch', '?')}, {host.get('threads_per_worker', '?')} torch "
        "thread per process; each cell in a fresh process.",
        *(
            [f"- machine load (5-minute load average as each cell ended): {min(loads):.1f} to {max(loads):.1f}."]
            if loads
            else []
        ),
        f"- seed: {info.get('seed', SEED)} for every cell (`seed_everything` and the data seed: the same meta-training "
        "tasks and the same fixed meta-test episodes for every estimator).",
        "- s / meta-step: mean wall-clock of the meta-steps after the first, measured inside the process "
        "(estimate, backward, outer update). Peak memory: the process's peak resident set size "
        "(`ru_maxrss`, nothing subtracted: it includes Python, torch and the data).",
        "- learning curves: every trained cell evaluates the fixed meta-test episodes at its untrained start and at "
        "regular points of meta-training (`LearningCurve`); evaluation time is excluded from the training clocks. "
        '"best point": the curve\'s best point after the start, with its meta-step.',
        f"- failed: a non-finite metric, a meta-test query loss above {DIVERGED_LOSS_FACTOR:g}x the untrained "
        f"start's, or more than {MAX_SKIPPED_FRACTION:.0%} of the meta-training tasks skipped for inner-loop faults.",
        "- `untrained start`: the same network adapted from its untrained start on the same episodes "
        "(no meta-training).",
    ]
    if findings is not None and findings.exists():
        lines += ["", findings.read_text().strip()]
    if by_group["steps"]:
        lines += [
            "",
            "## Equal meta-steps",
            "",
            "Budgets (per suite, every estimator; `Reptile` uses the same Adam outer optimizer on its "
            "`theta - phi_T` meta-gradient):",
            *budget_lines(suites, by_group["steps"]),
            "",
            image(figure(by_group["steps"], figure_path), "accuracy and MSE per estimator, failed cells left out"),
            "",
            "Where each contrastive rule stands against every other estimator: ahead or behind when the 95% "
            "intervals do not overlap, level when they do; in brackets the difference in accuracy points (Omniglot) "
            "or MSE (sinusoid; positive: the contrastive rule is better).",
            *standings(by_group["steps"]),
        ]
        for name, rows in by_group["steps"].items():
            lines += ["", f"### {SUITES[name].title}", "", suite_table(SUITES[name], rows)]
    if by_group["time"]:
        curves = curve_figure(by_group["time"], figure_path.with_name(f"{figure_path.stem}_equal_time.png"), True)
        lines += [
            "",
            "## Equal training time",
            "",
            "Every estimator meta-trains for the same training time per cell, measured as the process's CPU time "
            "(one torch thread; evaluations excluded): the wall-clock it would take on a core of its own, which other "
            "work on the shared cores does not change. The meta-test metric is evaluated on the same fixed episodes "
            "at the start, at every fifth of the budget and at the end. Budgets:",
            *budget_lines(suites, by_group["time"]),
            "",
            image(curves, "meta-test metric against meta-training time, per suite and learner"),
            "",
            "Where each contrastive rule stands at the end of the budget (as above):",
            *standings(by_group["time"]),
        ]
        for name, rows in by_group["time"].items():
            lines += ["", f"### {SUITES[name].title}", "", suite_table(SUITES[name], rows)]
    if by_group["long"]:
        curves = curve_figure(by_group["long"], figure_path.with_name(f"{figure_path.stem}_curves.png"), False)
        lines += [
            "",
            "## Longer meta-training",
            "",
            "Learning curves on the fixed meta-test episodes, a point every 50 meta-steps. Budgets:",
            *budget_lines(suites, by_group["long"]),
            "",
            image(curves, "meta-test metric against meta-steps, per suite and learner"),
        ]
        for name, rows in by_group["long"].items():
            lines += [
                "",
                f"### {SUITES[name].title}",
                "",
                curve_table(rows, ["learner", "estimator"], cell_label),
                "",
                suite_table(SUITES[name], rows),
            ]
    variant_results: list[dict[str, Any]] = []
    if variants:
        table, variant_results = variants_section(variants)
        lines += ["", table]
    lines += ["", gradient_quality_section(out), ""]
    text = "\n".join(lines)
    results_md.write_text(text)
    merged_json.parent.mkdir(parents=True, exist_ok=True)
    merged = {"run": info, "results": results, "variants": variant_results}
    merged_json.write_text(json.dumps(merged, indent=2, allow_nan=True))
    return text


# ---------------------------------------------------------------------------------------------- command line
def select(only: str | None, learners: str | None, estimators: str | None) -> list[Cell]:
    """The cells the filters keep (comma-separated names; ``None`` keeps all learners and estimators).

    ``only`` names suites and suite groups (``steps``, ``time``, ``long``); ``None`` keeps the ``steps`` and
    ``time`` groups (the ``long`` group is run on request).
    """
    names = (only or "steps,time").split(",")
    suites = {name for name, suite in SUITES.items() if name in names or suite.group in names}

    def keep(value: str, allowed: str | None) -> bool:
        return allowed is None or value in allowed.split(",")

    return [
        cell
        for cell in all_cells()
        if cell.suite in suites and keep(cell.learner, learners) and keep(cell.estimator, estimators)
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder of the per-cell JSONs (default: %(default)s)"
    )
    parser.add_argument("--workers", type=int, default=2, help="cells run at once, one process each (default 2)")
    parser.add_argument("--smoke", action="store_true", help=f"tiny budgets ({SMOKE}) to check the orchestration")
    parser.add_argument(
        "--only",
        help=f"comma-separated suites or groups among {[*GROUPS, *SUITES, GRADIENT_QUALITY]} (default: steps,time and "
        f"{GRADIENT_QUALITY})",
    )
    parser.add_argument("--learners", help=f"comma-separated among {list(LEARNERS)}")
    parser.add_argument("--estimators", help=f"comma-separated among {list(ESTIMATORS)}")
    parser.add_argument(
        "--set", action="append", default=[], metavar="--KEY=VALUE", help="a CLI override for every cell"
    )
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each cell's checkpoint at every curve point, as <cell>.step=<N>.ckpt under --out",
    )
    parser.add_argument("--report", action="store_true", help="render RESULTS.md, the figure and the merged JSON only")
    parser.add_argument("--results-md", type=Path, default=REPOSITORY / "RESULTS.md")
    parser.add_argument("--figure", type=Path, default=REPOSITORY / "docs" / "reproduce_accuracy.png")
    parser.add_argument("--merged-json", type=Path, default=REPOSITORY / "docs" / "reproduce" / "results.json")
    parser.add_argument(
        "--findings", type=Path, default=REPOSITORY / "docs" / "reproduce" / "findings.md", help="hand-written notes"
    )
    parser.add_argument("--variants", type=Path, nargs="*", default=[], help="--out folders of runs with --set")
    parser.add_argument("--write-configs", action="store_true", help="regenerate configs/reproduce/ and exit")
    parser.add_argument("--run-cell", nargs=3, metavar=("SUITE", "LEARNER", "ESTIMATOR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for option, names in (
        ("--only", [*GROUPS, *SUITES, GRADIENT_QUALITY]),
        ("--learners", LEARNERS),
        ("--estimators", ESTIMATORS),
    ):
        value = getattr(args, option.removeprefix("--"))
        unknown = sorted(set(value.split(",")) - set(names)) if value else []
        if unknown:
            parser.error(f"{option}: unknown {unknown}; choose among {list(names)}.")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1; got {args.workers}.")
    if args.write_configs:
        print(f"Wrote {len(write_configs())} configurations under {CONFIGS}.")
    elif args.run_cell:
        cell = Cell(*args.run_cell)
        result = run_cell(cell, args.set, cell.result_path(args.out), args.keep_checkpoints)
        print(f"{cell.suite}/{cell.name}: {result.status} {result.reason}")
    elif args.report:
        print(report(args.out, args.results_md, args.figure, args.merged_json, args.findings, args.variants))
    else:
        cells = select(args.only, args.learners, args.estimators)
        gradient_quality = args.only is None or GRADIENT_QUALITY in args.only.split(",")
        if not args.smoke:
            hours = estimate_seconds(cells, MEASURED_SECONDS_PER_STEP) / args.workers / 3600
            print(
                f"Estimated time: {60 * hours:.0f} min of cells on {args.workers} workers"
                f"{' plus the gradient-quality stage (~8 min on one worker)' if gradient_quality else ''}.",
                flush=True,
            )
        start = time.perf_counter()
        reproduce(cells, args.out, args.workers, args.smoke, args.set, gradient_quality, args.keep_checkpoints)
        minutes = (time.perf_counter() - start) / 60
        print(f"Done in {minutes:.1f} min. Render: python benchmarks/reproduce.py --report --out {args.out}")


if __name__ == "__main__":
    main()
