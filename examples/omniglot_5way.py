"""Omniglot 5-way 1-shot on real images: meta-training with the contrastive rule against its untrained start.

    python examples/omniglot_5way.py                    # 7 minutes on 2 idle CPU cores (14 when they are shared)
    python examples/omniglot_5way.py --root PATH        # where the Omniglot zips are
    python examples/omniglot_5way.py --trainer.max_steps=600 --data.num_eval_tasks=300   # any config override
    python examples/omniglot_5way.py --config configs/omniglot/dual_system_5way1shot.yaml  # the dual system

Every weight of a 32-channel Conv4 becomes a complex synapse (a fast weight pulled toward a consolidated
weight ``omega`` with a learned strength ``lambda``), and the symmetric contrastive rule meta-learns
``omega`` and ``lambda`` on tasks drawn from the meta-train characters. The script runs the configuration
``configs/omniglot/contrastive_5way1shot.yaml`` as these three commands would, in one process:

    OMP_NUM_THREADS=1 lightning-contrastive test --config configs/omniglot/contrastive_5way1shot.yaml  # untrained
    OMP_NUM_THREADS=1 lightning-contrastive fit  --config configs/omniglot/contrastive_5way1shot.yaml
    OMP_NUM_THREADS=1 lightning-contrastive test --config configs/omniglot/contrastive_5way1shot.yaml --ckpt_path last

and prints the query accuracy, with its 95% confidence interval, on the same fixed meta-test episodes
(characters never seen in meta-training, each episode adapted from its own 5 support images) of the
network adapted from its untrained start and after meta-training. The meta-trained network is saved as
``checkpoints/omniglot_contrastive_5way1shot/last.ckpt`` (relative to the working directory), which the
last command above tests again.

The images are the official small background subsets of Omniglot (242 characters, split by character
into meta-train/val/test and augmented with rotations). They are read from ``--root``, else from
``$LIGHTNING_CONTRASTIVE_OMNIGLOT_ROOT``, else from ``../shared/data/omniglot`` beside the repository. The full
Omniglot zips work unchanged (the Vinyals split is then used).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jsonargparse import Namespace

from lightning_contrastive.cli import MetaLearningCLI

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIG = REPOSITORY / "configs" / "omniglot" / "contrastive_5way1shot.yaml"
ROOT_ENV_VAR = "LIGHTNING_CONTRASTIVE_OMNIGLOT_ROOT"
DEFAULT_ROOT = REPOSITORY.parent / "shared" / "data" / "omniglot"
SCRIPT_OVERRIDES = ("--trainer.logger=false", "--trainer.enable_model_summary=false")
"""The script prints its own summary; any of these can be overridden again on its command line."""


@dataclass(frozen=True)
class Accuracy:
    """Mean query accuracy over the evaluation episodes and the half-width of its 95% confidence interval."""

    mean: float
    ci95: float

    def __str__(self) -> str:
        return f"{100 * self.mean:5.1f} ± {100 * self.ci95:.1f}"


@dataclass(frozen=True)
class Comparison:
    """The same network on the same meta-test episodes, adapted from its untrained start and after meta-training."""

    untrained: Accuracy
    trained: Accuracy
    seconds: dict[str, float]

    @property
    def win(self) -> float:
        """Accuracy gained by meta-training, as a fraction (0.15 is 15 points)."""
        return self.trained.mean - self.untrained.mean


def default_root() -> Path:
    """``$LIGHTNING_CONTRASTIVE_OMNIGLOT_ROOT``, else :data:`DEFAULT_ROOT`, beside the repository.

    Returned whether or not it exists, so that the data module's error names where the files belong.
    """
    return Path(os.environ[ROOT_ENV_VAR]) if os.environ.get(ROOT_ENV_VAR) else DEFAULT_ROOT


def build(root: Path, overrides: Sequence[str] = (), config: Path = CONFIG) -> MetaLearningCLI:
    """Instantiate ``config``'s trainer, module and data module, with ``overrides`` applied on top."""
    with warnings.catch_warnings():  # the script hands its own command line to LightningCLI as ``args`` on purpose
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return MetaLearningCLI(
            args=[f"--config={config}", f"--data.root={root}", *SCRIPT_OVERRIDES, *overrides],
            run=False,
            save_config_callback=None,  # the configuration is in the repository; nothing to save beside the checkpoint
        )


def compare(cli: MetaLearningCLI) -> Comparison:
    """Test the untrained start, meta-train, and test again, on the same fixed meta-test episodes."""
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    seconds = {}

    def test(stage: str) -> Accuracy:
        start = time.perf_counter()
        (result,) = trainer.test(module, data, verbose=False)
        seconds[stage] = time.perf_counter() - start
        return Accuracy(result["test/accuracy"], result["test/accuracy_ci95"])

    start = time.perf_counter()
    data.prepare_data()
    data.setup()  # decodes the images once; the trainer's own calls then find them loaded
    seconds["read images"] = time.perf_counter() - start
    untrained = test("test untrained")
    start = time.perf_counter()
    trainer.fit(module, data)
    seconds["meta-train"] = time.perf_counter() - start
    trained = test("test meta-trained")
    return Comparison(untrained, trained, seconds)


def describe(config: Namespace) -> str:
    """The settings that matter, read back from the parsed configuration (overrides included)."""
    data, optimizer = config.data.init_args, config.model.optimizer
    return "\n".join(
        [
            f"  learner    {_call(config.model.learner)}",
            f"  estimator  {_call(config.model.estimator)}",
            f"  optimizer  {optimizer.class_path.rsplit('.', 1)[-1]}, lr {optimizer.init_args.lr}",
            f"  data       {data.ways}-way {data.shots}-shot, {data.test_shots} queries per class, meta-batch "
            f"{data.batch_size}, {config.trainer.max_steps} meta-steps; {data.num_eval_tasks} fixed meta-test episodes",
            f"  root       {data.root}",
            f"  torch      {torch.__version__}, {torch.get_num_threads()} thread(s)",
        ]
    )


def report(comparison: Comparison, meta_steps: int) -> str:
    """The comparison table and the time each stage took."""
    trained = f"meta-trained ({meta_steps} steps)"
    rows = [
        f"  {'start (untrained)':<20}| {trained:<26}| win",
        f"  {comparison.untrained!s:<20}| {comparison.trained!s:<26}| {100 * comparison.win:+.1f} points",
    ]
    times = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in comparison.seconds.items())
    return "\n".join(
        [
            "Query accuracy (%) on the meta-test episodes, mean ± 95% CI:",
            *rows,
            f"Time: {times}; total {sum(comparison.seconds.values()):.0f} s.",
        ]
    )


def main(argv: Sequence[str] | None = None) -> Comparison:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Any other argument is a LightningCLI override of the configuration, e.g. --trainer.max_steps=600.",
    )
    parser.add_argument("--config", type=Path, default=CONFIG, help="configuration file (default: %(default)s)")
    parser.add_argument(
        "--root", type=Path, help=f"Omniglot zips' folder (default: ${ROOT_ENV_VAR}, else {DEFAULT_ROOT})"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: fastest on 2 shared cores)"
    )
    args, overrides = parser.parse_known_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1; got {args.threads}.")
    torch.set_num_threads(args.threads)
    cli = build(args.root or default_root(), overrides, args.config)
    print(f"Settings ({args.config} with overrides {list(overrides)}):\n{describe(cli.config)}")
    comparison = compare(cli)
    print(report(comparison, cli.trainer.max_steps))
    return comparison


def _call(config: Namespace) -> str:
    """``Name(arg=value, ...)`` for a ``class_path``/``init_args`` entry, nested entries included."""
    if not isinstance(config, Namespace) or "class_path" not in config:
        return repr(config)
    init_args = vars(config.get("init_args", Namespace()))
    arguments = ", ".join(f"{name}={_call(value)}" for name, value in init_args.items())
    return f"{config.class_path.rsplit('.', 1)[-1]}({arguments})"


if __name__ == "__main__":
    main()
