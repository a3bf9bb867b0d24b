"""``python -m benchmarks.reproduce``: the command line of the reproduction (see the package's text)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import benchmarks.reproduce
from benchmarks import REPOSITORY
from benchmarks.reproduce.cell import run_cell
from benchmarks.reproduce.configs import write_configs
from benchmarks.reproduce.estimates import Measurements
from benchmarks.reproduce.pool import reproduce
from benchmarks.reproduce.report import report
from benchmarks.reproduce.suites import (
    CONFIGS,
    DEFAULT_OUT,
    ESTIMATORS,
    GRADIENT_QUALITY,
    GROUPS,
    LEARNERS,
    SMOKE,
    SUITES,
    Cell,
    select,
)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.reproduce",
        description=benchmarks.reproduce.__doc__.split("\n\n")[0],
    )
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
    parser.add_argument(
        "--report", action="store_true", help="render the results page, the figures and the merged JSON only"
    )
    parser.add_argument(
        "--results-md", type=Path, default=REPOSITORY / "docs" / "results" / "reproduction.md", help="the results page"
    )
    parser.add_argument("--figure", type=Path, default=REPOSITORY / "docs" / "reproduce_accuracy.png")
    parser.add_argument("--merged-json", type=Path, default=REPOSITORY / "docs" / "reproduce" / "results.json")
    parser.add_argument(
        "--findings",
        type=Path,
        default=None,
        help="hand-written notes to include in the page (the findings are linked)",
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
        measurements = Measurements.read([args.out, args.merged_json])
        if not args.smoke:
            print(measurements.describe(cells, args.workers, gradient_quality), flush=True)
        command = shlex.join(["python", "-m", "benchmarks.reproduce", *(sys.argv[1:] if argv is None else argv)])
        start = time.perf_counter()
        reproduce(
            cells,
            args.out,
            args.workers,
            args.smoke,
            args.set,
            gradient_quality,
            args.keep_checkpoints,
            command,
            measurements,
        )
        minutes = (time.perf_counter() - start) / 60
        print(f"Done in {minutes:.1f} min. Render: python -m benchmarks.reproduce --report --out {args.out}")


if __name__ == "__main__":
    main()
