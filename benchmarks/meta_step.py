"""The cost of one meta-step: time, peak memory and accuracy of every estimator, against a hand-written floor.

Problems: a complex synapse (``ComplexSynapse``, learned strengths) over ``networks.Conv4`` (64 channels)
on Omniglot 28x28 5-way and 20-way 1-shot tasks with 15 queries per class (``conv5``, ``conv20``), and
over the 1-40-40-1 ``networks.MLP`` on sinusoid regression, 10 support and 10 query points (``sinusoid``);
on request, ``conv20`` with smooth units (``Conv4(smooth=True)``: GELU and average pooling; ``conv20-smooth``).
Methods: ``Contrastive`` one-sided and symmetric with the paper's nudge (``contrastive``, ``contrastive-sym``:
``nudge="full"``) and with the linearised one (``contrastive-linear``, ``contrastive-sym-linear``), ``MAML``,
``FirstOrderMAML``, ``Implicit``, ``Reptile`` (on a learner with ``learn_lambda=False``, the only one it is
defined for) and ``floor``/``floor-sym``, the full-nudge arithmetic hand-written with no framework around it
(``contrastive_floor.py``). With ``T`` inner steps the contrastive methods take ``T`` free and ``T // 2`` nudged
steps per phase (the authors' 200/100 ratio), so both nudges run the same phases; the others take ``T`` steps.
SGD lr 0.01, momentum 0.9 everywhere.

Sections (``--sections``):

- ``main``: per problem, method and ``T``: time per meta-step (median over repeats and rounds), peak
  memory, and the cosine of the meta-gradient to MAML's at the same ``T``, the exact gradient of the objective
  that ``T``-step adaptation gives users (``Implicit`` run long is no reference on these ReLU networks: their
  inner Hessians are indefinite, which it now reports as a fault). Every measurement
  runs in a fresh process (peak RSS cannot be reset), and each round launches all of them in a
  shuffled order, so methods are interleaved and share the machine's load alike;
- ``profile``: where a contrastive meta-step's time goes: the cost of a free step (support set) and of
  a nudged step (support plus query set), and the share of the query evaluations;
- ``knobs``: the symmetric rule with fewer nudged steps and with query subsampling, each with its time,
  memory and cosine to MAML's meta-gradient;
- ``batched``: the meta-batch looped over tasks against ``torch.func.vmap`` over tasks, with the path
  ``batched=None`` picks and the largest difference between the two meta-gradients;
- ``agreement`` (on request): the symmetric linear and full nudges on the same phases at each ``--agreement-betas``
  (in ``--agreement-precision``), their cosine and each one's cosine to its own estimate at the smallest beta:
  whether the two have one small-beta limit, and whether either has one at all. ReLU and max-pooling make a
  nudged run jump wherever a unit switches, so there the finite difference carries ``jump / beta`` terms. A third
  estimate, the linear nudge forced with the query gradient along the free path (``path_nudge.py``), splits the
  two nudges' disagreement into the query gradient's movement along an unconverged path and the kinks.

Every process runs torch on one thread (shared cores make more threads slower and noisier).

    python benchmarks/meta_step.py                          # the full run
    python benchmarks/meta_step.py --quick                  # a quick check (conv5 and sinusoid, T=10)
    python benchmarks/meta_step.py --problems conv20 --steps 10 100 --sections main knobs
    python benchmarks/meta_step.py --problems conv20 conv20-smooth --steps 50 --sections agreement
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from contrastive_floor import Forward, contrastive_floor, conv4_forward, mlp_forward
from path_nudge import PathForcedNudge
from torch import Tensor, nn
from tqdm import tqdm

from lightning_contrastive import (
    MAML,
    ComplexSynapse,
    Contrastive,
    Estimator,
    FirstOrderMAML,
    Implicit,
    Reptile,
    meta_gradient,
)
from lightning_contrastive.inner import InnerSGD, minimise
from lightning_contrastive.networks import MLP, Conv4
from lightning_contrastive.tasks import Params, Split, split_batch

DEFAULT_OMNIGLOT = os.environ.get(
    "LIGHTNING_CONTRASTIVE_OMNIGLOT_ROOT", Path(__file__).resolve().parents[1].parent / "shared/data/omniglot"
)
CONTRASTIVE_METHODS = {  # method -> (symmetric, nudge)
    "contrastive": (False, "full"),
    "contrastive-sym": (True, "full"),
    "contrastive-linear": (False, "linear"),
    "contrastive-sym-linear": (True, "linear"),
}
PATH_FORCED = "contrastive-sym-path"  # the agreement section's diagnostic (path_nudge.py), not a training estimator
METHODS = (*CONTRASTIVE_METHODS, "floor", "floor-sym", "maml", "fomaml", "implicit", "reptile")
INNER_LR, INNER_MOMENTUM, INIT_LAMBDA, QUERIES_PER_CLASS = 0.01, 0.9, 0.5, 15
Grads = dict[str, Tensor]


@dataclass(frozen=True)
class Problem:
    """A benchmark problem: the backbone, its hand-written forward pass for the floor, and the task family."""

    description: str
    network: Callable[[], nn.Module]
    forward: Forward
    loss: str
    beta: float
    ways: int | None = None  # None: sinusoid regression

    @property
    def is_conv(self) -> bool:
        return self.ways is not None


PROBLEMS = {
    "conv5": Problem(
        "Conv4, Omniglot 5-way 1-shot", lambda: Conv4(1, 5, 64, 28), conv4_forward, "cross_entropy", 0.1, 5
    ),
    "conv20": Problem(
        "Conv4, Omniglot 20-way 1-shot", lambda: Conv4(1, 20, 64, 28), conv4_forward, "cross_entropy", 0.03, 20
    ),
    # Smooth units (GELU, average pooling): a loss gradient continuous in the weights, for the agreement section.
    "conv20-smooth": Problem(
        "Conv4 with GELU and average pooling, Omniglot 20-way 1-shot",
        lambda: Conv4(1, 20, 64, 28, smooth=True),
        partial(conv4_forward, smooth=True),
        "cross_entropy",
        0.03,
        20,
    ),
    # beta 0.1 lets the symmetric rule's -beta phase diverge on 2 of the 25 sinusoid tasks within 50 nudged steps.
    "sinusoid": Problem("MLP 1-40-40-1, sinusoid 10-shot", MLP, mlp_forward, "mse", 0.03),
}


# ----------------------------------------------------------------------------------------------- workers
def peak_rss_mib() -> float:
    """This process's peak resident set size (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def build_learner(problem: Problem, learn_lambda: bool) -> ComplexSynapse:
    torch.manual_seed(0)  # every worker starts from the same omega
    return ComplexSynapse(problem.network(), problem.loss, init_lambda=INIT_LAMBDA, learn_lambda=learn_lambda)  # type: ignore[arg-type]


def make_estimator(method: str, steps: int, beta: float, options: dict[str, Any]) -> Estimator:
    """The engine's estimator for ``method`` with ``T = steps`` (``options`` override its arguments)."""
    settings = {"beta": beta, "inner_steps": steps, "nudged_steps": max(1, steps // 2), **options}
    if method == PATH_FORCED:
        return PathForcedNudge(**settings)
    if method in CONTRASTIVE_METHODS:
        symmetric, nudge = CONTRASTIVE_METHODS[method]
        return Contrastive(symmetric=symmetric, nudge=nudge, **settings)
    estimators = {"maml": MAML, "fomaml": FirstOrderMAML, "implicit": Implicit, "reptile": Reptile}
    return estimators[method](inner_steps=steps, **options)


def make_meta_step(
    problem: Problem, method: str, steps: int, options: dict[str, Any], batch: dict
) -> Callable[[], Grads]:
    """A closure computing one meta-gradient on ``batch``, keyed like the learner's meta-parameters."""
    learner = build_learner(problem, learn_lambda=method != "reptile")
    if not method.startswith("floor"):
        estimator = make_estimator(method, steps, problem.beta, options)
        # Skip, not stop: Implicit's solve meets negative curvature on these conv nets (an inner-loop fault), and
        # its cost is measured all the same; a meta-gradient whose tasks all failed is zero and shows as "faulted".
        return lambda: meta_gradient(learner, estimator, batch, on_fault="skip")
    names = learner.fast_names
    omega = [learner.get_parameter(f"omega.{name}").detach() for name in names]
    log_strength = [learner.get_parameter(f"lambda.{name}").detach() for name in names]
    loss = F.cross_entropy if problem.loss == "cross_entropy" else F.mse_loss
    tasks = split_batch(batch)

    def floor_step() -> Grads:
        total = [torch.zeros_like(w) for w in omega + log_strength]
        for task in tasks:
            omega_grad, strength_grad = contrastive_floor(
                problem.forward,
                loss,
                omega,
                log_strength,
                (task.support.x, task.support.y),
                (task.query.x, task.query.y),
                beta=problem.beta,
                inner_steps=steps,
                nudged_steps=options.get("nudged_steps", max(1, steps // 2)),
                lr=INNER_LR,
                momentum=INNER_MOMENTUM,
                symmetric=method == "floor-sym",
            )
            torch._foreach_add_(total, omega_grad + strength_grad)
        keys = [f"omega.{name}" for name in names] + [f"lambda.{name}" for name in names]
        return {key: g / len(tasks) for key, g in zip(keys, total, strict=True)}

    return floor_step


def synchronised(device: torch.device, run: Callable[[], Any]) -> Any:
    """``run()``, returning once the accelerator has finished its work (CUDA runs asynchronously)."""
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result


def timed(run: Callable[[], Any], min_seconds: float, max_runs: int = 50) -> tuple[list[float], Any]:
    """Run ``run`` at least once and until ``min_seconds`` have passed; the time of each run and the last result."""
    times: list[float] = []
    while not times or (sum(times) < min_seconds and len(times) < max_runs):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return times, result


def step_worker(spec: dict) -> dict:
    """Time one method's meta-step in this fresh process and record its peak memory and meta-gradient."""
    problem = PROBLEMS[spec["problem"]]
    batch = torch.load(spec["data"])
    meta_step = make_meta_step(problem, spec["method"], spec["steps"], spec["options"], batch)
    torch.manual_seed(1)  # query subsampling draws from torch's generator
    baseline = peak_rss_mib()
    times, grads = timed(meta_step, spec["min_seconds"])
    result = {"times": times, "baseline_mib": baseline, "peak_mib": peak_rss_mib()}
    if spec.get("grads_out"):
        torch.save({key: g.detach() for key, g in grads.items()}, spec["grads_out"])
    return result


def profile_worker(spec: dict) -> dict:
    """Milliseconds per inner step of each objective a contrastive meta-step minimises, on the first task."""
    problem = PROBLEMS[spec["problem"]]
    learner = build_learner(problem, learn_lambda=True)
    task = split_batch(torch.load(spec["data"]))[0]
    meta = {name: p.detach() for name, p in learner.meta_parameters().items()}
    start, optimizer, queries = learner.init_fast(meta), InnerSGD(INNER_LR, INNER_MOMENTUM), len(task.query.y)

    def nudged_loss(support_loss: Callable[[Params], Tensor], query: Split, fast: Params) -> Tensor:
        return support_loss(fast) + problem.beta * learner.query_loss(fast, meta, query)

    support_loss = partial(learner.inner_loss, meta=meta, support=task.support)
    objectives = {"free step (support)": support_loss}
    for subsample in (queries, queries // 3, queries // 10):
        query = Split(task.query.x[:subsample], task.query.y[:subsample])
        objectives[f"nudged step (support + {subsample} queries)"] = partial(nudged_loss, support_loss, query)
    costs: dict[str, list[float]] = {label: [] for label in objectives}
    for _ in range(spec["repeats"]):  # interleaved
        for label, objective in objectives.items():
            times, _ = timed(partial(minimise, objective, start, 5, optimizer), spec["min_seconds"])
            costs[label] += [t / 5 for t in times]
    return {label: statistics.median(samples) * 1e3 for label, samples in costs.items()}


def batched_worker(spec: dict) -> dict:
    """Looped and batched meta-steps of every batchable method, interleaved in this process, on ``spec["device"]``."""
    from lightning_contrastive.meta_gradient import choose_batched

    device = torch.device(spec["device"])
    problem = PROBLEMS[spec["problem"]]
    batch = {key: tuple(t.to(device) for t in pair) for key, pair in torch.load(spec["data"]).items()}
    tasks = len(batch["train"][0])
    rows = []
    for steps in spec["steps"]:
        for method in spec["methods"]:
            learner = build_learner(problem, learn_lambda=method != "reptile").to(device)
            estimator = make_estimator(method, steps, problem.beta, {})
            if not estimator.batchable:
                continue
            samples: dict[bool, list[float]] = {False: [], True: []}
            grads: dict[bool, Grads] = {}
            for repeat in range(spec["repeats"]):
                for batched in (False, True) if repeat % 2 == 0 else (True, False):
                    run = partial(
                        synchronised, device, partial(meta_gradient, learner, estimator, batch, batched=batched)
                    )
                    if device.type != "cpu":
                        run()  # kernel selection and allocator warm-up stay out of the timing
                    times, grads[batched] = timed(run, spec["min_seconds"])
                    samples[batched] += times
            scale = max(g.abs().max() for g in grads[False].values())
            difference = max((grads[True][k] - grads[False][k]).abs().max() for k in grads[False]) / scale
            rows.append(
                {
                    "steps": steps,
                    "method": method,
                    "looped": statistics.median(samples[False]),
                    "batched": statistics.median(samples[True]),
                    "auto": choose_batched(learner, estimator, tasks),
                    "difference": float(difference),
                }
            )
    return {"rows": rows}


WORKERS = {"step": step_worker, "profile": profile_worker, "batched": batched_worker}


# ------------------------------------------------------------------------------------------ orchestration
def run_worker(spec: dict, scratch: Path) -> dict:
    """Run one measurement in a fresh single-threaded Python process and return what it reports."""
    spec_path = Path(tempfile.mkstemp(suffix=".json", dir=scratch)[1])
    spec_path.write_text(json.dumps({**spec, "out": str(spec_path.with_suffix(".out.json"))}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, __file__, "--worker", str(spec_path)], env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"worker {spec} failed:\n{done.stderr[-4000:]}")
    return json.loads(spec_path.with_suffix(".out.json").read_text())


def make_batch(problem: Problem, tasks: int, omniglot: Path) -> tuple[dict, str]:
    """A seeded meta-batch of ``tasks`` tasks, and where it came from."""
    if problem.ways is None:
        from lightning_contrastive.data.sinusoid import SinusoidTasks

        episodes = [SinusoidTasks(tasks, shots=10, test_shots=10, seed=0)[i] for i in range(tasks)]
        batch = {key: tuple(torch.stack([e[key][j] for e in episodes]) for j in range(2)) for key in ("train", "test")}
        return batch, "seeded sinusoid tasks"
    if not omniglot.exists():
        x = torch.rand(tasks, problem.ways * (1 + QUERIES_PER_CLASS), 1, 28, 28)
        y = torch.arange(problem.ways).repeat(tasks, 1 + QUERIES_PER_CLASS)
        n = problem.ways
        return {"train": (x[:, :n], y[:, :n]), "test": (x[:, n:], y[:, n:])}, f"random images ({omniglot} not found)"
    from lightning_contrastive.data.omniglot import OmniglotDataModule

    data = OmniglotDataModule(
        str(omniglot), ways=problem.ways, shots=1, test_shots=QUERIES_PER_CLASS, batch_size=tasks, seed=0
    )
    data.setup()
    return next(iter(data.train_dataloader())), f"Omniglot images from {omniglot}"


@dataclass(frozen=True)
class Job:
    """One fresh-process measurement of a meta-step."""

    problem: str
    method: str
    steps: int
    options: tuple[tuple[str, Any], ...] = ()


# Each full-nudge method is timed against its floor, each linear-nudge one against MAML.
PARTNERS = {
    "contrastive": "floor",
    "contrastive-sym": "floor-sym",
    "contrastive-linear": "maml",
    "contrastive-sym-linear": "maml",
}


def schedule(jobs: list[Job], order: random.Random) -> list[Job]:
    """``jobs`` in a random order, except that each contrastive job runs right next to its partner (its floor, or
    MAML; same problem, steps and options), so that the ratio of their times sees the same load from other
    processes."""
    units: dict[tuple, list[Job]] = {}
    for job in jobs:
        units.setdefault((job.problem, job.steps, job.options, PARTNERS.get(job.method, job.method)), []).append(job)
    shuffled = list(units.values())
    order.shuffle(shuffled)
    for unit in shuffled:
        order.shuffle(unit)
    return [job for unit in shuffled for job in unit]


def cosine(a: Grads, b: Grads) -> float:
    """Cosine between two meta-gradients over the meta-parameters both have (Reptile's are only the omegas)."""
    keys = [k for k in a if k in b]
    x, y = (torch.cat([g[k].flatten().double() for k in keys]) for g in (a, b))
    return float(x @ y / (x.norm() * y.norm())) if x.norm() * y.norm() > 0 else float("nan")


def norm(grads: Grads) -> float:
    """The Euclidean norm of a meta-gradient over all its meta-parameters."""
    return float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values())))


def cosine_cell(a: Grads, b: Grads) -> str:
    """:func:`cosine` to 4 decimals, or "faulted" when one side's tasks all failed (a zero meta-gradient)."""
    value = cosine(a, b)
    return "faulted" if value != value else f"{value:.4f}"


def duration(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def markdown(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in line
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    return f"{model}, {os.cpu_count()} cores, load average {load}; {versions}"


class Benchmark:
    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.args = args
        self.scratch = scratch
        self.data: dict[str, str] = {}
        self.results: dict[Job, list[dict]] = {}
        self.grads: dict[Job, Grads] = {}

    def tasks(self, name: str, batched: bool = False) -> int:
        if not PROBLEMS[name].is_conv:
            return self.args.sinusoid_tasks
        return max(2, self.args.conv_tasks) if batched else self.args.conv_tasks

    def prepare_data(self) -> None:
        for name in self.args.problems:
            for batched in (False, True) if "batched" in self.args.sections else (False,):
                batch, source = make_batch(PROBLEMS[name], self.tasks(name, batched), self.args.omniglot)
                path = self.scratch / f"{name}{'-batched' if batched else ''}.pt"
                torch.save(batch, path)
                self.data[name + ("-batched" if batched else "")] = str(path)
            print(f"- {name}: {PROBLEMS[name].description}, {source}")

    def job_spec(self, job: Job, grads_out: str | None) -> dict:
        return {
            "kind": "step",
            "problem": job.problem,
            "method": job.method,
            "steps": job.steps,
            "options": dict(job.options),
            "data": self.data[job.problem],
            "min_seconds": self.args.min_seconds,
            "grads_out": grads_out,
        }

    def rounds(self, name: str) -> int:
        return self.args.conv_repeats if PROBLEMS[name].is_conv else self.args.repeats

    def measure(self, jobs: list[Job], description: str, once: bool = False) -> None:
        """Run every job once per round of its problem (or ``once``), each round in a fresh shuffled order;
        keep the first round's gradients."""
        order = random.Random(0)
        rounds = {job: 1 if once else self.rounds(job.problem) for job in jobs}
        with tqdm(total=sum(rounds.values()), desc=description, unit="run") as bar:
            for round_ in range(max(rounds.values())):
                for job in schedule([job for job in jobs if rounds[job] > round_], order):
                    bar.set_postfix_str(f"{job.problem} {job.method} T={job.steps} {dict(job.options) or ''}")
                    grads_out = str(self.scratch / f"grads-{len(self.grads)}.pt") if round_ == 0 else None
                    self.results.setdefault(job, []).append(run_worker(self.job_spec(job, grads_out), self.scratch))
                    if grads_out:
                        self.grads[job] = torch.load(grads_out)
                    bar.update()

    def median_time(self, job: Job) -> float:
        return statistics.median(t for result in self.results[job] for t in result["times"])

    def peak(self, job: Job) -> float:
        return max(result["peak_mib"] for result in self.results[job])

    # ---------------------------------------------------------------------------------------- sections
    def main_section(self) -> None:
        jobs = [
            Job(name, method, steps)
            for name in self.args.problems
            for method in self.args.methods
            for steps in self.args.steps
        ]
        self.measure(jobs, "main")
        for name in self.args.problems:
            baselines = [r["baseline_mib"] for job in jobs if job.problem == name for r in self.results[job]]
            print(f"\n### {name}: time per meta-step ({self.tasks(name)} task(s), {self.rounds(name)} round(s))\n")
            print(self.grid(name, lambda job: duration(self.median_time(job))))
            print(
                f"\n### {name}: peak memory (MiB; import baseline, i.e. the peak before the meta-step: "
                f"{min(baselines):.0f}-{max(baselines):.0f} MiB)\n"
            )
            print(self.grid(name, lambda job: f"{self.peak(job):.0f}"))
            if "maml" in self.args.methods:
                print(f"\n### {name}: cosine to MAML's meta-gradient at the same T\n")
                print(
                    self.grid(name, lambda job: cosine_cell(self.grads[job], self.grads[replace(job, method="maml")]))
                )
        self.targets()

    def grid(self, name: str, cell: Callable[[Job], str]) -> str:
        """A table of ``cell(job)`` with a row per method and a column per step count."""
        header = ["method", *(f"T={t}" for t in self.args.steps)]
        return markdown(header, ([m, *(cell(Job(name, m, t)) for t in self.args.steps)] for m in self.args.methods))

    def targets(self) -> None:
        """The targets of the issues that asked for this benchmark, as ratios on the largest Conv4 problem measured."""
        name = next((n for n in ("conv20", "conv5") if n in self.args.problems), None)
        if name is None:
            return
        steps, methods = self.args.steps, self.args.methods
        print(f"\n### Targets ({name})\n")
        lines = []
        for method in [m for m in CONTRASTIVE_METHODS if m in methods]:
            if 10 in steps and 200 in steps:
                ratio = self.peak(Job(name, method, 200)) / self.peak(Job(name, method, 10))
                lines.append(f"- {method} peak memory, T=200 / T=10: {ratio:.2f} (target <= 1.15)")
            if 100 in steps and "maml" in methods:
                ratio = self.peak(Job(name, "maml", 100)) / self.peak(Job(name, method, 100))
                lines.append(f"- MAML / {method} peak memory at T=100: {ratio:.2f} (target >= 3)")
            if "maml" in methods:
                ratios = ", ".join(
                    f"T={t}: {self.median_time(Job(name, method, t)) / self.median_time(Job(name, 'maml', t)):.2f}"
                    for t in steps
                )
                target = " (target <= 0.6 at T=100, <= 1 everywhere)" if method == "contrastive-sym-linear" else ""
                lines.append(f"- {method} / MAML time: {ratios}{target}")
            floor = "floor-sym" if CONTRASTIVE_METHODS[method][0] else "floor"
            if CONTRASTIVE_METHODS[method][1] == "full" and floor in methods:
                ratios = ", ".join(
                    f"T={t}: {self.median_time(Job(name, method, t)) / self.median_time(Job(name, floor, t)):.2f}"
                    for t in steps
                )
                lines.append(f"- {method} / {floor} time: {ratios} (target <= 1.2)")
        for linear, full in (("contrastive-linear", "contrastive"), ("contrastive-sym-linear", "contrastive-sym")):
            if linear in methods and full in methods:
                cosines = ", ".join(
                    f"T={t}: {cosine_cell(self.grads[Job(name, linear, t)], self.grads[Job(name, full, t)])}"
                    for t in steps
                )
                lines.append(f"- cosine of {linear} to {full} (same phases): {cosines} (target >= 0.99 at T >= 50)")
        print("\n".join(lines) or "(needs T=10, 100, 200 and the floor and MAML methods)")

    def profile(self) -> None:
        print("\n### Where a contrastive meta-step's time goes (ms per inner step, median)\n")
        for name in tqdm(self.args.problems, desc="profile"):
            spec = {"kind": "profile", "problem": name, "data": self.data[name], "repeats": 3, "min_seconds": 0.3}
            costs = run_worker(spec, self.scratch)
            free, nudged = list(costs.values())[:2]
            print(f"- {name}: " + "; ".join(f"{label} {ms:.2f}" for label, ms in costs.items()))
            # A symmetric meta-step takes T free and 2 x T/2 nudged steps, so these shares hold at any T.
            share = nudged / (free + nudged)
            print(
                f"  symmetric rule: the nudged phases take {share:.0%} of a meta-step, the query evaluations "
                f"in them {share * (nudged - free) / nudged:.0%}"
            )

    def knobs(self) -> None:
        name, steps = self.args.knobs_problem, self.args.knobs_steps
        queries = QUERIES_PER_CLASS * PROBLEMS[name].ways if PROBLEMS[name].is_conv else 10
        variants = {
            f"nudged {steps // 2} (default), all {queries} queries": (),
            f"nudged {steps // 4}": (("nudged_steps", max(1, steps // 4)),),
            f"nudged {steps // 10}": (("nudged_steps", max(1, steps // 10)),),
            f"query_subsample={queries // 3}": (("query_subsample", queries // 3),),
            f"query_subsample={queries // 10}": (("query_subsample", queries // 10),),
            f"nudged {steps // 4}, query_subsample={queries // 10}": (
                ("nudged_steps", max(1, steps // 4)),
                ("query_subsample", queries // 10),
            ),
        }
        jobs = {label: Job(name, "contrastive-sym", steps, options) for label, options in variants.items()}
        maml = Job(name, "maml", steps)
        self.measure([job for job in [*jobs.values(), maml] if job not in self.results], "knobs")
        default = jobs[next(iter(jobs))]
        print(f"\n### Knobs that cut the nudged phases' cost ({name}, symmetric, {steps} free steps)\n")
        print(
            markdown(
                ["variant", "time per meta-step", "peak MiB", "cosine to MAML", "cosine to the default"],
                (
                    [
                        label,
                        duration(self.median_time(job)),
                        f"{self.peak(job):.0f}",
                        cosine_cell(self.grads[job], self.grads[maml]),
                        cosine_cell(self.grads[job], self.grads[default]),
                    ]
                    for label, job in jobs.items()
                ),
            )
        )

    def agreement(self) -> None:
        """The symmetric linear and full nudges on the same phases over beta, on each problem: where the two share a
        linear-response limit, each estimate tends to its own small-beta value and their cosine to 1. The
        path-forced linear nudge (``path_nudge.py``) splits their disagreement: linear against path-forced is what
        the query gradient's movement along the unconverged free path costs, path-forced against full the kinks."""
        betas, precision = sorted(self.args.agreement_betas, reverse=True), self.args.agreement_precision
        kinds = {"linear": "contrastive-sym-linear", "path": PATH_FORCED, "full": "contrastive-sym"}
        jobs = {
            (name, steps, beta): {
                kind: Job(name, method, steps, (("beta", beta), ("precision", precision)))
                for kind, method in kinds.items()
            }
            for name in self.args.problems
            for steps in self.args.steps
            for beta in betas
        }
        self.measure([job for trio in jobs.values() for job in trio.values()], "agreement", once=True)
        for name in self.args.problems:
            print(f"\n### {name}: the linear and full nudges over beta (symmetric, same phases, {precision})\n")
            rows = []
            for steps in self.args.steps:
                smallest = jobs[name, steps, betas[-1]]
                for beta in betas:
                    grads = {kind: self.grads[job] for kind, job in jobs[name, steps, beta].items()}
                    rows.append(
                        [
                            steps,
                            beta,
                            cosine_cell(grads["linear"], grads["full"]),
                            cosine_cell(grads["linear"], grads["path"]),
                            cosine_cell(grads["path"], grads["full"]),
                            cosine_cell(grads["linear"], self.grads[smallest["linear"]]),
                            cosine_cell(grads["full"], self.grads[smallest["full"]]),
                            f"{norm(grads['linear']):.3g}",
                            f"{norm(grads['full']):.3g}",
                        ]
                    )
            header = ["T", "beta", "cosine linear to full", "linear to path-forced", "path-forced to full"]
            header += [f"linear: cosine to beta={betas[-1]}", f"full: cosine to beta={betas[-1]}", "|linear|", "|full|"]
            print(markdown(header, rows))

    def batched(self) -> None:
        where = torch.cuda.get_device_name(self.args.device) if self.args.device.startswith("cuda") else "the CPU"
        print(f"\n### Looped vs batched (torch.func.vmap over tasks) meta-steps, on {where}\n")
        rows = []
        for name in tqdm(self.args.problems, desc="batched"):
            steps = self.args.steps if not PROBLEMS[name].is_conv else [min(self.args.steps)]
            methods = [m for m in self.args.methods if not m.startswith("floor")]
            spec = {
                "kind": "batched",
                "problem": name,
                "data": self.data[f"{name}-batched"],
                "steps": steps,
                "methods": methods,
                "repeats": self.rounds(name),
                "min_seconds": self.args.min_seconds,
                "device": self.args.device,
            }
            for row in run_worker(spec, self.scratch)["rows"]:
                tasks = self.tasks(name, batched=True)
                rows.append(
                    [
                        name,
                        tasks,
                        row["method"],
                        row["steps"],
                        duration(row["looped"]),
                        duration(row["batched"]),
                        f"{row['looped'] / row['batched']:.2f}",
                        "batched" if row["auto"] else "looped",
                        f"{row['difference']:.1e}",
                    ]
                )
        header = [
            "problem",
            "tasks",
            "method",
            "T",
            "looped",
            "batched",
            "speed-up",
            "batched=None picks",
            "max difference / max entry",
        ]
        print(markdown(header, rows))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=["conv5", "conv20", "sinusoid"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 50, 100, 200], help="inner steps T")
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=["main", "profile", "knobs", "batched", "agreement"],
        default=["main", "profile", "knobs", "batched"],
        help="agreement (not run by default): the linear and full nudges over --agreement-betas at each --steps",
    )
    parser.add_argument("--agreement-betas", nargs="+", type=float, default=[0.03, 0.01, 0.003, 0.001])
    parser.add_argument("--agreement-precision", choices=["float32", "float64"], default="float64")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of fresh-process measurements (sinusoid)")
    parser.add_argument("--conv-repeats", type=int, default=1, help="rounds of fresh-process measurements (Conv4)")
    parser.add_argument(
        "--min-seconds", type=float, default=0.5, help="repeat a meta-step in its process until this long"
    )
    parser.add_argument("--conv-tasks", type=int, default=1, help="Conv4 meta-batch (the batched section uses >= 2)")
    parser.add_argument("--sinusoid-tasks", type=int, default=25, help="sinusoid meta-batch")
    parser.add_argument("--knobs-problem", choices=list(PROBLEMS), default="conv20")
    parser.add_argument("--knobs-steps", type=int, default=100)
    parser.add_argument("--omniglot", type=Path, default=Path(DEFAULT_OMNIGLOT), help="folder of the Omniglot zips")
    parser.add_argument("--device", default="cpu", help="where the batched section runs (e.g. cuda); others: CPU")
    parser.add_argument("--quick", action="store_true", help="conv5 and sinusoid, T=10, one round")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.problems, args.steps, args.repeats, args.conv_repeats = ["conv5", "sinusoid"], [10], 1, 1
        args.min_seconds = 0.2
        args.knobs_problem, args.knobs_steps = "conv5", 10
    if min(args.agreement_betas) <= 0:
        parser.error(f"--agreement-betas must all be > 0 (the nudge's strength); got {args.agreement_betas}")
    if "knobs" in args.sections and args.knobs_problem not in args.problems:
        parser.error(f"--knobs-problem {args.knobs_problem} must be one of --problems {args.problems}")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        Path(spec["out"]).write_text(json.dumps(WORKERS[spec["kind"]](spec)))
        return
    started = time.perf_counter()
    print(f"## Meta-step benchmark\n\n`python benchmarks/meta_step.py {' '.join(sys.argv[1:])}`\n")
    print(f"Machine: {machine()}. Every process: torch.set_num_threads(1).")
    print(
        f"Settings: T inner steps (contrastive: T free + T//2 nudged per phase), SGD lr {INNER_LR} momentum "
        f"{INNER_MOMENTUM}, ComplexSynapse init_lambda {INIT_LAMBDA} (learned, except for Reptile); meta-batch "
        f"{args.conv_tasks} task(s) for Conv4, {args.sinusoid_tasks} for sinusoid; Conv4 64 channels, "
        f"{QUERIES_PER_CLASS} queries per class; beta "
        + ", ".join(f"{name} {PROBLEMS[name].beta}" for name in args.problems)
        + f"; {args.conv_repeats} round(s) of fresh processes for Conv4 and {args.repeats} for sinusoid, each "
        f"repeating its meta-step for >= {args.min_seconds} s (time: median over all of them)."
    )
    with tempfile.TemporaryDirectory() as scratch:
        benchmark = Benchmark(args, Path(scratch))
        benchmark.prepare_data()
        for section in args.sections:
            {
                "main": benchmark.main_section,
                "profile": benchmark.profile,
                "knobs": benchmark.knobs,
                "batched": benchmark.batched,
                "agreement": benchmark.agreement,
            }[section]()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nTotal {(time.perf_counter() - started) / 60:.1f} min; load average at the end {load}.")


if __name__ == "__main__":
    main()
