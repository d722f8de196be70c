"""Curriculum: switch transformation modules on one by one at given epochs or steps."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from jsonargparse.typing import NonNegativeInt

from dti_sprites.callbacks.base import Event, ScheduledCallback
from dti_sprites.schedule import Schedule


class Curriculum(ScheduledCallback):
    """Activates the modules of each transformation sequence at epoch (or step) milestones.

    For a sequence of n modules with m milestones, the first n − m modules are on from the
    start and milestone i switches on module n − m + i. E.g. colour→projective→tps with
    ``[100, 350]`` starts with colour, adds projective at epoch 100 and tps at 350; a lone
    ``similarity`` with ``[20]`` is off until epoch 20. Nothing is frozen when a module switches
    on. The stage is a function of the epoch (or step), so a resumed run continues exactly.
    Each switch is an event of the run's event log (``curriculum``).

    Args:
        layer: milestones of the layer transformation sequence.
        sprite: milestones of the sprite transformation sequence.
        background: milestones of the background transformation sequence.
        interval: ``epoch`` (the paper's unit) or ``step``: milestones count optimizer steps,
            a module switching on before the step that reaches its milestone (the fast recipes,
            whose schedules are shorter than an epoch of the paper's data).
    """

    event_kind = "curriculum"

    def __init__(
        self,
        layer: list[NonNegativeInt] | None = None,
        sprite: list[NonNegativeInt] | None = None,
        background: list[NonNegativeInt] | None = None,
        interval: Literal["epoch", "step"] = "epoch",
    ) -> None:
        super().__init__(interval)
        self.schedules = {
            "layer": Schedule.milestones(layer),
            "sprite": Schedule.milestones(sprite),
            "background": Schedule.milestones(background),
        }
        # builtin ints: they are saved in checkpoints
        self.milestones = {group: list(s.at) for group, s in self.schedules.items()}
        self.n_active: dict[str, int] = {}

    def stage(self, n_modules: int, milestones: list[int], time: int) -> int:
        """Active modules at ``time`` (an epoch or a step count, as ``interval`` says)."""
        return n_modules - len(milestones) + Schedule.milestones(milestones).passed(time)

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

    def _advance(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Apply the stage of now; a milestone reached now is an event (once: this runs at
        the start of an epoch, or of a step, which a resumed run does not repeat)."""
        time = self.now(trainer)
        self.apply(pl_module, time)
        for group, sequence in pl_module.model.transform_groups().items():
            if self.schedules[group].due(time):
                names = sequence.names[: self.n_active[group]]
                self.record({"step": trainer.global_step, "group": group, "active": list(names)})

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module, self.now(trainer))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run knows its epoch only now (after on_fit_start), and a run resumed in
        # the middle of an epoch gets no on_train_epoch_start for it.
        self.apply(pl_module, self.now(trainer))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.interval == "epoch":
            self._advance(trainer, pl_module)
        else:
            self.apply(pl_module, self.now(trainer))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.interval == "step":
            self._advance(trainer, pl_module)

    def describe(self, event: dict[str, Any]) -> list[Event]:
        active = ", ".join(event["active"]) or "none"
        detail = f"{event['group']} transformations on: {active}"
        return [Event(int(event["step"]), self.event_kind, type(self).__name__, detail)]

    def own_state(self) -> dict[str, Any]:
        return {"milestones": self.milestones, "n_active": dict(self.n_active)}

    def load_own_state(self, state: dict[str, Any]) -> None:
        self.n_active = dict(state["n_active"])
