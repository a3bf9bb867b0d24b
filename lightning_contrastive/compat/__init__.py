"""Compatibility: both Lightning packages side by side (:mod:`~lightning_contrastive.compat.flavours`), and opt-in
run-time fixes that let older meta-learning libraries run beside current torch and torchvision."""

from lightning_contrastive.compat.torchmeta import TORCHMETA_PATCHES, patch_torchmeta

__all__ = ["TORCHMETA_PATCHES", "patch_torchmeta"]
