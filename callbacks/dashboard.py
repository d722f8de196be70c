"""What the sprites look like as they learn, and what the schedule did: the sprite dashboard.

Everything goes to the run folder (``<run dir>/images/*.png``, ``<run dir>/tables/*.csv``) so a
user without W&B can look, and, when a :class:`~lightning.pytorch.loggers.WandbLogger` is
attached, to W&B as images, tables and bar charts (offline mode included: nothing here needs a
login or the network). Drawing happens on global rank 0 only. The evaluation report is the
:class:`~dti_sprites.callbacks.EvalReport`'s.

Shapes: K0 learned sprites, L layers, H×W image, h×w sprite canvas, N images.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from dti_sprites.callbacks.base import EVENT_COLUMNS, ScheduledCallback, event_log
from dti_sprites.callbacks.reassignment import SpriteReassignment
from dti_sprites.callbacks.run_dir import run_dir, save_csv
from dti_sprites.schedule import Schedule
from dti_sprites.viz import (
    add_timeline,
    background_figure,
    decomposition_figure,
    save_figure,
    sprite_figure,
    usage_figure,
)


class SpriteDashboard(ScheduledCallback):
    """The sprite dashboard: PNGs and CSVs in the run folder, the same as W&B media.

    Every ``every_n_steps`` training steps and at the end of fit (global rank 0), pictures drawn
    by :mod:`dti_sprites.viz` with every row and column labelled:

    - ``images/sprites.png``: rows appearance, mask, appearance × mask; a column per sprite k,
      bordered in its semantic colour (the colour of its label k + 1 in the semantic maps);
      below them, once something has happened, the timeline of the run's event log (a row per
      kind of event, a tick at each event's step);
    - ``images/backgrounds.png``;
    - ``images/decompositions.png``: a column per fixed training image (``n_images``), rows
      input, reconstruction, semantic map, instance map, then ``layer 0`` … ``layer L-1``;
    - ``images/usage.png`` and ``tables/usage.csv``: sprite usage per layer (share of the
      choices since the previous drawing, in rank 0's batches under DDP; the grey bar is the
      empty sprite);
    - ``tables/events.csv``: the event log (:func:`~dti_sprites.callbacks.base.event_log`:
      step, kind, source, detail, sprites) of every scheduled callback in
      ``trainer.callbacks``: the seeding, refits and split-merge moves, layer resets,
      reassignments, curriculum stages and the end of the sprite freeze;
    - ``tables/reassignments.csv``: the reassignment events (step, src, dst) of the
      :class:`SpriteReassignment` callbacks.

    W&B (when a :class:`WandbLogger` is attached): images ``dashboard/{sprites, backgrounds,
    decompositions, usage}``, a table ``dashboard/usage_table`` (layer, sprite, count, share) and a
    bar chart ``dashboard/usage_layer<l>`` per layer, tables ``dashboard/events`` and
    ``dashboard/reassignments`` (logged when new events happened). Every training step, the
    scalars ``stage/sprites_frozen`` and ``stage/active_<group>_transforms`` (curriculum: active
    modules of the layer, sprite and background sequences), read from the model, go to every
    logger.

    Args:
        every_n_steps: drawing period in training steps.
        n_images: fixed training images of the decomposition grid.
        zoom: integer upscaling (nearest neighbour, figure pixels per image pixel) of the
            sprite, background and decomposition pictures, PNG and W&B alike: a 24-pixel sprite
            is hard to read at 1×.
    """

    def __init__(
        self,
        every_n_steps: PositiveInt = 500,
        n_images: PositiveInt = 8,
        zoom: PositiveInt = 1,
    ) -> None:
        super().__init__("step")
        self.every_n_steps = int(every_n_steps)
        self.schedule = Schedule(every=self.every_n_steps)
        self.n_images = int(n_images)
        self.zoom = int(zoom)
        self.images: Tensor | None = None
        self._usage_base: Tensor | None = None  # the module's usage at the last drawing
        self._last_step = -1
        self._logged_events = 0  # rows of the event log already in the W&B tables

    def own_state(self) -> dict[str, Any]:
        """Where the last drawing left off (rank 0 draws; the checkpoint is rank 0's)."""
        base = self._usage_base
        return {
            "usage_base": None if base is None else base.detach().cpu().clone(),
            "last_step": self._last_step,
            "logged_events": self._logged_events,
        }

    def load_own_state(self, state: dict[str, Any]) -> None:
        self._usage_base = state.get("usage_base")
        self._last_step = int(state.get("last_step", -1))
        self._logged_events = int(state.get("logged_events", 0))

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
        if self.schedule.due(step) and step != self._last_step:
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
        events = event_log(trainer)
        model = pl_module.model
        was_training = model.training
        model.eval()
        with model.unrefined():  # training's view: the network's own decomposition
            sprites = sprite_figure(model, self.zoom)
            if events:
                timeline = [(e.step, e.kind) for e in events]
                add_timeline(sprites, timeline, trainer.global_step)
            figures = {"sprites": sprites, "backgrounds": background_figure(model, self.zoom)}
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
        event_rows = [e.row() for e in events]
        if event_rows:
            save_csv(event_rows, EVENT_COLUMNS, folder / "tables" / "events.csv")
        reassignments = [[e["step"], e["src"], e["dst"]] for e in self.reassignment_events(trainer)]
        if reassignments:
            save_csv(reassignments, ["step", "src", "dst"], folder / "tables" / "reassignments.csv")
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            self._logged_events = len(event_rows)
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
        if len(event_rows) > self._logged_events:
            payload["dashboard/events"] = wandb.Table(columns=list(EVENT_COLUMNS), data=event_rows)
            if reassignments:
                payload["dashboard/reassignments"] = wandb.Table(
                    columns=["step", "src", "dst"], data=reassignments
                )
        self._logged_events = len(event_rows)
        for logger in loggers:
            logger.log_metrics(payload, step=trainer.global_step)

    @staticmethod
    def reassignment_events(trainer: L.Trainer) -> list[dict[str, int]]:
        """Events {step, src, dst} of every SpriteReassignment callback, by step."""
        events = [
            e for cb in trainer.callbacks if isinstance(cb, SpriteReassignment) for e in cb.events
        ]
        return sorted(events, key=lambda e: (e["step"], e["dst"]))
