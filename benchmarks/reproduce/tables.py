"""The report's tables: the per-cell JSONs read back and judged again, each suite's table, the standings of the
contrastive rules against every other estimator, learning curves as tables, and the budget of each suite."""

from __future__ import annotations

import json
import math
import os
import shlex
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import REPOSITORY
from benchmarks.reproduce.cell import judge
from benchmarks.reproduce.suites import (
    DEFAULT_CONTRASTIVE,
    EQUAL_TIME_ESTIMATORS,
    ESTIMATORS,
    LEARNERS,
    SUITES,
    Cell,
    Suite,
    all_cells,
)


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


OTHERS = (*EQUAL_TIME_ESTIMATORS, "contrastive_one_sided", "maml_long", "reptile")
"""The estimators a contrastive rule is compared with in the standing tables (less itself, and those not run): the
equal-time group's, the one-sided rule, and the horizon group's MAML at long horizons and Reptile (its pull is fixed
there)."""


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
    phases = suite.tolerance is not None  # a column for the inner steps the phases used
    rows = [
        f"| learner | estimator | {metric} ± 95% CI | best point @ meta-step | meta-steps | s / meta-step | "
        "peak process RSS (MiB) | " + ("inner steps used | " if phases else "") + "status |",
        "|---|---|---|---|---|---|---|" + ("---|" if phases else "") + "---|",
    ]
    for result in results:
        step, rss = result.get("seconds_per_meta_step"), result.get("peak_rss_mib")
        step_text = "" if step is None else f"{step:.3f}"
        rss_text = "" if rss is None or result["status"] == "n/a" else f"{rss:.0f}"
        steps_text = str(result["meta_steps"]) if result.get("meta_steps") else ""
        rows.append(
            f"| {LEARNERS[result['learner']]} | {ESTIMATORS[result['estimator']]} | {metric_cell(result, suite)} | "
            f"{best_point(result, suite)} | {steps_text} | {step_text} | {rss_text} | "
            + (f"{phase_text(result.get('phases', {}))} | " if phases else "")
            + f"{status_cell(result)} |"
        )
    return "\n".join(rows)


def phase_text(phases: dict[str, float]) -> str:
    """The inner steps each phase used (mean over meta-steps; in brackets the mean of each meta-batch's largest), the
    share of phases that reached their cap unsolved, from a cell's ``phases`` record (a fixed-step estimator: its
    steps)."""
    names = [name.removesuffix("_steps") for name in phases if name.endswith("_steps")]
    parts = [f"{name} {phases[name + '_steps']:.0f} ({phases[name + '_steps_max']:.0f})" for name in names]
    if "unsolved" in phases:
        parts.append(f"unsolved {100 * phases['unsolved']:.0f}%")
    return "; ".join(parts)


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
        if suite.get("tolerance") is not None:
            lines.append(horizon_budget_line(name, suite, network, split, budget))
            continue
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


TRAJECTORY_ESTIMATORS = ("maml", "fomaml", "reptile")
"""The horizon group's short fixed-loop estimators."""


def horizon_budget_line(name: str, suite: dict[str, Any], network: str, split: str, budget: str) -> str:
    """:func:`budget_lines`' line for a suite whose solving estimators stop their phases on a tolerance."""
    activation = " (tanh units)" if suite["data"] == "sinusoid" and suite.get("smooth") else ""
    short_lr = suite.get("short_lr") or suite["inner_lr"]
    short = [ESTIMATORS[name] for name in TRAJECTORY_ESTIMATORS if name in suite["estimators"]]
    return (
        f"- `{name}`: {network}{activation}{split}; {suite['shots']} shot(s), {suite['test_shots']} queries"
        f"{' per class' if suite['data'] == 'omniglot' else ''}; {budget}; contrastive, implicit and every "
        f"test-time adaptation of theirs: each phase until its gradient norm is <= {suite['tolerance']:g}, at most "
        f"{suite['inner_steps']} free and {suite['nudged_steps']} nudged steps (both nudges), beta {suite['beta']}, "
        f"inner SGD lr {suite['inner_lr']}; {', '.join(short)}: {suite['short_steps']} steps at lr {short_lr}; "
        f"MAML at {suite['long_maml_steps']} steps at lr {suite['inner_lr']}; momentum {suite['inner_momentum']} "
        f"throughout; Adam lr {suite['outer_lr']}; "
        f"{suite['eval_tasks']} fixed meta-test episodes; fixed pull: ComplexSynapse lambda {suite['init_lambda']} "
        f"(not learned), DualSystem pull {suite['pull']}"
        + (f"; Implicit's CG damping {suite['cg_damping']:g}." if suite.get("cg_damping") else ".")
    )


def portable_path(path: Path | str) -> str:
    """``path`` as the report shows it: relative to the repository (``../runs/x`` for a folder beside it), so that
    the report names no machine's folders."""
    return os.path.relpath(path, REPOSITORY) if Path(path).is_absolute() else str(path)


def portable_command(command: str) -> str:
    """A recorded command as it runs today from the repository root: every absolute path in it (a word, or the value
    of a ``--key=value`` word) by :func:`portable_path`, and the script form that runs recorded before the
    reproduction became a package (``python benchmarks/reproduce.py``) as ``python -m benchmarks.reproduce``."""
    words = shlex.split(command)
    if len(words) > 1 and words[0].startswith("python") and words[1] == "benchmarks/reproduce.py":
        words[:2] = ["python", "-m", "benchmarks.reproduce"]
    shown = []
    for word in words:
        key, equals, value = word.rpartition("=") if word.startswith("--") else ("", "", word)
        shown.append(key + equals + (portable_path(value) if value.startswith("/") else value))
    return shlex.join(shown)
