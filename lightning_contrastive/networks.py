"""The standard few-shot backbones: the sinusoid MLP and the Conv4 image classifier.

Plain ``nn.Module``\\ s with nothing meta-learning-specific in them: a learner such as
:class:`~lightning_contrastive.ComplexSynapse` wraps either one (or any other module).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Literal

from torch import Tensor, nn


class MLP(nn.Module):
    """A fully connected network, ``in_features -> hidden[0] -> ... -> out_features``.

    The default is the 1-40-40-1 ReLU regressor of the sinusoid benchmark (Finn et al., 2017).

    Args:
        in_features: input dimension.
        hidden: width of each hidden layer, in order (empty for a linear model).
        out_features: output dimension.
        smooth: ``False``: ReLU units (the reference setup); ``True``: tanh units, so the loss has a continuous
            gradient in the weights (as :class:`Conv4`'s ``smooth``) and the inner problem can be solved, which the
            contrastive and implicit estimates assume: on 8 sinusoid 5-shot tasks (a complex synapse with pull 1,
            momentum SGD at lr 0.02) a tanh network's inner gradient norm fell below 1e-3 in 121-298 steps, where a
            ReLU one ended 300 steps at 0.2-50% of its starting value.
    """

    def __init__(
        self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1, smooth: bool = False
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden, out_features]
        if any(isinstance(width, bool) or not isinstance(width, int) or width < 1 for width in widths):
            raise ValueError(
                f"Layer widths must be integers >= 1; got in {in_features}, hidden {hidden}, out {out_features}."
            )
        layers: list[nn.Module] = []
        for fan_in, fan_out in pairwise(widths[:-1]):
            layers += [nn.Linear(fan_in, fan_out), nn.Tanh() if smooth else nn.ReLU()]
        layers.append(nn.Linear(widths[-2], widths[-1]))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_features) -> (..., out_features)``."""
        return self.layers(x)


class Conv4(nn.Module):
    """The four-block convolutional backbone of few-shot classification (Vinyals et al., 2016; Finn et al., 2017).

    Each block is conv 3x3 (padding 1) -> normalisation -> ReLU -> 2x2 max-pool (or their smooth counterparts),
    so a square image of side ``s`` leaves the fourth block at side ``s // 16`` (28 -> 1 on Omniglot, 84 -> 5 on
    miniImageNet); a linear head maps the flattened features to ``ways`` logits. The convolutions have no bias: the
    normalisation after each one subtracts a per-channel mean, which cancels a bias exactly, so it would be a
    meta-parameter that never gets a gradient (the normalisation's own shift plays its part).

    Args:
        in_channels: image channels (1 for Omniglot, 3 for miniImageNet).
        ways: number of classes per task, the width of the head.
        channels: feature maps per block (64 on Omniglot, 32 on miniImageNet in the reference setups).
        image_size: side of the square input images, in pixels (at least 16).
        norm: ``"batch"`` (the reference setups): ``BatchNorm2d``, per-channel statistics of the batch at hand,
            so a support image's features depend on the other images of its batch; ``"instance"``:
            ``GroupNorm(channels, channels)``, the same per-channel normalisation and affine map with each
            image's own statistics (over its pixels), so nothing depends on what else is in the batch.
        smooth: ``False`` (the reference setups): ReLU and max-pooling; ``True``: GELU and average pooling, so the
            loss has a continuous gradient in the weights. The contrastive rule reads the meta-gradient off a finite
            difference of two nudged inner runs; with ReLU or max-pooling the inner gradient jumps wherever a unit
            crosses its kink, and each jump between the two runs adds a term of order ``jump / beta``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        ways: int = 5,
        channels: int = 64,
        image_size: int = 28,
        norm: Literal["batch", "instance"] = "batch",
        smooth: bool = False,
    ) -> None:
        super().__init__()
        if image_size < 16:
            raise ValueError(
                f"Conv4 halves the image four times, so image_size must be >= 16; got {image_size}. "
                "Resize the images or use a shallower backbone."
            )
        if norm not in ("batch", "instance"):
            raise ValueError(f'Conv4 norm must be "batch" or "instance"; got {norm!r}.')
        blocks: list[nn.Module] = []
        for block_in in (in_channels, channels, channels, channels):
            blocks += [
                nn.Conv2d(block_in, channels, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(channels) if norm == "batch" else nn.GroupNorm(channels, channels),
                nn.GELU() if smooth else nn.ReLU(),
                nn.AvgPool2d(2) if smooth else nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(channels * (image_size // 16) ** 2, ways)

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, in_channels, image_size, image_size) -> (batch, ways)`` logits."""
        return self.head(self.features(x))
