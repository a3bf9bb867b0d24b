"""``python -m benchmarks.reproduce`` end to end at its smoke budget: cells in subprocesses, learning curves, equal
time, n/a, failure, resume (between cells and inside one), the failure rule, the time estimates from measured
results, and the report."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
suites = importlib.import_module("benchmarks.reproduce.suites")
configs = importlib.import_module("benchmarks.reproduce.configs")
running = importlib.import_module("benchmarks.reproduce.cell")
pool = importlib.import_module("benchmarks.reproduce.pool")
estimates = importlib.import_module("benchmarks.reproduce.estimates")
tables = importlib.import_module("benchmarks.reproduce.tables")
cli = importlib.import_module("benchmarks.reproduce.__main__")
RUN_CELL = [sys.executable, "-m", "benchmarks.reproduce", "--run-cell"]


def table_rows(text: str, suite_title: str) -> dict[tuple[str, str], list[str]]:
    """The rows of the suite table under ``### suite_title``: (learner, estimator) -> the other cells."""
    section = text.split(f"### {suite_title}\n", 1)[1].strip().split("\n\n", 1)[0]
    return {
        tuple(cells[:2]): cells[2:]
        for line in section.splitlines()[2:]
        for cells in [[cell.strip() for cell in line.strip("|").split(" | ")]]
    }


def test_committed_configs_are_the_generated_ones() -> None:
    """configs/reproduce/ is what --write-configs writes from SUITES: a cell rerun by hand is the cell of the table."""
    cells = suites.all_cells()
    # steps: 5 suites x (2 learners x 8 cells + Reptile with fixed strengths); time: 5 x (6 + 5); long: 2 x 2 x 4;
    # horizon: 2 sinusoid suites x 2 learners x 8, 2 Omniglot ones x 2 x 6.
    assert len(cells) == 5 * (2 * 8 + 1) + 5 * (6 + 5) + 2 * 2 * 4 + 2 * 2 * 8 + 2 * 2 * 6
    for cell in cells:
        assert cell.config.read_text() == configs.config_text(cell), f"rerun --write-configs ({cell.config})"
    linear = configs.cell_config(suites.Cell("omniglot_20way_equal_time", "dual_system", "contrastive_linear"))
    arguments = linear["model"]["estimator"]["init_args"]
    assert arguments["nudge"] == "linear" and arguments["nudged_steps"] == arguments["inner_steps"] == 10
    (curve,) = linear["trainer"]["callbacks"]
    assert curve["init_args"] == {
        "every_n_steps": None,
        "every_seconds": 48.0,
        "max_train_seconds": 240.0,
        "clock": "cpu",
    }
    long = configs.cell_config(suites.Cell("omniglot_20way_alphabet_long", "complex_synapse", "maml"))
    assert long["trainer"]["max_steps"] == 600 and long["trainer"]["callbacks"][0]["init_args"]["every_n_steps"] == 50
    assert long["data"]["init_args"]["split_by"] == "alphabet" and long["data"]["init_args"]["num_train_tasks"] == 1200


def test_horizon_cells_solve_to_a_tolerance_against_fixed_step_trajectories() -> None:
    """The horizon group: the solving estimators stop on the tolerance with the authors' caps, the trajectory ones
    run their short loop at their own rate, MAML also at the long horizon; the pull is fixed on every learner."""

    def estimator(suite: str, learner: str, name: str) -> dict:
        return configs.cell_config(suites.Cell(suite, learner, name))["model"]["estimator"]["init_args"]

    omniglot = suites.SUITES["omniglot_20way_horizon"]
    for name in ("contrastive_linear", "contrastive_symmetric", "untrained"):
        arguments = estimator(omniglot.name, "complex_synapse", name)
        assert (arguments["inner_steps"], arguments["nudged_steps"]) == (200, 100)
        assert arguments["tolerance"] == omniglot.tolerance and arguments["beta"] == 0.03
        assert arguments["inner_lr"] == 0.01 and arguments["inner_momentum"] == 0.9
    implicit = estimator(omniglot.name, "dual_system", "implicit")
    assert implicit["inner_steps"] == 200 and implicit["tolerance"] == omniglot.tolerance
    for name in ("maml", "fomaml", "reptile"):
        assert estimator("sinusoid_5shot_horizon", "dual_system", name) == {"inner_steps": 10, "inner_lr": 0.01,
                                                                 "inner_momentum": 0.9}  # fmt: skip
    assert estimator(omniglot.name, "dual_system", "maml") == {"inner_steps": 10, "inner_lr": 0.05,
                                                               "inner_momentum": 0.9}  # fmt: skip
    assert estimator(omniglot.name, "dual_system", "maml_long") == {"inner_steps": 200, "inner_lr": 0.01,
                                                                    "inner_momentum": 0.9}  # fmt: skip
    synapse = configs.cell_config(suites.Cell(omniglot.name, "complex_synapse", "maml"))["model"]["learner"]
    assert synapse["init_args"]["learn_lambda"] is False and synapse["init_args"]["init_lambda"] == 0.5
    assert "cg_damping" not in estimator("sinusoid_5shot_horizon", "complex_synapse", "implicit")  # smooth: undamped
    sinusoid = configs.cell_config(suites.Cell("sinusoid_10shot_horizon", "dual_system", "contrastive_linear"))
    assert sinusoid["model"]["learner"]["init_args"]["primary"]["init_args"]["smooth"] is True
    assert sinusoid["data"]["init_args"]["shots"] == 10
    # MAML at the long horizon exists in this group only; elsewhere every estimator runs the suite's steps.
    assert {cell.suite for cell in suites.all_cells() if cell.estimator == "maml_long"} == {
        suite.name for suite in suites.HORIZON
    }
    assert suites.select("horizon", None, None) == [c for c in suites.all_cells() if c.suite in
                                                   {s.name for s in suites.HORIZON}]  # fmt: skip


def test_smoke_horizon_records_the_inner_steps_used_and_reports_them(tmp_path) -> None:
    out = tmp_path / "results"
    cli.main(["--smoke", "--out", str(out), "--only", "sinusoid_5shot_horizon", "--learners", "complex_synapse",
              "--estimators", "contrastive_linear,maml_long"])  # fmt: skip
    result = json.loads((out / "sinusoid_5shot_horizon" / "complex_synapse__contrastive_linear.json").read_text())
    phases = result["phases"]
    assert set(phases) >= {"free_steps", "free_steps_max", "nudged_pos_steps", "free_residual", "unsolved"}
    assert 1 <= phases["free_steps"] <= phases["free_steps_max"] <= suites.SMOKE["inner_steps"]
    assert 0 <= phases["unsolved"] <= 1
    # A fixed-step estimator reports the steps it ran, and nothing about being solved.
    fixed = json.loads((out / "sinusoid_5shot_horizon" / "complex_synapse__maml_long.json").read_text())["phases"]
    assert fixed["free_steps"] == fixed["free_steps_max"] == suites.SMOKE["inner_steps"] and "unsolved" not in fixed
    results_md = tmp_path / "horizon.md"
    cli.main(["--report", "--out", str(out), "--results-md", str(results_md), "--figure",
              str(tmp_path / "horizon.png"), "--merged-json", str(tmp_path / "horizon.json")])  # fmt: skip
    text = results_md.read_text()
    assert "## Solved phases at the authors' horizons (issue 26)" in text and "## Gradient quality" not in text
    assert text.startswith("# Reproduction: solved phases at the authors' horizons")  # a one-group page is titled by it
    assert (tmp_path / "horizon_horizon.png").exists()
    row = table_rows(text, suites.SUITES["sinusoid_5shot_horizon"].title)
    used = row[("ComplexSynapse", "Contrastive symmetric, linear nudge")][-2]
    assert used.startswith(f"free {phases['free_steps']:.0f} ({phases['free_steps_max']:.0f})")
    assert used.endswith(f"unsolved {100 * phases['unsolved']:.0f}%")


def test_smoke_reproduction_records_runs_refusals_failures_resumes_and_reports(tmp_path, capsys) -> None:
    out = tmp_path / "results"
    common = ["--smoke", "--out", str(out), "--workers", "2"]
    steps = [*common, "--only", "sinusoid_5shot", "--learners", "complex_synapse"]
    cli.main([*steps, "--estimators", "contrastive_symmetric,reptile,untrained"])
    # A forced failure: an invalid data setting makes the cell's process raise; the reproduction goes on.
    cli.main(
        [
            *common,
            "--only",
            "sinusoid_5shot",
            "--learners",
            "dual_system",
            "--estimators",
            "maml",
            "--set=--data.shots=0",
        ]
    )
    # Equal time: MAML and the linear nudge for the same (smoke) budget of CPU time.
    cli.main([*common, "--only", "sinusoid_5shot_equal_time", "--learners", "complex_synapse", "--estimators",
                    "maml,contrastive_linear"])  # fmt: skip
    done = sorted(str(path.relative_to(out)) for path in out.glob("*/*.json"))
    assert done == [
        "sinusoid_5shot/complex_synapse__contrastive_symmetric.json",
        "sinusoid_5shot/complex_synapse__reptile.json",
        "sinusoid_5shot/complex_synapse__untrained.json",
        "sinusoid_5shot/dual_system__maml.json",
        "sinusoid_5shot_equal_time/complex_synapse__contrastive_linear.json",
        "sinusoid_5shot_equal_time/complex_synapse__maml.json",
    ]
    assert not list(out.glob("*/*.ckpt"))  # each finished cell deleted its resume checkpoint
    trained = out / "sinusoid_5shot" / "complex_synapse__contrastive_symmetric.json"
    before = trained.stat().st_mtime_ns
    capsys.readouterr()
    cli.main([*steps, "--estimators", "contrastive_symmetric,reptile,untrained"])
    assert "3 of 3 cells already done" in capsys.readouterr().out
    assert trained.stat().st_mtime_ns == before  # resumed: nothing rerun

    # The learning curve: the untrained start, then every meta-step at the smoke budget; the last point is the result.
    cell = json.loads(trained.read_text())
    untrained = json.loads((out / "sinusoid_5shot" / "complex_synapse__untrained.json").read_text())
    assert [point["meta_step"] for point in cell["curve"]] == [0, 1, 2, 3] and cell["meta_steps"] == 3
    assert cell["curve"][0]["metrics"] == pytest.approx(untrained["metrics"], rel=1e-5)  # the same start
    assert cell["curve"][-1]["metrics"] == cell["metrics"]
    assert all(point["episodes"] == suites.SMOKE["eval_tasks"] for point in cell["curve"])
    budget = suites.SMOKE["train_seconds"]
    for name in ("maml", "contrastive_linear"):
        timed = json.loads((out / "sinusoid_5shot_equal_time" / f"complex_synapse__{name}.json").read_text())
        seconds = [point["train_cpu_seconds"] for point in timed["curve"]]
        assert seconds == sorted(seconds) and seconds[0] < budget / 2
        # Stopped by the budget (checked after each meta-step), or by the smoke cap of 10 x 3 meta-steps.
        assert seconds[-1] >= budget or timed["meta_steps"] == 10 * suites.SMOKE["meta_steps"]
        assert timed["status"] == "ok" and timed["train_cpu_seconds"] == seconds[-1]

    # A variant: one cell again with an override, in a folder of its own, reported in a table of its own.
    variant = tmp_path / "variant"
    variant_common = ["--smoke", "--out", str(variant), "--only", "sinusoid_5shot", "--learners", "complex_synapse"]
    cli.main([*variant_common, "--estimators", "contrastive_symmetric", "--set=--data.test_shots=3"])

    results_md, figure = tmp_path / "RESULTS.md", tmp_path / "docs" / "accuracy.png"
    merged = tmp_path / "docs" / "results.json"
    outputs = ["--results-md", str(results_md), "--figure", str(figure), "--merged-json", str(merged)]
    findings = tmp_path / "findings.md"
    findings.write_text("## Findings\n\nHand-written.")
    cli.main(["--report", "--out", str(out), *outputs, "--findings", str(findings), "--variants", str(variant)])
    text = results_md.read_text()
    assert "## Findings\n\nHand-written." in text
    (variant_row,) = [line for line in text.splitlines() if "`--data.test_shots=3`" in line]
    assert variant_row.startswith(
        "| Sinusoid regression, 5 shots | ComplexSynapse | Contrastive symmetric, full nudge |"
    )
    assert re.search(r"\| \d+\.\d+ ± \d+\.\d+ \| \d+\.\d+ ± \d+\.\d+ @ [123] \|", variant_row)  # final, best point
    assert figure.stat().st_size > 0 and merged.stat().st_size > 0
    assert (tmp_path / "docs" / "accuracy_equal_time.png").stat().st_size > 0
    rows = table_rows(text, "Sinusoid regression, 5 shots")
    assert list(rows) == [
        ("ComplexSynapse", "untrained start"),
        ("ComplexSynapse", "Contrastive symmetric, full nudge"),
        ("ComplexSynapse", "Reptile"),
        ("DualSystem", "MAML"),
    ]
    for key in [("ComplexSynapse", "untrained start"), ("ComplexSynapse", "Contrastive symmetric, full nudge")]:
        metric, _, _, _, rss, status = rows[key]
        mean, ci = (float(value) for value in re.fullmatch(r"(\S+) ± (\S+)", metric).groups())
        assert mean > 0 and ci > 0 and float(rss) > 100 and status.startswith("ok")
    best, meta_steps, step = rows[("ComplexSynapse", "Contrastive symmetric, full nudge")][1:4]
    assert re.fullmatch(r"\S+ ± \S+ @ [123]", best) and meta_steps == "3" and float(step) > 0
    assert rows[("ComplexSynapse", "untrained start")][1:4] == ["", "", ""]  # no meta-step was taken
    refusal = rows[("ComplexSynapse", "Reptile")][5]
    assert (
        refusal.startswith("n/a: Reptile is defined only") and "lambda." in refusal and "learn_lambda=False" in refusal
    )
    assert rows[("DualSystem", "MAML")][5].startswith("failed: ValueError")
    failure = json.loads((out / "sinusoid_5shot" / "dual_system__maml.json").read_text())
    assert failure["status"] == "failed" and "shots" in failure["reason"]
    timed = table_rows(text, "Sinusoid regression, 5 shots, equal time")
    assert list(timed) == [("ComplexSynapse", "Contrastive symmetric, linear nudge"), ("ComplexSynapse", "MAML")]
    standing = text.split("## Equal training time", 1)[1].split("| Sinusoid regression, 5 shots, equal time |", 1)[1]
    assert re.match(r" ComplexSynapse \| (ahead|level|behind) \([+-]\d+\.\d+\) \|\n", standing)
    assert "## Equal training time" in text and "CPU time" in text and "## Longer meta-training" not in text
    assert "Sinusoid regression, 5 shots" in text and "--smoke" in text and "torch" in text
    assert "## Gradient quality" in text
    # Recorded as run today, and no machine's folder in the report: paths relative to the repository.
    commands = json.loads((out / "run.json").read_text())["commands"]
    assert commands[0].startswith("python -m benchmarks.reproduce --smoke --out ")
    assert not re.search(rf"(?<![\w.]){re.escape(str(tmp_path))}", text) and tables.portable_path(out) in text


def test_a_cell_interrupted_in_meta_training_resumes_from_its_last_curve_point(tmp_path) -> None:
    """Kill a cell's process once it has saved a checkpoint; run it again: its curve and its clock continue."""
    out = tmp_path / "results"
    cell = suites.Cell("sinusoid_5shot_equal_time", "complex_synapse", "maml")
    budget = ["--trainer.callbacks.init_args.max_train_seconds=2", "--trainer.callbacks.init_args.every_seconds=0.3"]
    overrides = [*configs.smoke_overrides(cell), "--trainer.max_steps=100000", *budget]
    command = [*RUN_CELL, cell.suite, cell.learner, cell.estimator, "--out", str(out)]
    command += [f"--set={override}" for override in overrides]
    checkpoint, result = cell.result_path(out).with_suffix(".ckpt"), cell.result_path(out)
    process = subprocess.Popen(command, env=pool.worker_environment(), cwd=REPOSITORY, stdout=subprocess.DEVNULL)
    try:
        while not checkpoint.exists() and process.poll() is None:
            time.sleep(0.05)
        time.sleep(0.2)  # past the rename: the checkpoint is whole
    finally:
        process.kill()
        process.wait()
    assert checkpoint.exists() and not result.exists(), "the cell finished before it could be interrupted"
    subprocess.run(command, env=pool.worker_environment(), cwd=REPOSITORY, check=True, capture_output=True)
    resumed = json.loads(result.read_text())
    assert resumed["status"] == "ok" and resumed["resumed_at_step"] > 0
    steps = [point["meta_step"] for point in resumed["curve"]]
    seconds = [point["train_cpu_seconds"] for point in resumed["curve"]]
    assert steps[0] == 0 and steps == sorted(set(steps)) and seconds == sorted(seconds)
    assert resumed["resumed_at_step"] in steps and seconds[-1] >= 2.0
    assert not checkpoint.exists()


def test_kept_checkpoints_feed_the_drift_and_horizon_diagnostics(tmp_path) -> None:
    """``--keep-checkpoints`` leaves one checkpoint per curve point, which the ``estimate_drift`` and
    ``adaptation_horizon`` diagnostics read back."""
    out = tmp_path / "results"
    cell = suites.Cell("sinusoid_5shot", "complex_synapse", "maml")
    command = [*RUN_CELL, cell.suite, cell.learner, cell.estimator, "--out", str(out)]
    command += ["--keep-checkpoints", *(f"--set={override}" for override in configs.smoke_overrides(cell))]
    subprocess.run(command, env=pool.worker_environment(), cwd=REPOSITORY, check=True, capture_output=True)
    result = json.loads(cell.result_path(out).read_text())
    kept = sorted(cell.result_path(out).parent.glob(f"{cell.name}.step=*.ckpt"))
    steps = {int(path.stem.rsplit("=", 1)[1]) for path in kept}
    assert steps and steps <= {point["meta_step"] for point in result["curve"][1:]}
    assert not cell.result_path(out).with_suffix(".ckpt").exists()  # the resume checkpoint is still removed

    drift = run_diagnostic(
        "estimate_drift", cell.config, kept, *("--batches", "1", "--long", "40", "--implicit", "1e-2"),
        *("--implicit-cap", "200", "--implicit-damping", "10"),
    )  # fmt: skip
    assert len(drift) == len(kept)
    for values in drift:
        # 20 inner steps on a sinusoid task: the T-step contrastive estimate points MAML's way
        assert 0 < values["cos linear"] <= 1 and 0 <= values["residual after T"] < 1
        assert values["cos run"] == pytest.approx(1)  # the run's own estimator is MAML at the same steps
        assert values["cos run to implicit"] == pytest.approx(values["cos maml to implicit"])
        assert values["|maml| / |implicit|"] > 0
        assert values["|run| / |implicit|"] == pytest.approx(values["|maml| / |implicit|"])
        by_group = [value for key, value in values.items() if key.startswith("cos run to implicit, ")]
        assert by_group and all(-1 <= value <= 1 for value in by_group)
        assert 0 < values["cos linear_long to implicit"] <= 1

    horizon = run_diagnostic(
        "adaptation_horizon",
        cell.config,
        kept,
        *("--episodes", "4", "--multiples", "1", "5", "--power-iterations", "40", "--steps", "1"),
        *("--solved", "1e9"),  # a tolerance every start meets: solved at once, after no step
        *(f"--set={override}" for override in configs.smoke_overrides(cell)),
    )
    assert len(horizon) == len(kept)
    one, *steps = re.findall(r"query_loss after (\d+)", " ".join(horizon[0]))
    assert one == "1" and len(steps) == 2 and int(steps[1]) == 5 * int(steps[0])
    for values in horizon:
        assert values["steps to solve"] == 0 and values["unsolved %"] == 0
        assert values["L_in after solved to 1e+09"] > values["L_in after 1"] > values[f"L_in after {steps[0]}"]
    for values in horizon:
        # SGD lr 0.005, momentum 0.9 (limit 2 x 1.9 / 0.005 = 760) on a sinusoid MLP: stable, so five times the
        # steps lower the inner loss further
        assert values["stability limit 2(1+mu)/lr"] == pytest.approx(760)
        assert 0 < values["top curvature at the start"] < 760
        assert values[f"L_in after {steps[1]}"] < values[f"L_in after {steps[0]}"]


def run_diagnostic(name: str, config: Path, checkpoints: list[Path], *options: str) -> list[dict]:
    """Run ``benchmarks.diagnostics.<name>`` on a run's config and checkpoints; its table, one dict per row."""
    command = [sys.executable, "-m", f"benchmarks.diagnostics.{name}", "--config", str(config)]
    command += ["--checkpoints", *map(str, checkpoints), *options]
    text = subprocess.run(
        command, env=pool.worker_environment(), cwd=REPOSITORY, check=True, capture_output=True, text=True
    ).stdout
    header, _, *rows = [line for line in text.splitlines() if line.startswith("|")]
    columns = [entry.strip() for entry in header.strip("|").split(" | ")]
    return [dict(zip(columns, (float(entry) for entry in row.strip("|").split(" | ")), strict=True)) for row in rows]


def test_time_estimates_come_from_the_measured_results_of_earlier_runs(tmp_path) -> None:
    """A cell's estimate is its meta-steps at the seconds per meta-step measured on cells of the same cost (data and
    ways, estimator), plus its evaluations at the measured seconds outside meta-training per evaluation. What no run
    measured is unknown, not guessed; smoke runs do not count."""
    measured = {
        "suite": "omniglot_20way",
        "learner": "complex_synapse",
        "estimator": "maml",
        "status": "ok",
        "metrics": {"accuracy": 0.7, "accuracy_ci95": 0.01},
        "seconds_per_meta_step": 0.8,
        "meta_steps": 250,
        "wall_s": 400.0,
        # three evaluations (start, step 125, step 250 = the test) outside 200 s of meta-training: 200/3 s each
        "curve": [{"meta_step": step, "train_seconds": step * 0.8} for step in (0, 125, 250)],
    }
    run = tmp_path / "run"
    running.write_json(suites.Cell("omniglot_20way", "complex_synapse", "maml").result_path(run), measured)
    merged = tmp_path / "results.json"
    merged.write_text(json.dumps({"run": {"smoke": False}, "results": {"omniglot_20way": [measured]}}))
    evaluation = 200.0 / 3
    for source in (run, merged):
        measurements = estimates.Measurements.read([source])
        seconds = measurements.cell_seconds
        # the alphabet split and the longer runs share the 20-way costs; the second learner shares the estimator's
        assert seconds(suites.Cell("omniglot_20way_alphabet", "dual_system", "maml")) == pytest.approx(400.0)
        long = suites.Cell("omniglot_20way_alphabet_long", "dual_system", "maml")
        assert seconds(long) == pytest.approx(600 * 0.8 + 13 * evaluation)
        equal_time = suites.Cell("omniglot_20way_equal_time", "complex_synapse", "maml")
        assert seconds(equal_time) == pytest.approx(240.0 + 6 * evaluation)  # the budget, not the steps
        assert seconds(suites.Cell("omniglot_20way", "dual_system", "untrained")) == pytest.approx(evaluation)
        assert seconds(suites.Cell("omniglot_20way", "complex_synapse", "implicit")) is None
        assert seconds(suites.Cell("omniglot_5way", "complex_synapse", "maml")) is None
        line = measurements.describe([long, suites.Cell("omniglot_5way", "complex_synapse", "maml")], 2, False)
        assert f"{(600 * 0.8 + 13 * evaluation) / 2 / 60:.0f} min" in line and "omniglot_5way/maml" in line
    unmeasured = estimates.Measurements.read([tmp_path / "nothing"])
    assert "unknown" in unmeasured.describe([suites.Cell("omniglot_20way", "complex_synapse", "maml")], 2, True)
    running.write_json(run / "run.json", {"smoke": True})
    assert estimates.Measurements.read([run]).cell_seconds(long) is None


def test_reported_commands_run_today_and_name_no_machine_paths() -> None:
    """A command recorded by the script form, with absolute paths, shows as the module form with paths relative to
    the repository (a folder beside the checkout as ``../``)."""
    beside, inside = REPOSITORY.parent, REPOSITORY / "benchmarks" / "results"
    recorded = (
        f"python benchmarks/reproduce.py --only long --out {beside}/runs/long "
        f"--set=--data.root={beside}/shared/data/omniglot --set=--model.optimizer.init_args.lr=3e-4"
    )
    assert tables.portable_command(recorded) == (
        "python -m benchmarks.reproduce --only long --out ../runs/long "
        "--set=--data.root=../shared/data/omniglot --set=--model.optimizer.init_args.lr=3e-4"
    )
    assert tables.portable_command(f"lightning-contrastive fit --out={inside}/x") == (
        "lightning-contrastive fit --out=benchmarks/results/x"
    )


def test_absurd_results_are_failures_not_ok(tmp_path) -> None:
    """Issue 16 item 8: RESULTS.md called a meta-test MSE of 1.15e+22 with 76 of 3000 tasks skipped "ok"."""

    def result(loss: float, skipped: float = 0.0, status: str = "ok") -> dict:
        metrics = {"query_loss": loss, "query_loss_ci95": 0.1}
        return {"status": status, "reason": "", "metrics": metrics, "meta_steps": 600, "skipped_tasks": skipped}

    judge = running.judge
    diverged = judge(result(1.15e22, skipped=76), untrained_loss=6.70, meta_batch=5)
    assert diverged == (
        "failed",
        "diverged: query loss 1.15e+22 > 10x the untrained start's 6.7",
    )
    assert judge(result(66.0), 6.70, 5)[0] == "ok" and judge(result(68.0), 6.70, 5)[0] == "failed"  # the 10x line
    assert judge(result(float("nan")), 6.70, 5) == ("failed", "diverged: non-finite query_loss")
    # 3 of 3000 tasks skipped is noise; 151 (over 5%) means the meta-gradient averaged only the tasks that survived.
    assert judge(result(1.7, skipped=3), 6.70, 5) == ("ok", "")
    assert judge(result(1.7, skipped=151), 6.70, 5) == (
        "failed",
        "unstable: 151 of 3000 meta-training tasks skipped (more than 5%)",
    )
    assert judge(result(1e9), None, 5)[0] == "ok"  # no untrained start to compare with: only the other rules
    refused = {**result(1.0, status="n/a"), "reason": "Reptile is defined only ..."}
    assert judge(refused, 6.70, 5) == ("n/a", "Reptile is defined only ...")

    # A JSON written before the rule (no curve): judged in the report against the suite's untrained cell.
    folder = tmp_path / "sinusoid_5shot"
    folder.mkdir()
    old = {"suite": "sinusoid_5shot", "learner": "complex_synapse", "estimator": "contrastive_one_sided"}
    (folder / "complex_synapse__contrastive_one_sided.json").write_text(json.dumps({**old, **result(1.15e22, 76)}))
    start = {**old, "estimator": "untrained", **result(6.70), "meta_steps": 0}
    (folder / "complex_synapse__untrained.json").write_text(json.dumps(start))
    rows = tables.load_results(tmp_path)["sinusoid_5shot"]
    assert [row["status"] for row in rows] == ["ok", "failed"]
    assert tables.status_cell(rows[1]) == "failed: diverged: query loss 1.15e+22 > 10x the untrained start's 6.7"


def test_standing_calls_ahead_behind_and_level_by_the_confidence_intervals() -> None:
    def cell(estimator: str, mean: float, ci: float, status: str = "ok") -> dict:
        metrics = {"accuracy": mean, "accuracy_ci95": ci, "query_loss": mean, "query_loss_ci95": ci}
        return {"learner": "complex_synapse", "estimator": estimator, "status": status, "metrics": metrics}

    omniglot = [
        cell("contrastive_linear", 0.80, 0.01),
        cell("maml", 0.83, 0.01),  # 3 points higher, intervals apart: behind
        cell("implicit", 0.815, 0.01),  # intervals overlap: level
        cell("fomaml", 0.70, 0.01),
        cell("contrastive_symmetric", 0.05, 0.01, status="failed"),
    ]
    sinusoid = [cell("contrastive_linear", 1.0, 0.1), cell("maml", 2.0, 0.1)]  # lower MSE is better
    table = tables.standing_table({"omniglot_5way": omniglot, "sinusoid_5shot": sinusoid})
    header, _, *lines = table.splitlines()
    assert header == "| suite | learner | MAML | Implicit | FirstOrderMAML | Contrastive symmetric, full nudge |"
    rows = {line.split(" | ")[0].strip("| "): [e.strip(" |") for e in line.split(" | ")[2:]] for line in lines}
    assert rows["Omniglot 5-way 1-shot"] == ["behind (-3.0)", "level (-1.5)", "ahead (+10.0)", "failed"]
    assert rows["Sinusoid regression, 5 shots"] == ["ahead (+1.000)", "not run", "not run", "not run"]
    dual = [{**row, "learner": "dual_system"} for row in omniglot[:2]] + [cell("reptile_lambda_fixed", 0.5, 0.01)]
    table = tables.standing_table({"omniglot_5way": dual})
    assert table.splitlines()[0].endswith("| MAML | Reptile (lambda fixed) |")
    assert table.splitlines()[2].endswith("| DualSystem | behind (-3.0) | n/a |")  # no such cell: not "not run"
