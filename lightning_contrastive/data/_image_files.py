"""Few-shot image datasets read from files: the base of the Omniglot and miniImageNet data modules, and the cache of
their decoded images."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_contrastive.data.episodic import EpisodicDataModule


def check_image_size(image_size: int) -> None:
    """Raise ``ValueError`` unless ``image_size`` (the side of the square images) is a whole number >= 1."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be an integer >= 1; got {image_size!r}.")


def decode_once(cache_file: Path | None, decode: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``decode()``'s tensors and plain values, loaded from ``cache_file`` if it exists, else decoded and (with a
    ``cache_file``) saved there.

    Saved atomically (written to a temporary file, then renamed), so that a concurrent reader never sees half a cache
    file; loaded with ``torch.load(..., weights_only=True)``, so the payload holds tensors, strings, numbers and
    containers only. The caller keys ``cache_file``'s name by what the payload depends on (the files' names, sizes and
    modification times, the image size), so a changed file is decoded again.
    """
    if cache_file is not None and cache_file.is_file():
        return torch.load(cache_file, weights_only=True)
    payload = decode()
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        handle, partial_file = tempfile.mkstemp(prefix=f".{cache_file.name}.", dir=cache_file.parent)
        os.close(handle)
        try:
            torch.save(payload, partial_file)
            os.replace(partial_file, cache_file)
        finally:
            if os.path.exists(partial_file):
                os.remove(partial_file)
    return payload


def cache_path(cache_dir: str | Path | None, name: str) -> Path | None:
    """The file ``name`` in ``cache_dir`` (``~`` expanded), or ``None`` without a ``cache_dir``."""
    return None if cache_dir is None else Path(cache_dir).expanduser() / name


class ImageFilesDataModule(EpisodicDataModule):
    """Episodes of an image dataset whose files are in ``root``, decoded once at ``image_size`` pixels square
    (optionally cached in ``cache_dir``) by the subclass's :meth:`load_data`, which also gives the class split.

    The arguments are those of :class:`~lightning_contrastive.data.episodic.EpisodicDataModule` (less the data,
    which the subclass reads) and ``root``, ``image_size`` and ``cache_dir``, kept as attributes of those names.
    """

    def __init__(
        self,
        root: str,
        ways: int,
        shots: int,
        test_shots: int,
        batch_size: int,
        eval_batch_size: int | None,
        num_train_tasks: int,
        num_eval_tasks: int,
        image_size: int,
        cache_dir: str | None,
        seed: int,
        eval_seed: int | None,
        num_workers: int,
        class_augmentations: Sequence[Callable[[Tensor], Tensor]] = (),
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        check_image_size(image_size)
        super().__init__(
            ways=ways,
            shots=shots,
            test_shots=test_shots,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_train_tasks=num_train_tasks,
            num_eval_tasks=num_eval_tasks,
            seed=seed,
            eval_seed=eval_seed,
            class_augmentations=class_augmentations,
            transform=transform,
            num_workers=num_workers,
        )
        self.root = root
        self.image_size = image_size
        self.cache_dir = cache_dir
