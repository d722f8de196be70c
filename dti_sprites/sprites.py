"""Learned prototypes: sprite appearances and masks, the empty sprite, backgrounds; softclip.

Shape vocabulary (used across the package): B batch, L layers, K sprites (incl. the empty one),
K0 learned sprites, M backgrounds, C = 3 colour channels, H×W image, h×w sprite canvas,
F encoder features, P parameters of a transformation.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

BackgroundInit = Literal["mean", "constant", "sample", "noise"]


def softclip(x: Tensor) -> Tensor:
    """Identity inside [0, 1], slope 0.01 outside (keeps a gradient where clamp would not)."""
    return x.clamp(0, 1) + 0.01 * x.clamp(max=0) + 0.01 * (x - 1).clamp(min=0)


def gaussian_window(size: tuple[int, int], std: float) -> Tensor:
    """Centred 2-D Gaussian exp(-½(n/std)²) with peak 1, n = index − (size−1)/2. (h, w)"""
    h, w = size
    ny = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
    nx = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    window = torch.exp(-0.5 * (ny[:, None] / std) ** 2) * torch.exp(-0.5 * (nx[None] / std) ** 2)
    return window.float()  # (h, w)


class SpriteBank(nn.Module):
    """K0 learned sprites (RGB appearance + alpha mask) and the optional empty sprite.

    ``forward()`` returns the softclipped appearances (K, C, h, w) and masks (K, 1, h, w), with
    the empty sprite (zero appearance, zero mask, not a parameter) appended as index K − 1.
    """

    def __init__(
        self,
        n_sprites: int,
        size: tuple[int, int],
        mask_std: float,
        empty_sprite: bool,
        init_value: float = 0.9,
        channels: int = 3,
    ) -> None:
        super().__init__()
        self.n_sprites = n_sprites
        self.empty_sprite = empty_sprite
        self.appearance = nn.Parameter(torch.full((n_sprites, channels, *size), init_value))
        window = gaussian_window(size, mask_std)
        self.mask = nn.Parameter(window.expand(n_sprites, 1, *size).clone())  # (K0, 1, h, w)

    @property
    def n_candidates(self) -> int:
        """K: learned sprites plus the empty one when enabled."""
        return self.n_sprites + int(self.empty_sprite)

    def forward(self, raw_masks: bool = False) -> tuple[Tensor, Tensor]:
        """Appearances and masks; ``raw_masks`` leaves the masks unclipped (for mask noise,
        which clips after adding the noise, so that masks pushed beyond [0, 1] resist it)."""
        appearance = softclip(self.appearance)
        mask = self.mask if raw_masks else softclip(self.mask)
        if self.empty_sprite:
            appearance = torch.cat([appearance, appearance.new_zeros(1, *appearance.shape[1:])])
            mask = torch.cat([mask, mask.new_zeros(1, *mask.shape[1:])])
        return appearance, mask  # (K, C, h, w), (K, 1, h, w)


class Backgrounds(nn.Module):
    """M learned backgrounds (M, C, H, W); M = 0 means a fixed black background.

    ``init`` ``"constant"`` and ``"noise"`` are applied here; ``"mean"`` and ``"sample"`` need
    data and are applied by :meth:`init_from_images`, which the training module calls once with
    the first training images before fitting.
    """

    def __init__(
        self,
        n_backgrounds: int,
        size: tuple[int, int],
        init: BackgroundInit = "constant",
        init_value: float = 0.5,
        channels: int = 3,
    ) -> None:
        super().__init__()
        self.n_backgrounds = n_backgrounds
        self.init = init
        self.channels, self.size = channels, size
        shape = (n_backgrounds, channels, *size)
        data = torch.rand(shape) if init == "noise" else torch.full(shape, init_value)
        self.image = nn.Parameter(data) if n_backgrounds > 0 else None
        self.register_buffer("black", torch.zeros(1, channels, *size), persistent=False)
        # True once the data-dependent init ran (saved in checkpoints so a resume skips it).
        self.register_buffer("initialised", torch.tensor(init in ("constant", "noise")))

    @property
    def n_candidates(self) -> int:
        """Backgrounds to choose from: M, or the single black one when M = 0."""
        return max(self.n_backgrounds, 1)

    @torch.no_grad()
    def init_from_images(self, images: Tensor) -> None:
        """Data-dependent init from training images (N, C, H, W) in [0, 1]."""
        if self.image is None or bool(self.initialised):
            return
        if images.shape[1:] != self.image.shape[1:]:
            raise ValueError(
                f"background init: images of shape {tuple(images.shape[1:])} do not match the "
                f"background shape {tuple(self.image.shape[1:])} (model.image_size)"
            )
        images = images.to(self.image)
        if self.init == "mean":
            self.image.copy_(images.mean(0, keepdim=True).expand_as(self.image))
        elif self.init == "sample":
            self.image.copy_(images[torch.arange(self.n_backgrounds) % len(images)])
        self.initialised.fill_(True)

    def forward(self) -> Tensor:
        if self.image is None:
            return self.black  # (1, C, H, W)
        return softclip(self.image)  # (M, C, H, W)
