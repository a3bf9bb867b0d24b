"""What the checkpoint diagnostics (``estimate_drift``, ``adaptation_horizon``) share: a run's CLI config and
checkpoints on the command line, each checkpoint loaded into the run's module in turn, and a markdown table.

A helper, not a diagnostic: it answers no question of its own, and costs what building the run's module and loading
each checkpoint cost (seconds)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from lightning_contrastive.cli import MetaLearningCLI


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--checkpoints`` and ``--set``: which run to read, and overrides of its config."""
    parser.add_argument("--config", type=Path, required=True, help="the run's CLI config (learner, estimator, data)")
    parser.add_argument("--checkpoints", type=Path, nargs="+", required=True, help="the run's checkpoints")
    parser.add_argument("--set", action="append", default=[], metavar="--KEY=VALUE", help="a CLI override")


def load_run(args: argparse.Namespace) -> MetaLearningCLI:
    """The run's module and data module, built from its config on one thread and with a fixed seed."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return MetaLearningCLI(args=[f"--config={args.config}", *args.set], run=False, save_config_callback=None)


def each_checkpoint(cli: MetaLearningCLI, paths: Sequence[Path]) -> Iterator[int]:
    """Load each checkpoint's weights into ``cli.model`` in turn; yields its meta-step."""
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=False)
        cli.model.load_state_dict(state["state_dict"])
        yield state["global_step"]


def print_table(rows: list[Mapping[str, float | int]]) -> None:
    """``rows`` (one per checkpoint, keyed by column, with a ``meta-step``) as a markdown table in step order."""
    rows = sorted(rows, key=lambda row: row["meta-step"])
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
