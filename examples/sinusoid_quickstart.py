"""Quickstart: meta-train a complex synapse on sinusoid regression with the contrastive rule (~2 minutes on a CPU).

    pip install torch==2.13.0 && pip install -e . && python examples/sinusoid_quickstart.py [--seed N]

Every weight of a 1-40-40-1 MLP becomes a complex synapse: a fast weight that learns each task from
10 support points, pulled toward a consolidated weight ``omega`` with a strength ``lambda``; the
symmetric contrastive rule meta-learns ``omega`` and ``lambda`` from two runs of plain gradient descent
per task (free and nudged), without backpropagating through the inner loop. The script drops
:class:`MetaLearningModule` into an ordinary ``pytorch_lightning.Trainer`` and prints the meta-test MSE
on 600 unseen tasks (after adapting to each task's 10 support points) before and after meta-training.

The trained figure depends on the seed and, through floating-point rounding that 800 meta-steps amplify, on the
CPU: docs/getting-started/quickstart.md gives the spread measured over seeds and machines.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import pytorch_lightning as pl
import torch

from lightning_contrastive import ComplexSynapse, Contrastive, MetaLearningModule
from lightning_contrastive.data import SinusoidDataModule
from lightning_contrastive.networks import MLP

META_STEPS = 800
TASKS_PER_STEP = 5


def meta_test_mse(trainer: pl.Trainer, module: MetaLearningModule, data: SinusoidDataModule) -> str:
    (result,) = trainer.test(module, data, verbose=False)
    return f"{result['test/query_loss']:.3f} ± {result['test/query_loss_ci95']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seeds the network's initial weights (default 0)")
    seed = parser.parse_args().seed
    pl.seed_everything(seed, verbose=False)
    data = SinusoidDataModule(
        shots=10,
        test_shots=10,
        batch_size=TASKS_PER_STEP,
        num_train_tasks=META_STEPS * TASKS_PER_STEP,  # one epoch = the whole run, every task fresh
        num_eval_tasks=600,
        eval_batch_size=100,  # the tasks (seed 0) are the same for every --seed
    )
    module = MetaLearningModule(
        learner=ComplexSynapse(MLP(in_features=1, hidden=(40, 40), out_features=1), loss="mse", init_lambda=1.0),
        estimator=Contrastive(
            beta=0.03, symmetric=True, inner_steps=20, nudged_steps=10, nudge="linear", inner_lr=0.005
        ),
        optimizer=partial(torch.optim.Adam, lr=3e-3),
    )
    trainer = pl.Trainer(
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    untrained = meta_test_mse(trainer, module, data)
    trainer.fit(module, data)
    trained = meta_test_mse(trainer, module, data)
    print("\nMeta-test MSE on 600 unseen sinusoid tasks after adapting to 10 support points (mean ± 95% CI):")
    print(f"  {'untrained start:':<24}{untrained}")
    print(f"  {f'after {META_STEPS} meta-steps:':<24}{trained}")
    print(f"  total time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
