"""Web chat over a websocket, in and out (CONTRACT.md "Channels in": web chat; docs/chat.md).

In: `ChatGateway.routes()` serves `/chat/ws?visitor=ID[&token=T][&after=A]`. A visitor without a
token gets a fresh signed token in the first server frame (`welcome`); reconnecting with it
resumes the chat and sends the agent messages the visitor missed (after `after`). Every visitor
frame `{"type":"message","text":...,"id"?}` becomes one `message.received` contact event,
acknowledged to the visitor (`ack`) only after Kafka acknowledged it.

Out: `ChatSender` pushes an agent's reply to every open socket of the visitor in this process.

One visitor frame -> one contact event is `parse_frame` + `message_event`; the rest is the
socket's life cycle.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol

import orjson
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from adapters.kafka import PublishFailed
from adapters.outbound import OutboundMessage, PermanentFailure, SendResult
from inbox.contact import ContactEvent, CustomerRef, InvalidContactEvent, validate
from inbox.domain.time import Clock, iso, parse_iso, system_clock
from inbox.identity import InvalidIdentity, normalise_id, visitor_key
from inbox.ports import Publisher
from projections.db import DatabaseError, ReadModelDB
from projections.inbox_view import get_customer
from projections.timeline import timeline_of

log = logging.getLogger(__name__)

PATH = "/chat/ws"
CHANNEL: Final = "chat"
# RFC 6455 close codes.
CLOSE_NORMAL = 1000
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013
_TOKEN_CONTEXT = b"chat-visitor/1:"  # keeps these signatures apart from any other use of the key
_MIN_SECRET_BYTES = 16


# --------------------------------------------------------------------------- frames in


class FrameError(ValueError):
    """Why a visitor frame was refused; `code` goes into the error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ChatMessage:
    """A visitor's message frame, parsed."""

    text: str
    id: str | None  # the client's id for it: a resend after a reconnect carries the same one


def parse_frame(raw: str | bytes) -> ChatMessage:
    """One visitor frame; raises FrameError (invalid_json, invalid_frame, unknown_type)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise FrameError("invalid_json", "a frame must be a JSON object") from None
    if not isinstance(data, dict):
        raise FrameError("invalid_frame", "a frame must be a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise FrameError("invalid_frame", 'a frame needs a "type"')
    if kind != "message":
        raise FrameError("unknown_type", f"unknown frame type {kind[:40]!r}; expected 'message'")
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise FrameError("invalid_frame", 'a message needs a non-empty "text"')
    try:
        text.encode()  # JSON escapes can smuggle in lone surrogates, which Kafka JSON cannot carry
    except UnicodeEncodeError:
        raise FrameError("invalid_frame", '"text" is not valid Unicode') from None
    if "\x00" in text:
        raise FrameError("invalid_frame", '"text" holds a NUL character')
    client_id = data.get("id")
    if client_id is not None:
        if not isinstance(client_id, str):
            raise FrameError("invalid_frame", '"id" must be a string')
        try:
            client_id = normalise_id(client_id, "message id")
        except InvalidIdentity as exc:
            raise FrameError("invalid_frame", str(exc)) from None
    return ChatMessage(text=text, id=client_id)


def message_event(
    visitor: str, message: ChatMessage, *, message_id: str, at: datetime
) -> ContactEvent:
    """The contact event of one visitor message. The event id is scoped to the visitor, so
    two visitors' client ids never collide and a resent frame keeps its event id."""
    event = ContactEvent(
        event_id=f"chat:{visitor}:{message_id}",
        occurred_at=at,
        channel=CHANNEL,
        type="message.received",
        customer=CustomerRef(visitor=visitor),
        payload={"text": message.text, "message_id": message_id},
    )
    return validate(event, now=at)


def chat_event(kind: str, visitor: str, connection_id: str, *, at: datetime) -> ContactEvent:
    """`chat.started` / `chat.ended` of one connection."""
    suffix = "" if kind == "chat.started" else ":ended"
    event = ContactEvent(
        event_id=f"chat:{visitor}:{connection_id}{suffix}",
        occurred_at=at,
        channel=CHANNEL,
        type="chat.started" if kind == "chat.started" else "chat.ended",
        customer=CustomerRef(visitor=visitor),
        payload={"connection": connection_id},
    )
    return validate(event, now=at)


# --------------------------------------------------------------------------- visitor tokens


def visitor_token(secret: bytes, visitor: str) -> str:
    """`<visitor>.<HMAC-SHA256 of the visitor id, base64url>` (the id may hold dots; the
    signature never does)."""
    digest = hmac.new(secret, _TOKEN_CONTEXT + visitor.encode(), hashlib.sha256).digest()
    return visitor + "." + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def token_valid(secret: bytes, visitor: str, token: str) -> bool:
    expected = visitor_token(secret, visitor).encode()
    return hmac.compare_digest(expected, token.encode("utf-8", "surrogatepass"))


# --------------------------------------------------------------------------- history


class HistoryUnavailable(RuntimeError):
    """The history could not be read (the read-model database is down)."""


class ChatHistory(Protocol):
    """What the gateway needs to know of past chats (called from a worker thread)."""

    def known(self, visitor: str) -> bool:
        """Whether the visitor has chatted before (so a connection without its token is
        refused: nobody takes over a chat by guessing its visitor id)."""
        ...

    def agent_messages(self, visitor: str, after: str | None) -> list[dict[str, str]]:
        """The agent's chat messages to the visitor after `after` (the id or `at` of the last
        one the client saw; None: all), oldest first, each `{"id", "text", "at"}`."""
        ...


def messages_after(messages: Sequence[dict[str, str]], after: str | None) -> list[dict[str, str]]:
    """`messages` (oldest first) after the one whose id is `after`, else after the time
    `after`; all of them when `after` is None or neither (the client drops ids it has)."""
    if after is None:
        return list(messages)
    for index, message in enumerate(messages):
        if message["id"] == after:
            return list(messages[index + 1 :])
    try:
        since = parse_iso(after)
    except (ValueError, OverflowError):  # (OverflowError: year 1 with an offset)
        return list(messages)
    return [m for m in messages if parse_iso(m["at"]) > since]


class ReadModelChatHistory:
    """The history from the read models: the visitor's customer (identity key
    `visitor:<id>`, following merges), their conversations (inbox view) and, in their
    timelines, the outbound chat messages."""

    def __init__(self, db: ReadModelDB) -> None:
        self._db = db

    def known(self, visitor: str) -> bool:
        try:
            return get_customer(self._db, visitor_key(visitor)) is not None
        except DatabaseError as exc:
            raise HistoryUnavailable(str(exc)) from exc

    def agent_messages(self, visitor: str, after: str | None) -> list[dict[str, str]]:
        messages: list[tuple[str, str, int, dict[str, str]]] = []
        try:
            with self._db.read() as tx:  # the blocks below join this one snapshot
                customer = get_customer(self._db, visitor_key(visitor))
                if customer is None:
                    return []
                for conversation in customer["conversations"]:
                    for entry in timeline_of(tx, conversation["id"]):
                        if (entry["kind"], entry["direction"], entry["channel"]) != (
                            "message",
                            "out",
                            CHANNEL,
                        ):
                            continue
                        message_id = str(entry["data"].get("message_id") or entry["version"])
                        at = entry["at"]
                        messages.append(
                            (
                                at,
                                conversation["id"],
                                entry["version"],
                                {"id": message_id, "text": entry["text"] or "", "at": at},
                            )
                        )
        except DatabaseError as exc:
            raise HistoryUnavailable(str(exc)) from exc
        # Stored times are fixed-width UTC strings: they sort as text.
        messages.sort(key=lambda m: m[:3])
        return messages_after([m[3] for m in messages], after)


# --------------------------------------------------------------------------- the open sockets


@dataclass(frozen=True)
class ChatLimits:
    max_frame_bytes: int = 64 * 1024
    messages_per_second: int = 10  # per visitor, across that visitor's sockets
    send_timeout: float = 5.0  # a push to one socket; a stuck socket must not hold the others
    history_messages: int = 200  # the most recent ones, when a visitor missed more


@dataclass(eq=False)
class _Connection:
    websocket: WebSocket
    visitor: str
    id: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, frame: dict[str, Any]) -> None:
        # One writer at a time: the receive loop's acks and the sender's pushes share a socket.
        async with self.lock:
            await self.websocket.send_text(orjson.dumps(frame).decode())


class ChatHub:
    """The open chat sockets of this process, by visitor, and each visitor's message rate."""

    def __init__(
        self, limits: ChatLimits | None = None, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits or ChatLimits()
        self._monotonic = monotonic
        self._sockets: dict[str, set[_Connection]] = {}
        self._frames: dict[str, deque[float]] = {}

    def add(self, connection: _Connection) -> None:
        self._sockets.setdefault(connection.visitor, set()).add(connection)

    def remove(self, connection: _Connection) -> bool:
        """Forgets a socket; True when it was the visitor's last one here."""
        sockets = self._sockets.get(connection.visitor, set())
        sockets.discard(connection)
        if sockets:
            return False
        self._sockets.pop(connection.visitor, None)
        self._frames.pop(connection.visitor, None)
        return True

    def open_sockets(self, visitor: str) -> list[_Connection]:
        return list(self._sockets.get(visitor, ()))

    def allow_frame(self, visitor: str) -> bool:
        """A sliding one-second window; refused frames do not count, so a visitor who
        slows down gets through at once."""
        now = self._monotonic()
        window = self._frames.setdefault(visitor, deque())
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= self.limits.messages_per_second:
            return False
        window.append(now)
        return True


# --------------------------------------------------------------------------- in


def _error(code: str, message: str, message_id: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if message_id is not None:
        frame["id"] = message_id
    return frame


def agent_frame(message_id: str, text: str, at: str) -> dict[str, Any]:
    return {"type": "message", "from": "agent", "text": text, "at": at, "id": message_id}


class ChatGateway:
    """The chat websocket. `secret` signs visitor tokens (keep it across restarts, or tokens
    handed out before stop working); `history` answers reconnects; `hub` is shared with the
    `ChatSender` of this process (one is made when not given)."""

    def __init__(
        self,
        publisher: Publisher,
        secret: bytes,
        history: ChatHistory,
        *,
        clock: Clock = system_clock,
        limits: ChatLimits | None = None,
        hub: ChatHub | None = None,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        if len(secret) < _MIN_SECRET_BYTES:
            raise ValueError(f"the chat token secret needs at least {_MIN_SECRET_BYTES} bytes")
        self._publisher = publisher
        self._secret = secret
        self._history = history
        self._clock = clock
        self.hub = hub or ChatHub(limits)  # a hub given brings its own limits
        self.limits = self.hub.limits
        self._new_id = new_id

    def routes(self) -> list[BaseRoute]:
        return [WebSocketRoute(PATH, self._endpoint, name="chat")]

    def token_for(self, visitor: str) -> str:
        return visitor_token(self._secret, visitor)

    async def _deny(self, websocket: WebSocket, status: int, code: str, message: str) -> None:
        body = {"error": {"code": code, "message": message}}
        if "websocket.http.response" in websocket.scope.get("extensions", {}):
            await websocket.send_denial_response(JSONResponse(body, status_code=status))
        else:  # a server without the denial extension: the client sees a failed handshake
            await websocket.close(code=1008, reason=message[:120])

    async def _endpoint(self, websocket: WebSocket) -> None:
        params = websocket.query_params
        try:
            visitor = normalise_id(params.get("visitor", ""), "visitor")
        except InvalidIdentity as exc:
            await self._deny(websocket, 400, "invalid_visitor", str(exc))
            return
        token = params.get("token")
        resumed = token is not None
        if token is not None and not token_valid(self._secret, visitor, token):
            await self._deny(websocket, 403, "invalid_token", "the visitor token is not valid")
            return
        if token is None:
            try:
                taken = bool(self.hub.open_sockets(visitor)) or await asyncio.to_thread(
                    self._history.known, visitor
                )
            except HistoryUnavailable:
                await self._deny(websocket, 503, "unavailable", "try again in a moment")
                return
            if taken:
                await self._deny(
                    websocket,
                    403,
                    "visitor_taken",
                    "this visitor id has chatted before: reconnect with its token",
                )
                return
        await websocket.accept()
        connection = _Connection(websocket, visitor, self._new_id())
        # WebSocketDisconnect: the visitor went away while we were writing; nobody to answer.
        with contextlib.suppress(WebSocketDisconnect):
            await self._serve(connection, resumed=resumed, after=params.get("after"))

    async def _serve(self, connection: _Connection, *, resumed: bool, after: str | None) -> None:
        websocket, visitor = connection.websocket, connection.visitor
        if not resumed:
            try:
                await self._publisher.publish(
                    chat_event("chat.started", visitor, connection.id, at=self._clock())
                )
            except PublishFailed:
                await connection.send(_error("unavailable", "chat is unavailable; try again"))
                await websocket.close(CLOSE_TRY_AGAIN, "try again")
                return
        await connection.send(
            {"type": "welcome", "token": self.token_for(visitor), "resumed": resumed}
        )
        self.hub.add(connection)
        clean = False
        try:
            if resumed:
                await self._send_history(connection, after)
            clean = await self._receive_loop(connection)
        finally:
            last = self.hub.remove(connection)
            if clean and last:
                await self._publish_ended(connection)

    async def _send_history(self, connection: _Connection, after: str | None) -> None:
        try:
            missed = await asyncio.to_thread(
                self._history.agent_messages, connection.visitor, after
            )
        except HistoryUnavailable as exc:
            log.warning("chat history of %s unavailable: %s", connection.visitor, exc)
            await connection.send(
                _error("history_unavailable", "earlier messages could not be loaded")
            )
            return
        for message in missed[-self.limits.history_messages :]:
            await connection.send(agent_frame(message["id"], message["text"], message["at"]))

    async def _receive_loop(self, connection: _Connection) -> bool:
        """Serves frames until the socket closes; True when the visitor closed it cleanly."""
        websocket, visitor = connection.websocket, connection.visitor
        while True:
            received = await websocket.receive()
            if received["type"] == "websocket.disconnect":
                return bool(received.get("code", CLOSE_NORMAL) == CLOSE_NORMAL)
            text = received.get("text")
            raw: str | bytes = text if text is not None else received.get("bytes") or b""
            size = len(raw.encode()) if isinstance(raw, str) else len(raw)
            if size > self.limits.max_frame_bytes:
                await websocket.close(CLOSE_TOO_BIG, "frame too big")
                return False
            if not self.hub.allow_frame(visitor):
                await connection.send(
                    _error(
                        "rate_limited",
                        f"more than {self.limits.messages_per_second} messages a second; "
                        "resend later",
                        _client_id(raw),
                    )
                )
                continue
            await self._handle(connection, raw)

    async def _handle(self, connection: _Connection, raw: str | bytes) -> None:
        try:
            message = parse_frame(raw)
            message_id = message.id or self._new_id()
            event = message_event(
                connection.visitor, message, message_id=message_id, at=self._clock()
            )
        except FrameError as exc:
            await connection.send(_error(exc.code, exc.message, _client_id(raw)))
            return
        except InvalidContactEvent as exc:
            await connection.send(_error("invalid_frame", str(exc), _client_id(raw)))
            return
        try:
            await self._publisher.publish(event)
        except PublishFailed:
            await connection.send(
                _error("unavailable", "the message was not taken; resend it", message_id)
            )
            return
        await connection.send({"type": "ack", "id": message_id})

    async def _publish_ended(self, connection: _Connection) -> None:
        try:
            await self._publisher.publish(
                chat_event("chat.ended", connection.visitor, connection.id, at=self._clock())
            )
        except PublishFailed as exc:
            # Nobody is left to answer "try again": the chat shows as not ended.
            log.warning("chat.ended of %s not published: %s", connection.visitor, exc)


def _client_id(raw: str | bytes) -> str | None:
    """The client's id of a refused frame, when it has a usable one (for the error frame)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    value = data.get("id") if isinstance(data, dict) else None
    if not isinstance(value, str):
        return None
    try:
        return normalise_id(value, "message id")
    except InvalidIdentity:
        return None


# --------------------------------------------------------------------------- out


class ChatSender:
    """An agent's reply to every open socket of the visitor (`message.to`) in this process:
    `delivered` when at least one took it, else `sent` (the visitor gets it from the history
    on reconnect)."""

    channels = frozenset({CHANNEL})

    def __init__(self, hub: ChatHub, *, clock: Clock = system_clock) -> None:
        self._hub = hub
        self._clock = clock

    async def send(self, message: OutboundMessage) -> SendResult:
        try:
            visitor = normalise_id(message.to, "visitor")
        except InvalidIdentity as exc:
            raise PermanentFailure(str(exc)) from None
        frame = agent_frame(message.message_id, message.text, iso(self._clock()))
        sockets = self._hub.open_sockets(visitor)
        results = await asyncio.gather(*(self._push(c, frame) for c in sockets))
        return SendResult(provider_id=None, status="delivered" if any(results) else "sent")

    async def _push(self, connection: _Connection, frame: dict[str, Any]) -> bool:
        # A socket that closed or stalls meanwhile just did not get it (Starlette raises
        # RuntimeError for a send after the close).
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError, TimeoutError):
            await asyncio.wait_for(connection.send(frame), self._hub.limits.send_timeout)
            return True
        return False
