"""``--report``: the results page, ``docs/results/reproduction.md`` (the run, each suite group's tables, standings
and figures, the variants and the gradient-quality study), the figures, and one merged JSON of every result."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import REPOSITORY, gradient_quality
from benchmarks.reproduce.cell import DIVERGED_LOSS_FACTOR, MAX_SKIPPED_FRACTION
from benchmarks.reproduce.figures import curve_figure, figure
from benchmarks.reproduce.suites import GRADIENT_QUALITY, GROUPS, RUN_INFO, SEED, SUITES
from benchmarks.reproduce.tables import (
    budget_lines,
    cell_label,
    curve_table,
    load_results,
    portable_command,
    portable_path,
    standings,
    suite_table,
)
from benchmarks.reproduce.variants import variants_section

SECTIONS = {
    "steps": (
        "Equal meta-steps",
        "Budgets (per suite, every estimator; `Reptile` uses the same Adam outer optimizer on its `theta - phi_T` "
        "meta-gradient):",
        "accuracy and MSE per estimator, failed cells left out",
        "Where each contrastive rule stands against every other estimator: ahead or behind when the 95% intervals do "
        "not overlap, level when they do; in brackets the difference in accuracy points (Omniglot) or MSE (sinusoid; "
        "positive: the contrastive rule is better).",
    ),
    "time": (
        "Equal training time",
        "Every estimator meta-trains for the same training time per cell, measured as the process's CPU time (one "
        "torch thread; evaluations excluded): the wall-clock it would take on a core of its own, which other work on "
        "the shared cores does not change. The meta-test metric is evaluated on the same fixed episodes at the start, "
        "at every fifth of the budget and at the end. Budgets:",
        "meta-test metric against meta-training time, per suite and learner",
        "Where each contrastive rule stands at the end of the budget (as above):",
    ),
    "long": (
        "Longer meta-training",
        "Learning curves on the fixed meta-test episodes, a point every 50 meta-steps. Budgets:",
        "meta-test metric against meta-steps, per suite and learner",
        None,
    ),
    "horizon": (
        "Solved phases at the authors' horizons (issue 26)",
        "The contrastive rule where its premise can hold: the contrastive and implicit estimates (and their test-time "
        "adaptation) run each phase until its gradient norm falls below a tolerance, capped; the trajectory "
        "estimators (MAML, and where listed first-order MAML and Reptile) run a short fixed loop, and MAML also a "
        "long one. Every cell meta-trains for the same CPU time, with a fixed pull on every weight (ComplexSynapse "
        "strengths not learned). The `inner steps used` column gives the mean over meta-steps of each phase's steps "
        "(in brackets the mean of the largest in each meta-batch) and the share of phases that ended at their cap "
        "unsolved. Budgets:",
        "meta-test metric against meta-training CPU time, per suite and learner",
        "Where each contrastive rule stands at the end of the budget (as above):",
    ),
}
"""Each suite group's section, in report order: its heading, the text before its budgets, its figure's caption, and
the text before its standings (``None``: none)."""

FINDINGS = REPOSITORY / "docs" / "reproduce" / "findings.md"
"""The hand-written findings that the results page links to."""


def group_figure(group: str, results: dict[str, list[dict[str, Any]]], figure_path: Path) -> Path:
    """A suite group's figure: the final metrics (``steps``, at ``figure_path``), or the learning curves against
    training time (``time``, ``<stem>_equal_time.png``; ``horizon``, ``<stem>_horizon.png``) or meta-steps (``long``,
    ``<stem>_curves.png``)."""
    if group == "steps":
        return figure(results, figure_path)
    suffix = {"time": "_equal_time", "long": "_curves"}.get(group, f"_{group}")
    by_time = SUITES[next(iter(results))].train_seconds is not None
    return curve_figure(results, figure_path.with_name(f"{figure_path.stem}{suffix}.png"), by_time=by_time)


def gradient_quality_section(out: Path) -> str:
    """The gradient-quality section: :func:`benchmarks.gradient_quality.report` of the stage's JSON, if it ran."""
    folder = out / GRADIENT_QUALITY
    found = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not found:
        return f"## Gradient quality\n\nNot run (no JSON under `{portable_path(folder)}`)."
    return gradient_quality.report(found[0])


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
    The page links to the hand-written findings (``docs/reproduce/findings.md``); ``findings``, another hand-written
    markdown file, is included after the run's description when it is given and exists; the
    cells under ``variants`` (other ``--out`` folders, run with ``--set`` overrides) get a table of their own.
    """
    results = load_results(out)
    by_group = {group: {n: rows for n, rows in results.items() if SUITES[n].group == group} for group in GROUPS}
    info = json.loads((out / RUN_INFO).read_text()) if (out / RUN_INFO).exists() else {}
    suites = {name: asdict(suite) for name, suite in SUITES.items()} | info.get("suites", {})
    host = info.get("machine", {})
    gradient_quality = bool(by_group["steps"]) or (out / GRADIENT_QUALITY).is_dir()  # other groups do not run it
    loads = [r["load_average"] for rows in results.values() for r in rows if r.get("load_average") is not None]

    def relative(path: Path) -> str:
        """``path`` as a link from the page (``../x.png`` from ``docs/results/``)."""
        return Path(os.path.relpath(path.resolve(), results_md.resolve().parent)).as_posix()

    def image(path: Path, text: str) -> str:
        return f"![{text}]({relative(path)})"

    groups_run = [group for group in SECTIONS if by_group[group]]
    # A page of one group (the horizon page) is titled by it; the main page, which holds several, by the whole.
    title = SECTIONS[groups_run[0]][0] if len(groups_run) == 1 else "learners x estimators under equal budgets"
    lines = [
        f"# Reproduction: {title[0].lower()}{title[1:]}",
        "",
        "Generated by `python -m benchmarks.reproduce --report` from the per-cell JSON files of the run below "
        f"(the merged JSON: `{portable_path(merged_json)}`).",
        "Every cell is configured by `configs/reproduce/<suite>/<learner>__<estimator>.yaml`"
        + (", shrunk by `--smoke` (not a result)." if info.get("smoke") else "."),
        "",
        "- command(s): "
        + "; ".join(
            f"`{portable_command(command)}`" + (f" (launched {count} times: resumed)" if count > 1 else "")
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
    lines += [
        "",
        f"What these tables show, and why: [Findings]({relative(FINDINGS)})."
        + (" The gradient-quality tables of the same run are at the end." if gradient_quality else "")
        + " Omniglot cells read the images from `--data.root` or "
        "`$LIGHTNING_CONTRASTIVE_OMNIGLOT_ROOT`; `--out` is any folder of your choice.",
    ]
    if findings is not None and findings.exists():
        lines += ["", findings.read_text().strip()]

    def section(group: str, heading: str, intro: str, picture: str, standing: str | None) -> list[str]:
        """One suite group's section: its budgets and figure, where the contrastive rules stand (``standing``
        introduces them), and a table per suite, after the suite's learning curves in the ``long`` group."""
        results_of = by_group[group]
        text = ["", f"## {heading}", "", intro, "", *budget_lines(suites, results_of), "", picture]
        text += ["", standing, *standings(results_of)] if standing is not None else []
        for name, rows in results_of.items():
            curves = ["", curve_table(rows, ["learner", "estimator"], cell_label)] if group == "long" else []
            text += ["", f"### {SUITES[name].title}", *curves, "", suite_table(SUITES[name], rows)]
        return text

    for group, (heading, intro, caption, standing) in SECTIONS.items():
        if by_group[group]:
            picture = image(group_figure(group, by_group[group], figure_path), caption)
            lines += section(group, heading, intro, picture, standing)
    variant_results: list[dict[str, Any]] = []
    if variants:
        table, variant_results = variants_section(variants)
        lines += ["", table]
    if gradient_quality:
        lines += ["", gradient_quality_section(out)]
    lines += [""]
    text = "\n".join(lines)
    results_md.write_text(text)
    merged_json.parent.mkdir(parents=True, exist_ok=True)
    # The commands as they run from the repository root, naming no machine's folders (as on the page).
    info = {**info, "commands": [portable_command(command) for command in info.get("commands", [])]}
    merged = {"run": info, "results": results, "variants": variant_results}
    merged_json.write_text(json.dumps(merged, indent=2, allow_nan=True))
    return text
