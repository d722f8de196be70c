"""Image encoders: CIFAR-style ResNet-(6n+2) (ResNet-32 and shallower) and torchvision's ResNet-18,
with adaptive pooling."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

EncoderName = Literal["resnet8", "resnet14", "resnet20", "resnet32", "resnet18"]
# CIFAR-style ResNet-(6n+2): n basic blocks per stage.
CIFAR_BLOCKS = {"resnet8": 1, "resnet14": 2, "resnet20": 3, "resnet32": 5}


class ShortcutA(nn.Module):
    """The parameter-free "option A" shortcut of the CIFAR ResNets (He et al. 2016, §4.2).

    Subsamples by 2 and zero-pads the channels: (B, C, H, W) -> (B, 2C, ⌈H/2⌉, ⌈W/2⌉).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pad = (out_channels - in_channels) // 2

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))  # (B, 2C, H/2, W/2)


class BasicBlock(nn.Module):
    """3×3 conv → BN → ReLU → 3×3 conv → BN, plus the shortcut, then ReLU.

    Where the stage changes (stride 2, channels doubled) the shortcut is :class:`ShortcutA`.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            if stride != 2 or out_channels != 2 * in_channels:
                raise ValueError("option-A shortcuts halve the size and double the channels")
            self.shortcut = ShortcutA(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images (He et al. 2016, §4.2): 3 stages of 16/32/64 channels.

    The original architecture, as in the paper's "mini ResNet-32": parameter-free option-A
    shortcuts at the stage changes and Kaiming-normal (fan-in) initialisation of every
    convolution. ``blocks_per_stage`` = 5 gives ResNet-32 (463,504 parameters without the
    classifier). (B, 3, H, W) -> feature map (B, 64, ⌈H/4⌉, ⌈W/4⌉).
    """

    def __init__(self, blocks_per_stage: int = 5, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        stages, channels = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                stages.append(BasicBlock(channels, width, stride if i == 0 else 1))
                channels = width
        self.stages = nn.Sequential(*stages)
        self.out_channels = channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)  # fan-in, as the original

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))


class Encoder(nn.Module):
    """Backbone + adaptive average pooling to ``pool``×``pool`` + flatten.

    (B, 3, H, W) -> (B, F) with F = channels · pool² (ResNet-32: 64·pool², ResNet-18: 512·pool²);
    with ``with_map=True`` also the backbone's feature map (B, channels, h, w) before the pooling.
    No pretrained weights are ever loaded.
    """

    def __init__(self, name: EncoderName = "resnet32", pool: int = 1) -> None:
        super().__init__()
        if name in CIFAR_BLOCKS:
            self.backbone: nn.Module = CifarResNet(blocks_per_stage=CIFAR_BLOCKS[name])
            channels = 64
        elif name == "resnet18":
            resnet = torchvision.models.resnet18(weights=None)
            self.backbone = nn.Sequential(*list(resnet.children())[:-2])  # drop avgpool and fc
            channels = 512
        else:
            expected = ", ".join(repr(n) for n in get_args(EncoderName))
            raise ValueError(f"unknown encoder {name!r}; expected one of {expected}")
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.channels = channels
        self.out_features = channels * pool * pool
        # NHWC convolutions: about 25% faster on CPU (oneDNN) and the layout GPUs prefer.
        self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor, with_map: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        x = x.contiguous(memory_format=torch.channels_last)
        fmap = self.backbone(x)  # (B, channels, h, w)
        features = self.pool(fmap).flatten(1)  # (B, F)
        return (features, fmap) if with_map else features
