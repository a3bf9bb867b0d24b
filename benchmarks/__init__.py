"""Benchmarks and the paper reproduction, run from the repository root as ``python -m benchmarks.<name>``.

Top level: the benchmarks behind the tables of ``docs/results/`` (``meta_step``, ``gradient_quality``, ``data_loading``,
``contrastive_floor``, ``reproduce``, ``mutations``). ``benchmarks.diagnostics``: the estimator diagnostics.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
"""The checkout the benchmarks run from (their commands run with it as the working directory)."""
OMNIGLOT_ROOT_ENV_VAR = "LIGHTNING_CONTRASTIVE_OMNIGLOT_ROOT"


def omniglot_root() -> Path:
    """The folder of the Omniglot zips: ``$LIGHTNING_CONTRASTIVE_OMNIGLOT_ROOT``, else ``shared/data/omniglot`` beside
    the checkout (``../shared/data/omniglot`` from the repository root, as the reproduction's configs name it).

    A benchmark's own argument for it (``--root``, ``--omniglot``, ``--set=--data.root=...``) overrides both.
    """
    configured = os.environ.get(OMNIGLOT_ROOT_ENV_VAR)
    return Path(configured) if configured else REPOSITORY.parent / "shared" / "data" / "omniglot"


def cpu_model() -> str:
    """This machine's CPU model as the benchmarks record it: ``/proc/cpuinfo``'s model name where there is one (Linux),
    else what ``platform`` says, else ``unknown``."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return next(names, platform.processor() or "unknown")
