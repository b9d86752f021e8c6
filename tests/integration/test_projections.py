"""Projections against real SQLite and PostgreSQL: events go in through the real ingest path
(`Ingestor.apply_batch` with contact events) and agent commands on the real aggregates; the
runner and the rebuild read them back from the store's notification log."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import Notification, Tracking

from inbox.agents import queue_spec
from inbox.contact import ContactEvent, CustomerRef, validate
from inbox.domain import ids
from inbox.domain.conversation import Conversation
from inbox.domain.customer import Customer
from inbox.domain.queue import Queue
from inbox.domain.sla import SlaPolicy
from inbox.ingest import Ingestor
from infra.store import ContactEventRow, EventStore
from projections.base import Event, Projection
from projections.db import IntegrityError, ReadModelDB, Tx, open_read_models, replace_on_conflict
from projections.inbox_view import InboxView, QueryError, get_customer, list_conversations
from projections.replay import PROJECTIONS, rebuild
from projections.runner import Lead, ProjectionRunner
from projections.timeline import Timeline, get_conversation
from projections.tracking import (
    active_generation,
    ensure_state_table,
    generations,
    layout,
    positions,
)
from tests.conftest import SettingsFactory

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
AGENT = "agent:ann"


def contact(
    event_id: str,
    minute: float,
    *,
    channel: str = "email",
    type: str = "message.received",
    email: str | None = None,
    phone: str | None = None,
    name: str | None = None,
    payload: dict[str, Any] | None = None,
) -> ContactEvent:
    if payload is None and type == "message.received":
        payload = {"text": f"text of {event_id}"}
    raw = ContactEvent(
        event_id=event_id,
        occurred_at=T0 + timedelta(minutes=minute),
        channel=channel,  # type: ignore[arg-type]
        type=type,  # type: ignore[arg-type]
        customer=CustomerRef(email=email, phone=phone, name=name),
        payload=payload or {},
    )
    return validate(raw, now=T0 + timedelta(days=30))


@dataclass
class World:
    """The event store and read models of one test, and how events get into the store."""

    store: EventStore
    db: ReadModelDB
    ingestor: Ingestor
    offset: int = 0
    runners: list[ProjectionRunner] = field(default_factory=list)

    def ingest(self, *events: ContactEvent) -> None:
        batch = []
        for event in events:
            batch.append((event, ContactEventRow(event.event_id, "contact-events", 0, self.offset)))
            self.offset += 1
        self.ingestor.apply_batch(batch, Tracking("contact-events:0", self.offset))

    def conversation_of(self, identity_key: str) -> Conversation:
        claim = self.store.get(ids.claim_id(identity_key))
        customer = self.store.get(UUID(claim.customer_id))
        while customer.merged_into is not None:
            customer = self.store.get(UUID(customer.merged_into))
        conversation: Conversation = self.store.get(UUID(customer.current_conversation_id))
        return conversation

    def customer_of(self, identity_key: str) -> Customer:
        claim = self.store.get(ids.claim_id(identity_key))
        customer: Customer = self.store.get(UUID(claim.customer_id))
        return customer

    def runner(self) -> ProjectionRunner:
        runner = ProjectionRunner(self.store, self.db, [InboxView(), Timeline()])
        self.runners.append(runner)
        return runner

    def catch_up(self) -> None:
        ProjectionRunner(self.store, self.db, [InboxView(), Timeline()]).run_until_caught_up()

    def merge(self, survivor_key: str, other_key: str) -> None:
        survivor, other = self.customer_of(survivor_key), self.customer_of(other_key)
        survivor.absorb(other, actor=AGENT, at="2026-03-02T12:00:00.000000Z")
        claims = [self.store.get(ids.claim_id(key)) for key in other.identities]
        for claim in claims:
            claim.reassign(
                str(survivor.id), reason="merge", actor=AGENT, at="2026-03-02T12:00:00.000000Z"
            )
        self.store.save(survivor, other, *claims)

    def unmerge(self, survivor_key: str, other_id: UUID) -> None:
        survivor = self.customer_of(survivor_key)
        other = self.store.get(other_id)
        identities = survivor.undo_merge(other, actor=AGENT, at="2026-03-02T13:00:00.000000Z")
        claims = [self.store.get(ids.claim_id(key)) for key in identities]
        for claim in claims:
            claim.reassign(
                str(other.id), reason="unmerge", actor=AGENT, at="2026-03-02T13:00:00.000000Z"
            )
        self.store.save(survivor, other, *claims)


@pytest.fixture
def world(store: EventStore, db: ReadModelDB) -> World:
    return World(store, db, Ingestor(store))


def at(minute: float) -> str:
    return (T0 + timedelta(minutes=minute)).replace(tzinfo=None).isoformat(
        timespec="microseconds"
    ) + "Z"


def alice_story(w: World) -> Conversation:
    """Alice writes, calls through the IVR, gets an agent, a reply, a note, a resolution."""
    w.ingest(
        contact("m1", 0, email="alice@example.com", phone="+14155550123", name="Alice"),
        contact(
            "c1",
            5,
            channel="voice",
            type="call.started",
            phone="+14155550123",
            payload={"call_sid": "CA1", "to": "+14155550100"},
        ),
        contact(
            "c2",
            5.5,
            channel="voice",
            type="ivr.selected",
            phone="+14155550123",
            payload={"call_sid": "CA1", "node": "main", "choice": "2", "path": ["main"]},
        ),
        contact(
            "c3",
            6,
            channel="voice",
            type="call.queued",
            phone="+14155550123",
            payload={"call_sid": "CA1", "queue": "billing"},
        ),
    )
    conversation = w.conversation_of("email:alice@example.com")
    conversation.assign("ann", actor=AGENT, at=at(7))
    conversation.transfer("billing", actor=AGENT, at=at(7.5))
    conversation.queue_reply("r1", "email", "We are on it", actor=AGENT, at=at(8))
    conversation.add_note("asked for invoice", actor=AGENT, at=at(9))
    w.store.save(conversation)
    w.ingest(
        contact(
            "c4",
            10,
            channel="voice",
            type="call.answered",
            phone="+14155550123",
            payload={"call_sid": "CA1", "queue": "billing", "agent": "ann"},
        ),
        contact(
            "d1",
            11,
            type="delivery.status",
            email="alice@example.com",
            payload={"message_id": "r1", "status": "delivered"},
        ),
    )
    conversation = w.conversation_of("email:alice@example.com")
    conversation.resolve(actor=AGENT, at=at(12))
    w.store.save(conversation)
    w.ingest(
        contact(
            "s1",
            13,
            channel="sms",
            type="csat.submitted",
            phone="+14155550123",
            payload={"score": 5, "comment": "great"},
        )
    )
    return conversation


def test_inbox_view_and_timeline_follow_the_log(world: World) -> None:
    conversation = alice_story(world)
    runner = world.runner()
    assert runner.run_once() > 0
    runner.run_until_caught_up()

    assert list_conversations(world.db)["items"] == []  # resolved: not in the default view
    page = list_conversations(world.db, status="resolved")
    (item,) = page["items"]
    assert page["next"] is None
    alice = world.customer_of("email:alice@example.com")
    assert item["id"] == str(conversation.id)
    assert item["customer"] == {
        "id": str(alice.id),
        "name": "Alice",
        "identities": ["email:alice@example.com", "phone:+14155550123"],
    }
    assert item["channels"] == ["email", "voice", "sms"]
    assert item["status"] == "resolved"
    assert item["assignee"] is None  # the transfer to billing unassigned it
    assert item["queue"] == "billing"
    assert item["priority"] == 0
    assert item["last_message"] == {
        "channel": "email",
        "text": "We are on it",
        "at": at(8),
        "direction": "out",
    }
    assert item["waiting_since"] is None
    assert item["sla_due_at"] is None
    assert item["opened_at"] == at(0)
    assert item["updated_at"] == at(12)

    detail = get_conversation(world.db, str(conversation.id))
    assert detail is not None
    timeline = detail["timeline"]
    assert [(e["kind"], e["direction"], e["event"]) for e in timeline] == [
        ("status", None, "Opened"),
        ("message", "in", "MessageReceived"),
        ("call", "in", "ActivityRecorded"),
        ("ivr", "in", "ActivityRecorded"),
        ("call", "in", "ActivityRecorded"),
        ("status", None, "Assigned"),
        ("status", None, "Transferred"),
        ("message", "out", "ReplyQueued"),
        ("note", None, "NoteAdded"),
        ("call", "in", "ActivityRecorded"),
        ("delivery", "out", "DeliveryStatusRecorded"),
        ("status", None, "Resolved"),
        ("csat", "in", "CsatSubmitted"),
    ]
    assert timeline[1]["text"] == "text of m1"
    assert timeline[1]["source_event_id"] == "m1"
    assert timeline[1]["channel"] == "email"
    assert timeline[3]["data"]["choice"] == "2"
    assert timeline[3]["data"]["activity"] == "ivr.selected"
    assert timeline[5]["actor"] == AGENT
    assert timeline[5]["data"]["agent"] == "ann"
    assert timeline[7]["text"] == "We are on it"
    assert timeline[10]["data"]["status"] == "delivered"
    assert timeline[12]["data"]["score"] == 5
    assert [e["at"] for e in timeline][:2] == [at(0), at(0)]
    assert detail["previous"] == []


def test_filters_status_assignee_queue_channel(world: World) -> None:
    world.ingest(
        contact("a", 0, email="a@example.com"),
        contact("b", 1, email="b@example.com"),
        contact("c", 2, channel="sms", phone="+14155550111"),
    )
    conv_a = world.conversation_of("email:a@example.com")
    conv_a.assign("ann", actor=AGENT, at=at(3))
    conv_a.mark_pending(actor=AGENT, at=at(4))
    conv_b = world.conversation_of("email:b@example.com")
    conv_b.transfer("sales", actor=AGENT, at=at(3))
    world.store.save(conv_a, conv_b)
    world.catch_up()

    def ids_of(**filters: Any) -> list[str]:
        return [i["id"] for i in list_conversations(world.db, **filters)["items"]]

    a, b = str(conv_a.id), str(conv_b.id)
    c = str(world.conversation_of("phone:+14155550111").id)
    assert ids_of() == [a, b, c]  # newest update first
    assert ids_of(status="pending") == [a]
    assert ids_of(status="open") == [b, c]
    assert ids_of(status="all", assignee="ann") == [a]
    assert ids_of(queue="sales") == [b]
    assert ids_of(channel="sms") == [c]
    assert ids_of(channel="voice") == []
    # b's customer writes by SMS too: the conversation is in both channels
    world.ingest(contact("b2", 5, channel="sms", email="b@example.com", phone="+14155550122"))
    world.catch_up()
    assert ids_of(channel="sms") == [b, c]
    assert ids_of(channel="email") == [b, a]
    first = list_conversations(world.db, channel="sms", limit=1)
    assert [i["id"] for i in first["items"]] == [b]
    assert ids_of(channel="sms", limit=1, cursor=first["next"]) == [c]
    with pytest.raises(QueryError, match="channel"):
        list_conversations(world.db, channel="fax")
    with pytest.raises(QueryError):
        list_conversations(world.db, status="closed")
    with pytest.raises(QueryError):
        list_conversations(world.db, limit=501)
    with pytest.raises(QueryError):
        list_conversations(world.db, cursor="not a cursor")


def test_customer_filter_by_id_and_identity_key(world: World) -> None:
    world.ingest(
        contact("a1", 0, email="alice@example.com", phone="+14155550123"),
        contact("b1", 1, email="bob@example.com"),
    )
    world.catch_up()
    alice = world.customer_of("email:alice@example.com")
    conv = str(world.conversation_of("email:alice@example.com").id)

    def ids_of(customer: str) -> list[str]:
        return [i["id"] for i in list_conversations(world.db, customer=customer)["items"]]

    assert ids_of(str(alice.id)) == [conv]
    assert ids_of("email:Alice@Example.com") == [conv]  # keys are normalised
    assert ids_of("phone:+1 415 555 0123") == [conv]
    assert ids_of("email:nobody@example.com") == []
    with pytest.raises(QueryError):
        ids_of("email:not-an-address")
    customer = get_customer(world.db, "phone:+14155550123")
    assert customer is not None
    assert customer["id"] == str(alice.id)
    assert [c["id"] for c in customer["conversations"]] == [conv]
    assert get_customer(world.db, "no-such-customer") is None


def test_merge_and_undo_are_visible_in_the_view(world: World) -> None:
    world.ingest(
        contact("a1", 0, email="alice@example.com", name="Alice"),
        contact("p1", 1, channel="sms", phone="+14155550123"),
    )
    world.catch_up()
    alice = world.customer_of("email:alice@example.com")
    other = world.customer_of("phone:+14155550123")
    other_conv = str(world.conversation_of("phone:+14155550123").id)
    alice_conv = str(world.conversation_of("email:alice@example.com").id)
    assert alice.id != other.id

    world.merge("email:alice@example.com", "phone:+14155550123")
    world.catch_up()
    items = list_conversations(world.db, customer="email:alice@example.com")["items"]
    assert {i["id"] for i in items} == {alice_conv, other_conv}
    for item in items:
        assert item["customer"]["id"] == str(alice.id)
        assert item["customer"]["identities"] == ["email:alice@example.com", "phone:+14155550123"]
    # The absorbed customer's id and key lead to the survivor.
    assert len(list_conversations(world.db, customer=str(other.id))["items"]) == 2
    assert len(list_conversations(world.db, customer="phone:+14155550123")["items"]) == 2
    merged = get_customer(world.db, str(other.id))
    assert merged is not None
    assert merged["merged_into"] == str(alice.id)
    # each conversation lists the customer's earlier ones (the absorbed customer's too)
    later = get_conversation(world.db, other_conv)
    assert later is not None
    assert [p["id"] for p in later["previous"]] == [alice_conv]
    earlier = get_conversation(world.db, alice_conv)
    assert earlier is not None
    assert earlier["previous"] == []

    world.unmerge("email:alice@example.com", other.id)
    world.catch_up()
    (mine,) = list_conversations(world.db, customer="email:alice@example.com")["items"]
    assert mine["id"] == alice_conv
    assert mine["customer"]["identities"] == ["email:alice@example.com"]
    (theirs,) = list_conversations(world.db, customer="phone:+14155550123")["items"]
    assert theirs["id"] == other_conv
    assert theirs["customer"]["id"] == str(other.id)
    restored = get_customer(world.db, str(other.id))
    assert restored is not None
    assert restored["merged_into"] is None


def test_cursor_paging_returns_every_row_once(world: World) -> None:
    # 120 conversations; groups of 7 share an update time, so ties are broken by id.
    world.ingest(*[contact(f"m{i}", i // 7, email=f"customer{i}@example.com") for i in range(120)])
    world.catch_up()
    seen: list[str] = []
    pages = 0
    cursor: str | None = None
    while True:
        page = list_conversations(world.db, limit=50, cursor=cursor)
        pages += 1
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next"]
        if cursor is None:
            break
    assert pages == 3
    assert len(seen) == 120
    assert len(set(seen)) == 120
    everything = list_conversations(world.db, limit=500)
    assert [i["id"] for i in everything["items"]] == seen
    assert everything["next"] is None


def busy_history(w: World, customers: int = 30) -> None:
    """A mixed history: several channels, agent commands, resolutions, a new conversation
    after the reopen window, a merge."""
    w.ingest(
        *[
            contact(f"first{i}", i, email=f"c{i}@example.com", phone=f"+1415555{i:04d}")
            for i in range(customers)
        ]
    )
    for i in range(0, customers, 3):
        conv = w.conversation_of(f"email:c{i}@example.com")
        conv.assign("ann", actor=AGENT, at=at(100 + i))
        conv.queue_reply(f"r{i}", "email", f"reply {i}", actor=AGENT, at=at(101 + i))
        conv.resolve(actor=AGENT, at=at(102 + i))
        w.store.save(conv)
    w.ingest(
        *[
            contact(
                f"call{i}",
                200 + i,
                channel="voice",
                type="call.started",
                phone=f"+1415555{i:04d}",
                payload={"call_sid": f"CA{i}", "to": "+14155550100"},
            )
            for i in range(0, customers, 2)
        ]
    )
    # After the reopen window a message opens a new conversation.
    w.ingest(contact("late0", 60 * 24 * 9, email="c0@example.com"))
    w.merge("email:c1@example.com", "email:c2@example.com")
    # A queue with an SLA policy, and conversations in it: their rows carry a due time.
    define_sla_queue(w)
    for i in range(1, customers, 4):
        conv = w.conversation_of(f"email:c{i}@example.com")
        if conv.status != "resolved":
            conv.enter_queue("vip", 0, reason="test", actor=AGENT, at=at(300 + i))
            w.store.save(conv)


def define_sla_queue(w: World) -> None:
    spec = queue_spec(
        "vip",
        {
            "sla": {
                "timezone": "UTC",
                "hours": {"mon": ["09:00-17:00"], "tue": ["09:00-17:00"]},
                "targets": {"0": {"first_response": "30m", "next_response": "1h"}},
            }
        },
    )
    w.store.save(Queue(name="vip", spec=spec, actor="admin", at=at(0)))


def test_sla_due_at_follows_the_queue_policy_in_business_hours(world: World) -> None:
    define_sla_queue(world)
    world.ingest(contact("s1", 0, email="sla@example.com"))  # Monday 09:00
    conv = world.conversation_of("email:sla@example.com")
    conv.enter_queue("vip", 0, reason="test", actor=AGENT, at=at(1))
    world.store.save(conv)
    world.catch_up()
    (item,) = list_conversations(world.db, customer="email:sla@example.com")["items"]
    assert item["sla_due_at"] == at(30)  # first response: 30 min from the first contact

    conv = world.conversation_of("email:sla@example.com")
    conv.queue_reply("r1", "email", "hi", actor=AGENT, at=at(10))
    world.store.save(conv)
    world.catch_up()
    (item,) = list_conversations(world.db, customer="email:sla@example.com")["items"]
    assert item["sla_due_at"] is None  # answered, nobody waits, no resolution target

    world.ingest(contact("s2", 60 * 7 + 30, email="sla@example.com"))  # Monday 16:30
    world.catch_up()
    (item,) = list_conversations(world.db, customer="email:sla@example.com")["items"]
    # next response: 30 business minutes left on Monday, the other 30 on Tuesday from 09:00
    assert item["sla_due_at"] == at(60 * 24 + 30)


def rows(db: ReadModelDB, tables: Sequence[str]) -> dict[str, list[tuple[Any, ...]]]:
    out: dict[str, list[tuple[Any, ...]]] = {}
    with db.read() as tx:
        for name in tables:
            out[name.rsplit("_g", 1)[0]] = sorted(
                tx.execute(f"SELECT * FROM {name}").fetchall(), key=repr
            )
    return out


def active_tables(db: ReadModelDB, projection: Projection) -> list[str]:
    with db.read() as tx:
        state = active_generation(tx, projection.name)
    assert state is not None
    return projection.tables(state.generation)


def test_replay_equals_live_row_for_row(world: World) -> None:
    busy_history(world)
    world.catch_up()
    for name in ("inbox", "timeline"):  # the others see no events in this history
        projection = PROJECTIONS[name]()
        live_tables = active_tables(world.db, projection)
        live = rows(world.db, live_tables)
        assert all(live.values())
        result = rebuild(world.store, world.db, name, from_start=True, batch_size=37)
        assert result.previous_generation == 1
        assert result.generation == 2
        assert result.position == world.store.max_notification_id()
        replayed_tables = active_tables(world.db, projection)
        assert replayed_tables != live_tables
        assert rows(world.db, replayed_tables) == live
        for old in live_tables:
            assert not world.db.table_exists(old)
    # The swapped-in generations keep following the log.
    world.ingest(contact("after", 10_000, email="new@example.com"))
    world.catch_up()
    items = list_conversations(world.db, customer="email:new@example.com")["items"]
    assert len(items) == 1


def test_rebuild_resumes_while_the_old_generation_serves(world: World) -> None:
    busy_history(world)
    world.catch_up()
    before = list_conversations(world.db, status="all", limit=500)
    live = rows(world.db, active_tables(world.db, InboxView()))

    class Stop(Exception):
        pass

    calls: list[int] = []

    def stop_after_two(position: int, head: int) -> None:
        calls.append(position)
        assert position <= head
        if len(calls) == 2:
            raise Stop

    with pytest.raises(Stop):
        rebuild(
            world.store, world.db, "inbox", from_start=True, progress=stop_after_two, batch_size=40
        )
    with world.db.read() as tx:
        states = generations(tx, "inbox")
    log = [n.id for n in world.store.notifications(0, 100_000)]
    assert [(s.generation, s.active, s.position) for s in states] == [
        (1, True, log[-1]),
        (2, False, log[79]),
    ]
    # Generation 1 still serves.
    assert list_conversations(world.db, status="all", limit=500) == before

    resumed: list[int] = []
    result = rebuild(
        world.store,
        world.db,
        "inbox",
        from_start=False,
        progress=lambda position, head: resumed.append(position),
        batch_size=40,
    )
    assert result.generation == 2
    assert resumed[0] == log[119]  # carried on after the 80 already replayed
    assert rows(world.db, active_tables(world.db, InboxView())) == live
    assert list_conversations(world.db, status="all", limit=500) == before


class InterleavedStore:
    """The real event store; while the first runner holds its batch, `other` runs a round."""

    def __init__(self, store: EventStore, other: ProjectionRunner) -> None:
        self.store = store
        self.other = other
        self.interleaved = False

    def notifications(self, after: int, limit: int) -> Sequence[Notification]:
        batch = self.store.notifications(after, limit)
        if batch and not self.interleaved:
            self.interleaved = True
            self.other.run_once(limit)
        return batch

    def max_notification_id(self) -> int:
        return self.store.max_notification_id()


def conversation_event_counts(db: ReadModelDB) -> dict[str, int]:
    with db.read() as tx:
        (conv_table,) = [t for t in active_tables(db, InboxView()) if "conversations" in t]
        return {
            str(conv_id): int(n)
            for conv_id, n in tx.execute(f"SELECT id, events FROM {conv_table}").fetchall()
        }


def test_two_runners_never_apply_a_batch_twice(world: World) -> None:
    busy_history(world, customers=12)
    winner = world.runner()
    loser = ProjectionRunner(
        InterleavedStore(world.store, winner),
        world.db,
        [InboxView(), Timeline()],
    )
    applied = loser.run_once(limit=10_000)
    assert applied == 0  # the winner moved both positions first: the loser rolled back
    assert loser.stats.conflicts == {"inbox": 1, "timeline": 1}
    total = len(world.store.notifications(0, 100_000))  # PostgreSQL's ids may have gaps
    assert winner.stats.processed == {"inbox": total, "timeline": total}
    # The loser re-reads its positions and finds nothing left to do.
    assert loser.run_once() == 0

    # Each conversation counted each of its events exactly once; each timeline entry once.
    expected: dict[str, int] = {}
    for n in world.store.notifications(0, 100_000):
        if n.topic.startswith("inbox.domain.conversation:"):
            key = str(n.originator_id)
            expected[key] = expected.get(key, 0) + 1
    assert conversation_event_counts(world.db) == expected
    (entries,) = active_tables(world.db, Timeline())
    with world.db.read() as tx:
        tx.execute(f"SELECT conversation_id, COUNT(*) FROM {entries} GROUP BY conversation_id")
        assert {str(k): int(v) for k, v in tx.fetchall()} == expected


def test_two_runners_taking_turns_equal_one_replay(world: World) -> None:
    """Each runner keeps the rows it read between its batches; the other's batches in
    between make them stale, which the generation's position tells it."""
    busy_history(world, customers=12)
    first, second = world.runner(), world.runner()
    while first.run_once(limit=3) + second.run_once(limit=2):
        pass
    assert first.stats.processed["inbox"]
    assert second.stats.processed["inbox"]
    live = rows(world.db, active_tables(world.db, InboxView()))
    rebuild(world.store, world.db, "inbox", from_start=True)
    assert rows(world.db, active_tables(world.db, InboxView())) == live


def test_concurrent_runners_in_threads_match_a_single_replay(world: World) -> None:
    busy_history(world, customers=40)
    stop = threading.Event()
    runners = [world.runner() for _ in range(2)]
    threads = [
        threading.Thread(target=r.run_forever, args=(stop,), kwargs={"limit": 7}) for r in runners
    ]
    for thread in threads:
        thread.start()
    try:
        for i in range(40):
            world.ingest(contact(f"more{i}", 300 + i, email=f"c{i}@example.com"))
        head = world.store.max_notification_id()
        probe = world.runner()
        for _ in range(400):
            if all(p == head for _, p in probe.positions().values()):
                break
            stop.wait(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert all(p == head for _, p in probe.positions().values())
    processed = sum(r.stats.processed["inbox"] for r in runners)
    assert processed == len(world.store.notifications(0, 100_000))  # each one once
    live = rows(world.db, active_tables(world.db, InboxView()))
    rebuild(world.store, world.db, "inbox", from_start=True)
    assert rows(world.db, active_tables(world.db, InboxView())) == live


class _FailsTwice(InboxView):
    """An inbox view whose first two batches raise (a bug, an event it does not expect)."""

    failures = 2

    def apply(self, tx: Tx, generation: int, events: Sequence[Event], *, position: int) -> None:
        if self.failures:
            self.failures -= 1
            raise ValueError("an event this code did not expect")
        super().apply(tx, generation, events, position=position)


def test_a_runner_whose_batch_fails_logs_it_and_goes_on_with_nothing_half_done(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    busy_history(world, customers=5)
    runner = ProjectionRunner(world.store, world.db, [_FailsTwice()])
    # its tables made here first: this thread asks for its positions while it runs (two
    # CREATE TABLE IF NOT EXISTS at once can collide on PostgreSQL)
    assert runner.positions()["inbox"][1] == 0
    stop = threading.Event()
    thread = threading.Thread(
        target=runner.run_forever, args=(stop,), kwargs={"poll_interval": 0.01}
    )
    caplog.set_level(logging.ERROR, logger="projections.runner")
    thread.start()
    try:
        head = world.store.max_notification_id()
        for _ in range(400):
            if runner.positions()["inbox"][1] == head:
                break
            stop.wait(0.05)
        assert thread.is_alive()  # it did not end with the first error
    finally:
        stop.set()
        thread.join(timeout=30)
    assert caplog.text.count("a batch failed") == 2
    assert runner.positions()["inbox"][1] == head
    live = rows(world.db, active_tables(world.db, InboxView()))
    rebuild(world.store, world.db, "inbox", from_start=True)
    assert rows(world.db, active_tables(world.db, InboxView())) == live


def test_read_models_give_way_while_the_leading_one_is_behind(world: World) -> None:
    busy_history(world, customers=10)
    total = len(world.store.notifications(0, 100_000))  # PostgreSQL's ids may have gaps
    lead, stop = Lead(max_wait=60), threading.Event()
    inbox = ProjectionRunner(world.store, world.db, [InboxView()])
    timeline = ProjectionRunner(world.store, world.db, [Timeline()])
    lead.report(behind=True)  # as the inbox runner says after a full batch
    follower = threading.Thread(
        target=timeline.run_forever, args=(stop,), kwargs={"follows": lead, "poll_interval": 0.01}
    )
    follower.start()
    try:
        stop.wait(0.3)
        assert timeline.stats.processed["timeline"] == 0  # it waited for the lead

        leader = threading.Thread(
            target=inbox.run_forever,
            args=(stop,),
            kwargs={"leads": lead, "limit": 5, "poll_interval": 0.01},
        )
        leader.start()
        for _ in range(400):
            if timeline.stats.processed["timeline"] >= total:
                break
            stop.wait(0.05)
    finally:
        stop.set()
        follower.join(30)
    leader.join(30)
    # The lead went through in full batches first; once it caught up the follower ran.
    assert inbox.stats.processed["inbox"] == timeline.stats.processed["timeline"] == total


def test_a_follower_goes_no_further_than_the_lead(world: World) -> None:
    busy_history(world, customers=3)
    ids = [n.id for n in world.store.notifications(0, 100_000)]
    timeline = ProjectionRunner(world.store, world.db, [Timeline()])

    timeline.run_once(limit=1000, ceiling=ids[4])

    assert [p for _, p in timeline.positions().values()] == [ids[4]]
    assert timeline.reached == ids[4]
    assert timeline.stats.processed["timeline"] == 5


def test_a_full_batch_means_the_runner_is_behind(world: World) -> None:
    busy_history(world, customers=3)
    runner = world.runner()
    runner.run_once(limit=2)
    assert runner.behind
    runner.run_until_caught_up()
    runner.run_once(limit=2)
    assert not runner.behind


def test_read_model_db_translates_placeholders(world: World) -> None:
    with world.db.transaction() as tx:
        tx.execute("CREATE TABLE scratch_t (k TEXT PRIMARY KEY, v INTEGER)")
        tx.executemany("INSERT INTO scratch_t VALUES (?, ?)", [("a%", 1), ("b", 2)])
    with world.db.read() as tx:
        found = tx.execute(
            "SELECT k, v FROM scratch_t WHERE k LIKE '%\\%%' ESCAPE '\\' OR v=?", (2,)
        )
        assert sorted(found.fetchall()) == [("a%", 1), ("b", 2)]
        assert tx.execute("SELECT v FROM scratch_t WHERE k=?", ("zz",)).fetchone() is None

    def fails(tx: Tx) -> None:
        tx.execute("INSERT INTO scratch_t VALUES (?, ?)", ("c", 3))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError), world.db.transaction() as tx:
        fails(tx)
    with world.db.read() as tx:
        assert tx.execute("SELECT COUNT(*) FROM scratch_t").fetchone() == (2,)
    assert world.db.table_exists("scratch_t")
    assert not world.db.table_exists("no_such_table")


def test_insert_many_inserts_upserts_and_keeps_nulls_on_both_databases(world: World) -> None:
    columns = ("k", "n", "big", "note")
    with world.db.transaction() as tx:
        tx.execute(
            "CREATE TABLE scratch_m (k TEXT PRIMARY KEY, n INTEGER NOT NULL, big BIGINT, note TEXT)"
        )
        tx.insert_many("scratch_m", columns, [])  # nothing to write: no statement
        tx.insert_many(
            "scratch_m",
            columns,
            [("a", 1, None, None), ("b%", 2, None, None), ("c", 3, None, None)],
        )
    with world.db.transaction() as tx:
        tx.insert_many(
            "scratch_m",
            columns,
            [["a", 10, 2**40, "x"], ["d", 4, None, "it's 100%"]],
            replace_on_conflict("k", columns),
        )
        tx.insert_many("scratch_m", columns, [("c", 30, 5, "kept?")], "ON CONFLICT (k) DO NOTHING")
    with world.db.read() as tx:
        assert tx.execute("SELECT k, n, big, note FROM scratch_m ORDER BY k").fetchall() == [
            ("a", 10, 2**40, "x"),
            ("b%", 2, None, None),
            ("c", 3, None, None),
            ("d", 4, None, "it's 100%"),
        ]

    # A failing insert changes nothing (here: a second row with a key already stored).
    with pytest.raises(IntegrityError), world.db.transaction() as tx:
        tx.insert_many("scratch_m", columns, [("e", 5, None, None), ("a", 6, None, None)])
    with world.db.read() as tx:
        assert tx.execute("SELECT COUNT(*) FROM scratch_m").fetchone() == (4,)


def test_an_edited_policy_applies_from_then_on_or_to_history_on_request(world: World) -> None:
    define_sla_queue(world)  # first response in 30 business minutes
    world.ingest(contact("p1", 0, email="pol@example.com"))  # Monday 09:00
    conv = world.conversation_of("email:pol@example.com")
    conv.enter_queue("vip", 0, reason="test", actor=AGENT, at=at(1))
    world.store.save(conv)
    world.catch_up()
    queue = world.store.get(ids.queue_id("vip"))
    tighter = dict(queue.spec)
    tighter["sla"] = {**tighter["sla"], "targets": {"0": {"first_response": "10m"}}}
    queue.change(tighter, actor="admin", at=at(2))
    world.store.save(queue)
    world.catch_up()

    def due() -> str | None:
        (item,) = list_conversations(world.db, customer="email:pol@example.com")["items"]
        value: str | None = item["sla_due_at"]
        return value

    assert due() == at(30)  # the edit applies from then on: this row has not changed since
    rebuild(world.store, world.db, "inbox", from_start=True)
    assert due() == at(30)  # a plain replay applies each policy as it stood
    policies = {"vip": SlaPolicy.from_dict({**tighter["sla"], "queue": "vip"})}
    rebuild(
        world.store,
        world.db,
        "inbox",
        from_start=True,
        build=lambda: InboxView(current_policies=policies),
    )
    assert due() == at(10)  # today's policy applied to history


def _set_layout(db: ReadModelDB, name: str, value: str | None) -> None:
    with db.transaction() as tx:
        tx.execute("UPDATE projection_state SET layout=? WHERE name=?", (value, name))


def _live_inbox_with_a_stale_row(world: World) -> tuple[dict[str, list[tuple[Any, ...]]], str]:
    busy_history(world, customers=5)
    world.catch_up()
    live = rows(world.db, active_tables(world.db, InboxView()))
    (conversations, *_) = active_tables(world.db, InboxView())
    with world.db.transaction() as tx:
        tx.execute(f"UPDATE {conversations} SET last_text='stale'")  # no replay writes this
    return live, conversations


@pytest.mark.parametrize("recorded", ["0123456789abcdef", None])
def test_a_generation_of_other_tables_is_rebuilt_from_the_start(
    world: World, recorded: str | None
) -> None:
    # given a live inbox view whose generation has other tables than this code's: it says
    # so, or (made before layouts were recorded) it says nothing and has an extra column
    live, conversations = _live_inbox_with_a_stale_row(world)
    _set_layout(world.db, "inbox", recorded)
    if recorded is None:
        with world.db.transaction() as tx:
            tx.execute(f"ALTER TABLE {conversations} ADD COLUMN gone TEXT")
    # when a runner starts
    world.catch_up()
    # then the old generation is gone and a new one holds what a replay of the log gives
    with world.db.read() as tx:
        states = generations(tx, "inbox")
    assert [(s.generation, s.active) for s in states] == [(1, False), (2, True)]
    assert states[1].layout == layout(InboxView(), postgres=world.db.is_postgres)
    assert not world.db.table_exists(conversations)
    assert rows(world.db, active_tables(world.db, InboxView())) == live


def test_a_generation_from_before_layouts_with_these_tables_is_kept(world: World) -> None:
    _, conversations = _live_inbox_with_a_stale_row(world)
    kept = rows(world.db, active_tables(world.db, InboxView()))
    _set_layout(world.db, "inbox", None)
    world.catch_up()
    with world.db.read() as tx:
        states = generations(tx, "inbox")
    assert [(s.generation, s.active) for s in states] == [(1, True)]
    assert states[0].layout == layout(InboxView(), postgres=world.db.is_postgres)
    assert rows(world.db, active_tables(world.db, InboxView())) == kept  # not replayed
    assert not world.db.table_exists(conversations.replace("_g1", "_g0"))  # rolled back


def test_a_generation_of_these_tables_keeps_its_rows_and_gets_new_indexes(world: World) -> None:
    busy_history(world, customers=3)
    world.catch_up()
    (conversations, *_) = active_tables(world.db, InboxView())
    index = f"{conversations}_ch_sms"
    with world.db.transaction() as tx:
        tx.execute(f"DROP INDEX {index}")  # as if made before it was added
    world.catch_up()
    with world.db.read() as tx:
        assert [s.generation for s in generations(tx, "inbox")] == [1]
        if world.db.is_postgres:
            tx.execute("SELECT COUNT(*) FROM pg_indexes WHERE indexname=?", (index,))
        else:
            tx.execute("SELECT COUNT(*) FROM sqlite_master WHERE name=?", (index,))
        assert tx.fetchone() == (1,)


def test_a_state_table_from_before_layouts_gets_the_columns(
    database_url: str, settings: SettingsFactory
) -> None:
    db = open_read_models(settings(database_url, bootstrap=None))
    try:
        with db.transaction() as tx:
            tx.execute(
                "CREATE TABLE projection_state (name TEXT NOT NULL, generation INTEGER NOT NULL, "
                "position BIGINT NOT NULL, active INTEGER NOT NULL, started_at TEXT NOT NULL, "
                "finished_at TEXT, retired_at TEXT, updated_at TEXT, "
                "PRIMARY KEY (name, generation))"
            )
            tx.execute(
                "INSERT INTO projection_state VALUES ('inbox', 1, 7, 1, 'then', 'then', NULL, NULL)"
            )
        ensure_state_table(db)
        ensure_state_table(db)  # once is enough
        with db.read() as tx:
            state = active_generation(tx, "inbox")
        assert state is not None
        assert (state.generation, state.position, state.layout) == (1, 7, None)
        assert state.last_record is None
    finally:
        db.close()


def _inbox_rows(w: World) -> dict[str, list[tuple[Any, ...]]]:
    return rows(w.db, active_tables(w.db, InboxView()))


def test_read_models_of_another_history_are_rebuilt_from_the_start(
    world: World, other_store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The read models were kept and the event store is another one (another site's, one
    started again) that has grown past their position: the rows they hold are not its
    history, and following it from there would skip its first events."""
    busy_history(world, customers=3)
    world.catch_up()
    other = World(other_store, world.db, Ingestor(other_store))
    other.ingest(contact("elsewhere", 0, email="elsewhere@example.com"))
    busy_history(other, customers=5)
    assert other_store.max_notification_id() > world.store.max_notification_id()

    with caplog.at_level(logging.WARNING, logger="projections.runner"):
        other.catch_up()

    assert "built from another history" in caplog.text
    with world.db.read() as tx:
        assert [(s.generation, s.active) for s in generations(tx, "inbox")] == [
            (1, False),  # dropped
            (2, True),
        ]
    live = _inbox_rows(other)
    rebuild(other_store, world.db, "inbox", from_start=True)
    assert _inbox_rows(other) == live


def test_read_models_past_the_end_of_the_log_are_rebuilt_from_the_start(
    world: World, other_store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    """As after restoring the event store from an older backup: the read models are at a
    position the store does not have yet."""
    busy_history(world, customers=3)
    world.catch_up()
    other = World(other_store, world.db, Ingestor(other_store))
    other.ingest(contact("later", 0, email="later@example.com"))

    with caplog.at_level(logging.WARNING, logger="projections.runner"):
        other.catch_up()

    assert "past the end of the event store" in caplog.text
    with world.db.read() as tx:
        conversations = active_tables(world.db, InboxView())[0]
        assert tx.execute(f"SELECT COUNT(*) FROM {conversations}").fetchone() == (1,)


def test_read_models_of_this_history_are_kept_and_an_older_position_is_trusted(
    world: World,
) -> None:
    busy_history(world, customers=3)
    world.catch_up()
    before = _inbox_rows(world)
    with world.db.transaction() as tx:  # as written by a version that did not record it
        tx.execute("UPDATE projection_state SET last_record=NULL WHERE name='timeline'")
    world.ingest(contact("more", 500, email="c1@example.com"))
    world.catch_up()
    with world.db.read() as tx:
        states = [s for n in ("inbox", "timeline") for s in generations(tx, n)]
    assert [(s.name, s.generation) for s in states] == [("inbox", 1), ("timeline", 1)]
    assert all(s.last_record is not None for s in states)  # recorded again with the batch
    assert _inbox_rows(world) != before


def _a_rebuild_stopped_halfway(world: World) -> None:
    """A busy history caught up, then a rebuild of the inbox stopped after its first batch
    (generation 2, unfinished)."""
    busy_history(world, customers=3)
    world.catch_up()

    class Stop(Exception):
        pass

    def stop(position: int, head: int) -> None:
        raise Stop

    with pytest.raises(Stop):
        rebuild(world.store, world.db, "inbox", from_start=True, progress=stop, batch_size=10)


def test_an_unfinished_rebuild_of_other_tables_is_not_resumed(world: World) -> None:
    _a_rebuild_stopped_halfway(world)
    with world.db.transaction() as tx:
        tx.execute("UPDATE projection_state SET layout='old' WHERE name='inbox' AND active=0")
    result = rebuild(world.store, world.db, "inbox", from_start=False, batch_size=10)
    assert result.generation == 3  # a new one: generation 2 could not be written to
    with world.db.read() as tx:
        assert [(s.generation, s.active) for s in generations(tx, "inbox")] == [
            (1, False),
            (2, False),
            (3, True),
        ]


def test_an_unfinished_rebuild_of_another_history_is_not_resumed(
    world: World, other_store: EventStore
) -> None:
    _a_rebuild_stopped_halfway(world)
    other = World(other_store, world.db, Ingestor(other_store))
    other.ingest(contact("elsewhere", 0, email="elsewhere@example.com"))
    busy_history(other, customers=3)

    result = rebuild(other_store, world.db, "inbox", from_start=False, batch_size=10)

    assert result.generation == 3  # a new one: generation 2 holds the other history's rows
    live = _inbox_rows(other)
    rebuild(other_store, world.db, "inbox", from_start=True)
    assert _inbox_rows(other) == live


def test_reading_the_positions_never_waits_for_a_writer(world: World) -> None:
    """Prometheus reads the positions on every scrape: that must not queue behind a
    projection's batch for the write lock (on SQLite it waited up to 30 s, then failed)."""
    assert positions(world.db) == {}  # no projection has run yet
    world.ingest(contact("one", 1, email="one@example.com"))
    world.catch_up()
    expected = positions(world.db)
    assert set(expected) == {"inbox", "timeline"}
    assert all(p == world.store.max_notification_id() for p in expected.values())
    with ReadModelDB(**world.db.location) as other, other.transaction() as tx:
        tx.execute("UPDATE projection_state SET updated_at=updated_at")  # holds the write lock
        assert positions(world.db) == expected
