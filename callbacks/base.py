"""The base of the scheduled callbacks, and the one event log they write to.

A :class:`ScheduledCallback` has what every scheduled callback re-implemented before: the unit
of its schedule (``interval``: training steps or epochs) and the current time in that unit
(:meth:`~ScheduledCallback.now`), a counter of the training steps since it last acted
(:meth:`~ScheduledCallback.tick`, for the periodic ones), its event list
(:meth:`~ScheduledCallback.record`) and the ``state_dict`` that keeps both in checkpoints
(with :meth:`~ScheduledCallback.upgrade_state` for the state of older checkpoints). The times
themselves are a :class:`~dti_sprites.schedule.Schedule`.

Every event a callback records (a dict with at least ``step``, the global step at which it
happened) is also one or more :class:`Event` rows of the run's event log,
:func:`event_log`: the seeding, refits and split-merge moves, layer resets, reassignments,
curriculum stages and the end of the sprite freeze, in step order. The dashboard shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L

from dti_sprites.schedule import Interval, check_interval


@dataclass(frozen=True)
class Event:
    """One row of the event log.

    Attributes:
        step: global step at which it happened (the steps done, that step included).
        kind: what happened, e.g. ``seed``, ``refit``, ``split-merge``, ``layer reset``,
            ``reassignment``.
        source: the callback class that did it.
        detail: what it did, in words.
        sprites: the sprites it changed (the sprite picture marks them).
    """

    step: int
    kind: str
    source: str
    detail: str = ""
    sprites: tuple[int, ...] = ()

    def row(self) -> list[Any]:
        """The row of the event table: step, kind, source, detail, sprites."""
        return [self.step, self.kind, self.source, self.detail, " ".join(map(str, self.sprites))]


EVENT_COLUMNS = ("step", "kind", "source", "detail", "sprites")


class ScheduledCallback(L.Callback):
    """A callback that acts on a schedule and records what it does.

    Subclasses keep their own state in :meth:`own_state` / :meth:`load_own_state`; the base
    adds the event list (``events``) and, for a subclass with ``counts_steps``, the steps
    since it last acted (``steps``). :meth:`describe` turns one recorded event into rows of
    the event log (by default one row of kind :attr:`event_kind`).
    """

    event_kind: ClassVar[str] = "event"
    counts_steps: ClassVar[bool] = False  # whether ``steps`` (see tick) is part of the state

    def __init__(self, interval: Interval = "step") -> None:
        self.interval = check_interval(type(self).__name__, interval)
        self.steps = 0  # training steps since the callback last acted (see tick)
        self.events: list[dict[str, Any]] = []

    # --------------------------------------------------------------------------------- time
    def now(self, trainer: L.Trainer) -> int:
        """The current epoch, or the optimizer steps done, as ``interval`` says."""
        return trainer.current_epoch if self.interval == "epoch" else trainer.global_step

    def tick(self, every: int) -> bool:
        """Count one training step; True (and the count back to 0) on the ``every``-th."""
        self.steps += 1
        if self.steps < every:
            return False
        self.steps = 0
        return True

    # ------------------------------------------------------------------------------- events
    def record(self, event: dict[str, Any]) -> dict[str, Any]:
        """Append ``event`` (a dict with ``step`` and builtin values) to the events."""
        self.events.append(event)
        return event

    def describe(self, event: dict[str, Any]) -> list[Event]:
        """The event log's rows of one recorded event."""
        return [Event(int(event["step"]), self.event_kind, type(self).__name__)]

    # -------------------------------------------------------------------------------- state
    def own_state(self) -> dict[str, Any]:
        """The subclass's own state (builtins and CPU tensors)."""
        return {}

    def load_own_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`own_state` returned."""

    def upgrade_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The state of an older checkpoint in today's keys (as is by default)."""
        return state

    def state_dict(self) -> dict[str, Any]:
        state = self.own_state()
        if self.counts_steps:
            state["steps"] = self.steps
        state["events"] = list(self.events)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = self.upgrade_state(dict(state_dict))
        self.steps = int(state.get("steps", 0))
        self.events = list(state.get("events", []))
        self.load_own_state(state)


def event_log(trainer: L.Trainer) -> list[Event]:
    """Every event of the run's scheduled callbacks, in step order (the callbacks' order
    within a step)."""
    rows = [
        row
        for callback in trainer.callbacks
        if isinstance(callback, ScheduledCallback)
        for event in callback.events
        for row in callback.describe(event)
    ]
    return sorted(rows, key=lambda row: row.step)  # stable: the callbacks' order within a step
