"""Both Lightning packages at once: ``pytorch_lightning`` and the unified ``lightning`` (``lightning.pytorch``).

**The constraint.** The two packages ship the same code under two names, so ``pytorch_lightning.LightningModule``
and ``lightning.pytorch.LightningModule`` are distinct classes, and each Trainer checks ``isinstance`` against its
own (module, data module, callbacks). No single class passes both checks, and a Trainer rejects a foreign module
before calling any of its hooks.

**What Lightning's ecosystem does.** Lightning publishes ``lightning.pytorch`` as a copy of ``pytorch_lightning``
with its imports rewritten at build time, so the same source exists once per package name. Extensions such as
lightning-habana and finetuning-scheduler instead pick one package at import (or install) time, which leaves the
other package's users, or anyone with both installed, with classes their Trainer rejects.

**The design here.** The Lightning-facing modules (:data:`FLAVOURED`: the module, CLI, logger, callbacks and data
modules) are written once, against ``pytorch_lightning``, and served a second time under
``lightning_contrastive.lightning`` with their imports rewritten when they are imported: ``pytorch_lightning`` becomes
``lightning.pytorch`` and ``lightning_contrastive.<flavoured module>`` becomes
``lightning_contrastive.lightning.<flavoured module>`` (Lightning's own rewrite, done at import rather than build time,
so there is one copy of the source and nothing to regenerate). The Lightning-free core (learners, estimators,
meta-gradients, evaluation statistics, checkpoint checks) is shared by both, so a learner or estimator is one object
whichever Trainer runs it. Hence:

- with ``pytorch_lightning.Trainer``: ``from lightning_contrastive import MetaLearningModule``, and
  ``lightning_contrastive.callbacks``, ``.data``, ``.loggers``; the console script ``lightning-contrastive``;
- with ``lightning.Trainer`` (``import lightning as L``): ``from lightning_contrastive.lightning import
  MetaLearningModule``, and ``lightning_contrastive.lightning.callbacks``, ``.data``, ``.loggers``;
  ``python -m lightning_contrastive.lightning.cli``.

Each flavour imports only its own Lightning package, so either works with only that package installed. A mix that
cannot work: a foreign *module* or *data module* is rejected by the Trainer itself, before any of our code runs
(``TypeError: `model` must be a `LightningModule` ..., got MetaLearningModule``, or ``ValueError: Expected a
parent`` for a data module); our callbacks check the module they are given at ``setup`` and raise
:func:`check_same_lightning`'s ``TypeError``, which names the import to use instead.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
from pathlib import Path
from types import CodeType, ModuleType

PACKAGE = "lightning_contrastive"
MIRROR = f"{PACKAGE}.lightning"
"""Where the ``lightning.pytorch`` flavour of every :data:`FLAVOURED` module lives."""

FLAVOURED = ("module", "cli", "loggers", "callbacks", "data")
"""The modules and packages of ``lightning_contrastive`` that import Lightning, and so exist once per package."""

LIGHTNING_PACKAGES = {"pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch"}
"""Each Lightning package by its distribution's import name, with the module prefix of its classes."""

_SOURCE_ROOT = Path(__file__).resolve().parents[1]
_FLAVOURED_IMPORT = re.compile(rf"\b{PACKAGE}\.({'|'.join(FLAVOURED)})\b")


def rewrite_for_lightning(source: str) -> str:
    """``source`` of a flavoured module, rewritten to import ``lightning.pytorch`` and the mirrored siblings.

    Replacements stay within a line, so line numbers (tracebacks, ``inspect``) match the file on disk.
    """
    return _FLAVOURED_IMPORT.sub(rf"{MIRROR}.\1", re.sub(r"\bpytorch_lightning\b", "lightning.pytorch", source))


class _RewritingLoader(importlib.abc.Loader):
    """Executes a flavoured module's source file, rewritten by :func:`rewrite_for_lightning`, as a mirror module.

    Not a ``SourceFileLoader``: that would reuse the original module's cached bytecode, which is not rewritten.
    """

    def __init__(self, origin: Path) -> None:
        self.origin = origin

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        exec(self.get_code(module.__name__), module.__dict__)

    def get_code(self, fullname: str) -> CodeType:  # also what `python -m` runs
        return compile(self.get_source(fullname), str(self.origin), "exec", dont_inherit=True)

    def get_source(self, fullname: str) -> str:
        return rewrite_for_lightning(self.origin.read_text(encoding="utf-8"))


class _MirrorFinder(importlib.abc.MetaPathFinder):
    """Finds ``lightning_contrastive.lightning.<flavoured module>`` as the file of ``lightning_contrastive.<...>``.

    Located by path, not by importing the original, which would import ``pytorch_lightning``.
    """

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        parts = fullname.split(".")
        if parts[:2] != MIRROR.split(".") or len(parts) < 3 or parts[2] not in FLAVOURED:
            return None
        base = _SOURCE_ROOT.joinpath(*parts[2:])
        if (base / "__init__.py").is_file():
            origin, children = base / "__init__.py", []
        elif base.with_suffix(".py").is_file():
            origin, children = base.with_suffix(".py"), None
        else:
            return None
        return importlib.util.spec_from_file_location(
            fullname, origin, loader=_RewritingLoader(origin), submodule_search_locations=children
        )


def install_mirror() -> None:
    """Make ``lightning_contrastive.lightning.<flavoured module>`` importable (idempotent)."""
    if not any(isinstance(finder, _MirrorFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MirrorFinder())


def lightning_package(obj: object) -> str | None:
    """``"pytorch_lightning"`` or ``"lightning"``: the package whose classes ``obj``'s class derives from, if any."""
    for cls in type(obj).__mro__:
        for package, prefix in LIGHTNING_PACKAGES.items():
            if cls.__module__ == prefix or cls.__module__.startswith(f"{prefix}."):
                return package
    return None


def counterpart(module_name: str) -> str:
    """The other flavour's name of one of our flavoured modules, e.g. ``lightning_contrastive.callbacks.x``
    <-> ``lightning_contrastive.lightning.callbacks.x``."""
    if module_name.startswith(f"{MIRROR}."):
        return f"{PACKAGE}.{module_name.removeprefix(f'{MIRROR}.')}"
    return f"{MIRROR}.{module_name.removeprefix(f'{PACKAGE}.')}"


def check_same_lightning(ours: object, running: object) -> None:
    """Raise ``TypeError`` if ``ours`` (one of our Lightning objects) and ``running`` (the Trainer, or the module it
    accepted) come from different Lightning packages, naming the import of ``ours``'s class that fits.
    """
    ours_package, running_package = lightning_package(ours), lightning_package(running)
    if ours_package is None or running_package is None or ours_package == running_package:
        return
    cls = type(ours)
    raise TypeError(
        f"{cls.__name__} from {cls.__module__} is built on {ours_package}, but this Trainer is {running_package}'s, "
        f"and each accepts only its own package's classes. Use `from {counterpart(cls.__module__)} import "
        f"{cls.__name__}` (the {running_package} flavour; see lightning_contrastive.compat.flavours)."
    )
