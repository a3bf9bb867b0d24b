"""miniImageNet in its three distributions, on small fixtures generated here: decoding, splits, tasks, errors.

Each fixture holds the same random images (tiny, few classes) in one layout: the pickled caches
``mini-imagenet-cache-*.pkl``, the ``miniImageNet_category_split_*.pickle`` files, or the CSV split
with an ``images/`` folder (PNG, so lossless).
"""

from __future__ import annotations

import csv
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from lightning_contrastive import ComplexSynapse, FirstOrderMAML
from lightning_contrastive.data.miniimagenet import (
    LAYOUTS,
    MINIIMAGENET_MEAN,
    MINIIMAGENET_STD,
    MiniImagenetDataModule,
    MiniImagenetImages,
    read_miniimagenet,
)
from lightning_contrastive.module import MetaLearningModule
from lightning_contrastive.networks import Conv4
from lightning_contrastive.tasks import split_batch

LAYOUT = {layout.name: layout for layout in LAYOUTS}
SIZE = 16
CLASSES = {"train": 4, "val": 3, "test": 3}
PER_CLASS = 6


class Fixture:
    """Random ``SIZE x SIZE`` RGB images, ``PER_CLASS`` per class, with WordNet-like class names.

    ``images[split][c]`` holds class ``c``'s images; classes of a split are numbered in name order.
    """

    def __init__(self, classes: dict[str, int] = CLASSES, per_class: int = PER_CLASS, size: int = SIZE) -> None:
        rng = np.random.default_rng(0)
        self.names = {}
        self.images = {}
        first = 1440764
        for split, count in classes.items():
            self.names[split] = [f"n{first + number:08d}" for number in range(count)]
            first += count
            self.images[split] = rng.integers(0, 256, size=(count, per_class, size, size, 3), dtype=np.uint8)

    def flat(self, split: str, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All images of ``split`` as ``(n, H, W, 3)`` and their class numbers, in ``order`` (default class-major)."""
        images = self.images[split]
        x = images.reshape(-1, *images.shape[2:])
        y = np.repeat(np.arange(len(images)), images.shape[1])
        return (x, y) if order is None else (x[order], y[order])

    def write_cache(self, root: Path) -> None:
        for split in CLASSES:
            order = np.random.default_rng(1).permutation(len(self.flat(split)[0]))  # classes interleaved
            x, y = self.flat(split, order)
            class_dict = {
                name: np.flatnonzero(y == c).tolist() for c, name in reversed(list(enumerate(self.names[split])))
            }
            dump({"image_data": x, "class_dict": class_dict}, root / f"mini-imagenet-cache-{split}.pkl")

    def write_category_split(self, root: Path) -> None:
        offset = 0  # labels are global across the files (val starts after the train labels), as in the originals
        for split, file in LAYOUT["category_split"].files.items():
            x, y = self.flat(split, np.random.default_rng(2).permutation(len(self.flat(split)[0])))
            catname2label = {name: offset + c for c, name in enumerate(self.names[split])}
            payload = pickle.dumps({"data": x, "labels": (y + offset).tolist(), "catname2label": catname2label}, 2)
            # The originals were pickled by Python 2 and numpy 1, whose arrays live in numpy.core, not numpy._core.
            (root / file).write_bytes(payload.replace(b"numpy._core.", b"numpy.core."))
            offset += len(self.names[split])

    def write_csv(self, root: Path, size: int | None = None) -> None:
        (root / "images").mkdir(parents=True, exist_ok=True)
        for split in CLASSES:
            with open(root / f"{split}.csv", "w", newline="") as stream:
                writer = csv.writer(stream)
                writer.writerow(["filename", "label"])
                for c, name in enumerate(self.names[split]):
                    for number, image in enumerate(self.images[split][c]):
                        filename = f"{name}{number + 1:08d}.png"
                        picture = Image.fromarray(image)
                        picture = picture if size is None else picture.resize((size + 3, size - 2))
                        picture.save(root / "images" / filename)
                        writer.writerow([filename, name])


def dump(payload: object, path: Path, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
    with open(path, "wb") as stream:
        pickle.dump(payload, stream, protocol=protocol)


@pytest.fixture(scope="module")
def fixture() -> Fixture:
    return Fixture()


@pytest.fixture(params=[layout.name for layout in LAYOUTS])
def layout_root(request: pytest.FixtureRequest, fixture: Fixture, tmp_path: Path) -> tuple[str, Path]:
    getattr(fixture, f"write_{request.param}")(tmp_path)
    return request.param, tmp_path


@pytest.fixture(autouse=True)
def nonstandard_split_is_expected() -> Iterator[None]:
    """The small fixtures are not 64/16/20, which the data module warns about (tested below)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not Ravi & Larochelle's 64/16/20")
        yield


def expected_store(fixture: Fixture) -> tuple[np.ndarray, list[str]]:
    """Class ``k`` of the whole set (train classes, then val, then test) -> its ``(PER_CLASS, 3, H, W)`` images."""
    images = [image.transpose(0, 3, 1, 2) for split in CLASSES for image in fixture.images[split]]
    return np.stack(images), [name for split in CLASSES for name in fixture.names[split]]


def images_of_class(decoded: MiniImagenetImages, label: int) -> np.ndarray:
    return decoded.images[decoded.labels == label].numpy()


def test_every_layout_decodes_to_the_same_images_and_classes(layout_root: tuple[str, Path], fixture: Fixture) -> None:
    layout, root = layout_root
    decoded = read_miniimagenet(root, image_size=SIZE)
    assert decoded.layout == layout
    assert decoded.images.shape == (sum(CLASSES.values()) * PER_CLASS, 3, SIZE, SIZE)
    assert decoded.images.dtype == torch.uint8 and decoded.labels.dtype == torch.int64
    assert decoded.class_splits == {"train": [0, 1, 2, 3], "val": [4, 5, 6], "test": [7, 8, 9]}
    store, names = expected_store(fixture)
    assert list(decoded.class_names) == names
    for label in range(len(names)):
        got = images_of_class(decoded, label)
        assert sorted(map(bytes, got)) == sorted(map(bytes, store[label])), f"class {names[label]}"


def test_category_split_files_without_catname2label_name_classes_by_label(fixture: Fixture, tmp_path: Path) -> None:
    fixture.write_category_split(tmp_path)
    for file in LAYOUT["category_split"].files.values():
        with open(tmp_path / file, "rb") as stream:
            payload = pickle.load(stream)
        del payload["catname2label"]
        dump(payload, tmp_path / file)
    decoded = read_miniimagenet(tmp_path, image_size=SIZE)
    assert list(decoded.class_names) == [f"label{label}" for label in range(10)]


def test_other_sizes_are_resized_with_lanczos(fixture: Fixture, tmp_path: Path) -> None:
    fixture.write_csv(tmp_path, size=SIZE)  # images of 19 x 14 pixels
    decoded = read_miniimagenet(tmp_path, image_size=SIZE)
    first = tmp_path / "images" / f"{fixture.names['train'][0]}00000001.png"
    with Image.open(first) as image:
        assert image.size == (SIZE + 3, SIZE - 2)
        reference = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS))
    assert np.array_equal(decoded.images[0].numpy(), reference.transpose(2, 0, 1))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    fixture.write_cache(pickled)
    halved = read_miniimagenet(pickled, image_size=SIZE // 2)
    assert halved.images.shape[1:] == (3, SIZE // 2, SIZE // 2)
    source = fixture.images["train"][0, 0]
    expected = np.asarray(Image.fromarray(source).resize((SIZE // 2, SIZE // 2), Image.Resampling.LANCZOS))
    assert any(np.array_equal(image, expected.transpose(2, 0, 1)) for image in images_of_class(halved, 0))


def test_the_cache_reloads_the_same_images_until_a_file_changes(fixture: Fixture, tmp_path: Path) -> None:
    root, cache_dir = tmp_path / "data", tmp_path / "cache"
    root.mkdir()
    fixture.write_csv(root)
    decoded = read_miniimagenet(root, image_size=SIZE, cache_dir=cache_dir)
    (cache_file,) = cache_dir.glob(f"miniimagenet-{SIZE}px-*.pt")
    cached = read_miniimagenet(root, image_size=SIZE, cache_dir=cache_dir)
    assert torch.equal(cached.images, decoded.images) and torch.equal(cached.labels, decoded.labels)
    assert cached.class_names == decoded.class_names and cached.class_splits == decoded.class_splits
    assert cached.layout == "csv"
    changed = root / "images" / f"{fixture.names['test'][0]}00000001.png"
    Image.fromarray(np.zeros((SIZE, SIZE, 3), dtype=np.uint8)).save(changed)
    redecoded = read_miniimagenet(root, image_size=SIZE, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("*.pt"))) == 2 and cache_file.exists()
    assert not torch.equal(redecoded.images, decoded.images)


def datamodule(root: Path, **settings: object) -> MiniImagenetDataModule:
    module = MiniImagenetDataModule(str(root), image_size=SIZE, **settings)
    module.setup()
    return module


@pytest.mark.parametrize("normalize", [True, False])
def test_batches_have_torchmetas_format_and_normalised_pixels(
    fixture: Fixture, tmp_path: Path, normalize: bool
) -> None:
    fixture.write_cache(tmp_path)
    module = datamodule(tmp_path, ways=3, shots=2, test_shots=3, batch_size=4, normalize=normalize)
    batch = next(iter(module.train_dataloader()))
    assert batch["train"][0].shape == (4, 6, 3, SIZE, SIZE) and batch["test"][0].shape == (4, 9, 3, SIZE, SIZE)
    assert batch["train"][0].dtype == torch.float32 and batch["test"][1].dtype == torch.int64
    assert len(split_batch(batch)) == 4
    mean, std = (MINIIMAGENET_MEAN, MINIIMAGENET_STD) if normalize else ((0, 0, 0), (1, 1, 1))
    tasks = module.tasks("train")
    for index in range(4):
        draw = tasks.draw(index)
        x, y = batch["train"][0][index], batch["train"][1][index]
        # Undo the normalisation by hand: the pixels are the stored images of the task's classes.
        pixels = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        pixels = (pixels * 255).round().to(torch.uint8).numpy()
        for label, task_class in enumerate(draw.classes):
            base = module.class_labels("train")[task_class]
            expected = module.images.images[draw.examples[label, :2]].numpy()
            assert sorted(map(bytes, pixels[(y == label).numpy()])) == sorted(map(bytes, expected))
            assert (module.images.labels[draw.examples[label]] == base).all()
    if not normalize:
        assert batch["train"][0].min() >= 0 and batch["train"][0].max() <= 1


def test_meta_splits_keep_their_classes(fixture: Fixture, tmp_path: Path) -> None:
    fixture.write_category_split(tmp_path)
    module = datamodule(tmp_path, ways=3, shots=1, test_shots=2)
    for split in CLASSES:
        assert module.class_names(split) == fixture.names[split]
        tasks = module.tasks(split)
        assert tasks.num_classes == CLASSES[split]
        used = {int(module.images.labels[row]) for index in range(20) for row in tasks.draw(index).examples.ravel()}
        assert used <= set(module.class_labels(split))


def test_metalearningmodule_trains_and_evaluates_on_its_batches(fixture: Fixture, tmp_path: Path) -> None:
    fixture.write_cache(tmp_path)
    data = MiniImagenetDataModule(
        str(tmp_path), ways=3, shots=1, test_shots=2, batch_size=2, num_train_tasks=4, num_eval_tasks=4, image_size=SIZE
    )
    torch.manual_seed(0)
    module = MetaLearningModule(
        ComplexSynapse(Conv4(in_channels=3, ways=3, channels=4, image_size=SIZE)), FirstOrderMAML(inner_steps=2)
    )
    settings = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    run = pl.Trainer(max_epochs=1, enable_model_summary=False, **settings)
    run.fit(module, data)
    assert run.global_step == 2
    (result,) = run.test(module, data, verbose=False)
    assert 0 <= result["test/accuracy"] <= 1 and np.isfinite(result["test/query_loss"])


def test_a_nonstandard_split_is_announced_and_the_standard_one_is_not(tmp_path: Path) -> None:
    small, standard = tmp_path / "small", tmp_path / "standard"
    for root, classes in ((small, CLASSES), (standard, {"train": 64, "val": 16, "test": 20})):
        root.mkdir()
        Fixture(classes, per_class=2, size=4).write_cache(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.warns(UserWarning, match="has 4/3/3 classes for meta-train/val/test, not Ravi & Larochelle's"):
            datamodule(small, ways=2, shots=1, test_shots=1)
        module = datamodule(standard, ways=5, shots=1, test_shots=1)
    assert [len(module.class_labels(split)) for split in CLASSES] == [64, 16, 20]


# ------------------------------------------------------------------ missing and malformed files
def test_no_files_name_the_folder_and_every_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"No miniImageNet files in {tmp_path}") as error:
        MiniImagenetDataModule(str(tmp_path)).setup()
    for text in ("mini-imagenet-cache-{train,val,test}.pkl", "miniImageNet_category_split_", "filename,label"):
        assert text in str(error.value)


def test_an_incomplete_layout_names_the_missing_files(fixture: Fixture, tmp_path: Path) -> None:
    fixture.write_cache(tmp_path)
    (tmp_path / "mini-imagenet-cache-val.pkl").unlink()
    with pytest.raises(FileNotFoundError, match=r"not mini-imagenet-cache-val\.pkl\. The 'cache' layout is"):
        read_miniimagenet(tmp_path)


class WritesAFile:
    """Unpickling this with ``pickle.load`` would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"class_dict": {}}, r"must hold a dict with keys \['image_data', 'class_dict'\]; found \['class_dict'\]"),
        ([1, 2], "must hold a dict with keys .* found list"),
        ({"image_data": np.zeros((2, 4, 4), np.uint8), "class_dict": {"a": [0, 1]}}, "uint8 array .* got uint8 array"),
        ({"image_data": np.zeros((2, 4, 4, 3)), "class_dict": {"a": [0, 1]}}, "got float64 array of shape"),
        ({"image_data": np.zeros((2, 4, 4, 3), np.uint8), "class_dict": {"a": [0, 5]}}, r"indices into image_data"),
        ({"image_data": np.zeros((2, 4, 4, 3), np.uint8), "class_dict": {"a": [0]}}, "1 of the 2 images are in no"),
        ({"image_data": np.zeros((2, 4, 4, 3), np.uint8), "class_dict": {"a": [0, 1], "b": [1]}}, "another class"),
    ],
)
def test_malformed_pickles_name_the_file_and_the_layout(
    fixture: Fixture, tmp_path: Path, payload: object, match: str
) -> None:
    fixture.write_cache(tmp_path)
    bad = tmp_path / "mini-imagenet-cache-val.pkl"
    dump(payload, bad)
    with pytest.raises(ValueError, match=f"{bad} is not a valid miniImageNet file: .*{match}") as error:
        read_miniimagenet(tmp_path, image_size=4)
    assert "The 'cache' layout is mini-imagenet-cache-{train,val,test}.pkl" in str(error.value)


def test_truncated_pickles_and_bad_labels_are_rejected(fixture: Fixture, tmp_path: Path) -> None:
    fixture.write_category_split(tmp_path)
    test_file = tmp_path / LAYOUT["category_split"].files["test"]
    test_file.write_bytes(test_file.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{test_file} is not a valid miniImageNet file: it could not be unpickled"):
        read_miniimagenet(tmp_path, image_size=SIZE)
    dump({"data": np.zeros((3, 4, 4, 3), np.uint8), "labels": [0, 1]}, test_file)
    with pytest.raises(ValueError, match=r"'labels' must be 3 integers, one per image; got int64 \(2,\)"):
        read_miniimagenet(tmp_path, image_size=SIZE)


def test_pickles_that_would_run_code_are_refused(fixture: Fixture, tmp_path: Path) -> None:
    fixture.write_cache(tmp_path)
    marker = tmp_path / "created-by-unpickling"
    dump({"image_data": WritesAFile(marker), "class_dict": {}}, tmp_path / "mini-imagenet-cache-train.pkl")
    with pytest.raises(
        ValueError, match=r"it refers to io\.open, which a miniImageNet file never holds, so it was not"
    ):
        read_miniimagenet(tmp_path)
    assert not marker.exists()


def test_classes_shared_by_two_meta_splits_are_rejected(fixture: Fixture, tmp_path: Path) -> None:
    fixture.write_csv(tmp_path)
    with open(tmp_path / "test.csv", newline="") as stream:
        rows = list(csv.reader(stream))
    with open(tmp_path / "test.csv", "w", newline="") as stream:  # the first test class relabelled as a train class
        csv.writer(stream).writerows(
            [name, fixture.names["train"][1]] if label == fixture.names["test"][0] else [name, label]
            for name, label in rows
        )
    with pytest.raises(ValueError, match=f"Class '{fixture.names['train'][1]}' is in both .*train.csv and .*test.csv"):
        read_miniimagenet(tmp_path, image_size=SIZE)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("name,class\nx.png,n1\n", "its first line must be the header 'filename,label'; got 'name,class'"),
        ("", "its first line must be the header 'filename,label'; got ''"),
        ("filename,label\na.png,n1\nb.png\n", "line 3 must be 'filename,label'; got 'b.png'"),
        ("filename,label\n", "it lists no images"),
    ],
)
def test_malformed_csv_files_name_the_file_and_the_line(
    fixture: Fixture, tmp_path: Path, content: str, match: str
) -> None:
    fixture.write_csv(tmp_path)
    (tmp_path / "val.csv").write_text(content)
    with pytest.raises(ValueError, match=f"{tmp_path / 'val.csv'} is not a valid miniImageNet file: {match}") as error:
        read_miniimagenet(tmp_path, image_size=SIZE)
    assert "(Ravi & Larochelle's split), and the images in images/<filename>" in str(error.value)


def test_missing_and_corrupt_images_name_the_image_and_the_csv_line(fixture: Fixture, tmp_path: Path) -> None:
    fixture.write_csv(tmp_path)
    image = tmp_path / "images" / f"{fixture.names['val'][0]}00000002.png"
    image.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"{image}, listed on line 3 of {tmp_path / 'val.csv'}, is not a readable"):
        read_miniimagenet(tmp_path, image_size=SIZE)
    image.unlink()
    with pytest.raises(FileNotFoundError, match=f"{image}, listed on line 3 of .*val.csv, does not exist"):
        read_miniimagenet(tmp_path, image_size=SIZE)


def test_bad_arguments_raise_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size must be an integer >= 1; got 0"):
        MiniImagenetDataModule(str(tmp_path), image_size=0)
    with pytest.raises(ValueError, match="image_size must be an integer >= 1"):
        read_miniimagenet(tmp_path, image_size=True)
