"""The standard backbones: shapes, layer structure and argument checks."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_contrastive import ComplexSynapse, Contrastive, MetaLearningModule
from lightning_contrastive.networks import MLP, Conv4


def test_mlp_default_is_the_sinusoid_1_40_40_1_regressor() -> None:
    network = MLP()
    linears = [m for m in network.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1, 40), (40, 40), (40, 1)]
    assert sum(isinstance(m, nn.ReLU) for m in network.modules()) == 2
    assert sum(p.numel() for p in network.parameters()) == 1 * 40 + 40 + 40 * 40 + 40 + 40 * 1 + 1
    assert network(torch.randn(7, 1)).shape == (7, 1)


def test_mlp_without_hidden_layers_is_linear() -> None:
    network = MLP(in_features=3, hidden=(), out_features=2)
    x = torch.randn(5, 3)
    (linear,) = [m for m in network.modules() if isinstance(m, nn.Linear)]
    torch.testing.assert_close(network(x), x @ linear.weight.T + linear.bias)


@pytest.mark.parametrize(("image_size", "in_channels", "channels", "ways"), [(28, 1, 64, 5), (84, 3, 32, 20)])
def test_conv4_maps_images_to_logits(image_size: int, in_channels: int, channels: int, ways: int) -> None:
    network = Conv4(in_channels=in_channels, ways=ways, channels=channels, image_size=image_size)
    assert network(torch.randn(2, in_channels, image_size, image_size)).shape == (2, ways)
    convs = [m for m in network.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(m.kernel_size == (3, 3) and m.out_channels == channels for m in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in network.modules()) == 4
    assert sum(isinstance(m, nn.MaxPool2d) for m in network.modules()) == 4
    assert network.head.in_features == channels * (image_size // 16) ** 2


def test_conv4_instance_norm_makes_each_image_independent_of_its_batch() -> None:
    torch.manual_seed(0)
    images = torch.randn(6, 1, 28, 28)
    for norm, independent in (("instance", True), ("batch", False)):
        network = Conv4(channels=8, norm=norm)
        alone = network(images[:1])
        together = network(images)[:1]
        assert torch.allclose(alone, together, atol=1e-5) == independent, norm
    groups = [m for m in Conv4(channels=8, norm="instance").modules() if isinstance(m, nn.GroupNorm)]
    assert len(groups) == 4 and all(m.num_groups == m.num_channels == 8 and m.affine for m in groups)


def gradient_changes(network: nn.Module, direction: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``|grad(t_{i+1}) - grad(t_i)|`` of a 5-way loss in the first convolution's weight ``w0 + t direction``."""
    torch.manual_seed(0)
    images, labels = torch.randn(5, 1, 16, 16, dtype=torch.float64), torch.arange(5)
    weight = network.features[0].weight
    start, gradients = weight.detach().clone(), []
    for t in points:
        with torch.no_grad():
            weight.copy_(start + t * direction)
        loss = nn.functional.cross_entropy(network(images), labels)
        gradients.append(torch.autograd.grad(loss, weight)[0].flatten())
    with torch.no_grad():
        weight.copy_(start)
    return torch.stack(gradients).diff(dim=0).norm(dim=1)


def test_smooth_conv4_has_a_continuous_gradient_where_relu_jumps() -> None:
    """Along a line in weight space, take the segment where the gradient changes most and split it 100 ways: a
    continuous gradient spreads the change (about 1/100 per piece), a jump puts most of it in one piece."""
    largest_piece = {}
    for smooth in (False, True):
        torch.manual_seed(0)
        network = Conv4(ways=5, channels=4, image_size=16, smooth=smooth).double()
        kinds = {type(m) for m in network.modules()}
        assert ({nn.GELU, nn.AvgPool2d} <= kinds) == smooth and ({nn.ReLU, nn.MaxPool2d} <= kinds) != smooth
        direction = torch.randn_like(network.features[0].weight)
        line = torch.linspace(0, 1, 101, dtype=torch.float64)
        coarse = gradient_changes(network, direction, line)
        i = int(coarse.argmax())
        fine = gradient_changes(network, direction, torch.linspace(line[i], line[i + 1], 101, dtype=torch.float64))
        largest_piece[smooth] = float(fine.max() / coarse[i])
    assert largest_piece[True] < 0.05 and largest_piece[False] > 0.3, largest_piece


def test_conv4_refuses_an_unknown_norm_naming_the_choices() -> None:
    with pytest.raises(ValueError, match='"batch" or "instance"'):
        Conv4(norm="layer")  # type: ignore[arg-type]


def test_bad_sizes_raise_value_error() -> None:
    with pytest.raises(ValueError, match="image_size must be >= 16"):
        Conv4(image_size=12)
    with pytest.raises(ValueError, match="integers >= 1"):
        MLP(hidden=(40, 0))


def test_conv4_has_no_convolution_bias_for_batch_norm_to_cancel() -> None:
    network = Conv4(channels=8)
    assert all(m.bias is None for m in network.modules() if isinstance(m, nn.Conv2d))
    conv_weights = 1 * 8 * 9 + 3 * 8 * 8 * 9
    assert sum(p.numel() for p in network.parameters()) == conv_weights + 4 * 2 * 8 + 8 * 5 + 5


def test_a_checkpoint_with_the_old_convolution_biases_is_refused_naming_them(tmp_path) -> None:
    old = Conv4(channels=4)
    convolutions = [name for name, m in old.named_modules() if isinstance(m, nn.Conv2d)]
    for name in convolutions:  # the layout before the biases were removed
        old.get_submodule(name).bias = nn.Parameter(torch.zeros(4))
    saved = MetaLearningModule(ComplexSynapse(old), Contrastive())
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": saved.state_dict(), "pytorch-lightning_version": pl.__version__}, path)
    with pytest.raises(ValueError, match="does not fit") as error:
        MetaLearningModule.load_from_checkpoint(
            path, learner=ComplexSynapse(Conv4(channels=4)), estimator=Contrastive()
        )
    for name in convolutions:
        for kind in ("omega", "lambda"):
            assert f"learner.{kind}.{name}.bias: in the checkpoint, not in this module" in str(error.value)


def test_smooth_mlp_has_tanh_units_where_the_default_has_relu() -> None:
    for smooth, unit, other in ((False, nn.ReLU, nn.Tanh), (True, nn.Tanh, nn.ReLU)):
        kinds = [type(m) for m in MLP(hidden=(8, 8), smooth=smooth).modules()]
        assert kinds.count(unit) == 2 and other not in kinds
    x = torch.linspace(-3, 3, 7).unsqueeze(1)
    torch.manual_seed(0)
    smooth = MLP(hidden=(4,), smooth=True)
    first = smooth.layers[0]
    expected = smooth.layers[2](torch.tanh(first(x)))
    torch.testing.assert_close(smooth(x), expected)
