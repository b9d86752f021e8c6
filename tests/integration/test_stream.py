"""The agents' live stream over real sockets: a SQLite event store in tmp_path, the hub's route
served by uvicorn, real `websockets` clients. `authenticate` and `lookup` are small dict-backed
stand-ins for the agent registry and the read model (outside this module)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from inbox.access import Principal
from inbox.agents import Directory, queue_spec
from inbox.domain.agent import Agent
from inbox.domain.conversation import Conversation
from inbox.stream import TYPES, ConversationScope, StreamHub
from infra.broker import free_port
from infra.composition import QueueSkills
from infra.store import EventStore, open_event_store
from projections.db import ReadModelDB
from projections.directory import NAME as DIRECTORY
from projections.directory import QUEUES
from projections.replay import PROJECTIONS
from projections.runner import ProjectionRunner, event_name
from projections.tracking import active_table
from tests.conftest import SettingsFactory
from tests.support import serving, wait_until

AT = "2026-11-27T09:00:00.000000Z"
PRINCIPALS = {
    "t-sue": Principal("sue", "supervisor", frozenset()),
    "t-ann": Principal("ann", "agent", frozenset({"billing"})),
    "t-bob": Principal("bob", "agent", frozenset({"tech"})),
    "t-carl": Principal("carl", "agent", frozenset({"billing"})),
    "t-dave": Principal("dave", "agent", frozenset()),
    "t-al": Principal("al", "auditor", frozenset()),
}
SKILLS = {"billing": "billing", "tech": "tech", "general": None}


async def authenticate(token: str) -> Principal | None:
    return PRINCIPALS.get(token)


@pytest.fixture
def store(settings: SettingsFactory) -> Iterator[EventStore]:
    event_store = open_event_store(settings(bootstrap=None))
    try:
        yield event_store
    finally:
        event_store.close()


@dataclass
class Stream:
    hub: StreamHub
    url: str
    gone: list[str] = field(default_factory=list)

    def connect(self, token: str, after: int | None = None, **options: Any) -> connect:
        query = f"token={token}" + ("" if after is None else f"&after={after}")
        return connect(f"{self.url}?{query}", **options)


class ReceiveWrapped:
    """A middleware-like ASGI wrapper whose `receive` is not uvicorn's own: the hub cannot
    write directly and serves each client from its own task (as under another server)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def wrapped() -> Any:
            return await receive()

        await self.app(scope, wrapped, send)


def served_by_tasks(routes: list[BaseRoute]) -> list[BaseRoute]:
    return [
        WebSocketRoute(r.path, ReceiveWrapped(r.app)) if isinstance(r, WebSocketRoute) else r
        for r in routes
    ]


# How live frames reach the sockets: written by the fan-out (raw frames, or through the
# protocol's connection when permessage-deflate is on), or sent by a task per client.
PATHS = ["direct", "direct-deflate", "task"]


@contextlib.asynccontextmanager
async def streaming(
    store: EventStore, *, direct: bool = True, **options: Any
) -> AsyncIterator[Stream]:
    gone: list[str] = []

    async def on_gone(agent: str) -> None:
        gone.append(agent)

    def lookup(conversation: str) -> ConversationScope | None:
        return None  # every conversation of these tests is opened while the hub follows

    hub = StreamHub(
        store,
        authenticate=authenticate,
        queue_skill=SKILLS.get,
        lookup=lookup,
        on_gone=on_gone,
        **options,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(hub.run(stop))
    try:
        await wait_until(lambda: hub.position > 0 or store.max_notification_id() == 0)
        routes = hub.routes() if direct else served_by_tasks(hub.routes())
        async with serving(routes, free_port()) as base:
            yield Stream(hub, base.replace("http", "ws", 1) + "/api/v1/stream", gone)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def opened(queue: str | None, n: int = 0) -> Conversation:
    return Conversation(
        customer_id=f"customer-{n}",
        channel="email",
        queue=queue,
        previous=None,
        source_event_id=f"m-{n}-{queue}",
        at=AT,
    )


def received(conversation: Conversation, text: str = "hello") -> None:
    conversation.receive_message(
        automatic=False,
        at=AT,
        channel="email",
        via=None,
        message_id=None,
        text=text,
        subject=None,
        html=None,
        attachments=[],
        thread_ref=None,
        in_reply_to=[],
        source_event_id=f"e-{text}",
    )


def registered(agent: str) -> Agent:
    return Agent.register(
        agent_id=agent,
        name=agent.title(),
        role="agent",
        skills=[],
        languages=[],
        capacity={},
        voice_to=None,
        token_hash="x",
        actor="admin",
        at=AT,
    )


async def save(store: EventStore, *aggregates: Any) -> list[int]:
    return list(await asyncio.to_thread(store.save, *aggregates))


def sent_cursors(store: EventStore, after: int) -> list[int]:
    """The cursors of every stored event that becomes a frame, after `after`."""
    return [n.id for n in store.notifications(after, 100_000) if event_name(n.topic) in TYPES]


Frames = list[dict[str, Any]]


async def frames(ws: ClientConnection, until: Callable[[Frames], bool]) -> Frames:
    """The frames received (heartbeats left out) until `until` accepts the list so far."""
    got: Frames = []
    async with asyncio.timeout(20):
        while True:
            frame = orjson.loads(await ws.recv())
            if frame["type"] != "heartbeat":
                got.append(frame)
                if until(got):
                    return got


async def hello(ws: ClientConnection) -> dict[str, Any]:
    frame: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
    assert frame["type"] == "hello"
    return frame


def reaching(cursor: int) -> Callable[[Frames], bool]:
    return lambda got: got[-1]["cursor"] >= cursor


def counting(n: int) -> Callable[[Frames], bool]:
    return lambda got: len(got) >= n


def slow_socket(port: int) -> socket.socket:
    """A connected socket with a tiny receive buffer, so a client that stops reading pushes
    back on the server quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def read_until_closed(ws: ClientConnection, cursors: list[int]) -> None:
    async with asyncio.timeout(20):
        while True:
            cursors.append(orjson.loads(await ws.recv())["cursor"])


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("replay_buffer", [20_000, 3], ids=["from-memory", "from-store"])
async def test_a_client_resuming_after_a_burst_gets_every_frame_once_in_order(
    store: EventStore, replay_buffer: int, path: str
) -> None:
    compression = "deflate" if path == "direct-deflate" else None
    # given a supervisor on the stream while a burst of events is being stored
    async with streaming(store, replay_buffer=replay_buffer, direct=path != "task") as stream:
        # (max_queue=None: a websockets client that stopped reading at its queue limit waits
        # out its close timeout when closing)
        async with stream.connect("t-sue", max_queue=None, compression=compression) as ws:
            start = (await hello(ws))["cursor"]
            await wait_until(lambda: stream.hub.live_clients()[0] == 1)
            assert stream.hub.live_clients() == (1, 0 if path == "task" else 1)
            assert ws.response is not None
            negotiated = ws.response.headers.get("Sec-WebSocket-Extensions", "")
            assert ("permessage-deflate" in negotiated) is (compression is not None)

            left = threading.Event()

            def burst() -> None:
                for n in range(60):
                    if n == 30:  # the second half once the client has left
                        left.wait(20)
                    conversation = opened("billing", n)
                    received(conversation, f"first {n}")
                    store.save(conversation)
                    conversation.assign("ann", actor="sue", at=AT)
                    received(conversation, f"second {n}")
                    conversation.resolve(actor="sue", at=AT)
                    store.save(conversation)

            writer = asyncio.create_task(asyncio.to_thread(burst))
            # when the client leaves in the middle of it
            first = await frames(ws, counting(40))
        left.set()
        last = first[-1]["cursor"]
        await writer  # the rest is stored while nobody listens
        head = store.max_notification_id()
        # and comes back with the last cursor it got
        async with stream.connect("t-sue", after=last, compression=compression) as ws:
            assert (await hello(ws))["cursor"] == last
            second = await frames(ws, reaching(head))
    # then it got every frame exactly once, in the order stored
    assert [f["cursor"] for f in first + second] == sent_cursors(store, start)
    assert len(first + second) == 300


@pytest.mark.parametrize("replay_buffer", [20_000, 3], ids=["from-memory", "from-store"])
async def test_an_agent_resuming_gets_what_was_theirs_when_it_happened(
    store: EventStore, replay_buffer: int
) -> None:
    async with streaming(store, replay_buffer=replay_buffer) as stream:
        # given Ann with a billing conversation assigned to her
        async with stream.connect("t-ann") as ws:
            await hello(ws)
            mine = opened("billing", 1)
            await save(store, mine)
            mine.assign("ann", actor="sue", at=AT)
            await save(store, mine)
            seen = await frames(ws, counting(2))
        assert [f["type"] for f in seen] == ["conversation.opened", "assignment"]
        # when, while she is away, it gets a message and is transferred to tech, where the
        # next message and a new tech conversation are not hers; a new billing one is
        received(mine, "while away")
        await save(store, mine)
        mine.transfer("tech", actor="sue", at=AT)
        await save(store, mine)
        received(mine, "after the transfer")
        await save(store, mine)
        await save(store, opened("tech", 2))
        billing = opened("billing", 3)
        await save(store, billing)
        # and she comes back
        async with stream.connect("t-ann", after=seen[-1]["cursor"]) as ws:
            await hello(ws)
            missed = await frames(ws, lambda got: got[-1]["conversation"] == str(billing.id))
    # then she gets the message and the transfer that took it away, then the new billing one
    assert [(f["type"], f["conversation"]) for f in missed] == [
        ("message", str(mine.id)),
        ("queue", str(mine.id)),
        ("conversation.opened", str(billing.id)),
    ]
    assert missed[0]["data"]["text"] == "while away"
    assert missed[0]["data"]["direction"] == "in"
    assert missed[1]["data"]["queue"] == "tech"


# --------------------------------------------------------------------------- visibility


async def test_each_agent_sees_their_own_offered_and_skill_queue_work_and_supervisors_all(
    store: EventStore,
) -> None:
    async with streaming(store) as stream:
        tokens = ("t-sue", "t-ann", "t-bob", "t-dave")
        async with contextlib.AsyncExitStack() as stack:
            sockets = {t: await stack.enter_async_context(stream.connect(t)) for t in tokens}
            for ws in sockets.values():
                await hello(ws)
            # given conversations in billing, tech, a queue needing no skill, and no queue
            a, b, c, d = (opened(q, n) for n, q in enumerate(("billing", "tech", "general", None)))
            for conversation in (a, b, c, d):
                await save(store, conversation)
            # when tech work is offered to Ann, billing work assigned to Bob, who gets a
            # message on it and moves it to tech, and Ann's presence changes
            b.offer("ann", expires_at=None, reason="longest idle", at=AT)
            await save(store, b)
            a.assign("bob", actor="sue", at=AT)
            await save(store, a)
            received(a, "for bob")
            await save(store, a)
            a.transfer("tech", actor="bob", at=AT)
            await save(store, a)
            ann = registered("ann")
            await save(store, ann)
            ann.set_presence("available", reason="set by agent", actor="ann", at=AT)
            await save(store, ann)
            received(c, "marker")
            await save(store, c)
            got = {
                t: await frames(ws, lambda f: f[-1]["data"].get("text") == "marker")
                for t, ws in sockets.items()
            }
    names = {str(a.id): "A", str(b.id): "B", str(c.id): "C", str(d.id): "D"}

    def seen(token: str) -> list[tuple[str, str | None]]:
        return [(f["type"], names.get(f["conversation"], f["agent"])) for f in got[token]]

    # then
    assert seen("t-ann") == [
        ("conversation.opened", "A"),  # billing is her skill
        ("conversation.opened", "C"),  # general needs no skill
        ("offer", "B"),  # offered to her, though tech
        ("assignment", "A"),  # it was waiting in her queue before
        ("presence", "ann"),  # her own presence
        ("message", "C"),
    ]
    assert seen("t-bob") == [
        ("conversation.opened", "B"),
        ("conversation.opened", "C"),
        ("offer", "B"),  # it was waiting in his queue
        ("assignment", "A"),  # to him
        ("message", "A"),
        ("queue", "A"),
        ("message", "C"),
    ]
    assert seen("t-dave") == [("conversation.opened", "C"), ("message", "C")]
    assert seen("t-sue") == [
        ("conversation.opened", "A"),
        ("conversation.opened", "B"),
        ("conversation.opened", "C"),
        ("conversation.opened", "D"),
        ("offer", "B"),
        ("assignment", "A"),
        ("message", "A"),
        ("queue", "A"),
        ("presence", "ann"),
        ("message", "C"),
    ]
    presence = got["t-sue"][8]
    assert presence["agent"] == "ann"
    assert presence["conversation"] is None
    assert presence["data"]["status"] == "available"


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("", 401),
        ("token=nobody", 401),
        ("token=t-al", 403),
        ("token=t-sue&after=x", 400),
        ("token=t-sue&after=-1", 400),
        ("token=t-sue&after=1.5", 400),
    ],
)
async def test_a_bad_request_is_refused_with_an_http_status(
    store: EventStore, query: str, status: int
) -> None:
    async with streaming(store) as stream:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{stream.url}?{query}"):
                pass
    assert refused.value.response.status_code == status
    assert orjson.loads(refused.value.response.body or b"{}")["error"]["code"]


# --------------------------------------------------------------------------- heartbeats


@pytest.mark.parametrize("path", PATHS)
async def test_an_idle_connection_gets_heartbeats_carrying_how_far_it_is_served(
    store: EventStore, path: str
) -> None:
    await save(store, opened("billing", 1))
    compression = "deflate" if path == "direct-deflate" else None
    async with (
        streaming(store, heartbeat=0.2, direct=path != "task") as stream,
        stream.connect("t-dave", compression=compression) as ws,
    ):
        # given an agent with nothing to see
        start = (await hello(ws))["cursor"]
        assert start == store.max_notification_id()
        # when nothing happens, then heartbeats come with the cursor it has
        beat = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        assert beat == {"type": "heartbeat", "cursor": start}
        # when something it may not see is stored, the next heartbeat moves past it
        head = (await save(store, opened("tech", 2)))[-1]
        beat = await wait_for_heartbeat(ws, head)
        assert beat == {"type": "heartbeat", "cursor": head}


async def wait_for_heartbeat(ws: ClientConnection, cursor: int) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            frame: dict[str, Any] = orjson.loads(await ws.recv())
            assert frame["type"] == "heartbeat", frame
            if frame["cursor"] >= cursor:
                return frame


# --------------------------------------------------------------------------- presence


async def test_an_agent_away_longer_than_the_grace_period_is_gone_once(
    store: EventStore,
) -> None:
    now = [0.0]
    async with streaming(store, grace=60.0, clock=lambda: now[0]) as stream:
        hub = stream.hub

        async def visit(token: str, agent: str) -> None:
            before = hub.sockets(agent)
            async with stream.connect(token) as ws:
                await hello(ws)
                await wait_until(lambda: hub.sockets(agent) == before + 1)
            await wait_until(lambda: hub.sockets(agent) == before)

        # given Ann, who drops off and is back within the grace period
        async with stream.connect("t-ann") as ann:
            await hello(ann)
            await visit("t-ann", "ann")  # a second socket of hers comes and goes
            await ann.close()
            await wait_until(lambda: not hub.connected("ann"))
            now[0] += 30
            async with stream.connect("t-ann") as again:
                await hello(again)
                await wait_until(lambda: hub.connected("ann"))
                # when Bob leaves and the grace period passes
                await visit("t-bob", "bob")
                now[0] += 61
                await wait_until(lambda: stream.gone, timeout=10)
                # then only Bob is gone: Ann came back in time
                assert stream.gone == ["bob"]
            # when Ann leaves for good and the grace period passes
            await wait_until(lambda: not hub.connected("ann"))
            now[0] += 61
            await wait_until(lambda: "ann" in stream.gone, timeout=10)
        # then she is gone once (Carl's departure afterwards is a barrier for a repeat)
        await visit("t-carl", "carl")
        now[0] += 61
        await wait_until(lambda: "carl" in stream.gone, timeout=10)
        assert stream.gone == ["bob", "ann", "carl"]


# --------------------------------------------------------------------------- slow consumers


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "task"])
async def test_a_client_too_slow_for_its_buffer_is_closed_and_resumes(
    store: EventStore, direct: bool
) -> None:
    big = "x" * 64_000
    # (one notification a round, so a client that keeps up is never more than a few behind)
    async with streaming(store, max_buffer=16, batch=1, direct=direct) as stream:
        port = int(stream.url.split(":")[2].split("/")[0])
        # given a client that stops reading, and one that keeps up
        async with (
            stream.connect("t-sue", sock=slow_socket(port), compression=None) as slow,
            stream.connect("t-sue") as good,
        ):
            start = (await hello(slow))["cursor"]
            await hello(good)
            slow.transport.pause_reading()
            reader = asyncio.create_task(frames(good, counting(201)))
            # when far more is stored than the slow one takes in
            conversation = opened("billing", 1)
            await save(store, conversation)
            for n in range(200):
                received(conversation, f"{n} {big}")
                if n % 10 == 9:
                    await save(store, conversation)
            head = store.max_notification_id()
            # then the other client gets everything all the same
            assert (await reader)[-1]["cursor"] == head
            # and the slow one, reading again, finds its socket closed with 1013
            slow.transport.resume_reading()
            cursors: list[int] = []
            with pytest.raises(ConnectionClosed) as closed:
                await read_until_closed(slow, cursors)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1013
        assert closed.value.rcvd.reason == f"too slow; reconnect with after={cursors[-1]}"
        assert len(cursors) < 201
        # and resuming with that cursor it gets the rest
        async with stream.connect("t-sue", after=cursors[-1], max_size=None) as ws:
            await hello(ws)
            rest = await frames(ws, reaching(head))
    assert cursors + [f["cursor"] for f in rest] == sent_cursors(store, start)


def test_queue_skills_keep_their_last_answer_while_the_database_fails(
    store: EventStore, db: ReadModelDB, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream asks for a queue's skill in the middle of fanning out a batch: an error
    there would leave the batch half sent, and send that half again."""
    directory = Directory(store, admin_token="admin-token")
    directory.define_queue("sales", queue_spec("sales", {"skill": "selling"}), actor="admin")
    ProjectionRunner(store, db, [PROJECTIONS["directory"]()]).run_until_caught_up()
    skills = QueueSkills(db)
    assert skills("sales") == "selling"
    with db.transaction() as tx:
        table = active_table(tx, DIRECTORY, QUEUES)
        tx.execute(f"DROP TABLE {table}")
    skills._at = -1.0  # as if a second had passed: it reads again, and fails
    assert skills("sales") == "selling"
    assert "queue skills not read again" in caplog.text
