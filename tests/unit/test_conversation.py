"""The Conversation aggregate, given / when / then: given the events of earlier commands,
when a command, then the events it records (type and fields) or the error it raises and no
event at all."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import reduce
from typing import Any
from uuid import UUID

import pytest

from inbox.domain import ids
from inbox.domain.conversation import CUSTOMER, OPEN, PENDING, RESOLVED, Conversation
from inbox.domain.errors import ConversationStateError

Step = Callable[[Conversation], object]
Expected = Sequence[tuple[type[Any], dict[str, Any]]]

CUSTOMER_ID = "9b0a4a55-3f6e-5d35-9c2b-1f9d3b1f0c11"
T0 = "2026-11-27T10:00:00.000000Z"
T1 = "2026-11-27T10:05:00.000000Z"
T2 = "2026-11-27T10:10:00.000000Z"
T3 = "2026-11-27T10:15:00.000000Z"
T4 = "2026-11-27T10:20:00.000000Z"


def _state(aggregate: Any) -> dict[str, Any]:
    """A deep copy of the aggregate's state (lists inside it change in place)."""
    return copy.deepcopy({k: v for k, v in vars(aggregate).items() if k != "_pending_events"})


class Scenario:
    """One conversation and every event it recorded so far."""

    def __init__(self, *steps: Step) -> None:
        self.conversation = Conversation(
            customer_id=CUSTOMER_ID,
            channel="sms",
            queue="support",
            previous=None,
            source_event_id="evt-open",
            at=T0,
        )
        self.history: list[Any] = list(self.conversation.collect_events())
        for step in steps:
            step(self.conversation)
            self.history.extend(self.conversation.collect_events())

    def when(self, command: Step) -> list[Any]:
        command(self.conversation)
        new = list(self.conversation.collect_events())
        self.history.extend(new)
        # State changes only when an event is applied: replaying rebuilds it exactly.
        rebuilt = reduce(lambda aggregate, event: event.mutate(aggregate), self.history, None)
        assert _state(rebuilt) == _state(self.conversation)
        return new

    def refused(self, command: Step, match: str) -> None:
        before = _state(self.conversation)
        with pytest.raises(ConversationStateError, match=match):
            command(self.conversation)
        assert self.conversation.pending_events == []
        assert _state(self.conversation) == before


def assert_events(events: Sequence[Any], expected: Expected) -> None:
    assert [type(e) for e in events] == [kind for kind, _ in expected]
    for event, (_, fields) in zip(events, expected, strict=True):
        assert {name: getattr(event, name) for name in fields} == fields


# --------------------------------------------------------------------------- steps


def customer_writes(
    at: str = T1, *, automatic: bool = False, channel: str = "sms", text: str = "hello"
) -> Step:
    return lambda c: c.receive_message(
        channel=channel,
        via="+15005550006",
        message_id="SM1",
        text=text,
        subject=None,
        html=None,
        attachments=[],
        thread_ref=None,
        in_reply_to=[],
        automatic=automatic,
        source_event_id=f"evt-msg-{at}",
        at=at,
    )


def activity(name: str, at: str = T1, channel: str = "voice") -> Step:
    return lambda c: c.record_activity(
        name, channel=channel, data={"call_sid": "CA1"}, source_event_id=f"evt-{name}", at=at
    )


def delivery(at: str = T2) -> Step:
    return lambda c: c.record_delivery(
        channel="sms",
        message_id="out-1",
        status="delivered",
        error=None,
        source_event_id="evt-dlv",
        at=at,
    )


def csat(at: str = T2) -> Step:
    return lambda c: c.record_csat(
        channel="chat", score=4, comment="ok", source_event_id="evt-csat", at=at
    )


def mark_pending(at: str = T1) -> Step:
    return lambda c: c.mark_pending(actor="ann", at=at)


def resolve(at: str = T2) -> Step:
    return lambda c: c.resolve(actor="ann", at=at)


def reopen(at: str = T3) -> Step:
    return lambda c: c.reopen(actor="ann", at=at)


def assign(agent: str | None, at: str = T1) -> Step:
    return lambda c: c.assign(agent, actor="sup", at=at)


def transfer(queue: str, at: str = T1) -> Step:
    return lambda c: c.transfer(queue, actor="ann", at=at)


def escalate(at: str = T1) -> Step:
    return lambda c: c.escalate("angry", actor="ann", at=at)


def reply(text: str = "On its way", at: str = T1) -> Step:
    return lambda c: c.queue_reply("out-1", "sms", text, actor="ann", at=at)


def note(text: str = "called the courier", at: str = T1) -> Step:
    return lambda c: c.add_note(text, actor="ann", at=at)


# --------------------------------------------------------------------------- opening


def test_a_conversation_opens_named_after_its_first_contact_event() -> None:
    scenario = Scenario()
    conversation = scenario.conversation
    assert_events(
        scenario.history,
        [
            (
                Conversation.Opened,
                {
                    "customer_id": CUSTOMER_ID,
                    "channel": "sms",
                    "queue": "support",
                    "previous": None,
                    "source_event_id": "evt-open",
                    "at": T0,
                    "originator_version": 1,
                },
            )
        ],
    )
    assert conversation.id == ids.conversation_id(CUSTOMER_ID, "evt-open")
    assert conversation.id == Conversation.create_id(CUSTOMER_ID, "evt-open")
    assert conversation.status == OPEN
    assert conversation.assignee is None
    assert conversation.waiting_since is None
    assert conversation.inbound_count == 0


def test_a_later_conversation_points_at_the_previous_one() -> None:
    previous = str(ids.conversation_id(CUSTOMER_ID, "evt-old"))
    conversation = Conversation(
        customer_id=CUSTOMER_ID,
        channel="email",
        queue=None,
        previous=previous,
        source_event_id="evt-new",
        at=T0,
    )
    (opened,) = conversation.collect_events()
    assert isinstance(opened, Conversation.Opened)
    assert opened.previous == previous
    assert conversation.id != UUID(previous)


def test_a_conversation_cannot_be_named_without_an_event() -> None:
    with pytest.raises(ValueError, match="named after the event that opened it"):
        Conversation.create_id(CUSTOMER_ID, None)


# --------------------------------------------------------------------------- customer side


def test_open_a_customer_message_is_recorded_and_the_customer_waits() -> None:
    scenario = Scenario()
    events = scenario.when(customer_writes(T1, channel="whatsapp"))
    assert_events(
        events,
        [
            (
                Conversation.MessageReceived,
                {
                    "channel": "whatsapp",
                    "message_id": "SM1",
                    "text": "hello",
                    "automatic": False,
                    "source_event_id": f"evt-msg-{T1}",
                    "at": T1,
                },
            )
        ],
    )
    conversation = scenario.conversation
    assert conversation.status == OPEN
    assert conversation.waiting_since == T1
    assert conversation.inbound_count == 1
    assert conversation.last_inbound_channel == "whatsapp"


def test_the_customer_keeps_waiting_since_their_first_unanswered_message() -> None:
    scenario = Scenario(customer_writes(T1))
    scenario.when(customer_writes(T2))
    assert scenario.conversation.waiting_since == T1
    assert scenario.conversation.inbound_count == 2


def test_open_to_pending() -> None:
    scenario = Scenario(customer_writes(T1))
    events = scenario.when(mark_pending(T2))
    assert_events(events, [(Conversation.MarkedPending, {"actor": "ann", "at": T2})])
    assert scenario.conversation.status == PENDING


def test_pending_to_open_when_the_customer_writes() -> None:
    scenario = Scenario(mark_pending(T1))
    events = scenario.when(customer_writes(T2))
    # Not a reopen: just a message, which puts the conversation back in the open state.
    assert_events(events, [(Conversation.MessageReceived, {"automatic": False, "at": T2})])
    assert scenario.conversation.status == OPEN
    assert scenario.conversation.reopen_count == 0
    assert scenario.conversation.waiting_since == T2


@pytest.mark.parametrize(("name", "channel"), [("call.started", "voice"), ("chat.started", "chat")])
def test_pending_to_open_when_the_customer_calls_or_chats(name: str, channel: str) -> None:
    scenario = Scenario(mark_pending(T1))
    events = scenario.when(activity(name, T2, channel))
    assert_events(
        events,
        [
            (
                Conversation.ActivityRecorded,
                {"activity": name, "channel": channel, "data": {"call_sid": "CA1"}, "at": T2},
            )
        ],
    )
    assert scenario.conversation.status == OPEN
    assert scenario.conversation.last_inbound_channel == channel
    assert scenario.conversation.inbound_count == 1


def test_a_call_is_the_last_inbound_contact_but_not_the_last_message() -> None:
    scenario = Scenario(customer_writes(T1))
    scenario.when(activity("call.started", T2))
    assert scenario.conversation.last_inbound_channel == "voice"
    assert scenario.conversation.last_message_channel == "sms"
    scenario.when(activity("chat.started", T3, "chat"))
    assert scenario.conversation.last_message_channel == "chat"
    # a voicemail (the IVR records it as a message on the voice channel) is no channel to
    # reply through either
    scenario.when(customer_writes(T4, channel="voice", text="call me back"))
    assert scenario.conversation.last_inbound_channel == "voice"
    assert scenario.conversation.last_message_channel == "chat"


def test_an_automatic_message_leaves_a_pending_conversation_pending() -> None:
    scenario = Scenario(mark_pending(T1))
    events = scenario.when(customer_writes(T2, automatic=True, text="Out of office"))
    assert_events(events, [(Conversation.MessageReceived, {"automatic": True})])
    assert scenario.conversation.status == PENDING
    assert scenario.conversation.waiting_since is None
    assert scenario.conversation.inbound_count == 0


@pytest.mark.parametrize("name", ["ivr.selected", "call.queued", "call.ended", "chat.ended"])
def test_other_call_and_chat_activity_leaves_a_pending_conversation_pending(name: str) -> None:
    scenario = Scenario(mark_pending(T1))
    assert_events(scenario.when(activity(name, T2)), [(Conversation.ActivityRecorded, {})])
    assert scenario.conversation.status == PENDING


def test_an_answered_call_stops_the_wait() -> None:
    scenario = Scenario(activity("call.started", T1), activity("call.queued", T1))
    assert scenario.conversation.waiting_since == T1
    scenario.when(activity("call.answered", T2))
    assert scenario.conversation.waiting_since is None


@pytest.mark.parametrize(
    ("step", "kind", "fields"),
    [
        (
            delivery(),
            Conversation.DeliveryStatusRecorded,
            {"message_id": "out-1", "status": "delivered", "error": None, "channel": "sms"},
        ),
        (
            csat(),
            Conversation.CsatSubmitted,
            {"score": 4, "comment": "ok", "channel": "chat", "source_event_id": "evt-csat"},
        ),
    ],
    ids=["delivery", "csat"],
)
@pytest.mark.parametrize(
    "given", [(), (mark_pending(),), (resolve(),)], ids=["open", "pending", "resolved"]
)
def test_delivery_and_csat_are_recorded_and_change_no_state(
    given: tuple[Step, ...], step: Step, kind: type[Any], fields: dict[str, Any]
) -> None:
    scenario = Scenario(*given)
    before = _state(scenario.conversation)
    assert_events(scenario.when(step), [(kind, fields)])
    after = _state(scenario.conversation)
    assert {k: v for k, v in after.items() if k not in ("_version", "_modified_on")} == {
        k: v for k, v in before.items() if k not in ("_version", "_modified_on")
    }


# --------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("given", [(), (mark_pending(),)], ids=["open", "pending"])
def test_open_or_pending_to_resolved(given: tuple[Step, ...]) -> None:
    scenario = Scenario(customer_writes(T0), *given)
    events = scenario.when(resolve(T2))
    assert_events(events, [(Conversation.Resolved, {"actor": "ann", "at": T2})])
    conversation = scenario.conversation
    assert conversation.status == RESOLVED
    assert conversation.resolved_at == T2
    assert conversation.waiting_since is None


def test_an_agent_reopens_a_resolved_conversation() -> None:
    scenario = Scenario(resolve(T2))
    events = scenario.when(reopen(T3))
    assert_events(
        events,
        [(Conversation.Reopened, {"reason": "reopened by agent", "actor": "ann", "at": T3})],
    )
    conversation = scenario.conversation
    assert conversation.status == OPEN
    assert conversation.resolved_at is None
    assert conversation.reopen_count == 1


def test_a_reopen_can_give_its_reason() -> None:
    scenario = Scenario(resolve(T2))
    events = scenario.when(lambda c: c.reopen(actor="sup", at=T3, reason="wrong resolution"))
    assert_events(events, [(Conversation.Reopened, {"reason": "wrong resolution"})])


def test_the_customer_writing_to_a_resolved_conversation_reopens_it() -> None:
    scenario = Scenario(customer_writes(T0), resolve(T1))
    events = scenario.when(customer_writes(T2))
    assert_events(
        events,
        [
            (
                Conversation.Reopened,
                {"reason": "customer wrote again", "actor": CUSTOMER, "at": T2},
            ),
            (Conversation.MessageReceived, {"automatic": False, "at": T2}),
        ],
    )
    conversation = scenario.conversation
    assert conversation.status == OPEN
    assert conversation.reopen_count == 1
    assert conversation.resolved_at is None
    assert conversation.waiting_since == T2
    assert conversation.inbound_count == 2


@pytest.mark.parametrize(("name", "channel"), [("call.started", "voice"), ("chat.started", "chat")])
def test_the_customer_calling_or_chatting_reopens_a_resolved_conversation(
    name: str, channel: str
) -> None:
    scenario = Scenario(resolve(T1))
    events = scenario.when(activity(name, T2, channel))
    assert_events(
        events,
        [
            (Conversation.Reopened, {"reason": f"customer {name}", "actor": CUSTOMER}),
            (Conversation.ActivityRecorded, {"activity": name}),
        ],
    )
    assert scenario.conversation.status == OPEN


def test_an_automatic_message_never_reopens() -> None:
    scenario = Scenario(resolve(T1))
    events = scenario.when(customer_writes(T2, automatic=True, text="Mail delivery failed"))
    assert_events(events, [(Conversation.MessageReceived, {"automatic": True})])
    conversation = scenario.conversation
    assert conversation.status == RESOLVED
    assert conversation.resolved_at == T1
    assert conversation.reopen_count == 0
    assert conversation.waiting_since is None


@pytest.mark.parametrize("name", ["ivr.selected", "call.ended", "call.abandoned", "chat.ended"])
def test_call_and_chat_follow_ups_do_not_reopen(name: str) -> None:
    scenario = Scenario(resolve(T1))
    assert_events(scenario.when(activity(name, T2)), [(Conversation.ActivityRecorded, {})])
    assert scenario.conversation.status == RESOLVED


def test_resolve_reopen_resolve_again() -> None:
    scenario = Scenario(resolve(T1), reopen(T2), customer_writes(T2), resolve(T3))
    assert scenario.conversation.status == RESOLVED
    assert scenario.conversation.resolved_at == T3
    events = scenario.when(customer_writes("2026-11-28T09:00:00.000000Z"))
    assert [type(e) for e in events] == [Conversation.Reopened, Conversation.MessageReceived]
    assert scenario.conversation.reopen_count == 2


# --------------------------------------------------------------------------- agent side


def test_assign_and_unassign() -> None:
    scenario = Scenario()
    assert_events(
        scenario.when(assign("ann", T1)),
        [(Conversation.Assigned, {"agent": "ann", "actor": "sup", "at": T1})],
    )
    assert scenario.conversation.assignee == "ann"
    assert_events(scenario.when(assign("bob", T2)), [(Conversation.Assigned, {"agent": "bob"})])
    assert_events(scenario.when(assign(None, T3)), [(Conversation.Assigned, {"agent": None})])
    assert scenario.conversation.assignee is None


def test_assign_a_pending_conversation() -> None:
    scenario = Scenario(mark_pending())
    assert_events(scenario.when(assign("ann")), [(Conversation.Assigned, {"agent": "ann"})])
    assert scenario.conversation.status == PENDING


def test_a_transfer_changes_the_queue_and_drops_the_assignee() -> None:
    scenario = Scenario(assign("ann"))
    events = scenario.when(transfer("billing", T2))
    assert_events(
        events, [(Conversation.Transferred, {"queue": "billing", "actor": "ann", "at": T2})]
    )
    assert scenario.conversation.queue == "billing"
    assert scenario.conversation.assignee is None


def test_escalate() -> None:
    scenario = Scenario()
    assert_events(
        scenario.when(escalate(T1)),
        [(Conversation.Escalated, {"reason": "angry", "actor": "ann", "at": T1})],
    )
    assert scenario.conversation.escalated


def test_a_reply_answers_the_waiting_customer() -> None:
    scenario = Scenario(customer_writes(T0))
    events = scenario.when(reply("On its way", T1))
    assert_events(
        events,
        [
            (
                Conversation.ReplyQueued,
                {
                    "message_id": "out-1",
                    "channel": "sms",
                    "text": "On its way",
                    "actor": "ann",
                    "at": T1,
                },
            )
        ],
    )
    assert scenario.conversation.waiting_since is None
    assert scenario.conversation.status == OPEN


def test_a_note_changes_no_state() -> None:
    scenario = Scenario(customer_writes(T0))
    assert_events(
        scenario.when(note("called the courier", T1)),
        [(Conversation.NoteAdded, {"text": "called the courier", "actor": "ann", "at": T1})],
    )
    assert scenario.conversation.waiting_since == T0


@pytest.mark.parametrize("given", [(), (mark_pending(),), (resolve(),)])
def test_notes_and_replies_are_allowed_in_every_state(given: tuple[Step, ...]) -> None:
    scenario = Scenario(*given)
    status = scenario.conversation.status
    assert_events(scenario.when(note()), [(Conversation.NoteAdded, {})])
    assert_events(scenario.when(reply()), [(Conversation.ReplyQueued, {})])
    assert scenario.conversation.status == status


# --------------------------------------------------------------------------- refusals

REFUSALS: list[tuple[str, tuple[Step, ...], Step, str]] = [
    (
        "pending-to-pending",
        (mark_pending(),),
        mark_pending(T2),
        "only an open conversation can wait; it is pending",
    ),
    (
        "resolved-to-pending",
        (resolve(),),
        mark_pending(T3),
        "only an open conversation can wait; it is resolved",
    ),
    ("resolve-twice", (resolve(),), resolve(T3), "already resolved"),
    ("reopen-open", (), reopen(), "only a resolved conversation can reopen; it is open"),
    (
        "reopen-pending",
        (mark_pending(),),
        reopen(),
        "only a resolved conversation can reopen; it is pending",
    ),
    (
        "reopen-reopened",
        (resolve(), reopen()),
        reopen(),
        "only a resolved conversation can reopen; it is open",
    ),
    (
        "assign-resolved",
        (resolve(),),
        assign("ann", T3),
        "a resolved conversation cannot be assigned",
    ),
    ("assign-same-agent", (assign("ann"),), assign("ann", T2), "already assigned to ann"),
    ("unassign-unassigned", (), assign(None), "already assigned to None"),
    (
        "transfer-resolved",
        (resolve(),),
        transfer("billing", T3),
        "a resolved conversation cannot be transferred",
    ),
    ("transfer-same-queue", (), transfer("support"), "already in queue support"),
    (
        "escalate-resolved",
        (resolve(),),
        escalate(T3),
        "a resolved conversation cannot be escalated",
    ),
    ("escalate-twice", (escalate(),), escalate(T2), "already escalated"),
    ("blank-note", (), note("  "), "a note needs text"),
    ("blank-reply", (), reply("\n"), "a reply needs text"),
]


@pytest.mark.parametrize(
    ("given", "when", "error"), [pytest.param(g, w, e, id=i) for i, g, w, e in REFUSALS]
)
def test_a_command_the_state_forbids_is_refused_without_events(
    given: tuple[Step, ...], when: Step, error: str
) -> None:
    Scenario(*given).refused(when, error)


def test_every_event_carries_a_class_version() -> None:
    # eventsourcing adds the base classes `Event` and `Created` to every aggregate class.
    kinds = [
        value
        for name, value in vars(Conversation).items()
        if isinstance(value, type)
        and issubclass(value, Conversation.Event)
        and name not in ("Event", "Created")
    ]
    assert len(kinds) == 20
    versions = {kind.__name__: getattr(kind, "class_version", None) for kind in kinds}
    assert versions.pop("DeliveryStatusRecorded") == 2  # provider_id added; v1 is upcast
    assert versions.pop("MessageReceived") == 2  # via added; v1 is upcast
    assert set(versions.values()) == {1}


@pytest.mark.parametrize("priority", [-1, 10, 10**19, True, "9"])
def test_a_priority_outside_0_to_9_is_refused(priority: Any) -> None:
    scenario = Scenario()
    scenario.refused(
        lambda c: c.enter_queue("sales", priority, reason="ivr", actor="router", at=T1),
        "priority must be a whole number from 0 to 9",
    )
    scenario.refused(
        lambda c: c.change_priority(priority, reason="vip", actor="router", at=T1),
        "priority must be a whole number from 0 to 9",
    )
