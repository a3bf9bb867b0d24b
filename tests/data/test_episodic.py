"""Generic N-way K-shot episodes: torchmeta's batch format, task invariants, seeding, and resuming a Trainer."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from lightning_contrastive.data import MiniImagenetDataModule, OmniglotDataModule, SinusoidDataModule
from lightning_contrastive.data.episodic import ClassificationTasks, EpisodeSampler, EpisodicDataModule
from lightning_contrastive.tasks import split_batch

NUM_CLASSES, PER_CLASS = 30, 12
SPLITS = {"train": list(range(0, 18)), "val": list(range(18, 24)), "test": list(range(24, 30))}


def labelled_vectors() -> tuple[Tensor, Tensor]:
    """Example ``i`` is the vector ``(label, i, 1)``, so a batch shows which class and example it holds."""
    labels = torch.arange(NUM_CLASSES).repeat(PER_CLASS)  # classes interleaved, not grouped
    index = torch.arange(len(labels))
    return torch.stack([labels, index, torch.ones_like(index)], dim=1), labels


def module(**overrides: object) -> EpisodicDataModule:
    settings = {"ways": 5, "shots": 2, "test_shots": 3, "batch_size": 4, "num_train_tasks": 8, "num_eval_tasks": 6}
    settings.update(overrides)
    datamodule = EpisodicDataModule(labelled_vectors(), SPLITS, **settings)
    datamodule.setup()
    return datamodule


def test_batches_have_torchmeta_format() -> None:
    datamodule = module()
    batch = next(iter(datamodule.train_dataloader()))
    (xs, ys), (xq, yq) = batch["train"], batch["test"]
    assert xs.shape == (4, 5 * 2, 3) and xq.shape == (4, 5 * 3, 3)
    assert ys.dtype == yq.dtype == torch.int64 and ys.shape == (4, 10) and yq.shape == (4, 15)
    for labels, per_class in ((ys, 2), (yq, 3)):
        counts = torch.stack([torch.bincount(row, minlength=5) for row in labels])
        assert (counts == per_class).all()
    assert len(split_batch(batch)) == 4
    assert len(datamodule.train_dataloader()) == 2 and len(datamodule.val_dataloader()) == 2


def test_every_task_is_n_distinct_classes_with_disjoint_support_and_query() -> None:
    datamodule = module(ways=6, shots=3, test_shots=4)
    for meta_split in ("train", "val", "test"):
        allowed = set(SPLITS[meta_split])
        for index in range(40):
            episode = datamodule.tasks(meta_split)[index]
            (xs, ys), (xq, yq) = episode["train"], episode["test"]
            classes_by_label = {}
            for x, y in ((xs, ys), (xq, yq)):
                for example, label in zip(x.tolist(), y.tolist(), strict=True):
                    assert classes_by_label.setdefault(label, example[0]) == example[0]
            assert sorted(classes_by_label) == list(range(6))
            assert len(set(classes_by_label.values())) == 6 and set(classes_by_label.values()) <= allowed
            support, query = set(xs[:, 1].tolist()), set(xq[:, 1].tolist())
            assert len(support) == 6 * 3 and len(query) == 6 * 4 and not support & query


def test_labels_are_shuffled_per_task() -> None:
    tasks = module().tasks("train")
    label_zero_class = {int(tasks[index]["train"][0][tasks[index]["train"][1] == 0][0, 0]) for index in range(30)}
    assert len(label_zero_class) > 5  # label 0 names a different class from task to task
    assert any(not torch.equal(tasks[index]["test"][1], tasks[index]["test"][1].sort().values) for index in range(5))


def test_dataset_input_gives_the_same_tasks_as_tensors() -> None:
    x, y = labelled_vectors()

    class WithTargets(Dataset):
        targets = y.tolist()

        def __len__(self) -> int:
            return len(y)

        def __getitem__(self, index: int) -> tuple[Tensor, int]:
            return x[index], int(y[index])

    reference = module().tasks("val")
    for data in (TensorDataset(x, y), WithTargets()):
        datamodule = EpisodicDataModule(data, SPLITS, ways=5, shots=2, test_shots=3)
        datamodule.setup()
        for index in range(5):
            for key in ("train", "test"):
                assert all(map(torch.equal, datamodule.tasks("val")[index][key], reference[index][key]))


def test_class_augmentations_make_new_classes_in_the_same_split() -> None:
    negate = partial(torch.mul, other=-1)
    datamodule = module(ways=8, class_augmentations=[negate])
    tasks = datamodule.tasks("train")
    assert tasks.num_classes == 2 * len(SPLITS["train"])
    labels = datamodule.class_labels("train")
    x, _ = labelled_vectors()
    seen_augmented = False
    for index in range(20):
        draw, episode = tasks.draw(index), tasks[index]
        xs, ys = episode["train"]
        for label, task_class in enumerate(draw.classes):
            augmented = task_class >= len(labels)
            seen_augmented |= bool(augmented)
            rows = draw.examples[label, : tasks.shots]
            expected = -x[rows] if augmented else x[rows]
            got = xs[ys == label]  # shuffled: compare as sets of rows
            assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))
            assert int(expected[0, 0].abs()) == labels[task_class % len(labels)]
    assert seen_augmented


def test_uneven_classes_draw_only_their_own_examples() -> None:
    labels = torch.tensor([0] * 3 + [1] * 10 + [2] * 5 + [3] * 4 + [4] * 7 + [5] * 3)
    x = torch.arange(len(labels)).unsqueeze(1)
    tasks = ClassificationTasks(x, [torch.nonzero(labels == c).flatten() for c in range(6)], 3, 1, 2, seed=(0,))
    drawn = set()
    for index in range(300):
        draw = tasks.draw(index)
        for label, task_class in enumerate(draw.classes):
            assert (labels[draw.examples[label]] == task_class).all()
            assert len(set(draw.examples[label].tolist())) == 3
        drawn |= set(draw.examples.reshape(-1).tolist())
    assert drawn == set(range(len(labels)))  # every example of every class is reachable


def test_evaluation_tasks_are_fixed_and_training_tasks_fresh_each_epoch() -> None:
    first, second = module(seed=3), module(seed=3)

    def batches(loader: torch.utils.data.DataLoader, epoch: int) -> list[Tensor]:
        loader.sampler.set_epoch(epoch)
        return [batch["train"][0] for batch in loader]

    for loader_name in ("val_dataloader", "test_dataloader"):
        reference = batches(getattr(first, loader_name)(), 0)
        assert all(map(torch.equal, reference, batches(getattr(first, loader_name)(), 5)))  # every epoch
        assert all(map(torch.equal, reference, batches(getattr(second, loader_name)(), 0)))  # every run
    epoch_zero = batches(first.train_dataloader(), 0)
    assert all(map(torch.equal, epoch_zero, batches(second.train_dataloader(), 0)))
    assert not any(map(torch.equal, epoch_zero, batches(first.train_dataloader(), 1)))
    assert not torch.equal(epoch_zero[0], batches(module(seed=4).train_dataloader(), 0)[0])
    # eval_seed pins the evaluation tasks across training seeds.
    pinned = [batches(module(seed=s, eval_seed=7).val_dataloader(), 0) for s in (1, 2)]
    assert all(map(torch.equal, *pinned))


def test_sampler_resumes_part_way_through_an_epoch_once() -> None:
    sampler = EpisodeSampler(num_tasks=5, fresh_per_epoch=True)
    sampler.resume(epoch=2, tasks_done=3)
    assert list(sampler) == [13, 14]
    assert list(sampler) == [10, 11, 12, 13, 14]
    sampler.resume(epoch=2, tasks_done=3)
    sampler.set_epoch(3)  # the checkpoint's epoch had ended: nothing to skip
    assert list(sampler) == list(range(15, 20))
    assert list(EpisodeSampler(num_tasks=3, fresh_per_epoch=False)) == [0, 1, 2]


class BatchRecorder(pl.LightningModule):
    """A one-parameter model that records the examples of every training and validation batch."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.seen: list[Tensor] = []
        self.validated: list[Tensor] = []

    def training_step(self, batch: dict[str, tuple[Tensor, Tensor]], batch_idx: int) -> Tensor:
        self.seen.append(batch["train"][0][..., 1].clone())
        return (self.scale * batch["test"][0].float()).mean()

    def validation_step(self, batch: dict[str, tuple[Tensor, Tensor]], batch_idx: int) -> None:
        self.validated.append(batch["test"][0][..., 1].clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


RESUME_SETTINGS = {"num_train_tasks": 14, "batch_size": 4}  # 4 batches per epoch, the last one partial


def fit(tmp_path: Path, ckpt_path: Path | None = None) -> BatchRecorder:
    """Three epochs of training; checkpointed after every step unless resumed."""
    model = BatchRecorder()
    every_step = pl.callbacks.ModelCheckpoint(tmp_path, "{step}", save_top_k=-1, every_n_train_steps=1)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=3,
        num_sanity_val_steps=0,
        logger=False,
        callbacks=[every_step] if ckpt_path is None else [],
        enable_checkpointing=ckpt_path is None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=module(**RESUME_SETTINGS), ckpt_path=ckpt_path)
    return model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[BatchRecorder, Path]:
    checkpoints = tmp_path_factory.mktemp("uninterrupted")
    return fit(checkpoints), checkpoints


def test_a_trainer_validates_on_the_same_tasks_every_epoch(uninterrupted: tuple[BatchRecorder, Path]) -> None:
    validated = uninterrupted[0].validated
    assert len(validated) == 3 * 2  # 6 tasks in batches of 4, each epoch
    assert all(map(torch.equal, validated[:2], validated[2:4])) and all(map(torch.equal, validated[:2], validated[4:]))


# Lightning warns because it cannot see that the data module, not the loader, restores the position;
# the resumed runs leave out the uninterrupted run's checkpoint callback on purpose.
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("step", [2, 4, 5], ids=["mid-epoch", "epoch-end", "mid-second-epoch"])
def test_resuming_a_trainer_sees_the_same_tasks_as_an_uninterrupted_run(
    uninterrupted: tuple[BatchRecorder, Path], tmp_path: Path, step: int
) -> None:
    seen, checkpoints = uninterrupted[0].seen, uninterrupted[1]
    resumed = fit(tmp_path, ckpt_path=checkpoints / f"step={step}.ckpt").seen
    assert len(seen) == 12 and len(resumed) == 12 - step
    assert all(map(torch.equal, resumed, seen[step:]))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"ways": 0}, "ways must be an integer >= 1"),
        ({"shots": True}, "shots must be an integer >= 1"),
        ({"num_eval_tasks": 0}, "num_eval_tasks must be"),
        ({"class_splits": {"train": [0], "val": [1]}}, 'exactly the keys "train", "val" and "test"'),
        ({"class_splits": {"train": [0, 1], "val": [1], "test": [2]}}, "meta-splits must not share classes"),
        ({"class_splits": {"train": [0], "val": [], "test": [2]}}, "is empty"),
        ({"data": None}, "Pass data and class_splits together"),
    ],
)
def test_bad_arguments_fail_at_construction(arguments: dict, message: str) -> None:
    settings = {"data": labelled_vectors(), "class_splits": SPLITS, **arguments}
    with pytest.raises(ValueError, match=message):
        EpisodicDataModule(**settings)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"ways": 7}, r'Meta-split "val": A 7-way task needs 7 classes but this meta-split has 6'),
        ({"shots": 5, "test_shots": 8}, "shots \\+ test_shots = 13 distinct examples"),
        ({"class_splits": {"train": [0], "val": [1], "test": [99]}}, "classes with no examples: \\[99\\]"),
    ],
)
def test_splits_that_cannot_make_tasks_fail_at_setup(arguments: dict, message: str) -> None:
    settings = {"data": labelled_vectors(), "class_splits": SPLITS, "ways": 1, "test_shots": 3, **arguments}
    datamodule = EpisodicDataModule(**settings)
    with pytest.raises(ValueError, match=message):
        datamodule.setup()


def test_non_integer_labels_are_rejected() -> None:
    x, y = labelled_vectors()
    with pytest.raises(ValueError, match="Class labels must be integers"):
        EpisodicDataModule((x, y.float()), SPLITS).setup()
    assert np.array_equal(module().class_labels("test"), SPLITS["test"])


def test_the_repr_shows_the_settings_in_effect_and_the_data_by_its_size() -> None:
    datamodule = EpisodicDataModule(labelled_vectors(), SPLITS, ways=5, shots=2, batch_size=4, eval_seed=7)
    assert repr(datamodule) == (
        "EpisodicDataModule(data=(Tensor(shape=(360, 3), dtype=torch.int64), Tensor(shape=(360,), dtype=torch.int64)), "
        "class_splits={'train': [0, 1, 2, 3, ... 18 items], 'val': [18, 19, 20, 21, ... 6 items], "
        "'test': [24, 25, 26, 27, ... 6 items]}, ways=5, shots=2, test_shots=15, batch_size=4, eval_batch_size=4, "
        "num_train_tasks=3200, num_eval_tasks=600, seed=0, eval_seed=7, class_augmentations=(), transform=None, "
        "num_workers=0)"
    )
    assert repr(EpisodicDataModule(TensorDataset(*labelled_vectors()), SPLITS)).startswith(
        "EpisodicDataModule(data=<TensorDataset of 360 items>, "
    )


@pytest.mark.parametrize(
    ("cls", "settings"),
    [
        (OmniglotDataModule, {"root": "data/omniglot", "ways": 20, "split_by": "alphabet", "cache_dir": "~/cache"}),
        (MiniImagenetDataModule, {"root": "mini", "shots": 5, "normalize": False, "eval_seed": 3}),
        (SinusoidDataModule, {"shots": 5, "amplitude_range": (1.0, 2.0), "noise_std": 0.1}),
    ],
)
def test_the_repr_of_a_data_module_on_files_is_its_constructor_call(cls: type, settings: dict[str, object]) -> None:
    datamodule = cls(**settings)
    text = repr(datamodule)
    assert text.startswith(f"{cls.__name__}(") and all(f"{name}={value!r}" in text for name, value in settings.items())
    rebuilt = eval(text, {cls.__name__: cls})  # every setting, defaults included, in constructor syntax
    assert rebuilt.hparams == datamodule.hparams and repr(rebuilt) == text
