"""Putting back layers that have gone out of use (docs/method.md §11)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

from dti_sprites.optim import reset_optimizer_state
from dti_sprites.ranks import gather_ranks, pick_rank


class LayerReset(L.Callback):
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
    paper configs.
    """

    def __init__(
        self,
        every_n_steps: PositiveInt = 100,
        min_share: PositiveFloat = 0.2,
        until: NonNegativeInt | None = None,
    ) -> None:
        self.every_n_steps = int(every_n_steps)
        self.min_share = float(min_share)
        self.until = None if until is None else int(until)
        self.mass: torch.Tensor | None = None  # (L,) alpha mass since the last check, this rank
        self.steps = 0  # training steps since the last check
        self.events: list[dict[str, int]] = []  # {"step", "layer"}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        mass = outputs["layer_mass"].sum(0).double()  # (L,)
        self.mass = mass if self.mass is None else self.mass + mass
        self.steps += 1
        if self.steps < self.every_n_steps:
            return
        total = trainer.strategy.reduce(self.mass, reduce_op="sum").cpu()  # (L,) all ranks
        self.mass, self.steps = None, 0
        step = trainer.global_step
        if self.until is not None and step > self.until:
            return
        dead = [int(layer) for layer in torch.nonzero(total < self.min_share * total.mean())]
        for layer in dead:
            slices = pl_module.model.reset_layer(layer)
            reset_optimizer_state(trainer.optimizers[0], slices, keys=["exp_avg"])
            self.events.append({"step": step, "layer": layer})
        pl_module.log("train/layers_reset", float(len(dead)), reduce_fx="sum")

    def state_dict(self) -> dict[str, Any]:
        mass = None if self.mass is None else self.mass.detach().cpu().clone()
        return {
            "mass": gather_ranks(mass),  # each process's own (see dti_sprites.ranks)
            "steps": self.steps,
            "events": list(self.events),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.mass = pick_rank(state_dict["mass"], "LayerReset.mass")
        self.steps = state_dict["steps"]
        self.events = list(state_dict["events"])
