"""The stream's pure rules: which frame an event becomes, how a conversation's scope moves,
who may see a frame, and how a live frame is handed to a socket (written with its batch, or
queued behind what is already queued)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from inbox.access import Principal
from inbox.domain.conversation import Conversation
from inbox.domain.errors import ConversationStateError
from inbox.stream import (
    TYPES,
    Audience,
    ConversationScope,
    _Client,
    admits,
    message_of,
    next_scope,
    text_frame,
)
from projections.base import Event

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
AT = "2026-11-27T09:00:00.000000Z"
CONVERSATION = "0b6f1c5e-6a51-4b8e-9d1e-3f7e9c0f8a11"
SKILLS = {"billing": "billing", "tech": "tech", "general": None}
ANN = Principal("ann", "agent", frozenset({"billing"}))
SUE = Principal("sue", "supervisor", frozenset())


def event(name: str, **state: Any) -> Event:
    state.setdefault("at", AT)
    state.setdefault("timestamp", "2026-11-27T09:00:00+00:00")
    state.setdefault("originator_topic", "inbox.domain.conversation:Conversation")
    return Event(7, name, CONVERSATION, 2, state)


# --------------------------------------------------------------------------- frames


@pytest.mark.parametrize(("name", "kind"), sorted(TYPES.items()))
def test_each_domain_event_named_becomes_its_frame_type(name: str, kind: str) -> None:
    # given an event of that name
    # when it is mapped
    message = message_of(event(name, agent="ann", class_version=2), agent="ann")
    # then it has its type, its cursor and no bookkeeping in its data
    assert message is not None
    assert message["type"] == kind
    assert message["cursor"] == 7
    assert message["at"] == AT
    assert message["data"]["event"] == name
    assert not {"timestamp", "originator_topic", "class_version"} & set(message["data"])


@pytest.mark.parametrize(
    "name", ["Conversation.SurveyQueued", "Agent.Registered", "Agent.ProfileChanged", "X.Y"]
)
def test_other_events_are_not_sent(name: str) -> None:
    assert message_of(event(name)) is None


def test_a_message_says_its_direction_and_a_status_change_the_new_status() -> None:
    inbound = message_of(event("Conversation.MessageReceived", text="hi"))
    outbound = message_of(event("Conversation.ReplyQueued", text="hello"))
    pending = message_of(event("Conversation.MarkedPending"))
    assert inbound is not None
    assert outbound is not None
    assert pending is not None
    assert (inbound["data"]["direction"], outbound["data"]["direction"]) == ("in", "out")
    assert inbound["conversation"] == CONVERSATION
    assert pending["data"]["status"] == "pending"


def test_a_presence_change_names_the_agent_and_no_conversation() -> None:
    change = Event(9, "Agent.PresenceChanged", "uuid-of-ann", 3, {"status": "away", "at": AT})
    message = message_of(change, agent="ann")
    assert message is not None
    assert (message["type"], message["agent"], message["conversation"]) == (
        "presence",
        "ann",
        None,
    )


# --------------------------------------------------------------------------- scopes

agents = st.sampled_from(["ann", "bob", "carl"])
queues = st.sampled_from(["billing", "tech", "general"])
commands = st.one_of(
    st.tuples(st.just("assign"), agents),
    st.tuples(st.just("unassign"), st.none()),
    st.tuples(st.just("transfer"), queues),
    st.tuples(st.just("enter_queue"), queues),
    st.tuples(st.just("offer"), agents),
    st.tuples(st.just("lapse"), st.none()),
    st.tuples(st.just("resolve"), st.none()),
    st.tuples(st.just("reopen"), st.none()),
    st.tuples(st.just("pending"), st.none()),
    st.tuples(st.just("message"), st.none()),
    st.tuples(st.just("call"), st.none()),
)


def run(conversation: Conversation, command: str, arg: Any) -> None:
    actions = {
        "assign": lambda: conversation.assign(arg, actor="sue", at=AT),
        "unassign": lambda: conversation.assign(None, actor="sue", at=AT),
        "transfer": lambda: conversation.transfer(arg, actor="sue", at=AT),
        "enter_queue": lambda: conversation.enter_queue(
            arg, 1, reason="rule", actor="router", at=AT
        ),
        "offer": lambda: conversation.offer(arg, expires_at=None, reason="idle", at=AT),
        "lapse": lambda: conversation.lapse_offer(
            conversation.offered_to or "", reason="timeout", actor="router", at=AT
        ),
        "resolve": lambda: conversation.resolve(actor="sue", at=AT),
        "reopen": lambda: conversation.reopen(actor="sue", at=AT),
        "pending": lambda: conversation.mark_pending(actor="sue", at=AT),
        "message": lambda: conversation.receive_message(
            automatic=False,
            at=AT,
            channel="sms",
            via=None,
            message_id=None,
            text="more",
            subject=None,
            html=None,
            attachments=[],
            thread_ref=None,
            in_reply_to=[],
            source_event_id="e",
        ),
        "call": lambda: conversation.record_activity(
            "call.started", at=AT, channel="voice", data={}, source_event_id="c"
        ),
    }
    with contextlib.suppress(ConversationStateError):  # refused: nothing recorded
        actions[command]()


@FUZZ
@given(st.sampled_from([None, "billing", "tech"]), st.lists(commands, max_size=25))
def test_the_scope_folded_from_the_events_is_the_conversations_own(
    queue: str | None, steps: list[tuple[str, Any]]
) -> None:
    # given a conversation through any sequence of commands
    conversation = Conversation(
        customer_id="c", channel="sms", queue=queue, previous=None, source_event_id="s", at=AT
    )
    for command, arg in steps:
        run(conversation, command, arg)
    # when its events are folded into a scope
    scope: ConversationScope | None = None
    for recorded in conversation.collect_events():
        scope = next_scope(scope, type(recorded).__qualname__, vars(recorded))
    # then the scope is the conversation's queue, assignee, offer and status
    assert scope == ConversationScope(
        conversation.queue, conversation.assignee, conversation.offered_to, conversation.status
    )


# --------------------------------------------------------------------------- who sees


@pytest.mark.parametrize(
    ("scope", "sees"),
    [
        (ConversationScope("billing"), True),  # waiting in a queue of her skill
        (ConversationScope("general"), True),  # a queue that needs no skill
        (ConversationScope("tech"), False),
        (ConversationScope(None), False),  # not routed yet
        (ConversationScope("billing", assignee="bob"), False),  # someone else's
        (ConversationScope("tech", assignee="ann"), True),
        (ConversationScope("tech", offered_to="ann"), True),
        (ConversationScope("billing", status="resolved"), False),
        (ConversationScope("billing", status="pending"), True),
        (None, False),
    ],
)
def test_an_agent_sees_own_offered_and_waiting_work_of_her_skills(
    scope: ConversationScope | None, sees: bool
) -> None:
    assert admits(scope, ANN, SKILLS.get) is sees


scopes = st.none() | st.builds(
    ConversationScope,
    st.none() | queues,
    st.none() | agents,
    st.none() | agents,
    st.sampled_from(["open", "pending", "resolved"]),
)


@FUZZ
@given(scopes, scopes)
def test_a_frame_goes_to_an_agent_who_could_see_the_conversation_before_or_after_it(
    before: ConversationScope | None, after: ConversationScope | None
) -> None:
    # given a conversation event that moves the scope from `before` to `after`
    audience = Audience(before, after)
    # then an agent gets it when either side admits her; a supervisor always does
    expected = admits(before, ANN, SKILLS.get) or admits(after, ANN, SKILLS.get)
    assert audience.admits(ANN, SKILLS.get) is expected
    assert audience.admits(SUE, SKILLS.get)


def test_a_presence_change_goes_to_that_agent_only_beside_supervisors() -> None:
    audience = Audience(agent="ann")
    assert audience.admits(ANN, SKILLS.get)
    assert not audience.admits(Principal("bob", "agent", frozenset({"billing"})), SKILLS.get)
    assert audience.admits(SUE, SKILLS.get)


# --------------------------------------------------------------------------- handing frames on


@FUZZ
@given(st.binary(max_size=70_000) | st.sampled_from([b"x" * n for n in (125, 126, 65535, 65536)]))
def test_a_frame_built_once_is_the_text_frame_websockets_would_send(payload: bytes) -> None:
    # given any payload (the lengths around the 7-, 16- and 64-bit size forms among them)
    # when it is framed once for every socket
    # then it is byte for byte what the websockets library sends for it from a server
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])


@dataclass
class FakeTransport:
    writes: list[bytes] = field(default_factory=list)

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return False


@dataclass
class FakeProtocol:
    """The parts of uvicorn's websockets-sansio protocol the fan-out touches."""

    transport: FakeTransport = field(default_factory=FakeTransport)
    writable: asyncio.Event = field(default_factory=asyncio.Event)
    close_sent: bool = False
    disconnected: bool = False


def direct_client(max_buffer: int = 2) -> tuple[_Client, FakeProtocol]:
    protocol = FakeProtocol()
    protocol.writable.set()
    client = _Client(cast(Any, None), SUE, 0, max_buffer, cast(Any, protocol))
    client.live = True
    return client, protocol


def offer(client: _Client, cursor: int, dirty: list[_Client]) -> bool:
    text = f'{{"cursor": {cursor}}}'
    return client.offer(cursor, text, text_frame(text.encode()), 1.0, dirty)


def test_the_frames_of_one_batch_go_out_in_one_write_in_order() -> None:
    # given a client whose socket takes writes
    client, protocol = direct_client()
    dirty: list[_Client] = []
    # when three frames are fanned out in one batch
    assert all(offer(client, cursor, dirty) for cursor in (5, 6, 7))
    # then nothing is written before the batch is flushed, then all three at once, in order
    assert protocol.transport.writes == []
    assert dirty == [client]
    client.flush()
    expected = b"".join(text_frame(f'{{"cursor": {c}}}'.encode()) for c in (5, 6, 7))
    assert protocol.transport.writes == [expected]
    assert (client.cursor, client.buffer, client.pending) == (7, deque(), [])


def test_a_socket_pushing_back_gets_its_frames_queued_and_never_overtaken() -> None:
    # given a client whose transport pushes back after a first frame
    client, protocol = direct_client(max_buffer=2)
    dirty: list[_Client] = []
    assert offer(client, 1, dirty)
    client.flush()
    protocol.writable.clear()
    # when more frames come
    assert offer(client, 2, dirty)
    # then they are queued for the client's own task, which is woken
    assert list(client.buffer) == [(2, '{"cursor": 2}')]
    assert client.wake.is_set()
    # and once the transport takes writes again, a later frame still queues behind them
    protocol.writable.set()
    assert offer(client, 3, dirty)
    assert [c for c, _ in client.buffer] == [2, 3]
    assert len(protocol.transport.writes) == 1
    # and the frame that finds the queue full is refused (the hub closes with 1013)
    assert not offer(client, 4, dirty)


def test_while_the_clients_task_sends_new_frames_queue_behind_it() -> None:
    # given a client whose own task is sending (a heartbeat, or a queued frame)
    client, protocol = direct_client()
    client.busy = True
    # when a frame is fanned out
    assert offer(client, 9, [])
    # then it is queued, not written past the frame in flight
    assert [c for c, _ in client.buffer] == [9]
    assert protocol.transport.writes == []
