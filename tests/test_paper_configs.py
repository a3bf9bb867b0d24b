"""Every config under ``configs/paper/`` takes one real meta-step through the CLI, on CPU, on tiny generated data.

The configs are the full-size settings for a GPU; here only the inner steps, the query set and the meta-batch
shrink (through the command line, as a user would), so the learner, backbone, estimator and data module are
the config's own. The data are generated: an Omniglot-layout zip of blank-with-a-dot characters, and a
miniImageNet pickled cache of random 84x84 images.
"""

from __future__ import annotations

import io
import pickle
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lightning_contrastive.cli import MetaLearningCLI

PAPER_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml"))
IMAGES_PER_CLASS = 6  # shots + test_shots for the largest case below (5 shots, 1 query)


def write_omniglot(root: Path, alphabets: int = 3, characters: int = 20) -> None:
    """One small-subset-style archive: ``alphabets x characters`` characters, each drawn ``IMAGES_PER_CLASS`` times.

    Named like an official small subset, so the data module uses its seeded character split (the full set's
    Vinyals split needs all 1623 characters); 60 characters leave >= 20 classes, rotations included, per split.
    """
    rng = np.random.default_rng(0)
    archive = "images_background_small1"
    with zipfile.ZipFile(root / f"{archive}.zip", "w") as output:
        for alphabet in range(alphabets):
            for character in range(1, characters + 1):
                for drawer in range(1, IMAGES_PER_CLASS + 1):
                    pixels = np.ones((105, 105), dtype=bool)
                    row, column = rng.integers(10, 95, size=2)
                    pixels[row - 8 : row + 8, column - 8 : column + 8] = False  # a black stroke on white paper
                    png = io.BytesIO()
                    Image.fromarray(pixels).save(png, format="PNG")
                    member = f"{archive}/Alphabet_{alphabet}/character{character:02d}/{character:04d}_{drawer:02d}.png"
                    output.writestr(member, png.getvalue())


def write_miniimagenet(root: Path, classes: int = 5, size: int = 84) -> None:
    """``mini-imagenet-cache-{train,val,test}.pkl``: ``classes`` classes of ``IMAGES_PER_CLASS`` random images each."""
    rng = np.random.default_rng(0)
    for offset, split in enumerate(("train", "val", "test")):
        images = rng.integers(0, 256, size=(classes * IMAGES_PER_CLASS, size, size, 3), dtype=np.uint8)
        names = [f"n{1440764 + offset * classes + c:08d}" for c in range(classes)]
        class_dict = {
            name: list(range(c * IMAGES_PER_CLASS, (c + 1) * IMAGES_PER_CLASS)) for c, name in enumerate(names)
        }
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as stream:
            pickle.dump({"image_data": images, "class_dict": class_dict}, stream)


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    roots = {name: tmp_path_factory.mktemp(name) for name in ("Omniglot", "MiniImagenet")}
    write_omniglot(roots["Omniglot"])
    write_miniimagenet(roots["MiniImagenet"])
    return roots


def test_every_paper_config_is_found() -> None:
    assert len(PAPER_CONFIGS) >= 5


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda path: path.stem)
def test_one_meta_step_on_cpu(
    config: Path, data_roots: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-contrastive"])
    monkeypatch.chdir(tmp_path)  # the configs' checkpoint folders are relative to where the CLI runs
    settings = yaml.safe_load(config.read_text())
    (dataset,) = [name for name in data_roots if name in settings["data"]["class_path"]]
    # The Omniglot configs download the full set when it is missing; the generated archive must be used as is.
    offline = ["--data.download=false"] if dataset == "Omniglot" else []
    assert settings["trainer"]["accelerator"] == "auto"
    estimator = settings["model"]["estimator"]["init_args"]
    assert (estimator["inner_steps"], estimator["nudged_steps"], estimator["symmetric"]) == (200, 100, True)
    cli = MetaLearningCLI(
        args=[
            f"--config={config}",
            f"--data.root={data_roots[dataset]}",
            *offline,
            "--data.test_shots=1",
            "--data.batch_size=2",
            "--data.num_train_tasks=2",
            "--data.num_eval_tasks=2",
            "--data.eval_batch_size=2",
            "--model.estimator.init_args.inner_steps=2",
            "--model.estimator.init_args.nudged_steps=1",
            "--trainer.accelerator=cpu",
            "--trainer.max_steps=1",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    before = {name: p.detach().clone() for name, p in cli.model.named_parameters()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    after = dict(cli.model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    unchanged = [name for name, p in after.items() if torch.equal(p.detach(), before[name])]
    # A convolution's bias feeding BatchNorm (batch statistics) is cancelled by the normalisation: its gradient is
    # zero, so Adam leaves it (and its strength) in place. Every other meta-parameter moved.
    assert all(re.search(r"features\.\d+\.bias$", name) for name in unchanged), unchanged
    assert len(unchanged) < len(after) // 4
    assert (tmp_path / settings["trainer"]["callbacks"][0]["init_args"]["dirpath"] / "last.ckpt").is_file()
