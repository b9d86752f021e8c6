"""The agents' live stream: websocket `/api/v1/stream?token=T&after=CURSOR` (docs/stream.md).

`StreamHub.run` follows the event store's notification log (polling, or at once when `nudge`d),
turns each event an agent may see into one JSON frame, serialised once, and hands it to every
socket allowed to see it. The cursor of a frame is the notification id of its event, so a
client that reconnects with `after=CURSOR` gets exactly what it missed: first a replay (from the
hub's recent frames in memory, or from the store when older), then the live frames, joined in
one step of the event loop so nothing is lost or sent twice.

Who sees what is judged on the conversation's scope (queue, assignee, offer) both before and
after the event. The hub keeps those scopes from the events it follows and asks `lookup` (the
read model) about conversations it has not seen.

Presence: when an agent's last socket closes, `on_gone(agent)` is awaited after `grace`
seconds unless they reconnect in time.

Speed: on uvicorn's websockets-sansio protocol (what `inbox serve` runs) a live frame is written
from the fan-out loop itself, straight into each socket's transport, without a task switch per
client; the frames of one batch go out in one write per socket, the same bytes for every socket
(uncompressed also where permessage-deflate was agreed, which RFC 7692 allows). A client whose
transport pushes back gets the next frames in its bounded buffer, drained by its own task (1013
when it fills). Under another server each client is served by its own task.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol
from uuid import UUID

import orjson
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.extensions.permessage_deflate import PerMessageDeflate

from inbox.access import Principal
from inbox.domain import ids
from projections.base import Event
from projections.runner import LogSource, decode, read_log

log = logging.getLogger(__name__)

PATH: Final = "/api/v1/stream"
ADMIN: Final = "admin"  # the built-in admin's agent id: no Agent aggregate, no presence
# RFC 6455 close codes.
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_RESTARTING = 1012
CLOSE_TRY_AGAIN = 1013
# A client's frames of one batch are written together, or at once when they reach this size
# (the transport's default high-water mark), so a burst is never held in memory per client.
FLUSH_AT: Final = 64 * 1024

# Domain event -> frame type. Events not named here are not sent (their cursor is skipped).
TYPES: Final[Mapping[str, str]] = {
    "Conversation.Opened": "conversation.opened",
    "Conversation.MessageReceived": "message",
    "Conversation.ReplyQueued": "message",
    "Conversation.Offered": "offer",
    "Conversation.OfferLapsed": "offer.lapsed",
    "Conversation.Assigned": "assignment",
    "Conversation.Queued": "queue",
    "Conversation.Transferred": "queue",
    "Conversation.PriorityChanged": "priority",
    "Conversation.MarkedPending": "status",
    "Conversation.Resolved": "status",
    "Conversation.Reopened": "status",
    "Conversation.SlaWarned": "sla.warning",
    "Conversation.SlaBreached": "sla.breach",
    "Conversation.Escalated": "escalation",
    "Conversation.NoteAdded": "note",
    "Conversation.DeliveryStatusRecorded": "delivery",
    "Conversation.CsatSubmitted": "csat",
    "Conversation.ActivityRecorded": "activity",
    "Agent.PresenceChanged": "presence",
}
_STATUS: Final = {
    "Conversation.MarkedPending": "pending",
    "Conversation.Resolved": "resolved",
    "Conversation.Reopened": "open",
}
_DIRECTION: Final = {"Conversation.MessageReceived": "in", "Conversation.ReplyQueued": "out"}
# Agent.Registered is not sent, but names the agent of later presence changes.
HANDLED: Final = frozenset(TYPES) | {"Agent.Registered"}
_BOOKKEEPING: Final = frozenset({"originator_topic", "timestamp", "class_version"})


# --------------------------------------------------------------------------- who and what


Authenticate = Callable[[str], Awaitable[Principal | None]]


@dataclass(frozen=True, slots=True)
class ConversationScope:
    """What decides who sees a conversation. `queue` None: in no queue (not yet routed)."""

    queue: str | None = None
    assignee: str | None = None
    offered_to: str | None = None
    status: str = "open"  # open | pending | resolved


def next_scope(
    scope: ConversationScope | None, name: str, state: Mapping[str, Any]
) -> ConversationScope | None:
    """The scope after a conversation event (the same rules as the aggregate's `apply`)."""
    if name == "Conversation.Opened":
        return ConversationScope(queue=state.get("queue"))
    current = scope or ConversationScope()
    if name == "Conversation.Queued":
        return replace(current, queue=state["queue"])
    if name == "Conversation.Transferred":
        return replace(current, queue=state["queue"], assignee=None, offered_to=None)
    if name == "Conversation.Offered":
        return replace(current, offered_to=state["agent"])
    if name == "Conversation.OfferLapsed":
        return replace(current, offered_to=None)
    if name == "Conversation.Assigned":
        return replace(current, assignee=state["agent"], offered_to=None)
    if name == "Conversation.Resolved":
        return replace(current, status="resolved", offered_to=None)
    if name in _STATUS:
        return replace(current, status=_STATUS[name])
    if current.status == "pending" and (
        (name == "Conversation.MessageReceived" and not state.get("automatic"))
        or (
            name == "Conversation.ActivityRecorded"
            and state.get("activity") in ("call.started", "chat.started")
        )
    ):
        return replace(current, status="open")  # the customer came back
    return scope


QueueSkill = Callable[[str], str | None]


def admits(scope: ConversationScope | None, agent: Principal, queue_skill: QueueSkill) -> bool:
    """An agent sees a conversation assigned to them, offered to them, or waiting (unassigned,
    unresolved) in a queue whose skill they have or that needs none."""
    if scope is None:
        return False
    if agent.agent_id in (scope.assignee, scope.offered_to):
        return True
    if scope.assignee is not None or scope.status == "resolved" or scope.queue is None:
        return False
    skill = queue_skill(scope.queue)
    return skill is None or skill in agent.skills


@dataclass(frozen=True, slots=True)
class Audience:
    """Who a frame is for, beside admins and supervisors (who see everything)."""

    before: ConversationScope | None = None
    after: ConversationScope | None = None
    agent: str | None = None  # a presence change: the agent whose presence it is

    def admits(self, principal: Principal, queue_skill: QueueSkill) -> bool:
        if principal.sees_everything:
            return True
        if self.agent is not None:
            return principal.agent_id == self.agent
        return admits(self.before, principal, queue_skill) or admits(
            self.after, principal, queue_skill
        )


def message_of(event: Event, agent: str | None = None) -> dict[str, Any] | None:
    """The frame of an event (without deciding who gets it); None: not sent.
    `agent`: the agent id of an Agent event (its originator is the agent's UUID)."""
    kind = TYPES.get(event.name)
    if kind is None:
        return None
    state = event.state
    data = {k: v for k, v in state.items() if k not in _BOOKKEEPING}
    data["event"] = event.name
    direction = _DIRECTION.get(event.name)
    if direction is not None:
        data["direction"] = direction
    status = _STATUS.get(event.name)
    if status is not None:
        data["status"] = status
    is_conversation = event.name.startswith("Conversation.")
    at = state.get("at") or state.get("timestamp")
    return {
        "cursor": event.notification_id,
        "type": kind,
        "conversation": event.originator_id if is_conversation else None,
        "agent": state.get("agent") if is_conversation else agent,
        "at": at if isinstance(at, str) else str(at),
        "data": data,
    }


# A frame ready to go: (cursor, JSON text, audience).
Frame = tuple[int, str, Audience]


def frame_of(event: Event, before: ConversationScope | None, agent: str | None) -> Frame | None:
    """The frame of an event, serialised once; the conversation's scope is moved on."""
    message = message_of(event, agent)
    if message is None:
        return None
    if event.name.startswith("Conversation."):
        audience = Audience(before, next_scope(before, event.name, event.state))
    else:
        audience = Audience(agent=agent or "")
    return event.notification_id, orjson.dumps(message).decode(), audience


def text_frame(payload: bytes) -> bytes:
    """An unfragmented, unmasked websocket text frame (RFC 6455 5.2), as a server sends it
    without extensions: built once and written to every socket."""
    size = len(payload)
    if size < 126:
        head = bytes((0x81, size))
    elif size < 0x10000:
        head = struct.pack("!BBH", 0x81, 126, size)
    else:
        head = struct.pack("!BBQ", 0x81, 127, size)
    return head + payload


class StreamSource(LogSource, Protocol):
    """The log, plus one aggregate's events (to learn a conversation's scope at a point in its
    history, or an agent's id, when replaying from the store). `EventStore` has both."""

    def events_of(self, aggregate_id: UUID) -> Sequence[Any]: ...


Lookup = Callable[[str], ConversationScope | None]


# --------------------------------------------------------------------------- clients


def protocol_of(receive: Receive) -> WebSocketsSansIOProtocol | None:
    """uvicorn's websockets-sansio protocol of a socket, found through the ASGI `receive`
    callable (its bound method); None under any other server or implementation, or with an
    extension other than permessage-deflate. Deflate lets a message go uncompressed (RFC 7692:
    a message without the RSV1 bit is not compressed), so its sockets get the same frame bytes
    as the rest instead of a deflated copy each; hello and replays still go through the
    protocol, compressed."""
    owner = getattr(receive, "__self__", None)
    if not isinstance(owner, WebSocketsSansIOProtocol):
        return None
    # (uvicorn agreed the extensions before it called the app)
    if any(not isinstance(e, PerMessageDeflate) for e in owner.conn.extensions):
        return None
    return owner


@dataclass(eq=False)
class _Client:
    websocket: WebSocket
    principal: Principal
    cursor: int  # everything visible to this client up to here has been sent
    max_buffer: int
    # uvicorn's protocol, when live frames can be written to its transport from the fan-out
    protocol: WebSocketsSansIOProtocol | None = None
    buffer: deque[tuple[int, str]] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    live: bool = False
    busy: bool = False  # its own task is sending (or about to): frames go to the buffer
    last_sent: float = 0.0  # loop time of the last frame sent
    beat: bool = False  # a heartbeat is due
    close_code: int | None = None  # set: close with it (overflow, shutdown, disconnected)
    close_reason: str = ""  # "{cursor}" in it: the client's cursor when it is closed
    pending: list[bytes] = field(default_factory=list)  # written directly, not yet flushed
    pending_bytes: int = 0
    dirty: bool = False  # in the hub's list of clients to flush

    def push(self, cursor: int, text: str) -> bool:
        """Queues a live frame; False when the buffer is full (the client is too slow)."""
        if len(self.buffer) >= self.max_buffer:
            return False
        self.buffer.append((cursor, text))
        self.wake.set()
        return True

    def writable(self) -> WebSocketsSansIOProtocol | None:
        """The protocol, when the next frame may be written straight to it: nothing queued
        ahead of it, its own task not sending, and the transport not pushing back."""
        protocol = self.protocol
        if protocol is None or self.buffer or self.busy or not protocol.writable.is_set():
            return None
        return protocol

    def offer(self, cursor: int, text: str, wire: bytes, now: float, dirty: list[_Client]) -> bool:
        """Hands a live frame on: written directly (flushed with the batch) when it can be,
        else queued; False when the queue is full."""
        protocol = self.writable()
        if protocol is None:
            return self.push(cursor, text)
        if self.close_code is not None or protocol.close_sent or protocol.disconnected:
            return True  # going away: its own task finishes it
        self.pending.append(wire)
        self.pending_bytes += len(wire)
        self.cursor = cursor
        self.last_sent = now
        if not self.dirty:
            self.dirty = True
            dirty.append(self)
        if self.pending_bytes >= FLUSH_AT:
            self.flush()
        return True

    def flush(self) -> None:
        """Writes what `offer` gathered, in one write."""
        self.dirty = False
        self.pending_bytes = 0
        protocol = self.protocol
        if protocol is None:
            return
        data = b"".join(self.pending)  # one frame: the very same bytes object, no copy
        self.pending.clear()
        if data and not protocol.transport.is_closing():
            protocol.transport.write(data)

    def heartbeat(self, position: int, now: float) -> bool:
        """Writes a heartbeat directly; False when it cannot (the client's task sends it)."""
        protocol = self.writable()
        if protocol is None or self.close_code is not None:
            return False
        if protocol.close_sent or protocol.disconnected:
            return True
        # Nothing queued or in flight: everything visible up to the hub's position is sent.
        self.cursor = max(self.cursor, position)
        self.last_sent = now
        self.pending.append(text_frame(orjson.dumps({"type": "heartbeat", "cursor": self.cursor})))
        self.flush()
        return True

    def end(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self.buffer.clear()
        self.wake.set()


class _Denied(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def parse_after(raw: str | None) -> int | None:
    """The `after` query parameter: a notification id >= 0, or None when absent."""
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise _Denied(400, "invalid_after", "after must be a cursor (a whole number >= 0)")
    return int(raw)


# --------------------------------------------------------------------------- the hub


class StreamHub:
    def __init__(
        self,
        store: StreamSource,
        *,
        authenticate: Authenticate,
        queue_skill: QueueSkill,
        lookup: Lookup,
        on_gone: Callable[[str], Awaitable[None]] | None = None,
        poll_interval: float = 0.02,
        heartbeat: float = 15.0,
        grace: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_buffer: int = 2000,
        replay_buffer: int = 20_000,
        batch: int = 500,
        max_scopes: int = 200_000,
    ) -> None:
        self._store = store
        self._authenticate = authenticate
        self._queue_skill = queue_skill
        self._lookup = lookup
        self._on_gone = on_gone
        self._poll_interval = poll_interval
        self._heartbeat = heartbeat
        self._grace = grace
        self._clock = clock
        self._max_buffer = max_buffer
        self._replay_buffer = replay_buffer
        self._batch = batch
        self._max_scopes = max_scopes

        self._position = 0  # the log is fanned out up to here
        self._ready = asyncio.Event()
        self._nudged = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._scopes: dict[str, ConversationScope | None] = {}
        self._agent_names: dict[str, str] = {}  # agent UUID -> agent id
        # Recent frames, oldest first; they hold every frame with a cursor above _floor.
        self._recent: list[Frame] = []
        self._recent_cursors: list[int] = []
        self._floor = 0
        self._live: dict[Principal, set[_Client]] = {}
        self._sockets: dict[str, int] = {}  # agent id -> open sockets
        self._gone_since: dict[str, float] = {}  # agent id -> when their last socket closed
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeats_checked = 0.0
        self._dirty: list[_Client] = []  # clients written to in this batch, to flush

    # -- public ----------------------------------------------------------------------------

    @property
    def position(self) -> int:
        return self._position

    def routes(self) -> list[BaseRoute]:
        # An ASGI app rather than an endpoint function: it gets the server's own `receive`.
        return [WebSocketRoute(PATH, _StreamApp(self), name="stream")]

    def connected(self, agent_id: str) -> bool:
        return self._sockets.get(agent_id, 0) > 0

    def sockets(self, agent_id: str) -> int:
        """How many stream sockets the agent has open here."""
        return self._sockets.get(agent_id, 0)

    def live_clients(self) -> tuple[int, int]:
        """(live clients, those of them whose frames are written directly by the fan-out);
        the rest are served by a task each (a server other than uvicorn's websockets-sansio)."""
        clients = [c for group in self._live.values() for c in group]
        return len(clients), sum(c.protocol is not None for c in clients)

    def nudge(self) -> None:
        """Something was just stored in this process: read the log now. Thread-safe."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._thread:
            self._nudged.set()
        else:
            loop.call_soon_threadsafe(self._nudged.set)

    async def run(self, stop: asyncio.Event) -> None:
        """Follows the log from its head at start until `stop` is set."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._position = self._floor = await asyncio.to_thread(self._store.max_notification_id)
        self._ready.set()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                # Cleared before reading: a nudge during the read wakes the next wait at once.
                self._nudged.clear()
                try:
                    done = await self.run_once()
                except Exception:  # a store error must not end the stream: log and retry
                    log.exception("stream: reading the log failed; retrying")
                    done = 0
                self._check_grace()
                self._check_heartbeats()
                if done == 0:
                    nudged = asyncio.ensure_future(self._nudged.wait())
                    await asyncio.wait(
                        {nudged, stopping},
                        timeout=self._poll_interval,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    nudged.cancel()
        finally:
            stopping.cancel()
            self._ready.clear()
            for clients in list(self._live.values()):
                for client in clients:
                    client.end(CLOSE_RESTARTING, "server restarting; reconnect with after={cursor}")
            self._live.clear()
            for task in list(self._tasks):
                task.cancel()

    async def run_once(self) -> int:
        """Reads and fans out one batch of the log; returns how many notifications it read."""
        records = await asyncio.to_thread(read_log, self._store, self._position, self._batch)
        if not records:
            return 0
        events = decode(records, HANDLED)
        await self._learn(events)
        # From here to the flush nothing is awaited: no client sees half a batch.
        now = asyncio.get_running_loop().time()
        for event in events:
            self._fan_out(event, now)
        self._position = records[-1][0]
        dirty = self._dirty
        for client in dirty:
            client.flush()
        dirty.clear()
        self._trim_recent()
        return len(records)

    # -- following the log -----------------------------------------------------------------

    async def _learn(self, events: Sequence[Event]) -> None:
        """Scopes of conversations not seen yet (from `lookup`) and ids of agents not seen yet
        (from their Registered event), looked up in a thread, once each."""
        conversations: set[str] = set()
        agents: set[str] = set()
        for event in events:
            oid = event.originator_id
            if event.name == "Agent.Registered":
                self._agent_names[oid] = event.state["agent_id"]
            elif event.name == "Conversation.Opened":
                self._scopes[oid] = None  # known: starts with this event
            elif event.name.startswith("Conversation."):
                if oid not in self._scopes:
                    conversations.add(oid)
            elif oid not in self._agent_names:
                agents.add(oid)
        if not conversations and not agents:
            return
        scopes, names = await asyncio.to_thread(self._look_up, conversations, agents)
        self._scopes.update(scopes)
        self._agent_names.update(names)

    def _look_up(
        self, conversations: set[str], agents: set[str]
    ) -> tuple[dict[str, ConversationScope | None], dict[str, str]]:
        scopes = {oid: self._lookup(oid) for oid in conversations}
        names = {oid: name for oid in agents if (name := self._agent_name(oid)) is not None}
        return scopes, names

    def _agent_name(self, oid: str) -> str | None:
        for event in self._store.events_of(UUID(oid))[:1]:
            name = getattr(event, "agent_id", None)
            return name if isinstance(name, str) else None
        return None

    def _fan_out(self, event: Event, now: float) -> None:
        oid = event.originator_id
        if event.name.startswith("Conversation."):
            before = self._scopes.get(oid)
            frame = frame_of(event, before, None)
            if frame is not None and frame[2].after is not before:
                self._scopes[oid] = frame[2].after
            if len(self._scopes) > self._max_scopes:
                del self._scopes[next(iter(self._scopes))]  # the oldest-seen goes first
        else:
            frame = frame_of(event, None, self._agent_names.get(oid))
        if frame is None:
            return
        cursor, text, audience = frame
        self._recent.append(frame)
        self._recent_cursors.append(cursor)
        wire = text_frame(text.encode())  # once, for every socket
        slow: list[_Client] | None = None
        queue_skill, dirty = self._queue_skill, self._dirty
        for principal, clients in self._live.items():
            if principal.sees_everything or audience.admits(principal, queue_skill):
                for client in clients:
                    if not client.offer(cursor, text, wire, now, dirty):
                        slow = slow or []
                        slow.append(client)
        for client in slow or ():
            self._leave_live(client)
            client.end(CLOSE_TRY_AGAIN, "too slow; reconnect with after={cursor}")

    def _trim_recent(self) -> None:
        """Drops the older half of the recent frames once they hold twice `replay_buffer`."""
        if len(self._recent) <= 2 * self._replay_buffer:
            return
        cut = len(self._recent) - self._replay_buffer
        self._floor = self._recent_cursors[cut - 1]
        del self._recent[:cut]
        del self._recent_cursors[:cut]

    # -- replay ----------------------------------------------------------------------------

    async def _missed(self, principal: Principal, after: int, until: int) -> tuple[list[str], int]:
        """Frames visible to `principal` with cursors in (after, until], a part at a time;
        returns them and the cursor they reach (everything visible up to it is in them)."""
        if after >= self._floor:  # in memory
            cursors = self._recent_cursors
            start = bisect.bisect_right(cursors, after)
            stop = bisect.bisect_right(cursors, until, lo=start)
            reached = until
            if stop - start > self._batch:  # a part: up to the last frame taken
                stop = start + self._batch
                reached = cursors[stop - 1]
            queue_skill = self._queue_skill
            visible = [
                t for _, t, a in self._recent[start:stop] if a.admits(principal, queue_skill)
            ]
            return visible, reached
        return await asyncio.to_thread(
            self._missed_in_store,
            principal,
            after,
            min(until, self._floor),
            dict(self._agent_names),
        )

    def _missed_in_store(
        self, principal: Principal, after: int, until: int, names: dict[str, str]
    ) -> tuple[list[str], int]:
        """Like `_missed`, from the store (older than the frames kept in memory): each
        conversation's scope at the first event read is rebuilt from its own history."""
        records = [r for r in read_log(self._store, after, self._batch) if r[0] <= until]
        if not records:
            return [], until
        scopes: dict[str, ConversationScope | None] = {}
        visible: list[str] = []
        for event in decode(records, HANDLED):
            oid = event.originator_id
            if event.name == "Agent.Registered":
                names[oid] = event.state["agent_id"]
                continue
            agent: str | None = None
            before: ConversationScope | None = None
            if event.name.startswith("Conversation."):
                if oid not in scopes:
                    scopes[oid] = self._scope_before(oid, event.version)
                before = scopes[oid]
                scopes[oid] = next_scope(before, event.name, event.state)
            else:
                agent = names.get(oid)
                if agent is None:
                    agent = names[oid] = self._agent_name(oid) or ""
            frame = frame_of(event, before, agent)
            if frame is not None and frame[2].admits(principal, self._queue_skill):
                visible.append(frame[1])
        reached = records[-1][0] if len(records) == self._batch else until
        return visible, reached

    def _scope_before(self, oid: str, version: int) -> ConversationScope | None:
        scope: ConversationScope | None = None
        if version <= 1:
            return scope
        for event in self._store.events_of(UUID(oid)):
            if event.originator_version >= version:
                break
            scope = next_scope(scope, type(event).__qualname__, vars(event))
        return scope

    # -- sockets ---------------------------------------------------------------------------

    async def _deny(self, websocket: WebSocket, denied: _Denied) -> None:
        body = {"error": {"code": denied.code, "message": denied.message}}
        if "websocket.http.response" in websocket.scope.get("extensions", {}):
            await websocket.send_denial_response(JSONResponse(body, status_code=denied.status))
        else:  # a server without the denial extension: the client sees a failed handshake
            await websocket.close(code=CLOSE_POLICY, reason=denied.message[:120])

    async def _admit(self, websocket: WebSocket) -> tuple[Principal, int | None]:
        params = websocket.query_params
        token = params.get("token")
        if not token:
            raise _Denied(401, "unauthorized", "a token is required")
        principal = await self._authenticate(token)
        if principal is None:
            raise _Denied(401, "unauthorized", "unknown token")
        if principal.role == "auditor":
            raise _Denied(403, "forbidden", "auditors have no live stream")
        after = parse_after(params.get("after"))
        if not self._ready.is_set():
            raise _Denied(503, "unavailable", "the stream is starting; try again")
        return principal, after

    async def _endpoint(
        self, websocket: WebSocket, protocol: WebSocketsSansIOProtocol | None
    ) -> None:
        try:
            principal, after = await self._admit(websocket)
        except _Denied as denied:
            await self._deny(websocket, denied)
            return
        await websocket.accept()
        start = self._position if after is None else after
        client = _Client(websocket, principal, start, self._max_buffer, protocol)
        self._attach(principal)
        receiver = asyncio.create_task(self._receive(client))
        try:
            await self._serve(client)
        except WebSocketDisconnect:
            pass  # the client went away while we were writing
        except Exception:  # e.g. the store failed during a replay: the client resumes later
            log.exception("stream: serving %s failed", principal.agent_id)
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                await websocket.close(CLOSE_INTERNAL, "try again; reconnect with after")
        finally:
            receiver.cancel()
            self._leave_live(client)
            self._detach(principal)

    async def _receive(self, client: _Client) -> None:
        """Reads (and ignores) what the client sends, to notice when it goes away."""
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            while True:
                message = await client.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
        client.end(-1, "disconnected")

    async def _serve(self, client: _Client) -> None:
        websocket = client.websocket
        hello = {
            "type": "hello",
            "cursor": client.cursor,
            "agent": client.principal.agent_id,
            "role": client.principal.role,
        }
        await websocket.send_text(orjson.dumps(hello).decode())
        # Replay until the client has caught up with the hub, then join the live frames in
        # the same step of the event loop (no await between the check and the join).
        while client.close_code is None:
            if client.cursor >= self._position:
                client.cursor = max(client.cursor, self._position)
                self._join_live(client)
                break
            frames, reached = await self._missed(client.principal, client.cursor, self._position)
            for text in frames:
                await websocket.send_text(text)
            client.cursor = reached
        await self._send_live(client)

    async def _send_live(self, client: _Client) -> None:
        """Sends what the fan-out could not write directly (all of it, without uvicorn's
        protocol), and the close."""
        websocket, buffer = client.websocket, client.buffer
        loop = asyncio.get_running_loop()
        while True:
            client.busy = True  # the fan-out queues behind what this task sends
            while buffer and client.close_code is None:
                cursor, text = buffer.popleft()
                if cursor > client.cursor:  # never twice
                    await websocket.send_text(text)
                    client.cursor = cursor
                    client.last_sent = loop.time()
            if client.close_code is not None:
                break
            # Nothing buffered: every frame for this client up to the hub's position is sent.
            client.cursor = max(client.cursor, self._position)
            if client.beat:
                client.beat = False
                client.last_sent = loop.time()
                beat = {"type": "heartbeat", "cursor": client.cursor}
                await websocket.send_text(orjson.dumps(beat).decode())
                continue
            client.busy = False
            client.wake.clear()
            await client.wake.wait()
        code = client.close_code
        if code is not None and code > 0:  # not when the client itself went away
            # the cursor as of now: a send in flight when the client was ended has finished
            await websocket.close(code, client.close_reason.format(cursor=client.cursor))

    def _check_heartbeats(self) -> None:
        """Wakes the live clients that have been silent for `heartbeat` seconds (one scan here
        instead of a timer per client and frame)."""
        now = asyncio.get_running_loop().time()
        if now - self._heartbeats_checked < min(self._heartbeat / 4, 1.0):
            return
        self._heartbeats_checked = now
        due, position = now - self._heartbeat, self._position
        for clients in self._live.values():
            for client in clients:
                # written here when it can be, else its task sends it
                due_now = client.last_sent <= due and not client.beat
                if due_now and not client.heartbeat(position, now):
                    client.beat = True
                    client.wake.set()

    def _join_live(self, client: _Client) -> None:
        client.live = True
        client.last_sent = asyncio.get_running_loop().time()
        self._live.setdefault(client.principal, set()).add(client)

    def _leave_live(self, client: _Client) -> None:
        if not client.live:
            return
        client.live = False
        clients = self._live.get(client.principal)
        if clients is not None:
            clients.discard(client)
            if not clients:
                del self._live[client.principal]

    # -- presence --------------------------------------------------------------------------

    def _attach(self, principal: Principal) -> None:
        agent = principal.agent_id
        self._agent_names.setdefault(str(ids.agent_id(agent)), agent)
        self._sockets[agent] = self._sockets.get(agent, 0) + 1
        self._gone_since.pop(agent, None)  # back within the grace period

    def _detach(self, principal: Principal) -> None:
        agent = principal.agent_id
        left = self._sockets.get(agent, 0) - 1
        if left > 0:
            self._sockets[agent] = left
            return
        self._sockets.pop(agent, None)
        if self._on_gone is not None and agent != ADMIN:
            self._gone_since[agent] = self._clock()

    def _check_grace(self) -> None:
        if not self._gone_since or self._on_gone is None:
            return
        now = self._clock()
        for agent, since in list(self._gone_since.items()):
            if now - since >= self._grace:
                del self._gone_since[agent]
                task = asyncio.create_task(self._gone(self._on_gone, agent))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _gone(self, on_gone: Callable[[str], Awaitable[None]], agent: str) -> None:
        try:
            await on_gone(agent)
        except Exception:  # one failed presence update must not stop the stream
            log.exception("stream: recording %s away failed", agent)


class _StreamApp:
    """The stream's ASGI app. Starlette hands an app (unlike an endpoint function) the server's
    own `receive` callable, the way to uvicorn's protocol for direct writes."""

    def __init__(self, hub: StreamHub) -> None:
        self._hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive=receive, send=send)
        await self._hub._endpoint(websocket, protocol_of(receive))
