"""The escalation rules that need no database, given / when / then."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from projections.escalations import (
    WINDOW,
    Contact,
    csat_reason,
    is_contact,
    is_supervisor_request,
    record_contact,
    repeat_reason,
    sla_reason,
)

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def contact(minutes: float, nid: int, conversation: str = "c1") -> Contact:
    when = T0 + timedelta(minutes=minutes)
    return Contact(when, nid, conversation, when.isoformat())


def test_given_two_contacts_in_a_day_when_a_third_comes_24_hours_after_the_first_then_3() -> None:
    window = [contact(0, 1), contact(600, 2)]
    assert record_contact(window, contact(24 * 60, 3)) == (3, [])


def test_given_two_contacts_when_a_third_comes_a_minute_late_then_the_first_drops() -> None:
    window = [contact(0, 1), contact(600, 2)]
    first = window[0]
    assert record_contact(window, contact(24 * 60 + 1, 3)) == (2, [first])
    assert [c.notification_id for c in window] == [2, 3]


def test_given_a_later_contact_when_an_older_one_arrives_then_it_counts_only_earlier() -> None:
    window = [contact(0, 1), contact(120, 2)]
    assert record_contact(window, contact(60, 3)) == (2, [])
    assert [c.notification_id for c in window] == [1, 3, 2]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=4 * 24 * 60), min_size=1, max_size=40))
def test_in_time_order_the_count_is_the_contacts_of_the_last_24_hours(minutes: list[int]) -> None:
    """For contacts arriving in time order, the window answers what the whole history would:
    the contacts from 24 h before up to the new one, itself included."""
    minutes.sort()
    window: list[Contact] = []
    history: list[Contact] = []
    for nid, m in enumerate(minutes, start=1):
        new = contact(m, nid)
        history.append(new)
        expected = sum(1 for c in history if new.at - WINDOW <= c.at <= new.at)
        before = [*window, new]
        count, dropped = record_contact(window, new)
        assert count == expected
        assert sorted([*window, *dropped]) == sorted(before)  # dropped: exactly what left
        # Only what a later contact can still count is kept.
        assert all(c.at >= window[-1].at - WINDOW for c in window)
        assert window == sorted(window)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=3 * 24 * 60), min_size=1, max_size=30))
def test_in_any_arrival_order_a_contact_counts_what_was_not_yet_forgotten(
    minutes: list[int],
) -> None:
    """Contacts arriving late count the earlier contacts of their 24 h that are still within
    24 h of the newest one seen before them (older ones are forgotten)."""
    window: list[Contact] = []
    history: list[Contact] = []
    for nid, m in enumerate(minutes, start=1):
        new = contact(m, nid)
        newest = max((c.at for c in history), default=new.at)
        remembered = [c for c in history if c.at >= newest - WINDOW]
        expected = 1 + sum(1 for c in remembered if new.at - WINDOW <= c.at <= new.at)
        history.append(new)
        assert record_contact(window, new)[0] == expected
        assert window == sorted(window)


def test_what_counts_as_an_inbound_contact() -> None:
    cases: list[tuple[str, dict[str, Any], bool]] = [
        ("Conversation.MessageReceived", {"automatic": False}, True),
        ("Conversation.MessageReceived", {"automatic": True}, False),
        ("Conversation.ActivityRecorded", {"activity": "call.started"}, True),
        ("Conversation.ActivityRecorded", {"activity": "chat.started"}, True),
        ("Conversation.ActivityRecorded", {"activity": "call.ended"}, False),
        ("Conversation.ActivityRecorded", {"activity": "ivr.selected"}, False),
        ("Conversation.CsatSubmitted", {"score": 1}, False),
    ]
    for name, state, expected in cases:
        assert is_contact(name, state) is expected, (name, state)


def test_only_an_ivr_choice_whose_action_is_supervisor_is_a_supervisor_request() -> None:
    assert is_supervisor_request({"activity": "ivr.selected", "data": {"action": "supervisor"}})
    assert not is_supervisor_request({"activity": "ivr.selected", "data": {"choice": "0"}})
    assert not is_supervisor_request({"activity": "ivr.selected", "data": {}})
    assert not is_supervisor_request({"activity": "call.started", "data": {"action": "supervisor"}})


def test_reasons_say_why() -> None:
    assert sla_reason("first_response", "2026-03-02T10:00:00.000000Z") == (
        "first_response breached (due 2026-03-02T10:00:00.000000Z)"
    )
    assert repeat_reason(3) == "3 contacts in 24 h"
    assert csat_reason(1) == "CSAT 1/5"
