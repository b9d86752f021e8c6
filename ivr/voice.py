"""The voice webhooks: `POST /twilio/voice` and every step under `/twilio/voice/...`.

Each request is checked like every Twilio webhook (adapters/twilio_signature.py: 503 without
TWILIO_AUTH_TOKEN, 403 on a missing or wrong `X-Twilio-Signature` over INBOX_PUBLIC_URL + path
+ query and the form), answered by the pure flow (ivr/flow.py), and its contact events are
published before the TwiML is returned; when Kafka does not acknowledge, the answer is 503 so
Twilio tries again (same request, same event ids, same TwiML).

The one thing the query string cannot carry is what happened to a call by the time Twilio posts
its status callback (a fixed URL): `CallRegistry` keeps it. `InMemoryCallRegistry` is per
process; with several `inbox serve` processes pass a shared one (or route a call's webhooks to
one process), otherwise a status callback that reaches another process reports
`call.ended {"ended_in": "unknown"}` (abandons are still reported by the queue result).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from adapters.kafka import PublishFailed
from adapters.twilio_signature import TwilioWebhookAuth, twilio_webhook
from inbox.ports import Publisher
from ivr.flow import (
    VOICE_PATH,
    WAIT_PATH,
    CallRecord,
    MalformedVoiceRequest,
    QueueInfo,
    handle,
    parse_request,
)
from ivr.menu import Menu

log = logging.getLogger(__name__)

QueueInfoSource = Callable[[str, str], Awaitable[QueueInfo]]
Clock = Callable[[], datetime]
# The wait loop speaks no number rather than keep a caller on hold waiting for an estimate.
QUEUE_INFO_TIMEOUT = 0.5
UNKNOWN_QUEUE_INFO = QueueInfo(position=None, estimate_seconds=None, agents_available=0)


def utc_now() -> datetime:
    return datetime.now(UTC)


class CallRegistry(Protocol):
    """What was learnt of each call in progress (queued, answered, how it left the IVR)."""

    async def get(self, call_sid: str) -> CallRecord | None: ...

    async def put(self, call_sid: str, record: CallRecord) -> None: ...


class InMemoryCallRegistry:
    """The calls of this process, the most recently touched `max_calls` of them."""

    def __init__(self, max_calls: int = 50_000) -> None:
        self._calls: OrderedDict[str, CallRecord] = OrderedDict()
        self._max_calls = max_calls

    async def get(self, call_sid: str) -> CallRecord | None:
        return self._calls.get(call_sid)

    async def put(self, call_sid: str, record: CallRecord) -> None:
        self._calls[call_sid] = record
        self._calls.move_to_end(call_sid)
        while len(self._calls) > self._max_calls:
            self._calls.popitem(last=False)


def voice_routes(
    publisher: Publisher | None,
    *,
    menu: Menu,
    auth_token: str | None,
    public_url: str,
    queue_info: QueueInfoSource,
    clock: Clock = utc_now,
    calls: CallRegistry | None = None,
) -> list[BaseRoute]:
    """`POST /twilio/voice` and `POST /twilio/voice/{step}`, signed by Twilio.

    `publisher` None publishes nothing (benchmarks of the TwiML alone); `queue_info(call_sid,
    queue)` gives the caller's position and estimate for the wait loop.
    """
    auth = TwilioWebhookAuth(auth_token, public_url)
    registry: CallRegistry = calls if calls is not None else InMemoryCallRegistry()
    base_url = public_url.rstrip("/")

    async def step(request: Request, form: FormData) -> Response:
        fields = {name: value for name, value in form.multi_items() if isinstance(value, str)}
        query = dict(request.query_params.multi_items())
        try:
            call = parse_request(request.url.path, query, fields)
        except MalformedVoiceRequest as exc:
            log.warning("refused a Twilio voice request: %s", exc)
            return PlainTextResponse(str(exc), status_code=400)
        record = await registry.get(call.call_sid)
        info = None
        if call.path == WAIT_PATH:
            info = await _queue_info(queue_info, call.call_sid, call.param("queue") or "default")
        answer = handle(menu, call, base_url=base_url, now=clock(), record=record, queue_info=info)
        if publisher is not None and answer.events:
            try:
                # Sent together (one batch, in order: the same key, so the same partition).
                await asyncio.gather(*(publisher.publish(e) for e in answer.events))
            except PublishFailed:
                return PlainTextResponse("Kafka is unavailable; try again", status_code=503)
        if answer.record is not None:
            await registry.put(call.call_sid, answer.record)
        return Response(answer.twiml, media_type="text/xml")

    endpoint = twilio_webhook(auth, step)
    return [
        Route(VOICE_PATH, endpoint, methods=["POST"]),
        # Every step, and any URL of an older menu: the flow restarts what it cannot place.
        Route(VOICE_PATH + "/{step:path}", endpoint, methods=["POST"]),
    ]


async def _queue_info(source: QueueInfoSource, call_sid: str, queue: str) -> QueueInfo:
    try:
        async with asyncio.timeout(QUEUE_INFO_TIMEOUT):
            return await source(call_sid, queue)
    except TimeoutError:
        log.warning("no wait estimate within %ss for %s in %s", QUEUE_INFO_TIMEOUT, call_sid, queue)
    except Exception:  # a caller on hold must still hear the wait loop; logged
        log.exception("the wait estimate failed for %s in %s", call_sid, queue)
    return UNKNOWN_QUEUE_INFO
