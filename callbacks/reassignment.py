"""Reassignment of unused sprites (docs/method.md §5)."""

from __future__ import annotations

import zlib
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import NonNegativeFloat, PositiveInt

from dti_sprites.callbacks.base import Event, ScheduledCallback
from dti_sprites.optim import copy_optimizer_state
from dti_sprites.ranks import gather_ranks, pick_rank


class SpriteReassignment(ScheduledCallback):
    """Every ``every_n_steps`` steps, replaces rarely used sprites by a copy of the most used.

    Usage is the share of layer choices per sprite since the last check (read from the module's
    ``usage`` counter), pooled over all layers and summed over all DDP ranks, so every rank
    takes the same decision. A sprite is unused when its usage is below ``threshold / K0`` —
    relative to the most used sprite when the model has an empty sprite, absolute otherwise.
    The copy takes the appearance (plus N(0, ``noise_std``²) noise drawn from a generator seeded
    by ``seed`` and the step, identical on every rank), the mask, every transformation head of
    the sprite, and the optimizer state (cloned). Nothing happens while sprites are frozen.
    Each copy is an event of the run's event log (``reassignment``).
    """

    event_kind = "reassignment"
    counts_steps = True

    def __init__(
        self,
        every_n_steps: PositiveInt = 100,
        threshold: NonNegativeFloat = 0.2,
        noise_std: NonNegativeFloat = 1e-4,
        seed: int = 0,
    ) -> None:
        super().__init__("step")
        self.every_n_steps = int(every_n_steps)
        self.threshold = float(threshold)
        self.noise_std = float(noise_std)
        self.seed = int(seed)
        self.base: torch.Tensor | None = None  # the module's usage at the last check
        # self.steps: training steps since the last check; self.events: {"step", "src", "dst"}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        model = pl_module.model
        if not self.tick(self.every_n_steps):
            return
        mine = pl_module.usage_since(self.base)[:, :-1].sum(0)  # (K0,) this rank, all layers
        self.base = pl_module.usage.detach().clone()
        counts = trainer.strategy.reduce(mine.float(), reduce_op="sum").cpu()
        if bool(model.sprites_frozen) or counts.sum() == 0:
            return
        events = self.reassign(pl_module, trainer.optimizers[0], counts, trainer.global_step)
        for event in events:
            self.record(event)
        pl_module.log("train/reassigned", float(len(events)), reduce_fx="sum")

    def unused(self, counts: torch.Tensor, empty_sprite: bool) -> list[int]:
        """Sprites whose usage is under the threshold. counts (K0,)"""
        usage = counts / (counts.max() if empty_sprite else counts.sum())
        return [k for k in range(len(counts)) if usage[k] < self.threshold / len(counts)]

    def reassign(
        self,
        pl_module: L.LightningModule,
        optimizer: torch.optim.Optimizer,
        counts: torch.Tensor,
        step: int,
    ) -> list[dict[str, int]]:
        model = pl_module.model
        src = int(counts.argmax())
        events = []
        for dst in self.unused(counts, model.sprites.empty_sprite):
            generator = torch.Generator().manual_seed(
                zlib.crc32(f"{self.seed}/{step}/{dst}".encode())
            )
            shape = model.sprites.appearance.shape[1:]
            noise = torch.randn(shape, generator=generator, dtype=torch.float64) * self.noise_std
            pairs = model.copy_sprite(src, dst, noise)
            copy_optimizer_state(optimizer, pairs)
            events.append({"step": step, "src": src, "dst": dst})
        return events

    def describe(self, event: dict[str, Any]) -> list[Event]:
        detail = f"sprite {event['dst']} replaced by a copy of sprite {event['src']}"
        sprites = (int(event["dst"]),)
        return [Event(int(event["step"]), self.event_kind, type(self).__name__, detail, sprites)]

    def own_state(self) -> dict[str, Any]:
        base = None if self.base is None else self.base.detach().cpu().clone()
        return {"base": gather_ranks(base)}  # each process's own (see dti_sprites.ranks)

    def load_own_state(self, state: dict[str, Any]) -> None:
        self.base = pick_rank(state["base"], "SpriteReassignment.base")
