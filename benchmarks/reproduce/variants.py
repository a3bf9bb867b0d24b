"""Variants: cells run again with ``--set`` overrides, each run in a folder of its own, tabulated by
``--report --variants FOLDER...`` with their overrides, best curve point and the command that ran them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.reproduce.suites import ESTIMATORS, LEARNERS, RUN_INFO, SUITES
from benchmarks.reproduce.tables import (
    best_point,
    cell_label,
    curve_table,
    load_results,
    metric_cell,
    portable_command,
    status_cell,
)


def changed_settings(result: dict[str, Any]) -> list[str]:
    """A variant's overrides beyond its suite's config (the data root, set on every Omniglot cell, left out)."""
    return [o for o in result.get("overrides", []) if not o.startswith("--data.root=")]


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
                f"{'' if step is None else f'{step:.3f}'} | {status_cell(result)} | `{portable_command(command)}` |"
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
