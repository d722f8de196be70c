"""Encoders: CIFAR ResNet-(6n+2) depths, feature sizes with pooling, clear errors."""

import pytest
import torch
from torch import nn

from dti_sprites.encoders import CIFAR_BLOCKS, Encoder


@pytest.mark.parametrize("name", sorted(CIFAR_BLOCKS))
def test_cifar_resnet_has_the_depth_its_name_says(name: str) -> None:
    # ResNet-d (He et al. 2016, §4.2): d − 1 = 6n + 1 weighted 3×3 layers plus the (absent)
    # classifier; the 1×1 shortcut projections do not count.
    convs = [m for m in Encoder(name).backbone.modules() if isinstance(m, nn.Conv2d)]
    depth = sum(1 for c in convs if c.kernel_size == (3, 3)) + 1
    assert depth == int(name.removeprefix("resnet"))


@pytest.mark.parametrize(("name", "pool", "features"),
                         [("resnet8", 1, 64), ("resnet20", 2, 256), ("resnet32", 4, 1024),
                          ("resnet18", 2, 2048)])  # fmt: skip
def test_encoder_feature_size(name: str, pool: int, features: int) -> None:
    encoder = Encoder(name, pool)
    out = encoder(torch.rand(2, 3, 35, 35))
    assert encoder.out_features == features
    assert out.shape == (2, features)
    assert torch.isfinite(out).all()


def test_unknown_encoder_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'resnet50'.*'resnet8'.*'resnet18'"):
        Encoder("resnet50")  # type: ignore[arg-type]
