"""Putting back layers that have gone out of use (docs/method.md §11)."""

from __future__ import annotations

from typing import Any

import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

from dti_sprites.callbacks.base import Event, ScheduledCallback
from dti_sprites.optim import reset_optimizer_state
from dti_sprites.ranks import gather_ranks, pick_rank
from dti_sprites.schedule import Schedule


class LayerReset(ScheduledCallback):
    """Every ``every_n_steps`` steps, puts a layer that has gone out of use back in the image.

    While the network learns to place the layers, a layer can shrink its sprite to a dot or move
    it off the image. It then gets next to no gradient and stays there, and every image is
    explained with one layer fewer: a Tetrominoes scene with three pieces and two live layers
    scores ARI-FG about 60 however good the sprites become. A layer is out of use when its
    alpha mass (its mask summed over the image, as placed, over the training batches since the
    last check and all DDP ranks) is below ``min_share`` × the mean layer's; its
    layer-transformation heads are then reset (``DTISprites.reset_layer``: the initial,
    centred placement). Adam's first moments of the reset slices are zeroed (the old direction
    was the one that shrank the layer); their second moments are kept: with fresh ones, Adam's
    first steps move every weight of the head by about the lr, and a reset layer shrank out of
    use again within 100 steps. No check after step ``until`` (None: never stops). Off in the
    paper configs. Each reset is an event of the run's event log (``layer reset``).
    """

    event_kind = "layer reset"
    counts_steps = True

    def __init__(
        self,
        every_n_steps: PositiveInt = 100,
        min_share: PositiveFloat = 0.2,
        until: NonNegativeInt | None = None,
    ) -> None:
        super().__init__("step")
        self.every_n_steps = int(every_n_steps)
        self.min_share = float(min_share)
        self.until = None if until is None else int(until)
        self.schedule = Schedule(every=self.every_n_steps, until=self.until)
        self.mass: torch.Tensor | None = None  # (L,) alpha mass since the last check, this rank
        # self.steps: training steps since the last check; self.events: {"step", "layer"}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        mass = outputs["layer_mass"].sum(0).double()  # (L,)
        self.mass = mass if self.mass is None else self.mass + mass
        if not self.tick(self.every_n_steps):
            return
        total = trainer.strategy.reduce(self.mass, reduce_op="sum").cpu()  # (L,) all ranks
        self.mass = None
        step = trainer.global_step
        if not self.schedule.covers(step):
            return
        dead = [int(layer) for layer in torch.nonzero(total < self.min_share * total.mean())]
        for layer in dead:
            slices = pl_module.model.reset_layer(layer)
            reset_optimizer_state(trainer.optimizers[0], slices, keys=["exp_avg"])
            self.record({"step": step, "layer": layer})
        pl_module.log("train/layers_reset", float(len(dead)), reduce_fx="sum")

    def describe(self, event: dict[str, Any]) -> list[Event]:
        detail = f"layer {event['layer']} back at the initial placement"
        return [Event(int(event["step"]), self.event_kind, type(self).__name__, detail)]

    def own_state(self) -> dict[str, Any]:
        mass = None if self.mass is None else self.mass.detach().cpu().clone()
        return {"mass": gather_ranks(mass)}  # each process's own (see dti_sprites.ranks)

    def load_own_state(self, state: dict[str, Any]) -> None:
        self.mass = pick_rank(state["mass"], "LayerReset.mass")
