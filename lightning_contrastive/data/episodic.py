"""N-way K-shot episodes from any labelled data, in torchmeta's batch format.

A task draws ``ways`` distinct classes of one meta-split, gives them the labels ``0..ways-1`` in a
random order, and draws ``shots + test_shots`` distinct examples of each: ``shots`` go to the support
set, the rest to the query set, and both sets are shuffled. A meta-batch of ``batch_size`` tasks is
``{"train": (x, y), "test": (x, y)}`` with ``x`` of shape ``(batch_size, ways * shots, *features)`` and
``y`` int64 of shape ``(batch_size, ways * shots)`` (``test_shots`` for ``"test"``), exactly what
torchmeta's ``BatchMetaDataLoader`` yields.

Task ``i`` of a stream is a fixed function of ``(seed, stream, i)``: it does not depend on which worker
or process loads it, in which order, or what was drawn before it. That makes the evaluation episodes a fixed set
(the same every epoch and every run), the training episodes of epoch ``e`` the indices
``[e * num_train_tasks, (e + 1) * num_train_tasks)`` (fresh each epoch), and a training position a
pair ``(epoch, tasks done)`` that a checkpoint can restore.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from lightning_contrastive._repr import settings_repr

Episode = dict[str, tuple[Tensor, Tensor]]
"""One task ``{"train": (x, y), "test": (x, y)}`` without the leading task dimension."""

LabelledData = Dataset | tuple[Tensor, Tensor]
"""Examples with integer class labels: a ``Dataset`` of ``(x, y)`` pairs, or tensors ``(x, y)``."""

META_SPLITS = ("train", "val", "test")
_STREAMS = {meta_split: stream for stream, meta_split in enumerate(META_SPLITS)}


@dataclass(frozen=True)
class TaskDraw:
    """Which classes and examples make up one task, before any image is touched.

    Attributes:
        classes: ``(ways,)`` class indices within the meta-split; ``classes[j]`` gets label ``j``.
        examples: ``(ways, shots + test_shots)`` example indices into the data; row ``j`` holds
            class ``classes[j]``'s support examples first, then its query examples.
        support_order: the shuffle of the support set: its example ``p`` is example ``support_order[p]``
            of the class-major ``ways * shots`` support examples.
        query_order: the same for the ``ways * test_shots`` query examples.
    """

    classes: np.ndarray
    examples: np.ndarray
    support_order: np.ndarray
    query_order: np.ndarray


class ClassificationTasks(Dataset[Episode]):
    """N-way K-shot tasks over the classes of one meta-split; item ``i`` is a fixed function of ``(seed, i)``.

    The split has ``len(class_members) * (1 + len(class_augmentations))`` classes: every base class,
    and one new class per augmentation (torchmeta's ``class_augmentations``, e.g. rotations of
    Omniglot characters). Class ``c`` is base class ``c % num_base`` under augmentation
    ``c // num_base`` (0 is the identity). Indices are unbounded: any ``i >= 0`` is a task.

    Cost per task: one ``numpy`` generator, an ``argsort`` of ``ways x max_class_size`` random keys,
    one gather of the ``ways * (shots + test_shots)`` examples and one per augmented class. The large
    copies are ``numpy`` gathers, and augmentations run per class on small tensors: torch would split
    those copies over its intra-op threads, which stalls (10-100x slower, measured) when the CPU cores
    are busy with other work.

    Args:
        examples: ``(num_examples, *features)`` tensor, or a ``Dataset`` whose items are ``(x, y)``.
        class_members: for each base class of the split, the indices of its examples.
        ways: classes per task (N).
        shots: support examples per class (K).
        test_shots: query examples per class.
        seed: entropy of the task stream, e.g. ``(seed, stream)``; task ``i`` uses ``(*seed, i)``.
        class_augmentations: functions mapping a ``(n, *features)`` batch of one class's examples to the
            examples of a new class (must keep their shape and dtype).
        transform: applied to the ``(n, *features)`` support examples and to the query examples of each
            task, after augmentation (e.g. ``uint8`` pixels to floats).
    """

    def __init__(
        self,
        examples: Tensor | Dataset,
        class_members: Sequence[Tensor | np.ndarray | Sequence[int]],
        ways: int,
        shots: int,
        test_shots: int,
        seed: Sequence[int],
        class_augmentations: Sequence[Callable[[Tensor], Tensor]] = (),
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        _check_counts(ways=ways, shots=shots, test_shots=test_shots)
        members = [np.asarray(indices, dtype=np.int64).reshape(-1) for indices in class_members]
        num_classes = len(members) * (1 + len(class_augmentations))
        if ways > num_classes:
            raise ValueError(
                f"A {ways}-way task needs {ways} classes but this meta-split has {num_classes} "
                f"({len(members)} base classes x {1 + len(class_augmentations)} augmentations). Lower ways."
            )
        sizes = np.array([len(indices) for indices in members])
        per_class = shots + test_shots
        if sizes.min() < per_class:
            smallest = int(sizes.argmin())
            raise ValueError(
                f"Each class needs shots + test_shots = {per_class} distinct examples, but class {smallest} "
                f"of this meta-split has only {sizes[smallest]}. Lower shots or test_shots, or leave out "
                "classes that small."
            )
        self.examples = examples
        self.ways = ways
        self.shots = shots
        self.test_shots = test_shots
        self.seed = tuple(int(word) for word in seed)
        self.class_augmentations = tuple(class_augmentations)
        self.transform = transform
        self.num_classes = num_classes
        self._num_base = len(members)
        self._sizes = sizes
        # Members padded to a (classes, largest class) matrix so one argsort draws every class's examples.
        self._members = np.zeros((len(members), sizes.max()), dtype=np.int64)
        for row, indices in enumerate(members):
            self._members[row, : len(indices)] = indices

    def draw(self, index: int) -> TaskDraw:
        """The classes, examples and orders of task ``index``, without loading any example."""
        if index < 0:
            raise IndexError(f"Task indices are >= 0; got {index}.")
        rng = np.random.default_rng((*self.seed, index))
        classes = rng.choice(self.num_classes, size=self.ways, replace=False)
        base = classes % self._num_base
        # Random keys, with the padding of smaller classes pushed last: the first shots + test_shots
        # positions of each row's argsort are a uniform draw without replacement from that class.
        keys = rng.random((self.ways, self._members.shape[1]))
        keys[np.arange(self._members.shape[1]) >= self._sizes[base, None]] = np.inf
        positions = np.argsort(keys, axis=1)[:, : self.shots + self.test_shots]
        return TaskDraw(
            classes=classes,
            examples=self._members[base[:, None], positions],
            support_order=rng.permutation(self.ways * self.shots),
            query_order=rng.permutation(self.ways * self.test_shots),
        )

    def __getitem__(self, index: int) -> Episode:
        draw = self.draw(index)
        x = self._gather(draw.examples.reshape(-1))
        x = x.reshape(self.ways, self.shots + self.test_shots, *x.shape[1:])
        for label in np.flatnonzero(draw.classes >= self._num_base):
            x[label] = self.class_augmentations[draw.classes[label] // self._num_base - 1](x[label])
        return {
            "train": self._split(x, 0, self.shots, draw.support_order),
            "test": self._split(x, self.shots, self.test_shots, draw.query_order),
        }

    def _split(self, x: Tensor, first: int, per_class: int, order: np.ndarray) -> tuple[Tensor, Tensor]:
        """Examples ``first : first + per_class`` of every class of the ``(ways, shots + test_shots, ...)``
        examples ``x``, in the shuffled ``order`` of their class-major flattening, then ``transform``."""
        labels = order // per_class
        x = torch.from_numpy(x.numpy()[labels, first + order % per_class])
        return (x if self.transform is None else self.transform(x)), torch.from_numpy(labels)

    def _gather(self, rows: np.ndarray) -> Tensor:
        if isinstance(self.examples, Tensor):
            return torch.from_numpy(self.examples.numpy()[rows])
        return torch.stack([torch.as_tensor(self.examples[int(row)][0]) for row in rows])


class EpisodeSampler(DistributedSampler[int]):
    """The task indices one process loads in one epoch: every meta-batch split evenly across processes.

    **Order.** Epoch ``e`` covers task indices ``[0, num_tasks)``, shifted to ``[e * num_tasks, (e + 1) * num_tasks)``
    with ``fresh_per_epoch`` (new tasks every epoch). They come in order, or with ``shuffle_seed`` permuted
    by a generator that :meth:`set_epoch` seeds with ``shuffle_seed + e`` (``DistributedSampler``'s convention;
    Lightning calls it before every epoch, so the order of any epoch can be rebuilt to resume it); a
    second pass without ``set_epoch`` draws a new permutation, like ``RandomSampler`` with a generator.

    **Processes.** Process ``rank`` of ``num_replicas`` loads a distinct share, and the shares cover the
    epoch without repeats. With ``meta_batch_size`` (training) the order is cut into meta-batches of that
    many tasks and each process takes the ``rank``-th of ``num_replicas`` equal contiguous slices of every
    one: a loader with ``batch_size = meta_batch_size // num_replicas`` yields this process's part of each
    meta-batch, and together the processes see exactly the meta-batches of a single process. A trailing
    partial meta-batch is split alike when its size divides by ``num_replicas`` and is dropped otherwise
    (every process must take the same number of steps). Without it (evaluation) the epoch is cut into
    ``num_replicas`` contiguous parts whose sizes differ by at most one: every episode is evaluated once,
    where ``DistributedSampler`` would pad the last part with repeated episodes.

    :meth:`resume` makes the next pass start part-way through an epoch, once (to continue from a
    mid-epoch checkpoint). It subclasses ``DistributedSampler`` because Lightning, under DDP, wraps any
    other sampler in one, which would re-split (and pad) the shares.

    Args:
        num_tasks: tasks per epoch, over all processes.
        fresh_per_epoch: new task indices every epoch instead of the same ones.
        shuffle_seed: permute each epoch's tasks with this seed; ``None`` keeps them in order.
        meta_batch_size: tasks per meta-batch over all processes (a multiple of ``num_replicas``);
            ``None`` splits the epoch as a whole.
        num_replicas: number of processes (``Trainer.world_size``).
        rank: this process's index (``Trainer.global_rank``).
    """

    def __init__(
        self,
        num_tasks: int,
        fresh_per_epoch: bool,
        shuffle_seed: int | None = None,
        meta_batch_size: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        _check_counts(num_tasks=num_tasks, num_replicas=num_replicas)
        if meta_batch_size is not None:
            _check_counts(meta_batch_size=meta_batch_size)
            if meta_batch_size % num_replicas:
                raise ValueError(
                    f"A meta-batch of {meta_batch_size} tasks does not split evenly across {num_replicas} processes "
                    f"(devices x nodes), and every process loads an equal share of it. Make the meta-batch (a data "
                    f"module's batch_size) a multiple of {num_replicas}."
                )
        shuffle = shuffle_seed is not None
        super().__init__(range(num_tasks), num_replicas, rank, shuffle, seed=shuffle_seed or 0)  # type: ignore[arg-type]
        self.num_tasks = num_tasks
        self.fresh_per_epoch = fresh_per_epoch
        self.meta_batch_size = meta_batch_size
        self.num_samples = len(self._share(torch.arange(num_tasks)))
        self.total_size = num_tasks if meta_batch_size is None else self.num_samples * num_replicas
        if self.total_size < num_replicas:
            raise ValueError(
                f"{num_tasks} tasks per epoch leave some of the {num_replicas} processes nothing to load (each needs "
                f"a share); use at least {meta_batch_size or num_replicas} tasks."
            )
        self._passes = 0  # over the current epoch since set_epoch: each draws the next permutation
        self._resume_at: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch``: its task indices and, when shuffled, its permutation."""
        self.epoch = epoch
        self._passes = 0

    def resume(self, epoch: int, tasks_done: int) -> None:
        """Start the next pass at task ``tasks_done`` (over all processes) of ``epoch``; later passes start at 0."""
        self.set_epoch(epoch)
        self._resume_at = (epoch, tasks_done)

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._resume_at is not None:
            epoch, tasks_done = self._resume_at
            start = tasks_done if epoch == self.epoch else 0
            self._resume_at = None
        order = self._order() + (self.epoch * self.num_tasks if self.fresh_per_epoch else 0)
        self._passes += 1
        return iter(self._share(order[start:]).tolist())

    def __len__(self) -> int:
        """The number of indices this process loads in a whole epoch."""
        return self.num_samples

    def _order(self) -> Tensor:
        """``0 .. num_tasks - 1`` in the order of the next pass.

        Pass ``k`` over epoch ``e`` takes the ``k``-th permutation drawn from a generator seeded with
        ``seed + e``; the generator is rebuilt rather than kept, because torch cannot send a ``Generator`` to
        the processes that ``ddp_spawn`` starts.
        """
        if not self.shuffle:
            return torch.arange(self.num_tasks)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        for _ in range(self._passes):  # only passes without set_epoch, i.e. outside a Trainer, repeat this
            torch.randperm(self.num_tasks, generator=generator)
        return torch.randperm(self.num_tasks, generator=generator)

    def _share(self, order: Tensor) -> Tensor:
        """This process's share of the task indices ``order``."""
        count, replicas = len(order), self.num_replicas
        if self.meta_batch_size is None:
            return order[self.rank * count // replicas : (self.rank + 1) * count // replicas]
        full = count - count % self.meta_batch_size
        share = order[:full].view(-1, replicas, self.meta_batch_size // replicas)[:, self.rank].flatten()
        rest = order[full:]
        if len(rest) % replicas:  # a trailing partial meta-batch that does not split evenly is dropped
            return share
        return torch.cat([share, rest.view(replicas, -1)[self.rank]])


def collate_episodes(episodes: Sequence[Episode]) -> Episode:
    """Stack tasks into a torchmeta meta-batch: every tensor gains a leading task dimension.

    Stacks with ``numpy`` (single-threaded) for the reason given in :class:`ClassificationTasks`.
    """
    return {
        key: tuple(torch.from_numpy(np.stack([episode[key][part].numpy() for episode in episodes])) for part in (0, 1))
        for key in ("train", "test")
    }


class MetaBatchDataModule(pl.LightningDataModule):
    """Base of the episodic data modules: meta-batches of seeded tasks, split across processes and resumable.

    A subclass holds task sets whose item ``i`` is a fixed function of ``i`` (and a seed) and builds its
    loaders with :meth:`train_loader` and :meth:`eval_loader` (both use :class:`EpisodeSampler`), which give it:

    - **distributed training**: under ``Trainer(strategy="ddp", devices=N, num_nodes=M)``, ``batch_size`` is
      still the meta-batch, the tasks of one meta-step over all ``N * M`` processes; each process loads a
      distinct ``batch_size / (N * M)`` of them, and DDP's average of the processes' meta-gradients is the
      meta-gradient of the whole meta-batch. A config thus trains the same on any number of devices.
    - **distributed evaluation**: each process evaluates a distinct part of the fixed episodes and none is
      evaluated twice (Lightning's default ``DistributedSampler`` pads with repeats, biasing the mean).
    - **exact resume**: :meth:`state_dict` records the training position, which Lightning saves in every
      checkpoint, and :meth:`load_state_dict` makes the next training pass continue from it, so a resumed
      run sees the same tasks as one never interrupted (on any number of processes).

    Args:
        batch_size: tasks per meta-batch (per meta-step), over all processes.
        eval_batch_size: tasks per batch in evaluation, per process; ``None`` uses ``batch_size``.
        num_workers: data loader worker processes.
    """

    def __init__(self, batch_size: int, eval_batch_size: int | None, num_workers: int) -> None:
        super().__init__()
        eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        _check_counts(batch_size=batch_size, eval_batch_size=eval_batch_size)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self._resume_at: tuple[int, int] | None = None

    def __repr__(self) -> str:
        """``ClassName(setting=value, ...)``: the constructor's arguments, as its ``save_hyperparameters()`` saved
        them (:func:`settings_repr`)."""
        return settings_repr(self, self.hparams)

    def train_loader(
        self,
        tasks: Dataset[Episode],
        num_tasks: int,
        fresh_per_epoch: bool,
        shuffle_seed: int | None = None,
        collate_fn: Callable[[list[Episode]], Episode] | None = None,
    ) -> DataLoader[Episode]:
        """This process's share of meta-batches of ``batch_size`` tasks, continuing a loaded checkpoint's position.

        ``num_tasks``, ``fresh_per_epoch`` and ``shuffle_seed`` are :class:`EpisodeSampler`'s.
        """
        processes, rank = self._processes()
        sampler = EpisodeSampler(num_tasks, fresh_per_epoch, shuffle_seed, self.batch_size, processes, rank)
        if self._resume_at is not None:
            sampler.resume(*self._resume_at)
            self._resume_at = None
        return self._loader(tasks, sampler, self.batch_size // processes, collate_fn)

    def eval_loader(
        self, tasks: Dataset[Episode], num_tasks: int, collate_fn: Callable[[list[Episode]], Episode] | None = None
    ) -> DataLoader[Episode]:
        """This process's distinct part of the first ``num_tasks`` tasks, in batches of ``eval_batch_size``."""
        processes, rank = self._processes()
        sampler = EpisodeSampler(num_tasks, fresh_per_epoch=False, num_replicas=processes, rank=rank)
        return self._loader(tasks, sampler, self.eval_batch_size, collate_fn)

    def state_dict(self) -> dict[str, Any]:
        """The training position ``{"epoch", "tasks_done"}``: where the next training meta-batch comes from.

        Read from the attached trainer's loop progress (meta-batches whose training step finished), because
        the loader itself runs ahead of training by Lightning's prefetched batch. Counted in tasks over all
        processes, so that a run may resume on another number of processes.
        """
        trainer = self.trainer
        if trainer is None:
            return {}
        epoch = trainer.current_epoch
        batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if batches_done >= trainer.num_training_batches:  # saved at the end of the epoch
            epoch, batches_done = epoch + 1, 0
        return {"epoch": epoch, "tasks_done": batches_done * self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next training pass start where :meth:`state_dict` left off."""
        if state_dict:
            self._resume_at = (int(state_dict["epoch"]), int(state_dict["tasks_done"]))

    def _processes(self) -> tuple[int, int]:
        """The number of processes and this one's rank: the attached trainer's, or a single process."""
        trainer = self.trainer
        return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)

    def _loader(
        self,
        tasks: Dataset[Episode],
        sampler: EpisodeSampler,
        batch_size: int,
        collate_fn: Callable[[list[Episode]], Episode] | None,
    ) -> DataLoader[Episode]:
        return DataLoader(
            tasks,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class EpisodicDataModule(MetaBatchDataModule):
    """Seeded N-way K-shot episodes from labelled data with a class split, for training and evaluation.

    - fit: ``num_train_tasks`` tasks per epoch from the ``"train"`` classes, different every epoch
      and fixed by ``seed``; validation: a fixed set of ``num_eval_tasks`` tasks from the ``"val"`` classes;
    - test: a fixed set of ``num_eval_tasks`` tasks from the ``"test"`` classes.

    Give the data directly (``data`` and ``class_splits``), or subclass and override :meth:`load_data`
    (benchmark modules do, to read files in :meth:`setup` rather than at construction).

    Under DDP each process loads a distinct share of every meta-batch and of the evaluation episodes, and
    a run resumed from a mid-epoch checkpoint sees the same tasks as one never interrupted
    (:class:`MetaBatchDataModule`).

    Args:
        data: examples with integer labels: a ``Dataset`` of ``(x, y)`` pairs (labels read from its
            ``targets`` attribute if it has one, else by one pass over it), or tensors ``(x, y)``.
        class_splits: the labels of each meta-split, ``{"train": [...], "val": [...], "test": [...]}``;
            the three must be disjoint.
        ways: classes per task (N).
        shots: support examples per class (K).
        test_shots: query examples per class.
        batch_size: tasks per meta-batch in training, over all processes (a multiple of their number).
        eval_batch_size: tasks per batch in validation and test, per process; ``None`` uses ``batch_size``.
        num_train_tasks: training tasks per epoch (a multiple of ``batch_size`` keeps meta-batches full).
        num_eval_tasks: size of the fixed validation and test task sets (600 is the common protocol).
        seed: fixes the training tasks, and the evaluation tasks unless ``eval_seed`` is given.
        eval_seed: fixes the evaluation tasks; set it to keep the same evaluation episodes across
            runs that differ in ``seed``.
        class_augmentations: each maps one class's ``(n, *features)`` examples to a new class (applied
            within every meta-split, so augmented classes never cross splits).
        transform: applied to the ``(n, *features)`` support and query examples of each task.
        num_workers: data loader worker processes (drawing a task is cheap: 0 is usually fastest).
    """

    def __init__(
        self,
        data: LabelledData | None = None,
        class_splits: Mapping[str, Sequence[int]] | None = None,
        ways: int = 5,
        shots: int = 1,
        test_shots: int = 15,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_train_tasks: int = 3200,
        num_eval_tasks: int = 600,
        seed: int = 0,
        eval_seed: int | None = None,
        class_augmentations: Sequence[Callable[[Tensor], Tensor]] = (),
        transform: Callable[[Tensor], Tensor] | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        _check_counts(
            ways=ways,
            shots=shots,
            test_shots=test_shots,
            num_train_tasks=num_train_tasks,
            num_eval_tasks=num_eval_tasks,
        )
        if (data is None) != (class_splits is None):
            raise ValueError(
                "Pass data and class_splits together (or neither, in a subclass that overrides load_data)."
            )
        if data is None and type(self).load_data is EpisodicDataModule.load_data:
            raise ValueError(
                "EpisodicDataModule needs data and class_splits, e.g. EpisodicDataModule((x, y), "
                '{"train": [...], "val": [...], "test": [...]}); or subclass it and override load_data().'
            )
        if class_splits is not None:
            _check_class_splits(class_splits)
        self._data = data
        self._class_splits = class_splits
        self.ways = ways
        self.shots = shots
        self.test_shots = test_shots
        self.num_train_tasks = num_train_tasks
        self.num_eval_tasks = num_eval_tasks
        self.seed = seed
        self.eval_seed = seed if eval_seed is None else eval_seed
        self.class_augmentations = tuple(class_augmentations)
        self.transform = transform
        self._tasks: dict[str, ClassificationTasks] = {}
        self._split_labels: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        """``EpisodicDataModule(data=..., class_splits=..., ways=..., ...)`` with the settings in effect (``eval_seed``
        and ``eval_batch_size`` resolved), or, for a subclass that saved its constructor's arguments with
        ``save_hyperparameters()``, those."""
        if self.hparams:
            return super().__repr__()
        settings: dict[str, Any] = {"data": self._data, "class_splits": self._class_splits}
        for name in list(inspect.signature(EpisodicDataModule).parameters)[2:]:  # held under their own names
            settings[name] = getattr(self, name)
        return settings_repr(self, settings)

    def load_data(self) -> tuple[LabelledData, Mapping[str, Sequence[int]]]:
        """The labelled data and its class split; runs once, in :meth:`setup`. Subclasses read files here."""
        assert self._data is not None and self._class_splits is not None  # guaranteed by __init__
        return self._data, self._class_splits

    def setup(self, stage: str | None = None) -> None:
        """Load the data (once) and build the task set of every meta-split; checks that each can make tasks."""
        if self._tasks:
            return
        data, class_splits = self.load_data()
        _check_class_splits(class_splits)
        examples, labels = _examples_and_labels(data)
        members = _class_members(labels)
        for meta_split in META_SPLITS:
            missing = sorted(set(class_splits[meta_split]) - set(members))
            if missing:
                raise ValueError(
                    f'class_splits["{meta_split}"] names classes with no examples: {missing[:10]}. '
                    "Use the labels that occur in the data."
                )
            self._split_labels[meta_split] = list(class_splits[meta_split])
            seed = (self.seed if meta_split == "train" else self.eval_seed, _STREAMS[meta_split])
            try:
                self._tasks[meta_split] = ClassificationTasks(
                    examples,
                    [members[label] for label in self._split_labels[meta_split]],
                    self.ways,
                    self.shots,
                    self.test_shots,
                    seed=seed,
                    class_augmentations=self.class_augmentations,
                    transform=self.transform,
                )
            except ValueError as error:
                raise ValueError(f'Meta-split "{meta_split}": {error}') from error

    def tasks(self, meta_split: str) -> ClassificationTasks:
        """The task set of ``meta_split`` (``"train"``, ``"val"`` or ``"test"``); call :meth:`setup` first."""
        if meta_split not in META_SPLITS:
            raise ValueError(f"meta_split must be one of {META_SPLITS}; got {meta_split!r}.")
        if not self._tasks:
            raise RuntimeError(f"Call {type(self).__name__}.setup() before asking for tasks.")
        return self._tasks[meta_split]

    def class_labels(self, meta_split: str) -> list[int]:
        """The labels of the base classes of ``meta_split``: task class ``c`` is label ``c % n`` under
        augmentation ``c // n``, where ``n`` is the length of this list."""
        self.tasks(meta_split)  # checks the name and that setup() ran
        return list(self._split_labels[meta_split])

    def train_dataloader(self) -> DataLoader[Episode]:
        tasks = self.tasks("train")
        return self.train_loader(tasks, self.num_train_tasks, fresh_per_epoch=True, collate_fn=collate_episodes)

    def val_dataloader(self) -> DataLoader[Episode]:
        return self.eval_loader(self.tasks("val"), self.num_eval_tasks, collate_fn=collate_episodes)

    def test_dataloader(self) -> DataLoader[Episode]:
        return self.eval_loader(self.tasks("test"), self.num_eval_tasks, collate_fn=collate_episodes)


def _examples_and_labels(data: LabelledData) -> tuple[Tensor | Dataset, Tensor]:
    if isinstance(data, (tuple, list)):
        if len(data) != 2 or not all(isinstance(part, Tensor) for part in data):
            raise ValueError("Tensor data must be a pair (x, y) of tensors.")
        x, y = data
        if y.dim() != 1 or len(x) != len(y):
            raise ValueError(
                f"Labels y must be a 1-d tensor with one entry per example; got x {tuple(x.shape)}, y {tuple(y.shape)}."
            )
        return x, y
    if not isinstance(data, Dataset):
        raise ValueError(
            f"data must be a torch Dataset of (x, y) pairs or a tuple of tensors; got {type(data).__name__}."
        )
    targets = getattr(data, "targets", None)
    if targets is None:
        targets = [int(data[index][1]) for index in range(len(data))]  # type: ignore[arg-type]
    return data, torch.as_tensor(targets)


def _class_members(labels: Tensor) -> dict[int, Tensor]:
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"Class labels must be integers; got dtype {labels.dtype}.")
    order = torch.argsort(labels, stable=True)
    classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
    return dict(zip(classes.tolist(), torch.split(order, counts.tolist()), strict=True))


def _check_class_splits(class_splits: Mapping[str, Sequence[int]]) -> None:
    if set(class_splits) != set(META_SPLITS):
        raise ValueError(f'class_splits needs exactly the keys "train", "val" and "test"; got {sorted(class_splits)}.')
    seen: dict[int, str] = {}
    for meta_split in META_SPLITS:
        classes = list(class_splits[meta_split])
        if not classes:
            raise ValueError(f'class_splits["{meta_split}"] is empty; every meta-split needs classes.')
        for label in classes:
            if label in seen:
                raise ValueError(
                    f'Class {label} is in both class_splits["{seen[label]}"] and class_splits["{meta_split}"]; '
                    "meta-splits must not share classes."
                )
            seen[label] = meta_split


def _check_counts(**counts: int) -> None:
    for name, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {count!r}.")
