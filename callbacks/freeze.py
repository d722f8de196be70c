"""Sprite freeze: sprites get no gradient during the first epochs or steps (the one owner of
the sprites' frozen state), and the masks may be held a while longer."""

from __future__ import annotations

from typing import Any

import lightning as L
from jsonargparse.typing import NonNegativeInt

from dti_sprites.callbacks.base import Event, ScheduledCallback
from dti_sprites.schedule import Schedule


class SpriteFreeze(ScheduledCallback):
    """Freezes sprite appearances and masks for the first ``epochs`` epochs or ``steps`` steps.

    While frozen, the model also drops the empty sprite from the candidates (unless
    ``DTISprites(empty_while_frozen=True)``) and switches the λ penalty off (docs/method.md §4).
    The frozen state is a function of the epoch (or step), so a resume continues exactly. This
    callback is the only one that freezes or releases the sprites: with
    :class:`~dti_sprites.callbacks.SpriteSeeding` give it ``steps`` = the seeding's ``at_step``
    and list it after the seeding (the step of the seeding collects its last crops with the
    sprites still frozen, and what follows it sees them released). The release is an event of
    the run's event log (``unfreeze``).

    With ``steps``, the sprites are frozen for the steps that start with fewer than ``steps``
    steps done: the release happens at the end of step ``steps`` (after the callbacks listed
    before this one acted on that step), before the next step.

    Args:
        epochs: frozen while the epoch is below this (0: not frozen).
        steps: frozen for this many steps instead (None: count ``epochs``).
        hold_masks: after the release, the masks get no gradient update for this many more
            epochs (or steps, with ``steps``); they can still be set (a seeding's refits): the
            sprite transformations learn to rotate and scale fixed, sharp shapes before
            gradient descent may round them off (0: none).
    """

    event_kind = "unfreeze"

    def __init__(
        self,
        epochs: NonNegativeInt = 0,
        steps: NonNegativeInt | None = None,
        hold_masks: NonNegativeInt = 0,
    ) -> None:
        if steps is not None and epochs:
            raise ValueError("SpriteFreeze: give epochs or steps, not both")
        super().__init__("epoch" if steps is None else "step")
        self.until = int(epochs if steps is None else steps)  # builtin: saved in checkpoints
        self.hold_masks = int(hold_masks)
        self.frozen_times = Schedule.window(0, self.until)  # the frozen epochs or steps
        self.held_times = Schedule.window(self.until, self.hold_masks)  # masks held
        self.frozen: bool | None = None

    def apply(self, pl_module: L.LightningModule, epoch: int) -> None:
        """Freeze or release the sprites for the time ``epoch`` (a step with ``steps``)."""
        self.frozen = self.frozen_times.covers(epoch)
        pl_module.model.freeze_sprites(self.frozen)

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Apply now; the release is an event (once: this runs at the start of an epoch, or
        the end of a step, which a resumed run does not repeat)."""
        self.apply(pl_module, self.now(trainer))
        if self.until and self.now(trainer) == self.until:
            self.record({"step": trainer.global_step})

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module, self.now(trainer))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run knows its epoch only now (after on_fit_start), and a run resumed in
        # the middle of an epoch gets no on_train_epoch_start for it.
        self.apply(pl_module, self.now(trainer))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.interval == "epoch":
            self._update(trainer, pl_module)
        else:
            self.apply(pl_module, self.now(trainer))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.interval == "step":
            self.apply(pl_module, self.now(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.interval == "step":  # the steps done, this one included
            self._update(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # global_step counts the steps done: this update is step global_step + 1.
        if self.held_times.covers(self.now(trainer)):
            pl_module.model.sprites.mask.grad = None  # no update, no momentum, no decay

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.model.freeze_sprites(False)  # evaluation after fit uses the full model

    def describe(self, event: dict[str, Any]) -> list[Event]:
        detail = "sprites released"
        if self.hold_masks:
            unit = "epochs" if self.interval == "epoch" else "steps"
            detail += f"; masks held {self.hold_masks} more {unit}"
        return [Event(int(event["step"]), self.event_kind, type(self).__name__, detail)]

    def own_state(self) -> dict[str, Any]:
        return {"until": self.until, "interval": self.interval, "frozen": self.frozen}

    def upgrade_state(self, state: dict[str, Any]) -> dict[str, Any]:
        if "epochs" in state:  # before issue 21: {"epochs", "frozen"}
            state = {"until": state.pop("epochs"), "interval": "epoch", **state}
        return state

    def load_own_state(self, state: dict[str, Any]) -> None:
        self.frozen = state["frozen"]
