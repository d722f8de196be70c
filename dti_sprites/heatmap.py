"""Layer positions read off the encoder's feature map (soft-argmax), a fast-recipe switch.

The paper predicts every layer's translation with an MLP from the pooled encoder features
(``pool``×``pool`` cells of image/pool pixels each), so the network must learn to encode where
an object sits inside its cell. Here each layer has a heat map over the unpooled feature map
instead, and its canvas centre is the map's expected location (a spatial soft-argmax, as in
keypoint discovery): a layer moves onto an object by raising the heat where the object is,
a local change at the map's resolution (4 px for 64×64 images through ResNet-32). The same
heat pools the features where the layer is (its *glimpse*), which the layer's heads may read
besides the pooled image features. Not in the paper (docs/method.md §11).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dti_sprites.transforms import pixel_grid


class HeatmapPosition(nn.Module):
    """Per-layer canvas centres by soft-argmax over a feature map, and the features there.

    (B, C, h, w) feature map -> (B, L, 2) centres (x, y) in the image's normalised coordinates
    (``align_corners=False``: a cell's centre is where its pixels' centre is) and (B, L, C)
    glimpses, the heat-weighted mean of the features. The heat of layer
    l at a cell is a 1×1 convolution of the cell's features and its coordinates (so a layer may
    also prefer a region), times ``gain``; the convolution starts at zero, so every layer starts
    at the image centre, where the paper's zero-initialised heads put it.
    """

    def __init__(self, n_layers: int, channels: int, gain: float = 10.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels + 2, n_layers, kernel_size=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.gain = float(gain)

    def heat(self, fmap: Tensor) -> Tensor:
        """The maps' probabilities (B, L, h, w), each summing to 1. In float32 under autocast:
        a place is a precise quantity (bf16's 8 bits would move a layer by tenths of a pixel)."""
        b, _, h, w = fmap.shape
        with torch.autocast(fmap.device.type, enabled=False):
            fmap = fmap.float()
            grid = pixel_grid((h, w), fmap).permute(2, 0, 1).expand(b, 2, h, w)  # (B, 2, h, w)
            logits = self.gain * self.conv(torch.cat([fmap, grid], 1))  # (B, L, h, w)
            return logits.flatten(2).softmax(-1).view_as(logits)

    def forward(self, fmap: Tensor) -> tuple[Tensor, Tensor]:
        h, w = fmap.shape[-2:]
        with torch.autocast(fmap.device.type, enabled=False):  # float32, as the heat
            fmap = fmap.float()
            p = self.heat(fmap).flatten(2)  # (B, L, h·w)
            centres = p @ pixel_grid((h, w), p).reshape(h * w, 2)  # (B, L, 2)
            glimpses = p @ fmap.flatten(2).transpose(1, 2)  # (B, L, h·w) @ (B, h·w, C) -> (B, L, C)
        return centres, glimpses

    def output_slices(self, layer: int) -> list[tuple[nn.Parameter, tuple[int | slice, ...]]]:
        """(parameter, index) of layer ``layer``'s map: zeroed, the layer is back at the centre."""
        return [(self.conv.weight, (layer,)), (self.conv.bias, (layer,))]
