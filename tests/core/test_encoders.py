"""Encoders: CIFAR ResNet-(6n+2) depths, feature sizes with pooling, clear errors."""

import pytest
import torch
from torch import nn

from dti_sprites.encoders import CIFAR_BLOCKS, Encoder, ShortcutA


@pytest.mark.parametrize("name", sorted(CIFAR_BLOCKS))
def test_cifar_resnet_has_the_depth_its_name_says(name: str) -> None:
    # ResNet-d (He et al. 2016, §4.2): d − 1 = 6n + 1 weighted 3×3 layers plus the (absent)
    # classifier.
    convs = [m for m in Encoder(name).backbone.modules() if isinstance(m, nn.Conv2d)]
    depth = sum(1 for c in convs if c.kernel_size == (3, 3)) + 1
    assert depth == int(name.removeprefix("resnet"))


@pytest.mark.parametrize(
    ("name", "pool", "features"),
    [("resnet8", 1, 64), ("resnet20", 2, 256), ("resnet32", 4, 1024), ("resnet18", 2, 2048)],
)
def test_encoder_feature_size(name: str, pool: int, features: int) -> None:
    encoder = Encoder(name, pool)
    out = encoder(torch.rand(2, 3, 35, 35))
    assert encoder.out_features == features
    assert out.shape == (2, features)
    assert torch.isfinite(out).all()


def test_unknown_encoder_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'resnet50'.*'resnet8'.*'resnet18'"):
        Encoder("resnet50")  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "params"), [("resnet20", 269_072), ("resnet32", 463_504)])
def test_cifar_resnet_has_the_original_parameter_count(name: str, params: int) -> None:
    # He et al.'s CIFAR ResNet-20 / -32 (option-A shortcuts) have 0.27M / 0.46M parameters:
    # 269,722 / 464,154 with the 64 -> 10 classifier (650), which the encoder does not have.
    assert sum(p.numel() for p in Encoder(name).parameters()) == params


def test_option_a_shortcut_subsamples_and_zero_pads_the_channels() -> None:
    x = torch.arange(2 * 16 * 5 * 5, dtype=torch.float).view(2, 16, 5, 5)
    y = ShortcutA(16, 32)(x)
    assert y.shape == (2, 32, 3, 3)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


def test_cifar_convolutions_use_fan_in_kaiming_init() -> None:
    torch.manual_seed(0)
    conv = Encoder("resnet32").backbone.stages[-1].conv2  # 64 -> 64, 3×3: fan-in 576
    std = conv.weight.std().item()
    assert std == pytest.approx((2 / 576) ** 0.5, rel=0.05)
