"""Whether a checkpoint fits a :class:`~lightning_contrastive.MetaLearningModule`, checked before its weights load.

What a checkpoint holds: under ``LightningCLI`` the module's saved hyperparameters are the parsed configuration
(``class_path``/``init_args`` of learner, estimator, optimizer and scheduler), so
``MetaLearningModule.load_from_checkpoint(path)`` rebuilds the module by itself. Objects built in Python (modules,
estimator instances, optimizer callables, which may be lambdas) are not stored in the checkpoint; pass them again:
``load_from_checkpoint(path, learner=..., estimator=...)``. A checkpoint that does not fit the module is refused
before loading, naming every key that differs (:func:`check_checkpoint_fits`).

Lightning-free: the module calls :func:`check_checkpoint_fits` from its ``on_load_checkpoint`` hook.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

COMPARED_SECTIONS = ("learner", "optimizer")
"""The saved configuration's sections that must match: the learner (which tensors exist and what they mean) and the
outer optimizer (whose state would be restored into another algorithm). The estimator and schedules may change,
e.g. more inner steps at test time."""


def checkpoint_problems(
    checkpoint: Mapping[str, Any], state_dict: Mapping[str, Tensor], config: Mapping[str, Any]
) -> list[str]:
    """One line per way in which ``checkpoint`` does not fit a module with ``state_dict`` and parsed ``config``.

    Compared: the tensors (missing, extra or reshaped), and, when both were built by ``LightningCLI`` (so both
    carry their parsed configuration as hyperparameters), the :data:`COMPARED_SECTIONS` of the configuration.
    """
    saved = checkpoint.get("state_dict", {})
    problems = [f"{key}: missing from the checkpoint" for key in sorted(state_dict.keys() - saved.keys())]
    problems += [f"{key}: in the checkpoint, not in this module" for key in sorted(saved.keys() - state_dict.keys())]
    problems += [
        f"{key}: shape {tuple(saved[key].shape)} in the checkpoint, {tuple(state_dict[key].shape)} here"
        for key in sorted(saved.keys() & state_dict.keys())
        if saved[key].shape != state_dict[key].shape
    ]
    saved_config = checkpoint.get("hyper_parameters", {})
    for section in COMPARED_SECTIONS:
        if section in saved_config and section in config:
            problems += [
                f"model.{key}: {then!r} in the checkpoint, {now!r} here"
                for key, then, now in config_differences(saved_config[section], config[section], section)
            ]
    return problems


def check_checkpoint_fits(
    checkpoint: Mapping[str, Any], state_dict: Mapping[str, Tensor], config: Mapping[str, Any]
) -> None:
    """Raise ``ValueError`` listing every :func:`checkpoint_problems`, and what to do, if there is any."""
    problems = checkpoint_problems(checkpoint, state_dict, config)
    if problems:
        raise ValueError(
            "The checkpoint does not fit this module's configuration:\n  " + "\n  ".join(problems) + "\n"
            "Resume or evaluate with the configuration it was saved with (the config.yaml next to the logs)."
        )


def config_differences(saved: Any, current: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, current value)`` for every leaf where two parsed configurations differ."""
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        return [
            difference
            for key in sorted(saved.keys() | current.keys(), key=str)
            for difference in config_differences(saved.get(key), current.get(key), f"{prefix}.{key}")
        ]
    return [] if saved == current else [(prefix, saved, current)]
