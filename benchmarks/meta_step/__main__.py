"""``python -m benchmarks.meta_step``: the command line of the meta-step benchmark (see the package's text)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import benchmarks.meta_step
from benchmarks import omniglot_root
from benchmarks.meta_step.problems import INIT_LAMBDA, INNER_LR, INNER_MOMENTUM, METHODS, PROBLEMS, QUERIES_PER_CLASS
from benchmarks.meta_step.sections import Benchmark, machine
from benchmarks.meta_step.workers import WORKERS


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.meta_step",
        description=benchmarks.meta_step.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    parser.add_argument(
        "--omniglot", type=Path, default=omniglot_root(), help="folder of the Omniglot zips (default: %(default)s)"
    )
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
    print(f"## Meta-step benchmark\n\n`python -m benchmarks.meta_step {' '.join(sys.argv[1:])}`\n")
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
