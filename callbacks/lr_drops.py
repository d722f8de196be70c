"""Learning-rate drops with one gamma per optimizer group."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from jsonargparse.typing import NonNegativeFloat, PositiveInt


class LRDrops(L.Callback):
    """Multiplies each group's learning rate by its own gamma at every epoch milestone.

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
    ) -> None:
        self.milestones = sorted(int(m) for m in milestones or [])
        self.gammas = [float(g) for g in gammas]
        self.drops = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.drops = sum(m <= trainer.current_epoch for m in self.milestones)
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
