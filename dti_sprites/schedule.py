"""When things happen in training: one small schedule for every callback and the LR drops.

A :class:`Schedule` is a set of times, in training steps or epochs (its user says which):
the listed times ``at``, and every ``every`` from ``start`` up to ``until``. It answers
whether a time is in the set (:meth:`~Schedule.due`), the first time in it at or after a
time (:meth:`~Schedule.next`), how many listed times have passed (:meth:`~Schedule.passed`,
milestones) and whether a time lies in the window ``start`` … ``until``
(:meth:`~Schedule.covers`). It is a pure function of the time, so a resumed run, which
knows its step and epoch, continues exactly. Plain Python: no Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Interval = Literal["epoch", "step"]
INTERVALS: tuple[Interval, ...] = ("epoch", "step")


def check_interval(owner: str, interval: str) -> Interval:
    """``interval`` if it is ``epoch`` or ``step``, else a ValueError naming ``owner``."""
    if interval not in INTERVALS:
        raise ValueError(f"{owner}.interval must be 'epoch' or 'step', got {interval!r}")
    return interval  # type: ignore[return-value]


@dataclass(frozen=True)
class Schedule:
    """The times ``at``, and ``start``, ``start + every``, … up to ``until`` (inclusive).

    Args:
        at: listed times (milestones), whatever ``until`` says.
        every: period of the periodic times (0: none).
        start: first periodic time, and the start of the window of :meth:`covers`.
        until: last periodic time and end of the window (inclusive); None: no end.
    """

    at: tuple[int, ...] = ()
    every: int = 0
    start: int = 0
    until: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "at", tuple(sorted(int(t) for t in self.at)))
        if self.every < 0:
            raise ValueError(f"Schedule.every must be ≥ 0, got {self.every}")

    @classmethod
    def milestones(cls, times: Iterable[int] | None) -> Schedule:
        """A schedule of listed times only."""
        return cls(at=tuple(times or ()))

    @classmethod
    def window(cls, start: int, length: int) -> Schedule:
        """The ``length`` times ``start`` … ``start + length - 1`` as a window (no event)."""
        return cls(start=start, until=start + length - 1)

    def covers(self, t: int) -> bool:
        """Whether ``t`` lies in the window ``start`` … ``until``."""
        return self.start <= t and (self.until is None or t <= self.until)

    def due(self, t: int) -> bool:
        """Whether ``t`` is one of the times."""
        return self.next(t) == t

    def next(self, t: int) -> int | None:
        """The first time at or after ``t``; None when there is none."""
        candidates = [a for a in self.at if a >= t]
        if self.every:
            k = max(0, -(-(t - self.start) // self.every))  # ceil, never before start
            periodic = self.start + k * self.every
            if self.until is None or periodic <= self.until:
                candidates.append(periodic)
        return min(candidates, default=None)

    def passed(self, t: int) -> int:
        """How many listed times are at or before ``t`` (milestones passed)."""
        return sum(a <= t for a in self.at)
