"""Learning-rate drops with one gamma per optimizer group."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
from jsonargparse.typing import NonNegativeFloat, PositiveInt


class LRDrops(L.Callback):
    """Multiplies each group's learning rate by its own gamma at every milestone.

    Milestones count epochs (``interval="epoch"``, the paper's schedules) or training steps
    (``interval="step"``, for runs shorter than a few epochs).

    ``gammas`` lists one factor per optimizer group in order (prototypes, networks), e.g.
    ``[1, 0.1]`` keeps the sprite lr and divides the network lr by 10; a single value applies to
    every group. The encoder is a network: where it has a group of its own it takes the
    networks' gamma, unless a third value is given for it. The lr is recomputed from the
    group's ``initial_lr`` and the number of milestones passed, so a resumed run continues
    exactly.
    """

    def __init__(
        self,
        milestones: list[PositiveInt] | None = None,
        gammas: Sequence[NonNegativeFloat] = (0.1,),
        interval: Literal["epoch", "step"] = "epoch",
    ) -> None:
        self.milestones = sorted(int(m) for m in milestones or [])
        self.gammas = [float(g) for g in gammas]
        self.interval = interval
        self.drops = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.interval == "epoch":
            self._set(trainer, trainer.current_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.interval == "step":
            self._set(trainer, trainer.global_step)  # steps done before this one

    def _set(self, trainer: L.Trainer, now: int) -> None:
        self.drops = sum(m <= now for m in self.milestones)
        for optimizer in trainer.optimizers:
            groups = optimizer.param_groups
            gammas = self.gammas * len(groups) if len(self.gammas) == 1 else self.gammas
            names = [g.get("name") for g in groups]
            if len(gammas) == 2 and names == ["prototypes", "networks", "encoder"]:
                gammas = [*gammas, gammas[1]]
            if len(gammas) != len(groups):
                raise ValueError(
                    f"LRDrops.gammas has {len(self.gammas)} values for {len(groups)} optimizer "
                    f"groups ({names})"
                )
            for group, gamma in zip(groups, gammas, strict=True):
                group["lr"] = group["initial_lr"] * gamma**self.drops

    def state_dict(self) -> dict[str, Any]:
        return {"drops": self.drops}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.drops = state_dict["drops"]
