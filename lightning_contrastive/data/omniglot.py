"""Omniglot (Lake et al., 2015) as N-way K-shot episodes: 1623 handwritten characters, 20 drawers each.

Reads the official archives unchanged from ``root``: the full ``images_background.zip`` (30 alphabets,
964 characters) and ``images_evaluation.zip`` (20 alphabets, 659 characters), subsets such as
``images_background_small1.zip``, or their extracted folders. Inside each the layout is
``<archive>/<alphabet>/<character>/<image>.png``. Images are decoded once into one ``uint8`` tensor
(strokes bright on a dark background and resized with Pillow's antialiased bilinear filter, as
torchmeta does), optionally cached on disk; drawing a task then only indexes that tensor.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from lightning_contrastive.data._image_files import ImageFilesDataModule, cache_path, check_image_size, decode_once
from lightning_contrastive.data.download import download_verified

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
"""Where the official archives live (brendenlake/omniglot on GitHub)."""

OMNIGLOT_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
    "images_background_small1": "e704a628b5459e08445c13499850abc4",
    "images_background_small2": "b75a71a51d3b13f821f212756fe481fd",
}
"""MD5 of each official archive (the first two as torchmeta and torchvision record them)."""

FULL_ARCHIVES = ("images_background", "images_evaluation")

VINYALS_VAL_ALPHABETS = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
"""The five background alphabets whose 172 characters form the meta-validation set of the Vinyals split."""

_VINYALS_SIZES = {"background": 964, "evaluation": 659, "train_and_val": 1200}
_CACHE_FORMAT = 1


class Character(NamedTuple):
    """One Omniglot character: the archive group it comes from, its alphabet, and its folder name."""

    group: str  # "background" or "evaluation"
    alphabet: str
    character: str


@dataclass(frozen=True)
class OmniglotImages:
    """Every decoded image of the archives read.

    Attributes:
        images: ``(num_images, 1, image_size, image_size)`` uint8, 255 on the strokes.
        labels: ``(num_images,)`` int64, the index of each image's character in ``characters``.
        characters: the distinct characters, sorted by group, alphabet and character.
        archives: the archive names read (zip stems or folder names).
    """

    images: Tensor
    labels: Tensor
    characters: tuple[Character, ...]
    archives: tuple[str, ...]


def find_archives(root: str | Path) -> dict[str, Path]:
    """The Omniglot image archives in ``root``: name -> zip file, or extracted folder when there is no zip.

    Raises:
        FileNotFoundError: naming ``root`` and how to get the files, when there are none.
    """
    root = Path(root).expanduser()
    found: dict[str, Path] = {}
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            name = entry.name.removesuffix(".zip")
            if not name.startswith(FULL_ARCHIVES):
                continue
            if entry.suffix == ".zip" and entry.is_file():
                found[name] = entry
            elif entry.is_dir():
                found.setdefault(name, entry)
    if not found:
        raise FileNotFoundError(
            f"No Omniglot archives in {root}: expected images_background.zip and images_evaluation.zip (the full "
            "set) or subsets such as images_background_small1.zip, as zips or extracted folders. Pass download=True "
            f"to fetch the full set from {OMNIGLOT_URL}, or copy the files into {root}."
        )
    return found


def read_omniglot(root: str | Path, image_size: int = 28, cache_dir: str | Path | None = None) -> OmniglotImages:
    """Decode every image of the Omniglot archives in ``root``, de-duplicating characters.

    A character present in two archives (Greek and Latin are in both small background subsets) is
    read from the first in name order. Each image is converted to greyscale, inverted (strokes 255)
    and resized to ``image_size`` squared. With ``cache_dir`` the result is saved there, keyed by the
    archives' names, sizes and modification times, and later calls with unchanged archives load it.

    Raises:
        FileNotFoundError: no archives in ``root``.
        ValueError: an archive is corrupt or truncated (names the file and the fix).
    """
    check_image_size(image_size)
    archives = find_archives(root)
    payload = decode_once(
        cache_path(cache_dir, f"omniglot-{image_size}px-{_fingerprint(archives)}.pt"),
        partial(_decode_archives, archives, image_size),
    )
    return OmniglotImages(
        images=payload["images"],
        labels=payload["labels"],
        characters=tuple(Character(*character) for character in payload["characters"]),
        archives=tuple(payload["archives"]),
    )


def _decode_archives(archives: Mapping[str, Path], image_size: int) -> dict[str, Any]:
    """:class:`OmniglotImages`' fields, as tensors and plain values (characters as lists of strings)."""
    with ExitStack() as stack:
        files: dict[tuple[str, str], tuple[str, list[str]]] = {}
        readers: dict[str, _ArchiveReader] = {}
        for name, path in archives.items():
            readers[name] = stack.enter_context(_ArchiveReader(path))
            for (alphabet, character), members in readers[name].characters().items():
                files.setdefault((alphabet, character), (name, members))
        characters = sorted(
            Character(_group(name), alphabet, character) for (alphabet, character), (name, _) in files.items()
        )
        counts = [len(files[character[1:]][1]) for character in characters]
        images = np.empty((sum(counts), 1, image_size, image_size), dtype=np.uint8)
        position = 0
        for character in characters:
            name, members = files[character[1:]]
            for member in members:
                images[position, 0] = readers[name].decode(member, image_size)
                position += 1
    return {
        "images": torch.from_numpy(images),
        "labels": torch.arange(len(characters)).repeat_interleave(torch.tensor(counts)),
        "characters": [list(character) for character in characters],
        "archives": list(archives),
    }


def vinyals_split(characters: Sequence[Character]) -> dict[str, list[int]]:
    """The class split of torchmeta's ``use_vinyals_split=True`` (Vinyals et al., 2016), by character index.

    The rule, derived from torchmeta's ``assets/omniglot/{train,val,test}.json`` (Snell et al.'s split
    files): order the 1623 characters background first, then evaluation, each by alphabet and
    character name; the first 1200 are meta-train and meta-validation, the last 423 meta-test.
    Meta-validation is every character of the five background alphabets in
    :data:`VINYALS_VAL_ALPHABETS` (172), meta-train the other 1028. The JSON files list exactly these
    characters (the cut falls inside Gurmukhi: its characters 01-41 train, 42-45 test); the test
    suite checks the rule against their alphabet-by-alphabet content.

    Raises:
        ValueError: the characters are not the full set (964 background and 659 evaluation).
    """
    groups = {
        group: sum(character.group == group for character in characters) for group in ("background", "evaluation")
    }
    if groups["background"] != _VINYALS_SIZES["background"] or groups["evaluation"] != _VINYALS_SIZES["evaluation"]:
        raise ValueError(
            f"The Vinyals split needs the full Omniglot set, 964 background and 659 evaluation characters; found "
            f"{groups['background']} and {groups['evaluation']}. Put the complete images_background.zip and "
            "images_evaluation.zip in root (download=True fetches them), or pass use_vinyals_split=False for a "
            "seeded split of the characters at hand."
        )
    ordered = sorted(range(len(characters)), key=lambda index: characters[index])
    train_and_val = ordered[: _VINYALS_SIZES["train_and_val"]]
    return {
        "train": sorted(i for i in train_and_val if characters[i].alphabet not in VINYALS_VAL_ALPHABETS),
        "val": sorted(i for i in train_and_val if characters[i].alphabet in VINYALS_VAL_ALPHABETS),
        "test": sorted(ordered[_VINYALS_SIZES["train_and_val"] :]),
    }


def seeded_split(characters: Sequence[Character], seed: int = 0) -> dict[str, list[int]]:
    """A random split by character, in the proportions of the Vinyals split (1028 : 172 : 423).

    For character sets other than the full one (e.g. the small background subsets). The characters
    are permuted by a ``numpy`` generator seeded with ``seed``; the split depends only on the set of
    characters and the seed, not on the order they are given in.

    Raises:
        ValueError: fewer than three characters.
    """
    if len(characters) < 3:
        raise ValueError(f"A train/val/test split needs at least 3 characters; got {len(characters)}.")
    ordered = sorted(range(len(characters)), key=lambda index: characters[index])
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    total = sum(_VINYALS_SIZES[group] for group in ("background", "evaluation"))
    num_val = max(1, round(len(characters) * 172 / total))
    num_test = max(1, round(len(characters) * 423 / total))
    num_train = len(characters) - num_val - num_test
    return {
        "train": sorted(shuffled[:num_train]),
        "val": sorted(shuffled[num_train : num_train + num_val]),
        "test": sorted(shuffled[num_train + num_val :]),
    }


def alphabet_split(characters: Sequence[Character], seed: int = 0) -> dict[str, list[int]]:
    """A random split by whole alphabets: every character of an alphabet lands in the same meta-split.

    Meta-test then measures adaptation to unseen alphabets, not only to unseen characters of alphabets seen in
    meta-training (what :func:`seeded_split` measures). The number of *alphabets* per meta-split follows the
    Vinyals proportions (1028 : 172 : 423 characters), at least one each: of the 8 alphabets of the two small
    background subsets, 5 meta-train, 1 meta-validate and 2 meta-test. Alphabets differ in size (17 to 47
    characters there), so the characters per meta-split depend on which alphabets are drawn. The alphabets are
    permuted by a ``numpy`` generator seeded with ``seed``; the split depends only on the set of characters and
    the seed, not on their order.

    Raises:
        ValueError: fewer than three alphabets, so that some meta-split would get none.
    """
    alphabets = sorted({character.alphabet for character in characters})
    if len(alphabets) < 3:
        raise ValueError(
            f"A split by alphabet needs at least 3 alphabets (one each for meta-train, meta-validation and "
            f"meta-test); the archives hold {len(alphabets)}: {alphabets}. Add archives to root, or use "
            'split_by="character".'
        )
    total = sum(_VINYALS_SIZES[group] for group in ("background", "evaluation"))
    num_val = max(1, round(len(alphabets) * 172 / total))
    num_test = max(1, round(len(alphabets) * 423 / total))
    shuffled = [alphabets[i] for i in np.random.default_rng(seed).permutation(len(alphabets))]
    num_train = len(alphabets) - num_val - num_test
    chosen = {
        "train": set(shuffled[:num_train]),
        "val": set(shuffled[num_train : num_train + num_val]),
        "test": set(shuffled[num_train + num_val :]),
    }
    return {
        meta_split: [index for index, character in enumerate(characters) if character.alphabet in members]
        for meta_split, members in chosen.items()
    }


def download_omniglot(root: str | Path, archives: Sequence[str] = FULL_ARCHIVES, url: str = OMNIGLOT_URL) -> list[Path]:
    """Fetch the Omniglot ``archives`` that ``root`` lacks from ``url``, verifying their MD5.

    An archive already in ``root`` (as a zip or an extracted folder) is left alone; reading it
    detects a corrupt zip. ``url`` may be a mirror, ``file://`` included.

    Returns:
        The paths of the archives downloaded.
    """
    unknown = sorted(set(archives) - set(OMNIGLOT_MD5))
    if unknown:
        raise ValueError(f"Unknown Omniglot archives {unknown}; known: {sorted(OMNIGLOT_MD5)}.")
    root = Path(root).expanduser()
    fetched = []
    for name in archives:
        if (root / f"{name}.zip").is_file() or (root / name).is_dir():
            continue
        fetched.append(download_verified(f"{url}/{name}.zip", root / f"{name}.zip", OMNIGLOT_MD5[name]))
    return fetched


class OmniglotDataModule(ImageFilesDataModule):
    """Omniglot N-way K-shot episodes in torchmeta's batch format: ``x`` of shape ``(B, N*K, 1, 28, 28)``.

    Classes are characters, plus (with ``rotations``) each character rotated by 90, 180 and 270
    degrees as three new classes of the same meta-split. The class split is torchmeta's Vinyals split
    (:func:`vinyals_split`, 1028/172/423 characters) when the full set is in ``root``, and otherwise a
    seeded split by character (:func:`seeded_split`, seed 0, same proportions): the small background
    subsets give 153/26/63 characters. ``split_by="alphabet"`` splits by whole alphabets instead
    (:func:`alphabet_split`, seed 0), so that meta-test holds only alphabets never seen in meta-training: the
    small subsets give 5/1/2 alphabets, 179/24/39 characters. Pixels are floats in ``[0, 1]``, 1 on the
    strokes (torchmeta's ``Resize(28)`` then ``ToTensor()``).

    Call :meth:`prepare_data` (downloads, with ``download=True``) and :meth:`setup` (decodes) before
    asking for loaders outside a Trainer.

    Args:
        root: folder holding the archives (zips or extracted folders).
        ways: classes per task (N).
        shots: support images per class (K).
        test_shots: query images per class.
        batch_size: tasks per meta-batch in training.
        eval_batch_size: tasks per batch in validation and test; ``None`` uses ``batch_size``.
        num_train_tasks: training tasks per epoch.
        num_eval_tasks: size of the fixed validation and test task sets (600 is the common protocol).
        use_vinyals_split: ``None`` uses the Vinyals split when the full set is present and ``split_by`` is
            ``"character"``, and a seeded split otherwise; ``True`` requires the full set; ``False`` always uses
            the seeded split.
        split_by: what the seeded split keeps together: ``"character"`` (default; a character's images and
            rotations) or ``"alphabet"`` (every character of an alphabet: meta-test on unseen alphabets).
        rotations: add the 90/180/270-degree rotations of every character as new classes.
        image_size: side of the resized square images.
        download: in :meth:`prepare_data`, fetch the full archives that ``root`` lacks.
        cache_dir: if given, a folder (outside the repository) where the decoded images are cached.
        seed: fixes the training tasks, and the evaluation tasks unless ``eval_seed`` is given.
        eval_seed: fixes the validation and test tasks.
        num_workers: data loader worker processes (0 is usually fastest: a task is a tensor index).
    """

    def __init__(
        self,
        root: str = "data/omniglot",
        ways: int = 5,
        shots: int = 1,
        test_shots: int = 15,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_train_tasks: int = 3200,
        num_eval_tasks: int = 600,
        use_vinyals_split: bool | None = None,
        split_by: Literal["character", "alphabet"] = "character",
        rotations: bool = True,
        image_size: int = 28,
        download: bool = False,
        cache_dir: str | None = None,
        seed: int = 0,
        eval_seed: int | None = None,
        num_workers: int = 0,
    ) -> None:
        if split_by not in ("character", "alphabet"):
            raise ValueError(f'split_by must be "character" or "alphabet"; got {split_by!r}.')
        if split_by == "alphabet" and use_vinyals_split:
            raise ValueError(
                'use_vinyals_split=True and split_by="alphabet" ask for two different splits: the Vinyals split '
                "is fixed (meta-test: the evaluation alphabets). Pass one of them."
            )
        rotated = [partial(torch.rot90, k=k, dims=(-2, -1)) for k in (1, 2, 3)] if rotations else ()
        super().__init__(
            root, ways, shots, test_shots, batch_size, eval_batch_size, num_train_tasks, num_eval_tasks, image_size,
            cache_dir, seed, eval_seed, num_workers, class_augmentations=rotated, transform=_to_unit_interval,
        )  # fmt: skip
        self.save_hyperparameters()
        self.use_vinyals_split = use_vinyals_split
        self.split_by = split_by
        self.rotations = rotations
        self.download = download
        self.images: OmniglotImages | None = None
        self.class_splits: dict[str, list[int]] = {}

    def prepare_data(self) -> None:
        if self.download:
            download_omniglot(self.root)

    def load_data(self) -> tuple[tuple[Tensor, Tensor], Mapping[str, Sequence[int]]]:
        self.images = read_omniglot(self.root, self.image_size, self.cache_dir)
        characters = self.images.characters
        full_set = set(FULL_ARCHIVES) <= set(self.images.archives)
        if self.use_vinyals_split or (self.use_vinyals_split is None and full_set and self.split_by == "character"):
            self.class_splits = vinyals_split(characters)
            rule = "the Vinyals split"
        elif self.split_by == "alphabet":
            self.class_splits = alphabet_split(characters)
            rule = "a seeded split (seed 0) by alphabet"
        else:
            self.class_splits = seeded_split(characters)
            rule = "a seeded split (seed 0) by character"
        sizes = "/".join(str(len(self.class_splits[meta_split])) for meta_split in ("train", "val", "test"))
        rank_zero_info(
            f"Omniglot: {len(self.images.images)} images of {len(characters)} characters from "
            f"{', '.join(self.images.archives)}; {rule}, {sizes} characters for meta-train/val/test"
            + (", each also rotated by 90/180/270 degrees." if self.rotations else ".")
        )
        return (self.images.images, self.images.labels), self.class_splits

    def class_names(self, meta_split: str) -> list[str]:
        """``alphabet/character/rotNNN`` of every class of ``meta_split``, in class index order."""
        labels = self.class_labels(meta_split)  # raises unless setup() ran, which set self.images
        assert self.images is not None
        characters = [self.images.characters[label] for label in labels]
        angles = (0, 90, 180, 270) if self.rotations else (0,)
        return [f"{c.alphabet}/{c.character}/rot{angle:03d}" for angle in angles for c in characters]


def _to_unit_interval(pixels: Tensor) -> Tensor:
    """uint8 pixels -> float32 in ``[0, 1]`` (torchmeta's ``ToTensor``), in numpy like the rest of a task's copies."""
    return torch.from_numpy(np.divide(pixels.numpy(), np.float32(255), dtype=np.float32))


def _group(archive: str) -> str:
    return "background" if archive.startswith("images_background") else "evaluation"


class _ArchiveReader:
    """Lists and decodes the PNGs of one archive, a zip or an extracted folder; errors name the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None

    def __enter__(self) -> _ArchiveReader:
        if self.path.is_file():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as error:
                raise self._corrupt(error) from error
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._zip is not None:
            self._zip.close()

    def characters(self) -> dict[tuple[str, str], list[str]]:
        """``(alphabet, character) -> member names`` of its images, sorted."""
        names = self._zip.namelist() if self._zip is not None else self._folder_members()
        found: dict[tuple[str, str], list[str]] = {}
        for name in sorted(names):
            parts = name.split("/")
            if len(parts) >= 3 and parts[-1].endswith(".png"):
                found.setdefault((parts[-3], parts[-2]), []).append(name)
        return found

    def decode(self, member: str, image_size: int) -> np.ndarray:
        try:
            data = self._zip.read(member) if self._zip is not None else (self.path / member).read_bytes()
            image = ImageOps.invert(Image.open(io.BytesIO(data)).convert("L"))
        except (zipfile.BadZipFile, UnidentifiedImageError, OSError) as error:
            raise self._corrupt(error, member) from error
        return np.asarray(image.resize((image_size, image_size), Image.Resampling.BILINEAR))

    def _folder_members(self) -> Iterator[str]:
        return (path.relative_to(self.path).as_posix() for path in self.path.rglob("*.png"))

    def _corrupt(self, error: Exception, member: str | None = None) -> ValueError:
        where = f"{self.path}" + (f" (member {member})" if member else "")
        name = self.path.name.removesuffix(".zip")
        source = f"{OMNIGLOT_URL}/{name}.zip" if name in OMNIGLOT_MD5 else "its source"
        return ValueError(
            f"Omniglot archive {where} is corrupt or truncated: {error}. Delete it and fetch it again "
            f"(download=True, or by hand from {source})."
        )


def _fingerprint(archives: Mapping[str, Path]) -> str:
    """A digest of the archives' names, sizes and modification times (for folders: over their PNGs)."""
    description = []
    for name, path in archives.items():
        files = [path] if path.is_file() else sorted(path.rglob("*.png"))
        stats = [file.stat() for file in files]
        description.append([name, len(stats), sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)])
    return hashlib.sha256(json.dumps([_CACHE_FORMAT, description]).encode()).hexdigest()[:16]
