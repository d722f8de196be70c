"""Sprite seeding: masks from the data once the layers are placed, then closed-form refits."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_warn

from dti_sprites.callbacks.base import Event, ScheduledCallback
from dti_sprites.callbacks.freeze import SpriteFreeze
from dti_sprites.optim import reset_optimizer_state
from dti_sprites.ranks import rank_and_world
from dti_sprites.schedule import Schedule
from dti_sprites.seeding import (
    centre_crops,
    invariant_kmeans,
    invariant_refit,
    kmeans_masks,
    layer_crops,
    match_masks,
    normalise_crops,
    refit_masks,
    split_merge,
)


class SpriteSeeding(ScheduledCallback):
    """Seeds the sprite masks by k-means over inverse-warped layer supports, then refits them.

    Until step ``at_step`` the sprites should be frozen, so that the network learns to place
    the layers on the objects: list ``SpriteFreeze(steps=at_step)`` after this callback (the
    freeze has one owner; this one warns without it). The layer supports of the training
    batches of the last ``collect_steps`` steps before it are taken into the sprite canvas
    (:func:`dti_sprites.seeding.layer_crops`); at ``at_step`` k-means over them sets the K0
    masks. Then, every ``refit_every`` steps up to ``refit_until``, each sprite chosen by at
    least ``min_count`` layers of the last ``collect_steps`` batches gets the mean of their
    crops as its mask (a Lloyd step through the warp). At the refit steps listed in
    ``reseed_at`` k-means runs again instead, from the better-placed layers of that time: it
    splits the mixtures and merges the duplicates that refits keep. With
    ``split_merge_moves``, split-merge moves follow every k-means and refit
    (:func:`dti_sprites.seeding.split_merge`): they split a mixture and free a duplicate or a
    near-unused sprite for its second half. The masks' optimizer state is reset each time.
    Rank 0 computes, every rank receives its masks. Each seeding, refit and split-merge move
    is an event of the run's event log. A departure from the paper's training, for fast
    convergence: see ``docs/method.md``. (The masks held for a while after the seeding:
    ``SpriteFreeze(hold_masks)``.)

    Args:
        at_step: training step of the seeding.
        collect_steps: training batches before each seeding or refit whose layers are used.
        refit_every: steps between refits after the seeding (0: no refit).
        refit_until: last step of a refit (default: no limit).
        min_pixels: smallest layer support that is used, in image pixels.
        min_count: fewest layers that must have chosen a sprite for its refit.
        reseed_at: refit steps at which k-means runs again instead of the refit.
        background_tolerance: also count a layer's pixels whose squared RGB distance to the
            background exceeds this (see :func:`dti_sprites.seeding.layer_crops`); None: only
            the pixels that the layer explains better than the background.
        centre: shift every crop so that its centre of mass is at the canvas centre (whole
            pixels) before clustering or averaging; the network then learns to place the
            centred sprites.
        split_merge_moves: most split-merge moves after each k-means or refit (0: none).
        seed: k-means++ seed.
        normalise_scale: before each k-means, scale every crop to one size (the median radius
            of gyration; :func:`dti_sprites.seeding.normalise_crops`), so that the clusters
            are shapes rather than sizes.
        rotations: with n > 0, the k-means and the refits are invariant to rotation: a crop's
            distance to a mask is the smallest over n rotations of the mask (a full turn) and
            a mask is the mean of its crops rotated into its frame
            (:func:`dti_sprites.seeding.invariant_kmeans`, ``invariant_refit``); 0: plain.
        refit_scales: with ``rotations``, the refits also try these scales of each mask.
        isolated_only: use only the crops of objects that touch no other object and lie
            whole inside the canvas (:func:`dti_sprites.seeding.layer_crops`): in crowded
            scenes most layers show an occluded or merged shape.
        refit_assign: which crops a refit averages into each mask. ``"choice"``: those of the
            layers that chose the sprite (a Lloyd step through the model's own selection);
            ``"nearest"`` (needs ``rotations``): those nearest to the mask over the rotations
            × ``refit_scales``, whatever sprite their layer chose (a step of the invariant
            k-means from the current masks); ``"kmeans"``: the crops are clustered again as at
            the seeding (``normalise_scale``, ``rotations``, split-merge moves) and each new mask
            replaces the current one it matches, turned into its frame
            (:func:`dti_sprites.seeding.match_masks`), so every sprite keeps its identity.
            While the network has not learned each object's rotation its choices are unrelated
            to the shapes (Multi-dSprites, 200 steps after the seeding: purity 0.36 for 3
            shapes) and ``"choice"`` refits average the shapes into blobs; one ``"nearest"``
            step from blobs stays a blob; ``"kmeans"`` finds the shapes again.
    """

    def __init__(
        self,
        at_step: PositiveInt = 500,
        collect_steps: PositiveInt = 50,
        refit_every: NonNegativeInt = 0,
        refit_until: NonNegativeInt | None = None,
        min_pixels: NonNegativeInt = 4,
        min_count: PositiveInt = 10,
        centre: bool = True,
        seed: int = 0,
        reseed_at: list[PositiveInt] | None = None,
        background_tolerance: NonNegativeFloat | None = None,
        split_merge_moves: NonNegativeInt = 0,
        normalise_scale: bool = False,
        rotations: NonNegativeInt = 0,
        refit_scales: list[PositiveFloat] | None = None,
        isolated_only: bool = False,
        refit_assign: Literal["choice", "nearest", "kmeans"] = "choice",
    ) -> None:
        super().__init__("step")
        if refit_assign not in ("choice", "nearest", "kmeans"):
            raise ValueError(
                "SpriteSeeding.refit_assign must be 'choice', 'nearest' or 'kmeans', got "
                f"{refit_assign!r}"
            )
        if refit_assign == "nearest" and not rotations:
            raise ValueError(
                "SpriteSeeding.refit_assign='nearest' needs rotations > 0 (the invariant "
                "distance that assigns the crops)"
            )
        self.refit_assign = refit_assign
        if refit_every and collect_steps > refit_every:
            raise ValueError(
                f"SpriteSeeding.collect_steps ({collect_steps}) must not exceed refit_every "
                f"({refit_every})"
            )
        self.at_step, self.collect_steps = int(at_step), int(collect_steps)
        self.refit_every = int(refit_every)
        self.refit_until = None if refit_until is None else int(refit_until)
        # The seeding, then the refits: at_step, at_step + refit_every, … up to refit_until.
        self.schedule = Schedule(
            at=(self.at_step,), every=self.refit_every, start=self.at_step, until=self.refit_until
        )
        self.reseed_at = sorted(int(s) for s in reseed_at or [])
        for step in self.reseed_at:
            if step <= self.at_step or not self.schedule.due(step):
                raise ValueError(
                    f"SpriteSeeding.reseed_at: step {step} is not a refit step (at_step "
                    f"{at_step} + a multiple of refit_every {refit_every}, up to refit_until)"
                )
        self.min_pixels, self.min_count, self.seed = int(min_pixels), int(min_count), int(seed)
        self.centre = bool(centre)
        self.split_merge_moves = int(split_merge_moves)
        self.normalise_scale, self.rotations = bool(normalise_scale), int(rotations)
        self.refit_scales = tuple(float(f) for f in refit_scales or [1.0])
        self.isolated_only = bool(isolated_only)
        self.background_tolerance = (
            None if background_tolerance is None else float(background_tolerance)
        )
        self.crops: list[torch.Tensor] = []
        self.choices: list[torch.Tensor] = []

    def next_event(self, step: int) -> int | None:
        """The first seeding or refit step at or after ``step``, None when there is none."""
        return self.schedule.next(step)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not any(isinstance(c, SpriteFreeze) for c in trainer.callbacks):
            rank_zero_warn(
                f"SpriteSeeding: no SpriteFreeze; the sprites learn before the seeding at step "
                f"{self.at_step} (list SpriteFreeze(steps={self.at_step}) after SpriteSeeding)"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # steps done, this one included
        event = self.next_event(step)
        if event is None or step <= event - self.collect_steps:
            return
        if trainer.is_global_zero:
            crops, choices = layer_crops(
                pl_module.model,
                batch["image"],
                self.min_pixels,
                self.background_tolerance,
                self.isolated_only,
            )
            self.crops.append(crops.cpu())
            self.choices.append(choices.cpu())
        if step == event:
            self._apply(trainer, pl_module, step)

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        model = pl_module.model
        masks = model.sprites.mask  # (K0, 1, h, w)
        k0 = len(masks)
        new = masks.detach().flatten(1).clone()  # (K0, h·w)
        kind = "seed" if step == self.at_step else "reseed" if step in self.reseed_at else "refit"
        event: dict[str, Any] = {"step": step, "kind": kind}
        if trainer.is_global_zero:
            crops, choices = torch.cat(self.crops), torch.cat(self.choices)
            size = tuple(masks.shape[-2:])
            if self.centre:
                crops = centre_crops(crops, size)
            event["crops"] = len(crops)
            needed = k0 if self._regroups(kind) else 1  # k-means needs a crop per centre
            if len(crops) < needed:
                rank_zero_warn(
                    f"SpriteSeeding: {len(crops)} crops at step {step} ({kind}), fewer than "
                    f"{needed}: the masks are kept (isolated_only / min_pixels may leave none)"
                )
                event["skipped"] = True
            else:
                new = self._fit(kind, crops, choices, new, size, event)
        self.crops, self.choices = [], []
        new = trainer.strategy.broadcast(new.to(pl_module.device), src=0)
        with torch.no_grad():
            masks.copy_(new.view_as(masks))
        for optimizer in trainer.optimizers:
            reset_optimizer_state(optimizer, [(masks, (slice(None),))])  # the old masks' moments
        self.record(event)

    def _regroups(self, kind: str) -> bool:
        """Whether this event clusters the crops (k-means) rather than refitting by a rule."""
        return kind != "refit" or self.refit_assign == "kmeans"

    def _fit(
        self,
        kind: str,
        crops: torch.Tensor,
        choices: torch.Tensor,
        new: torch.Tensor,
        size: tuple[int, int],
        event: dict[str, Any],
    ) -> torch.Tensor:
        """The masks (K0, h·w) of a seeding / re-seeding (k-means) or a refit (the mean crop
        of the layers that chose each sprite), then the split-merge moves; ``new`` holds the
        current masks; what was done goes into ``event``."""
        k0, current = len(new), new.clone()  # the masks (their dtype and device)
        seed = self.seed + len(self.events)
        regroup = self._regroups(kind)
        assignment = None if regroup else choices
        if regroup and self.normalise_scale:
            crops, event["radius"] = normalise_crops(crops, size)
        if regroup and self.rotations:
            new, assignment, crops = invariant_kmeans(crops, k0, size, self.rotations, seed=seed)
            new = new.to(current)
        elif regroup:
            new = kmeans_masks(crops, k0, seed).to(new)
        else:
            if self.rotations:
                nearest = self.refit_assign == "nearest"
                means, counts, crops, label = invariant_refit(
                    crops,
                    None if nearest else choices,
                    new.to(crops),
                    size,
                    self.rotations,
                    self.refit_scales,
                )
                if nearest:  # the split-merge moves start from the same clusters
                    assignment = label
            else:
                means, counts = refit_masks(crops, choices, k0)
            refit = counts >= self.min_count
            new[refit] = means[refit].to(new)
            event["refit"] = int(refit.sum())
        if self.split_merge_moves:
            centres, moves = split_merge(crops, new, assignment, self.split_merge_moves, seed)
            new = centres.to(new).clamp(0, 1)
            event["moves"] = moves
        if kind == "refit" and self.refit_assign == "kmeans":  # each sprite keeps its identity
            turns = max(self.rotations, 1)
            new = match_masks(new, current, size, turns, self.refit_scales).to(current)
            event["refit"] = k0
        return new

    def describe(self, event: dict[str, Any]) -> list[Event]:
        """A row for the seeding (``seed``), re-seeding (``reseed``) or refit (``refit``),
        and one per split-merge move (``split-merge``)."""
        step, source, kind = int(event["step"]), type(self).__name__, event["kind"]
        if kind == "refit":
            detail = f"{event.get('refit', 0)} masks refitted"
        else:
            detail = "masks by k-means"
        if "crops" in event:
            detail += f" from {event['crops']} layer crops"
        rows = [Event(step, kind, source, detail)]
        for split, freed in event.get("moves", []):
            detail = f"sprite {split} split, sprite {freed} freed for its second half"
            rows.append(Event(step, "split-merge", source, detail, (int(split), int(freed))))
        return rows

    def own_state(self) -> dict[str, Any]:
        return {"crops": self.crops, "choices": self.choices}

    def load_own_state(self, state: dict[str, Any]) -> None:
        # Rank 0 collects and computes (the checkpoint is rank 0's); the others hold nothing.
        rank0 = rank_and_world()[0] == 0
        self.crops = list(state["crops"]) if rank0 else []
        self.choices = list(state["choices"]) if rank0 else []
