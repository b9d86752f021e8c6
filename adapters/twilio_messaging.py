"""SMS and WhatsApp through Twilio, inbound: the webhook routes and their parsers.

`POST /twilio/messaging` is the number's "a message comes in" webhook; each request becomes one
`message.received` contact event. `POST /twilio/messaging/status` is the status callback that
`TwilioSender` names when it sends; `sent`, `delivered`, `read`, `failed` and `undelivered`
become `delivery.status` events, the intermediate statuses (queued, accepted, sending, ...) are
acknowledged and dropped.

Both answer only after Kafka acknowledged the event; when Kafka is down they answer 503 so the
request is tried again (configure the webhook URL with Twilio's connection overrides, e.g.
`#rc=5&rp=all`, see docs/twilio.md). Event ids come from Twilio's MessageSid, so a retried or
duplicated request is the same event.
"""

from __future__ import annotations

import logging
import mimetypes
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from adapters.kafka import PublishFailed
from adapters.twilio_signature import TwilioWebhookAuth, twilio_webhook
from inbox.contact import (
    Channel,
    ContactEvent,
    CustomerRef,
    InvalidContactEvent,
    ThreadRef,
    validate,
    without_nul,
)
from inbox.identity import InvalidIdentity, normalise_phone
from inbox.ports import Publisher

log = logging.getLogger(__name__)

MESSAGING_PATH = "/twilio/messaging"
STATUS_PATH = "/twilio/messaging/status"
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
# Twilio accepts at most 10 media per message; a larger count is not Twilio's.
MAX_MEDIA = 10
# Message SIDs are two letters (SM, MM) and 32 hex digits.
_SID = re.compile(r"^[A-Za-z]{2}[0-9a-fA-F]{32}\Z")
_WHATSAPP = "whatsapp:"
# Twilio's MessageStatus → the contact event's delivery status; others are not published.
_PUBLISHED_STATUSES = {
    "sent": "sent",
    "delivered": "delivered",
    "read": "read",
    "failed": "failed",
    "undelivered": "failed",
}

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class MalformedTwilioRequest(ValueError):
    """A signed request that is not a message Twilio would send: answered 400, not published."""


# --------------------------------------------------------------------------- parsing


def parse_inbound_message(form: Mapping[str, str], *, now: datetime) -> ContactEvent:
    """One incoming SMS or WhatsApp message as a `message.received` contact event.

    Raises MalformedTwilioRequest with the reason.
    """
    sid = _message_sid(form)
    channel, phone = _address(form.get("From"), "From")
    attachments = _attachments(form)
    replied_to = form.get("OriginalRepliedMessageSid", "").strip()
    payload: dict[str, Any] = {
        "text": form.get("Body", ""),
        "attachments": attachments,
        "message_id": sid,
    }
    via = form.get("To", "").strip()
    if via:
        payload["via"] = via
    event = ContactEvent(
        event_id=sid,
        occurred_at=now,
        channel=channel,
        type="message.received",
        customer=CustomerRef(phone=phone, name=form.get("ProfileName") or None),
        thread=ThreadRef(in_reply_to=(replied_to,) if _SID.match(replied_to) else ()),
        payload=payload,
    )
    return _validated(event, now)


def parse_status_callback(form: Mapping[str, str], *, now: datetime) -> ContactEvent | None:
    """A status callback for one of our outbound messages as a `delivery.status` event, or
    None for a status that is not published (queued, accepted, sending, ...).

    The customer is the message's recipient, `To`. Raises MalformedTwilioRequest.
    """
    sid = _message_sid(form)
    raw_status = (form.get("MessageStatus") or form.get("SmsStatus") or "").strip().lower()
    if not raw_status:
        raise MalformedTwilioRequest("MessageStatus is missing")
    status = _PUBLISHED_STATUSES.get(raw_status)
    if status is None:
        return None
    channel, phone = _address(form.get("To"), "To")
    if form.get("From", "").strip().lower().startswith(_WHATSAPP):
        channel = "whatsapp"
    event = ContactEvent(
        event_id=f"status:{sid}:{raw_status}",
        occurred_at=now,
        channel=channel,
        type="delivery.status",
        customer=CustomerRef(phone=phone),
        payload={"message_id": sid, "status": status, "error": _error(form)},
    )
    return _validated(event, now)


def _message_sid(form: Mapping[str, str]) -> str:
    sid = form.get("MessageSid", "").strip()
    if not sid:
        raise MalformedTwilioRequest("MessageSid is missing")
    if not _SID.match(sid):
        raise MalformedTwilioRequest(f"MessageSid {sid[:40]!r} is not a Twilio message SID")
    return sid


def _address(raw: str | None, field: str) -> tuple[Channel, str]:
    """The channel and E.164 phone of a Twilio address: `+1415...` or `whatsapp:+1415...`."""
    value = (raw or "").strip()
    if not value:
        raise MalformedTwilioRequest(f"{field} is missing")
    prefix, colon, rest = value.partition(":")
    if colon and prefix.lower() != "whatsapp":
        # messenger:, rcs:, ... are Twilio channels this adapter does not take.
        raise MalformedTwilioRequest(f"{field} {value[:60]!r} is not an SMS or WhatsApp address")
    channel: Channel = "whatsapp" if colon else "sms"
    try:
        phone = normalise_phone(rest if colon else value)
    except InvalidIdentity as exc:
        raise MalformedTwilioRequest(f"{field}: {exc}") from None
    return channel, phone


def _attachments(form: Mapping[str, str]) -> list[dict[str, Any]]:
    raw_count = form.get("NumMedia", "0").strip() or "0"
    if not raw_count.isdecimal() or int(raw_count) > MAX_MEDIA:
        raise MalformedTwilioRequest(f"NumMedia {raw_count[:20]!r} is not a number from 0 to 10")
    attachments = []
    for n in range(int(raw_count)):
        url = form.get(f"MediaUrl{n}", "").strip()
        if not url:
            raise MalformedTwilioRequest(f"NumMedia is {raw_count} but MediaUrl{n} is missing")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise MalformedTwilioRequest(f"MediaUrl{n} {url[:80]!r} is not an http(s) URL")
        content_type = form.get(f"MediaContentType{n}", "").strip().lower()
        name = parts.path.rstrip("/").rpartition("/")[2] or f"media{n}"
        extension = mimetypes.guess_extension(content_type) if content_type else None
        attachments.append(
            {
                "name": name + (extension or ""),
                "type": content_type or "application/octet-stream",
                "size": None,  # Twilio does not say; the media stays at Twilio (ref)
                "ref": url,
            }
        )
    return attachments


def _error(form: Mapping[str, str]) -> str | None:
    code = form.get("ErrorCode", "").strip()
    message = form.get("ErrorMessage", "").strip()
    if code and message:
        return f"{code}: {message}"
    return code or message or None


def _fields(form: FormData) -> dict[str, str]:
    # Twilio sends each messaging parameter once; the form parser yields text only.
    return {name: value for name, value in form.multi_items() if isinstance(value, str)}


def _validated(event: ContactEvent, now: datetime) -> ContactEvent:
    try:
        return validate(without_nul(event), now=now)
    except InvalidContactEvent as exc:
        raise MalformedTwilioRequest(str(exc)) from None


# --------------------------------------------------------------------------- routes


def twilio_messaging_routes(
    publisher: Publisher,
    *,
    auth_token: str | None,
    public_url: str,
    clock: Clock = utc_now,
) -> list[BaseRoute]:
    """`POST /twilio/messaging` and `POST /twilio/messaging/status`, signed by Twilio."""
    auth = TwilioWebhookAuth(auth_token, public_url)

    async def publish(event: ContactEvent | None) -> Response:
        if event is not None:
            try:
                await publisher.publish(event)
            except PublishFailed:
                return PlainTextResponse("Kafka is unavailable; try again", status_code=503)
        return Response(EMPTY_TWIML, media_type="text/xml")

    async def inbound(request: Request, form: FormData) -> Response:
        try:
            event = parse_inbound_message(_fields(form), now=clock())
        except MalformedTwilioRequest as exc:
            log.warning("refused a Twilio message: %s", exc)
            return PlainTextResponse(str(exc), status_code=400)
        return await publish(event)

    async def status(request: Request, form: FormData) -> Response:
        try:
            event = parse_status_callback(_fields(form), now=clock())
        except MalformedTwilioRequest as exc:
            log.warning("refused a Twilio status callback: %s", exc)
            return PlainTextResponse(str(exc), status_code=400)
        return await publish(event)

    return [
        Route(MESSAGING_PATH, twilio_webhook(auth, inbound), methods=["POST"]),
        Route(STATUS_PATH, twilio_webhook(auth, status), methods=["POST"]),
    ]
