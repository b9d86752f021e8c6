"""The call connector against a real SQLite event store, the stand-in for Twilio's Calls API
and the embedded Kafka broker: a queued call whose conversation an agent takes is redirected
to the agent and announced once as `call.answered` on the contact-events topic."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import orjson
import pytest
from eventsourcing.persistence import Tracking

from adapters.kafka import KafkaPublisher
from inbox.commands import Commands
from inbox.contact import ContactEvent, CustomerRef, parse_contact_event, validate
from inbox.domain import ids
from inbox.domain.conversation import Conversation
from inbox.ingest import Ingestor
from infra.kafka import ensure_topics, make_consumer
from infra.store import ContactEventRow, EventStore, open_event_store
from ivr.connector import CallConnector
from ivr.twilio_rest import TwilioRestCalls
from tests.conftest import SettingsFactory, TopicFactory
from tests.twilio_rest_stub import FakeClock, StubCall, TwilioRestStub

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
ALICE, BOB = "+14155550101", "+14155550102"
OUR_NUMBER = "+18005550100"
VOICE_TO = {"ann": "client:ann", "bob": "+14155550999"}


class Center:
    def __init__(self, store: EventStore, clock: FakeClock) -> None:
        self.store = store
        self.clock = clock
        self.commands = Commands(store, clock=clock)
        self.ingestor = Ingestor(store)
        self.offset = 0

    def take_in(self, event: ContactEvent) -> None:
        row = ContactEventRow(event.event_id, "contact-events", 0, self.offset)
        self.offset += 1
        self.ingestor.apply_batch([(event, row)], Tracking("contact-events:0", self.offset))

    def contact(self, event_id: str, type: str, phone: str, **payload: Any) -> Conversation:
        raw = ContactEvent(
            event_id=event_id,
            occurred_at=self.clock.now,
            channel="voice",
            type=type,  # type: ignore[arg-type]
            customer=CustomerRef(phone=phone),
            payload=payload,
        )
        self.take_in(validate(raw, now=self.clock.now + timedelta(days=1)))
        claim = self.store.get(ids.claim_id(f"phone:{phone}"))
        customer = self.store.get(UUID(claim.customer_id))
        conversation = self.store.get(UUID(customer.current_conversation_id))
        assert isinstance(conversation, Conversation)
        return conversation

    def queued_call(self, call_sid: str, phone: str, queue: str = "support") -> Conversation:
        self.contact(f"{call_sid}:started", "call.started", phone, call_sid=call_sid, to=OUR_NUMBER)
        return self.contact(
            f"{call_sid}:queued",
            "call.queued",
            phone,
            call_sid=call_sid,
            queue=queue,
            priority=0,
            skill=None,
            language="en",
        )


class InMemoryPublisher:
    def __init__(self) -> None:
        self.events: list[ContactEvent] = []

    async def publish(self, event: ContactEvent) -> None:
        self.events.append(event)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def center(settings: SettingsFactory, clock: FakeClock) -> Iterator[Center]:
    store = open_event_store(settings(bootstrap=None))
    try:
        yield Center(store, clock)
    finally:
        store.close()


def inbound(stub: TwilioRestStub, phone: str) -> StubCall:
    return stub.add_call(OUR_NUMBER, phone, status="in-progress")


async def consume_until(bootstrap: str, topic: str, last_event_id: str) -> list[Any]:
    """Every record of the topic up to the one with `last_event_id`, as (key, event)."""
    consumer = make_consumer(bootstrap, None, topic)
    await consumer.start()
    records: list[tuple[str, dict[str, Any]]] = []
    try:
        async with asyncio.timeout(30):
            while not records or records[-1][1]["event_id"] != last_event_id:
                batches = await consumer.getmany(timeout_ms=200)
                for batch in batches.values():
                    records.extend((r.key.decode(), orjson.loads(r.value)) for r in batch)
    finally:
        await consumer.stop()
    return records


async def test_an_assigned_queued_call_is_put_through_and_answered_once(
    center: Center,
    stub: TwilioRestStub,
    calls: TwilioRestCalls,
    kafka_bootstrap: str,
    fresh_topic: TopicFactory,
) -> None:
    topic = fresh_topic("contact-events")
    await ensure_topics(kafka_bootstrap, {topic: 1})
    publisher = KafkaPublisher(kafka_bootstrap, idempotence=False, topic=topic)
    try:
        call = inbound(stub, ALICE)
        conversation = center.queued_call(call.sid, ALICE)
        connector = CallConnector(
            center.store,
            calls=calls,
            publisher=publisher,
            agent_voice_to=VOICE_TO.get,
            clock=center.clock,
        )
        assert await connector.step() == 0  # queued, nobody has it yet
        assert call.updates == []

        center.clock.advance(42)
        center.commands.assign(conversation.id, "ann", actor="ann", claim=True)
        assert await connector.step() == 2  # put through, announced
        [twiml] = call.updates
        assert twiml.endswith("<Response><Dial><Client>ann</Client></Dial></Response>")

        # a reassignment before the call.answered is back in the log changes nothing
        center.commands.assign(conversation.id, "bob", actor="supervisor")
        assert await connector.step() == 0
        # nor does a restart before the ingest stored it (it waits, then sees it)
        restarted = CallConnector(
            center.store,
            calls=calls,
            publisher=publisher,
            agent_voice_to=VOICE_TO.get,
            clock=center.clock,
            settle_after=5,
        )
        assert await restarted.step() == 0

        await publisher.publish(sentinel(center.clock.now))
        records = await consume_until(kafka_bootstrap, topic, "sentinel")
        answered = [(key, e) for key, e in records if e["type"] == "call.answered"]
        assert len(answered) == 1
        key, event = answered[0]
        assert key == f"phone:{ALICE}"
        assert event["event_id"] == f"{call.sid}:answered"
        assert event["channel"] == "voice"
        assert event["customer"] == {"phone": ALICE}
        assert event["payload"] == {
            "call_sid": call.sid,
            "queue": "support",
            "agent": "ann",
            "queue_seconds": 42.0,
        }
        # the ingest takes it in (as the worker would) ...
        center.take_in(parse_contact_event(orjson.dumps(event), now=center.clock.now))
        assert center.store.get(conversation.id).waiting_since is None
        center.clock.advance(5)
        assert await restarted.step() == 0
        for again in (connector, restarted):
            assert await again.step() == 0
        assert len(call.updates) == 1  # ... and nobody redirects the call again
    finally:
        await publisher.close()


def sentinel(at: datetime) -> ContactEvent:
    return ContactEvent(
        event_id="sentinel",
        occurred_at=at,
        channel="sms",
        type="message.received",
        customer=CustomerRef(phone=BOB),
        payload={"text": "end of test"},
    )


async def test_calls_no_longer_waiting_are_left_alone(
    center: Center, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    publisher = InMemoryPublisher()
    connector = CallConnector(
        center.store,
        calls=calls,
        publisher=publisher,
        agent_voice_to=VOICE_TO.get,
        clock=center.clock,
    )
    # hung up while queued
    gone = inbound(stub, ALICE)
    first = center.queued_call(gone.sid, ALICE)
    center.contact(
        f"{gone.sid}:abandoned", "call.abandoned", ALICE, call_sid=gone.sid, queue="support"
    )
    center.commands.assign(first.id, "ann", actor="ann", claim=True)
    # asked for a callback instead (the dialer's)
    asked = inbound(stub, BOB)
    second = center.queued_call(asked.sid, BOB)
    center.contact(
        f"{asked.sid}:callback",
        "callback.requested",
        BOB,
        call_sid=asked.sid,
        queue="support",
        number=BOB,
    )
    center.commands.assign(second.id, "bob", actor="bob", claim=True)

    assert await connector.step() == 0
    assert gone.updates == []
    assert asked.updates == []
    assert publisher.events == []


async def test_an_agent_without_voice_or_a_call_twilio_has_ended_gets_nothing(
    center: Center, stub: TwilioRestStub, calls: TwilioRestCalls
) -> None:
    publisher = InMemoryPublisher()
    connector = CallConnector(
        center.store,
        calls=calls,
        publisher=publisher,
        agent_voice_to=VOICE_TO.get,
        clock=center.clock,
    )
    call = inbound(stub, ALICE)
    conversation = center.queued_call(call.sid, ALICE)
    center.commands.assign(conversation.id, "dee", actor="dee", claim=True)  # no voice_to
    assert await connector.step() == 0
    assert call.updates == []

    unknown = center.queued_call("CA" + "f" * 32, BOB)  # Twilio answers 404 for it
    center.commands.assign(unknown.id, "bob", actor="bob", claim=True)
    assert await connector.step() == 0
    assert publisher.events == []
