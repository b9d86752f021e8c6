"""The Callback aggregate, given / when / then: given the events of earlier commands, when a
command, then the events it records or the error it raises (and no event at all)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import reduce
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inbox.domain.callback import (
    CANCELLED,
    COMPLETED,
    DIALED,
    DIALING,
    FAILED,
    GOT_THROUGH,
    WAITING,
    Callback,
    CallbackStateError,
    callback_id,
)

Step = Callable[[Callback], object]

T0 = "2026-03-02T09:00:00.000000Z"
T1 = "2026-03-02T09:01:00.000000Z"
T2 = "2026-03-02T09:02:00.000000Z"
T3 = "2026-03-02T09:30:00.000000Z"
NUMBER = "+14155550123"
MAX = 3


def _state(aggregate: Any) -> dict[str, Any]:
    return copy.deepcopy({k: v for k, v in vars(aggregate).items() if k != "_pending_events"})


def requested() -> Callback:
    return Callback.request(
        source_event_id="CA1:callback",
        conversation_id="c-1",
        call_sid="CA1",
        number=NUMBER,
        queue="support",
        requested_at=T0,
        at=T0,
    )


class Scenario:
    def __init__(self, *steps: Step) -> None:
        self.callback = requested()
        self.history: list[Any] = list(self.callback.collect_events())
        for step in steps:
            step(self.callback)
            self.history.extend(self.callback.collect_events())

    def when(self, command: Step) -> list[Any]:
        command(self.callback)
        new = list(self.callback.collect_events())
        self.history.extend(new)
        # state changes only when an event is applied: replaying rebuilds it exactly
        rebuilt = reduce(lambda aggregate, event: event.mutate(aggregate), self.history, None)
        assert _state(rebuilt) == _state(self.callback)
        return new

    def refused(self, command: Step, match: str) -> None:
        before = _state(self.callback)
        with pytest.raises(CallbackStateError, match=match):
            command(self.callback)
        assert self.callback.collect_events() == []
        assert _state(self.callback) == before


def dialing(agent: str = "ann", at: str = T1) -> Step:
    return lambda c: c.start_dialing(agent, max_attempts=MAX, at=at)


def dialed(attempt: int, sid: str) -> Step:
    return lambda c: c.dialed(attempt, sid, at=T1)


def failed(attempt: int, status: str = "no-answer", retry_at: str | None = T3) -> Step:
    return lambda c: c.attempt_failed(attempt, status, retry_at=retry_at, at=T2)


def fields(event: Any, *names: str) -> dict[str, Any]:
    return {name: getattr(event, name) for name in names}


def test_a_request_is_named_after_its_contact_event() -> None:
    callback = requested()
    [event] = callback.collect_events()
    assert isinstance(event, Callback.Requested)
    assert callback.id == callback_id("CA1:callback")
    assert requested().id == callback.id  # the same request taken in twice: one callback
    assert fields(event, "conversation_id", "number", "queue", "requested_at", "actor") == {
        "conversation_id": "c-1",
        "number": NUMBER,
        "queue": "support",
        "requested_at": T0,
        "actor": "dialer",
    }
    assert callback.status == WAITING


def test_a_number_that_is_not_e164_is_refused() -> None:
    with pytest.raises(CallbackStateError, match=r"E\.164"):
        Callback.request(
            source_event_id="x",
            conversation_id="c",
            call_sid=None,
            number="4155550123",
            queue="q",
            requested_at=T0,
            at=T0,
        )


def test_dialing_then_dialed_then_completed() -> None:
    scenario = Scenario()
    [dial] = scenario.when(dialing())
    assert isinstance(dial, Callback.Dialing)
    assert fields(dial, "attempt", "agent", "at") == {"attempt": 1, "agent": "ann", "at": T1}
    assert scenario.callback.status == DIALING
    [call] = scenario.when(dialed(1, "CA9"))
    assert isinstance(call, Callback.Dialed)
    assert scenario.callback.status == DIALED
    [done] = scenario.when(lambda c: c.complete(1, "CA9", at=T2))
    assert isinstance(done, Callback.Completed)
    assert fields(done, "attempt", "call_sid", "agent") == {
        "attempt": 1,
        "call_sid": "CA9",
        "agent": "ann",
    }
    assert scenario.callback.status == COMPLETED
    assert not scenario.callback.is_open


def test_a_failed_attempt_waits_for_its_retry_time() -> None:
    scenario = Scenario(dialing(), dialed(1, "CA9"))
    [event] = scenario.when(failed(1, "busy", T3))
    assert isinstance(event, Callback.AttemptFailed)
    assert fields(event, "attempt", "status", "retry_at") == {
        "attempt": 1,
        "status": "busy",
        "retry_at": T3,
    }
    assert scenario.callback.status == WAITING
    scenario.refused(dialing(at=T2), "not to be dialled before")
    [again] = scenario.when(dialing("bob", at=T3))
    assert isinstance(again, Callback.Dialing)
    assert again.attempt == 2


def test_after_the_last_attempt_it_is_given_up() -> None:
    scenario = Scenario(
        dialing(),
        dialed(1, "CA1"),
        failed(1),
        dialing(at=T3),
        dialed(2, "CA2"),
        failed(2),
        dialing(at=T3),
        dialed(3, "CA3"),
        failed(3, "machine", None),
    )
    scenario.refused(dialing(at=T3), "all 3 attempts")
    [event] = scenario.when(lambda c: c.give_up("no person answered", at=T3))
    assert isinstance(event, Callback.Failed)
    assert fields(event, "attempts", "reason") == {"attempts": 3, "reason": "no person answered"}
    assert scenario.callback.status == FAILED
    assert scenario.callback.call_sids == ["CA1", "CA2", "CA3"]


def test_a_call_that_could_not_be_placed_fails_its_attempt_from_dialing() -> None:
    scenario = Scenario(dialing())
    [event] = scenario.when(failed(1, "failed", None))
    assert isinstance(event, Callback.AttemptFailed)


def test_cancelled_only_while_waiting() -> None:
    scenario = Scenario(dialing())
    scenario.refused(lambda c: c.cancel(GOT_THROUGH, at=T1), "only a waiting callback")
    scenario = Scenario()
    [event] = scenario.when(lambda c: c.cancel(GOT_THROUGH, at=T1))
    assert isinstance(event, Callback.Cancelled)
    assert event.reason == GOT_THROUGH
    assert scenario.callback.status == CANCELLED
    scenario.refused(dialing(), "only a waiting callback is dialled")


def test_scheduled_for_the_opening() -> None:
    scenario = Scenario()
    [event] = scenario.when(lambda c: c.schedule(T3, at=T1))
    assert isinstance(event, Callback.DialScheduled)
    assert fields(event, "attempt", "not_before") == {"attempt": 1, "not_before": T3}
    scenario.refused(lambda c: c.schedule(T3, at=T1), "already scheduled")
    scenario.refused(dialing(at=T2), "not to be dialled before")


@pytest.mark.parametrize(
    ("steps", "command", "match"),
    [
        ((), dialed(1, "CA1"), "not dialing"),
        ((dialing(),), dialed(2, "CA1"), "attempt 2 is not dialing"),
        ((dialing(),), dialed(1, ""), "CallSid"),
        ((dialing(),), lambda c: c.complete(1, "CA1", at=T2), "not dialed"),
        ((dialing(), dialed(1, "CA1")), lambda c: c.complete(1, "CA2", at=T2), "not CA2"),
        ((), failed(1), "not in flight"),
        ((dialing(),), failed(1, "ringing"), "one of"),
        ((dialing(),), lambda c: c.give_up("x", at=T2), "only a waiting"),
        ((dialing(),), dialing(), "only a waiting"),
    ],
)
def test_illegal_transitions_are_refused(steps: Sequence[Step], command: Step, match: str) -> None:
    Scenario(*steps).refused(command, match)


# Every command sequence: a refusal records nothing, state is rebuilt from the events alone,
# attempts never exceed the maximum and a closed callback stays closed.
commands = st.lists(
    st.sampled_from(
        ["dial", "dialed", "complete", "fail", "fail-last", "cancel", "schedule", "give-up"]
    ),
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(commands)
def test_any_command_sequence_keeps_the_rules(names: list[str]) -> None:
    scenario = Scenario()
    closed_at: int | None = None
    for i, name in enumerate(names):
        c = scenario.callback
        not_before = f"2026-03-02T09:00:{i:02d}.000000Z"
        command: Step = {
            "dial": dialing(at=T3),
            "dialed": lambda c: c.dialed(c.attempts, f"CA{c.attempts}", at=T3),
            "complete": lambda c: c.complete(c.attempts, c.call_sid or "", at=T3),
            "fail": failed(c.attempts, "busy", T3),
            "fail-last": failed(c.attempts, "no-answer", None),
            "cancel": lambda c: c.cancel(GOT_THROUGH, at=T3),
            "schedule": lambda c: c.schedule(not_before, at=T3),  # noqa: B023 - used at once
            "give-up": lambda c: c.give_up("gave up", at=T3),
        }[name]
        try:
            scenario.when(command)
        except CallbackStateError:
            assert scenario.callback.collect_events() == []
        else:
            assert closed_at is None, "a closed callback recorded an event"
        assert scenario.callback.attempts <= MAX
        if not scenario.callback.is_open and closed_at is None:
            closed_at = i
