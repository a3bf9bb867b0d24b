"""The ``lightning-contrastive`` console script: meta-training from YAML with LightningCLI.

Usage::

    lightning-contrastive fit --config configs/sinusoid/contrastive.yaml
    lightning-contrastive fit --config configs/sinusoid/contrastive.yaml --model.estimator MAML
    lightning-contrastive test --config configs/sinusoid/contrastive.yaml --ckpt_path path/to/last.ckpt
    lightning-contrastive fit --config configs/sinusoid/contrastive.yaml --print_config

The model is always :class:`~lightning_contrastive.module.MetaLearningModule`; its learner, estimator,
outer optimizer and LR scheduler are ``class_path``/``init_args`` entries under ``model:``, and the data
module any ``LightningDataModule`` under ``data:`` (short names such as ``SinusoidDataModule``,
``Contrastive`` or ``MAML`` resolve because this module imports them), and so do the callbacks under
``trainer.callbacks`` (``MetaGradientMonitor``, ``EstimatorAgreement``, ...) and the logger under ``trainer.logger``
(the shipped configs use :class:`~lightning_contrastive.loggers.OfflineFallbackWandbLogger`).
"""

from __future__ import annotations

import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any, NoReturn

import pytorch_lightning as pl
import yaml
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback

# Imported for their classes: jsonargparse resolves short names (``SinusoidDataModule``, ``MAML``,
# ``DualSystem``) among the subclasses already imported.
import lightning_contrastive.callbacks
import lightning_contrastive.data
import lightning_contrastive.estimators
import lightning_contrastive.learners
import lightning_contrastive.loggers  # noqa: F401
from lightning_contrastive.module import MetaLearningModule


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` to the log directory and hands the whole resolved configuration to every logger.

    ``save_hyperparameters`` reaches the loggers with the arguments of the module and data module only; this
    adds the rest (trainer, callbacks, logger, seed), so that e.g. the W&B run config alone reproduces the run.
    The configuration is logged as the nested ``{"trainer": ..., "model": ..., "data": ..., ...}`` that
    ``--print_config`` shows, once, on rank zero.
    """

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_unset=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class MetaLearningArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose errors are short: the problem, the valid class names, and where help is.

    The stock parser prints the whole usage (some 55 lines of ``[--trainer.x X]``) before the one line that says
    what went wrong. For a class argument given an unknown name (``--model.estimator MAMl``) this also lists the
    names that would resolve. With ``exit_on_error=False`` errors are raised as before.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {message.rstrip()}\n{_valid_names(parser, message)}")
        sys.stderr.write(f"Every option: {prog} --help\n")
        self.exit(2)


def _valid_names(parser: LightningArgumentParser, message: str) -> str:
    """``"Valid names: A, B, C\\n"`` for the class-typed argument ``message`` is about, else ``""``.

    The names are the public, concrete subclasses of the argument's type imported so far, which is what
    jsonargparse resolves short names against (this module imports every learner, estimator and data module).
    """
    key = re.search(r'Parser key "([^"]+)"', message)
    action = parser._option_string_actions.get(f"--{key.group(1)}") if key else None
    hint = getattr(action, "_typehint", None)
    bases = [hint] if isinstance(hint, type) else [arg for arg in typing.get_args(hint) if isinstance(arg, type)]
    bases = [base for base in bases if base is not type(None)]
    if len(bases) != 1:
        return ""
    names = sorted({cls.__name__ for cls in _subclasses(bases[0]) if _is_public_class(cls)})
    return f"Valid names: {', '.join(names)} (or a full class_path).\n" if names else ""


def _subclasses(base: type) -> list[type]:
    """``base`` and every class that derives from it, however indirectly."""
    found = [base]
    for subclass in base.__subclasses__():
        found += _subclasses(subclass)
    return found


def _is_public_class(cls: type) -> bool:
    return not inspect.isabstract(cls) and not cls.__name__.startswith("_") and "<locals>" not in cls.__qualname__


class MetaLearningCLI(LightningCLI):
    """LightningCLI for :class:`MetaLearningModule` with any data module.

    Differences from the stock ``LightningCLI``: the outer optimizer and scheduler are configured only
    through the module's own ``model.optimizer`` and ``model.lr_scheduler`` (``auto_configure_optimizers``
    is off, so that there is one place to set them), a rerun in the same directory overwrites the
    saved ``config.yaml`` instead of aborting, the whole resolved configuration reaches every logger
    (:class:`LoggerSaveConfigCallback`), not only the module's hyperparameters, and ``validate``, ``test`` and
    ``predict`` refuse a ``--ckpt_path`` that names no checkpoint (:meth:`check_checkpoint`) instead of warning and
    evaluating the untrained module.

    Args:
        args: command-line style arguments (a list, dict or Namespace); ``None`` reads ``sys.argv``.
        run: run the subcommand (``fit``, ``validate``, ``test``, ``predict``); otherwise only instantiate.
        **kwargs: any other ``LightningCLI`` argument (``trainer_defaults``, ``parser_kwargs``, ...).
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", LoggerSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", MetaLearningArgumentParser)
        super().__init__(MetaLearningModule, args=args, run=run, **kwargs)

    def check_checkpoint(self) -> None:
        """Stop (exit 2, one message) when the subcommand's ``--ckpt_path`` names no checkpoint.

        Lightning only warns when ``ckpt_path="last"`` finds nothing, and then evaluates the module as built, which
        prints figures that look like results; and its error for ``"best"`` in a new process (where no fit has
        ranked checkpoints) says ``ModelCheckpoint`` is misconfigured. ``last`` is looked up where the configured
        ``ModelCheckpoint``\\ s save it (the shipped configs fix that folder); a path must exist.
        """
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        name = str(ckpt_path)
        if ckpt_path is None or name in ("hpc", "registry") or name.startswith("registry:") or "://" in name:
            return  # none asked for, or Lightning's to resolve: HPC, the model registry, remote storage
        folders = [Path(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        if ckpt_path == "last":
            if not [path for folder in folders for path in folder.glob("last*.ckpt")]:
                where = ", ".join(str(folder) for folder in folders) or "no folder: no ModelCheckpoint sets dirpath"
                self.parser.error(
                    f"--ckpt_path last: no last checkpoint found ({where}). Run `fit` with this config first (its "
                    "ModelCheckpoint(save_last=True) writes last.ckpt there), or give the checkpoint's path."
                )
        elif ckpt_path == "best":
            self.parser.error(
                "--ckpt_path best refers to the best checkpoint of a `fit` in the same process, and this process "
                "ran none. Give the checkpoint's path (a ModelCheckpoint with a monitor saves it in its dirpath), or "
                "`last`."
            )
        elif not Path(ckpt_path).is_file():
            self.parser.error(f"--ckpt_path {ckpt_path}: no such file.")

    before_validate = before_test = before_predict = check_checkpoint


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-contrastive`` console script."""
    MetaLearningCLI(args=args)


if __name__ == "__main__":
    main()
