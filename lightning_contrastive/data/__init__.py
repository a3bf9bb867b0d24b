"""Episodic data modules that yield torchmeta-format batches ``{"train": (x, y), "test": (x, y)}``."""

from lightning_contrastive.data.episodic import (
    ClassificationTasks,
    EpisodeSampler,
    EpisodicDataModule,
    collate_episodes,
)
from lightning_contrastive.data.miniimagenet import MiniImagenetDataModule, read_miniimagenet
from lightning_contrastive.data.omniglot import OmniglotDataModule, download_omniglot, read_omniglot
from lightning_contrastive.data.sinusoid import SinusoidDataModule, SinusoidTasks
from lightning_contrastive.data.torchmeta import TorchmetaDataModule

__all__ = [
    "ClassificationTasks",
    "EpisodeSampler",
    "EpisodicDataModule",
    "MiniImagenetDataModule",
    "OmniglotDataModule",
    "SinusoidDataModule",
    "SinusoidTasks",
    "TorchmetaDataModule",
    "collate_episodes",
    "download_omniglot",
    "read_miniimagenet",
    "read_omniglot",
]
