"""benchmarks/reproduce.py end to end at its smoke budget: cells in subprocesses, n/a, failure, resume, report."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
SCRIPT = REPOSITORY / "benchmarks" / "reproduce.py"


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["reproduce"]


def test_committed_configs_are_the_generated_ones(reproduce) -> None:
    """configs/reproduce/ is what --write-configs writes from SUITES: a cell rerun by hand is the cell of the table."""
    cells = reproduce.all_cells()
    assert len(cells) == 4 * (2 * 7 + 1)  # suites x (learners x 7 cells + Reptile with fixed strengths)
    for cell in cells:
        assert cell.config.read_text() == reproduce.config_text(cell), f"rerun --write-configs ({cell.config})"


def test_smoke_reproduction_records_runs_refusals_failures_resumes_and_reports(reproduce, tmp_path, capsys) -> None:
    out = tmp_path / "results"
    common = ["--smoke", "--out", str(out), "--only", "sinusoid_5shot", "--workers", "2"]
    reproduce.main(
        [*common, "--learners", "complex_synapse", "--estimators", "contrastive_symmetric,reptile,untrained"]
    )
    # A forced failure: an invalid data setting makes the cell's process raise; the reproduction goes on.
    reproduce.main([*common, "--learners", "dual_system", "--estimators", "maml", "--set=--data.shots=0"])
    done = sorted(path.name for path in (out / "sinusoid_5shot").glob("*.json"))
    assert done == [
        "complex_synapse__contrastive_symmetric.json",
        "complex_synapse__reptile.json",
        "complex_synapse__untrained.json",
        "dual_system__maml.json",
    ]
    trained = out / "sinusoid_5shot" / "complex_synapse__contrastive_symmetric.json"
    before = trained.stat().st_mtime_ns
    capsys.readouterr()
    reproduce.main(
        [*common, "--learners", "complex_synapse", "--estimators", "contrastive_symmetric,reptile,untrained"]
    )
    assert "3 of 3 cells already done" in capsys.readouterr().out
    assert trained.stat().st_mtime_ns == before  # resumed: nothing rerun

    # A variant: one cell again with an override, in a folder of its own, reported in a table of its own.
    variant = tmp_path / "variant"
    variant_common = ["--smoke", "--out", str(variant), "--only", "sinusoid_5shot", "--learners", "complex_synapse"]
    reproduce.main([*variant_common, "--estimators", "untrained", "--set=--data.test_shots=3"])

    results_md, figure = tmp_path / "RESULTS.md", tmp_path / "docs" / "accuracy.png"
    merged = tmp_path / "docs" / "results.json"
    outputs = ["--results-md", str(results_md), "--figure", str(figure), "--merged-json", str(merged)]
    findings = tmp_path / "findings.md"
    findings.write_text("## Findings\n\nHand-written.")
    reproduce.main(["--report", "--out", str(out), *outputs, "--findings", str(findings), "--variants", str(variant)])
    text = results_md.read_text()
    assert "## Findings\n\nHand-written." in text
    (variant_row,) = [line for line in text.splitlines() if "`--data.test_shots=3`" in line]
    assert variant_row.startswith("| Sinusoid regression, 5 shots | ComplexSynapse | untrained start |")
    assert re.search(r"\| \d+\.\d+ ± \d+\.\d+ \|", variant_row)
    assert figure.stat().st_size > 0 and merged.stat().st_size > 0
    rows = {
        tuple(cells[:2]): cells[2:]
        for line in text.splitlines()
        if line.startswith("| ComplexSynapse") or line.startswith("| DualSystem")
        for cells in [[cell.strip() for cell in line.strip("|").split(" | ")]]
    }
    assert list(rows) == [
        ("ComplexSynapse", "untrained start"),
        ("ComplexSynapse", "Contrastive symmetric"),
        ("ComplexSynapse", "Reptile"),
        ("DualSystem", "MAML"),
    ]
    for key in [("ComplexSynapse", "untrained start"), ("ComplexSynapse", "Contrastive symmetric")]:
        metric, _, rss, status = rows[key]
        mean, ci = (float(value) for value in re.fullmatch(r"(\S+) ± (\S+)", metric).groups())
        assert mean > 0 and ci > 0 and float(rss) > 100 and status.startswith("ok")
    assert float(rows[("ComplexSynapse", "Contrastive symmetric")][1]) > 0  # seconds per meta-step
    assert rows[("ComplexSynapse", "untrained start")][1] == ""  # no meta-step was taken
    refusal = rows[("ComplexSynapse", "Reptile")][3]
    assert (
        refusal.startswith("n/a: Reptile is defined only") and "lambda." in refusal and "learn_lambda=False" in refusal
    )
    assert rows[("DualSystem", "MAML")][3].startswith("failed: ValueError")
    failure = json.loads((out / "sinusoid_5shot" / "dual_system__maml.json").read_text())
    assert failure["status"] == "failed" and "shots" in failure["reason"]
    assert "Sinusoid regression, 5 shots" in text and "--smoke" in text and "torch" in text
    assert "## Gradient quality" in text


def test_standing_calls_ahead_behind_and_level_by_the_confidence_intervals(reproduce) -> None:
    def cell(estimator: str, mean: float, ci: float, skipped: float = 0.0) -> dict:
        metrics = {"accuracy": mean, "accuracy_ci95": ci, "query_loss": mean, "query_loss_ci95": ci}
        return {
            "learner": "complex_synapse",
            "estimator": estimator,
            "status": "ok",
            "metrics": metrics,
            "skipped_tasks": skipped,
        }

    omniglot = [
        cell("contrastive_symmetric", 0.80, 0.01),
        cell("maml", 0.83, 0.01),  # 3 points higher, intervals apart: behind
        cell("implicit", 0.815, 0.01),  # intervals overlap: level
        cell("fomaml", 0.70, 0.01),
        cell("contrastive_one_sided", 0.05, 0.01, skipped=4),
    ]
    sinusoid = [cell("contrastive_symmetric", 1.0, 0.1), cell("maml", 2.0, 0.1)]  # lower MSE is better
    table = reproduce.standing_table({"omniglot_5way": omniglot, "sinusoid_5shot": sinusoid})
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[2:] for line in table.splitlines()[2:]}
    maml, implicit, fomaml, reptile, one_sided = (entry.strip(" |") for entry in rows["Omniglot 5-way 1-shot"])
    assert (maml, implicit, fomaml, reptile) == ("behind (-3.0)", "level (-1.5)", "ahead (+10.0)", "n/a")
    assert one_sided == "it diverged (4 tasks skipped)"
    assert rows["Sinusoid regression, 5 shots"][0] == "ahead (+1.000)"
