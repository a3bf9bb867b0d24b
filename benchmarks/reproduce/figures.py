"""The report's figures: each suite's final metric per learner and estimator, and the learning curves (against
meta-steps, or against training CPU time in the equal-time group)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.reproduce.suites import ESTIMATORS, LEARNERS, SUITES


def figure(results: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Each suite's metric with its 95% CI per learner and estimator (points with error bars), failed cells out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4.2 * max(len(names), 1), 4.2), squeeze=False)
    for axis, name in zip(axes[0], names, strict=False):
        suite = SUITES[name]
        order = list(suite.estimator_names)
        scale = 100.0 if suite.metric == "accuracy" else 1.0
        for offset, (learner, color) in enumerate(zip(LEARNERS, ("tab:blue", "tab:orange"), strict=True)):
            rows = [r for r in results[name] if r["learner"] == learner and r["status"] == "ok"]
            positions = [order.index(r["estimator"]) + 0.15 * (2 * offset - 1) for r in rows]
            axis.errorbar(
                positions,
                [scale * r["metrics"][suite.metric] for r in rows],
                yerr=[scale * r["metrics"][suite.metric + "_ci95"] for r in rows],
                fmt="o",
                color=color,
                capsize=3,
                label=LEARNERS[learner],
            )
        axis.set_xticks(range(len(order)), [ESTIMATORS[e] for e in order], rotation=60, ha="right", fontsize=8)
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
    palette = plt.get_cmap("tab10").colors
    colors = {name: palette[i % len(palette)] for i, name in enumerate(ESTIMATORS)}
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
