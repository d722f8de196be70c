"""What the sprites look like as they learn: PNG grids in the run folder, and W&B images."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torchvision.utils import make_grid, save_image

from dti_sprites.callbacks.run_dir import run_dir

# Distinct colours for label maps: index 0 (background) is black.
PALETTE = torch.tensor(
    [
        [0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
        [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
        [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128],
    ],
    dtype=torch.float32,
) / 255  # fmt: skip


def colorize(labels: Tensor) -> Tensor:
    """Label map (B, H, W) → RGB (B, 3, H, W) with a fixed palette (0 = black)."""
    palette = PALETTE.to(labels.device)
    return palette[labels.long() % len(palette)].movedim(-1, 1)  # (B, 3, H, W)


def save_png(image: Tensor, path: Path) -> None:
    """Save a (3, H, W) image atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    save_image(image, tmp)
    os.replace(tmp, path)


def sprite_grid(model) -> Tensor:
    """Rows: appearance, mask, appearance × mask; one column per learned sprite. (3, H', W')"""
    with torch.no_grad():
        appearance, mask = model.sprites()
        k0 = model.sprites.n_sprites
        appearance, mask = appearance[:k0], mask[:k0].expand(-1, 3, -1, -1)
        tiles = torch.cat([appearance, mask, appearance * mask])  # (3·K0, 3, h, w)
        # Border in the semantic colour of sprite k (label k + 1).
        border = colorize(torch.arange(1, k0 + 1)).repeat(3, 1)[:, :, None, None]  # (3·K0, 3, 1, 1)
        tiles = torch.nn.functional.pad(tiles.cpu(), (1, 1, 1, 1))
        tiles[:, :, [0, -1], :] = border
        tiles[:, :, :, [0, -1]] = border
        return make_grid(tiles.float().cpu(), nrow=k0, padding=1, pad_value=1.0)


def decomposition_grid(model, images: Tensor) -> Tensor:
    """Columns per image; rows: input, reconstruction, semantic, instance, then each layer
    (colour × alpha). images (N, 3, H, W) → (3, H', W')."""
    with torch.no_grad():
        out = model(images)
        rows = [images, out.reconstruction, colorize(out.semantic()), colorize(out.instance())]
        rgb, alpha = out.layers[:, :, :3], out.layers[:, :, 3:]
        rows += list((rgb * alpha).unbind(1))  # L rows of (N, 3, H, W)
        tiles = torch.stack(rows).flatten(0, 1)  # (rows·N, 3, H, W)
        return make_grid(tiles.float().clamp(0, 1).cpu(), nrow=len(images), padding=1)


class SpriteDashboard(L.Callback):
    """Every ``every_n_steps`` training steps and at the end of fit, draws the sprite bank,
    the backgrounds and the decomposition of a fixed set of ``n_images`` training images.

    Files: ``<run dir>/images/{sprites,backgrounds,decompositions}.png`` (the latest) and,
    when a :class:`WandbLogger` is attached, the same images logged to W&B.
    """

    def __init__(self, every_n_steps: int = 500, n_images: int = 8) -> None:
        self.every_n_steps = every_n_steps
        self.n_images = n_images
        self.images: Tensor | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if self.images is None and hasattr(datamodule, "init_images"):
            self.images = datamodule.init_images(self.n_images)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.images is None:
            self.images = batch["image"][: self.n_images].detach().cpu()
        if trainer.global_step % self.every_n_steps == 0:
            self.draw(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.draw(trainer, pl_module)

    @torch.no_grad()
    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.images is None:
            return
        model = pl_module.model
        was_training = model.training
        model.eval()
        grids = {
            "sprites": sprite_grid(model),
            "decompositions": decomposition_grid(model, self.images.to(pl_module.device)),
            "backgrounds": make_grid(model.backgrounds().float().clamp(0, 1).cpu(), padding=1),
        }
        model.train(was_training)
        folder = run_dir(trainer) / "images"
        for name, grid in grids.items():
            save_png(grid, folder / f"{name}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    "dashboard", images=list(grids.values()), caption=list(grids),
                    step=trainer.global_step,
                )  # fmt: skip
