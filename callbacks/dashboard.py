"""What the sprites look like as they learn, and where evaluation fails: the sprite dashboard.

Everything goes to the run folder (``<run dir>/images/*.png``, ``<run dir>/tables/*.csv``) so a
user without W&B can look, and, when a :class:`~lightning.pytorch.loggers.WandbLogger` is
attached, to W&B as images, tables and bar charts (offline mode included: nothing here needs a
login or the network). Drawing happens on global rank 0 only; the one collective (gathering
the per-image evaluation records under DDP) runs on every rank, outside rank-0-only code.

Shapes: K0 learned sprites, L layers, H×W image, h×w sprite canvas, N images.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.loggers import WandbLogger
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import make_grid

from dti_sprites.callbacks.reassignment import SpriteReassignment
from dti_sprites.callbacks.run_dir import run_dir
from dti_sprites.io import atomic_write
from dti_sprites.viz import (
    background_figure,
    colorize,
    decomposition_figure,
    grid_figure,
    save_figure,
    sprite_figure,
    to_uint8_hwc,
    usage_figure,
)

WORST_ROWS = ("input", "reconstruction", "instance map", "ground truth")  # of the worst grids
# The thumbnails of a per-image row, in the order of WORST_ROWS.
PER_IMAGE_PICTURES = ("image", "reconstruction", "instance", "ground_truth")


def save_csv(rows: Sequence[Sequence[Any]], columns: Sequence[str], path: Path) -> None:
    """Write a CSV table atomically (temp file, then rename)."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


# ------------------------------------------------------------------------- eval records
@dataclass
class EvalRecords:
    """Per-image ARI-FG of one evaluation protocol: every score, and the inputs of the
    ``capacity`` lowest-scored images (ties broken by index).

    Attributes:
        capacity: how many of the worst images keep their pixels.
        index: (N,) position of each scored image in its split.
        ari_fg: (N,) its ARI-FG.
        worst_index, worst_ari_fg: (n,) the kept images, n ≤ capacity, ascending ARI-FG.
        worst_image: (n, 3, H, W) uint8 inputs; worst_mask: (n, H, W) uint8 ground truth.
    """

    capacity: int
    index: list[int] = field(default_factory=list)
    ari_fg: list[float] = field(default_factory=list)
    worst_index: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    worst_ari_fg: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    worst_image: Tensor | None = None
    worst_mask: Tensor | None = None

    def add(self, ari_fg: Tensor, index: Tensor, image: Tensor, mask: Tensor) -> None:
        """A batch: ari_fg (B,), index (B,), image (B, 3, H, W) in [0, 1], mask (B, H, W)."""
        self.index += index.cpu().tolist()
        self.ari_fg += ari_fg.double().cpu().tolist()
        image_u8 = (image.detach().float().clamp(0, 1) * 255).round().byte().cpu()
        self._keep_worst(
            ari_fg.double().cpu(), index.long().cpu(), image_u8, mask.detach().to(torch.uint8).cpu()
        )

    def merge(self, other: EvalRecords) -> None:
        """Add another rank's records; an index already present is skipped (DDP padding)."""
        seen = set(self.index)
        keep = [i for i, index in enumerate(other.index) if index not in seen]
        self.index += [other.index[i] for i in keep]
        self.ari_fg += [other.ari_fg[i] for i in keep]
        if other.worst_image is not None:
            fresh = torch.tensor([int(i) not in seen for i in other.worst_index], dtype=torch.bool)
            self._keep_worst(
                other.worst_ari_fg[fresh],
                other.worst_index[fresh],
                other.worst_image[fresh],
                other.worst_mask[fresh],
            )

    def _keep_worst(self, score: Tensor, index: Tensor, image: Tensor, mask: Tensor) -> None:
        if self.worst_image is not None:
            score = torch.cat([self.worst_ari_fg, score])
            index = torch.cat([self.worst_index, index])
            image = torch.cat([self.worst_image, image])
            mask = torch.cat([self.worst_mask, mask])
        order = np.lexsort((index.numpy(), score.numpy()))[: self.capacity]  # score, then index
        order = torch.from_numpy(order)
        self.worst_ari_fg, self.worst_index = score[order], index[order]
        self.worst_image, self.worst_mask = image[order], mask[order]


def all_gather_records(
    trainer: L.Trainer, records: dict[str, EvalRecords]
) -> dict[str, EvalRecords]:
    """Every rank's records merged (a collective: call it on every rank). One process: as is."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return records
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, records)
    merged: dict[str, EvalRecords] = {}
    for rank_records in gathered:
        for protocol, rec in rank_records.items():
            if protocol not in merged:
                merged[protocol] = EvalRecords(rec.capacity)
            merged[protocol].merge(rec)
    return merged


# ------------------------------------------------------------------------------- callback
class SpriteDashboard(L.Callback):
    """The sprite dashboard: PNGs and CSVs in the run folder, the same as W&B media.

    Every ``every_n_steps`` training steps and at the end of fit (global rank 0), pictures drawn
    by :mod:`dti_sprites.viz` with every row and column labelled:

    - ``images/sprites.png``: rows appearance, mask, appearance × mask; a column per sprite k,
      bordered in its semantic colour (the colour of its label k + 1 in the semantic maps);
    - ``images/backgrounds.png``;
    - ``images/decompositions.png``: a column per fixed training image (``n_images``), rows
      input, reconstruction, semantic map, instance map, then ``layer 0`` … ``layer L-1``;
    - ``images/usage.png`` and ``tables/usage.csv``: sprite usage per layer (share of the
      choices since the previous drawing, in rank 0's batches under DDP; the grey bar is the
      empty sprite);
    - ``tables/reassignments.csv``: every reassignment event (step, src, dst) of the
      :class:`SpriteReassignment` callbacks in ``trainer.callbacks``.

    W&B (when a :class:`WandbLogger` is attached): images ``dashboard/{sprites, backgrounds,
    decompositions, usage}``, a table ``dashboard/usage_table`` (layer, sprite, count, share) and a
    bar chart ``dashboard/usage_layer<l>`` per layer, a table ``dashboard/reassignments``
    (logged when new events happened). Every training step, the scalars ``stage/sprites_frozen``
    and ``stage/active_<group>_transforms`` (curriculum: active modules of the layer, sprite and
    background sequences), read from the model, go to every logger.

    At the end of validation and test (not the sanity check), per ``<stage>`` and protocol:

    - ``tables/<stage>_metrics.csv`` and W&B table ``<stage>/metrics_table`` (metric, value,
      protocol), from the ``<stage>/<protocol>/<metric>`` values the module logged;
    - ``tables/<stage>_ari_fg.csv`` and W&B table ``<stage>/ari_fg_table`` (protocol, index,
      ari_fg, image, reconstruction, instance, ground_truth), one row per evaluated image of
      multi-object data, ascending ARI-FG; the thumbnails are filled for the ``n_worst``
      lowest-scored images of each protocol only (the other rows keep their scalars);
    - ``images/<stage>_<protocol>_worst.png`` (and W&B image ``<stage>/<protocol>/worst``):
      columns = those worst images (labelled by index), rows = input, reconstruction, instance
      map, ground truth.

    Args:
        every_n_steps: drawing period in training steps.
        n_images: fixed training images of the decomposition grid.
        n_worst: images per protocol whose thumbnails are kept in the per-image table.
        zoom: integer upscaling (nearest neighbour, figure pixels per image pixel) of the
            sprite, background and decomposition pictures, PNG and W&B alike: a 24-pixel sprite
            is hard to read at 1×.
    """

    def __init__(
        self,
        every_n_steps: PositiveInt = 500,
        n_images: PositiveInt = 8,
        n_worst: NonNegativeInt = 64,
        zoom: PositiveInt = 1,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.n_images = n_images
        self.n_worst = n_worst
        self.zoom = int(zoom)
        self.images: Tensor | None = None
        self._usage_base: Tensor | None = None  # the module's usage at the last drawing
        self.records: dict[str, EvalRecords] = {}
        self._last_step = -1
        self._logged_events = 0

    def state_dict(self) -> dict[str, Any]:
        """Where the last drawing left off (rank 0 draws; the checkpoint is rank 0's)."""
        base = self._usage_base
        return {
            "usage_base": None if base is None else base.detach().cpu().clone(),
            "last_step": self._last_step,
            "logged_events": self._logged_events,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._usage_base = state_dict.get("usage_base")
        self._last_step = int(state_dict.get("last_step", -1))
        self._logged_events = int(state_dict.get("logged_events", 0))

    # ----------------------------------------------------------------------------- training
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if self.images is None and hasattr(datamodule, "init_images"):
            self.images = datamodule.init_images(self.n_images)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        if self.images is None:
            self.images = batch["image"][: self.n_images].detach().cpu()
        self.log_stage(pl_module)
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._last_step:
            self.draw(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.draw(trainer, pl_module)

    def log_stage(self, pl_module: L.LightningModule) -> None:
        """Curriculum and freeze stage as scalars (call on global rank 0 only)."""
        model = pl_module.model
        values = {"stage/sprites_frozen": float(bool(model.sprites_frozen))}
        for group, sequence in model.transform_groups().items():
            values[f"stage/active_{group}_transforms"] = float(int(sequence.n_active))
        pl_module.log_dict(values, on_step=True, on_epoch=False, rank_zero_only=True)

    @torch.no_grad()
    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Draw the training dashboard now (global rank 0 only; no-op on other ranks)."""
        if not trainer.is_global_zero:
            return
        self._last_step = trainer.global_step
        model = pl_module.model
        was_training = model.training
        model.eval()
        figures = {
            "sprites": sprite_figure(model, self.zoom),
            "backgrounds": background_figure(model, self.zoom),
        }
        if self.images is not None:
            images = self.images.to(pl_module.device)
            figures["decompositions"] = decomposition_figure(model, images, self.zoom)
        model.train(was_training)
        usage_rows: list[list[Any]] = []
        usage = pl_module.usage_since(self._usage_base).cpu()  # (L, K0 + 1), since last drawing
        self._usage_base = pl_module.usage.detach().clone()
        if int(usage.sum()) > 0:
            figures["usage"] = usage_figure(usage)
        folder = run_dir(trainer)
        media: dict[str, np.ndarray] = {  # the PNGs as written, (H, W, 3) uint8
            name: save_figure(figure, folder / "images" / f"{name}.png")
            for name, figure in figures.items()
        }
        if "usage" in figures:
            share = usage.double() / usage.sum(1, keepdim=True).clamp(min=1)
            k0 = usage.shape[1] - 1
            for layer in range(usage.shape[0]):
                for k in range(k0 + 1):
                    name = "empty" if k == k0 else str(k)
                    usage_rows.append([layer, name, int(usage[layer, k]), float(share[layer, k])])
            save_csv(
                usage_rows, ["layer", "sprite", "count", "share"], folder / "tables" / "usage.csv"
            )
        events = self.reassignment_events(trainer)
        if events:
            rows = [[e["step"], e["src"], e["dst"]] for e in events]
            save_csv(rows, ["step", "src", "dst"], folder / "tables" / "reassignments.csv")
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            self._logged_events = len(events)
            return
        import wandb

        payload: dict[str, Any] = {
            f"dashboard/{name}": wandb.Image(array, caption=name) for name, array in media.items()
        }
        if usage_rows:
            payload["dashboard/usage_table"] = wandb.Table(
                columns=["layer", "sprite", "count", "share"], data=usage_rows
            )
            for layer in sorted({row[0] for row in usage_rows}):
                table = wandb.Table(
                    columns=["sprite", "share"],
                    data=[[row[1], row[3]] for row in usage_rows if row[0] == layer],
                )
                payload[f"dashboard/usage_layer{layer}"] = wandb.plot.bar(
                    table, "sprite", "share", title=f"sprite usage, layer {layer}"
                )
        if len(events) > self._logged_events:
            payload["dashboard/reassignments"] = wandb.Table(
                columns=["step", "src", "dst"],
                data=[[e["step"], e["src"], e["dst"]] for e in events],
            )
        self._logged_events = len(events)
        for logger in loggers:
            logger.log_metrics(payload, step=trainer.global_step)

    @staticmethod
    def reassignment_events(trainer: L.Trainer) -> list[dict[str, int]]:
        """Events {step, src, dst} of every SpriteReassignment callback, by step."""
        events = [
            e for cb in trainer.callbacks if isinstance(cb, SpriteReassignment) for e in cb.events
        ]
        return sorted(events, key=lambda e: (e["step"], e["dst"]))

    # --------------------------------------------------------------------------- evaluation
    def _start_eval(self) -> None:
        self.records = {}

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start_eval()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start_eval()

    def _collect(self, trainer, pl_module, outputs, batch, dataloader_idx: int) -> None:
        if trainer.sanity_checking or not isinstance(outputs, dict) or "ari_fg" not in outputs:
            return
        protocol = pl_module.protocol(dataloader_idx)
        if protocol not in self.records:
            self.records[protocol] = EvalRecords(self.n_worst)
        records = self.records[protocol]
        ari_fg = outputs["ari_fg"]
        index = outputs.get("index")
        if index is None:  # no index in the batch: number the images in arrival order
            index = torch.arange(len(ari_fg)) + len(records.index)
        records.add(ari_fg, index, batch["image"], batch["mask"])

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._collect(trainer, pl_module, outputs, batch, dataloader_idx)

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._collect(trainer, pl_module, outputs, batch, dataloader_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.report_eval(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report_eval(trainer, pl_module, "test")

    def report_eval(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Metrics table, per-image ARI-FG table and worst-image grids of one evaluation.

        Gathers the per-image records from every rank first (call on every rank)."""
        records = all_gather_records(trainer, self.records)
        self.records = {}
        if not trainer.is_global_zero:
            return
        metrics = []
        for key, value in sorted(trainer.callback_metrics.items()):
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == stage and value.numel() == 1:
                metrics.append([parts[2], float(value), parts[1]])  # metric, value, protocol
        folder = run_dir(trainer)
        if metrics:
            save_csv(
                metrics, ["metric", "value", "protocol"], folder / "tables" / f"{stage}_metrics.csv"
            )
        rows, figures = self._per_image(pl_module, records)
        if rows:
            save_csv(
                [row[:3] for row in rows],
                ["protocol", "index", "ari_fg"],
                folder / "tables" / f"{stage}_ari_fg.csv",
            )
        worst = {  # the PNGs as written, (H, W, 3) uint8
            protocol: save_figure(figure, folder / "images" / f"{stage}_{protocol}_worst.png")
            for protocol, figure in figures.items()
        }
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not (metrics or rows):
            return
        import wandb

        payload: dict[str, Any] = {}
        if metrics:
            payload[f"{stage}/metrics_table"] = wandb.Table(
                columns=["metric", "value", "protocol"], data=metrics
            )
        if rows:
            columns = ["protocol", "index", "ari_fg", *PER_IMAGE_PICTURES]
            data = [
                [*row[:3], *(None if t is None else wandb.Image(t) for t in row[3:])]
                for row in rows
            ]
            payload[f"{stage}/ari_fg_table"] = wandb.Table(columns=columns, data=data)
        for protocol, picture in worst.items():
            payload[f"{stage}/{protocol}/worst"] = wandb.Image(picture)
        for logger in loggers:
            logger.log_metrics(payload, step=trainer.global_step)

    @torch.no_grad()
    def _per_image(
        self, pl_module: L.LightningModule, records: dict[str, EvalRecords]
    ) -> tuple[list[list[Any]], dict[str, Figure]]:
        """Table rows [protocol, index, ari_fg, image, reconstruction, instance, ground truth]
        (thumbnails (H, W, 3) uint8 for the worst images, else None), ascending ARI-FG, and
        per protocol the worst-image grid: a column per image (labelled by its index in the
        split), rows :data:`WORST_ROWS`."""
        model = pl_module.model
        was_training = model.training
        model.eval()
        rows: list[list[Any]] = []
        figures: dict[str, Figure] = {}
        for protocol, rec in records.items():
            thumbs: dict[int, list[np.ndarray]] = {}
            if rec.worst_image is not None and len(rec.worst_image):
                image = rec.worst_image.to(pl_module.device).float() / 255  # (n, 3, H, W)
                out = model(image)
                tiles = [
                    image,
                    out.reconstruction.clamp(0, 1),
                    colorize(out.instance()),
                    colorize(rec.worst_mask.to(pl_module.device)),
                ]
                tiles = [t.float().cpu() for t in tiles]  # 4 × (n, 3, H, W)
                for j, index in enumerate(rec.worst_index.tolist()):
                    thumbs[index] = [to_uint8_hwc(t[j]) for t in tiles]
                grid = make_grid(torch.cat(tiles), nrow=len(image), padding=1)
                columns = [str(i) for i in rec.worst_index.tolist()]
                figures[protocol] = grid_figure(grid, WORST_ROWS, columns, "image index")
            for index, score in zip(rec.index, rec.ari_fg, strict=True):
                rows.append([protocol, index, score, *thumbs.pop(index, [None] * 4)])
        model.train(was_training)
        rows.sort(key=lambda row: (row[2], row[0], row[1]))
        return rows, figures
