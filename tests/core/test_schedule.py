"""The one schedule of the callbacks and the LR drops (issue 21)."""

import pytest

from dti_sprites.schedule import Schedule, check_interval


def test_listed_and_periodic_times():
    # A seeding at 800, refits every 200 up to 1,400.
    schedule = Schedule(at=(800,), every=200, start=800, until=1400)
    assert [schedule.next(t) for t in (0, 800, 801, 1000, 1401)] == [800, 800, 1000, 1000, None]
    assert [t for t in range(0, 2000, 100) if schedule.due(t)] == [800, 1000, 1200, 1400]
    assert Schedule(at=(800,), every=200, start=800, until=100).next(0) == 800  # listed: always
    assert Schedule(at=(800,), start=800).next(801) is None  # no period: nothing after


def test_every_n_from_zero_and_milestones():
    every = Schedule(every=50)
    assert [every.due(t) for t in (0, 49, 50, 100)] == [True, False, True, True]
    milestones = Schedule.milestones([200, 100])
    assert milestones.at == (100, 200)
    assert [milestones.passed(t) for t in (99, 100, 199, 200, 500)] == [0, 1, 1, 2, 2]


def test_windows():
    frozen = Schedule.window(0, 3)  # the first 3 epochs or steps
    assert [frozen.covers(t) for t in range(5)] == [True, True, True, False, False]
    assert not any(Schedule.window(0, 0).covers(t) for t in range(3))  # empty
    assert [Schedule(until=5).covers(t) for t in (0, 5, 6)] == [True, True, False]
    with pytest.raises(ValueError, match=r"Curriculum\.interval"):
        check_interval("Curriculum", "steps")
