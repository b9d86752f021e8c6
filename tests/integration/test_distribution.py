"""Automatic distribution and SLA monitoring against the real event store (SQLite and
PostgreSQL): contact events go in through the real ingest path, agents and queues through the
Directory, agents act through Commands; the Distributor follows the log and records its
decisions. The clock is injected, so offer timeouts and SLA deadlines are exact."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import Tracking
from prometheus_client import REGISTRY

from inbox.agents import Directory, agent_profile, queue_spec
from inbox.commands import Commands
from inbox.contact import ContactEvent, CustomerRef, validate
from inbox.distribution import Distributor
from inbox.domain import ids
from inbox.domain.callback import Callback
from inbox.domain.conversation import Conversation
from inbox.domain.errors import ConversationStateError
from inbox.domain.time import iso
from inbox.ingest import Ingestor
from infra.store import ContactEventRow, EventStore, open_event_store
from tests.conftest import SettingsFactory

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Center:
    store: EventStore
    clock: FakeClock
    directory: Directory
    commands: Commands
    ingestor: Ingestor
    offset: int = 0

    def distributor(self, **router: Any) -> Distributor:
        from inbox.domain.routing import Router

        return Distributor(
            self.store,
            self.directory,
            router=Router(**router) if router else None,
            clock=self.clock,
        )

    def agent(self, agent_id: str, **profile: Any) -> None:
        body = {"name": agent_id.title(), "role": "agent", **profile}
        self.directory.register(agent_id, agent_profile(body), actor="admin")
        self.directory.set_presence(agent_id, "available", reason="test", actor=agent_id)

    def queue(self, name: str, **spec: Any) -> None:
        self.directory.define_queue(name, queue_spec(name, spec), actor="admin")

    def contact(
        self,
        event_id: str,
        *,
        channel: str = "email",
        email: str | None = None,
        visitor: str | None = None,
        text: str = "hello",
        via: str | None = None,
        type: str = "message.received",
        payload: dict[str, Any] | None = None,
    ) -> Conversation:
        raw = ContactEvent(
            event_id=event_id,
            occurred_at=self.clock.now,
            channel=channel,  # type: ignore[arg-type]
            type=type,  # type: ignore[arg-type]
            customer=CustomerRef(email=email, visitor=visitor),
            payload=payload if payload is not None else {"text": text, "via": via},
        )
        event = validate(raw, now=self.clock.now + timedelta(days=1))
        row = ContactEventRow(event.event_id, "contact-events", 0, self.offset)
        self.offset += 1
        self.ingestor.apply_batch([(event, row)], Tracking("contact-events:0", self.offset))
        key = f"email:{email}" if email else f"visitor:{visitor}"
        claim = self.store.get(ids.claim_id(key))
        customer = self.store.get(UUID(claim.customer_id))
        return self.conversation(UUID(customer.current_conversation_id))

    def conversation(self, conversation_id: UUID) -> Conversation:
        conversation = self.store.get(conversation_id)
        assert isinstance(conversation, Conversation)
        return conversation

    def events_of(self, conversation_id: UUID) -> list[str]:
        return [type(e).__name__ for e in self.store.events_of(conversation_id)]


@pytest.fixture
def center(database_url: str, settings: SettingsFactory) -> Iterator[Center]:
    store = open_event_store(settings(database_url, bootstrap=None))
    clock = FakeClock()
    try:
        yield Center(
            store,
            clock,
            Directory(store, admin_token="admin-token", clock=clock),
            Commands(store, clock=clock),
            Ingestor(store),
        )
    finally:
        store.close()


def test_an_email_goes_to_the_free_agent_and_freed_capacity_is_used_at_once(
    center: Center,
) -> None:
    center.agent("ann", capacity={"email": 1})
    first = center.contact("m1", email="a@example.com")
    center.clock.advance(1)
    second = center.contact("m2", email="b@example.com")
    distributor = center.distributor()

    distributor.step()

    assert center.conversation(first.id).assignee == "ann"  # oldest first
    assert center.conversation(second.id).assignee is None  # capacity 1 is never exceeded
    assert center.conversation(first.id).queue == "default"

    center.commands.resolve(first.id, actor="ann")
    distributor.step()  # the very next round, no sweep interval

    assert center.conversation(second.id).assignee == "ann"


def test_an_event_the_distributor_cannot_apply_is_skipped_and_routing_goes_on(
    center: Center,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Stored before the gate checked call priorities (it refuses this now): the routing
    process logs it and goes on for everyone else, instead of failing every round."""
    center.agent("ann", capacity={"email": 1, "voice": 1})
    call = center.contact(
        "CA9:s",
        type="call.started",
        payload={"call_sid": "CA9"},
        channel="voice",
        email="caller@example.com",
    )
    legacy = center.conversation(call.id)
    legacy.record_activity(
        "call.queued",
        channel="voice",
        data={"call_sid": "CA9", "queue": "sales", "priority": "high"},
        source_event_id="legacy-queued",
        at=iso(center.clock.now),
    )
    center.store.save(legacy)
    mail = center.contact("m1", email="a@example.com")
    distributor = center.distributor()
    caplog.set_level(logging.ERROR, logger="inbox.distribution")

    distributor.step()

    assert "(Conversation.ActivityRecorded of" in caplog.text
    assert "not applied" in caplog.text
    assert center.conversation(mail.id).assignee == "ann"  # the next event was routed
    assert distributor.caught_up


def test_entry_points_and_keywords_choose_the_queue(center: Center) -> None:
    center.queue("billing", skill="billing", entry_points=["billing@example.com"])
    center.queue("returns", keywords=["refund"])
    center.agent("bob", skills=["billing"], capacity={"email": 5})
    center.agent("cy", capacity={"email": 5})
    billing = center.contact("m1", email="a@example.com", via="billing@example.com")
    returns = center.contact("m2", email="b@example.com", text="I want a REFUND please")
    other = center.contact("m3", email="c@example.com", text="hi")

    center.distributor().step()

    assert center.conversation(billing.id).queue == "billing"
    assert center.conversation(billing.id).assignee == "bob"  # the only one with the skill
    assert center.conversation(returns.id).queue == "returns"
    assert center.conversation(other.id).queue == "default"


def test_a_chat_offer_not_accepted_goes_to_the_next_agent_and_misses_make_away(
    center: Center,
) -> None:
    center.agent("ann", capacity={"chat": 1})
    center.agent("bob", capacity={"chat": 1})
    distributor = center.distributor(offer_timeouts={"chat": 30.0}, max_misses=1)
    chat = center.contact("c1", channel="chat", visitor="v1", text="help")

    distributor.step()
    first = center.conversation(chat.id).offered_to
    assert first in ("ann", "bob")

    center.clock.advance(31)
    distributor.step()
    distributor.step()  # reads its own lapse back, then offers again

    conversation = center.conversation(chat.id)
    second = "bob" if first == "ann" else "ann"
    assert conversation.offered_to == second
    assert conversation.assignee is None
    missed = center.directory.agent(first)
    assert missed is not None
    assert missed.presence == "away"

    center.commands.accept_offer(chat.id, second)
    assert center.conversation(chat.id).assignee == second
    assert "OfferLapsed" in center.events_of(chat.id)


def test_two_agents_claiming_one_conversation_one_wins(center: Center) -> None:
    chat = center.contact("c1", channel="chat", visitor="v1")
    center.commands.assign(chat.id, "ann", actor="ann", claim=True)
    with pytest.raises(ConversationStateError, match="already assigned to ann"):
        center.commands.assign(chat.id, "bob", actor="bob", claim=True)
    assert center.conversation(chat.id).assignee == "ann"


def test_an_agent_going_away_loses_the_offer_to_the_next(center: Center) -> None:
    center.agent("ann", capacity={"chat": 1})
    distributor = center.distributor()
    chat = center.contact("c1", channel="chat", visitor="v1")
    distributor.step()
    assert center.conversation(chat.id).offered_to == "ann"

    center.directory.set_presence("ann", "away", reason="lunch", actor="ann")
    center.agent("bob", capacity={"chat": 1})
    distributor.step()
    distributor.step()

    conversation = center.conversation(chat.id)
    assert conversation.offered_to == "bob"
    assert center.events_of(chat.id).count("OfferLapsed") == 1


def test_sla_warning_then_breach_with_the_policy_actions(center: Center) -> None:
    center.queue(
        "vip",
        entry_points=["vip@example.com"],
        sla={"timezone": "UTC", "targets": {"0": {"first_response": "10m"}}},
        sla_actions={"warning": ["alert"], "breach": ["alert", "raise_priority", "escalate"]},
    )
    conversation = center.contact("m1", email="a@example.com", via="vip@example.com")
    distributor = center.distributor()
    distributor.step()
    assert center.conversation(conversation.id).queue == "vip"

    center.clock.advance(8 * 60 + 1)  # 80 % of 10 minutes
    distributor.step()
    assert center.events_of(conversation.id)[-1] == "SlaWarned"

    center.clock.advance(2 * 60)
    distributor.step()
    after = center.conversation(conversation.id)
    assert center.events_of(conversation.id)[-3:] == [
        "SlaBreached",
        "PriorityChanged",
        "Transferred",
    ]
    assert after.priority == 1
    assert after.queue == "escalations"

    distributor.step()
    center.clock.advance(3600)
    distributor.step()
    assert center.events_of(conversation.id).count("SlaBreached") == 1  # recorded once


def test_an_agent_reply_stops_the_first_response_clock(center: Center) -> None:
    center.queue(
        "support",
        entry_points=["help@example.com"],
        sla={"timezone": "UTC", "targets": {"0": {"first_response": "10m"}}},
    )
    conversation = center.contact("m1", email="a@example.com", via="help@example.com")
    distributor = center.distributor()
    distributor.step()
    center.commands.reply(conversation.id, "on it", channel=None, actor="ann")
    center.clock.advance(3600)
    distributor.step()
    assert "SlaBreached" not in center.events_of(conversation.id)
    assert "SlaWarned" not in center.events_of(conversation.id)


def test_a_restarted_distributor_neither_forgets_nor_doubles(center: Center) -> None:
    center.agent("ann", capacity={"chat": 2})
    first = center.contact("c1", channel="chat", visitor="v1")
    center.distributor().step()
    assert center.conversation(first.id).offered_to == "ann"
    before = center.store.max_notification_id()

    again = center.distributor()
    again.step()
    again.step()

    assert center.store.max_notification_id() == before  # nothing decided twice
    second = center.contact("c2", channel="chat", visitor="v2")
    again.step()
    assert center.conversation(second.id).offered_to == "ann"  # its capacity is 2


def _call(center: Center, step: str, type: str, **payload: Any) -> Conversation:
    return center.contact(
        f"CA1:{step}",
        channel="voice",
        email="caller@example.com",
        type=type,
        payload={"call_sid": "CA1", **payload},
    )


def test_a_queued_call_enters_the_ivr_queue_with_its_priority_and_is_offered(
    center: Center,
) -> None:
    center.queue("tech", skill="tech")
    center.agent("ann", skills=["tech"], capacity={"voice": 1})
    center.agent("bob", capacity={"voice": 1})  # no tech skill
    _call(center, "start", "call.started", to="+15005550006")
    call = _call(center, "queued", "call.queued", queue="tech", priority=1)
    distributor = center.distributor()
    distributor.step()
    conversation = center.conversation(call.id)
    assert conversation.queue == "tech"
    assert conversation.priority == 1
    assert conversation.offered_to == "ann"
    assert distributor.calls["CA1"] == str(call.id)


def test_a_callback_keeps_the_callers_place_after_they_hang_up(center: Center) -> None:
    _call(center, "start", "call.started", to="+15005550006")
    call = _call(center, "queued", "call.queued", queue="tech", priority=0)
    distributor = center.distributor()
    distributor.step()
    center.clock.advance(60)
    _call(center, "callback", "callback.requested", queue="tech", number="+14155550123")
    _call(center, "abandoned", "call.abandoned", queue="tech", queue_seconds=60)
    distributor.step()
    assert distributor.router.position(str(call.id)) == 1  # still waiting, first in line

    center.agent("ann", capacity={"voice": 1})
    distributor.step()
    assert center.conversation(call.id).offered_to == "ann"


def test_a_caller_who_hangs_up_in_the_queue_stops_waiting(center: Center) -> None:
    _call(center, "start", "call.started", to="+15005550006")
    call = _call(center, "queued", "call.queued", queue="tech", priority=0)
    distributor = center.distributor()
    distributor.step()
    _call(center, "abandoned", "call.abandoned", queue="tech", queue_seconds=30)
    distributor.step()
    assert distributor.router.position(str(call.id)) is None
    center.agent("ann", capacity={"voice": 1})
    distributor.step()
    assert center.conversation(call.id).offered_to is None


def test_live_gauges_show_queues_agents_and_callbacks(center: Center) -> None:
    center.queue("tech", skill="tech")
    center.agent("ann", capacity={"email": 1})  # no tech skill: the call waits
    _call(center, "start", "call.started", to="+15005550006")
    _call(center, "queued", "call.queued", queue="tech", priority=0)
    distributor = center.distributor()
    distributor.step()
    center.clock.advance(90)
    distributor.step()

    def sample(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, labels)

    assert sample("inbox_queue_depth", queue="tech") == 1
    assert sample("inbox_queue_longest_wait_seconds", queue="tech") == 90
    assert sample("inbox_agents", presence="available") == 1
    assert sample("inbox_agents", presence="away") == 0


def test_a_callback_asked_for_from_the_menu_joins_the_queue(center: Center) -> None:
    _call(center, "start", "call.started", to="+15005550006")
    call = _call(center, "callback", "callback.requested", queue="tech", number="+14155550123")
    center.agent("ann", capacity={"voice": 1})
    distributor = center.distributor()
    distributor.step()
    conversation = center.conversation(call.id)
    assert conversation.queue == "tech"
    assert conversation.offered_to == "ann"


def test_a_call_into_an_assigned_conversation_is_routed_to_that_agent_first(
    center: Center,
) -> None:
    center.agent("ann", capacity={"email": 5, "voice": 1})
    center.agent("bob", capacity={"voice": 1})
    email = center.contact("m1", email="caller@example.com")
    distributor = center.distributor()
    distributor.step()
    assert center.conversation(email.id).assignee == "ann"  # bob takes no email
    center.clock.advance(60)
    _call(center, "start", "call.started", to="+15005550006")
    _call(center, "queued", "call.queued", queue="default", priority=0)
    distributor.step()
    distributor.step()
    conversation = center.conversation(email.id)
    assert conversation.assignee is None
    assert conversation.offered_to == "ann"  # sticky: she served this customer


def test_a_waiting_caller_hears_an_honest_place_and_estimate(center: Center) -> None:
    center.agent("ann", capacity={"voice": 1})
    distributor = center.distributor()
    # ann handles one call of 300 s (talk 240 + hold 30 + wrap 30): the handle time to go by
    first = {"channel": "voice", "email": "first@example.com"}
    center.contact(
        "CA0:q", type="call.queued", payload={"call_sid": "CA0", "queue": "default"}, **first
    )
    distributor.step()
    center.contact(
        "CA0:a",
        type="call.answered",
        payload={"call_sid": "CA0", "queue": "default", "agent": "ann"},
        **first,
    )
    center.contact(
        "CA0:e",
        type="call.ended",
        payload={"call_sid": "CA0", "talk_seconds": 240, "hold_seconds": 30, "wrap_seconds": 30},
        **first,
    )
    distributor.step()
    # ann still holds that conversation's offer: busy; two callers queue behind each other
    _call(center, "queued", "call.queued", queue="default", priority=0)
    center.clock.advance(1)
    center.contact(
        "CA2:queued",
        channel="voice",
        email="second@example.com",
        type="call.queued",
        payload={"call_sid": "CA2", "queue": "default"},
    )
    distributor.step()
    assert distributor.queue_info("CA1", "default") == (1, 150.0, 0)  # half a handle time
    assert distributor.queue_info("CA2", "default") == (2, 450.0, 0)  # one more wave
    assert distributor.queue_info("CA9", "default")[0] == 3  # not in the log yet: last
    assert set(distributor.calls) == {"CA1", "CA2"}  # the call that ended is forgotten


def test_a_finished_callback_is_forgotten_and_a_failed_one_stops_the_wait(
    center: Center,
) -> None:
    call = _call(center, "queued", "call.queued", queue="tech", priority=0)
    _call(center, "callback", "callback.requested", queue="tech", number="+14155550123")
    _call(center, "abandoned", "call.abandoned", queue="tech", queue_seconds=60)
    callbacks = [
        Callback.request(
            source_event_id=f"cb{n}",
            conversation_id=str(call.id),
            call_sid="CA1",
            number="+14155550123",
            queue="tech",
            requested_at=iso(center.clock.now),
            at=iso(center.clock.now),
        )
        for n in range(3)
    ]
    center.store.save(*callbacks)
    distributor = center.distributor()
    distributor.step()
    assert set(distributor.callbacks) == {str(c.id) for c in callbacks}
    assert distributor.router.position(str(call.id)) == 1  # the caller keeps their place

    at = iso(center.clock.now)
    callbacks[0].cancel("asked twice", at=at)
    callbacks[1].start_dialing("ann", max_attempts=1, at=at)
    callbacks[1].dialed(1, "CA7", at=at)
    callbacks[1].complete(1, "CA7", at=at)
    center.store.save(callbacks[0], callbacks[1])
    distributor.step()
    assert set(distributor.callbacks) == {str(callbacks[2].id)}
    assert distributor.router.position(str(call.id)) == 1

    callbacks[2].give_up("no answer", at=at)
    center.store.save(callbacks[2])
    distributor.step()
    assert distributor.callbacks == {}
    assert distributor.router.position(str(call.id)) is None  # nobody waits for us now


def _to_do(distributor: Distributor) -> list[Any]:
    return [
        distributor._to_queue,
        distributor._wanted_queue,
        distributor._wanted_priority,
        distributor._to_release,
        distributor._withdrawn,
    ]


def test_a_mirror_keeps_the_queues_picture_and_no_to_do_list(center: Center) -> None:
    """The IVR's mirror (decide=False) follows the same log for its wait estimates; what
    the routing process must do is not its to do, so nothing of it piles up."""
    center.agent("ann", capacity={"email": 1})
    convs = [center.contact(f"m{n}", email=f"c{n}@example.com") for n in range(4)]
    routing = center.distributor()
    mirror = Distributor(center.store, center.directory, clock=center.clock, decide=False)

    for _ in range(2):
        mirror.step()
        routing.step()
    center.directory.set_presence("ann", "away", reason="lunch", actor="ann")
    mirror.step()

    assert [center.conversation(c.id).assignee for c in convs].count("ann") == 1
    assert mirror.router.depth("default") == routing.router.depth("default") == 3
    assert all(not todo for todo in _to_do(mirror))


def test_a_conversation_queued_by_an_agent_first_leaves_nothing_wanted(
    center: Center,
) -> None:
    center.queue("billing")
    conv = center.contact("m1", email="a@example.com")
    distributor = center.distributor()
    distributor.catch_up()  # it has seen the message: the conversation waits for a queue
    center.commands.transfer(conv.id, "billing", actor="sue")

    distributor.step()

    assert center.conversation(conv.id).queue == "billing"
    assert all(not todo for todo in _to_do(distributor))
