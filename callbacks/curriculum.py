"""Curriculum: switch transformation modules on one by one at given epochs or steps."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from jsonargparse.typing import NonNegativeInt


class Curriculum(L.Callback):
    """Activates the modules of each transformation sequence at epoch (or step) milestones.

    For a sequence of n modules with m milestones, the first n − m modules are on from the
    start and milestone i switches on module n − m + i. E.g. colour→projective→tps with
    ``[100, 350]`` starts with colour, adds projective at epoch 100 and tps at 350; a lone
    ``similarity`` with ``[20]`` is off until epoch 20. Nothing is frozen when a module switches
    on. The stage is a function of the epoch (or step), so a resumed run continues exactly.

    Args:
        layer: milestones of the layer transformation sequence.
        sprite: milestones of the sprite transformation sequence.
        background: milestones of the background transformation sequence.
        interval: ``epoch`` (the paper's unit) or ``step``: milestones count optimizer steps,
            a module switching on before the step that reaches its milestone (the fast recipes,
            whose schedules are shorter than an epoch of the paper's data).
    """

    def __init__(
        self,
        layer: list[NonNegativeInt] | None = None,
        sprite: list[NonNegativeInt] | None = None,
        background: list[NonNegativeInt] | None = None,
        interval: Literal["epoch", "step"] = "epoch",
    ) -> None:
        if interval not in ("epoch", "step"):
            raise ValueError(f"Curriculum.interval must be 'epoch' or 'step', got {interval!r}")
        self.interval = interval
        self.milestones = {  # builtin ints: they are saved in checkpoints
            "layer": sorted(int(m) for m in layer or []),
            "sprite": sorted(int(m) for m in sprite or []),
            "background": sorted(int(m) for m in background or []),
        }
        self.n_active: dict[str, int] = {}

    def stage(self, n_modules: int, milestones: list[int], time: int) -> int:
        """Active modules at ``time`` (an epoch or a step count, as ``interval`` says)."""
        return n_modules - len(milestones) + sum(m <= time for m in milestones)

    def now(self, trainer: L.Trainer) -> int:
        """The current epoch, or the optimizer steps done, as ``interval`` says."""
        return trainer.current_epoch if self.interval == "epoch" else trainer.global_step

    def apply(self, pl_module: L.LightningModule, time: int) -> None:
        for group, sequence in pl_module.model.transform_groups().items():
            milestones = self.milestones[group]
            if len(milestones) > len(sequence):
                raise ValueError(
                    f"Curriculum.{group}: {len(milestones)} milestones for a sequence of "
                    f"{len(sequence)} modules {sequence.names}"
                )
            self.n_active[group] = self.stage(len(sequence), milestones, time)
            sequence.set_active(self.n_active[group])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module, self.now(trainer))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run knows its epoch only now (after on_fit_start), and a run resumed in
        # the middle of an epoch gets no on_train_epoch_start for it.
        self.apply(pl_module, self.now(trainer))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module, self.now(trainer))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.interval == "step":
            self.apply(pl_module, self.now(trainer))

    def state_dict(self) -> dict[str, Any]:
        return {"milestones": self.milestones, "n_active": dict(self.n_active)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_active = dict(state_dict["n_active"])
