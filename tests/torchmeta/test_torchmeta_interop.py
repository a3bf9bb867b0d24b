"""torchmeta itself, on current torch: the compatibility patch, and meta-training on torchmeta's own datasets.

These run in the environment that ``.ci/torchmeta.sh`` builds (torch 2.14.1, torchvision 0.29.1,
torchmeta 1.8.0 installed with ``--no-deps``); elsewhere the ``torchmeta`` fixture skips them. Omniglot is
torchmeta's ``Omniglot`` built from the shared small background zips (see ``conftest.py``), miniImageNet
torchmeta's ``MiniImagenet`` built from small generated caches.
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_contrastive import ComplexSynapse, Contrastive
from lightning_contrastive.compat import TORCHMETA_PATCHES, patch_torchmeta
from lightning_contrastive.data.miniimagenet import MiniImagenetDataModule
from lightning_contrastive.data.omniglot import read_omniglot
from lightning_contrastive.data.torchmeta import TorchmetaDataModule
from lightning_contrastive.module import MetaLearningModule
from lightning_contrastive.networks import MLP, Conv4

QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def meta_test(module: MetaLearningModule, data: TorchmetaDataModule) -> dict[str, float]:
    (result,) = pl.Trainer(**QUIET).test(module, data, verbose=False)
    return result


# ------------------------------------------------------------------ the compatibility patch
def test_a_missing_torchvision_is_explained_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("torchvision", "torchvision.datasets", "torchvision.datasets.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(
        ModuleNotFoundError, match=r"patch_torchmeta needs torchvision, .* pip install --no-deps torchmeta"
    ):
        patch_torchmeta()


PATCH_SCRIPT = """
import json, sys
report = {}
try:
    import torchmeta
except ImportError as error:
    report["import_before"] = str(error)
from lightning_contrastive.compat import patch_torchmeta
report["first"] = patch_torchmeta()
report["second"] = patch_torchmeta()

from torchmeta.toy.helpers import sinusoid
from torchmeta.utils.data import BatchMetaDataLoader, SubsetTask
dataset = sinusoid(shots=3, test_shots=2, num_tasks=10, seed=0)
del SubsetTask.__getitems__  # undo the third patch: building a task fails again ...
try:
    dataset[0]
except NotImplementedError as error:
    report["task_without_patch"] = str(error)
report["third"] = patch_torchmeta()  # ... and only that patch is applied again
batch = next(iter(BatchMetaDataLoader(dataset, batch_size=4)))
report["shapes"] = {key: [list(t.shape) for t in batch[key]] for key in ("train", "test")}
print(json.dumps(report))
"""


def test_patch_torchmeta_fixes_each_breakage_once_and_says_so(torchmeta: ModuleType) -> None:
    """In a fresh interpreter, where torchmeta has not been imported or patched yet."""
    run = subprocess.run([sys.executable, "-c", PATCH_SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert "cannot import name '_get_confirm_token' from 'torchvision.datasets.utils'" in report["import_before"]
    assert tuple(report["first"]) == TORCHMETA_PATCHES and report["second"] == []
    assert "SubsetTask overrides __getitem__ but not __getitems__" in report["task_without_patch"]
    assert report["third"] == ["torchmeta.utils.data.task.SubsetTask.__getitems__"]
    assert report["shapes"] == {"train": [[4, 3, 1], [4, 3, 1]], "test": [[4, 2, 1], [4, 2, 1]]}
    logged = [line for line in run.stderr.splitlines() if line.startswith("patch_torchmeta:")]
    assert len(logged) == 2, run.stderr  # once per call that patched something
    assert logged[0].startswith("patch_torchmeta: patched torchmeta 1.8.0 for torch ")
    assert logged[0].endswith(f"added {', '.join(TORCHMETA_PATCHES)}.")


def test_the_restored_drive_helpers_read_the_token_and_stream_the_body(torchmeta: ModuleType, tmp_path: Path) -> None:
    import requests
    import torchvision.datasets.utils as torchvision_utils

    body = bytes(range(256)) * 1000
    response = requests.models.Response()
    response.raw = io.BytesIO(body)
    assert torchvision_utils._get_confirm_token(response) is None
    response.cookies.set("download_warning_12345", "CONFIRM")
    assert torchvision_utils._get_confirm_token(response) == "CONFIRM"
    torchvision_utils._save_response_content(response, str(tmp_path / "file"))
    assert (tmp_path / "file").read_bytes() == body


# ------------------------------------------------------------------ torchmeta's sinusoid (float64 batches)
def test_meta_training_on_torchmetas_sinusoid_halves_the_meta_test_mse(torchmeta: ModuleType) -> None:
    from torchmeta.toy.helpers import sinusoid

    pl.seed_everything(0, verbose=False)
    steps = 150
    data = TorchmetaDataModule(
        train=sinusoid(shots=10, test_shots=10, seed=0),
        test=sinusoid(shots=10, test_shots=10, seed=1),
        batch_size=5,
        num_train_tasks=5 * steps,
        num_eval_tasks=100,
        eval_batch_size=50,
    )
    batch = next(iter(data.train_dataloader()))
    assert batch["train"][0].dtype == torch.float64 and batch["train"][0].shape == (5, 10, 1)
    module = MetaLearningModule(
        ComplexSynapse(MLP(), loss="mse", init_lambda=1.0),
        Contrastive(beta=0.03, symmetric=True, inner_steps=20, nudged_steps=10, inner_lr=0.005, inner_momentum=0.9),
        optimizer=partial(torch.optim.Adam, lr=1e-2),
    )
    before = meta_test(module, data)
    run = pl.Trainer(max_epochs=1, **QUIET)
    run.fit(module, data)  # no validation set: Lightning skips validation
    assert run.global_step == steps
    after = meta_test(module, data)
    assert after["test/query_loss"] <= 0.5 * before["test/query_loss"], (before, after)


# ------------------------------------------------------------------ torchmeta's Omniglot, built from the shared zips
def omniglot_module(
    folder: Path,
    helper_kwargs: Mapping[str, Any] | None = None,
    meta_splits: tuple[str, ...] = ("train", "test"),
    **settings: Any,
) -> TorchmetaDataModule:
    """torchmeta's 5-way 1-shot Omniglot without the Vinyals split (so without meta-validation classes)."""
    from torchmeta.datasets.helpers import omniglot

    defaults = {"folder": folder, "shots": 1, "ways": 5, "test_shots": 5, "use_vinyals_split": False, "seed": 0}
    return TorchmetaDataModule.from_helper(omniglot, {**defaults, **(helper_kwargs or {})}, meta_splits, **settings)


def task_images(batch: Mapping[str, Any], task: int) -> list[bytes]:
    """The support and query images of one task, as sorted bytes (torchmeta orders a task's examples statefully)."""
    x = torch.cat([batch["train"][0][task], batch["test"][0][task]])
    return sorted(map(bytes, x.numpy()))


def test_torchmeta_omniglot_images_are_the_ones_our_loader_decodes(
    torchmeta_omniglot_folder: Path, omniglot_root: Path, tmp_path: Path
) -> None:
    data = omniglot_module(torchmeta_omniglot_folder, helper_kwargs={"class_augmentations": None}, batch_size=4)
    batch = next(iter(data.train_dataloader()))
    for key, count in (("train", 5), ("test", 25)):
        x, y = batch[key]
        assert x.shape == (4, count, 1, 28, 28) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and all(
            torch.equal(y[t].bincount(), torch.full((5,), count // 5)) for t in range(4)
        )
    ours = read_omniglot(omniglot_root, cache_dir=tmp_path)
    known = set(map(bytes, ours.images[:, 0].numpy()))
    pixels = (torch.cat([batch["train"][0], batch["test"][0]], dim=1) * 255).round().to(torch.uint8)
    assert all(bytes(image) in known for image in pixels.reshape(-1, 28, 28).numpy())


def test_tasks_are_seeded_fresh_each_training_epoch_and_fixed_for_evaluation(torchmeta_omniglot_folder: Path) -> None:
    first, second = (omniglot_module(torchmeta_omniglot_folder, batch_size=2, num_train_tasks=4) for _ in range(2))
    assert first.datasets["val"] is None and first.val_dataloader() == []
    train = first.train_dataloader()
    assert len(train) == 2 and list(train.sampler) == list(second.train_dataloader().sampler)
    epoch_0 = list(train.sampler)
    assert all(len(set(classes)) == 5 and max(classes) < 544 for classes in epoch_0)  # 136 characters x 4 rotations
    train.sampler.set_epoch(1)
    assert not set(epoch_0) & set(train.sampler)
    test = first.test_dataloader()
    assert len(test.sampler) == 600
    assert max(max(classes) for classes in test.sampler) < 424  # 106 characters x 4 rotations
    once, again, other = (next(iter(module.test_dataloader())) for module in (first, first, second))
    for index in range(2):
        assert task_images(once, index) == task_images(again, index) == task_images(other, index)


def test_meta_training_on_torchmetas_omniglot_lifts_meta_test_accuracy(torchmeta_omniglot_folder: Path) -> None:
    pl.seed_everything(0, verbose=False)
    steps = 30
    data = omniglot_module(
        torchmeta_omniglot_folder, batch_size=4, num_train_tasks=4 * steps, num_eval_tasks=100, eval_batch_size=50
    )
    module = MetaLearningModule(
        ComplexSynapse(Conv4(in_channels=1, ways=5, channels=16, image_size=28), init_lambda=0.5),
        Contrastive(beta=0.1, symmetric=True, inner_steps=10, nudged_steps=5, inner_lr=0.1, inner_momentum=0.9),
        optimizer=partial(torch.optim.Adam, lr=1e-2),
    )
    before = meta_test(module, data)
    run = pl.Trainer(max_epochs=1, **QUIET)
    run.fit(module, data)
    assert run.global_step == steps
    after = meta_test(module, data)
    # On meta-test characters never seen in meta-training (100 tasks, 5-way 1-shot).
    assert after["test/accuracy"] >= before["test/accuracy"] + 0.10, (before, after)
    assert after["test/query_loss"] <= 0.75 * before["test/query_loss"], (before, after)


# ------------------------------------------------------------------ torchmeta's miniImageNet, from pickled caches
def test_torchmeta_miniimagenet_reads_the_images_our_loader_reads(
    torchmeta: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchmeta builds its HDF5 files from the ``mini-imagenet-cache-*.pkl`` files in ``mini-imagenet.tar.gz``.

    Fixture caches (5 classes per meta-split, 4 images of 84 x 84 each) go into that archive where
    torchmeta looks for it; only its Google Drive fetch, which needs the network, is skipped.
    """
    import torchmeta.datasets.miniimagenet as torchmeta_miniimagenet
    from torchmeta.datasets.helpers import miniimagenet

    rng = np.random.default_rng(0)
    caches = tmp_path / "caches"
    caches.mkdir()
    for number, meta_split in enumerate(("train", "val", "test")):
        images = rng.integers(0, 256, size=(20, 84, 84, 3), dtype=np.uint8)
        class_dict = {f"n0{number}{c:06d}": list(range(c, 20, 5)) for c in range(5)}  # classes interleaved
        with open(caches / f"mini-imagenet-cache-{meta_split}.pkl", "wb") as stream:
            pickle.dump({"image_data": images, "class_dict": class_dict}, stream)
    (tmp_path / "miniimagenet").mkdir()
    with tarfile.open(tmp_path / "miniimagenet" / "mini-imagenet.tar.gz", "w:gz") as archive:
        for cache in sorted(caches.iterdir()):
            archive.add(cache, arcname=cache.name)
    monkeypatch.setattr(torchmeta_miniimagenet, "download_file_from_google_drive", lambda *args, **kwargs: None)

    helper_kwargs = {"folder": tmp_path, "shots": 1, "ways": 5, "test_shots": 3, "download": True, "seed": 0}
    data = TorchmetaDataModule.from_helper(miniimagenet, helper_kwargs, batch_size=2, num_eval_tasks=4)
    ours = MiniImagenetDataModule(str(caches), ways=5, shots=1, test_shots=3, normalize=False)
    with pytest.warns(UserWarning, match="not Ravi & Larochelle's 64/16/20"):
        ours.setup()
    for meta_split, loader in (("train", data.train_dataloader()), ("val", data.val_dataloader())):
        batch = next(iter(loader))
        assert batch["train"][0].shape == (2, 5, 3, 84, 84) and batch["test"][0].shape == (2, 15, 3, 84, 84)
        pixels = (torch.cat([batch["train"][0], batch["test"][0]], dim=1) * 255).round().to(torch.uint8)
        labels = ours.class_labels(meta_split)
        known = set(map(bytes, ours.images.images[torch.isin(ours.images.labels, torch.tensor(labels))].numpy()))
        assert all(bytes(image) in known for image in pixels.reshape(-1, 3, 84, 84).numpy())


# ------------------------------------------------------------------ bad input
def test_a_module_without_meta_datasets_is_refused() -> None:
    with pytest.raises(ValueError, match="needs at least one meta-dataset"):
        TorchmetaDataModule()
    with pytest.raises(ValueError, match=r"train must be a torchmeta meta-dataset .* got int"):
        TorchmetaDataModule(train=3)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1; got 0"):
        TorchmetaDataModule(train=[], batch_size=0)


def test_bad_helper_settings_and_missing_splits_are_refused(torchmeta_omniglot_folder: Path) -> None:
    from torchmeta.datasets.helpers import omniglot

    with pytest.raises(ValueError, match=r"meta_splits must be some of \('train', 'val', 'test'\); got \('valid',\)"):
        TorchmetaDataModule.from_helper(omniglot, {}, meta_splits=("valid",))
    with pytest.raises(ValueError, match="leave it out of helper_kwargs"):
        TorchmetaDataModule.from_helper(omniglot, {"meta_split": "train"})
    data = omniglot_module(torchmeta_omniglot_folder, meta_splits=("train",))
    with pytest.raises(ValueError, match=r"has no test meta-dataset; pass test=\.\.\. \(or include 'test'"):
        data.test_dataloader()
    too_many = omniglot_module(torchmeta_omniglot_folder, helper_kwargs={"ways": 545})
    with pytest.raises(ValueError, match=r"A 545-way task needs 545 classes but .* has 544\. Lower ways"):
        too_many.train_dataloader()


def test_evaluation_tasks_do_not_depend_on_the_training_seed(torchmeta_omniglot_folder: Path) -> None:
    fixed = [omniglot_module(torchmeta_omniglot_folder, seed=seed, eval_seed=7) for seed in (0, 1)]
    assert list(fixed[0].test_dataloader().sampler) == list(fixed[1].test_dataloader().sampler)
    assert list(fixed[0].train_dataloader().sampler) != list(fixed[1].train_dataloader().sampler)
    assert np.unique([len(classes) for classes in fixed[0].test_dataloader().sampler]).tolist() == [5]
