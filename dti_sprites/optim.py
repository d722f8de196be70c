"""The optimizer and its surgery, kept in one place: Adam with repeated group updates,
copying the state of parameter slices, and the learning-rate drops (a torch LR scheduler)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveInt

from dti_sprites.model import ParamSlice
from dti_sprites.schedule import Schedule, check_interval


@torch.no_grad()
def copy_optimizer_state(
    optimizer: torch.optim.Optimizer, pairs: Iterable[tuple[ParamSlice, ParamSlice]]
) -> None:
    """For each (source, destination) slice pair, copy every per-element state tensor
    (e.g. Adam's ``exp_avg`` and ``exp_avg_sq``) of the source slice into the destination.

    The destination gets its own copy (never a shared buffer); scalar state such as Adam's
    ``step`` is per parameter and stays as it is.
    """
    for (param, i_src), (dst_param, i_dst) in pairs:
        if dst_param is not param:
            raise ValueError("slices of a pair must belong to the same parameter")
        state = optimizer.state.get(param, {})
        for value in state.values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value[i_dst] = value[i_src].clone()


@torch.no_grad()
def reset_optimizer_state(
    optimizer: torch.optim.Optimizer,
    slices: Iterable[ParamSlice],
    keys: Iterable[str] | None = None,
) -> None:
    """Zero the named per-element state tensors (e.g. Adam's ``exp_avg``) of each slice, or
    all of them when ``keys`` is None; scalar state such as ``step`` stays."""
    keys = None if keys is None else set(keys)
    for param, index in slices:
        for key, value in optimizer.state.get(param, {}).items():
            per_element = torch.is_tensor(value) and value.shape == param.shape
            if per_element and (keys is None or key in keys):
                value[index] = 0


class Adam(torch.optim.Adam):
    """torch's Adam, where a parameter group may take several updates per step.

    A group with ``"updates": n`` gets n successive Adam updates from the same gradient at every
    ``step()`` (its moments, step count and weight decay advance n times); other groups get one.
    This reproduces exactly what the authors' code does to its shared encoder: their optimizer
    lists the encoder once per module that holds it (7 times for Multi-dSprites, 8 for CLEVR6),
    and torch's Adam then updates a listed parameter once per listing, one after the other. The
    paper's numbers come from those dynamics (see ``docs/method.md``).
    """

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = super().step(closure)
        groups = self.param_groups
        try:
            for extra in range(1, max(int(g.get("updates", 1)) for g in groups)):
                self.param_groups = [g for g in groups if int(g.get("updates", 1)) > extra]
                super().step()
        finally:
            self.param_groups = groups
        return loss


@dataclass(frozen=True)
class LRDrops:
    """Learning-rate drops: each parameter group's lr times its own gamma at every milestone.

    Milestones count epochs (``interval="epoch"``, the paper's schedules) or training steps
    (``interval="step"``, for runs shorter than a few epochs); ``gammas`` holds one factor per
    parameter group or a single one for all (how a module maps them to its groups: see
    ``DTISpritesModule``). No milestone: no drop. :class:`MilestoneDrops` applies them.
    """

    milestones: tuple[PositiveInt, ...] = ()
    gammas: tuple[NonNegativeFloat, ...] = (0.1,)
    interval: Literal["epoch", "step"] = "epoch"

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(sorted(int(m) for m in self.milestones)))
        object.__setattr__(self, "gammas", tuple(float(g) for g in self.gammas))
        check_interval("LRDrops", self.interval)

    def to_dict(self) -> dict[str, Any]:
        """Builtins (for the checkpoint's hyper-parameters)."""
        return {
            "milestones": list(self.milestones),
            "gammas": list(self.gammas),
            "interval": self.interval,
        }


class MilestoneDrops(torch.optim.lr_scheduler.LRScheduler):
    """lr of group g = its initial lr × gammas[g] ** (milestones passed), where the time is the
    scheduler's ``last_epoch``: the number of times ``step()`` was called (Lightning calls it
    once per optimizer step or once per epoch, as the interval says). The milestones and gammas
    come from the configuration, not from a checkpoint, as the module is built with them.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestones: Iterable[int],
        gammas: Iterable[float],
        last_epoch: int = -1,
    ) -> None:
        self.schedule = Schedule.milestones(milestones)
        self.gammas = [float(g) for g in gammas]
        if len(self.gammas) != len(optimizer.param_groups):
            raise ValueError(
                f"MilestoneDrops: {len(self.gammas)} gammas for "
                f"{len(optimizer.param_groups)} parameter groups"
            )
        super().__init__(optimizer, last_epoch)

    @property
    def drops(self) -> int:
        """Milestones passed at the scheduler's time."""
        return self.schedule.passed(self.last_epoch)

    def get_lr(self) -> list[float]:
        drops = self.drops
        return [base * gamma**drops for base, gamma in zip(self.base_lrs, self.gammas, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for key in ("schedule", "gammas"):  # the configuration's (see the class docstring)
            state.pop(key, None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = {k: v for k, v in state_dict.items() if k not in ("schedule", "gammas")}
        super().load_state_dict(state)
