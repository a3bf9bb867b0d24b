"""Each cell's LightningCLI configuration (what ``configs/reproduce/<suite>/<cell>.yaml`` holds, written by
``--write-configs``), and the overrides that shrink a cell to the ``--smoke`` budget."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

from benchmarks import REPOSITORY
from benchmarks.reproduce.suites import ESTIMATORS, LEARNERS, SEED, SMOKE, SUITES, Cell, all_cells


def cell_config(cell: Cell) -> dict[str, Any]:
    """The LightningCLI configuration of ``cell``: what ``configs/reproduce/<suite>/<cell>.yaml`` holds."""
    suite = SUITES[cell.suite]
    if suite.data == "sinusoid":
        backbone = {
            "class_path": "lightning_contrastive.networks.MLP",
            "init_args": {"in_features": 1, "hidden": [40, 40], "out_features": 1},
        }
        if suite.smooth:
            backbone["init_args"]["smooth"] = True
        loss = "mse"
        data = {
            "class_path": "lightning_contrastive.data.SinusoidDataModule",
            "init_args": {
                "shots": suite.shots,
                "test_shots": suite.test_shots,
                "batch_size": suite.meta_batch,
                "eval_batch_size": suite.eval_batch,
                "num_eval_tasks": suite.eval_tasks,
                "seed": SEED,
            },
        }
    else:
        backbone = {
            "class_path": "lightning_contrastive.networks.Conv4",
            "init_args": {"in_channels": 1, "ways": suite.ways, "channels": suite.channels, "image_size": 28},
        }
        loss = "cross_entropy"
        data = {
            "class_path": "lightning_contrastive.data.OmniglotDataModule",
            "init_args": {
                "root": "../shared/data/omniglot",
                "ways": suite.ways,
                "shots": suite.shots,
                "test_shots": suite.test_shots,
                "batch_size": suite.meta_batch,
                "eval_batch_size": suite.eval_batch,
                "num_train_tasks": suite.meta_steps * suite.meta_batch,  # every meta-training task is fresh
                "num_eval_tasks": suite.eval_tasks,
                "split_by": suite.split_by,
                "seed": SEED,
            },
        }
    if cell.learner == "complex_synapse":
        learner = {
            "class_path": "lightning_contrastive.ComplexSynapse",
            "init_args": {
                "backbone": backbone,
                "loss": loss,
                "init_lambda": suite.init_lambda,
                "learn_lambda": suite.learn_lambda and cell.estimator != "reptile_lambda_fixed",
            },
        }
    else:
        learner = {
            "class_path": "lightning_contrastive.DualSystem",
            "init_args": {"primary": backbone, "loss": loss, "pull": suite.pull, "modulator": "per_neuron"},
        }
    inner = {"inner_lr": suite.inner_lr, "inner_momentum": suite.inner_momentum}
    tolerance = {} if suite.tolerance is None else {"tolerance": suite.tolerance}
    if cell.estimator.startswith("contrastive") or cell.estimator == "untrained":
        # The untrained start is tested with the symmetric rule's adapt: the same inner steps as every estimator.
        linear = cell.estimator == "contrastive_linear"
        estimator_args = {
            "beta": suite.beta,
            "symmetric": cell.estimator != "contrastive_one_sided",
            "inner_steps": suite.inner_steps,
            # With fixed steps a linear nudged step costs a free one; with a tolerance both nudges get the same cap.
            "nudged_steps": suite.inner_steps if linear and suite.tolerance is None else suite.nudged_steps,
            "nudge": "linear" if linear else "full",
            **inner,
            **tolerance,
        }
        estimator = {"class_path": "lightning_contrastive.Contrastive", "init_args": estimator_args}
    else:
        class_name = {"maml": "MAML", "maml_long": "MAML", "fomaml": "FirstOrderMAML", "implicit": "Implicit"}.get(
            cell.estimator, "Reptile"
        )
        steps, extra = suite.inner_steps, {}
        if cell.estimator == "implicit":
            extra = {**({"cg_damping": suite.cg_damping} if suite.cg_damping else {}), **tolerance}
        elif cell.estimator == "maml_long" and suite.long_maml_steps is not None:
            steps = suite.long_maml_steps
        elif suite.short_steps is not None:  # the trajectory estimators of the horizon group
            steps, inner = suite.short_steps, {**inner, "inner_lr": suite.short_lr or suite.inner_lr}
        estimator = {
            "class_path": f"lightning_contrastive.{class_name}",
            "init_args": {"inner_steps": steps, **inner, **extra},
        }
    curve = {
        "class_path": "lightning_contrastive.callbacks.learning_curve.LearningCurve",
        "init_args": {
            "every_n_steps": suite.curve_every_n_steps,
            "every_seconds": None if suite.train_seconds is None else suite.train_seconds / suite.curve_points,
            "max_train_seconds": suite.train_seconds,
            "clock": "cpu",  # see EQUAL_TIME_SECONDS
        },
    }
    return {
        "seed_everything": SEED,
        "trainer": {
            "max_steps": 0 if cell.estimator == "untrained" else suite.max_steps,
            "limit_val_batches": 0,  # the test episodes are the measure; validating would only add time
            "callbacks": [] if cell.estimator == "untrained" else [curve],
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {
            "learner": learner,
            "estimator": estimator,
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": suite.outer_lr}},
            "on_inner_fault": "skip",  # a diverging task is counted in the table rather than ending the cell
        },
        "data": data,
    }


def config_text(cell: Cell) -> str:
    """The YAML file of ``cell``, with a header saying how it was made and how to run it."""
    subcommand = "test" if cell.estimator == "untrained" else "fit"
    header = (
        f"# {SUITES[cell.suite].title}: {LEARNERS[cell.learner]} with {ESTIMATORS[cell.estimator]}; generated by\n"
        "# `python -m benchmarks.reproduce --write-configs` from its SUITES table (edit there, not here).\n"
        f"#   OMP_NUM_THREADS=1 lightning-contrastive {subcommand} --config {cell.config.relative_to(REPOSITORY)}\n"
    )
    return header + yaml.safe_dump(cell_config(cell), sort_keys=False)


def write_configs() -> list[Path]:
    """(Re)write every cell's configuration file; returns their paths."""
    paths = []
    for cell in all_cells():
        cell.config.parent.mkdir(parents=True, exist_ok=True)
        cell.config.write_text(config_text(cell))
        paths.append(cell.config)
    return paths


def instantiate(spec: Any) -> Any:
    """Build the object a ``class_path``/``init_args`` entry describes (nested entries included)."""
    if isinstance(spec, dict) and "class_path" in spec:
        module_name, class_name = spec["class_path"].rsplit(".", 1)
        arguments = {key: instantiate(value) for key, value in spec.get("init_args", {}).items()}
        return getattr(importlib.import_module(module_name), class_name)(**arguments)
    return spec


def smoke_overrides(cell: Cell) -> list[str]:
    """CLI overrides that shrink ``cell`` to ``SMOKE``: a few meta-steps, inner steps and test episodes."""
    suite = SUITES[cell.suite]
    steps = [f"--model.estimator.inner_steps={SMOKE['inner_steps']}"]
    if cell.estimator.startswith("contrastive") or cell.estimator == "untrained":
        nudged = SMOKE["inner_steps"] if cell.estimator == "contrastive_linear" else SMOKE["nudged_steps"]
        steps.append(f"--model.estimator.nudged_steps={nudged}")
    data = [f"--data.num_eval_tasks={SMOKE['eval_tasks']}", f"--data.eval_batch_size={SMOKE['eval_batch']}"]
    if suite.data == "omniglot":
        data.append(f"--data.num_train_tasks={SMOKE['meta_steps'] * suite.meta_batch}")
    if cell.estimator == "untrained":
        return [*steps, *data]
    if suite.train_seconds is None:
        training = [f"--trainer.max_steps={SMOKE['meta_steps']}", "--trainer.callbacks.init_args.every_n_steps=1"]
    else:
        budget = SMOKE["train_seconds"]
        training = [
            f"--trainer.max_steps={10 * SMOKE['meta_steps']}",
            f"--trainer.callbacks.init_args.max_train_seconds={budget}",
            f"--trainer.callbacks.init_args.every_seconds={budget / 2}",
        ]
    return [*training, *steps, *data]
