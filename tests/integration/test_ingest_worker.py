"""Contact events through the real broker into the real event store (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import orjson
from aiokafka import AIOKafkaConsumer

from inbox.domain import ids
from inbox.domain.customer import Customer
from infra.kafka import make_consumer
from infra.store import EventStore
from tests.conftest import TopicFactory
from tests.support import (
    contact_event,
    make_topics,
    produce,
    running_worker,
    wait_until,
    worker_config,
)


def customer_of(store: EventStore, key: str) -> Any:
    claim = store.get(ids.claim_id(key))
    return None if claim is None else store.get(UUID(claim.customer_id))


def conversation_events(store: EventStore, conversation_id: str) -> list[str]:
    return [type(e).__name__ for e in store.events_of(UUID(conversation_id))]


async def read_all(bootstrap: str, topic: str, count: int) -> list[Any]:
    consumer: AIOKafkaConsumer = make_consumer(bootstrap, None, topic)
    records: list[Any] = []
    async with consumer:
        while len(records) < count:
            batch = await consumer.getmany(timeout_ms=5000)
            if not batch:
                break
            for rs in batch.values():
                records.extend(rs)
    return records


async def test_one_customer_one_conversation_across_channels(
    kafka_bootstrap: str, fresh_topic: TopicFactory, store: EventStore
) -> None:
    topic = fresh_topic("contact-events")
    await make_topics(kafka_bootstrap, topic)
    phone = {"phone": "+14155550123", "name": "Sheena Nelson"}
    events = [
        contact_event("SM1", channel="sms", customer=phone, payload={"text": "order 4412?"}),
        contact_event("wamid.1", channel="whatsapp", customer=phone, seconds=60),
        contact_event(
            "CA1",
            channel="voice",
            type="call.started",
            customer=phone,
            seconds=120,
            payload={"call_sid": "CA1", "to": "+15005550006"},
        ),
        # An email that also gives the phone joins the same customer.
        contact_event(
            "<m1@example.org>",
            channel="email",
            seconds=180,
            customer={"email": "Sheena@Example.org", "phone": "+14155550123"},
            payload={"text": "see attached", "subject": "Order 4412"},
        ),
    ]
    await produce(kafka_bootstrap, topic, events)
    async with running_worker(worker_config(kafka_bootstrap, topic), store):
        await wait_until(lambda: store.ingest.count_contact_events() == 4, what="4 stored")
    customer = customer_of(store, "phone:+14155550123")
    assert customer is not None
    assert customer.name == "Sheena Nelson"
    assert sorted(customer.identities) == ["email:sheena@example.org", "phone:+14155550123"]
    assert len(customer.conversations) == 1
    assert customer_of(store, "email:sheena@example.org").id == customer.id
    # Every link records why: the email came in one contact event with the known phone (or,
    # when the email's partition was read first, both registered the customer together).
    history = store.events_of(customer.id)
    added = [e for e in history if isinstance(e, Customer.IdentityAdded)]
    if added:
        assert [(e.identity, e.reason) for e in added] == [
            (
                "email:sheena@example.org",
                "came with phone:+14155550123 in contact event <m1@example.org>",
            )
        ]
    else:
        registered = history[0]
        assert isinstance(registered, Customer.Registered)
        assert sorted(registered.identities) == ["email:sheena@example.org", "phone:+14155550123"]
    # The email is keyed by the address, so it may land on another partition and be taken in
    # before or after the phone's events: Kafka orders records per key, not across keys.
    assert sorted(conversation_events(store, customer.conversations[0])) == [
        "ActivityRecorded",
        "MessageReceived",
        "MessageReceived",
        "MessageReceived",
        "Opened",
    ]
    source = store.ingest.contact_event_source("CA1")
    assert source is not None
    assert (source.topic, source.offset >= 0) == (topic, True)


async def test_same_message_twice_is_one_message(
    kafka_bootstrap: str, fresh_topic: TopicFactory, store: EventStore
) -> None:
    topic = fresh_topic("contact-events")
    await make_topics(kafka_bootstrap, topic, partitions=1)
    first = contact_event("SMdup", payload={"text": "once"})
    await produce(kafka_bootstrap, topic, [first, first])
    config = worker_config(kafka_bootstrap, topic)
    async with running_worker(config, store) as worker:
        await wait_until(lambda: sum(worker.positions.values()) == 2, what="both records read")
    # A source retrying much later, under a new offset, after a restart (empty cache).
    await produce(kafka_bootstrap, topic, [first])
    async with running_worker(config, store) as worker:
        await wait_until(lambda: sum(worker.positions.values()) == 3, what="the retry read")
    customer = customer_of(store, "phone:+14155550123")
    assert conversation_events(store, customer.conversations[0]) == ["Opened", "MessageReceived"]
    assert store.ingest.count_contact_events() == 1


async def test_invalid_records_go_to_the_dead_letter_topic_and_the_worker_goes_on(
    kafka_bootstrap: str, fresh_topic: TopicFactory, store: EventStore
) -> None:
    topic = fresh_topic("contact-events")
    await make_topics(kafka_bootstrap, topic, partitions=1)
    good = contact_event("good-1")
    bad_schema = {**contact_event("bad-schema"), "schema": "contact-event/9"}
    no_identity = {**contact_event("no-identity"), "customer": {"name": "nobody"}}
    bad_time = {**contact_event("bad-time"), "occurred_at": "yesterday"}
    huge = contact_event("huge", payload={"text": "hi", "n": 2**64})  # valid JSON
    records: list[bytes] = [
        b"{not json",
        orjson.dumps(bad_schema),
        orjson.dumps(no_identity),
        orjson.dumps(bad_time),
        json.dumps(huge).encode(),  # (orjson itself refuses it: the store's JSON cannot hold it)
        orjson.dumps(good),
    ]
    await produce(kafka_bootstrap, topic, records)
    async with running_worker(worker_config(kafka_bootstrap, topic), store):
        await wait_until(lambda: store.ingest.count_contact_events() == 1, what="the good one")
    letters = await read_all(kafka_bootstrap, f"{topic}.dlq", 5)
    reasons = [orjson.loads(r.value)["reason"] for r in letters]
    assert len(reasons) == 5
    assert reasons[0].startswith("not JSON")
    assert "unknown schema" in reasons[1]
    assert "no identity" in reasons[2]
    assert "occurred_at" in reasons[3]
    assert reasons[4] == "payload cannot be stored: Integer exceeds 64-bit range"
    first = orjson.loads(letters[0].value)
    assert first["value"] == {"text": "{not json", "size": 9, "truncated": False}
    assert first["source"] == {"topic": topic, "partition": 0, "offset": 0}
    assert dict(letters[0].headers)["reason"].decode().startswith("not JSON")


async def test_oversized_record_is_dead_lettered(
    kafka_bootstrap: str, fresh_topic: TopicFactory, store: EventStore
) -> None:
    topic = fresh_topic("contact-events")
    await make_topics(kafka_bootstrap, topic, partitions=1)
    huge = contact_event("huge", payload={"text": "x" * (1024 * 1024 + 10)})
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        await producer.send_and_wait(topic, orjson.dumps(huge), key=b"phone:+14155550123")
        await producer.send_and_wait(topic, orjson.dumps(contact_event("after")), key=b"k")
    finally:
        await producer.stop()
    async with running_worker(worker_config(kafka_bootstrap, topic), store):
        await wait_until(lambda: store.ingest.count_contact_events() == 1, what="the next one")
    letters = await read_all(kafka_bootstrap, f"{topic}.dlq", 1)
    letter = orjson.loads(letters[0].value)
    assert "over the 1 MiB limit" in letter["reason"]
    assert letter["value"]["truncated"] is True
    assert letter["value"]["size"] > 1024 * 1024
    assert len(letter["value"]["text"]) == 64 * 1024


async def test_restart_resumes_from_the_stored_position(
    kafka_bootstrap: str, fresh_topic: TopicFactory, store: EventStore
) -> None:
    topic = fresh_topic("contact-events")
    await make_topics(kafka_bootstrap, topic, partitions=3)
    customers = [{"phone": f"+1415555{n:04d}"} for n in range(30)]
    batch1 = [contact_event(f"a{n}", customer=customers[n % 30], seconds=n) for n in range(90)]
    batch2 = [
        contact_event(f"b{n}", customer=customers[n % 30], seconds=100 + n) for n in range(60)
    ]
    config = worker_config(kafka_bootstrap, topic)
    await produce(kafka_bootstrap, topic, batch1)
    async with running_worker(config, store):
        await wait_until(lambda: store.ingest.count_contact_events() == 90, what="first 90")
    await produce(kafka_bootstrap, topic, batch2)
    async with running_worker(config, store):
        await wait_until(lambda: store.ingest.count_contact_events() == 150, what="all 150")
    messages = 0
    for c in customers:
        customer = customer_of(store, f"phone:{c['phone']}")
        assert len(customer.conversations) == 1
        events = conversation_events(store, customer.conversations[0])
        assert events[0] == "Opened"
        messages += events.count("MessageReceived")
    assert messages == 150
