"""A connected callback is a call in the customer's timeline: the dialer places it through the
stand-in for Twilio's Calls API, the customer answers, and `call.answered` / `call.ended`
go through the contact-events topic, the real ingest worker and the timeline projection, like
an inbound call's. Publishing the same outcome again (a restarted dialer) adds nothing."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import Tracking

from adapters.kafka import KafkaPublisher
from inbox.commands import Commands
from inbox.contact import ContactEvent, CustomerRef, ThreadRef, validate
from inbox.domain import ids
from inbox.domain.business_hours import BusinessHours
from inbox.domain.callback import callback_id
from inbox.domain.conversation import Conversation
from inbox.domain.time import iso
from inbox.ingest import Ingestor
from infra.store import ContactEventRow, EventStore, open_event_store
from ivr.dialer import CallbackDialer
from ivr.twilio_rest import TwilioRestCalls
from projections.db import ReadModelDB, open_read_models
from projections.inbox_view import InboxView
from projections.runner import ProjectionRunner
from projections.timeline import Timeline, get_conversation
from tests.conftest import SettingsFactory, TopicFactory
from tests.support import make_topics, running_worker, wait_until, worker_config
from tests.twilio_rest_stub import FakeClock, Outcome, TwilioRestStub

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
CALLER_ID = "+15005550006"
ALICE = "+14155550101"
INBOUND_SID = "CA" + "a" * 32


class RecordingPublisher(KafkaPublisher):
    """Kafka's publisher, keeping what it sent (to send it again)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[ContactEvent] = []

    async def publish(self, event: ContactEvent) -> None:
        await super().publish(event)
        if "callback_id" in event.payload:  # the dialer's
            self.sent.append(event)


def voice(event_id: str, type: str, at: datetime, **payload: Any) -> ContactEvent:
    return ContactEvent(
        event_id=event_id,
        occurred_at=at,
        channel="voice",
        type=type,  # type: ignore[arg-type]
        customer=CustomerRef(phone=ALICE),
        thread=ThreadRef(ref=INBOUND_SID),
        payload={"call_sid": INBOUND_SID, **payload},
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def store(settings: SettingsFactory) -> Iterator[EventStore]:
    store = open_event_store(settings(bootstrap=None))
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def db(settings: SettingsFactory) -> Iterator[ReadModelDB]:
    db = open_read_models(settings(bootstrap=None))
    try:
        yield db
    finally:
        db.close()


def conversation_of(store: EventStore) -> Conversation:
    claim = store.get(ids.claim_id(f"phone:{ALICE}"))
    customer = store.get(UUID(claim.customer_id))
    conversation = store.get(UUID(customer.current_conversation_id))
    assert isinstance(conversation, Conversation)
    return conversation


def call_entries(db: ReadModelDB, store: EventStore, conversation_id: str) -> list[dict[str, Any]]:
    ProjectionRunner(store, db, [InboxView(), Timeline()]).run_until_caught_up()
    view = get_conversation(db, conversation_id)
    assert view is not None
    return [e for e in view["timeline"] if e["kind"] == "call"]


def activities(store: EventStore, conversation_id: str, activity: str) -> list[Any]:
    return [
        e
        for e in store.events_of(UUID(conversation_id))
        if isinstance(e, Conversation.ActivityRecorded) and e.activity == activity
    ]


async def test_a_connected_callback_is_answered_and_ended_in_the_timeline_once(
    kafka_bootstrap: str,
    fresh_topic: TopicFactory,
    store: EventStore,
    db: ReadModelDB,
    clock: FakeClock,
    stub: TwilioRestStub,
    calls: TwilioRestCalls,
) -> None:
    topic = fresh_topic("callback-calls")
    await make_topics(kafka_bootstrap, topic, partitions=1)
    publisher = RecordingPublisher(kafka_bootstrap, idempotence=False, topic=topic)
    stub.script(ALICE, Outcome("completed", answered_by="human", duration=95))
    try:
        async with running_worker(worker_config(kafka_bootstrap, topic), store):
            # Alice calls, waits in `support`, asks to be called back (through Kafka)
            for event in (
                voice(f"{INBOUND_SID}:started", "call.started", T0, to="+18005550100"),
                voice(f"{INBOUND_SID}:queued", "call.queued", T0, queue="support"),
                voice(
                    f"{INBOUND_SID}:callback",
                    "callback.requested",
                    T0 + timedelta(seconds=30),
                    queue="support",
                    number=ALICE,
                ),
            ):
                await publisher.publish(event)
            await wait_until(
                lambda: (
                    activities(store, str(conversation_of(store).id), "callback.requested")
                    if store.get(ids.claim_id(f"phone:{ALICE}"))
                    else None
                ),
                what="the callback request in the store",
            )
            conversation = conversation_of(store)
            cid = str(conversation.id)
            clock.advance(600)  # ten minutes after the call: Ann takes it
            Commands(store, clock=clock).assign(conversation.id, "ann", actor="ann", claim=True)

            def dialer() -> CallbackDialer:
                return CallbackDialer(
                    store,
                    calls=calls,
                    caller_id=CALLER_ID,
                    agent_voice_to={"ann": "client:ann"}.get,
                    hours_for=lambda queue: BusinessHours.always(),
                    clock=clock,
                    publisher=publisher,
                )

            first = dialer()
            await first.step()  # Dialing, the call, Dialed
            [placed] = stub.created(ALICE)
            clock.advance(100)  # rings, Alice answers, talks 95 s with Ann
            await first.step()  # polls: completed by a person -> Completed, published
            names = [
                type(e).__name__ for e in store.events_of(callback_id(f"{INBOUND_SID}:callback"))
            ]
            assert names[-1] == "Completed"

            ended = await wait_until(
                lambda: activities(store, cid, "call.ended"), what="the callback's call.ended"
            )
            [answered] = activities(store, cid, "call.answered")
            assert answered.source_event_id == f"{placed.sid}:answered"
            assert ended[0].source_event_id == f"{placed.sid}:ended"

            entries = call_entries(db, store, cid)
            [inbound_started, inbound_queued, callback_answered, callback_ended] = entries
            assert [e["data"]["call_sid"] for e in (inbound_started, inbound_queued)] == [
                INBOUND_SID
            ] * 2
            ended_at = T0 + timedelta(seconds=700)
            assert callback_answered["source_event_id"] == f"{placed.sid}:answered"
            assert callback_answered["at"] == iso(ended_at - timedelta(seconds=95))
            assert callback_ended["at"] == iso(ended_at)
            answered_data = callback_answered["data"]
            assert answered_data["call_sid"] == placed.sid
            assert answered_data["direction"] == "outbound"
            assert answered_data["callback_id"] == str(callback_id(f"{INBOUND_SID}:callback"))
            assert answered_data["requested_call_sid"] == INBOUND_SID
            assert (answered_data["queue"], answered_data["agent"]) == ("support", "ann")
            # asked at 10:00:30, answered at 10:10:05
            assert answered_data["queue_seconds"] == 575.0
            ended_data = callback_ended["data"]
            assert callback_ended["source_event_id"] == f"{placed.sid}:ended"
            assert ended_data["direction"] == "outbound"
            assert (ended_data["talk_seconds"], ended_data["duration_seconds"]) == (95, 95)
            assert (ended_data["hold_seconds"], ended_data["wrap_seconds"]) == (0, 0)
            assert (ended_data["agent"], ended_data["queue"]) == ("ann", "support")
            assert store.get(conversation.id).waiting_since is None

            # a dialer restarted now finds the call.ended in the log: nothing to publish
            restarted = dialer()
            assert await restarted.step() == 0
            # the same outcome published again (a publish retried after a lost ack, a
            # restart before the call.ended was stored) adds nothing
            again = list(publisher.sent)
            assert [e.type for e in again] == ["call.answered", "call.ended"]
            for event in again:
                await publisher.publish(event)
            await publisher.publish(voice("sentinel", "call.ended", clock.now, ended_in="ivr"))
            await wait_until(
                lambda: any(
                    e.source_event_id == "sentinel" for e in activities(store, cid, "call.ended")
                ),
                what="the sentinel in the store",
            )
            assert len(activities(store, cid, "call.answered")) == 1
            assert [e.source_event_id for e in activities(store, cid, "call.ended")] == [
                f"{placed.sid}:ended",
                "sentinel",
            ]
            assert call_entries(db, store, cid)[:4] == entries
    finally:
        await publisher.close()


class InMemoryPublisher:
    def __init__(self) -> None:
        self.events: list[ContactEvent] = []

    async def publish(self, event: ContactEvent) -> None:
        self.events.append(event)


async def test_a_machine_publishes_nothing_and_a_restart_publishes_what_was_not_stored(
    store: EventStore, clock: FakeClock, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    stub.script(ALICE, Outcome("completed", answered_by="machine_start"), Outcome(duration=42))
    ingestor = Ingestor(store)
    for n, event in enumerate(
        (
            voice(f"{INBOUND_SID}:started", "call.started", T0, to="+18005550100"),
            voice(f"{INBOUND_SID}:callback", "callback.requested", T0, queue="q", number=ALICE),
        )
    ):
        row = ContactEventRow(event.event_id, "contact-events", 0, n)
        ingestor.apply_batch([(validate(event, now=T0), row)], Tracking("contact-events:0", n + 1))
    conversation = conversation_of(store)
    Commands(store, clock=clock).assign(conversation.id, "ann", actor="ann", claim=True)
    publisher = InMemoryPublisher()

    def dialer(publisher: InMemoryPublisher) -> CallbackDialer:
        return CallbackDialer(
            store,
            calls=calls,
            caller_id=CALLER_ID,
            agent_voice_to={"ann": "client:ann"}.get,
            hours_for=lambda queue: BusinessHours.always(),
            clock=clock,
            backoff=(60,),
            publisher=publisher,
        )

    first = dialer(publisher)
    await first.step()
    await first.step()  # a machine: AttemptFailed, retried later, nothing published
    assert publisher.events == []
    clock.advance(61)
    await first.step()
    await first.step()  # a person: Completed and published
    assert [e.type for e in publisher.events] == ["call.answered", "call.ended"]
    # those were never stored (Kafka lost them, say): a restarted dialer publishes them again
    again = InMemoryPublisher()
    await dialer(again).step()
    assert again.events == publisher.events
