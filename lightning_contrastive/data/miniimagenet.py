"""miniImageNet (Vinyals et al., 2016) as N-way K-shot episodes, with Ravi & Larochelle's 64/16/20 class split.

100 ImageNet classes of 600 colour images each at 84x84, split into 64 meta-train, 16 meta-validation
and 20 meta-test classes (Ravi & Larochelle, 2017). The images are not freely redistributable, so
there is no download: put one of the three common distributions in ``root`` (:data:`LAYOUTS`):

- ``"cache"``: ``mini-imagenet-cache-{train,val,test}.pkl``, each a pickled dict with ``image_data``,
  a ``(N, 84, 84, 3)`` uint8 array, and ``class_dict``, ``{class name: [indices into image_data]}``
  (the files torchmeta and learn2learn fetch);
- ``"category_split"``: ``miniImageNet_category_split_{train_phase_train,val,test}.pickle``, each a
  pickled dict with ``data``, a ``(N, 84, 84, 3)`` uint8 array, ``labels``, ``N`` integer class labels,
  and optionally ``catname2label``, ``{class name: label}`` (Gidaris & Komodakis' files, used by
  MetaOptNet and others; pickled by Python 2, so strings are read as latin-1);
- ``"csv"``: Ravi & Larochelle's ``{train,val,test}.csv``, each with the header ``filename,label``
  and one image per line, and the images themselves in ``images/<filename>`` (any size).

The pickles are read by an unpickler that accepts numpy arrays and plain containers only, because
unpickling an arbitrary file can run arbitrary code. Images not already ``image_size`` pixels square
are resized with Pillow's Lanczos filter (as the common preparation script does for the CSV layout).
All images are decoded once into one ``(N, 3, image_size, image_size)`` uint8 tensor, optionally cached
on disk; a task then only indexes it, and its pixels are normalised per channel.
"""

from __future__ import annotations

import csv
import hashlib
import json
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_contrastive.data._image_files import ImageFilesDataModule, cache_path, check_image_size, decode_once
from lightning_contrastive.data.episodic import META_SPLITS

MINIIMAGENET_MEAN = (120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255)
MINIIMAGENET_STD = (70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255)
"""Per-channel (RGB) mean and standard deviation of miniImageNet pixels in ``[0, 1]``, the constants
of Gidaris & Komodakis (2018) used by most miniImageNet code."""

STANDARD_SPLIT = {"train": 64, "val": 16, "test": 20}
"""Classes per meta-split in Ravi & Larochelle's split."""

_CACHE_FORMAT = 1


@dataclass(frozen=True)
class Layout:
    """One on-disk distribution of miniImageNet: its file per meta-split, and what each holds."""

    name: str
    files: Mapping[str, str]
    description: str


LAYOUTS = (
    Layout(
        "cache",
        {meta_split: f"mini-imagenet-cache-{meta_split}.pkl" for meta_split in META_SPLITS},
        "mini-imagenet-cache-{train,val,test}.pkl, each a pickled dict with 'image_data', a (N, 84, 84, 3) uint8 "
        "array, and 'class_dict', {class name: [indices into image_data]}",
    ),
    Layout(
        "category_split",
        {
            "train": "miniImageNet_category_split_train_phase_train.pickle",
            "val": "miniImageNet_category_split_val.pickle",
            "test": "miniImageNet_category_split_test.pickle",
        },
        "miniImageNet_category_split_{train_phase_train,val,test}.pickle, each a pickled dict with 'data', a "
        "(N, 84, 84, 3) uint8 array, 'labels', N integer class labels, and optionally 'catname2label'",
    ),
    Layout(
        "csv",
        {meta_split: f"{meta_split}.csv" for meta_split in META_SPLITS},
        "{train,val,test}.csv, each with the header 'filename,label' and one image per line (Ravi & "
        "Larochelle's split), and the images in images/<filename>",
    ),
)
"""The distributions :func:`read_miniimagenet` reads, in the order it looks for them."""


@dataclass(frozen=True)
class MiniImagenetImages:
    """Every image of the three meta-splits.

    Attributes:
        images: ``(num_images, 3, image_size, image_size)`` uint8 RGB.
        labels: ``(num_images,)`` int64, the index of each image's class in ``class_names``.
        class_names: the classes (WordNet ids for the standard files), meta-train ones first, then
            meta-validation, then meta-test.
        class_splits: the class indices of each meta-split.
        layout: which of :data:`LAYOUTS` the files were read from.
    """

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    class_splits: dict[str, list[int]]
    layout: str


class _SplitImages(NamedTuple):
    """One meta-split as read: ``(n, H, W, 3)`` uint8 pixels, labels ``0..k-1``, and the ``k`` class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]


def find_miniimagenet(root: str | Path) -> tuple[Layout, dict[str, Path]]:
    """The layout of the miniImageNet files in ``root`` and the file of each meta-split.

    The first layout of :data:`LAYOUTS` with any of its files present is chosen, and must be complete.

    Raises:
        FileNotFoundError: no layout's files are in ``root``, or the chosen one lacks a file (the
            message names the file and describes the layouts).
    """
    root = Path(root).expanduser()
    for layout in LAYOUTS:
        paths = {meta_split: root / name for meta_split, name in layout.files.items()}
        present = [path for path in paths.values() if path.is_file()]
        if not present:
            continue
        missing = [path for path in paths.values() if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"miniImageNet in {root} is incomplete: found {present[0].name} but not "
                f"{', '.join(path.name for path in missing)}. The {layout.name!r} layout is {layout.description}."
            )
        return layout, paths
    layouts = "; ".join(f"({number}) {layout.description}" for number, layout in enumerate(LAYOUTS, start=1))
    raise FileNotFoundError(
        f"No miniImageNet files in {root}. Put one of these distributions there: {layouts}. The images are not "
        "freely redistributable; get them from the ImageNet site or a miniImageNet mirror you are licensed to use."
    )


def read_miniimagenet(
    root: str | Path, image_size: int = 84, cache_dir: str | Path | None = None
) -> MiniImagenetImages:
    """Decode the miniImageNet files in ``root`` (any of :data:`LAYOUTS`) into one uint8 image tensor.

    Classes are ordered meta-train, meta-validation, meta-test, and within each meta-split by name
    (``"csv"``, ``"cache"``) or by label (``"category_split"``). With ``cache_dir`` the result is saved
    there, keyed by the files' names, sizes and modification times and by ``image_size``, and later
    calls with unchanged files load it (worth it for the ``"csv"`` layout, which decodes 60,000 JPEGs).

    Raises:
        FileNotFoundError: a file is missing (names it and the expected layout).
        ValueError: a file is malformed or corrupt, or two meta-splits share a class name (names
            the file and the expected layout).
    """
    check_image_size(image_size)
    layout, paths = find_miniimagenet(root)

    def decode() -> dict[str, Any]:
        reader = _READERS[layout.name]
        splits = {meta_split: reader(path, layout, image_size) for meta_split, path in paths.items()}
        return _assemble(splits, layout, paths)

    payload = decode_once(
        cache_path(cache_dir, f"miniimagenet-{image_size}px-{_fingerprint(layout, paths)}.pt"), decode
    )
    return MiniImagenetImages(
        images=payload["images"],
        labels=payload["labels"],
        class_names=tuple(payload["class_names"]),
        class_splits={meta_split: list(classes) for meta_split, classes in payload["class_splits"].items()},
        layout=layout.name,
    )


class MiniImagenetDataModule(ImageFilesDataModule):
    """miniImageNet N-way K-shot episodes in torchmeta's batch format: ``x`` of shape ``(B, N*K, 3, 84, 84)``.

    Classes are those of the files' meta-splits (Ravi & Larochelle's 64/16/20; a warning says when the
    files hold another split). Pixels are floats, normalised per channel with :data:`MINIIMAGENET_MEAN`
    and :data:`MINIIMAGENET_STD` (or in ``[0, 1]``, torchmeta's ``ToTensor()``, with ``normalize=False``).

    Call :meth:`setup` (decodes) before asking for loaders outside a Trainer.

    Args:
        root: folder holding one of the :data:`LAYOUTS`.
        ways: classes per task (N).
        shots: support images per class (K).
        test_shots: query images per class.
        batch_size: tasks per meta-batch in training (4 in the reference miniImageNet setups).
        eval_batch_size: tasks per batch in validation and test; ``None`` uses ``batch_size``.
        num_train_tasks: training tasks per epoch.
        num_eval_tasks: size of the fixed validation and test task sets (600 is the common protocol).
        image_size: side of the square images; other sizes are resized with Pillow's Lanczos filter.
        normalize: standardise each channel with the miniImageNet mean and standard deviation.
        cache_dir: if given, a folder (outside the repository) where the decoded images are cached.
        seed: fixes the training tasks, and the evaluation tasks unless ``eval_seed`` is given.
        eval_seed: fixes the validation and test tasks.
        num_workers: data loader worker processes (0 is usually fastest: a task is a tensor index).
    """

    def __init__(
        self,
        root: str = "data/miniimagenet",
        ways: int = 5,
        shots: int = 1,
        test_shots: int = 15,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_train_tasks: int = 3200,
        num_eval_tasks: int = 600,
        image_size: int = 84,
        normalize: bool = True,
        cache_dir: str | None = None,
        seed: int = 0,
        eval_seed: int | None = None,
        num_workers: int = 0,
    ) -> None:
        mean, std = (MINIIMAGENET_MEAN, MINIIMAGENET_STD) if normalize else ((0.0,) * 3, (1.0,) * 3)
        super().__init__(
            root, ways, shots, test_shots, batch_size, eval_batch_size, num_train_tasks, num_eval_tasks, image_size,
            cache_dir, seed, eval_seed, num_workers, transform=partial(_standardise, mean=mean, std=std),
        )  # fmt: skip
        self.save_hyperparameters()
        self.normalize = normalize
        self.images: MiniImagenetImages | None = None

    def load_data(self) -> tuple[tuple[Tensor, Tensor], Mapping[str, Sequence[int]]]:
        self.images = read_miniimagenet(self.root, self.image_size, self.cache_dir)
        splits = self.images.class_splits
        sizes = {meta_split: len(splits[meta_split]) for meta_split in META_SPLITS}
        description = "/".join(str(size) for size in sizes.values())
        rank_zero_info(
            f"miniImageNet: {len(self.images.images)} images of {len(self.images.class_names)} classes from the "
            f"{self.images.layout!r} files in {self.root}; {description} classes for meta-train/val/test."
        )
        if sizes != STANDARD_SPLIT:
            rank_zero_warn(
                f"miniImageNet in {self.root} has {description} classes for meta-train/val/test, not Ravi & "
                "Larochelle's 64/16/20: results will not be comparable with published ones."
            )
        return (self.images.images, self.images.labels), splits

    def class_names(self, meta_split: str) -> list[str]:
        """The names (WordNet ids for the standard files) of the classes of ``meta_split``, in class index order."""
        labels = self.class_labels(meta_split)  # raises unless setup() ran, which set self.images
        assert self.images is not None
        return [self.images.class_names[label] for label in labels]


def _standardise(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 pixels ``(..., 3, H, W)`` -> float32 ``(pixels / 255 - mean) / std`` per channel, in numpy
    (single-threaded, like the rest of a task's copies: see :class:`~.episodic.ClassificationTasks`)."""
    mean_, std_ = (np.asarray(values, dtype=np.float32).reshape(3, 1, 1) for values in (mean, std))
    return torch.from_numpy(pixels.numpy() * (1 / (255 * std_)) - mean_ / std_)


# ---------------------------------------------------------------------------------------------- readers
def _read_cache_pickle(path: Path, layout: Layout, image_size: int) -> _SplitImages:
    payload = _load_pickle(path, layout, ("image_data", "class_dict"))
    images = _image_array(payload["image_data"], "image_data", path, layout)
    class_dict = payload["class_dict"]
    if not isinstance(class_dict, Mapping) or not class_dict:
        raise _malformed(path, layout, "'class_dict' must be a non-empty dict {class name: [image indices]}")
    names = sorted(class_dict, key=str)
    labels = np.full(len(images), -1, dtype=np.int64)
    for label, name in enumerate(names):
        indices = np.asarray(class_dict[name]).reshape(-1)
        if indices.dtype.kind not in "iu" or ((indices < 0) | (indices >= len(images))).any():
            raise _malformed(
                path, layout, f"class_dict[{name!r}] must list indices into image_data (0 to {len(images) - 1})"
            )
        if (labels[indices] >= 0).any():
            raise _malformed(path, layout, f"class_dict[{name!r}] lists images that another class lists too")
        labels[indices] = label
    unlabelled = int((labels < 0).sum())
    if unlabelled:
        raise _malformed(path, layout, f"{unlabelled} of the {len(images)} images are in no class of class_dict")
    return _SplitImages(_resized(images, image_size), labels, [str(name) for name in names])


def _read_category_split_pickle(path: Path, layout: Layout, image_size: int) -> _SplitImages:
    payload = _load_pickle(path, layout, ("data", "labels"))
    images = _image_array(payload["data"], "data", path, layout)
    raw_labels = np.asarray(payload["labels"])
    if raw_labels.shape != (len(images),) or raw_labels.dtype.kind not in "iu":
        raise _malformed(
            path,
            layout,
            f"'labels' must be {len(images)} integers, one per image; got {raw_labels.dtype} {raw_labels.shape}",
        )
    classes, labels = np.unique(raw_labels, return_inverse=True)
    catname2label = payload.get("catname2label", {})
    names = (
        {int(label): str(name) for name, label in catname2label.items()} if isinstance(catname2label, Mapping) else {}
    )
    class_names = [names.get(int(label), f"label{label}") for label in classes]
    return _SplitImages(_resized(images, image_size), labels.astype(np.int64), class_names)


def _read_csv_split(path: Path, layout: Layout, image_size: int) -> _SplitImages:
    try:
        with open(path, newline="") as stream:
            lines = list(csv.reader(stream))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise _malformed(path, layout, f"it could not be read as CSV ({error})") from error
    if not lines or [cell.strip() for cell in lines[0]] != ["filename", "label"]:
        header = ",".join(lines[0]) if lines else ""
        raise _malformed(path, layout, f"its first line must be the header 'filename,label'; got {header!r}")
    rows = [(number, row) for number, row in enumerate(lines[1:], start=2) if row]
    for number, row in rows:
        if len(row) != 2 or not all(cell.strip() for cell in row):
            raise _malformed(path, layout, f"line {number} must be 'filename,label'; got {','.join(row)!r}")
    if not rows:
        raise _malformed(path, layout, "it lists no images")
    class_names = sorted({label.strip() for _, (_, label) in rows})
    class_index = {name: label for label, name in enumerate(class_names)}
    images = np.empty((len(rows), image_size, image_size, 3), dtype=np.uint8)
    for position, (number, (filename, _)) in enumerate(rows):
        file = path.parent / "images" / filename.strip()
        try:
            with Image.open(file) as image:
                images[position] = _resized_image(image.convert("RGB"), image_size)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"{file}, listed on line {number} of {path}, does not exist. The {layout.name!r} layout is "
                f"{layout.description}."
            ) from error
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(
                f"{file}, listed on line {number} of {path}, is not a readable image ({error}). Replace it with the "
                "original file."
            ) from error
    labels = np.array([class_index[label.strip()] for _, (_, label) in rows], dtype=np.int64)
    return _SplitImages(images, labels, class_names)


_READERS: dict[str, Callable[[Path, Layout, int], _SplitImages]] = {
    "cache": _read_cache_pickle,
    "category_split": _read_category_split_pickle,
    "csv": _read_csv_split,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, numbers, strings and containers only: a pickle naming any other global is refused."""

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),  # bytes in protocol 2 pickles written by Python 3
            ("copy_reg", "_reconstructor"),  # Python 2 pickles of numpy arrays
            ("copyreg", "_reconstructor"),
            ("__builtin__", "object"),
            ("builtins", "object"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return super().find_class(module, name)


class _ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle refers to a global outside :class:`_ArrayUnpickler`'s allow-list."""


def _load_pickle(path: Path, layout: Layout, keys: Sequence[str]) -> dict[str, Any]:
    """The dict pickled in ``path`` (latin-1 strings, for Python 2 pickles), checked to hold ``keys``."""
    try:
        with open(path, "rb") as stream:
            payload = _ArrayUnpickler(stream, encoding="latin1").load()
    except _ForbiddenGlobal as error:
        raise _malformed(
            path, layout, f"it refers to {error}, which a miniImageNet file never holds, so it was not unpickled"
        ) from error
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, AttributeError, ImportError, IndexError) as error:
        raise _malformed(
            path, layout, f"it could not be unpickled ({error}): truncated, corrupt or not a pickle"
        ) from error
    if not isinstance(payload, dict) or not set(keys) <= set(payload):
        found = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        raise _malformed(path, layout, f"it must hold a dict with keys {list(keys)}; found {found}")
    return payload


def _image_array(images: Any, key: str, path: Path, layout: Layout) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        found = (
            f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        )
        raise _malformed(
            path, layout, f"{key!r} must be a (N, height, width, 3) uint8 array of RGB images; got {found}"
        )
    if len(images) == 0:
        raise _malformed(path, layout, f"{key!r} holds no images")
    return images


def _malformed(path: Path, layout: Layout, problem: str) -> ValueError:
    return ValueError(
        f"{path} is not a valid miniImageNet file: {problem}. The {layout.name!r} layout is {layout.description}."
    )


def _resized(images: np.ndarray, image_size: int) -> np.ndarray:
    """``(n, H, W, 3)`` images resized to ``image_size`` squared (unchanged when already that size)."""
    if images.shape[1:3] == (image_size, image_size):
        return images
    return np.stack([_resized_image(Image.fromarray(image), image_size) for image in images])


def _resized_image(image: Image.Image, image_size: int) -> np.ndarray:
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return np.asarray(image)


def _assemble(splits: Mapping[str, _SplitImages], layout: Layout, paths: Mapping[str, Path]) -> dict[str, Any]:
    """One ``(N, 3, S, S)`` tensor of the meta-splits' images, their classes numbered consecutively: the fields of
    :class:`MiniImagenetImages` but the layout, as tensors and plain values (``layout`` and ``paths`` name the files
    in errors)."""
    owner: dict[str, str] = {}
    for meta_split, split in splits.items():
        for name in split.class_names:
            if name in owner:
                raise ValueError(
                    f"Class {name!r} is in both {paths[owner[name]]} and {paths[meta_split]}; the meta-splits of "
                    f"miniImageNet must not share classes. The {layout.name!r} layout is {layout.description}."
                )
            owner[name] = meta_split
    total = sum(len(split.images) for split in splits.values())
    size = next(iter(splits.values())).images.shape[1]
    images = np.empty((total, 3, size, size), dtype=np.uint8)
    labels = np.empty(total, dtype=np.int64)
    class_names: list[str] = []
    class_splits: dict[str, list[int]] = {}
    start = 0
    for meta_split, split in splits.items():
        stop = start + len(split.images)
        images[start:stop] = split.images.transpose(0, 3, 1, 2)
        labels[start:stop] = split.labels + len(class_names)
        class_splits[meta_split] = list(range(len(class_names), len(class_names) + len(split.class_names)))
        class_names += split.class_names
        start = stop
    return {
        "images": torch.from_numpy(images),
        "labels": torch.from_numpy(labels),
        "class_names": class_names,
        "class_splits": class_splits,
    }


def _fingerprint(layout: Layout, paths: Mapping[str, Path]) -> str:
    """A digest of the files' names, sizes and modification times (for ``"csv"``, of the images folder's too)."""
    files = list(paths.values())
    images_folder = next(iter(paths.values())).parent / "images"
    if layout.name == "csv" and images_folder.is_dir():
        files += sorted(entry for entry in images_folder.iterdir() if entry.is_file())
    stats = [[file.name, file.stat().st_size, file.stat().st_mtime_ns] for file in files]
    return hashlib.sha256(json.dumps([_CACHE_FORMAT, layout.name, stats]).encode()).hexdigest()[:16]
