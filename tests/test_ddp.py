"""Lightning DDP: each process trains on its own share of every meta-batch and DDP's average is the whole meta-batch's.

The samplers are checked directly; then ``tests/scripts/ddp_meta_step.py`` runs real 2-process DDP (gloo, CPU)
in a subprocess, because Lightning's ``ddp`` strategy re-runs the command line, which under pytest is pytest.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterable
from itertools import chain
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightning_contrastive.data.episodic import EpisodeSampler

SCRIPT = Path(__file__).parent / "scripts" / "ddp_meta_step.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ddp_meta_step", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


ddp_meta_step = load_script()


def shares(processes: int, **settings: Any) -> list[list[int]]:
    return [list(EpisodeSampler(num_replicas=processes, rank=rank, **settings)) for rank in range(processes)]


def flat(lists: Iterable[list[Any]]) -> list[Any]:
    return list(chain.from_iterable(lists))


def batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


# ------------------------------------------------------------------ the samplers
@pytest.mark.parametrize("processes", [1, 2, 4])
@pytest.mark.parametrize("num_tasks", [24, 20, 22], ids=["whole_meta_batches", "rest_splits_evenly", "rest_dropped"])
def test_processes_share_every_meta_batch_of_a_single_process(processes: int, num_tasks: int) -> None:
    settings = {"num_tasks": num_tasks, "fresh_per_epoch": True, "shuffle_seed": 3, "meta_batch_size": 8}
    (single,) = shares(1, **settings)
    per_process = [batches(share, 8 // processes) for share in shares(processes, **settings)]
    steps = {len(loaded) for loaded in per_process}
    assert len(steps) == 1  # every process takes the same number of steps
    together = [flat(loaded[step] for loaded in per_process) for step in range(steps.pop())]
    rest = num_tasks % 8
    expected = batches(single, 8)[: -1 if rest % processes else None]  # a rest that cannot split is dropped
    assert together == expected
    assert sorted(single) == list(range(num_tasks))  # one epoch is each task once, shuffled
    assert single != sorted(single)


@pytest.mark.parametrize("processes", [2, 3])
def test_evaluation_episodes_are_split_without_repeats(processes: int) -> None:
    parts = shares(processes, num_tasks=7, fresh_per_epoch=False)
    assert flat(parts) == list(range(7))  # each episode once, none repeated as DistributedSampler's padding would
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shuffled_epochs_are_fixed_by_seed_and_epoch_on_every_process() -> None:
    def epoch(e: int, rank: int = 0, processes: int = 1) -> list[int]:
        sampler = EpisodeSampler(12, False, shuffle_seed=5, meta_batch_size=4, num_replicas=processes, rank=rank)
        sampler.set_epoch(e)
        return list(sampler)

    assert epoch(1) == epoch(1) and epoch(1) != epoch(2)
    assert sorted(epoch(0, 0, 2) + epoch(0, 1, 2)) == list(range(12))  # the processes permute alike
    sampler = EpisodeSampler(12, False, shuffle_seed=5)
    assert list(sampler) != list(sampler)  # without set_epoch each pass reshuffles, like RandomSampler


def test_resuming_on_another_number_of_processes_continues_the_same_meta_batches() -> None:
    settings = {"num_tasks": 16, "fresh_per_epoch": True, "shuffle_seed": 0, "meta_batch_size": 4}
    (single,) = shares(1, **settings)
    resumed = []
    for rank in range(2):
        sampler = EpisodeSampler(num_replicas=2, rank=rank, **settings)
        sampler.resume(epoch=0, tasks_done=8)
        resumed.append(batches(list(sampler), 2))
    assert [a + b for a, b in zip(*resumed, strict=True)] == batches(single, 4)[2:]


def test_an_epoch_that_leaves_a_process_nothing_to_load_is_refused() -> None:
    with pytest.raises(ValueError, match="3 tasks per epoch leave some of the 4 processes nothing to load"):
        EpisodeSampler(3, False, num_replicas=4, rank=0)  # evaluation: one episode each at least
    with pytest.raises(ValueError, match="use at least 8 tasks"):
        EpisodeSampler(6, True, meta_batch_size=8, num_replicas=4, rank=0)  # training: one meta-batch at least


def test_a_meta_batch_that_does_not_split_evenly_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"meta-batch of 6 tasks does not split evenly across 4 processes.*multiple of 4"
    ):
        EpisodeSampler(12, True, meta_batch_size=6, num_replicas=4, rank=0)


# ------------------------------------------------------------------ real DDP, 2 processes
def launch(out: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run the DDP script in a fresh process tree; Lightning picks a free port."""
    launcher_variables = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")
    environment = {key: value for key, value in os.environ.items() if key not in launcher_variables}
    command = [sys.executable, str(SCRIPT), str(out), *arguments]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240, check=False)


def load(path: Path) -> Any:
    return torch.load(path, weights_only=False)


def concatenate(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    return {key: tuple(torch.cat(pair) for pair in zip(first[key], second[key], strict=True)) for key in first}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One launch for all estimators (the process start dominates): one meta-step each, then validation."""
    out = tmp_path_factory.mktemp("ddp")
    finished = launch(out, "--evaluate", "8")
    assert finished.returncode == 0, finished.stderr[-4000:]
    return out


@pytest.mark.parametrize("estimator", list(ddp_meta_step.ESTIMATORS))
def test_one_ddp_meta_step_equals_a_single_process_step_on_both_processes_tasks(ddp_run: Path, estimator: str) -> None:
    (first,), (second,) = (load(ddp_run / f"{estimator}-rank{rank}.pt") for rank in (0, 1))
    assert len(first["train"][0]) == len(second["train"][0]) == 2
    assert not any(torch.equal(a, b) for a in first["train"][0] for b in second["train"][0])  # distinct tasks
    union = concatenate(first, second)
    single_process_batch = next(iter(ddp_meta_step.data().train_dataloader()))
    assert all(torch.equal(a, b) for key in union for a, b in zip(union[key], single_process_batch[key], strict=True))

    reference = ddp_meta_step.module(estimator)
    start = ddp_meta_step.meta_parameters(reference)
    gradient = reference.meta_gradient(union)
    after = load(ddp_run / f"{estimator}-parameters.pt")
    expected = {name: value - ddp_meta_step.LEARNING_RATE * gradient[name] for name, value in start.items()}
    assert all(value.dtype == torch.float64 for value in after.values())
    torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-12)  # the message names a failing parameter
    assert any(not torch.equal(after[name], start[name]) for name in start)


def test_a_process_whose_tasks_all_fail_contributes_a_zero_meta_gradient_and_ddp_stays_in_step(tmp_path: Path) -> None:
    """Under ``on_inner_fault="skip"``, process 1's tasks all fail: it still joins DDP's average, with zeros, so the
    step is half of process 0's meta-gradient on every process (one that skipped its step would hang the other)."""
    finished = launch(tmp_path, "--estimators", "contrastive", "--poison-rank", "1")
    assert finished.returncode == 0, finished.stderr[-4000:]
    (sound,), (poisoned,) = (load(tmp_path / f"contrastive-rank{rank}.pt") for rank in (0, 1))
    assert torch.isnan(poisoned["train"][1]).all() and not torch.isnan(sound["train"][1]).any()

    reference = ddp_meta_step.module("contrastive")
    start = ddp_meta_step.meta_parameters(reference)
    gradient = reference.meta_gradient(sound)
    after = load(tmp_path / "contrastive-parameters.pt")
    expected = {name: value - ddp_meta_step.LEARNING_RATE * gradient[name] / 2 for name, value in start.items()}
    torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-12)


def validate_in_one_process(ddp_run: Path, episodes: int) -> dict[str, float]:
    """``Trainer.validate`` in this process of the module the script validated (its last one, MAML's)."""
    reference = ddp_meta_step.module("maml")
    reference.learner.load_state_dict(load(ddp_run / "maml-parameters.pt"))
    run = pl.Trainer(precision="64-true", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (validated,) = run.validate(reference, datamodule=ddp_meta_step.data(episodes), verbose=False)
    return validated


def assert_each_process_evaluated_a_distinct_part(ddp_run: Path, episodes: int, sizes: list[int]) -> None:
    """The processes' evaluated episodes are ``sizes`` many, in order, and together every episode exactly once."""
    per_process = [
        [x for batch in load(ddp_run / f"evaluated-rank{rank}.pt") for x in batch["train"][0]] for rank in (0, 1)
    ]
    everything = [x for batch in ddp_meta_step.data(episodes).val_dataloader() for x in batch["train"][0]]
    assert list(map(len, per_process)) == sizes
    assert all(torch.equal(a, b) for a, b in zip(flat(per_process), everything, strict=True))


def test_ddp_evaluation_covers_every_episode_once_and_reports_the_single_process_metrics(ddp_run: Path) -> None:
    assert_each_process_evaluated_a_distinct_part(ddp_run, 8, [4, 4])
    assert load(ddp_run / "validated.pt") == pytest.approx(validate_in_one_process(ddp_run, 8), rel=1e-9)


@pytest.mark.slow
def test_ddp_evaluation_of_episodes_that_do_not_split_evenly(tmp_path: Path) -> None:
    """7 episodes on 2 processes: 3 + 4, none repeated, and the mean and interval of all 7."""
    finished = launch(tmp_path, "--estimators", "maml", "--evaluate", "7")
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert_each_process_evaluated_a_distinct_part(tmp_path, 7, [3, 4])
    assert load(tmp_path / "validated.pt") == pytest.approx(validate_in_one_process(tmp_path, 7), rel=1e-9)


@pytest.mark.slow
def test_meta_parameters_without_a_meta_gradient_under_plain_ddp_fail_at_the_first_step(tmp_path: Path) -> None:
    """First-order MAML leaves the strengths without a meta-gradient; under ``strategy="ddp"`` DDP would then
    average nothing and each process would apply its own gradient. The first step must fail, naming the fix."""
    finished = launch(tmp_path, "--estimators", "fomaml", "--strategy", "ddp", "--steps", "1")
    assert finished.returncode != 0
    assert "ddp_find_unused_parameters_true" in finished.stderr
    assert not (tmp_path / "fomaml-parameters.pt").exists()
