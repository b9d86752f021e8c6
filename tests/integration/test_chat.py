"""Web chat: real websocket clients (the `websockets` package) over loopback to uvicorn serving
`ChatGateway.routes()`, a real KafkaPublisher on the session broker (a fresh topic per test,
read back to check what was published), and the history from real read models built by the
real ingest worker and projection runner."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

import orjson
import pytest
import uvicorn
from aiokafka import TopicPartition
from eventsourcing.persistence import Tracking
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from adapters.chat import (
    ChatGateway,
    ChatHub,
    ChatMessage,
    ChatSender,
    FrameError,
    ReadModelChatHistory,
    message_event,
    messages_after,
    parse_frame,
    token_valid,
    visitor_token,
)
from adapters.kafka import KafkaPublisher
from adapters.outbound import OutboundMessage, PermanentFailure
from inbox.contact import (
    ContactEvent,
    CustomerRef,
    encode_contact_event,
    parse_contact_event,
    validate,
)
from inbox.domain.conversation import Conversation
from inbox.domain.time import iso
from inbox.ingest import Ingestor
from infra.broker import free_port
from infra.kafka import ensure_topics, make_consumer
from infra.store import ContactEventRow, open_event_store
from projections.db import open_read_models
from projections.inbox_view import InboxView, list_conversations
from projections.runner import ProjectionRunner
from projections.timeline import Timeline
from tests.conftest import SettingsFactory, TopicFactory
from tests.support import make_topics, running_worker, wait_until, worker_config

SECRET = b"chat-test-secret-0123456789abcdef"
NOW = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
AGENT = "agent:ann"


def clock() -> datetime:
    return NOW


class ManualMonotonic:
    """The rate limiter's clock: moves only when the test says so (no timing in tests)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class InMemoryChatHistory:
    def __init__(self) -> None:
        self.messages: dict[str, list[dict[str, str]]] = {}

    def add(self, visitor: str, message_id: str, text: str, at: str) -> None:
        self.messages.setdefault(visitor, []).append({"id": message_id, "text": text, "at": at})

    def known(self, visitor: str) -> bool:
        return visitor in self.messages

    def agent_messages(self, visitor: str, after: str | None) -> list[dict[str, str]]:
        return messages_after(self.messages.get(visitor, []), after)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(gateway: ChatGateway) -> AsyncIterator[str]:
    """uvicorn (default settings, as the composition root runs it) serving the routes;
    yields the ws:// base URL."""
    port = free_port()
    config = uvicorn.Config(
        Starlette(routes=gateway.routes()),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.02)
        yield f"ws://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


async def frame(ws: ClientConnection) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), 15)
    data: dict[str, Any] = orjson.loads(raw)
    return data


async def say(ws: ClientConnection, text: str, message_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "message", "text": text}
    if message_id is not None:
        body["id"] = message_id
    await ws.send(orjson.dumps(body).decode())
    return await frame(ws)


PARTITIONS = 2


async def published(bootstrap: str, topic: str) -> list[tuple[str, dict[str, Any]]]:
    """Every record on the topic now, as (key, event), in partition then offset order.

    Reads up to the end offsets taken first: an acknowledged record is below them."""
    consumer = make_consumer(bootstrap, None)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        out: dict[TopicPartition, list[tuple[str, dict[str, Any]]]] = {p: [] for p in partitions}

        async def behind() -> bool:
            return any([await consumer.position(p) < ends[p] for p in partitions])

        while await behind():
            batches = await consumer.getmany(timeout_ms=500)
            for tp, records in batches.items():
                for record in records:
                    assert record.key is not None
                    assert record.value is not None
                    out[tp].append((record.key.decode(), orjson.loads(record.value)))
        return [item for p in partitions for item in out[p]]
    finally:
        await consumer.stop()


async def events_of_type(bootstrap: str, topic: str, kind: str) -> list[dict[str, Any]]:
    return [e for _, e in await published(bootstrap, topic) if e["type"] == kind]


@pytest.fixture
async def topic(kafka_bootstrap: str, fresh_topic: TopicFactory) -> str:
    name = fresh_topic("chat")
    await ensure_topics(kafka_bootstrap, {name: PARTITIONS})
    return name


@pytest.fixture
async def publisher(kafka_bootstrap: str, topic: str) -> AsyncIterator[KafkaPublisher]:
    kafka = KafkaPublisher(kafka_bootstrap, idempotence=False, topic=topic)
    try:
        yield kafka
    finally:
        await kafka.close()


@pytest.fixture
def history() -> InMemoryChatHistory:
    return InMemoryChatHistory()


@pytest.fixture
def monotonic() -> ManualMonotonic:
    return ManualMonotonic()


@pytest.fixture
def gateway(
    publisher: KafkaPublisher, history: InMemoryChatHistory, monotonic: ManualMonotonic
) -> ChatGateway:
    return ChatGateway(publisher, SECRET, history, clock=clock, hub=ChatHub(monotonic=monotonic))


@pytest.fixture
async def url(gateway: ChatGateway) -> AsyncIterator[str]:
    async with serving(gateway) as base:
        yield base + "/chat/ws"


def visitor() -> str:
    return f"v-{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- in


async def test_new_visitor_gets_a_token_and_messages_are_acked_after_kafka(
    url: str, gateway: ChatGateway, kafka_bootstrap: str, topic: str
) -> None:
    vid = visitor()
    async with connect(f"{url}?visitor={vid}") as ws:
        welcome = await frame(ws)
        assert welcome == {"type": "welcome", "token": gateway.token_for(vid), "resumed": False}
        assert welcome["token"].startswith(vid + ".")
        assert await say(ws, "hello there", "m-1") == {"type": "ack", "id": "m-1"}
        ack = await say(ws, "no id from me")
        assert ack["type"] == "ack"
        server_id = ack["id"]
        assert server_id
        assert server_id != "m-1"

    records = await published(kafka_bootstrap, topic)
    assert {key for key, _ in records} == {f"visitor:{vid}"}
    kinds = [e["type"] for _, e in records]
    assert kinds[:3] == ["chat.started", "message.received", "message.received"]
    started, first, second = (e for _, e in records[:3])
    assert started["event_id"].startswith(f"chat:{vid}:")
    assert started["channel"] == "chat"
    assert first["event_id"] == f"chat:{vid}:m-1"
    assert first["customer"] == {"visitor": vid}
    assert first["channel"] == "chat"
    assert first["payload"] == {"text": "hello there", "message_id": "m-1"}
    assert first["occurred_at"].startswith("2026-11-27T10:00:00")
    assert second["event_id"] == f"chat:{vid}:{server_id}"
    assert second["payload"]["text"] == "no id from me"
    # Every published record passes the worker's gate.
    for _, event in records:
        parse_contact_event(orjson.dumps(event), now=NOW)

    # The client closed cleanly: chat.ended follows (published after the close, so polled).
    async def ended() -> list[dict[str, Any]]:
        return await events_of_type(kafka_bootstrap, topic, "chat.ended")

    deadline = time.monotonic() + 30
    while not (done := await ended()):
        assert time.monotonic() < deadline, "chat.ended was not published"
        await asyncio.sleep(0.05)
    assert done[0]["event_id"] == started["event_id"] + ":ended"


async def test_reconnect_resumes_sends_what_was_missed_and_a_resend_keeps_its_event_id(
    url: str,
    gateway: ChatGateway,
    history: InMemoryChatHistory,
    kafka_bootstrap: str,
    topic: str,
) -> None:
    vid = visitor()
    sender = ChatSender(gateway.hub, clock=clock)
    async with connect(f"{url}?visitor={vid}") as ws:
        token = (await frame(ws))["token"]
        assert await say(ws, "first", "m-1") == {"type": "ack", "id": "m-1"}
        history.add(vid, "r-1", "seen live", iso(NOW))
        result = await sender.send(outbound("r-1", vid, "seen live"))
        assert result.status == "delivered"
        live = await frame(ws)
        assert live == {
            "type": "message",
            "from": "agent",
            "text": "seen live",
            "at": iso(NOW),
            "id": "r-1",
        }

    # While the visitor is away the agent writes twice; the push finds no socket.
    history.add(vid, "r-2", "while away", iso(NOW + timedelta(minutes=1)))
    history.add(vid, "r-3", "and again", iso(NOW + timedelta(minutes=2)))
    assert (await sender.send(outbound("r-2", vid, "while away"))).status == "sent"

    # Without the token the visitor id is not given out again.
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{url}?visitor={vid}"):
            pass
    assert refused.value.response.status_code == 403
    assert b"visitor_taken" in refused.value.response.body

    async with connect(f"{url}?visitor={vid}&token={token}&after=r-1") as ws:
        assert await frame(ws) == {"type": "welcome", "token": token, "resumed": True}
        assert [(f["id"], f["text"], f["from"]) for f in [await frame(ws), await frame(ws)]] == [
            ("r-2", "while away", "agent"),
            ("r-3", "and again", "agent"),
        ]
        # The client was not sure "first" arrived and resends it: same id, same event id.
        assert await say(ws, "first", "m-1") == {"type": "ack", "id": "m-1"}
    # `after` as the time of the last message seen works too.
    after = iso(NOW + timedelta(minutes=1))
    query = urlencode({"visitor": vid, "token": token, "after": after})
    async with connect(f"{url}?{query}") as ws:
        assert (await frame(ws))["resumed"] is True
        assert (await frame(ws))["id"] == "r-3"

    messages = await events_of_type(kafka_bootstrap, topic, "message.received")
    assert [m["event_id"] for m in messages] == [f"chat:{vid}:m-1", f"chat:{vid}:m-1"]
    started = await events_of_type(kafka_bootstrap, topic, "chat.started")
    assert len(started) == 1  # a resumed chat does not start again


def outbound(message_id: str, to: str, text: str) -> OutboundMessage:
    return OutboundMessage(
        message_id=message_id, conversation_id="c-1", channel="chat", text=text, to=to
    )


async def test_bad_token_and_bad_visitor_are_refused_at_the_handshake(
    url: str, gateway: ChatGateway, kafka_bootstrap: str, topic: str
) -> None:
    vid = visitor()
    good = gateway.token_for(vid)
    other = gateway.token_for(visitor())
    for token in (good[:-2] + "xx", other, vid + ".", "", "é"):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{url}?{urlencode({'visitor': vid, 'token': token})}"):
                pass
        assert refused.value.response.status_code == 403, token
        assert orjson.loads(refused.value.response.body)["error"]["code"] == "invalid_token"
    for bad in ("", "has space", "x" * 201, "a/b"):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{url}?{urlencode({'visitor': bad})}"):
                pass
        assert refused.value.response.status_code == 400, bad
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url):
            pass
    assert refused.value.response.status_code == 400
    assert await published(kafka_bootstrap, topic) == []


async def test_frame_over_64_kib_closes_with_1009_and_64_kib_passes(
    url: str, kafka_bootstrap: str, topic: str
) -> None:
    vid = visitor()
    envelope = '{"type":"message","id":"big","text":"%s"}'
    filler = 64 * 1024 - len(envelope % "")
    async with connect(f"{url}?visitor={vid}") as ws:
        await frame(ws)
        exact = envelope % ("x" * filler)
        assert len(exact.encode()) == 64 * 1024
        await ws.send(exact)
        assert await frame(ws) == {"type": "ack", "id": "big"}
        await ws.send(envelope.replace("big", "too-big") % ("é" * (filler // 2 + 1)))
        with pytest.raises(ConnectionClosed) as closed:
            await frame(ws)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009
    messages = await events_of_type(kafka_bootstrap, topic, "message.received")
    assert [m["payload"]["message_id"] for m in messages] == ["big"]


async def test_more_than_ten_a_second_across_sockets_is_refused_and_the_socket_kept(
    url: str, gateway: ChatGateway, monotonic: ManualMonotonic, kafka_bootstrap: str, topic: str
) -> None:
    vid = visitor()
    async with connect(f"{url}?visitor={vid}") as one:
        token = (await frame(one))["token"]
        async with connect(f"{url}?visitor={vid}&token={token}") as two:
            await frame(two)
            for i in range(6):
                assert (await say(one, "hi", f"a{i}"))["type"] == "ack"
            for i in range(4):
                assert (await say(two, "hi", f"b{i}"))["type"] == "ack"
            refused = await say(two, "one too many", "b4")
            assert refused["type"] == "error"
            assert refused["code"] == "rate_limited"
            assert refused["id"] == "b4"
            assert (await say(one, "me neither", "a6"))["code"] == "rate_limited"
            monotonic.now += 1.0  # a second later the window is empty again
            assert await say(two, "one too many", "b4") == {"type": "ack", "id": "b4"}
    messages = await events_of_type(kafka_bootstrap, topic, "message.received")
    assert sorted(m["payload"]["message_id"] for m in messages) == sorted(
        [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(5)]
    )


async def test_invalid_frames_get_an_error_frame_and_the_socket_is_kept(
    url: str, kafka_bootstrap: str, topic: str
) -> None:
    vid = visitor()
    cases = [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_frame"),
        ('{"text": "no type"}', "invalid_frame"),
        ('{"type": "typing"}', "unknown_type"),
        ('{"type": "message", "text": "   "}', "invalid_frame"),
        ('{"type": "message", "text": 5}', "invalid_frame"),
        ('{"type": "message", "text": "hi", "id": "has space"}', "invalid_frame"),
        ('{"type": "message", "text": "hi", "id": 7}', "invalid_frame"),
    ]
    async with connect(f"{url}?visitor={vid}") as ws:
        await frame(ws)
        for raw, code in cases:
            await ws.send(raw)
            answer = await frame(ws)
            assert answer["type"] == "error", raw
            assert answer["code"] == code, raw
            assert answer["message"]
        await ws.send(b'{"type": "message", "text": "binary is JSON too", "id": "bin"}')
        assert await frame(ws) == {"type": "ack", "id": "bin"}
        assert await say(ws, "still here", "ok") == {"type": "ack", "id": "ok"}
    messages = await events_of_type(kafka_bootstrap, topic, "message.received")
    assert [m["payload"]["message_id"] for m in messages] == ["bin", "ok"]


async def test_kafka_down_answers_unavailable_and_publishes_nothing(
    kafka_bootstrap: str, topic: str, history: InMemoryChatHistory
) -> None:
    dead = KafkaPublisher(f"127.0.0.1:{free_port()}", idempotence=False, topic=topic, timeout=3)
    gateway = ChatGateway(dead, SECRET, history, clock=clock)
    vid = visitor()
    try:
        async with serving(gateway) as base:
            # A new chat cannot start: told to try again, and closed with 1013.
            async with connect(f"{base}/chat/ws?visitor={vid}") as ws:
                answer = await frame(ws)
                assert answer["type"] == "error"
                assert answer["code"] == "unavailable"
                with pytest.raises(ConnectionClosed) as closed:
                    await frame(ws)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 1013
            # A resumed chat stays open; each message is refused, to be resent.
            token = gateway.token_for(vid)
            async with connect(f"{base}/chat/ws?visitor={vid}&token={token}") as ws:
                assert (await frame(ws))["type"] == "welcome"
                for _ in range(2):
                    answer = await say(ws, "anyone?", "m-1")
                    assert answer["type"] == "error"
                    assert answer["code"] == "unavailable"
                    assert answer["id"] == "m-1"
    finally:
        await dead.close()
    assert await published(kafka_bootstrap, topic) == []


async def test_sender_pushes_to_every_open_socket_of_the_visitor(
    url: str, gateway: ChatGateway
) -> None:
    vid, other = visitor(), visitor()
    sender = ChatSender(gateway.hub, clock=clock)
    assert sender.channels == frozenset({"chat"})
    async with connect(f"{url}?visitor={vid}") as one:
        token = (await frame(one))["token"]
        async with (
            connect(f"{url}?visitor={vid}&token={token}") as two,
            connect(f"{url}?visitor={other}") as bystander,
        ):
            await frame(two)
            await frame(bystander)
            result = await sender.send(outbound("r-9", vid, "to both tabs"))
            assert result.status == "delivered"
            expected = {
                "type": "message",
                "from": "agent",
                "text": "to both tabs",
                "at": iso(NOW),
                "id": "r-9",
            }
            assert await frame(one) == expected
            assert await frame(two) == expected
            # The other visitor got nothing: its next frame is the answer to its own message.
            assert (await say(bystander, "me?", "x"))["type"] == "ack"
    assert (await sender.send(outbound("r-10", vid, "gone"))).status == "sent"
    with pytest.raises(PermanentFailure):
        await sender.send(outbound("r-11", "not a visitor id", "x"))


# --------------------------------------------------------------------------- history (read models)


def chat_contact(event_id: str, vid: str, minute: float) -> ContactEvent:
    raw = ContactEvent(
        event_id=event_id,
        occurred_at=NOW + timedelta(minutes=minute),
        channel="chat",
        type="message.received",
        customer=CustomerRef(visitor=vid),
        payload={"text": f"text of {event_id}"},
    )
    return validate(raw, now=NOW + timedelta(days=1))


def at(minute: float) -> str:
    return iso(NOW + timedelta(minutes=minute))


def test_read_model_history_lists_the_agents_chat_messages(
    database_url: str, settings: SettingsFactory
) -> None:
    config = settings(database_url, bootstrap=None)
    store = open_event_store(config)
    db = open_read_models(config)
    try:
        vid = "visitor-1"
        Ingestor(store).apply_batch(
            [
                (chat_contact("c1", vid, 0), ContactEventRow("c1", "contact-events", 0, 0)),
                (chat_contact("c2", "visitor-2", 0), ContactEventRow("c2", "contact-events", 0, 1)),
            ],
            Tracking("contact-events:0", 2),
        )
        runner = ProjectionRunner(store, db, [InboxView(), Timeline()])
        runner.run_until_caught_up()
        (item,) = list_conversations(db, customer=f"visitor:{vid}")["items"]
        conversation: Conversation = store.get(UUID(item["id"]))
        conversation.queue_reply("r1", "chat", "first answer", actor=AGENT, at=at(1))
        conversation.queue_reply("r2", "email", "by email", actor=AGENT, at=at(2))
        conversation.add_note("internal", actor=AGENT, at=at(3))
        conversation.queue_reply("r3", "chat", "second answer", actor=AGENT, at=at(4))
        store.save(conversation)
        runner.run_until_caught_up()

        history = ReadModelChatHistory(db)
        assert history.known(vid)
        assert history.known("visitor-2")
        assert not history.known("stranger")
        assert history.agent_messages(vid, None) == [
            {"id": "r1", "text": "first answer", "at": at(1)},
            {"id": "r3", "text": "second answer", "at": at(4)},
        ]
        assert [m["id"] for m in history.agent_messages(vid, "r1")] == ["r3"]
        assert history.agent_messages(vid, "r3") == []
        assert [m["id"] for m in history.agent_messages(vid, at(1))] == ["r3"]
        assert [m["id"] for m in history.agent_messages(vid, "2026-11-27T10:00:30+00:00")] == [
            "r1",
            "r3",
        ]
        assert history.agent_messages("visitor-2", None) == []
        assert history.agent_messages("stranger", None) == []
    finally:
        db.close()
        store.close()


async def test_whole_path_worker_projections_and_reconnect(
    settings: SettingsFactory, kafka_bootstrap: str, fresh_topic: TopicFactory
) -> None:
    """Visitor message -> Kafka -> the real ingest worker -> store -> projections; the agent
    answers while the visitor is away; on reconnect the answer comes from the read models."""
    topic = fresh_topic("chat-e2e")
    await make_topics(kafka_bootstrap, topic, partitions=PARTITIONS)
    config = settings(None)
    store = open_event_store(config)
    db = open_read_models(config)
    kafka = KafkaPublisher(kafka_bootstrap, idempotence=False, topic=topic)
    gateway = ChatGateway(kafka, SECRET, ReadModelChatHistory(db))  # the real clock
    sender = ChatSender(gateway.hub)
    runner = ProjectionRunner(store, db, [InboxView(), Timeline()])
    runner.run_until_caught_up()  # the read models exist before the app serves (as deployed)
    vid = visitor()
    try:
        async with (
            running_worker(worker_config(kafka_bootstrap, topic), store),
            serving(gateway) as base,
        ):
            url = f"{base}/chat/ws?visitor={vid}"
            async with connect(url) as ws:
                token = (await frame(ws))["token"]
                assert await say(ws, "my order is late", "m-1") == {"type": "ack", "id": "m-1"}

            def conversation_id() -> str | None:
                runner.run_until_caught_up()
                items = list_conversations(db, customer=f"visitor:{vid}")["items"]
                return str(items[0]["id"]) if items else None

            conv_id = await wait_until(conversation_id, what="the chat's conversation")
            conversation: Conversation = store.get(UUID(conv_id))
            conversation.queue_reply("r-1", "chat", "on its way", actor=AGENT, at=iso(clock()))
            store.save(conversation)
            await asyncio.to_thread(runner.run_until_caught_up)
            result = await sender.send(
                OutboundMessage(
                    message_id="r-1",
                    conversation_id=conv_id,
                    channel="chat",
                    text="on its way",
                    to=vid,
                )
            )
            assert result.status == "sent"  # nobody connected

            # The visitor's id is taken now: no second welcome without the token.
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url):
                    pass
            assert refused.value.response.status_code == 403

            async with connect(f"{url}&token={token}") as ws:
                assert (await frame(ws))["resumed"] is True
                missed = await frame(ws)
                assert (missed["id"], missed["text"], missed["from"]) == (
                    "r-1",
                    "on its way",
                    "agent",
                )
    finally:
        await kafka.close()
        db.close()
        store.close()


# --------------------------------------------------------------------------- parsing and tokens


def test_tokens_are_signed_per_visitor() -> None:
    token = visitor_token(SECRET, "a.b@c")
    assert token.startswith("a.b@c.")
    assert token_valid(SECRET, "a.b@c", token)
    assert not token_valid(SECRET, "a.b@d", token)
    assert not token_valid(b"another-secret-0123456789", "a.b@c", token)
    assert not token_valid(SECRET, "a.b@c", token + "x")
    assert not token_valid(SECRET, "a.b@c", "\udcff")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        ChatGateway(
            KafkaPublisher("127.0.0.1:1", idempotence=False), b"short", InMemoryChatHistory()
        )


def test_messages_after_by_id_time_or_nothing() -> None:
    messages = [
        {"id": "a", "text": "1", "at": at(1)},
        {"id": "b", "text": "2", "at": at(2)},
    ]
    assert messages_after(messages, None) == messages
    assert messages_after(messages, "a") == messages[1:]
    assert messages_after(messages, at(1.5)) == messages[1:]
    assert messages_after(messages, "unknown id") == messages  # the client drops duplicates
    # a time before year 1 in UTC: no time at all, as an unknown id
    assert messages_after(messages, "0001-01-01T00:00:00+14:00") == messages


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
frames = st.one_of(
    st.text(),
    st.binary(),
    json_values.map(lambda v: orjson.dumps(v).decode()),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["message", "typing", ""])},
        optional={"text": json_values, "id": json_values},
    ).map(lambda v: orjson.dumps(v).decode()),
    st.builds(
        lambda text, mid: f'{{"type":"message","text":"{text}","id":{mid}}}',
        st.sampled_from(["\\ud800", "ok\\u0000", "\\udfff\\ud800", "a"]),
        st.sampled_from(['"x"', "null", '"\\ud800"', '"' + "y" * 201 + '"']),
    ),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames)
def test_any_frame_gives_a_contact_event_or_a_clear_refusal(raw: str | bytes) -> None:
    refusal: FrameError | None = None
    try:
        message = parse_frame(raw)
    except FrameError as exc:
        refusal = exc
    if refusal is not None:
        assert refusal.code in {"invalid_json", "invalid_frame", "unknown_type"}
        assert refusal.message
        return
    assert isinstance(message, ChatMessage)
    event = message_event("v-1", message, message_id=message.id or "server-id", at=NOW)
    again = parse_contact_event(encode_contact_event(event), now=NOW)
    assert again.payload["text"] == message.text
    assert again.key == "visitor:v-1"
