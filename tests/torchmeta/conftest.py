"""Fixtures for the tests that run torchmeta itself (in the environment that ``.ci/torchmeta.sh`` builds).

Elsewhere the ``torchmeta`` fixture skips, so these tests skip cleanly in the main environment.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from lightning_contrastive.compat import patch_torchmeta

REPOSITORY = Path(__file__).resolve().parents[2]
OMNIGLOT_ENV_VAR = "LIGHTNING_CONTRASTIVE_OMNIGLOT_ROOT"
SMALL_ARCHIVES = ("images_background_small1", "images_background_small2")
# torchmeta's Omniglot without the Vinyals split: meta-train is images_background, meta-test images_evaluation.
TORCHMETA_ARCHIVES = {"images_background": "images_background_small1", "images_evaluation": "images_background_small2"}


@pytest.fixture(scope="session")
def torchmeta() -> ModuleType:
    """torchmeta, patched for the installed torch and torchvision; skips where either is not installed."""
    for name in ("torchvision", "torchmeta"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed: these tests run in the environment that .ci/torchmeta.sh builds.")
    patch_torchmeta()
    return pytest.importorskip("torchmeta")


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The folder of the shared Omniglot small background zips."""
    candidates = [os.environ.get(OMNIGLOT_ENV_VAR), REPOSITORY.parent / "shared/data/omniglot"]
    for candidate in filter(None, candidates):
        if all((Path(candidate) / f"{name}.zip").is_file() for name in SMALL_ARCHIVES):
            return Path(candidate)
    pytest.skip(f"The Omniglot small background zips are not here; point {OMNIGLOT_ENV_VAR} at their folder.")


@pytest.fixture(scope="session")
def torchmeta_omniglot_folder(
    torchmeta: ModuleType, omniglot_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A ``folder`` for torchmeta's ``omniglot(folder, ...)`` helper, built from the local zips with no network.

    torchmeta's ``Omniglot(download=True)`` fetches ``<folder>/omniglot/images_{background,evaluation}.zip``
    unless the file is already there, but builds its ``data.hdf5`` from the *extracted* folders
    (it skips extracting a zip it did not download). So each small subset is extracted under the name
    torchmeta expects and its zip linked beside it; ``download=True`` then only processes them. Greek and
    Latin, which both subsets hold, are kept in meta-train only.
    """
    folder = tmp_path_factory.mktemp("torchmeta-data")
    target = folder / "omniglot"
    target.mkdir()
    seen_alphabets: set[str] = set()
    for name, source in TORCHMETA_ARCHIVES.items():
        with zipfile.ZipFile(omniglot_root / f"{source}.zip") as archive:
            members = [m for m in archive.namelist() if m.endswith(".png") and m.split("/")[1] not in seen_alphabets]
            for member in members:
                path = target / name / member.split("/", 1)[1]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(archive.read(member))
        seen_alphabets |= {member.split("/")[1] for member in members}
        (target / f"{name}.zip").symlink_to(omniglot_root / f"{source}.zip")
    from torchmeta.datasets.omniglot import OmniglotClassDataset

    OmniglotClassDataset(folder, meta_split="train", use_vinyals_split=False, download=True).close()
    return folder
