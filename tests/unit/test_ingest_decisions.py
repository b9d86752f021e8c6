"""Ingest decisions (inbox/ingest.py) against an in-memory event store: who a contact event
is from, which conversation it joins, and what happens to duplicates, old positions and
write conflicts."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.domain import CanMutateAggregate
from eventsourcing.persistence import (
    DatetimeAsISO,
    IntegrityError,
    JSONTranscoder,
    Mapper,
    Notification,
    StoredEvent,
    Tracking,
    UUIDAsHex,
)

from inbox.contact import ContactEvent, parse_contact_event
from inbox.domain import ids
from inbox.domain.conversation import OPEN, RESOLVED, Conversation
from inbox.domain.customer import Customer, IdentityClaim
from inbox.domain.time import iso
from inbox.ingest import REOPEN_WINDOW, BatchOutcome, Ingestor
from inbox.ports import ContactEventSource, EventStorePort

DomainEvent = CanMutateAggregate[UUID]

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
PHONE = "+14155550123"
TOPIC = "contact-events"


class InMemoryEventStore:
    """EventStorePort in memory. Events go through a JSON mapper and back, as in the real
    store, and a `record` either takes effect whole or raises IntegrityError, as a
    transaction would."""

    def __init__(self) -> None:
        transcoder = JSONTranscoder()
        transcoder.register(UUIDAsHex())
        transcoder.register(DatetimeAsISO())
        self.mapper: Mapper[UUID] = Mapper(transcoder=transcoder)
        self.log: list[Notification] = []
        self.by_aggregate: dict[UUID, list[StoredEvent]] = {}
        self.positions: dict[str, int] = {}
        self.contact_events: dict[str, ContactEventSource] = {}
        self.record_calls = 0
        # Test hooks: run before the next record's checks (a concurrent writer), or refuse.
        self.before_next_record: Callable[[], object] | None = None
        self.refuse_records = 0

    # -- reads -------------------------------------------------------------------------

    def get(self, aggregate_id: UUID) -> Any:
        aggregate: Any = None
        for event in self.events_of(aggregate_id):
            aggregate = event.mutate(aggregate)
        return aggregate

    def events_of(self, aggregate_id: UUID) -> list[DomainEvent]:
        return [
            self.mapper.to_domain_event(stored)  # type: ignore[misc]
            for stored in self.by_aggregate.get(aggregate_id, [])
        ]

    def notifications(
        self, after: int, limit: int, *, topics: Sequence[str] = ()
    ) -> Sequence[Notification]:
        return [n for n in self.log if n.id > after and (not topics or n.topic in topics)][:limit]

    def max_notification_id(self) -> int:
        return len(self.log)

    def position(self, name: str) -> int | None:
        return self.positions.get(name)

    def seen_event_ids(self, event_ids: Sequence[str]) -> set[str]:
        return {event_id for event_id in event_ids if event_id in self.contact_events}

    def existing_ids(self, aggregate_ids: Sequence[UUID]) -> set[UUID]:
        return {i for i in aggregate_ids if i in self.by_aggregate}

    # -- writes ------------------------------------------------------------------------

    def record(
        self,
        events: Iterable[DomainEvent],
        *,
        trackings: Sequence[Tracking] = (),
        contact_events: Sequence[Any] = (),
        aggregates: Iterable[Any] = (),  # (no snapshots here)
    ) -> Sequence[int]:
        self.record_calls += 1
        hook, self.before_next_record = self.before_next_record, None
        if hook is not None:
            hook()
        if self.refuse_records:
            self.refuse_records -= 1
            raise IntegrityError("refused by the test")
        stored = [self.mapper.to_stored_event(event) for event in events]
        # Check everything first: nothing is written unless all of it can be.
        versions = {i: len(events) for i, events in self.by_aggregate.items()}
        for event in stored:
            originator = UUID(str(event.originator_id))
            current = versions.get(originator, 0)
            if event.originator_version <= current:
                raise IntegrityError(f"{originator} v{event.originator_version} exists")
            assert event.originator_version == current + 1, "a gap in an aggregate's versions"
            versions[originator] = event.originator_version
        for tracking in trackings:
            done = self.positions.get(tracking.application_name)
            if done is not None and done >= tracking.notification_id:
                raise IntegrityError(f"{tracking} is not after {done}")
        event_ids = [source.event_id for source in contact_events]
        if len(set(event_ids)) < len(event_ids) or self.seen_event_ids(event_ids):
            raise IntegrityError("contact event already taken in")
        # Write.
        notification_ids: list[int] = []
        for event in stored:
            originator = UUID(str(event.originator_id))
            self.by_aggregate.setdefault(originator, []).append(event)
            notification = Notification(
                originator_id=originator,
                originator_version=event.originator_version,
                topic=event.topic,
                state=event.state,
                id=len(self.log) + 1,
            )
            self.log.append(notification)
            notification_ids.append(notification.id)
        for tracking in trackings:
            self.positions[tracking.application_name] = tracking.notification_id
        for source in contact_events:
            self.contact_events[source.event_id] = source
        return notification_ids

    def save(self, *aggregates: Any) -> Sequence[int]:
        events: list[DomainEvent] = []
        for aggregate in aggregates:
            events.extend(aggregate.collect_events())
        return self.record(events)

    # -- for assertions ----------------------------------------------------------------

    def topics(self, after: int = 0) -> list[str]:
        """The event classes recorded after a notification id, by name."""
        return [n.topic.rsplit(":", 1)[1] for n in self.log if n.id > after]

    def all_of(self, kind: type[Any]) -> list[Any]:
        return [
            aggregate
            for aggregate in (self.get(i) for i in self.by_aggregate)
            if isinstance(aggregate, kind)
        ]


_port_check: EventStorePort = InMemoryEventStore()


@dataclass(frozen=True)
class Source:
    event_id: str
    topic: str
    partition: int
    offset: int


def contact(
    event_id: str,
    *,
    channel: str = "sms",
    type: str = "message.received",
    customer: dict[str, Any] | None = None,
    at: datetime = T0,
    payload: dict[str, Any] | None = None,
) -> ContactEvent:
    """A contact event as an adapter would send it, through the real gate."""
    record = {
        "schema": "contact-event/1",
        "event_id": event_id,
        "occurred_at": at.isoformat(),
        "channel": channel,
        "type": type,
        "customer": customer if customer is not None else {"phone": PHONE},
        "payload": payload if payload is not None else {"text": f"message {event_id}"},
    }
    return parse_contact_event(json.dumps(record).encode(), now=at)


class Worker:
    """One ingest worker reading partition 0 of the topic."""

    def __init__(self, store: InMemoryEventStore, partition: int = 0) -> None:
        self.store = store
        self.ingestor = Ingestor(store)
        self.partition = partition
        self.offset = 0

    def ingest(self, *events: ContactEvent) -> BatchOutcome:
        batch: list[tuple[ContactEvent, ContactEventSource]] = [
            (event, Source(event.event_id, TOPIC, self.partition, self.offset + n))
            for n, event in enumerate(events)
        ]
        self.offset += len(events)
        return self.ingestor.apply_batch(batch, self.tracking())

    def tracking(self) -> Tracking:
        return Tracking(f"{TOPIC}:{self.partition}", self.offset)


@pytest.fixture
def store() -> InMemoryEventStore:
    return InMemoryEventStore()


@pytest.fixture
def worker(store: InMemoryEventStore) -> Worker:
    return Worker(store)


def owner_of(store: InMemoryEventStore, key: str) -> Customer:
    claim = store.get(ids.claim_id(key))
    assert isinstance(claim, IdentityClaim)
    customer = store.get(UUID(claim.customer_id))
    assert isinstance(customer, Customer)
    return customer


def conversation(store: InMemoryEventStore, conversation_id: str | None) -> Conversation:
    assert conversation_id is not None
    found = store.get(UUID(conversation_id))
    assert isinstance(found, Conversation)
    return found


def messages(store: InMemoryEventStore, conversation_id: str | None) -> list[Any]:
    assert conversation_id is not None
    return [
        e
        for e in store.events_of(UUID(conversation_id))
        if isinstance(e, Conversation.MessageReceived)
    ]


def resolve(store: InMemoryEventStore, conversation_id: str | None, at: datetime) -> None:
    """An agent resolves the conversation (through the API, another writer)."""
    found = conversation(store, conversation_id)
    found.resolve(actor="ann", at=iso(at))
    store.save(found)


# --------------------------------------------------------------------------- customers


def test_a_first_contact_registers_the_customer_and_opens_a_conversation(
    store: InMemoryEventStore, worker: Worker
) -> None:
    outcome = worker.ingest(contact("sms-1"))

    assert outcome == BatchOutcome(
        stored=1, duplicates=0, domain_events=5, notification_ids=[1, 2, 3, 4, 5]
    )
    # In trigger order per aggregate, aggregates in the order the decision first used them.
    assert store.topics() == [
        "Customer.Registered",
        "Customer.ConversationStarted",
        "IdentityClaim.Claimed",
        "Conversation.Opened",
        "Conversation.MessageReceived",
    ]
    customer = owner_of(store, f"phone:{PHONE}")
    assert customer.id == ids.customer_id(f"phone:{PHONE}")
    assert customer.identities == [f"phone:{PHONE}"]
    current = conversation(store, customer.current_conversation_id)
    assert current.id == ids.conversation_id(customer.id, "sms-1")
    assert current.status == OPEN
    assert current.customer_id == str(customer.id)
    assert store.position(f"{TOPIC}:0") == 1
    assert set(store.contact_events) == {"sms-1"}


@pytest.mark.parametrize("same_batch", [False, True], ids=["two-batches", "one-batch"])
def test_sms_then_whatsapp_from_the_same_phone_is_one_customer_and_one_conversation(
    store: InMemoryEventStore, worker: Worker, same_batch: bool
) -> None:
    sms = contact("sms-1", customer={"phone": "+1 415 555 0123"})
    whatsapp = contact(
        "wa-1",
        channel="whatsapp",
        customer={
            "phone": "whatsapp:14155550123",
            "social": {"network": "whatsapp", "id": "14155550123"},
            "name": "Sheena Nelson",
        },
        at=T0 + timedelta(minutes=5),
    )
    if same_batch:
        worker.ingest(sms, whatsapp)
    else:
        worker.ingest(sms)
        worker.ingest(whatsapp)

    (customer,) = store.all_of(Customer)
    assert customer.identities == [f"phone:{PHONE}", "whatsapp:14155550123"]
    assert customer.name == "Sheena Nelson"
    assert owner_of(store, "whatsapp:14155550123").id == customer.id
    assert len(store.all_of(Conversation)) == 1
    assert customer.conversations == [customer.current_conversation_id]
    received = messages(store, customer.current_conversation_id)
    assert [(m.channel, m.source_event_id) for m in received] == [
        ("sms", "sms-1"),
        ("whatsapp", "wa-1"),
    ]


def test_an_email_then_an_sms_carrying_email_and_phone_joins_them(
    store: InMemoryEventStore, worker: Worker
) -> None:
    worker.ingest(contact("mail-1", channel="email", customer={"email": "Alice@Example.com"}))
    mark = store.max_notification_id()

    worker.ingest(
        contact(
            "sms-1",
            customer={"phone": PHONE, "email": "alice@example.com"},
            at=T0 + timedelta(hours=1),
        )
    )

    assert store.topics(after=mark) == [
        "Customer.IdentityAdded",
        "IdentityClaim.Claimed",
        "Conversation.MessageReceived",
    ]
    (customer,) = store.all_of(Customer)
    assert customer.id == ids.customer_id("email:alice@example.com")
    assert customer.identities == ["email:alice@example.com", f"phone:{PHONE}"]
    assert owner_of(store, f"phone:{PHONE}").id == customer.id
    assert len(store.all_of(Conversation)) == 1
    assert [m.channel for m in messages(store, customer.current_conversation_id)] == [
        "email",
        "sms",
    ]


def test_an_identity_owned_by_another_customer_is_not_stolen(
    store: InMemoryEventStore, worker: Worker
) -> None:
    worker.ingest(contact("alice-1", customer={"phone": PHONE, "email": "alice@example.com"}))
    worker.ingest(contact("bob-1", channel="email", customer={"email": "bob@example.com"}))
    alice = owner_of(store, "email:alice@example.com")
    bob = owner_of(store, "email:bob@example.com")
    assert alice.id != bob.id
    mark = store.max_notification_id()

    # Bob's email arrives carrying Alice's phone number.
    worker.ingest(
        contact(
            "bob-2",
            channel="email",
            customer={"email": "bob@example.com", "phone": PHONE},
            at=T0 + timedelta(minutes=1),
        )
    )

    assert store.topics(after=mark) == ["Conversation.MessageReceived"]
    assert owner_of(store, f"phone:{PHONE}").id == alice.id
    assert store.get(bob.id).identities == ["email:bob@example.com"]
    assert store.get(alice.id).identities == [f"phone:{PHONE}", "email:alice@example.com"]
    assert [m.source_event_id for m in messages(store, bob.current_conversation_id)] == [
        "bob-1",
        "bob-2",
    ]


def test_the_channels_own_identity_decides_between_two_owners(
    store: InMemoryEventStore, worker: Worker
) -> None:
    worker.ingest(contact("alice-1", customer={"phone": PHONE}))
    worker.ingest(contact("bob-1", channel="email", customer={"email": "bob@example.com"}))
    # An SMS is keyed by its phone first: it belongs to the phone's owner.
    worker.ingest(contact("sms-2", customer={"phone": PHONE, "email": "bob@example.com"}))
    alice = owner_of(store, f"phone:{PHONE}")
    assert [m.source_event_id for m in messages(store, alice.current_conversation_id)] == [
        "alice-1",
        "sms-2",
    ]
    assert owner_of(store, "email:bob@example.com").id != alice.id


def _merge_phone_into_email(store: InMemoryEventStore, worker: Worker) -> Customer:
    """Alice wrote by email, then by SMS (two customers); an agent merges them."""
    worker.ingest(contact("mail-1", channel="email", customer={"email": "alice@example.com"}))
    worker.ingest(contact("sms-1", customer={"phone": PHONE}))
    alice = owner_of(store, "email:alice@example.com")
    phone = owner_of(store, f"phone:{PHONE}")
    claim = store.get(ids.claim_id(f"phone:{PHONE}"))
    alice.absorb(phone, actor="sup", at=iso(T0))
    claim.reassign(str(alice.id), reason="merge", actor="sup", at=iso(T0))
    store.save(alice, phone, claim)
    return alice


def test_after_a_merge_the_absorbed_identity_writes_to_the_survivor(
    store: InMemoryEventStore, worker: Worker
) -> None:
    alice = _merge_phone_into_email(store, worker)
    restarted = Worker(store)
    restarted.offset = worker.offset

    restarted.ingest(contact("sms-2", at=T0 + timedelta(minutes=3)))

    survivor = store.get(alice.id)
    assert [m.source_event_id for m in messages(store, survivor.current_conversation_id)] == [
        "mail-1",
        "sms-2",
    ]
    assert len(store.all_of(Conversation)) == 2


def test_after_a_merge_a_running_worker_writes_to_the_survivor(
    store: InMemoryEventStore, worker: Worker
) -> None:
    alice = _merge_phone_into_email(store, worker)

    worker.ingest(contact("sms-2", at=T0 + timedelta(minutes=3)))

    survivor = store.get(alice.id)
    assert [m.source_event_id for m in messages(store, survivor.current_conversation_id)] == [
        "mail-1",
        "sms-2",
    ]


# --------------------------------------------------------------------------- duplicates


def test_a_duplicate_event_id_in_the_same_batch_changes_nothing(
    store: InMemoryEventStore, worker: Worker
) -> None:
    first = contact("sms-1")
    outcome = worker.ingest(first, contact("sms-1", payload={"text": "resent"}), first)
    assert (outcome.stored, outcome.duplicates, outcome.domain_events) == (1, 2, 5)
    customer = owner_of(store, f"phone:{PHONE}")
    assert [m.text for m in messages(store, customer.current_conversation_id)] == ["message sms-1"]


def test_a_duplicate_event_id_in_a_later_batch_changes_nothing(
    store: InMemoryEventStore, worker: Worker
) -> None:
    worker.ingest(contact("sms-1"))
    mark = store.max_notification_id()

    outcome = worker.ingest(contact("sms-1", at=T0 + timedelta(minutes=1)))

    assert outcome == BatchOutcome(stored=0, duplicates=1, domain_events=0, notification_ids=[])
    assert store.max_notification_id() == mark
    # The position still moves on, so the record is not read again.
    assert store.position(f"{TOPIC}:0") == 2


def test_a_duplicate_next_to_a_new_event_only_the_new_one_counts(
    store: InMemoryEventStore, worker: Worker
) -> None:
    worker.ingest(contact("sms-1"))
    outcome = worker.ingest(contact("sms-1"), contact("sms-2", at=T0 + timedelta(minutes=1)))
    assert (outcome.stored, outcome.duplicates, outcome.domain_events) == (1, 1, 1)
    assert set(store.contact_events) == {"sms-1", "sms-2"}


# --------------------------------------------------------------------------- reopen window


def _resolved_conversation(store: InMemoryEventStore, worker: Worker) -> tuple[UUID, str]:
    worker.ingest(contact("sms-1"))
    customer = owner_of(store, f"phone:{PHONE}")
    resolve(store, customer.current_conversation_id, T0 + timedelta(hours=1))
    assert customer.current_conversation_id is not None
    return customer.id, customer.current_conversation_id


@pytest.mark.parametrize("after", [timedelta(minutes=1), timedelta(days=6), REOPEN_WINDOW], ids=str)
def test_a_message_within_seven_days_of_resolution_reopens(
    store: InMemoryEventStore, worker: Worker, after: timedelta
) -> None:
    customer_id, old = _resolved_conversation(store, worker)
    mark = store.max_notification_id()

    worker.ingest(contact("sms-2", at=T0 + timedelta(hours=1) + after))

    assert store.topics(after=mark) == ["Conversation.Reopened", "Conversation.MessageReceived"]
    assert store.get(customer_id).current_conversation_id == old
    assert conversation(store, old).status == OPEN
    assert conversation(store, old).reopen_count == 1


@pytest.mark.parametrize(
    "after", [REOPEN_WINDOW + timedelta(seconds=1), timedelta(days=30)], ids=str
)
def test_a_message_more_than_seven_days_after_resolution_opens_a_new_conversation(
    store: InMemoryEventStore, worker: Worker, after: timedelta
) -> None:
    customer_id, old = _resolved_conversation(store, worker)
    mark = store.max_notification_id()

    worker.ingest(contact("sms-2", at=T0 + timedelta(hours=1) + after))

    assert store.topics(after=mark) == [
        "Customer.ConversationStarted",
        "Conversation.Opened",
        "Conversation.MessageReceived",
    ]
    customer = store.get(customer_id)
    new = customer.current_conversation_id
    assert customer.conversations == [old, new]
    assert new == str(ids.conversation_id(customer_id, "sms-2"))
    (opened,) = [e for e in store.events_of(UUID(new)) if isinstance(e, Conversation.Opened)]
    assert opened.previous == old
    assert opened.source_event_id == "sms-2"
    assert conversation(store, new).status == OPEN
    assert conversation(store, old).status == RESOLVED
    assert [m.source_event_id for m in messages(store, new)] == ["sms-2"]


@pytest.mark.parametrize(
    ("kind", "channel", "payload", "recorded"),
    [
        (
            "delivery.status",
            "sms",
            {"message_id": "out-1", "status": "delivered"},
            "Conversation.DeliveryStatusRecorded",
        ),
        ("csat.submitted", "chat", {"score": 2}, "Conversation.CsatSubmitted"),
    ],
)
@pytest.mark.parametrize("after", [timedelta(days=1), timedelta(days=30)], ids=str)
def test_a_follow_up_after_resolution_opens_nothing(
    store: InMemoryEventStore,
    worker: Worker,
    kind: str,
    channel: str,
    payload: dict[str, Any],
    recorded: str,
    after: timedelta,
) -> None:
    customer_id, old = _resolved_conversation(store, worker)
    mark = store.max_notification_id()

    worker.ingest(contact("f-1", type=kind, channel=channel, payload=payload, at=T0 + after))

    assert store.topics(after=mark) == [recorded]
    assert store.get(customer_id).conversations == [old]
    assert conversation(store, old).status == RESOLVED


def test_an_automatic_message_within_seven_days_leaves_the_conversation_resolved(
    store: InMemoryEventStore, worker: Worker
) -> None:
    _, old = _resolved_conversation(store, worker)
    mark = store.max_notification_id()
    worker.ingest(
        contact(
            "auto-1",
            channel="email",
            customer={"phone": PHONE},
            payload={"text": "Out of office", "auto_submitted": True},
            at=T0 + timedelta(days=2),
        )
    )
    assert store.topics(after=mark) == ["Conversation.MessageReceived"]
    assert conversation(store, old).status == RESOLVED


def test_an_automatic_message_after_seven_days_opens_no_conversation(
    store: InMemoryEventStore, worker: Worker
) -> None:
    customer_id, old = _resolved_conversation(store, worker)
    worker.ingest(
        contact(
            "auto-1",
            payload={"text": "Out of office", "auto_submitted": True},
            at=T0 + timedelta(days=30),
        )
    )
    assert store.get(customer_id).conversations == [old]


# --------------------------------------------------------------------------- positions


def test_a_batch_whose_position_is_already_recorded_is_skipped(
    store: InMemoryEventStore,
) -> None:
    first, second = Worker(store), Worker(store)
    batch = (contact("sms-1"), contact("sms-2", at=T0 + timedelta(minutes=1)))
    first.ingest(*batch)
    mark = store.max_notification_id()
    calls = store.record_calls

    # After a rebalance, another worker is handed the same records again.
    outcome = second.ingest(*batch)

    assert outcome == BatchOutcome(0, 0, 0, (), skipped=True)
    assert store.max_notification_id() == mark
    assert store.record_calls == calls


def test_a_batch_behind_the_recorded_position_is_skipped(store: InMemoryEventStore) -> None:
    ahead = Worker(store)
    ahead.ingest(contact("sms-1"), contact("sms-2"), contact("sms-3"))
    behind = Worker(store)
    assert behind.ingest(contact("sms-1")).skipped


def test_a_position_recorded_by_another_worker_meanwhile_skips_the_batch(
    store: InMemoryEventStore,
) -> None:
    first, second = Worker(store), Worker(store)
    batch = (contact("sms-1"),)
    # The other worker records the same records between our position check and our write.
    store.before_next_record = lambda: second.ingest(*batch)

    outcome = first.ingest(*batch)

    assert outcome.skipped
    assert store.record_calls == 2  # ours refused; the other worker's
    assert len(store.all_of(Customer)) == 1
    assert len(messages(store, owner_of(store, f"phone:{PHONE}").current_conversation_id)) == 1


def test_positions_are_per_partition(store: InMemoryEventStore) -> None:
    p0, p1 = Worker(store, partition=0), Worker(store, partition=1)
    p0.ingest(contact("sms-1"))
    outcome = p1.ingest(contact("mail-1", channel="email", customer={"email": "a@example.com"}))
    assert not outcome.skipped
    assert store.positions == {f"{TOPIC}:0": 1, f"{TOPIC}:1": 1}


def test_a_poll_of_several_partitions_is_one_write_with_each_position(
    store: InMemoryEventStore,
) -> None:
    p0, p1 = Worker(store, partition=0), Worker(store, partition=1)
    sms = contact("sms-1")
    mail = contact("mail-1", channel="email", customer={"email": "a@example.com"})
    calls = store.record_calls

    outcome = p0.ingestor.apply_poll(
        [
            (Tracking(f"{TOPIC}:0", 1), [(sms, Source(sms.event_id, TOPIC, 0, 0))]),
            (Tracking(f"{TOPIC}:1", 1), [(mail, Source(mail.event_id, TOPIC, 1, 0))]),
        ]
    )

    assert (outcome.stored, outcome.duplicates, outcome.skipped) == (2, 0, False)
    assert store.record_calls == calls + 1
    assert store.positions == {f"{TOPIC}:0": 1, f"{TOPIC}:1": 1}
    assert len(store.all_of(Customer)) == 2
    assert p1.store.seen_event_ids(["sms-1", "mail-1"]) == {"sms-1", "mail-1"}


def test_a_poll_leaves_out_the_partitions_another_worker_already_recorded(
    store: InMemoryEventStore,
) -> None:
    other = Worker(store, partition=0)
    sms = contact("sms-1")
    other.ingest(sms)  # partition 0 up to offset 1, by the worker that had it before
    mail = contact("mail-1", channel="email", customer={"email": "a@example.com"})

    outcome = Ingestor(store).apply_poll(
        [
            (Tracking(f"{TOPIC}:0", 1), [(sms, Source(sms.event_id, TOPIC, 0, 0))]),
            (Tracking(f"{TOPIC}:1", 1), [(mail, Source(mail.event_id, TOPIC, 1, 0))]),
        ]
    )

    assert (outcome.stored, outcome.duplicates, outcome.skipped) == (1, 0, False)
    assert store.positions == {f"{TOPIC}:0": 1, f"{TOPIC}:1": 1}
    assert len(messages(store, owner_of(store, f"phone:{PHONE}").current_conversation_id)) == 1


# --------------------------------------------------------------------------- conflicts


def test_a_write_conflict_is_retried_from_fresh_state(store: InMemoryEventStore) -> None:
    worker, other = Worker(store), Worker(store, partition=1)
    worker.ingest(contact("sms-1"))  # the worker now holds the conversation in its cache
    customer = owner_of(store, f"phone:{PHONE}")
    calls = store.record_calls
    # Another worker writes to the same conversation while our batch is being decided.
    store.before_next_record = lambda: other.ingest(
        contact("wa-1", channel="whatsapp", at=T0 + timedelta(minutes=1))
    )

    outcome = worker.ingest(contact("sms-2", at=T0 + timedelta(minutes=2)))

    assert outcome.stored == 1
    assert not outcome.skipped
    assert store.record_calls == calls + 3  # ours refused, the other's, ours again
    assert [m.source_event_id for m in messages(store, customer.current_conversation_id)] == [
        "sms-1",
        "wa-1",
        "sms-2",
    ]
    versions = [
        e.originator_version for e in store.events_of(UUID(customer.current_conversation_id or ""))
    ]
    assert versions == [1, 2, 3, 4]
    # The cache holds the fresh state: the next batch lands on the first attempt.
    calls = store.record_calls
    worker.ingest(contact("sms-3", at=T0 + timedelta(minutes=3)))
    assert store.record_calls == calls + 1


def test_an_agent_command_between_batches_is_a_conflict_the_worker_recovers_from(
    store: InMemoryEventStore, worker: Worker
) -> None:
    worker.ingest(contact("sms-1"))
    customer = owner_of(store, f"phone:{PHONE}")
    found = conversation(store, customer.current_conversation_id)
    found.assign("ann", actor="sup", at=iso(T0))
    store.save(found)
    calls = store.record_calls

    worker.ingest(contact("sms-2", at=T0 + timedelta(minutes=1)))

    assert store.record_calls == calls + 2
    assert conversation(store, customer.current_conversation_id).assignee == "ann"
    assert len(messages(store, customer.current_conversation_id)) == 2


def test_a_refused_first_write_is_retried_and_lands_once(
    store: InMemoryEventStore, worker: Worker
) -> None:
    store.refuse_records = 1
    outcome = worker.ingest(contact("sms-1"))
    assert outcome.stored == 1
    assert store.record_calls == 2
    assert len(store.all_of(Customer)) == 1
    assert store.topics().count("Conversation.MessageReceived") == 1


def test_the_worker_gives_up_after_repeated_conflicts(
    store: InMemoryEventStore, worker: Worker
) -> None:
    store.refuse_records = 5
    with pytest.raises(IntegrityError, match="5 write conflicts in a row"):
        worker.ingest(contact("sms-1"))
    assert store.log == []
    assert store.position(f"{TOPIC}:0") is None
    # Nothing half-applied stays in the cache: the same batch lands afterwards.
    worker.offset = 0
    assert worker.ingest(contact("sms-1")).stored == 1
    assert len(store.all_of(Customer)) == 1
