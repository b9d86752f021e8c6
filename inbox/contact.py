"""The contact event: what every channel adapter produces to Kafka (CONTRACT.md).

`parse_contact_event` is the one gate between the outside world and the domain: a record that
does not pass it goes to the dead-letter topic with the `InvalidContactEvent` reason.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

import msgspec
import orjson

from inbox.domain.conversation import MAX_PRIORITY, is_priority
from inbox.identity import (
    SOCIAL_NETWORKS,
    InvalidIdentity,
    normalise_email,
    normalise_id,
    normalise_phone,
)

SCHEMA = "contact-event/1"
MAX_RECORD_BYTES = 1024 * 1024
# A call's durations (talk, hold, wrap, queue wait): a callback's wait counts from its request,
# which may be days before (holidays); a year keeps the metrics' sums in 64-bit counters.
MAX_CALL_SECONDS = 366 * 86_400
# NUL as JSON writes it: `\u0000` after an even number of backslashes (an odd one makes it the
# text "\u0000"). Searched in C over the event's JSON, which the gate writes anyway: walking
# the payload in Python cost the parse about 4 us an event.
_ESCAPED_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")

Channel = Literal["email", "voice", "sms", "whatsapp", "messenger", "instagram", "chat"]
EventType = Literal[
    "message.received",
    "call.started",
    "ivr.selected",
    "call.queued",
    "call.answered",
    "call.ended",
    "call.abandoned",
    "callback.requested",
    "chat.started",
    "chat.ended",
    "csat.submitted",
    "delivery.status",
]
CHANNELS: frozenset[str] = frozenset(get_args(Channel))
EVENT_TYPES: frozenset[str] = frozenset(get_args(EventType))
DELIVERY_STATUSES = frozenset({"sent", "delivered", "read", "failed"})
# The identity that keys a channel's events in Kafka, in order of preference.
_KEY_PREFERENCE: dict[str, tuple[str, ...]] = {
    "email": ("email", "phone", "visitor", "social"),
    "chat": ("visitor", "email", "phone", "social"),
    "messenger": ("social", "email", "phone", "visitor"),
    "instagram": ("social", "email", "phone", "visitor"),
}
_DEFAULT_PREFERENCE = ("phone", "social", "email", "visitor")
_CALL_TYPES = frozenset(
    {
        "call.started",
        "ivr.selected",
        "call.queued",
        "call.answered",
        "call.ended",
        "call.abandoned",
        "callback.requested",
    }
)


class InvalidContactEvent(ValueError):
    """The reason a record is not a valid contact event."""


class Social(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    network: str
    id: str


class CustomerRef(msgspec.Struct, frozen=True, omit_defaults=True):
    email: str | None = None
    phone: str | None = None
    visitor: str | None = None
    social: Social | None = None
    name: str | None = None


class ThreadRef(msgspec.Struct, frozen=True, omit_defaults=True):
    ref: str | None = None
    in_reply_to: tuple[str, ...] = ()


class ContactEvent(msgspec.Struct, frozen=True):
    event_id: str
    occurred_at: datetime
    channel: Channel
    type: EventType
    customer: CustomerRef
    thread: ThreadRef = ThreadRef()
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    schema: str = SCHEMA

    def identity_keys(self) -> list[str]:
        """The customer's identity keys, the Kafka key (the channel's own identity) first."""
        keys = _keys_by_kind(self.customer)
        order = _KEY_PREFERENCE.get(self.channel, _DEFAULT_PREFERENCE)
        return [keys[kind] for kind in order if kind in keys]

    @property
    def key(self) -> str:
        """The Kafka record key: the customer's identity key for this channel."""
        return self.identity_keys()[0]


def _keys_by_kind(customer: CustomerRef) -> dict[str, str]:
    """Keys of a customer reference that `validate` has normalised already."""
    keys: dict[str, str] = {}
    if customer.email is not None:
        keys["email"] = "email:" + customer.email
    if customer.phone is not None:
        keys["phone"] = "phone:" + customer.phone
    if customer.visitor is not None:
        keys["visitor"] = "visitor:" + customer.visitor
    if customer.social is not None:
        keys["social"] = f"{customer.social.network}:{customer.social.id}"
    return keys


_decoder = msgspec.json.Decoder(ContactEvent)
_encoder = msgspec.json.Encoder()


def encode_contact_event(event: ContactEvent) -> bytes:
    return _encoder.encode(event)


def parse_contact_event(raw: bytes | None, *, now: datetime | None = None) -> ContactEvent:
    """Decodes and validates one record; raises InvalidContactEvent with the reason."""
    if raw is None:
        raise InvalidContactEvent("empty record")
    if len(raw) > MAX_RECORD_BYTES:
        raise InvalidContactEvent(f"record of {len(raw)} bytes is over the 1 MiB limit")
    try:
        event = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise InvalidContactEvent(f"invalid contact event: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidContactEvent(f"not JSON: {exc}") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise InvalidContactEvent("not JSON this service reads: nested too deep") from None
    return validate(event, now=now)


def validate(event: ContactEvent, *, now: datetime | None = None) -> ContactEvent:
    """Checks what the type system cannot and normalises identities."""
    if event.schema != SCHEMA:
        raise InvalidContactEvent(f"unknown schema {event.schema[:60]!r}, expected {SCHEMA!r}")
    if not event.event_id.strip() or len(event.event_id) > 512:
        raise InvalidContactEvent("event_id must be 1-512 characters")
    at = event.occurred_at
    if at.tzinfo is None:
        raise InvalidContactEvent("occurred_at has no time zone")
    try:
        at = at.astimezone(UTC)
    except OverflowError:
        raise InvalidContactEvent("occurred_at is out of range") from None
    limit = (now or datetime.now(UTC)) + timedelta(days=1)
    if at > limit or at.year < 2000:
        raise InvalidContactEvent(f"occurred_at {at.isoformat()} is out of range")
    customer = _normalise_customer(event.customer)
    payload = dict(event.payload)
    _check_payload(event.type, payload)
    thread = event.thread
    try:
        # (the other texts are plain strings: only the payload can fail)
        stored = orjson.dumps(
            [event.event_id, thread.ref, *thread.in_reply_to, customer.name, payload]
        )
    except TypeError as exc:  # valid JSON the event store's cannot hold: 2**64, deep nesting
        raise InvalidContactEvent(f"payload cannot be stored: {exc}") from None
    if b"\\u0000" in stored and _ESCAPED_NUL.search(stored):  # (`in`: memchr, no regex)
        # PostgreSQL's text cannot hold it: every read model would fail on the event
        raise InvalidContactEvent("a NUL character (U+0000) is in the event")
    return msgspec.structs.replace(event, occurred_at=at, customer=customer, payload=payload)


def holds_nul(value: object) -> bool:
    """Whether a NUL character is in a JSON value's strings (keys too). Without recursion:
    an API body may be nested as deep as orjson reads (1,024)."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return False


def without_nul(event: ContactEvent) -> ContactEvent:
    """The event with NUL characters taken out of its texts: what a channel's adapter hands
    the gate (which refuses them), so that one stray byte does not lose a customer's
    message. Adapters build shallow payloads: this recursion is not for any depth."""
    name = event.customer.name
    if not holds_nul(event.payload) and (name is None or "\x00" not in name):
        return event
    customer = event.customer
    if name is not None:
        customer = msgspec.structs.replace(customer, name=name.replace("\x00", ""))
    return msgspec.structs.replace(event, payload=_stripped(event.payload), customer=customer)


def _stripped(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_stripped(k): _stripped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stripped(item) for item in value]
    return value


def _normalise_customer(customer: CustomerRef) -> CustomerRef:
    try:
        normalised = CustomerRef(
            email=None if customer.email is None else normalise_email(customer.email),
            phone=None if customer.phone is None else normalise_phone(customer.phone),
            visitor=None if customer.visitor is None else normalise_id(customer.visitor, "visitor"),
            social=(
                None
                if customer.social is None
                else Social(
                    network=_network(customer.social.network),
                    id=normalise_id(customer.social.id, "social id"),
                )
            ),
            name=None if customer.name is None else customer.name.strip()[:200] or None,
        )
        keys = _keys_by_kind(normalised)
    except InvalidIdentity as exc:
        raise InvalidContactEvent(f"customer: {exc}") from None
    if not keys:
        raise InvalidContactEvent("customer has no identity (email, phone, visitor or social)")
    return normalised


def _network(raw: str) -> str:
    network = raw.strip().lower()
    if network not in SOCIAL_NETWORKS:
        raise InvalidIdentity(f"unknown social network {raw[:40]!r}")
    return network


def _require(payload: dict[str, Any], field: str, kind: type | tuple[type, ...]) -> None:
    value = payload.get(field)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidContactEvent(f"payload.{field} is missing or not {_name(kind)}")


def _name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _check_attachment(attachment: object) -> None:
    """`{name, type, size, ref}` (CONTRACT), each of them optional."""
    if not isinstance(attachment, dict):
        raise InvalidContactEvent("payload.attachments must hold objects {name, type, size, ref}")
    for name in ("name", "type", "ref"):
        if attachment.get(name) is not None and not isinstance(attachment[name], str):
            raise InvalidContactEvent(f"payload.attachments[].{name} must be a string")
    size = attachment.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise InvalidContactEvent("payload.attachments[].size must be a whole number >= 0")


def _check_payload(event_type: str, payload: dict[str, Any]) -> None:
    if event_type == "message.received":
        text = payload.get("text")
        if text is not None and not isinstance(text, str):
            raise InvalidContactEvent("payload.text must be a string")
        attachments = payload.get("attachments", [])
        if not isinstance(attachments, list):
            raise InvalidContactEvent("payload.attachments must be a list")
        for attachment in attachments:
            _check_attachment(attachment)
        if not text and not attachments and not payload.get("subject"):
            raise InvalidContactEvent("a message needs text, a subject or attachments")
    elif event_type in _CALL_TYPES:
        _require(payload, "call_sid", str)
        for name in ("queue", "agent"):
            if payload.get(name) is not None and not isinstance(payload[name], str):
                raise InvalidContactEvent(f"payload.{name} must be a string")
        priority = payload.get("priority")
        if priority is not None and not is_priority(priority):
            raise InvalidContactEvent(
                f"payload.priority must be an integer from 0 to {MAX_PRIORITY}"
            )
        if event_type == "callback.requested":
            _require(payload, "number", str)
            try:
                payload["number"] = normalise_phone(payload["number"])
            except InvalidIdentity as exc:
                raise InvalidContactEvent(f"payload.number: {exc}") from None
        for seconds in ("talk_seconds", "hold_seconds", "wrap_seconds", "queue_seconds"):
            value = payload.get(seconds)
            if value is not None and (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not 0 <= value <= MAX_CALL_SECONDS
            ):
                raise InvalidContactEvent(
                    f"payload.{seconds} must be a number from 0 to {MAX_CALL_SECONDS}"
                )
    elif event_type == "csat.submitted":
        score = payload.get("score")
        if not isinstance(score, int) or isinstance(score, bool) or not 1 <= score <= 5:
            raise InvalidContactEvent("payload.score must be an integer from 1 to 5")
    elif event_type == "delivery.status":
        _require(payload, "message_id", str)
        status = payload.get("status")
        # (a list or an object is unhashable: `in` a frozenset would raise TypeError)
        if not isinstance(status, str) or status not in DELIVERY_STATUSES:
            raise InvalidContactEvent(
                f"payload.status must be one of {', '.join(sorted(DELIVERY_STATUSES))}"
            )
