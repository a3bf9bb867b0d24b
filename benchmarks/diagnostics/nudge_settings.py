"""Which nudge, how many nudged steps and which beta should ``Contrastive()`` default to, on the quickstart problem?

Cost: one meta-training of 800 meta-steps and one meta-test of 600 episodes per setting, run one after the other on
one thread (each prints its own meta-training CPU time).

Meta-trains the quickstart's complex synapse (1-40-40-1 MLP, sinusoid 10-shot, 800 meta-steps of 5 tasks, 20 free
steps at inner lr 0.005, Adam 3e-3, seed 0) once per setting given on the command line, each in this process in
turn on one thread, and prints one JSON line per setting: the meta-test MSE on the 600 fixed episodes with its 95%
interval, the meta-training CPU time and the tasks skipped for inner-loop faults. The evidence behind
``Contrastive()``'s defaults (``docs/reproduce/findings.md``, "Defaults").

    python -m benchmarks.diagnostics.nudge_settings linear:10:0.03 full:10:0.03 linear:20:0.03 full:20:0.03
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import pytorch_lightning as pl
import torch

from lightning_contrastive import ComplexSynapse, Contrastive, MetaLearningModule
from lightning_contrastive.data import SinusoidDataModule
from lightning_contrastive.networks import MLP

META_STEPS, TASKS_PER_STEP, INNER_STEPS = 800, 5, 20


def run(nudge: str, nudged_steps: int, beta: float) -> dict[str, object]:
    """One meta-training run of the quickstart with these nudge settings, and its meta-test result."""
    pl.seed_everything(0, verbose=False)
    data = SinusoidDataModule(
        shots=10,
        test_shots=10,
        batch_size=TASKS_PER_STEP,
        num_train_tasks=META_STEPS * TASKS_PER_STEP,
        num_eval_tasks=600,
        eval_batch_size=100,
    )
    module = MetaLearningModule(
        learner=ComplexSynapse(MLP(1, (40, 40), 1), loss="mse", init_lambda=1.0),
        estimator=Contrastive(
            beta=beta,
            inner_steps=INNER_STEPS,
            nudged_steps=nudged_steps,
            nudge=nudge,
            inner_lr=0.005,  # type: ignore[arg-type]
        ),
        optimizer=partial(torch.optim.Adam, lr=3e-3),
        on_inner_fault="skip",
    )
    trainer = pl.Trainer(
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    started = time.process_time()
    trainer.fit(module, data)
    cpu_seconds = time.process_time() - started
    (result,) = trainer.test(module, data, verbose=False)
    return {
        "nudge": nudge,
        "nudged_steps": nudged_steps,
        "beta": beta,
        "mse": result["test/query_loss"],
        "ci95": result["test/query_loss_ci95"],
        "train_cpu_s": round(cpu_seconds, 1),
        "skipped_tasks": module.skipped_tasks_total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help="NUDGE:NUDGED_STEPS:BETA, e.g. linear:10:0.03")
    torch.set_num_threads(1)
    for setting in parser.parse_args().settings:
        nudge, steps, beta = setting.split(":")
        print(json.dumps(run(nudge, int(steps), float(beta))), flush=True)


if __name__ == "__main__":
    main()
