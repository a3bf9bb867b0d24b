"""``benchmarks.diagnostics.path_nudge``: forcing the linear nudge with the query gradient along the free path gives
the full nudge's small-beta limit on a smooth network, where the linear nudge, forced at ``phi_0`` only, does not."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from lightning_contrastive import ComplexSynapse, Contrastive, meta_gradient

REPOSITORY = Path(__file__).resolve().parents[1]
path_nudge = importlib.import_module("benchmarks.diagnostics.path_nudge")


def relative_error(estimate: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    difference = sum((estimate[name] - reference[name]).pow(2).sum() for name in reference)
    return float((difference / sum(g.pow(2).sum() for g in reference.values())).sqrt())


def test_path_forced_nudge_is_the_full_nudges_limit_on_unconverged_phases() -> None:
    """A tanh MLP on a sinusoid task, float64, 15 free and 10 nudged steps: far from the inner solution, so the query
    gradient moves along the path. The symmetric path-forced estimate meets the full nudge's at rate beta^2 (measured
    8e-7 at beta 1e-3 and 8e-9 at 1e-4), while the linear nudge's stays off by the path's movement (measured 0.198 at
    both)."""
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    learner = ComplexSynapse(network, loss="mse", init_lambda=0.5)
    x = torch.rand(1, 35, 1, dtype=torch.float64) * 10 - 5
    y = 2.0 * torch.sin(x + 0.5)
    batch = {"train": (x[:, :10], y[:, :10]), "test": (x[:, 10:], y[:, 10:])}

    errors = {}
    for beta in (1e-3, 1e-4):
        settings = {"beta": beta, "inner_steps": 15, "nudged_steps": 10, "inner_lr": 0.02, "precision": "float64"}
        full = meta_gradient(learner, Contrastive(nudge="full", **settings), batch)
        path_forced = meta_gradient(learner, path_nudge.PathForcedNudge(**settings), batch)
        linear = meta_gradient(learner, Contrastive(nudge="linear", **settings), batch)
        errors[beta] = relative_error(path_forced, full), relative_error(linear, full)

    assert errors[1e-4][0] < 1e-7
    assert 50 < errors[1e-3][0] / errors[1e-4][0] < 200  # slope 2 in log-log: the error is O(beta^2)
    assert min(errors[1e-3][1], errors[1e-4][1]) > 0.1


def test_agreement_section_prints_the_three_cosines() -> None:
    """``python -m benchmarks.meta_step --sections agreement`` on three sinusoid tasks at T = 10: the path-forced
    column is the one that meets the full nudge (measured 1.0000, where the linear nudge is at 0.75), so the columns
    are wired to the right estimates."""
    command = [sys.executable, "-m", "benchmarks.meta_step", "--problems", "sinusoid", "--steps", "10"]
    command += ["--sections", "agreement", "--agreement-betas", "0.001", "--sinusoid-tasks", "3"]
    output = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, check=True, timeout=600).stdout
    header, row = [line for line in output.splitlines() if line.startswith("| ")][-2:]  # the rule line is "|---|"
    cells = dict(zip(header.strip("|").split(" | "), row.strip("|").split(" | "), strict=True))
    linear_to_full = float(cells["cosine linear to full"])
    assert float(cells["path-forced to full"]) > 0.999 > linear_to_full + 0.1
    assert abs(float(cells["linear to path-forced"]) - linear_to_full) < 0.01
