"""What each fresh process of the meta-step benchmark measures: a method's meta-step (time, peak memory, meta-gradient),
the cost of a contrastive meta-step's inner steps, and looped against batched meta-steps."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks import REPOSITORY
from benchmarks.meta_step.problems import (
    INNER_LR,
    INNER_MOMENTUM,
    PROBLEMS,
    Grads,
    build_learner,
    make_estimator,
    make_meta_step,
)
from lightning_contrastive.estimation import choose_batched, meta_gradient
from lightning_contrastive.inner import InnerSGD, minimise
from lightning_contrastive.tasks import Params, Split, split_batch


def peak_rss_mib() -> float:
    """This process's peak resident set size (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


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


def run_worker(spec: dict, scratch: Path) -> dict:
    """Run one measurement in a fresh single-threaded Python process and return what it reports."""
    spec_path = Path(tempfile.mkstemp(suffix=".json", dir=scratch)[1])
    spec_path.write_text(json.dumps({**spec, "out": str(spec_path.with_suffix(".out.json"))}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "benchmarks.meta_step", "--worker", str(spec_path)]
    done = subprocess.run(command, env=env, cwd=REPOSITORY, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"worker {spec} failed:\n{done.stderr[-4000:]}")
    return json.loads(spec_path.with_suffix(".out.json").read_text())
