"""The wait estimate and the recent handle times it learns from, given / when / then: exact
numbers for the documented examples, properties for the rules that hold for every input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivr.estimate import HandleTimes, estimate_wait, typical_handle_time

FUZZ = settings(max_examples=200, deadline=None)
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

positions = st.integers(1, 500)
agent_counts = st.integers(0, 60)
handle_time_lists = st.lists(
    st.floats(1, 7200, allow_nan=False, allow_infinity=False), min_size=1, max_size=30
)


# --------------------------------------------------------------------------- estimate_wait


def test_the_worked_example_of_the_docs() -> None:
    # given 1 free and 3 busy agents, handle times with one long escalation among them
    times = [240.0, 300.0, 310.0, 330.0, 2400.0]
    # when the caller is 7th in line
    wait = estimate_wait(position=7, free_agents=1, busy_agents=3, handle_times=times)
    # then 6 wait for 4 agents: two waves, the first at A/2, A = median 310: 1.5 * 310
    assert wait == 465.0


@pytest.mark.parametrize(
    ("position", "free", "busy", "expected"),
    [
        (1, 1, 0, 0.0),  # a free agent takes the caller at once
        (2, 2, 5, 0.0),
        (1, 0, 1, 150.0),  # the busy agent is half-way through a 300 s call
        (2, 0, 1, 450.0),  # then one whole call more
        (4, 0, 4, 150.0),  # 4 callers, 4 agents: all in the first wave
        (5, 0, 4, 450.0),
        (3, 2, 2, 150.0),  # the 3rd caller waits for the first agent to free up
        (10, 1, 2, 3 * 300.0 - 150.0),  # 9 for 3 agents: three waves
    ],
)
def test_waves_of_agents(position: int, free: int, busy: int, expected: float) -> None:
    wait = estimate_wait(
        position=position, free_agents=free, busy_agents=busy, handle_times=[300.0]
    )
    assert wait == expected


def test_the_median_of_an_even_sample_is_the_middle_pair_s_mean() -> None:
    assert typical_handle_time([100.0, 200.0, 400.0, 9000.0]) == 300.0
    wait = estimate_wait(
        position=1, free_agents=0, busy_agents=1, handle_times=[100.0, 200.0, 400.0, 9000.0]
    )
    assert wait == 150.0


def test_no_agents_or_no_handle_times_is_no_estimate() -> None:
    assert estimate_wait(position=1, free_agents=0, busy_agents=0, handle_times=[300.0]) is None
    assert estimate_wait(position=1, free_agents=2, busy_agents=3, handle_times=[]) is None


@pytest.mark.parametrize(("position", "free", "busy"), [(0, 1, 1), (1, -1, 1), (1, 1, -1)])
def test_nonsense_input_is_refused(position: int, free: int, busy: int) -> None:
    with pytest.raises(ValueError, match=r"position|agent"):
        estimate_wait(position=position, free_agents=free, busy_agents=busy, handle_times=[1.0])


@FUZZ
@given(positions, agent_counts, agent_counts, handle_time_lists)
def test_a_later_position_never_waits_less(
    position: int, free: int, busy: int, times: list[float]
) -> None:
    here = estimate_wait(position=position, free_agents=free, busy_agents=busy, handle_times=times)
    behind = estimate_wait(
        position=position + 1, free_agents=free, busy_agents=busy, handle_times=times
    )
    if here is None:
        assert behind is None
    else:
        assert behind is not None
        assert behind >= here


@FUZZ
@given(positions, agent_counts, agent_counts, handle_time_lists, st.integers(0, 1))
def test_one_more_agent_never_makes_the_wait_longer(
    position: int, free: int, busy: int, times: list[float], which: int
) -> None:
    before = estimate_wait(
        position=position, free_agents=free, busy_agents=busy, handle_times=times
    )
    more_free, more_busy = (free + 1, busy) if which == 0 else (free, busy + 1)
    after = estimate_wait(
        position=position, free_agents=more_free, busy_agents=more_busy, handle_times=times
    )
    assert after is not None
    if before is not None:
        assert after <= before


@FUZZ
@given(positions, agent_counts, agent_counts, handle_time_lists)
def test_none_exactly_without_agents_and_never_negative(
    position: int, free: int, busy: int, times: list[float]
) -> None:
    wait = estimate_wait(position=position, free_agents=free, busy_agents=busy, handle_times=times)
    if free + busy == 0:
        assert wait is None
    else:
        assert wait is not None
        assert wait >= 0
        # never more than the whole line served one wave after another by one agent
        assert wait <= position * max(times)


@FUZZ
@given(positions, agent_counts, agent_counts)
def test_no_handle_times_is_no_estimate(position: int, free: int, busy: int) -> None:
    assert (
        estimate_wait(position=position, free_agents=free, busy_agents=busy, handle_times=[])
        is None
    )


# --------------------------------------------------------------------------- HandleTimes


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def handled(
    times: HandleTimes, sid: str, queue: str, at: datetime, talk: float, hold: float, wrap: float
) -> None:
    times.record("call.answered", {"call_sid": sid, "queue": queue, "agent": "ann"}, at)
    times.record(
        "call.ended",
        {"call_sid": sid, "talk_seconds": talk, "hold_seconds": hold, "wrap_seconds": wrap},
        at,
    )


def test_a_handle_time_is_talk_plus_hold_plus_wrap_in_the_answering_queue() -> None:
    clock = Clock()
    times = HandleTimes(clock=clock)
    handled(times, "CA1", "billing", T0, 200, 30, 45)
    assert times.recent("billing") == [275.0]


def test_a_queue_without_calls_falls_back_to_all_queues() -> None:
    clock = Clock()
    times = HandleTimes(clock=clock)
    handled(times, "CA1", "billing", T0, 100, 0, 0)
    handled(times, "CA2", "sales", T0, 200, 0, 0)
    assert times.recent("support") == [100.0, 200.0]
    assert times.recent("sales") == [200.0]


def test_only_the_last_k_calls_within_the_window_count() -> None:
    clock = Clock()
    times = HandleTimes(clock=clock, keep=2, within=timedelta(hours=1))
    handled(times, "CA1", "q", T0, 100, 0, 0)
    handled(times, "CA2", "q", T0 + timedelta(minutes=10), 200, 0, 0)
    handled(times, "CA3", "q", T0 + timedelta(minutes=20), 300, 0, 0)
    clock.now = T0 + timedelta(minutes=30)
    assert times.recent("q") == [200.0, 300.0]  # the oldest of three left (keep=2)
    clock.now = T0 + timedelta(minutes=75)
    assert times.recent("q") == [300.0]  # CA2 ended more than an hour ago
    clock.now = T0 + timedelta(hours=2)
    assert times.recent("q") == []  # nothing recent: no estimate, never an old average


def test_unanswered_and_abandoned_calls_are_not_handle_times() -> None:
    times = HandleTimes(clock=Clock())
    times.record("call.ended", {"call_sid": "CA1", "talk_seconds": 0}, T0)  # IVR hang-up
    times.record("call.answered", {"call_sid": "CA2", "queue": "q"}, T0)
    times.record("call.abandoned", {"call_sid": "CA2", "queue": "q", "queue_seconds": 5}, T0)
    times.record("call.ended", {"call_sid": "CA2", "talk_seconds": 60}, T0)
    times.record("call.answered", {"call_sid": "CA3", "queue": "q"}, T0)
    times.record("call.ended", {"call_sid": "CA3", "talk_seconds": 0}, T0)  # zero: nothing
    times.record("ivr.selected", {"call_sid": "CA4"}, T0)
    assert times.recent("q") == []


def test_fed_handle_times_give_the_estimate() -> None:
    clock = Clock()
    times = HandleTimes(clock=clock)
    for i, seconds in enumerate([240, 300, 310, 330, 2400]):
        handled(times, f"CA{i}", "support", T0, seconds, 0, 0)
    wait = estimate_wait(
        position=7, free_agents=1, busy_agents=3, handle_times=times.recent("support")
    )
    assert wait == 465.0
