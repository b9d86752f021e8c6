"""Meta webhooks in: WhatsApp Cloud API, Messenger and Instagram messaging (CONTRACT.md).

`meta_routes(...)` serves `GET /webhooks/meta` (the subscription handshake) and
`POST /webhooks/meta` (notifications). A notification is checked against
`X-Hub-Signature-256` before it is parsed, turned into contact events by the pure functions
below (one payload item → one event), and answered 200 only after Kafka acknowledged every
event it carried; Meta retries anything else, and the same message ids give the same event ids.

What is deliberately not a contact event (returned as None, never published): echoes of our own
Messenger/Instagram messages, Messenger delivery/read receipts and reactions, WhatsApp reaction
removals, status values outside sent|delivered|read|failed, WhatsApp system notices and message
kinds we do not know yet. Those are acknowledged, so Meta does not retry them for days and hold
up the other messages of the same notification. What is malformed raises `MetaPayloadError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from adapters.kafka import PublishFailed
from inbox.contact import (
    ContactEvent,
    CustomerRef,
    InvalidContactEvent,
    Social,
    ThreadRef,
    validate,
    without_nul,
)
from inbox.domain.time import Clock, system_clock
from inbox.ports import Publisher

log = logging.getLogger(__name__)

PATH = "/webhooks/meta"
SIGNATURE_HEADER = "x-hub-signature-256"
# Meta's notifications are a few KiB; anything near this is not from Meta.
MAX_BODY_BYTES = 1024 * 1024
MEDIA_TYPES = ("image", "audio", "video", "document", "sticker")
Network = Literal["messenger", "instagram"]
_OBJECT_NETWORK: dict[str, Network] = {"page": "messenger", "instagram": "instagram"}
_STATUSES = frozenset({"sent", "delivered", "read", "failed"})
# Message kinds WhatsApp delivers that carry nothing for an agent (number changes, the
# "welcome" request when a customer opens the chat): acknowledged, not published.
_WHATSAPP_SILENT = frozenset({"system", "request_welcome", "ephemeral"})
_MAX_TEXT = 65_536


class MetaPayloadError(ValueError):
    """A Meta notification (or one item of it) that is not in the format Meta documents."""


# --------------------------------------------------------------------------- reading JSON


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MetaPayloadError(f"{what} must be an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise MetaPayloadError(f"{what} must be a list")
    return value


def _str(obj: Mapping[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise MetaPayloadError(f"{what}.{key} is missing or not a non-empty string")
    return value.strip()


def _opt_str(obj: Mapping[str, Any], key: str, what: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise MetaPayloadError(f"{what}.{key} must be a string")
    return value[:_MAX_TEXT]


def _id(value: Any, what: str) -> str:
    """An id Meta sends as a string (sometimes as a number in older Messenger payloads)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise MetaPayloadError(f"{what} is missing or not an id")


def _instant(raw: Any, what: str, *, millis: bool) -> datetime:
    """A Unix timestamp: seconds as a string (WhatsApp) or milliseconds as a number
    (Messenger, Instagram)."""
    try:
        if isinstance(raw, bool):
            raise ValueError
        if isinstance(raw, str):
            if not raw.strip().isascii():
                raise ValueError
            number = float(raw) if "." in raw else int(raw)
        elif isinstance(raw, int | float):
            number = raw
        else:
            raise ValueError
        seconds = number / 1000 if millis else number
        if not math.isfinite(seconds):
            raise ValueError
        return datetime.fromtimestamp(seconds, UTC)
    except (ValueError, OverflowError, OSError):
        raise MetaPayloadError(f"{what} is missing or not a Unix timestamp") from None


def _finite(value: Any, what: str, limit: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MetaPayloadError(f"{what} must be a number")
    number = float(value)
    if not math.isfinite(number) or abs(number) > limit:
        raise MetaPayloadError(f"{what} is out of range")
    return number


def _checked(event: ContactEvent, now: datetime) -> ContactEvent:
    """The contact event gate (identities to E.164 and keys, time range, payload rules)."""
    try:
        return validate(without_nul(event), now=now)
    except InvalidContactEvent as exc:
        raise MetaPayloadError(str(exc)) from None


# --------------------------------------------------------------------------- WhatsApp


def _profile_name(value: Mapping[str, Any], wa_id: str) -> str | None:
    """The sender's WhatsApp profile name, from the `contacts` beside the messages."""
    contacts = _list(value.get("contacts"), "value.contacts")
    for contact in contacts:
        if isinstance(contact, dict) and contact.get("wa_id") == wa_id:
            profile = contact.get("profile")
            if isinstance(profile, dict) and isinstance(profile.get("name"), str):
                return str(profile["name"])[:200] or None
    return None


def _via(value: Mapping[str, Any]) -> str:
    metadata = _obj(value.get("metadata"), "value.metadata")
    return _id(metadata.get("phone_number_id"), "value.metadata.phone_number_id")


def _media(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    what = f"message.{kind}"
    media_id = _id(body.get("id"), f"{what}.id")
    mime = _opt_str(body, "mime_type", what) or "application/octet-stream"
    size = body.get("file_size")
    return {
        "name": _opt_str(body, "filename", what) or f"{kind}-{media_id}",
        "type": mime,
        "size": size if isinstance(size, int) and not isinstance(size, bool) else None,
        "ref": f"meta-media:{media_id}",
    }


def _location(body: Mapping[str, Any], what: str) -> tuple[str, dict[str, Any]]:
    latitude = _finite(body.get("latitude"), f"{what}.latitude", 90)
    longitude = _finite(body.get("longitude"), f"{what}.longitude", 180)
    location: dict[str, Any] = {"latitude": latitude, "longitude": longitude}
    for key in ("name", "address", "url"):
        text = _opt_str(body, key, what)
        if text:
            location[key] = text
    label = ", ".join(location[k] for k in ("name", "address") if k in location)
    text = f"Location: {label} ({latitude}, {longitude})" if label else None
    return text or f"Location: ({latitude}, {longitude})", location


def _shared_contacts(items: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    shared: list[dict[str, Any]] = []
    for n, item in enumerate(items):
        card = _obj(item, f"message.contacts[{n}]")
        name = card.get("name")
        formatted = name.get("formatted_name") if isinstance(name, dict) else None
        phones = [
            p["phone"]
            for p in _list(card.get("phones"), "contact.phones")
            if isinstance(p, dict) and isinstance(p.get("phone"), str)
        ]
        emails = [
            e["email"]
            for e in _list(card.get("emails"), "contact.emails")
            if isinstance(e, dict) and isinstance(e.get("email"), str)
        ]
        shared.append(
            {
                "name": formatted if isinstance(formatted, str) else None,
                "phones": phones,
                "emails": emails,
            }
        )
    if not shared:
        raise MetaPayloadError("message.contacts is empty")
    labels = [
        " ".join(part for part in (c["name"] or "", *c["phones"][:1]) if part) or "a contact"
        for c in shared
    ]
    return "Shared contact: " + "; ".join(labels), shared


def parse_whatsapp_message(
    message: Mapping[str, Any], value: Mapping[str, Any], *, now: datetime
) -> ContactEvent | None:
    """One item of `value.messages` (a customer wrote to our number) → message.received."""
    message = _obj(message, "message")
    wamid = _str(message, "id", "message")
    sender = _str(message, "from", "message")
    kind = _str(message, "type", "message")
    at = _instant(message.get("timestamp"), "message.timestamp", millis=False)
    payload: dict[str, Any] = {"message_id": wamid, "via": _via(value), "kind": kind}
    text: str | None
    if kind == "text":
        text = _str(_obj(message.get("text"), "message.text"), "body", "message.text")
    elif kind in MEDIA_TYPES:
        body = _obj(message.get(kind), f"message.{kind}")
        payload["attachments"] = [_media(kind, body)]
        text = _opt_str(body, "caption", f"message.{kind}") or ""
    elif kind == "location":
        text, payload["location"] = _location(
            _obj(message.get("location"), "message.location"), "message.location"
        )
    elif kind == "contacts":
        text, payload["contacts"] = _shared_contacts(
            _list(message.get("contacts"), "message.contacts")
        )
    elif kind == "interactive":
        interactive = _obj(message.get("interactive"), "message.interactive")
        reply_kind = _str(interactive, "type", "message.interactive")
        if reply_kind not in ("button_reply", "list_reply"):
            log.info("WhatsApp interactive %r not taken in (%s)", reply_kind[:40], wamid)
            return None
        reply = _obj(interactive.get(reply_kind), f"message.interactive.{reply_kind}")
        text = _str(reply, "title", reply_kind)
        payload["reply"] = {"kind": reply_kind, "id": _id(reply.get("id"), f"{reply_kind}.id")}
        payload["reply"]["title"] = text
        description = _opt_str(reply, "description", reply_kind)
        if description:
            payload["reply"]["description"] = description
    elif kind == "button":
        button = _obj(message.get("button"), "message.button")
        text = _str(button, "text", "message.button")
        payload["reply"] = {"kind": "button", "id": _opt_str(button, "payload", "button") or text}
        payload["reply"]["title"] = text
    elif kind == "reaction":
        reaction = _obj(message.get("reaction"), "message.reaction")
        target = _str(reaction, "message_id", "message.reaction")
        emoji = _opt_str(reaction, "emoji", "message.reaction")
        if not emoji:
            return None  # the customer took a reaction back: nothing for an agent to read
        text = emoji
        payload["reaction"] = {"message_id": target, "emoji": emoji}
    elif kind in ("unsupported", "unknown"):
        # The customer did write (a poll, an edit, a view-once photo): say so rather than
        # lose the contact.
        text = "[a WhatsApp message of a kind that cannot be shown here]"
        payload["unsupported"] = True
    elif kind in _WHATSAPP_SILENT:
        return None
    else:
        log.info("WhatsApp message type %r not taken in (%s)", kind[:40], wamid)
        return None
    payload["text"] = text
    context = message.get("context")
    in_reply_to: tuple[str, ...] = ()
    if isinstance(context, dict) and isinstance(context.get("id"), str) and context["id"]:
        in_reply_to = (context["id"],)
    if isinstance(payload.get("reaction"), dict):
        in_reply_to = (payload["reaction"]["message_id"],)
    event = ContactEvent(
        event_id=wamid,
        occurred_at=at,
        channel="whatsapp",
        type="message.received",
        customer=CustomerRef(phone=sender, name=_profile_name(value, sender)),
        thread=ThreadRef(in_reply_to=in_reply_to),
        payload=payload,
    )
    return _checked(event, now)


def _status_error(status: Mapping[str, Any]) -> str | None:
    errors = status.get("errors")
    if not isinstance(errors, list) or not errors or not isinstance(errors[0], dict):
        return None
    first = errors[0]
    data = first.get("error_data")
    details = data.get("details") if isinstance(data, dict) else None
    parts = [
        str(first["code"]) if isinstance(first.get("code"), int | str) else None,
        first.get("title") if isinstance(first.get("title"), str) else None,
        details if isinstance(details, str) else None,
    ]
    text = " ".join(p for p in parts[:2] if p)
    if parts[2] and parts[2] != parts[1]:
        text = f"{text}: {parts[2]}" if text else parts[2]
    return text[:1000] or None


def parse_whatsapp_status(
    status: Mapping[str, Any], value: Mapping[str, Any], *, now: datetime
) -> ContactEvent | None:
    """One item of `value.statuses` (what became of a message we sent) → delivery.status,
    keyed by the recipient's phone."""
    status = _obj(status, "status")
    wamid = _str(status, "id", "status")
    state = _str(status, "status", "status")
    if state not in _STATUSES:
        log.info("WhatsApp status %r not taken in (%s)", state[:40], wamid)
        return None
    recipient = _id(status.get("recipient_id"), "status.recipient_id")
    at = _instant(status.get("timestamp"), "status.timestamp", millis=False)
    payload: dict[str, Any] = {
        "message_id": wamid,
        "status": state,
        "error": _status_error(status),
        "via": _via(value),
    }
    event = ContactEvent(
        event_id=f"status:{wamid}:{state}",
        occurred_at=at,
        channel="whatsapp",
        type="delivery.status",
        customer=CustomerRef(phone=recipient),
        payload=payload,
    )
    return _checked(event, now)


# --------------------------------------------------------------------------- Messenger, Instagram


def _messaging_attachments(
    items: list[Any], payload: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Attachments with a URL become payload attachments; a shared location becomes
    payload.location; what only has a title (shares, templates) adds to the text."""
    attachments: list[dict[str, Any]] = []
    titles: list[str] = []
    for n, item in enumerate(items):
        what = f"message.attachments[{n}]"
        attachment = _obj(item, what)
        kind = _str(attachment, "type", what)
        body = attachment.get("payload")
        body = body if isinstance(body, dict) else {}
        coordinates = body.get("coordinates")
        url = body.get("url")
        title = attachment.get("title") or body.get("title")
        if kind == "location" and isinstance(coordinates, dict):
            label, payload["location"] = _location(
                {"latitude": coordinates.get("lat"), "longitude": coordinates.get("long")},
                f"{what}.payload.coordinates",
            )
            titles.append(label)
        elif isinstance(url, str) and url:
            attachments.append(
                {
                    "name": title if isinstance(title, str) and title else kind,
                    "type": kind,
                    "size": None,
                    "ref": url,
                }
            )
        elif isinstance(title, str) and title:
            titles.append(title[:_MAX_TEXT])
    return attachments, titles


def parse_messaging(
    item: Mapping[str, Any], *, network: Network, now: datetime
) -> ContactEvent | None:
    """One item of `entry.messaging` (Messenger or Instagram) → message.received."""
    item = _obj(item, "messaging")
    sender = _id(_obj(item.get("sender"), "messaging.sender").get("id"), "messaging.sender.id")
    via = _id(
        _obj(item.get("recipient"), "messaging.recipient").get("id"), "messaging.recipient.id"
    )
    message = item.get("message")
    postback = item.get("postback")
    if message is None and postback is None:
        return None  # delivery, read, reaction, optin, referral: not a customer's message
    at = _instant(item.get("timestamp"), "messaging.timestamp", millis=True)
    payload: dict[str, Any] = {"via": via}
    in_reply_to: tuple[str, ...] = ()
    if message is not None:
        message = _obj(message, "messaging.message")
        if message.get("is_echo") is True:
            return None  # our own reply, sent by us or from Meta's inbox
        if message.get("is_deleted") is True or message.get("is_unsupported") is True:
            return None
        event_id = _str(message, "mid", "message")
        text = _opt_str(message, "text", "message")
        attachments, titles = _messaging_attachments(
            _list(message.get("attachments"), "message.attachments"), payload
        )
        if not text and not attachments and not titles:
            raise MetaPayloadError("message has no text and no attachments")
        text = "\n".join(part for part in (text, *titles) if part)
        quick_reply = message.get("quick_reply")
        if isinstance(quick_reply, dict):
            payload["reply"] = {
                "kind": "quick_reply",
                "id": _opt_str(quick_reply, "payload", "quick_reply") or text,
                "title": text,
            }
        reply_to = message.get("reply_to")
        if isinstance(reply_to, dict) and isinstance(reply_to.get("mid"), str):
            in_reply_to = (reply_to["mid"],)
        if attachments:
            payload["attachments"] = attachments
        payload["kind"] = "message"
    else:
        postback = _obj(postback, "messaging.postback")
        title = _opt_str(postback, "title", "postback")
        value = _opt_str(postback, "payload", "postback")
        text = title or value
        if not text:
            raise MetaPayloadError("postback has neither title nor payload")
        # Older postbacks carry no mid: sender and time identify the tap just as stably.
        mid = postback.get("mid")
        event_id = (
            mid.strip()
            if isinstance(mid, str) and mid.strip()
            else f"postback:{sender}:{int(at.timestamp() * 1000)}"
        )
        payload["reply"] = {"kind": "postback", "id": value or text, "title": text}
        payload["kind"] = "postback"
    payload["text"] = text
    payload["message_id"] = event_id
    event = ContactEvent(
        event_id=event_id,
        occurred_at=at,
        channel=network,
        type="message.received",
        customer=CustomerRef(social=Social(network=network, id=sender)),
        thread=ThreadRef(in_reply_to=in_reply_to),
        payload=payload,
    )
    return _checked(event, now)


# --------------------------------------------------------------------------- the envelope


def parse_webhook(body: Any, *, now: datetime) -> list[ContactEvent]:
    """Every contact event of one notification, in order; MetaPayloadError if any item is
    malformed (then nothing of it is published)."""
    body = _obj(body, "the notification")
    kind = _str(body, "object", "notification")
    entries = body.get("entry")
    if not isinstance(entries, list):
        raise MetaPayloadError("notification.entry is missing or not a list")
    events: list[ContactEvent | None] = []
    for n, raw_entry in enumerate(entries):
        entry = _obj(raw_entry, f"entry[{n}]")
        if kind == "whatsapp_business_account":
            for change in _list(entry.get("changes"), f"entry[{n}].changes"):
                change = _obj(change, "change")
                if change.get("field") != "messages":
                    continue  # account, template and quality updates
                value = _obj(change.get("value"), "change.value")
                for message in _list(value.get("messages"), "value.messages"):
                    events.append(parse_whatsapp_message(message, value, now=now))
                for status in _list(value.get("statuses"), "value.statuses"):
                    events.append(parse_whatsapp_status(status, value, now=now))
        elif kind in _OBJECT_NETWORK:
            network = _OBJECT_NETWORK[kind]
            for item in _list(entry.get("messaging"), f"entry[{n}].messaging"):
                events.append(parse_messaging(item, network=network, now=now))
        else:
            log.info("Meta notification for object %r ignored", kind[:40])
    return [event for event in events if event is not None]


def signature_ok(app_secret: str, body: bytes, header: str | None) -> bool:
    """`X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>`, compared in
    constant time."""
    if not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest().encode()
    # Header values arrive as latin-1 text; compare bytes so any value is comparable.
    given = header[len("sha256=") :].strip().lower().encode("latin-1", "replace")
    return hmac.compare_digest(expected, given)


# --------------------------------------------------------------------------- routes


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def _read_body(request: Request) -> bytes | None:
    """The raw body, or None when it is over MAX_BODY_BYTES (checked while reading)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def meta_routes(
    publisher: Publisher,
    *,
    app_secret: str | None,
    verify_token: str | None,
    clock: Clock = system_clock,
) -> list[BaseRoute]:
    """`GET` and `POST /webhooks/meta`. Without `app_secret` (META_APP_SECRET) both answer 503,
    as does GET without `verify_token` (META_VERIFY_TOKEN)."""

    def not_configured() -> Response:
        return _error(
            503,
            "meta_not_configured",
            "Meta webhooks are not configured on this server (set META_APP_SECRET and "
            "META_VERIFY_TOKEN)",
        )

    async def verify(request: Request) -> Response:
        if not app_secret or not verify_token:
            return not_configured()
        params = request.query_params
        token = params.get("hub.verify_token", "")
        challenge = params.get("hub.challenge")
        if (
            params.get("hub.mode") != "subscribe"
            or challenge is None
            or not hmac.compare_digest(token.encode(), verify_token.encode())
        ):
            return _error(403, "verification_failed", "hub.mode or hub.verify_token is wrong")
        return PlainTextResponse(challenge)

    async def notify(request: Request) -> Response:
        if not app_secret:
            return not_configured()
        try:
            body = await _read_body(request)
        except ClientDisconnect:
            return Response(status_code=400)
        if body is None:
            return _error(413, "too_large", f"the body is over {MAX_BODY_BYTES} bytes")
        if not signature_ok(app_secret, body, request.headers.get(SIGNATURE_HEADER)):
            return _error(
                403, "bad_signature", "X-Hub-Signature-256 is missing or does not match the body"
            )
        try:
            events = parse_webhook(orjson.loads(body), now=clock())
        except orjson.JSONDecodeError as exc:
            return _error(400, "invalid_json", f"the body is not JSON: {exc}")
        except MetaPayloadError as exc:
            return _error(400, "invalid_payload", str(exc))
        return await _publish_all(publisher, events)

    return [
        Route(PATH, verify, methods=["GET"], name="meta_verify"),
        Route(PATH, notify, methods=["POST"], name="meta_notify"),
    ]


async def _publish_all(publisher: Publisher, events: list[ContactEvent]) -> Response:
    if len(events) == 1:  # the common case: no task to schedule
        try:
            await publisher.publish(events[0])
        except PublishFailed:
            return _error(503, "kafka_unavailable", "the event was not stored; try again")
        return Response(b'{"received":1}', media_type="application/json")
    # Concurrently, so a notification of n messages waits for one Kafka round trip, not n;
    # every publish is awaited before answering, so none is left running after a 503.
    results = await asyncio.gather(
        *(publisher.publish(event) for event in events), return_exceptions=True
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    for failure in failures:
        if not isinstance(failure, PublishFailed):
            raise failure
    if failures:
        return _error(
            503,
            "kafka_unavailable",
            f"{len(failures)} of {len(events)} events were not stored; try again",
        )
    return JSONResponse({"received": len(events)})


__all__: list[str] = [
    "MetaPayloadError",
    "meta_routes",
    "parse_messaging",
    "parse_webhook",
    "parse_whatsapp_message",
    "parse_whatsapp_status",
    "signature_ok",
]
