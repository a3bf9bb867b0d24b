"""torchmeta meta-datasets as a Lightning data module, batched by torchmeta's own ``BatchMetaDataLoader``.

torchmeta is optional and imported only when a loader is built. On current torch and torchvision it
needs :func:`lightning_contrastive.compat.patch_torchmeta` called before its first import.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Sampler

from lightning_contrastive._repr import settings_repr
from lightning_contrastive.data.episodic import _STREAMS, META_SPLITS, EpisodeSampler, _check_counts

TaskIndex = int | tuple[int, ...]
"""What a torchmeta meta-dataset is indexed by: a tuple of class indices for a ``CombinationMetaDataset``
(e.g. Omniglot, miniImageNet), an integer for any other ``MetaDataset`` (e.g. Sinusoid)."""


class TorchmetaTaskSampler(Sampler[TaskIndex]):
    """Seeded task indices for a torchmeta meta-dataset: task ``i`` is a fixed function of ``(*seed, i)``.

    For a ``CombinationMetaDataset`` the index is ``num_classes_per_task`` distinct classes, drawn
    uniformly (in random order, so the labels ``0..N-1`` fall on them at random); for other
    meta-datasets it is an integer drawn uniformly from ``range(len(dataset))``. Which ``i`` an epoch
    visits is up to ``episodes`` (fresh ones every epoch, or the same ones).

    torchmeta's own samplers are not used because its random one draws from Python's global
    ``random`` state and makes an epoch of every class combination (about 10^15 for 5-way Omniglot),
    and its sequential one lists combinations in order, so consecutive tasks share all but one class.

    Args:
        dataset: a torchmeta ``MetaDataset``.
        episodes: which task numbers ``i`` each epoch visits.
        seed: entropy of the task stream.
    """

    def __init__(self, dataset: Any, episodes: EpisodeSampler, seed: Sequence[int]) -> None:
        from torchmeta.utils.data import CombinationMetaDataset

        self.num_classes: int | None = None
        self.num_tasks: int | None = None
        self.ways = 0
        if isinstance(dataset, CombinationMetaDataset):  # its len() is a binomial coefficient, often huge: unused
            self.num_classes = len(dataset.dataset)
            self.ways = dataset.num_classes_per_task
            if self.ways > self.num_classes:
                raise ValueError(
                    f"A {self.ways}-way task needs {self.ways} classes but this meta-dataset "
                    f"({type(dataset).__name__}, meta-split {dataset.meta_split!r}) has {self.num_classes}. Lower ways."
                )
        else:
            self.num_tasks = len(dataset)
        self.episodes = episodes
        self.seed = tuple(int(word) for word in seed)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every epoch; the next pass visits that epoch's tasks."""
        self.episodes.set_epoch(epoch)

    def task_index(self, number: int) -> TaskIndex:
        """The index of task ``number`` of the stream."""
        rng = np.random.default_rng((*self.seed, number))
        if self.num_classes is not None:
            return tuple(rng.choice(self.num_classes, size=self.ways, replace=False).tolist())
        assert self.num_tasks is not None
        return int(rng.integers(self.num_tasks))

    def __iter__(self) -> Iterator[TaskIndex]:
        return (self.task_index(number) for number in self.episodes)

    def __len__(self) -> int:
        return len(self.episodes)


class TorchmetaDataModule(pl.LightningDataModule):
    """Meta-batches of torchmeta meta-datasets, collated by torchmeta's ``BatchMetaDataLoader``.

    Wraps any meta-dataset whose tasks torchmeta splits into ``"train"`` (support) and ``"test"``
    (query) sets: those of torchmeta's helpers (``torchmeta.datasets.helpers.omniglot``,
    ``miniimagenet``, ..., ``torchmeta.toy.helpers.sinusoid``), or one built by hand with a
    ``ClassSplitter``. Its batches ``{"train": (x, y), "test": (x, y)}`` feed
    :class:`~lightning_contrastive.module.MetaLearningModule` unchanged; torchmeta's sinusoid yields
    float64 tensors, which the module casts to its parameters' dtype.

    Which tasks (class combinations, or task numbers for the toy datasets) make up an epoch is drawn
    here by :class:`TorchmetaTaskSampler`: ``num_train_tasks`` fresh ones per training epoch, fixed
    by ``seed``, and the same ``num_eval_tasks`` for validation and test every time. Which examples of
    those classes a task shows is torchmeta's choice (its ``ClassSplitter``, seeded by the helper's
    ``seed``); the order of examples within a task depends on the tasks drawn before it.

    Use :meth:`from_helper` to build every meta-split with one torchmeta helper. Unlike the episodic
    modules, this one records no mid-epoch training position (a resumed run could not replay torchmeta's
    stateful example order anyway) and has been tested on a single process only.

    Args:
        train: the meta-training meta-dataset, or ``None`` (no ``fit``).
        val: the meta-validation meta-dataset, or ``None`` (``fit`` runs without validation).
        test: the meta-test meta-dataset, or ``None`` (no ``test``).
        batch_size: tasks per meta-batch in training.
        eval_batch_size: tasks per batch in validation and test; ``None`` uses ``batch_size``.
        num_train_tasks: training tasks per epoch (a multiple of ``batch_size`` keeps meta-batches full).
        num_eval_tasks: size of the fixed validation and test task sets (600 is the common protocol).
        seed: fixes the training tasks, and the evaluation tasks unless ``eval_seed`` is given.
        eval_seed: fixes the validation and test tasks.
        num_workers: data loader worker processes.
    """

    def __init__(
        self,
        train: Any = None,
        val: Any = None,
        test: Any = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_train_tasks: int = 3200,
        num_eval_tasks: int = 600,
        seed: int = 0,
        eval_seed: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_counts(
            batch_size=batch_size,
            eval_batch_size=batch_size if eval_batch_size is None else eval_batch_size,
            num_train_tasks=num_train_tasks,
            num_eval_tasks=num_eval_tasks,
        )
        self.datasets = {"train": train, "val": val, "test": test}
        if all(dataset is None for dataset in self.datasets.values()):
            raise ValueError(
                "TorchmetaDataModule needs at least one meta-dataset, e.g. TorchmetaDataModule(train=omniglot("
                '"data", shots=1, ways=5, test_shots=15, meta_split="train")), or TorchmetaDataModule.from_helper(...).'
            )
        for meta_split, dataset in self.datasets.items():
            if dataset is not None and not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
                raise ValueError(
                    f"{meta_split} must be a torchmeta meta-dataset (e.g. from torchmeta.datasets.helpers.omniglot); "
                    f"got {type(dataset).__name__}."
                )
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_train_tasks = num_train_tasks
        self.num_eval_tasks = num_eval_tasks
        self.seed = seed
        self.eval_seed = seed if eval_seed is None else eval_seed
        self.num_workers = num_workers

    def __repr__(self) -> str:
        """``TorchmetaDataModule(train=<... of N items>, ..., batch_size=16, ...)`` with the settings in effect
        (``eval_seed`` and ``eval_batch_size`` resolved)."""
        settings: dict[str, Any] = dict(self.datasets)
        for name in list(inspect.signature(TorchmetaDataModule).parameters)[3:]:  # held under their own names
            settings[name] = getattr(self, name)
        return settings_repr(self, settings)

    @classmethod
    def from_helper(
        cls,
        helper: Callable[..., Any],
        helper_kwargs: Mapping[str, Any],
        meta_splits: Sequence[str] = META_SPLITS,
        **settings: Any,
    ) -> TorchmetaDataModule:
        """Build each of ``meta_splits`` as ``helper(**helper_kwargs, meta_split=...)``.

        For torchmeta's dataset helpers, e.g.
        ``TorchmetaDataModule.from_helper(omniglot, {"folder": "data", "shots": 1, "ways": 5, "test_shots": 15,
        "download": True}, batch_size=32)``. The toy helpers (``sinusoid``) have no meta-splits: build
        their meta-datasets (with different seeds) and pass them to the constructor.

        Args:
            helper: a torchmeta helper that takes ``meta_split``.
            helper_kwargs: its other arguments.
            meta_splits: the meta-splits to build (e.g. ``("train", "test")`` for Omniglot without the
                Vinyals split, which has no validation classes).
            settings: the constructor's other arguments (``batch_size``, ``num_train_tasks``, ...).
        """
        unknown = sorted(set(meta_splits) - set(META_SPLITS))
        if unknown or not meta_splits:
            raise ValueError(f"meta_splits must be some of {META_SPLITS}; got {tuple(meta_splits)}.")
        if "meta_split" in helper_kwargs:
            raise ValueError("from_helper sets meta_split for each meta-split; leave it out of helper_kwargs.")
        datasets = {meta_split: helper(**helper_kwargs, meta_split=meta_split) for meta_split in meta_splits}
        return cls(**datasets, **settings)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", EpisodeSampler(self.num_train_tasks, fresh_per_epoch=True), self.batch_size)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.datasets["val"] is None:
            return []  # Lightning then skips validation
        return self._loader("val", EpisodeSampler(self.num_eval_tasks, fresh_per_epoch=False), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", EpisodeSampler(self.num_eval_tasks, fresh_per_epoch=False), self.eval_batch_size)

    def _loader(self, meta_split: str, episodes: EpisodeSampler, batch_size: int) -> DataLoader:
        from torchmeta.utils.data import BatchMetaDataLoader

        dataset = self.datasets[meta_split]
        if dataset is None:
            raise ValueError(
                f"This TorchmetaDataModule has no {meta_split} meta-dataset; pass {meta_split}=... "
                f"(or include {meta_split!r} in from_helper's meta_splits)."
            )
        seed = (self.seed if meta_split == "train" else self.eval_seed, _STREAMS[meta_split])
        sampler = TorchmetaTaskSampler(dataset, episodes, seed)
        return BatchMetaDataLoader(
            dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=self.num_workers
        )
