"""Where evaluation fails: the evaluation report (metrics tables, per-image ARI-FG, the worst
images), written at the end of every validation and test.

Everything goes to the run folder (``<run dir>/images/*.png``, ``<run dir>/tables/*.csv``) so a
user without W&B can look, and, when a :class:`~lightning.pytorch.loggers.WandbLogger` is
attached, to W&B as tables and images (offline mode included). Drawing happens on global rank
0 only; the one collective (gathering the per-image evaluation records under DDP) runs on every
rank, outside rank-0-only code. The training pictures are the
:class:`~dti_sprites.callbacks.SpriteDashboard`'s.

Shapes: H×W image, N images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt
from lightning.pytorch.loggers import WandbLogger
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import make_grid

from dti_sprites.callbacks.run_dir import run_dir, save_csv
from dti_sprites.viz import colorize, grid_figure, save_figure, to_uint8_hwc

WORST_ROWS = ("input", "reconstruction", "instance map", "ground truth")  # of the worst grids
# The thumbnails of a per-image row, in the order of WORST_ROWS.
PER_IMAGE_PICTURES = ("image", "reconstruction", "instance", "ground_truth")


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
class EvalReport(L.Callback):
    """The evaluation report, at the end of validation and test (not the sanity check), per
    ``<stage>`` and protocol:

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
        n_worst: images per protocol whose thumbnails are kept in the per-image table.
    """

    def __init__(self, n_worst: NonNegativeInt = 64) -> None:
        self.n_worst = int(n_worst)
        self.records: dict[str, EvalRecords] = {}

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
