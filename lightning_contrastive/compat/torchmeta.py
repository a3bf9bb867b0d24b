"""Run torchmeta 1.8 on current torch and torchvision, by patching at run time (opt-in).

torchmeta 1.8.0 (its last release) pins ``torch<1.10`` and ``torchvision<0.11``, so it is installed
with ``pip install --no-deps torchmeta`` beside a current torch, plus its runtime dependencies
(numpy, Pillow, h5py, tqdm, requests, ordered-set) and a torchvision that matches the torch.
Three things then break, and :func:`patch_torchmeta` deals with each without editing torchmeta's files:

1. **Its package import needs torchvision** (``import torchmeta`` imports its transforms and
   dataset utilities, which import torchvision), which ``--no-deps`` does not install. This cannot be
   patched: :func:`patch_torchmeta` checks for it first and raises ``ModuleNotFoundError`` naming the
   install command.
2. **torchvision dropped two private helpers** that ``torchmeta.datasets.utils`` imports at import
   time, for its Google Drive downloads: ``torchvision.datasets.utils._get_confirm_token`` and
   ``_save_response_content`` (removed when torchvision rewrote its Drive downloads). They are
   restored, with the behaviour torchmeta was written against: the confirmation token is read from
   a ``download_warning*`` cookie, and the response is streamed to the file in chunks. Google Drive
   may since have changed what it answers; if a download yields a web page instead of the archive,
   fetch the file by hand.
3. **torch's** ``Subset`` **now requires** ``__getitems__`` of any subclass that overrides
   ``__getitem__`` (its constructor raises ``NotImplementedError`` otherwise), and torchmeta's
   ``SubsetTask``, which every ``ClassSplitter`` task is made of, does not define it.
   ``SubsetTask.__getitems__`` is added, returning ``[task[i] for i in indices]`` through
   torchmeta's own ``__getitem__``.

Each patch is applied only where its target is missing, so calling :func:`patch_torchmeta` again
(or on a torchmeta/torchvision pair that needs fewer fixes) changes nothing.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, Sequence
from typing import Any

_log = logging.getLogger(__name__)

TORCHMETA_PATCHES = (
    "torchvision.datasets.utils._get_confirm_token",
    "torchvision.datasets.utils._save_response_content",
    "torchmeta.utils.data.task.SubsetTask.__getitems__",
)
"""Every attribute :func:`patch_torchmeta` may add, in the order it adds them."""

_INSTALL = (
    "pip install torch==2.14.1 torchvision==0.29.1 && pip install --no-deps torchmeta && "
    "pip install numpy Pillow h5py tqdm requests ordered-set"
)


def patch_torchmeta() -> tuple[str, ...]:
    """Make ``import torchmeta`` and its data loaders work on current torch and torchvision; idempotent.

    Call it once before the first ``import torchmeta`` (the torchvision helpers must exist when
    torchmeta imports them); it imports torchmeta itself. It logs one warning line listing the
    patches it applied, and nothing when it applied none. See the module docstring for what each
    patch fixes and why.

    Returns:
        The names (from :data:`TORCHMETA_PATCHES`) of the attributes this call added; empty when
        everything was already in place.

    Raises:
        ModuleNotFoundError: torchvision or torchmeta is not installed (the message names the install command).
    """
    try:
        import torchvision.datasets.utils as torchvision_utils
    except ImportError as error:
        raise _missing("torchvision") from error
    if importlib.util.find_spec("torchmeta") is None:
        raise _missing("torchmeta")

    applied = []
    for helper in (_get_confirm_token, _save_response_content):
        if not hasattr(torchvision_utils, helper.__name__):
            setattr(torchvision_utils, helper.__name__, helper)
            applied.append(f"torchvision.datasets.utils.{helper.__name__}")

    from torchmeta.utils.data.task import SubsetTask

    if "__getitems__" not in vars(SubsetTask):
        SubsetTask.__getitems__ = _subset_task_getitems
        applied.append("torchmeta.utils.data.task.SubsetTask.__getitems__")

    if applied:
        import torch
        import torchmeta
        import torchvision

        _log.warning(
            "patch_torchmeta: patched torchmeta %s for torch %s and torchvision %s: added %s.",
            torchmeta.__version__,
            torch.__version__,
            torchvision.__version__,
            ", ".join(applied),
        )
    return tuple(applied)


def _missing(name: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(
        f"patch_torchmeta needs {name}, which is not installed. torchmeta 1.8 pins torch<1.10, so install it "
        f"without its dependencies, beside a torchvision that matches your torch: {_INSTALL}",
        name=name,
    )


def _get_confirm_token(response: Any) -> str | None:
    """The Google Drive download-confirmation token from a ``download_warning*`` cookie, or ``None``."""
    for key, value in response.cookies.items():
        if key.startswith("download_warning"):
            return value
    return None


def _save_response_content(response: Any, destination: str, chunk_size: int = 32768) -> None:
    """Stream the body of a ``requests`` response to ``destination``, ``chunk_size`` bytes at a time."""
    chunks: Iterator[bytes] = response.iter_content(chunk_size)
    with open(destination, "wb") as output:
        for chunk in chunks:
            if chunk:  # requests yields empty keep-alive chunks
                output.write(chunk)


def _subset_task_getitems(self: Any, indices: Sequence[int]) -> list[Any]:
    """``SubsetTask.__getitems__``: the examples at ``indices``, each through torchmeta's ``__getitem__``."""
    return [self[index] for index in indices]
