"""Sprite freeze: sprites get no gradient during the first epochs."""

from __future__ import annotations

from typing import Any

import lightning as L
from jsonargparse.typing import NonNegativeInt


class SpriteFreeze(L.Callback):
    """Freezes sprite appearances and masks for the first ``epochs`` epochs.

    While frozen, the model also drops the empty sprite from the candidates and switches the
    λ penalty off (docs/method.md §4). Derived from the epoch, so a resume continues exactly.
    """

    def __init__(self, epochs: NonNegativeInt = 0) -> None:
        self.epochs = int(epochs)  # builtin: saved in checkpoints
        self.frozen: bool | None = None

    def apply(self, pl_module: L.LightningModule, epoch: int) -> None:
        self.frozen = epoch < self.epochs
        pl_module.model.freeze_sprites(self.frozen)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module, trainer.current_epoch)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run knows its epoch only now (after on_fit_start), and a run resumed in
        # the middle of an epoch gets no on_train_epoch_start for it.
        self.apply(pl_module, trainer.current_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module, trainer.current_epoch)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.model.freeze_sprites(False)  # evaluation after fit uses the full model

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "frozen": self.frozen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.frozen = state_dict["frozen"]
