"""The callback dialer against a real SQLite event store and a stand-in for Twilio's Calls API
over a real socket: callback requests come in through the real ingest path, agents take the
conversation through Commands (or the router's offer), and the dialer follows the log. The
clock is injected (dialer, stub and store events share it), so backoff, business hours and
the rate cap are exact."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import Tracking

from inbox.agents import Directory, agent_profile
from inbox.commands import Commands
from inbox.contact import ContactEvent, CustomerRef, validate
from inbox.distribution import Distributor
from inbox.domain import ids
from inbox.domain.business_hours import BusinessHours
from inbox.domain.callback import Callback, callback_id
from inbox.domain.conversation import Conversation
from inbox.domain.routing import Router
from inbox.domain.time import iso
from inbox.ingest import Ingestor
from infra.store import ContactEventRow, EventStore, open_event_store
from ivr.dialer import CallbackDialer
from ivr.twilio_rest import CallStatus, TwilioRestCalls
from tests.conftest import SettingsFactory
from tests.twilio_rest_stub import ACCOUNT, FakeClock, Outcome, TwilioRestStub

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)  # a Monday
CALLER_ID = "+15005550006"
ALICE, BOB, CAROL = "+14155550101", "+14155550102", "+14155550103"
VOICE_TO = {"ann": "client:ann", "bob": "+14155550999", "cy": "sip:cy@pbx.example.com"}
OFFICE = BusinessHours(
    "UTC", {day: ((time(9), time(17)),) for day in range(5)}
)  # Monday to Friday, 09:00-17:00


@dataclass
class Center:
    store: EventStore
    clock: FakeClock
    commands: Commands
    directory: Directory
    ingestor: Ingestor
    offset: int = 0

    def contact(self, event_id: str, type: str, phone: str, **payload: Any) -> Conversation:
        raw = ContactEvent(
            event_id=event_id,
            occurred_at=self.clock.now,
            channel="voice",
            type=type,  # type: ignore[arg-type]
            customer=CustomerRef(phone=phone),
            payload=payload,
        )
        event = validate(raw, now=self.clock.now + timedelta(days=1))
        row = ContactEventRow(event.event_id, "contact-events", 0, self.offset)
        self.offset += 1
        self.ingestor.apply_batch([(event, row)], Tracking("contact-events:0", self.offset))
        claim = self.store.get(ids.claim_id(f"phone:{phone}"))
        customer = self.store.get(UUID(claim.customer_id))
        conversation = self.store.get(UUID(customer.current_conversation_id))
        assert isinstance(conversation, Conversation)
        return conversation

    def call_and_ask_for_callback(
        self, call_sid: str, phone: str, queue: str = "support"
    ) -> Conversation:
        self.contact(f"{call_sid}:started", "call.started", phone, call_sid=call_sid, to="+1800")
        self.contact(f"{call_sid}:queued", "call.queued", phone, call_sid=call_sid, queue=queue)
        return self.contact(
            f"{call_sid}:callback",
            "callback.requested",
            phone,
            call_sid=call_sid,
            queue=queue,
            number=phone,
        )

    def answered_elsewhere(self, call_sid: str, phone: str, queue: str = "support") -> None:
        self.contact(f"{call_sid}:started", "call.started", phone, call_sid=call_sid, to="+1800")
        self.contact(f"{call_sid}:queued", "call.queued", phone, call_sid=call_sid, queue=queue)
        self.contact(
            f"{call_sid}:answered",
            "call.answered",
            phone,
            call_sid=call_sid,
            queue=queue,
            agent="x",
        )

    def callback_events(self, request_event_id: str) -> list[Any]:
        return list(self.store.events_of(callback_id(request_event_id)))

    def callback_names(self, request_event_id: str) -> list[str]:
        return [type(e).__name__ for e in self.callback_events(request_event_id)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def center(settings: SettingsFactory, clock: FakeClock) -> Iterator[Center]:
    store = open_event_store(settings(bootstrap=None))
    try:
        yield Center(
            store,
            clock,
            Commands(store, clock=clock),
            Directory(store, admin_token="admin-token", clock=clock),
            Ingestor(store),
        )
    finally:
        store.close()


def make_dialer(center: Center, calls: Any, **options: Any) -> CallbackDialer:
    settings: dict[str, Any] = {
        "caller_id": CALLER_ID,
        "agent_voice_to": VOICE_TO.get,
        "hours_for": lambda queue: BusinessHours.always(),
        "clock": center.clock,
        **options,
    }
    return CallbackDialer(center.store, calls=calls, **settings)


async def steps(dialer: CallbackDialer, n: int = 3) -> int:
    return sum([await dialer.step() for _ in range(n)])


# --------------------------------------------------------------------------- the happy path


async def test_requested_offered_accepted_dialled_and_connected(
    center: Center, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    body = {"name": "Ann", "role": "agent", "capacity": {"voice": 1}}
    center.directory.register("ann", agent_profile(body), actor="admin")
    center.directory.set_presence("ann", "available", reason="test", actor="ann")
    conversation = center.call_and_ask_for_callback("CA1", ALICE)
    dialer = make_dialer(center, calls)

    await steps(dialer)
    # asked, but nobody has the conversation yet: no call
    assert center.callback_names("CA1:callback") == ["Requested"]
    assert stub.created() == []

    # the router keeps the conversation in its queue (virtual hold) and offers it
    distributor = Distributor(
        center.store,
        center.directory,
        router=Router(offer_timeouts={"voice": 20.0}),
        clock=center.clock,
    )
    distributor.step()
    assert center.store.get(conversation.id).offered_to == "ann"
    await steps(dialer)
    assert stub.created() == []  # an offer is not an assignment
    center.commands.accept_offer(conversation.id, "ann")

    await dialer.step()  # reads the assignment: Dialing, the call, Dialed
    [call] = stub.created()
    assert (call.to, call.from_) == (ALICE, CALLER_ID)
    assert "<Say>Connecting you" in call.twiml
    assert call.twiml.endswith("<Dial><Client>ann</Client></Dial></Response>")
    assert call.machine_detection == "Enable"
    await dialer.step()  # polls: answered by a person

    events = center.callback_events("CA1:callback")
    assert [type(e).__name__ for e in events] == ["Requested", "Dialing", "Dialed", "Completed"]
    requested, dialing, dialed, completed = events
    assert isinstance(requested, Callback.Requested)
    assert (requested.conversation_id, requested.number, requested.queue) == (
        str(conversation.id),
        ALICE,
        "support",
    )
    assert isinstance(dialing, Callback.Dialing)
    assert (dialing.attempt, dialing.agent) == (1, "ann")
    assert isinstance(dialed, Callback.Dialed)
    assert dialed.call_sid == call.sid
    assert isinstance(completed, Callback.Completed)
    assert (completed.call_sid, completed.agent) == (call.sid, "ann")
    await steps(dialer)
    assert len(stub.created()) == 1


async def test_sip_and_number_targets_and_a_call_that_rings_a_while(
    center: Center, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    stub.script(ALICE, Outcome("completed", progress=("ringing", "in-progress")))
    first = center.call_and_ask_for_callback("CA1", ALICE)
    second = center.call_and_ask_for_callback("CA2", BOB)
    center.commands.assign(first.id, "cy", actor="cy", claim=True)
    center.commands.assign(second.id, "bob", actor="bob", claim=True)
    dialer = make_dialer(center, calls, calls_per_second=100, poll_every=5)

    await dialer.step()  # Alice, the older request
    center.clock.advance(1)
    await steps(dialer, 2)  # Bob, a second later (the cap); Alice's call rings
    [to_alice] = stub.created(ALICE)
    [to_bob] = stub.created(BOB)
    assert "<Dial><Sip>sip:cy@pbx.example.com</Sip></Dial>" in to_alice.twiml
    assert "<Dial><Number>+14155550999</Number></Dial>" in to_bob.twiml
    assert center.callback_names("CA2:callback")[-1] == "Completed"
    assert center.callback_names("CA1:callback")[-1] == "Dialed"  # ringing
    for _ in range(2):
        center.clock.advance(5)
        await dialer.step()
    assert center.callback_names("CA1:callback")[-1] == "Completed"
    assert to_alice.fetches == 3


# --------------------------------------------------------------------------- retries


async def test_no_answer_then_retry_after_the_backoff_then_success(
    center: Center, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    stub.script(ALICE, Outcome("no-answer"), Outcome("completed"))
    conversation = center.call_and_ask_for_callback("CA1", ALICE)
    center.commands.assign(conversation.id, "ann", actor="ann", claim=True)
    dialer = make_dialer(center, calls)

    await steps(dialer)
    [failed] = [
        e for e in center.callback_events("CA1:callback") if e.__class__.__name__ == "AttemptFailed"
    ]
    assert isinstance(failed, Callback.AttemptFailed)
    assert (failed.attempt, failed.status) == (1, "no-answer")
    assert failed.retry_at == iso(T0 + timedelta(seconds=120))
    assert len(stub.created()) == 1

    center.clock.advance(119)
    await steps(dialer)
    assert len(stub.created()) == 1  # not before the backoff

    center.clock.advance(1)
    await steps(dialer)
    assert len(stub.created()) == 2
    assert center.callback_names("CA1:callback") == [
        "Requested",
        "Dialing",
        "Dialed",
        "AttemptFailed",
        "Dialing",
        "Dialed",
        "Completed",
    ]


async def test_all_attempts_fail_then_the_callback_fails(
    center: Center, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    stub.script(
        ALICE,
        Outcome("busy"),
        Outcome("completed", answered_by="machine_end_beep"),
        Outcome("no-answer"),
        Outcome("completed"),  # never reached
    )
    conversation = center.call_and_ask_for_callback("CA1", ALICE)
    center.commands.assign(conversation.id, "ann", actor="ann", claim=True)
    dialer = make_dialer(center, calls)

    await steps(dialer)
    center.clock.advance(120)
    await steps(dialer)
    center.clock.advance(600)
    await steps(dialer)
    center.clock.advance(3600)
    await steps(dialer)

    events = center.callback_events("CA1:callback")
    failures = [e for e in events if isinstance(e, Callback.AttemptFailed)]
    assert [(f.attempt, f.status) for f in failures] == [
        (1, "busy"),
        (2, "machine"),
        (3, "no-answer"),
    ]
    assert failures[-1].retry_at is None
    last = events[-1]
    assert isinstance(last, Callback.Failed)
    assert last.attempts == 3
    assert len(stub.created()) == 3


async def test_a_number_twilio_refuses_fails_at_once(
    center: Center, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    stub.fail_next_create(400, 21215, "Geo permission configuration is not permitting call")
    conversation = center.call_and_ask_for_callback("CA1", ALICE)
    center.commands.assign(conversation.id, "ann", actor="ann", claim=True)
    dialer = make_dialer(center, calls)

    await steps(dialer)
    assert center.callback_names("CA1:callback") == [
        "Requested",
        "Dialing",
        "AttemptFailed",
        "Failed",
    ]
    last = center.callback_events("CA1:callback")[-1]
    assert isinstance(last, Callback.Failed)
    assert "21215" in last.reason


# --------------------------------------------------------------------------- business hours


async def test_outside_business_hours_it_waits_for_the_opening(
    center: Center, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    center.clock.now = datetime(2026, 3, 2, 17, 30, tzinfo=UTC)  # Monday, closed at 17:00
    conversation = center.call_and_ask_for_callback("CA1", ALICE)
    center.commands.assign(conversation.id, "ann", actor="ann", claim=True)
    dialer = make_dialer(center, calls, hours_for=lambda queue: OFFICE)

    await steps(dialer)
    events = center.callback_events("CA1:callback")
    assert [type(e).__name__ for e in events] == ["Requested", "DialScheduled"]
    scheduled = events[-1]
    assert isinstance(scheduled, Callback.DialScheduled)
    assert scheduled.not_before == "2026-03-03T09:00:00.000000Z"
    assert stub.created() == []

    center.clock.now = datetime(2026, 3, 3, 8, 59, 59, tzinfo=UTC)
    await steps(dialer)
    assert stub.created() == []
    center.clock.now = datetime(2026, 3, 3, 9, 0, tzinfo=UTC)
    await steps(dialer)
    assert len(stub.created()) == 1
    assert center.callback_names("CA1:callback")[-1] == "Completed"


async def test_a_retry_that_would_fall_after_closing_moves_to_the_opening(
    center: Center, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    center.clock.now = datetime(2026, 3, 6, 16, 59, tzinfo=UTC)  # Friday
    stub.script(ALICE, Outcome("busy"))
    conversation = center.call_and_ask_for_callback("CA1", ALICE)
    center.commands.assign(conversation.id, "ann", actor="ann", claim=True)
    dialer = make_dialer(center, calls, hours_for=lambda queue: OFFICE)

    await steps(dialer)
    [failed] = [
        e for e in center.callback_events("CA1:callback") if isinstance(e, Callback.AttemptFailed)
    ]
    assert isinstance(failed, Callback.AttemptFailed)
    assert failed.retry_at == "2026-03-09T09:00:00.000000Z"  # Monday's opening


# --------------------------------------------------------------------------- rate cap


async def test_callbacks_assigned_at_once_are_placed_no_faster_than_the_cap(
    center: Center, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    agents = ["ann", "bob", "cy"]
    for (sid, phone), agent in zip(
        [("CA1", ALICE), ("CA2", BOB), ("CA3", CAROL)], agents, strict=True
    ):
        conversation = center.call_and_ask_for_callback(sid, phone)
        center.commands.assign(conversation.id, agent, actor=agent, claim=True)
    dialer = make_dialer(center, calls, calls_per_second=0.5)  # one call every 2 s

    await steps(dialer)
    assert len(stub.created()) == 1  # however many rounds, the clock has not moved
    center.clock.advance(1.5)
    await steps(dialer)
    assert len(stub.created()) == 1
    center.clock.advance(0.5)
    await steps(dialer)
    assert len(stub.created()) == 2
    center.clock.advance(2)
    await steps(dialer)
    assert [c.to for c in stub.created()] == [ALICE, BOB, CAROL]  # oldest request first
    dialings = [
        e.at
        for sid in ("CA1", "CA2", "CA3")
        for e in center.callback_events(f"{sid}:callback")
        if isinstance(e, Callback.Dialing)
    ]
    assert dialings == [iso(T0), iso(T0 + timedelta(seconds=2)), iso(T0 + timedelta(seconds=4))]


# --------------------------------------------------------------------------- cancelling


async def test_a_second_request_for_the_same_number_and_queue_is_a_duplicate(
    center: Center, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    center.call_and_ask_for_callback("CA1", ALICE)
    dialer = make_dialer(center, calls)
    await steps(dialer)
    center.clock.advance(60)
    conversation = center.call_and_ask_for_callback("CA2", ALICE)
    other_queue = center.call_and_ask_for_callback("CA3", ALICE, queue="billing")
    await steps(dialer)

    second = center.callback_events("CA2:callback")
    assert [type(e).__name__ for e in second] == ["Requested", "Cancelled"]
    assert isinstance(second[-1], Callback.Cancelled)
    assert second[-1].reason == "duplicate"
    assert center.callback_names("CA3:callback") == ["Requested"]  # another queue: its own

    center.commands.assign(conversation.id, "ann", actor="ann", claim=True)
    await steps(dialer)
    assert other_queue.id == conversation.id
    # one conversation, callbacks in two queues: the older is dialled, and once the
    # customer has talked to the agent the other is not needed any more
    assert len(stub.created(ALICE)) == 1
    assert center.callback_names("CA1:callback")[-1] == "Completed"
    assert center.callback_names("CA3:callback") == ["Requested", "Cancelled"]


async def test_the_same_request_taken_in_twice_is_one_callback(
    center: Center, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    center.call_and_ask_for_callback("CA1", ALICE)
    dialer = make_dialer(center, calls)
    await steps(dialer)
    restarted = make_dialer(center, calls)
    await steps(restarted)
    assert center.callback_names("CA1:callback") == ["Requested"]


async def test_a_customer_who_got_through_first_is_not_called(
    center: Center, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    conversation = center.call_and_ask_for_callback("CA1", ALICE)
    dialer = make_dialer(center, calls)
    await steps(dialer)
    center.answered_elsewhere("CA2", ALICE)  # called again and an agent answered
    center.commands.assign(conversation.id, "ann", actor="ann", claim=True)
    await steps(dialer)

    events = center.callback_events("CA1:callback")
    assert [type(e).__name__ for e in events] == ["Requested", "Cancelled"]
    assert isinstance(events[-1], Callback.Cancelled)
    assert events[-1].reason == "customer got through"
    assert stub.created() == []


async def test_got_through_before_the_dialer_saw_the_request_and_resolved_conversations(
    center: Center, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    center.call_and_ask_for_callback("CA1", ALICE)
    center.answered_elsewhere("CA2", ALICE)
    resolved = center.call_and_ask_for_callback("CA3", BOB)
    center.commands.resolve(resolved.id, actor="ann")
    dialer = make_dialer(center, calls)
    await steps(dialer)
    assert center.callback_names("CA1:callback") == ["Requested", "Cancelled"]
    assert center.callback_names("CA3:callback") == ["Requested", "Cancelled"]
    assert stub.created() == []


async def test_an_agent_without_voice_to_gets_no_call(
    center: Center, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    conversation = center.call_and_ask_for_callback("CA1", ALICE)
    center.commands.assign(conversation.id, "dee", actor="dee", claim=True)
    dialer = make_dialer(center, calls)
    await steps(dialer)
    assert stub.created() == []
    center.commands.assign(conversation.id, "ann", actor="supervisor")
    await steps(dialer)
    assert len(stub.created()) == 1


# --------------------------------------------------------------------------- restarts


class Crash(Exception):
    """The dialer process dies here."""


class CrashingCalls:
    """Places the call (or not) and dies before the dialer can record it."""

    def __init__(self, real: TwilioRestCalls, *, place: bool) -> None:
        self.real = real
        self.place = place

    async def create_call(self, to: str, from_: str, twiml: str) -> str:
        if self.place:
            await self.real.create_call(to, from_, twiml)
        raise Crash

    async def update_call(self, sid: str, twiml: str) -> None:
        raise AssertionError("not used")

    async def fetch_call(self, sid: str) -> CallStatus:
        raise AssertionError("not used")

    async def list_calls(self, to: str, started_after: datetime) -> list[CallStatus]:
        raise AssertionError("not used")


@pytest.mark.parametrize("placed_before_the_crash", [True, False])
async def test_a_restart_between_dialing_and_dialed_neither_forgets_nor_doubles(
    center: Center,
    stub: TwilioRestStub,
    calls: TwilioRestCalls,
    placed_before_the_crash: bool,
) -> None:
    conversation = center.call_and_ask_for_callback("CA1", ALICE)
    center.commands.assign(conversation.id, "ann", actor="ann", claim=True)
    crashing = make_dialer(center, CrashingCalls(calls, place=placed_before_the_crash))
    with pytest.raises(Crash):
        await steps(crashing)
    assert center.callback_names("CA1:callback") == ["Requested", "Dialing"]
    assert len(stub.created()) == int(placed_before_the_crash)

    center.clock.advance(3)
    restarted = make_dialer(center, calls, reconcile_after=10)
    await steps(restarted)
    assert center.callback_names("CA1:callback") == ["Requested", "Dialing"]  # not yet
    center.clock.advance(7)
    await steps(restarted)

    [call] = stub.created()  # adopted, or placed once
    events = center.callback_events("CA1:callback")
    assert [type(e).__name__ for e in events] == ["Requested", "Dialing", "Dialed", "Completed"]
    dialed = events[2]
    assert isinstance(dialed, Callback.Dialed)
    assert dialed.call_sid == call.sid
    listed = stub.requests("GET", "Calls.json")
    assert len(listed) == 1
    assert listed[0].query["To"] == ALICE
    assert listed[0].query["StartTime>"] == "2026-03-02T00:00:00Z"


async def test_a_restart_while_the_call_rings_polls_it_to_the_end(
    center: Center, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    stub.script(ALICE, Outcome("no-answer", progress=("ringing",)))
    conversation = center.call_and_ask_for_callback("CA1", ALICE)
    center.commands.assign(conversation.id, "ann", actor="ann", claim=True)
    await steps(make_dialer(center, calls), 2)
    assert center.callback_names("CA1:callback")[-1] == "Dialed"

    restarted = make_dialer(center, calls)
    await steps(restarted, 2)
    assert center.callback_names("CA1:callback")[-1] == "AttemptFailed"
    assert len(stub.created()) == 1


async def test_wrong_credentials_keep_the_callback_until_they_are_fixed(
    center: Center, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    conversation = center.call_and_ask_for_callback("CA1", ALICE)
    center.commands.assign(conversation.id, "ann", actor="ann", claim=True)
    wrong = TwilioRestCalls(ACCOUNT, "not-the-token", stub.url)
    try:
        await steps(make_dialer(center, wrong))
    finally:
        await wrong.close()
    assert stub.refused_auth == 1
    assert stub.created() == []
    assert center.callback_names("CA1:callback") == ["Requested", "Dialing"]  # not failed

    stub.refused_auth = 0  # seen; the fixture checks no other request was refused
    center.clock.advance(30)
    await steps(make_dialer(center, calls))
    assert len(stub.created()) == 1
    assert center.callback_names("CA1:callback")[-1] == "Completed"
