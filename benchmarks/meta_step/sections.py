"""The meta-step benchmark's sections: the schedule of fresh-process measurements, and the tables printed from them."""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks import cpu_model
from benchmarks.meta_step.problems import (
    CONTRASTIVE_METHODS,
    PATH_FORCED,
    PROBLEMS,
    QUERIES_PER_CLASS,
    Grads,
    make_batch,
)
from benchmarks.meta_step.workers import run_worker


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
    """CPU model, cores and load average of this machine, and the torch and Python versions, on one line."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    return f"{cpu_model()}, {os.cpu_count()} cores, load average {load}; {versions}"


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
        path-forced linear nudge (``benchmarks.diagnostics.path_nudge``) splits their disagreement: linear against
        path-forced is what the query gradient's movement along the unconverged free path costs, path-forced
        against full the kinks."""
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
