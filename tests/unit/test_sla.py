"""SLA policies and clocks, given / when / then: given a policy and a conversation's facts,
when the running clocks are asked for, then their exact due and warning instants."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inbox.domain.business_hours import BusinessHours
from inbox.domain.sla import (
    SlaClock,
    SlaPolicy,
    SlaPolicyError,
    SlaTargets,
    earliest_due,
    format_duration,
    parse_duration,
    running_clocks,
    status,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HOUR = 3600.0
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


BILLING: dict[str, Any] = {
    "queue": "billing",
    "timezone": "Europe/Berlin",
    "hours": {**{day: ["09:00-17:00"] for day in WEEKDAYS}, "holidays": ["2026-12-25"]},
    "targets": {
        "0": {"first_response": "4h", "next_response": "8h", "resolution": "3d"},
        "2": {"first_response": "30m", "next_response": 3600},
    },
    "warn_ratio": 0.8,
}


def billing() -> SlaPolicy:
    return SlaPolicy.from_dict(BILLING)


# --------------------------------------------------------------------------- the dict form


def test_from_dict_reads_the_policy() -> None:
    policy = billing()
    assert policy.queue == "billing"
    assert policy.hours.tz == "Europe/Berlin"  # the policy's timezone, the calendar's none
    assert policy.hours.is_open(at("2026-11-27T16:00+01:00"))
    assert policy.targets == {
        0: SlaTargets(first_response=4 * HOUR, next_response=8 * HOUR, resolution=3 * 86_400),
        2: SlaTargets(first_response=1800, next_response=3600, resolution=None),
    }
    assert policy.warn_ratio == 0.8


def test_to_dict_round_trips() -> None:
    policy = billing()
    data = policy.to_dict()
    assert data["targets"] == {
        "0": {"first_response": "4h", "next_response": "8h", "resolution": "3d"},
        "2": {"first_response": "30m", "next_response": "1h"},
    }
    assert data["timezone"] == data["hours"]["timezone"] == "Europe/Berlin"
    assert SlaPolicy.from_dict(data) == policy
    assert hash(SlaPolicy.from_dict(data)) == hash(policy)


def test_a_policy_without_hours_runs_around_the_clock() -> None:
    policy = SlaPolicy.from_dict({"queue": "vip", "targets": {"0": {"first_response": "1h"}}})
    assert policy.hours == BusinessHours.always()
    assert policy.warn_ratio == 0.8
    clocks = running_clocks(
        policy,
        0,
        opened_at=at("2026-11-28T23:30Z"),
        first_response_at=None,
        waiting_since=None,
        resolved=False,
    )
    assert [c.due_at for c in clocks] == [at("2026-11-29T00:30Z")]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90s", 90.0),
        ("30m", 1800.0),
        ("4h", 14_400.0),
        ("3d", 259_200.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        (" 2h ", 7200.0),
        (None, None),
    ],
)
def test_durations_are_seconds_or_unit_strings(text: object, seconds: float | None) -> None:
    assert parse_duration(text, "x") == seconds


@pytest.mark.parametrize(("seconds", "text"), [(90, "90s"), (5400, "90m"), (259_200, "3d")])
def test_durations_are_written_in_the_largest_whole_unit(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert format_duration(1.5) == 1.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"queue": ""}, "sla.queue: expected a queue name"),
        ({"priority": 1}, "sla.priority: unknown key"),
        ({"targets": {}}, "sla.targets: expected a table"),
        ({"targets": {"high": {"first_response": "1h"}}}, "sla.targets.high: a priority is an"),
        ({"targets": {"0": {"first_response": "1h"}, "00": {}}}, "sla.targets: a priority is"),
        ({"targets": {"0": ["1h"]}}, "sla.targets.0: expected a table"),
        ({"targets": {"0": {"first_reply": "1h"}}}, "sla.targets.0.first_reply: unknown target"),
        ({"targets": {"0": {"resolution": "4 hours"}}}, "sla.targets.0.resolution: '4 hours' is"),
        ({"targets": {"0": {"resolution": "4w"}}}, "sla.targets.0.resolution: '4w' is not"),
        ({"targets": {"0": {"resolution": True}}}, "sla.targets.0.resolution: True is not"),
        ({"targets": {"0": {"resolution": 0}}}, "sla.targets.0.resolution: a target is a positive"),
        ({"targets": {"0": {"resolution": -5}}}, "sla.targets.0.resolution: a target is a posit"),
        ({"warn_ratio": 0}, "sla.warn_ratio: expected a number in (0, 1]"),
        ({"warn_ratio": 1.5}, "sla.warn_ratio: expected a number in (0, 1]"),
        ({"warn_ratio": "80%"}, "sla.warn_ratio: expected a number in (0, 1]"),
        ({"hours": {"mon": ["9-17"]}}, "sla.hours.mon[0]: '9-17' is not"),
        ({"timezone": "Mars/Olympus"}, "sla.hours.timezone: unknown time zone 'Mars/Olympus'"),
        ({"timezone": None}, "sla.hours.timezone: missing"),
        (
            {"hours": {"timezone": "UTC", "mon": ["09:00-17:00"]}},
            "sla.timezone: 'Europe/Berlin' differs from sla.hours.timezone 'UTC'",
        ),
        ({"hours": {"timezone": "UTC"}, "timezone": None}, "sla.hours: never open"),
    ],
)
def test_from_dict_refusals_name_the_place(change: dict[str, Any], message: str) -> None:
    data = {**BILLING, **change}
    data = {key: value for key, value in data.items() if value is not None}
    with pytest.raises(SlaPolicyError, match=re.escape(message)):
        SlaPolicy.from_dict(data)


def test_from_dict_uses_the_place_it_is_given() -> None:
    with pytest.raises(SlaPolicyError, match=r"^queues\.billing\.sla\.warn_ratio: "):
        SlaPolicy.from_dict({**BILLING, "warn_ratio": 2}, "queues.billing.sla")


def test_the_constructor_checks_its_fields() -> None:
    targets = {0: SlaTargets(first_response=60)}
    with pytest.raises(SlaPolicyError, match="targets: at least one"):
        SlaPolicy("q", {})
    with pytest.raises(SlaPolicyError, match="warn_ratio"):
        SlaPolicy("q", targets, warn_ratio=0)
    with pytest.raises(SlaPolicyError, match="first_response: a target is a positive"):
        SlaTargets(first_response=-1)
    with pytest.raises(SlaPolicyError, match="hours: never open"):
        SlaPolicy("q", targets, BusinessHours("UTC", {}))


# --------------------------------------------------------------------------- targets_for


@pytest.mark.parametrize(("priority", "entry"), [(0, 0), (1, 0), (2, 2), (5, 2), (-1, 0)])
def test_a_priority_uses_its_entry_else_the_nearest_lower_else_the_lowest(
    priority: int, entry: int
) -> None:
    policy = billing()
    assert policy.targets_for(priority) is policy.targets[entry]


# --------------------------------------------------------------------------- clocks


def test_a_new_conversation_runs_first_response_and_resolution() -> None:
    # given a conversation opened Friday 16:00 (Berlin), priority 0, nobody answered yet
    clocks = running_clocks(
        billing(),
        0,
        opened_at=at("2026-11-27T16:00+01:00"),
        first_response_at=None,
        waiting_since=at("2026-11-27T16:00+01:00"),
        resolved=False,
    )
    # then first response is due after 4 business hours (warning after 3h12m), and resolution
    # after 72 business hours: nine 8-hour days, the last ending Thursday 10 December 16:00
    assert clocks == [
        SlaClock(
            kind="first_response",
            started_at=at("2026-11-27T16:00+01:00"),
            due_at=at("2026-11-30T12:00+01:00"),
            warn_at=at("2026-11-30T11:12+01:00"),
        ),
        SlaClock(
            kind="resolution",
            started_at=at("2026-11-27T16:00+01:00"),
            due_at=at("2026-12-10T16:00+01:00"),
            warn_at=at("2026-12-09T09:36+01:00"),
        ),
    ]
    first = earliest_due(clocks)
    assert first is not None
    assert first.kind == "first_response"


def test_after_the_first_response_next_response_runs_from_the_oldest_unanswered_message() -> None:
    clocks = running_clocks(
        billing(),
        2,
        opened_at=at("2026-11-30T09:00+01:00"),
        first_response_at=at("2026-11-30T09:10+01:00"),
        waiting_since=at("2026-11-30T16:30+01:00"),
        resolved=False,
    )
    # priority 2 has no resolution target; next response is due 1 business hour later
    assert clocks == [
        SlaClock(
            kind="next_response",
            started_at=at("2026-11-30T16:30+01:00"),
            due_at=at("2026-12-01T09:30+01:00"),
            warn_at=at("2026-12-01T09:18+01:00"),
        )
    ]


def test_nothing_waiting_after_the_first_response_leaves_only_resolution() -> None:
    clocks = running_clocks(
        billing(),
        0,
        opened_at=at("2026-11-30T09:00+01:00"),
        first_response_at=at("2026-11-30T09:10+01:00"),
        waiting_since=None,
        resolved=False,
    )
    assert [clock.kind for clock in clocks] == ["resolution"]


def test_next_response_never_starts_before_the_first_response() -> None:
    clocks = running_clocks(
        billing(),
        0,
        opened_at=at("2026-11-30T09:00+01:00"),
        first_response_at=at("2026-11-30T10:00+01:00"),
        waiting_since=at("2026-11-30T09:00+01:00"),
        resolved=False,
    )
    assert clocks[0].kind == "next_response"
    assert clocks[0].started_at == at("2026-11-30T10:00+01:00")
    assert clocks[0].due_at == at("2026-12-01T10:00+01:00")


def test_a_resolved_conversation_runs_no_clock() -> None:
    clocks = running_clocks(
        billing(),
        0,
        opened_at=at("2026-11-30T09:00+01:00"),
        first_response_at=None,
        waiting_since=at("2026-11-30T09:00+01:00"),
        resolved=True,
    )
    assert clocks == []
    assert earliest_due(clocks) is None


def test_earliest_due_picks_the_clock_due_first() -> None:
    later = SlaClock(
        "resolution", at("2026-11-30T09:00Z"), at("2026-12-02T09:00Z"), at("2026-12-01T09:00Z")
    )
    sooner = SlaClock(
        "next_response", at("2026-11-30T10:00Z"), at("2026-11-30T18:00Z"), at("2026-11-30T16:00Z")
    )
    assert earliest_due([later, sooner]) is sooner


def test_status_is_ok_then_warning_then_breached() -> None:
    clock = SlaClock(
        "first_response", at("2026-11-30T09:00Z"), at("2026-11-30T13:00Z"), at("2026-11-30T12:12Z")
    )
    assert status(clock, at("2026-11-30T12:11:59Z")) == "ok"
    assert status(clock, at("2026-11-30T12:12Z")) == "warning"
    assert status(clock, at("2026-11-30T12:59:59.999999Z")) == "warning"
    assert status(clock, at("2026-11-30T13:00Z")) == "breached"


# --------------------------------------------------------------------------- properties

durations = st.one_of(st.none(), st.integers(1, 30 * 86_400).map(float), st.floats(0.5, 1e6))
targets = st.builds(SlaTargets, durations, durations, durations)
policies = st.builds(
    SlaPolicy,
    st.just("support"),
    st.dictionaries(st.integers(-3, 5), targets, min_size=1, max_size=4),
    st.sampled_from(
        [
            BusinessHours.always(),
            BusinessHours.from_dict(
                {
                    "timezone": "America/New_York",
                    **{d: ["08:00-12:00", "13:00-18:00"] for d in WEEKDAYS},
                }
            ),
        ]
    ),
    st.floats(0.05, 1.0),
)
instants = st.integers(0, 366 * 86_400).map(
    lambda s: datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=s)
)


@FUZZ
@given(policies)
def test_the_dict_form_round_trips(policy: SlaPolicy) -> None:
    assert SlaPolicy.from_dict(policy.to_dict()) == policy


@FUZZ
@given(policies, st.integers(-5, 10), instants, st.integers(0, 86_400), st.booleans())
def test_clocks_warn_before_they_are_due_and_status_only_moves_forward(
    policy: SlaPolicy, priority: int, opened_at: datetime, wait: int, answered: bool
) -> None:
    answered_at = opened_at + timedelta(seconds=wait) if answered else None
    clocks = running_clocks(
        policy,
        priority,
        opened_at=opened_at,
        first_response_at=answered_at,
        waiting_since=answered_at,
        resolved=False,
    )
    targets = policy.targets_for(priority)
    assert [c.kind for c in clocks] == [
        kind
        for kind in ("first_response", "next_response", "resolution")
        if targets.get(kind) is not None
        and (kind == "resolution" or (kind == "first_response") != answered)
    ]
    order = ["ok", "warning", "breached"]
    for clock in clocks:
        assert clock.started_at <= clock.warn_at <= clock.due_at
        seconds = targets.get(clock.kind)
        assert seconds is not None
        assert policy.hours.seconds_between(clock.started_at, clock.due_at) == pytest.approx(
            seconds, abs=1e-6
        )
        moments = [clock.started_at, clock.warn_at, clock.due_at, clock.due_at + timedelta(1)]
        seen = [order.index(status(clock, moment)) for moment in sorted(moments)]
        assert seen == sorted(seen)
        assert status(clock, clock.due_at) == "breached"
