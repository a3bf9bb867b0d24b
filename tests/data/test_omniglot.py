"""Omniglot episodes on the real shared images: decoding, class splits, rotations, task invariants, downloads.

The shared files are the official small background subsets; set ``LIGHTNING_CONTRASTIVE_OMNIGLOT_ROOT`` to
read them from elsewhere. They are decoded once per module (and cached in a temporary folder that the
other data modules of this module load from).
"""

from __future__ import annotations

import io
import os
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from lightning_contrastive.data import omniglot
from lightning_contrastive.data.download import download_verified, md5sum
from lightning_contrastive.data.omniglot import (
    OMNIGLOT_MD5,
    OmniglotDataModule,
    OmniglotImages,
    alphabet_split,
    download_omniglot,
    read_omniglot,
    seeded_split,
)
from lightning_contrastive.tasks import split_batch

REPOSITORY = Path(__file__).resolve().parents[2]
ENV_VAR = "LIGHTNING_CONTRASTIVE_OMNIGLOT_ROOT"
SMALL_ARCHIVES = ("images_background_small1", "images_background_small2")


def shared_omniglot() -> Path | None:
    candidates = [os.environ.get(ENV_VAR), REPOSITORY.parent / "shared/data/omniglot"]
    for candidate in filter(None, candidates):
        if all((Path(candidate) / f"{name}.zip").is_file() for name in SMALL_ARCHIVES):
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def root() -> Path:
    found = shared_omniglot()
    if found is None:
        pytest.skip(f"The Omniglot small background zips are not here; point {ENV_VAR} at their folder.")
    return found


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("omniglot-cache")


@pytest.fixture(scope="module")
def decoded(root: Path, cache_dir: Path) -> OmniglotImages:
    return read_omniglot(root, cache_dir=cache_dir)


def datamodule(root: Path, cache_dir: Path, **settings: object) -> OmniglotDataModule:
    module = OmniglotDataModule(str(root), cache_dir=str(cache_dir), **settings)
    module.setup()
    return module


def test_reads_both_subsets_once_each_character(root: Path, decoded: OmniglotImages) -> None:
    assert decoded.archives == SMALL_ARCHIVES
    assert decoded.images.shape == (4840, 1, 28, 28) and decoded.images.dtype == torch.uint8
    assert len(decoded.characters) == 242 and len(set(decoded.characters)) == 242
    assert torch.equal(torch.bincount(decoded.labels), torch.full((242,), 20))
    alphabets = {character.alphabet for character in decoded.characters}
    assert len(alphabets) == 8 and {"Greek", "Latin"} <= alphabets
    # The decoding is torchmeta's: greyscale, inverted (strokes bright), Pillow's bilinear resize to 28.
    first = decoded.characters[0]
    with zipfile.ZipFile(root / "images_background_small1.zip") as archive:
        members = archive.namelist()
        member = sorted(n for n in members if f"/{first.alphabet}/{first.character}/" in n and n.endswith(".png"))[0]
        reference = ImageOps.invert(Image.open(io.BytesIO(archive.read(member))).convert("L")).resize(
            (28, 28), Image.Resampling.BILINEAR
        )
    assert np.array_equal(decoded.images[0, 0].numpy(), np.asarray(reference))
    assert decoded.images.float().mean() < 40  # mostly dark background


def test_extracted_folders_read_like_zips(root: Path, decoded: OmniglotImages, tmp_path: Path) -> None:
    with zipfile.ZipFile(root / "images_background_small2.zip") as archive:
        archive.extractall(tmp_path, [name for name in archive.namelist() if "/Greek/" in name or "/Tagalog/" in name])
    from_folder = read_omniglot(tmp_path)
    assert from_folder.archives == ("images_background_small2",) and len(from_folder.characters) == 24 + 17
    index = {character: label for label, character in enumerate(decoded.characters)}
    for label, character in enumerate(from_folder.characters):  # Greek and Latin came from small1 above
        assert torch.equal(
            from_folder.images[from_folder.labels == label], decoded.images[decoded.labels == index[character]]
        )


def test_the_cache_reloads_the_same_images(root: Path, decoded: OmniglotImages, cache_dir: Path) -> None:
    (cache_file,) = cache_dir.glob("omniglot-28px-*.pt")
    assert REPOSITORY not in cache_file.parents
    cached = read_omniglot(root, cache_dir=cache_dir)
    assert torch.equal(cached.images, decoded.images) and torch.equal(cached.labels, decoded.labels)
    assert cached.characters == decoded.characters and cached.archives == decoded.archives


def test_the_seeded_split_is_disjoint_and_keeps_rotations_together(root: Path, cache_dir: Path) -> None:
    module = datamodule(root, cache_dir)
    sizes = {meta_split: len(module.class_labels(meta_split)) for meta_split in ("train", "val", "test")}
    assert sizes == {"train": 153, "val": 26, "test": 63}
    assert {s: module.tasks(s).num_classes for s in sizes} == {"train": 612, "val": 104, "test": 252}
    characters = {}
    for meta_split in sizes:
        names = module.class_names(meta_split)
        assert len(set(names)) == len(names)
        characters[meta_split] = {name.rsplit("/", 1)[0] for name in names}
        assert {name.rsplit("/", 1)[1] for name in names} == {"rot000", "rot090", "rot180", "rot270"}
    assert not characters["train"] & characters["val"]
    assert not characters["train"] & characters["test"] and not characters["val"] & characters["test"]
    assert seeded_split(module.images.characters) == seeded_split(module.images.characters[::-1][::-1])
    assert seeded_split(module.images.characters, seed=1) != module.class_splits


def test_the_alphabet_split_gives_each_meta_split_whole_alphabets(root: Path, cache_dir: Path) -> None:
    module = datamodule(root, cache_dir, split_by="alphabet", ways=20)
    alphabets = {
        meta_split: {name.split("/")[0] for name in module.class_names(meta_split)}
        for meta_split in ("train", "val", "test")
    }
    # Seed 0 on the 8 alphabets of the small subsets, written out so that a change of rule shows here.
    assert alphabets == {
        "train": {"Greek", "Japanese_(katakana)", "Korean", "Latin", "Sanskrit"},
        "val": {"Balinese"},
        "test": {"Early_Aramaic", "Tagalog"},
    }
    characters = module.images.characters
    for meta_split, names in alphabets.items():  # every character of each alphabet, and nothing else
        expected = sorted(i for i, character in enumerate(characters) if character.alphabet in names)
        assert module.class_labels(meta_split) == expected
    assert [len(module.class_labels(s)) for s in ("train", "val", "test")] == [179, 24, 39]
    tasks = module.tasks("test")
    test_alphabets = {characters[label].alphabet for label in module.class_labels("test")}
    base_count = len(module.class_labels("test"))
    for index in range(4):  # a 20-way test task draws (rotated) characters of the held-out alphabets only
        classes = tasks.draw(index).classes
        assert len(classes) == 20
        assert {characters[module.class_labels("test")[c % base_count]].alphabet for c in classes} <= test_alphabets
    assert alphabet_split(characters) == alphabet_split(characters[::-1][::-1])
    assert alphabet_split(characters, seed=1) != alphabet_split(characters)
    assert datamodule(root, cache_dir).class_splits != module.class_splits  # the default stays by character


def test_the_alphabet_split_of_the_full_set_keeps_the_vinyals_proportions_of_alphabets(tmp_path: Path) -> None:
    write_full_layout(tmp_path)
    module = OmniglotDataModule(str(tmp_path), ways=5, shots=1, test_shots=1, split_by="alphabet")
    module.setup()
    characters = module.images.characters
    alphabets = {s: {characters[i].alphabet for i in module.class_labels(s)} for s in ("train", "val", "test")}
    assert [len(alphabets[s]) for s in ("train", "val", "test")] == [32, 5, 13]  # 50 alphabets, 1028:172:423
    assert not alphabets["train"] & alphabets["val"] and not alphabets["train"] & alphabets["test"]
    assert not alphabets["val"] & alphabets["test"]


def test_bad_split_settings_raise_and_name_the_fix(root: Path, cache_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='split_by must be "character" or "alphabet"; got \'drawer\''):
        OmniglotDataModule(str(root), split_by="drawer")
    with pytest.raises(ValueError, match=r"ask for two different splits.*Pass one of them"):
        OmniglotDataModule(str(root), split_by="alphabet", use_vinyals_split=True)
    with zipfile.ZipFile(root / "images_background_small2.zip") as archive:
        archive.extractall(tmp_path, [name for name in archive.namelist() if "/Greek/" in name or "/Tagalog/" in name])
    with pytest.raises(
        ValueError, match=r"at least 3 alphabets.*hold 2: \['Greek', 'Tagalog'\].*split_by=\"character\""
    ):
        OmniglotDataModule(str(tmp_path), ways=5, split_by="alphabet").setup()


@pytest.mark.parametrize(("ways", "shots"), [(20, 1), (5, 5)])
def test_tasks_hold_distinct_classes_and_images_with_rotations_applied(
    root: Path, cache_dir: Path, ways: int, shots: int
) -> None:
    module = datamodule(root, cache_dir, ways=ways, shots=shots, test_shots=15)
    store = module.images.images[:, 0].numpy()
    for meta_split in ("train", "val", "test"):
        tasks = module.tasks(meta_split)
        base_count = len(module.class_labels(meta_split))
        for index in range(8):
            draw, episode = tasks.draw(index), tasks[index]
            assert len(set(draw.classes.tolist())) == ways
            # Distinct images per class; a character may come twice under different rotations, as in torchmeta.
            assert all(len(set(row.tolist())) == shots + 15 for row in draw.examples)
            support_pixels, query_pixels = (set(map(bytes, episode[key][0].numpy())) for key in ("train", "test"))
            assert len(support_pixels) == ways * shots and len(query_pixels) == ways * 15
            assert not support_pixels & query_pixels
            for key, per_class, columns in (("train", shots, slice(0, shots)), ("test", 15, slice(shots, None))):
                x, y = episode[key]
                assert x.shape == (ways * per_class, 1, 28, 28) and x.dtype == torch.float32
                assert torch.equal(torch.bincount(y, minlength=ways), torch.full((ways,), per_class))
                pixels = (x[:, 0] * 255).round().to(torch.uint8).numpy()
                for label, task_class in enumerate(draw.classes):
                    # Independent reference for the rotation: Pillow rotates counter-clockwise by 90 k degrees.
                    angle = 90 * (task_class // base_count)
                    expected = [
                        np.asarray(Image.fromarray(store[row]).rotate(angle)) for row in draw.examples[label, columns]
                    ]
                    got = pixels[(y == label).numpy()]
                    assert sorted(image.tobytes() for image in got) == sorted(image.tobytes() for image in expected)


def test_labels_are_shuffled_per_task(root: Path, cache_dir: Path) -> None:
    tasks = datamodule(root, cache_dir, ways=5).tasks("train")
    assert len({int(tasks.draw(index).classes[0]) for index in range(20)}) > 10
    assert any(not torch.equal(tasks[i]["test"][1], tasks[i]["test"][1].sort().values) for i in range(3))


def test_evaluation_episodes_are_identical_across_instances_and_epochs(root: Path, cache_dir: Path) -> None:
    settings = {"ways": 20, "batch_size": 16, "num_eval_tasks": 40, "num_train_tasks": 32, "seed": 5}
    first, second = datamodule(root, cache_dir, **settings), datamodule(root, cache_dir, **settings)

    def batches(loader: torch.utils.data.DataLoader, epoch: int) -> list[torch.Tensor]:
        loader.sampler.set_epoch(epoch)
        return [torch.cat([batch["train"][0], batch["test"][0]], dim=1) for batch in loader]

    validation = batches(first.val_dataloader(), 0)
    assert [len(batch) for batch in validation] == [16, 16, 8]
    assert all(map(torch.equal, validation, batches(second.val_dataloader(), 0)))
    assert all(map(torch.equal, validation, batches(first.val_dataloader(), 3)))
    assert all(map(torch.equal, batches(first.test_dataloader(), 0), batches(second.test_dataloader(), 2)))
    training = batches(first.train_dataloader(), 0)
    assert all(map(torch.equal, training, batches(second.train_dataloader(), 0)))
    assert not any(map(torch.equal, training, batches(first.train_dataloader(), 1)))


def test_meta_batches_have_torchmeta_format(root: Path, cache_dir: Path) -> None:
    module = datamodule(root, cache_dir, ways=5, shots=1, test_shots=15, batch_size=4)
    batch = next(iter(module.train_dataloader()))
    assert batch["train"][0].shape == (4, 5, 1, 28, 28) and batch["test"][0].shape == (4, 75, 1, 28, 28)
    assert batch["train"][1].shape == (4, 5) and batch["test"][1].dtype == torch.int64
    assert batch["train"][0].min() >= 0 and batch["train"][0].max() == 1
    assert len(split_batch(batch)) == 4


def test_no_rotations_means_one_class_per_character(root: Path, cache_dir: Path) -> None:
    module = datamodule(root, cache_dir, rotations=False)
    assert module.tasks("train").num_classes == 153 and module.class_names("val")[0].endswith("/rot000")


def test_the_vinyals_split_needs_the_full_set(root: Path, cache_dir: Path) -> None:
    with pytest.raises(ValueError, match="needs the full Omniglot set, 964 background and 659 evaluation"):
        datamodule(root, cache_dir, use_vinyals_split=True)


# Characters per alphabet of the full archives, and torchmeta's Vinyals split files
# (torchmeta/datasets/assets/omniglot/{train,val,test}.json) summarised alphabet by alphabet.
BACKGROUND = {
    "Alphabet_of_the_Magi": 20, "Anglo-Saxon_Futhorc": 29, "Arcadian": 26, "Armenian": 41,
    "Asomtavruli_(Georgian)": 40, "Balinese": 24, "Bengali": 46, "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14,
    "Braille": 26, "Burmese_(Myanmar)": 34, "Cyrillic": 33, "Early_Aramaic": 22, "Futurama": 26, "Grantha": 43,
    "Greek": 24, "Gujarati": 48, "Hebrew": 22, "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16,
    "Japanese_(hiragana)": 52, "Japanese_(katakana)": 47, "Korean": 40, "Latin": 26, "Malay_(Jawi_-_Arabic)": 40,
    "Mkhedruli_(Georgian)": 41, "N_Ko": 33, "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14, "Sanskrit": 42,
    "Syriac_(Estrangelo)": 23, "Tagalog": 17, "Tifinagh": 55,
}  # fmt: skip
EVALUATION = {
    "Angelic": 20, "Atemayar_Qelisayer": 26, "Atlantean": 26, "Aurek-Besh": 26, "Avesta": 26, "Ge_ez": 26,
    "Glagolitic": 45, "Gurmukhi": 45, "Kannada": 41, "Keble": 26, "Malayalam": 47, "Manipuri": 40, "Mongolian": 30,
    "Old_Church_Slavonic_(Cyrillic)": 45, "Oriya": 46, "Sylheti": 28, "Syriac_(Serto)": 23, "Tengwar": 25,
    "Tibetan": 42, "ULOG": 26,
}  # fmt: skip
TORCHMETA_VAL_ALPHABETS = {"Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"}
TORCHMETA_TEST_ALPHABETS = {  # plus Gurmukhi's characters 42 to 45
    "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sylheti",
    "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG",
}  # fmt: skip


def write_full_layout(root: Path, images_per_character: int = 2) -> None:
    """``images_background.zip`` and ``images_evaluation.zip`` with the full set's alphabets and characters."""
    png = io.BytesIO()
    Image.new("1", (105, 105), 1).save(png, format="PNG")
    for archive, alphabets in (("images_background", BACKGROUND), ("images_evaluation", EVALUATION)):
        with zipfile.ZipFile(root / f"{archive}.zip", "w") as output:
            for alphabet, count in alphabets.items():
                for number in range(1, count + 1):
                    for drawer in range(1, images_per_character + 1):
                        output.writestr(
                            f"{archive}/{alphabet}/character{number:02d}/0001_{drawer:02d}.png", png.getvalue()
                        )


def test_the_full_set_gets_torchmetas_vinyals_split(tmp_path: Path) -> None:
    write_full_layout(tmp_path)
    module = OmniglotDataModule(str(tmp_path), ways=20, shots=1, test_shots=1)
    module.setup()
    names = {
        s: {name.removesuffix("/rot000") for name in module.class_names(s) if name.endswith("rot000")}
        for s in ("train", "val", "test")
    }
    every = {f"{a}/character{n:02d}" for a, count in (BACKGROUND | EVALUATION).items() for n in range(1, count + 1)}
    expected_val = {name for name in every if name.split("/")[0] in TORCHMETA_VAL_ALPHABETS}
    expected_test = {name for name in every if name.split("/")[0] in TORCHMETA_TEST_ALPHABETS}
    expected_test |= {f"Gurmukhi/character{n}" for n in range(42, 46)}
    assert names["val"] == expected_val and names["test"] == expected_test
    assert names["train"] == every - expected_val - expected_test
    assert [len(names[s]) for s in ("train", "val", "test")] == [1028, 172, 423]
    assert [module.tasks(s).num_classes for s in ("train", "val", "test")] == [4112, 688, 1692]


def test_missing_files_name_the_folder_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"No Omniglot archives in {tmp_path}.*download=True"):
        OmniglotDataModule(str(tmp_path)).setup()


def test_corrupt_archives_are_rejected_with_their_path(root: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated" / "images_background_small1.zip"
    truncated.parent.mkdir()
    truncated.write_bytes((root / truncated.name).read_bytes()[:500_000])
    with pytest.raises(ValueError, match=f"{truncated} is corrupt or truncated.*Delete it"):
        read_omniglot(truncated.parent)
    bad_image = tmp_path / "bad" / "images_evaluation_extra.zip"
    bad_image.parent.mkdir()
    with zipfile.ZipFile(bad_image, "w") as archive:
        archive.writestr("images_evaluation_extra/Alphabet/character01/0001_01.png", b"not a png")
    with pytest.raises(ValueError, match=r"member images_evaluation_extra/Alphabet/character01/0001_01\.png"):
        read_omniglot(bad_image.parent)


def test_download_verifies_the_md5_and_keeps_only_complete_files(root: Path, tmp_path: Path) -> None:
    mirror = f"file://{root}"
    fetched = download_omniglot(tmp_path / "data", archives=["images_background_small1"], url=mirror)
    assert fetched == [tmp_path / "data" / "images_background_small1.zip"]
    assert md5sum(fetched[0]) == OMNIGLOT_MD5["images_background_small1"]
    assert download_omniglot(tmp_path / "data", archives=["images_background_small1"], url=mirror) == []
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes((root / "images_background_small2.zip").read_bytes()[:-1000])
    destination = tmp_path / "data" / "copy.zip"
    with pytest.raises(ValueError, match="truncated or corrupt, and was not saved"):
        download_verified(f"file://{truncated}", destination, OMNIGLOT_MD5["images_background_small2"])
    assert sorted(path.name for path in destination.parent.iterdir()) == ["images_background_small1.zip"]
    with pytest.raises(OSError, match="Could not download"):
        download_verified(f"file://{tmp_path}/absent.zip", destination, "0" * 32)
    with pytest.raises(ValueError, match="Unknown Omniglot archives"):
        download_omniglot(tmp_path, archives=["images_background_small3"])


def test_prepare_data_fetches_the_official_urls(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no network here, the URL opener serves a local, corrupt copy: the module must ask for the
    official files and refuse what it gets."""
    requested = []

    def local_copy(url: str, timeout: float) -> io.BufferedReader:
        requested.append(url)
        corrupt = tmp_path / "corrupt.zip"
        corrupt.write_bytes((root / "images_background_small1.zip").read_bytes()[:-1])
        return open(corrupt, "rb")

    monkeypatch.setattr(urllib.request, "urlopen", local_copy)
    module = OmniglotDataModule(str(tmp_path / "omniglot"), download=True)
    with pytest.raises(ValueError, match="MD5"):
        module.prepare_data()
    assert requested == [f"{omniglot.OMNIGLOT_URL}/images_background.zip"]
    assert omniglot.OMNIGLOT_URL == "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
    assert not any((tmp_path / "omniglot").iterdir())
