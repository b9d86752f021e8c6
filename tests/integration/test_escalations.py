"""The escalation queues against real SQLite and PostgreSQL: conversations and customers are
the real aggregates saved in a real event store; the real runner (and the real rebuild) feed
the projection from the store's notification log."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from inbox.domain.conversation import Conversation
from inbox.domain.customer import Customer
from inbox.domain.time import iso
from infra.store import EventStore
from projections.db import ReadModelDB
from projections.escalations import NAME, QUEUES, Escalations, escalation_queues
from projections.inbox_view import QueryError
from projections.replay import PROJECTIONS, rebuild
from projections.runner import ProjectionRunner
from projections.tracking import active_generation

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
AGENT = "agent:sue"


def at(minutes: float) -> str:
    return iso(T0 + timedelta(minutes=minutes))


def hours(h: float) -> float:
    return h * 60


@dataclass
class World:
    store: EventStore
    db: ReadModelDB
    events: int = 0

    def customer(self, email: str, *, vip: bool = False) -> Customer:
        customer = Customer(identities=[f"email:{email}"], name=None, at=at(0))
        if vip:
            customer.set_vip(True, actor=AGENT, at=at(0))
        self.store.save(customer)
        return customer

    def open(
        self, customer: Customer, minutes: float, *, channel: str = "email", queue: str = "support"
    ) -> Conversation:
        self.events += 1
        conv = Conversation(
            customer_id=str(customer.id),
            channel=channel,
            queue=queue,
            previous=None,
            source_event_id=f"open-{self.events}",
            at=at(minutes),
        )
        customer.start_conversation(conv.id, at(minutes))
        self.store.save(customer, conv)
        return conv

    def message(self, conv: Conversation, minutes: float, *, automatic: bool = False) -> None:
        self.events += 1
        conv.receive_message(
            automatic=automatic,
            at=at(minutes),
            channel="email",
            via="help@example.com",
            message_id=f"<m{self.events}@example.com>",
            text=f"message {self.events}",
            subject="help",
            html=None,
            attachments=[],
            thread_ref=None,
            in_reply_to=[],
            source_event_id=f"msg-{self.events}",
        )
        self.store.save(conv)

    def activity(self, conv: Conversation, minutes: float, activity: str, **data: Any) -> None:
        self.events += 1
        conv.record_activity(
            activity,
            at=at(minutes),
            channel="voice",
            data=data,
            source_event_id=f"act-{self.events}",
        )
        self.store.save(conv)

    def csat(self, conv: Conversation, minutes: float, score: int) -> None:
        self.events += 1
        conv.record_csat(
            channel="email",
            score=score,
            comment=None,
            source_event_id=f"csat-{self.events}",
            at=at(minutes),
        )
        self.store.save(conv)

    def run(self) -> dict[str, list[dict[str, Any]]]:
        ProjectionRunner(self.store, self.db, [Escalations()]).run_until_caught_up()
        return self.queues()

    def queues(self) -> dict[str, list[dict[str, Any]]]:
        return {q["name"]: q["items"] for q in escalation_queues(self.db)}


@pytest.fixture
def world(store: EventStore, db: ReadModelDB) -> World:
    return World(store, db)


def only(items: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(items) == 1, items
    return items[0]


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["conversation"] for item in items]


def test_every_queue_is_listed_empty_before_anything_ran(world: World) -> None:
    assert escalation_queues(world.db) == [{"name": q, "items": []} for q in QUEUES]
    assert world.run() == {q: [] for q in QUEUES}


def test_limit_out_of_range_is_refused(world: World) -> None:
    for limit in (0, 501):
        with pytest.raises(QueryError):
            escalation_queues(world.db, limit=limit)


def test_escalated_enters_with_reason_and_since_and_leaves_on_resolve(world: World) -> None:
    alice = world.customer("alice@example.com")
    conv = world.open(alice, 0)
    conv.escalate("threatens to cancel", actor=AGENT, at=at(10))
    world.store.save(conv)

    item = only(world.run()["escalated"])
    assert item == {
        "conversation": str(conv.id),
        "customer": str(alice.id),
        "reason": "threatens to cancel",
        "since": at(10),
        "queue": "support",
        "assignee": None,
        "priority": 0,
    }

    conv.resolve(actor=AGENT, at=at(20))
    world.store.save(conv)
    assert world.run()["escalated"] == []


def test_sla_breach_keeps_the_oldest_since_and_the_latest_reason(world: World) -> None:
    conv = world.open(world.customer("bob@example.com"), 0)
    conv.record_sla("first_response", at(60), breached=True, actor="sla", at=at(61))
    world.store.save(conv)
    item = only(world.run()["sla_breach"])
    assert (item["reason"], item["since"]) == (f"first_response breached (due {at(60)})", at(61))

    conv.record_sla("resolution", at(240), breached=True, actor="sla", at=at(241))
    world.store.save(conv)
    item = only(world.run()["sla_breach"])
    assert (item["reason"], item["since"]) == (f"resolution breached (due {at(240)})", at(61))

    conv.resolve(actor=AGENT, at=at(300))
    world.store.save(conv)
    assert world.run()["sla_breach"] == []


def test_vip_on_and_off(world: World) -> None:
    carol = world.customer("carol@example.com")
    first = world.open(carol, 0)
    done = world.open(carol, 5)
    done.resolve(actor=AGENT, at=at(6))
    world.store.save(done)
    second = world.open(carol, 10)
    assert world.run()["vip"] == []

    carol.set_vip(True, actor=AGENT, at=at(30))
    world.store.save(carol)
    vip = world.run()["vip"]
    assert ids(vip) == sorted([str(first.id), str(second.id)])
    assert {(i["reason"], i["since"], i["customer"]) for i in vip} == {
        ("VIP customer", at(30), str(carol.id))
    }

    # A conversation opened later for a VIP customer enters at its opening.
    later = world.open(carol, 40)
    assert ids(world.run()["vip"])[-1] == str(later.id)
    assert world.queues()["vip"][-1]["since"] == at(40)

    # Resolving leaves the queue; reopening does not bring the item back.
    first.resolve(actor=AGENT, at=at(50))
    world.store.save(first)
    assert str(first.id) not in ids(world.run()["vip"])
    first.reopen(actor=AGENT, at=at(55))
    world.store.save(first)
    assert str(first.id) not in ids(world.run()["vip"])

    carol.set_vip(False, actor=AGENT, at=at(60))
    world.store.save(carol)
    assert world.run()["vip"] == []


def test_customer_created_vip_gets_its_first_conversation_queued(world: World) -> None:
    dave = world.customer("dave@example.com", vip=True)
    conv = world.open(dave, 7)
    item = only(world.run()["vip"])
    assert (item["conversation"], item["since"]) == (str(conv.id), at(7))


def test_repeat_contact_at_exactly_three_within_24_hours(world: World) -> None:
    erin = world.customer("erin@example.com")
    morning = world.open(erin, 0)  # opened: not itself a contact
    world.message(morning, 0)
    world.message(morning, 30, automatic=True)  # an auto-reply is no contact
    morning.resolve(actor=AGENT, at=at(60))
    world.store.save(morning)
    evening = world.open(erin, hours(10))
    world.activity(evening, hours(10), "call.started", call_sid="CA1")
    assert world.run()["repeat_contact"] == []

    # The third contact, exactly 24 hours after the first, in yet another conversation.
    night = world.open(erin, hours(24))
    world.message(night, hours(24))
    item = only(world.run()["repeat_contact"])
    assert item == {
        "conversation": str(night.id),
        "customer": str(erin.id),
        "reason": "3 contacts in 24 h",
        "since": at(hours(24)),
        "queue": "support",
        "assignee": None,
        "priority": 0,
    }

    # A fourth updates the reason and keeps the since; a chat start counts too.
    world.activity(night, hours(24), "chat.started")
    item = only(world.run()["repeat_contact"])
    assert (item["reason"], item["since"]) == ("4 contacts in 24 h", at(hours(24)))
    # The window slides: an hour later the first contact no longer counts.
    world.message(night, hours(25))
    item = only(world.run()["repeat_contact"])
    assert (item["reason"], item["since"]) == ("4 contacts in 24 h", at(hours(24)))

    night.resolve(actor=AGENT, at=at(hours(26)))
    world.store.save(night)
    assert world.run()["repeat_contact"] == []


def test_three_contacts_spread_over_25_hours_are_no_repeat(world: World) -> None:
    frank = world.customer("frank@example.com")
    conv = world.open(frank, 0)
    for minutes in (0, hours(12.5), hours(25)):
        world.message(conv, minutes)
    assert world.run()["repeat_contact"] == []


def test_contacts_of_other_customers_do_not_add_up(world: World) -> None:
    for n in range(3):
        conv = world.open(world.customer(f"c{n}@example.com"), n)
        world.message(conv, n)
    assert world.run()["repeat_contact"] == []


def test_low_csat_stays_after_resolve_until_reopened_and_resolved(world: World) -> None:
    gina = world.customer("gina@example.com")
    conv = world.open(gina, 0)
    conv.escalate("angry", actor=AGENT, at=at(5))
    conv.resolve(actor=AGENT, at=at(10))
    world.store.save(conv)
    world.csat(conv, 20, 1)
    item = only(world.run()["low_csat"])
    assert (item["reason"], item["since"]) == ("CSAT 1/5", at(20))

    # A resolution without a follow-up changes nothing; a good score does not clear it.
    world.csat(conv, 25, 5)
    assert ids(world.run()["low_csat"]) == [str(conv.id)]

    conv.reopen(actor=AGENT, at=at(30))
    world.store.save(conv)
    queues = world.run()
    assert ids(queues["low_csat"]) == [str(conv.id)]
    assert queues["escalated"] == []  # the reopen does not bring the escalation back

    conv.resolve(actor=AGENT, at=at(40))
    world.store.save(conv)
    assert world.run()["low_csat"] == []


def test_csat_of_three_is_not_low(world: World) -> None:
    conv = world.open(world.customer("hal@example.com"), 0)
    conv.resolve(actor=AGENT, at=at(1))
    world.store.save(conv)
    world.csat(conv, 2, 3)
    assert world.run()["low_csat"] == []


def test_supervisor_requested_in_the_ivr(world: World) -> None:
    ivan = world.customer("ivan@example.com")
    conv = world.open(ivan, 0, channel="voice")
    world.activity(conv, 1, "call.started", call_sid="CA9")
    world.activity(conv, 2, "ivr.selected", call_sid="CA9", node="main", choice="1")
    assert world.run()["supervisor_requested"] == []

    world.activity(conv, 3, "ivr.selected", call_sid="CA9", node="main", action="supervisor")
    item = only(world.run()["supervisor_requested"])
    assert (item["conversation"], item["reason"], item["since"]) == (
        str(conv.id),
        "asked the IVR for a supervisor",
        at(3),
    )

    conv.resolve(actor=AGENT, at=at(10))
    world.store.save(conv)
    assert world.run()["supervisor_requested"] == []


def test_routing_queue_assignee_and_priority_are_kept_current(world: World) -> None:
    conv = world.open(world.customer("jo@example.com"), 0)
    conv.escalate("legal", actor=AGENT, at=at(1))
    world.store.save(conv)
    world.run()

    conv.enter_queue("billing", 5, reason="keyword", actor="router", at=at(2))
    conv.assign("ann", actor="router", at=at(3))
    conv.change_priority(9, reason="vip", actor="router", at=at(4))
    world.store.save(conv)
    item = only(world.run()["escalated"])
    assert (item["queue"], item["assignee"], item["priority"]) == ("billing", "ann", 9)

    conv.transfer("legal", actor=AGENT, at=at(5))
    world.store.save(conv)
    item = only(world.run()["escalated"])
    assert (item["queue"], item["assignee"], item["priority"]) == ("legal", None, 9)


def test_items_are_listed_oldest_first(world: World) -> None:
    convs = [world.open(world.customer(f"o{n}@example.com"), 0) for n in range(4)]
    # Escalated in an order that is neither creation order nor id order.
    for minutes, conv in zip((30, 10, 40, 20), convs, strict=True):
        conv.escalate(f"at {minutes}", actor=AGENT, at=at(minutes))
        world.store.save(conv)
    items = world.run()["escalated"]
    assert [i["since"] for i in items] == [at(10), at(20), at(30), at(40)]
    assert ids(items) == [str(convs[n].id) for n in (1, 3, 0, 2)]
    assert ids(escalation_queues(world.db, limit=2)[0]["items"]) == ids(items)[:2]


def test_a_merge_into_a_vip_customer_queues_the_absorbed_conversations(world: World) -> None:
    kim = world.customer("kim@example.com", vip=True)
    other = world.customer("kim.work@example.com")
    absorbed = world.open(other, 0)
    world.message(absorbed, 0)
    world.message(absorbed, 10)
    assert world.run()["vip"] == []

    kim.absorb(other, actor=AGENT, at=at(20))
    world.store.save(kim, other)
    item = only(world.run()["vip"])
    assert (item["conversation"], item["customer"], item["since"]) == (
        str(absorbed.id),
        str(kim.id),
        at(20),
    )
    # The absorbed customer's contacts count for the survivor.
    own = world.open(kim, 30)
    world.message(own, 30)
    assert only(world.run()["repeat_contact"])["conversation"] == str(own.id)

    kim.undo_merge(other, actor=AGENT, at=at(40))
    world.store.save(kim, other)
    assert ids(world.run()["vip"]) == [str(own.id)]


# -- live equals rebuilt ------------------------------------------------------------------


def busy_history(w: World) -> None:
    """Every rule at least once, over many customers and a few days."""
    customers = [w.customer(f"b{n}@example.com", vip=n % 7 == 0) for n in range(12)]
    convs: list[Conversation] = []
    for n, customer in enumerate(customers):
        conv = w.open(customer, n)
        convs.append(conv)
        for k in range(n % 4 + 1):
            w.message(conv, n + hours(5 * k))
        if n % 3 == 0:
            conv.escalate(f"reason {n}", actor=AGENT, at=at(n + 100))
        if n % 4 == 1:
            conv.record_sla("first_response", at(n + 60), breached=True, actor="sla", at=at(n + 61))
        if n % 5 == 2:
            conv.enter_queue("billing", n, reason="rule", actor="router", at=at(n + 2))
            conv.assign(f"agent{n}", actor="router", at=at(n + 3))
        w.store.save(conv)
        if n % 5 == 0:
            w.activity(conv, n + 200, "ivr.selected", action="supervisor")
        if n % 2 == 0:
            conv.resolve(actor=AGENT, at=at(n + hours(30)))
            w.store.save(conv)
            w.csat(conv, n + hours(31), n % 5 + 1)
    customers[3].set_vip(True, actor=AGENT, at=at(hours(40)))
    customers[7].set_vip(False, actor=AGENT, at=at(hours(40)))
    w.store.save(customers[3], customers[7])
    for conv in convs[:6]:
        if conv.status == "resolved":
            conv.reopen(actor=AGENT, at=at(hours(50)))
            w.store.save(conv)
    for conv in convs[:3]:
        conv.resolve(actor=AGENT, at=at(hours(60)))
        w.store.save(conv)
    customers[1].absorb(customers[2], actor=AGENT, at=at(hours(70)))
    w.store.save(customers[1], customers[2])
    w.message(convs[1], hours(71))
    customers[1].undo_merge(customers[2], actor=AGENT, at=at(hours(72)))
    w.store.save(customers[1], customers[2])


def all_rows(db: ReadModelDB, projection: Escalations) -> dict[str, list[tuple[Any, ...]]]:
    with db.read() as tx:
        state = active_generation(tx, projection.name)
        assert state is not None
        return {
            name.rsplit("_g", 1)[0]: sorted(
                tx.execute(f"SELECT * FROM {name}").fetchall(), key=repr
            )
            for name in projection.tables(state.generation)
        }


def test_live_event_by_event_equals_rebuilt_from_the_first_event(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    busy_history(world)
    projection = Escalations()
    live = ProjectionRunner(world.store, world.db, [projection])
    while live.run_once(limit=1):
        pass
    live_rows = all_rows(world.db, projection)
    live_queues = world.queues()
    assert all(live_queues[q] for q in QUEUES), live_queues

    monkeypatch.setitem(PROJECTIONS, NAME, Escalations)
    result = rebuild(world.store, world.db, NAME, from_start=True, batch_size=10_000)
    assert (result.previous_generation, result.generation) == (1, 2)
    assert all_rows(world.db, projection) == live_rows
    assert world.queues() == live_queues


def test_two_runners_taking_turns_equal_one_rebuilt_from_the_first_event(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each runner keeps the rows it read between its batches; the other's batches in
    between make them stale, which the generation's position tells it."""
    busy_history(world)
    first, second = (ProjectionRunner(world.store, world.db, [Escalations()]) for _ in range(2))
    while first.run_once(limit=3) + second.run_once(limit=2):
        pass
    assert first.stats.processed[NAME]
    assert second.stats.processed[NAME]
    live_rows = all_rows(world.db, Escalations())

    monkeypatch.setitem(PROJECTIONS, NAME, Escalations)
    rebuild(world.store, world.db, NAME, from_start=True, batch_size=10_000)
    assert all_rows(world.db, Escalations()) == live_rows


def test_past_its_cache_limit_a_runner_keeps_nothing_and_writes_the_same_rows(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    busy_history(world)
    projection = Escalations(cache_limit=5)
    runner = ProjectionRunner(world.store, world.db, [projection])
    while runner.run_once(limit=4):
        assert projection.kept.held is None or projection.kept.held.size() <= 5
    live_rows = all_rows(world.db, Escalations())

    monkeypatch.setitem(PROJECTIONS, NAME, Escalations)
    rebuild(world.store, world.db, NAME, from_start=True, batch_size=10_000)
    assert all_rows(world.db, Escalations()) == live_rows
