"""Outbound delivery against the real ingest path, the real broker, SQLite and PostgreSQL.

Customers write in through contact events on Kafka, taken in by the real ingest worker; agents
reply through `Commands.reply`; the `DeliveryService` sends through the senders below, which
stand in for the outside services (an SMTP relay, Twilio, Meta) and record what they were
given; the `delivery.status` events go back through Kafka and the worker into the conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID

import orjson
import pytest
from eventsourcing.persistence import Tracking

from adapters.kafka import KafkaPublisher
from adapters.outbound import (
    ChannelSender,
    OutboundMessage,
    PermanentFailure,
    SendResult,
    TemporaryFailure,
)
from inbox.commands import Commands
from inbox.contact import parse_contact_event
from inbox.delivery import (
    FAILED,
    HELD,
    PENDING,
    SENT,
    DeliveryService,
    OutboxEntry,
    RoundResult,
    ensure_outbox_tables,
    outbox_position,
    outbox_status,
)
from inbox.domain import ids
from inbox.domain.conversation import Conversation
from inbox.domain.time import iso
from inbox.ingest import Ingestor
from inbox.worker import IngestWorker
from infra.broker import free_port
from infra.store import ContactEventRow, EventStore
from projections.db import ReadModelDB
from tests.conftest import TopicFactory
from tests.support import (
    contact_event,
    make_topics,
    produce,
    running_worker,
    wait_until,
    worker_config,
)

AGENT = "agent:ann"
# Inbound messages an hour ago: contact events must not lie in the future.
EARLIER = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
ALL_CHANNELS = frozenset({"email", "sms", "whatsapp", "chat", "messenger", "instagram"})


class FakeClock:
    """The delivery process's clock, moved by the test, so backoff is checked without
    waiting (and without timing assertions)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


# -- stand-ins for the outside services ------------------------------------------------------


@dataclass
class RecordingSender:
    """Accepts everything and remembers it, like a relay that queued the message."""

    channels: frozenset[str] = ALL_CHANNELS
    sent: list[OutboundMessage] = field(default_factory=list)
    slow_first: bool = False  # the first message takes a while, as a slow service would

    async def send(self, message: OutboundMessage) -> SendResult:
        if self.slow_first and not self.sent:
            self.slow_first = False
            await asyncio.sleep(0.3)
        self.sent.append(message)
        return SendResult(provider_id=f"P-{len(self.sent)}")


@dataclass
class FlakySender:
    """Busy for the first `failures` attempts (a 503 from the service), then accepts."""

    failures: int
    channels: frozenset[str] = ALL_CHANNELS
    attempts: list[OutboundMessage] = field(default_factory=list)

    async def send(self, message: OutboundMessage) -> SendResult:
        self.attempts.append(message)
        if len(self.attempts) <= self.failures:
            raise TemporaryFailure(f"503 service unavailable (attempt {len(self.attempts)})")
        return SendResult(provider_id="SM-ok")


@dataclass
class RefusingSender:
    """Refuses for good, like Twilio's 21211 (invalid 'To' number)."""

    channels: frozenset[str] = ALL_CHANNELS
    attempts: list[OutboundMessage] = field(default_factory=list)

    async def send(self, message: OutboundMessage) -> SendResult:
        self.attempts.append(message)
        raise PermanentFailure("21211 invalid 'To' phone number")


@dataclass
class StuckSender:
    """Takes the message and never answers: the process is stopped while it waits."""

    channels: frozenset[str] = ALL_CHANNELS
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, message: OutboundMessage) -> SendResult:
        self.started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


# -- the world of one test ---------------------------------------------------------------------


@dataclass
class World:
    store: EventStore
    db: ReadModelDB
    worker: IngestWorker
    publisher: KafkaPublisher
    bootstrap: str
    topic: str
    clock: FakeClock = field(default_factory=FakeClock)

    def service(
        self,
        senders: Mapping[str, ChannelSender],
        *,
        publisher: KafkaPublisher | None = None,
        **options: Any,
    ) -> DeliveryService:
        return DeliveryService(
            self.store,
            self.db,
            senders,
            publisher or self.publisher,
            clock=self.clock,
            **options,
        )

    async def take_in(self, *events: dict[str, Any]) -> None:
        before = await asyncio.to_thread(self.store.ingest.count_contact_events)
        await produce(self.bootstrap, self.topic, events)
        await wait_until(
            lambda: self.store.ingest.count_contact_events() >= before + len(events),
            what=f"{len(events)} contact events stored",
        )

    def conversation_of(self, key: str) -> UUID:
        claim = self.store.get(ids.claim_id(key))
        customer = self.store.get(UUID(claim.customer_id))
        return UUID(customer.current_conversation_id)

    def reply(self, conversation_id: UUID, text: str, channel: str | None = None) -> str:
        _, message_id = Commands(self.store).reply(
            conversation_id, text, channel=channel, actor=AGENT
        )
        return message_id

    def statuses(self, conversation_id: UUID) -> list[Conversation.DeliveryStatusRecorded]:
        return [
            e
            for e in self.store.events_of(conversation_id)
            if isinstance(e, Conversation.DeliveryStatusRecorded)
        ]

    def status(self, message_id: str) -> OutboxEntry:
        entry = outbox_status(self.db, message_id)
        assert entry is not None, f"no outbox row for {message_id}"
        return entry

    def records_read(self) -> int:
        return sum(self.worker.positions.values())


@pytest.fixture
async def world(
    kafka_bootstrap: str, fresh_topic: TopicFactory, store: EventStore, db: ReadModelDB
) -> AsyncIterator[World]:
    topic = fresh_topic("contact-events")
    # One partition: the worker takes records in the order they were produced.
    await make_topics(kafka_bootstrap, topic, partitions=1)
    publisher = KafkaPublisher(kafka_bootstrap, idempotence=False, topic=topic)
    try:
        async with running_worker(worker_config(kafka_bootstrap, topic), store) as worker:
            yield World(store, db, worker, publisher, kafka_bootstrap, topic)
    finally:
        await publisher.close()


def sms(event_id: str, phone: str = "+14155550123", text: str = "hello") -> dict[str, Any]:
    return contact_event(
        event_id, channel="sms", customer={"phone": phone}, payload={"text": text}, at=EARLIER
    )


# -- the tests ---------------------------------------------------------------------------------


async def test_an_email_reply_is_sent_once_threaded_and_its_status_joins_the_conversation(
    world: World,
) -> None:
    first = contact_event(
        "<m1@example.org>",
        channel="email",
        customer={"email": "Ann.Lee@Example.org", "name": "Ann Lee"},
        payload={
            "text": "Where is order 4412?",
            "subject": "Order 4412",
            "message_id": "<m1@example.org>",
        },
        at=EARLIER,
    )
    second = contact_event(
        "<m2@example.org>",
        channel="email",
        customer={"email": "ann.lee@example.org"},
        payload={
            "text": "Any news?",
            "subject": "Re: Order 4412",
            "message_id": "<m2@example.org>",
            "via": "support@example.com",
        },
        at=EARLIER,
        seconds=60,
    )
    second["thread"] = {"in_reply_to": ["<m1@example.org>"]}
    await world.take_in(first, second)
    conversation = world.conversation_of("email:ann.lee@example.org")
    message_id = world.reply(conversation, "It ships today.")

    relay = RecordingSender()
    service = world.service({"email": relay})
    assert await service.run_once() == RoundResult(queued=1, attempted=1, held=0, reported=1)

    assert relay.sent == [
        OutboundMessage(
            message_id=message_id,
            conversation_id=str(conversation),
            channel="email",
            text="It ships today.",
            to="ann.lee@example.org",
            customer_name="Ann Lee",
            subject="Re: Order 4412",
            in_reply_to="<m2@example.org>",
            references=("<m2@example.org>", "<m1@example.org>"),
            last_inbound_at=iso(EARLIER + timedelta(seconds=60)),
            via="support@example.com",
            attempt=1,
        )
    ]
    entry = world.status(message_id)
    assert (entry.status, entry.attempts, entry.provider_id, entry.reported) == (
        SENT,
        1,
        "P-1",
        True,
    )
    assert entry.recipient == "email:ann.lee@example.org"

    recorded = await wait_until(
        lambda: world.statuses(conversation), what="the delivery status in the conversation"
    )
    assert [(s.message_id, s.status, s.error, s.channel, s.source_event_id) for s in recorded] == [
        (message_id, "sent", None, "email", f"delivery:{message_id}:sent")
    ]

    # A new instance on the same database: nothing to take in, send or report again.
    again = world.service({"email": relay})
    assert await again.run_once() == RoundResult(queued=0, attempted=0, held=0, reported=0)
    assert len(relay.sent) == 1

    # Stopped between Kafka's acknowledgement and marking the row: the status is published
    # again, under the same event id, and the conversation still records it once.
    with world.db.transaction() as tx:
        tx.execute("UPDATE outbox SET reported=0 WHERE message_id=?", (message_id,))
    read = world.records_read()
    assert (await again.run_once()).reported == 1
    await wait_until(lambda: world.records_read() > read, what="the republished status read")
    assert len(world.statuses(conversation)) == 1
    assert len(relay.sent) == 1


async def test_each_channel_gets_the_customers_address_and_replies_go_in_order(
    world: World,
) -> None:
    customer = {
        "visitor": "v-77",
        "phone": "+1 (415) 555-0199",
        "email": "bo@example.org",
        "social": {"network": "messenger", "id": "PSID-9"},
    }
    chat = contact_event(
        "chat-1", channel="chat", customer=customer, payload={"text": "hi"}, at=EARLIER
    )
    whatsapp = contact_event(
        "wamid.1",
        channel="whatsapp",
        customer={"phone": "+14155550199"},
        payload={"text": "also here", "via": "+15005550006"},
        at=EARLIER,
        seconds=30,
    )
    await world.take_in(chat, whatsapp)
    conversation = world.conversation_of("visitor:v-77")
    order = ["chat", "sms", "whatsapp", "messenger", "email", "instagram"]
    sent_ids = {channel: world.reply(conversation, f"via {channel}", channel) for channel in order}

    # Sent all at once, the first (slow) one would arrive last.
    sender = RecordingSender(slow_first=True)
    service = world.service(dict.fromkeys(ALL_CHANNELS, sender))
    result = await service.run_once()
    # Replies of one conversation go one after another, in the order they were queued.
    assert result == RoundResult(queued=6, attempted=5, held=1, reported=5)

    by_channel = {m.channel: m for m in sender.sent}
    assert [m.channel for m in sender.sent] == order[:-1]
    assert {c: m.to for c, m in by_channel.items()} == {
        "chat": "v-77",
        "sms": "+14155550199",
        "whatsapp": "+14155550199",
        "messenger": "PSID-9",
        "email": "bo@example.org",
    }
    assert by_channel["whatsapp"].last_inbound_at == iso(EARLIER + timedelta(seconds=30))
    assert by_channel["chat"].last_inbound_at == iso(EARLIER)
    assert by_channel["whatsapp"].via == "+15005550006"  # the Twilio number they wrote to
    assert (by_channel["sms"].last_inbound_at, by_channel["sms"].via) == (None, None)
    # No email came in on this conversation: nothing to thread with.
    assert (by_channel["email"].subject, by_channel["email"].references) == (None, ())
    assert all(m.message_id == sent_ids[m.channel] for m in sender.sent)

    held = world.status(sent_ids["instagram"])
    assert (held.status, held.last_error) == (HELD, "the customer has no Instagram id")
    recorded = await wait_until(
        lambda: len(world.statuses(conversation)) == 5 and world.statuses(conversation),
        what="five delivery statuses",
    )
    assert sorted(s.channel for s in recorded) == sorted(order[:-1])


async def test_temporary_failures_are_retried_with_exponential_backoff(world: World) -> None:
    await world.take_in(sms("SM-flaky"))
    conversation = world.conversation_of("phone:+14155550123")
    message_id = world.reply(conversation, "Your refund is on its way.")
    twilio = FlakySender(failures=2)
    service = world.service({"sms": twilio}, retry_base=60)

    assert (await service.run_once()).attempted == 1
    entry = world.status(message_id)
    assert (entry.status, entry.attempts) == (PENDING, 1)
    assert entry.last_error == "503 service unavailable (attempt 1)"
    assert entry.next_attempt_at == iso(world.clock() + timedelta(seconds=60))

    assert (await service.run_once()).attempted == 0  # not due yet
    world.clock.advance(60)
    assert (await service.run_once()).attempted == 1
    entry = world.status(message_id)
    assert (entry.status, entry.attempts) == (PENDING, 2)
    assert entry.next_attempt_at == iso(world.clock() + timedelta(seconds=120))

    world.clock.advance(119)
    assert (await service.run_once()).attempted == 0
    world.clock.advance(1)
    assert await service.run_once() == RoundResult(queued=0, attempted=1, held=0, reported=1)

    assert [(m.message_id, m.attempt) for m in twilio.attempts] == [
        (message_id, 1),
        (message_id, 2),
        (message_id, 3),
    ]
    entry = world.status(message_id)
    assert (entry.status, entry.attempts, entry.provider_id, entry.last_error) == (
        SENT,
        3,
        "SM-ok",
        None,
    )
    recorded = await wait_until(lambda: world.statuses(conversation), what="the status")
    assert [(s.message_id, s.status) for s in recorded] == [(message_id, "sent")]


async def test_a_reply_fails_after_max_attempts(world: World) -> None:
    await world.take_in(sms("SM-busy"))
    conversation = world.conversation_of("phone:+14155550123")
    message_id = world.reply(conversation, "Call us back?")
    twilio = FlakySender(failures=100)
    service = world.service({"sms": twilio}, retry_base=10, max_attempts=3)

    for attempt in range(1, 4):
        assert (await service.run_once()).attempted == 1
        world.clock.advance(service.backoff(attempt))
    world.clock.advance(3600)
    assert (await service.run_once()).attempted == 0
    assert len(twilio.attempts) == 3
    entry = world.status(message_id)
    assert (entry.status, entry.attempts) == (FAILED, 3)
    error = "503 service unavailable (attempt 3) (gave up after 3 attempts)"
    assert entry.last_error == error
    recorded = await wait_until(lambda: world.statuses(conversation), what="the failed status")
    assert [(s.message_id, s.status, s.error, s.source_event_id) for s in recorded] == [
        (message_id, "failed", error, f"delivery:{message_id}:failed")
    ]


async def test_a_permanent_failure_fails_at_once_with_the_reason(world: World) -> None:
    await world.take_in(sms("SM-bad"))
    conversation = world.conversation_of("phone:+14155550123")
    message_id = world.reply(conversation, "Hello?")
    twilio = RefusingSender()
    service = world.service({"sms": twilio})

    assert await service.run_once() == RoundResult(queued=1, attempted=1, held=0, reported=1)
    world.clock.advance(3600)
    assert (await service.run_once()).attempted == 0
    assert len(twilio.attempts) == 1
    entry = world.status(message_id)
    assert (entry.status, entry.attempts, entry.last_error) == (
        FAILED,
        1,
        "21211 invalid 'To' phone number",
    )
    recorded = await wait_until(lambda: world.statuses(conversation), what="the failed status")
    assert [(s.status, s.error) for s in recorded] == [
        ("failed", "21211 invalid 'To' phone number")
    ]


async def test_replies_without_a_sender_or_an_address_are_held_without_an_event(
    world: World,
) -> None:
    await world.take_in(sms("SM-held"))
    conversation = world.conversation_of("phone:+14155550123")
    no_sender = world.reply(conversation, "Via SMS, but nobody sends SMS.")
    no_address = world.reply(conversation, "Via email, but no address.", "email")
    no_relay = world.reply(conversation, "Via WhatsApp.", "whatsapp")
    relay = RecordingSender()
    service = world.service(
        {"email": relay},
        hold_reasons={"whatsapp": "WhatsApp is not configured (META_ACCESS_TOKEN unset)"},
    )

    assert await service.run_once() == RoundResult(queued=3, attempted=0, held=3, reported=0)
    assert relay.sent == []
    reasons = {
        m: (world.status(m).status, world.status(m).last_error)
        for m in (no_sender, no_address, no_relay)
    }
    assert reasons == {
        no_sender: (HELD, "no sender is configured for sms: the reply is kept undelivered"),
        no_address: (HELD, "the customer has no email address"),
        no_relay: (HELD, "WhatsApp is not configured (META_ACCESS_TOKEN unset)"),
    }
    world.clock.advance(86_000)
    assert await service.run_once() == RoundResult(queued=0, attempted=0, held=0, reported=0)

    # Held replies published nothing: the one status the conversation gets, after a reply
    # that is sent, is that reply's (one partition, so it is read after anything earlier).
    later = world.reply(conversation, "Now through SMS.")
    twilio = RecordingSender()
    assert (await world.service({"sms": twilio}).run_once()).reported == 1
    recorded = await wait_until(lambda: world.statuses(conversation), what="the sent status")
    assert [(s.message_id, s.status) for s in recorded] == [(later, "sent")]
    assert [m.message_id for m in twilio.sent] == [later]


async def test_after_the_store_is_restored_from_an_older_backup_new_replies_are_sent(
    world: World, other_store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The read-model database (and its outbox) kept, the event store restored from a
    backup that ends before the follower's position: the replies it records next get ids the
    follower had passed already, and must be sent all the same."""
    phones = ["+14155550201", "+14155550202"]
    await world.take_in(*(sms(f"SM-b{i}", phone) for i, phone in enumerate(phones)))
    for phone in phones:
        world.reply(world.conversation_of(f"phone:{phone}"), "before the restore")
    assert await asyncio.to_thread(world.service({}).follow_until_caught_up) == 2
    passed = outbox_position(world.db)
    restored = World(other_store, world.db, world.worker, world.publisher, "", world.topic)
    event = parse_contact_event(orjson.dumps(sms("SM-b9", "+14155550209")))
    Ingestor(other_store).apply_batch(
        [(event, ContactEventRow(event.event_id, world.topic, 0, 0))],
        Tracking(f"{world.topic}:0", 1),
    )
    assert other_store.max_notification_id() < passed

    follower = restored.service({})
    with caplog.at_level(logging.WARNING, logger="inbox.delivery"):
        assert await asyncio.to_thread(follower.follow_until_caught_up) == 0
    assert "event store ends at" in caplog.text
    after = restored.reply(restored.conversation_of("phone:+14155550209"), "after it")
    assert other_store.max_notification_id() <= passed  # ids the follower had passed before

    assert await asyncio.to_thread(follower.follow_until_caught_up) == 1
    assert restored.status(after).status == PENDING


async def test_a_restart_neither_loses_nor_duplicates_outbox_rows(world: World) -> None:
    phones = [f"+1415555010{i}" for i in range(5)]
    await world.take_in(*(sms(f"SM-r{i}", phone) for i, phone in enumerate(phones)))
    conversations = [world.conversation_of(f"phone:{phone}") for phone in phones]
    twilio = RecordingSender()

    first = world.service({"sms": twilio})
    replies = [world.reply(conversations[0], "one"), world.reply(conversations[1], "two")]
    assert await asyncio.to_thread(first.follow_until_caught_up) == 2

    # Restarted: a new instance on the same database takes in only what is new.
    replies.append(world.reply(conversations[2], "three"))
    second = world.service({"sms": twilio})
    assert (await second.run_once()).queued == 1
    # Two instances at once: each reply is taken in and sent by one of them.
    replies += [world.reply(conversations[3], "four"), world.reply(conversations[4], "five")]
    third = world.service({"sms": twilio})
    results = await asyncio.gather(second.run_once(), third.run_once())
    assert sum(r.queued for r in results) == 2
    for _ in range(3):
        await asyncio.gather(first.run_once(), second.run_once(), third.run_once())

    with world.db.read() as tx:
        rows = tx.execute("SELECT message_id, status FROM outbox ORDER BY seq").fetchall()
    assert rows == [(m, SENT) for m in replies]
    assert Counter(m.message_id for m in twilio.sent) == dict.fromkeys(replies, 1)
    for conversation, message_id in zip(conversations, replies, strict=True):
        recorded = await wait_until(partial(world.statuses, conversation), what="statuses")
        assert [s.message_id for s in recorded] == [message_id]


async def test_a_process_stopped_while_sending_sends_again_after_the_lease(world: World) -> None:
    await world.take_in(sms("SM-crash"))
    conversation = world.conversation_of("phone:+14155550123")
    message_id = world.reply(conversation, "Sent twice at worst.")
    stuck = StuckSender()
    crashed = world.service({"sms": stuck}, send_timeout=30, lease_margin=30)
    task = asyncio.create_task(crashed.run_once())
    await stuck.started.wait()
    task.cancel()  # the process dies while the service has the message
    with contextlib.suppress(asyncio.CancelledError):
        await task
    entry = world.status(message_id)
    assert (entry.status, entry.attempts) == (PENDING, 1)

    twilio = RecordingSender()
    restarted = world.service({"sms": twilio}, send_timeout=30, lease_margin=30)
    assert (await restarted.run_once()).attempted == 0  # still leased to the dead process
    world.clock.advance(60)
    assert (await restarted.run_once()).attempted == 1
    assert [(m.message_id, m.attempt) for m in twilio.sent] == [(message_id, 2)]
    assert world.status(message_id).status == SENT


async def test_a_status_kafka_did_not_take_is_published_later(world: World) -> None:
    await world.take_in(sms("SM-kafka-down"))
    conversation = world.conversation_of("phone:+14155550123")
    message_id = world.reply(conversation, "Kafka is down.")
    twilio = RecordingSender()
    # Nothing listens on that port: Kafka is unreachable.
    down = KafkaPublisher(
        f"127.0.0.1:{free_port()}", idempotence=False, topic=world.topic, timeout=2
    )
    try:
        service = world.service({"sms": twilio}, publisher=down)
        assert await service.run_once() == RoundResult(queued=1, attempted=1, held=0, reported=0)
        assert await service.run_once() == RoundResult(queued=0, attempted=0, held=0, reported=0)
    finally:
        await down.close()
    entry = world.status(message_id)
    assert (entry.status, entry.reported) == (SENT, False)
    assert world.statuses(conversation) == []

    assert (await world.service({"sms": twilio}).run_once()).reported == 1
    assert len(twilio.sent) == 1
    recorded = await wait_until(lambda: world.statuses(conversation), what="the late status")
    assert [(s.message_id, s.status) for s in recorded] == [(message_id, "sent")]


async def test_run_delivers_until_stopped(world: World) -> None:
    await world.take_in(sms("SM-run"))
    conversation = world.conversation_of("phone:+14155550123")
    twilio = RecordingSender()
    service = world.service({"sms": twilio}, poll_interval=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        message_id = await asyncio.to_thread(world.reply, conversation, "From the loop.")
        recorded = await wait_until(lambda: world.statuses(conversation), what="the status")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert [(s.message_id, s.status) for s in recorded] == [(message_id, "sent")]
    assert [m.message_id for m in twilio.sent] == [message_id]


def test_outbox_status_of_an_unknown_reply_is_none(db: ReadModelDB) -> None:
    assert outbox_status(db, "nope") is None  # before the delivery process ever ran
    ensure_outbox_tables(db)
    assert outbox_status(db, "nope") is None
