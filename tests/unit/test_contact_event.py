"""The contact event gate (inbox/contact.py): what parses, what is refused and why."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from typing import Any, cast, get_args

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inbox.contact import (
    CHANNELS,
    DELIVERY_STATUSES,
    EVENT_TYPES,
    MAX_RECORD_BYTES,
    SCHEMA,
    Channel,
    ContactEvent,
    CustomerRef,
    EventType,
    InvalidContactEvent,
    Social,
    ThreadRef,
    encode_contact_event,
    holds_nul,
    parse_contact_event,
    validate,
)
from inbox.telemetry import DEAD_LETTER_REASONS, reason_label

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
FUZZ = settings(max_examples=200, deadline=None)

Json = dict[str, Any]

# One valid (channel, payload) per type, in the shapes the adapters produce.
VALID: dict[str, tuple[str, Json]] = {
    "message.received": (
        "email",
        {
            "text": "Hi, my order 4412 has not arrived yet",
            "subject": "Order 4412",
            "html": "<p>Hi, my order 4412 has not arrived yet</p>",
            "attachments": [
                {"name": "receipt.pdf", "type": "application/pdf", "size": 2048, "ref": "b1"}
            ],
            "message_id": "<CAFx1@mail.example.com>",
        },
    ),
    "call.started": ("voice", {"call_sid": "CA01", "to": "+15005550006"}),
    "ivr.selected": (
        "voice",
        {"call_sid": "CA01", "node": "main", "choice": "2", "path": ["main", "billing"]},
    ),
    "call.queued": ("voice", {"call_sid": "CA01", "queue": "billing"}),
    "call.answered": ("voice", {"call_sid": "CA01", "queue": "billing", "agent": "ann"}),
    "call.ended": (
        "voice",
        {"call_sid": "CA01", "talk_seconds": 95, "hold_seconds": 0, "wrap_seconds": 12.5},
    ),
    "call.abandoned": ("voice", {"call_sid": "CA01", "queue": "billing", "queue_seconds": 41}),
    "callback.requested": (
        "voice",
        {"call_sid": "CA01", "queue": "billing", "number": "+14155550199"},
    ),
    "chat.started": ("chat", {}),
    "chat.ended": ("chat", {}),
    "csat.submitted": ("chat", {"score": 5, "comment": "quick and kind"}),
    "delivery.status": (
        "whatsapp",
        {"message_id": "wamid.HBgLMTQxNTU1NTAxMjM", "status": "read", "error": None},
    ),
}
CALL_TYPES = sorted(t for t in EVENT_TYPES if t.startswith(("call.", "ivr.", "callback.")))


def event_dict(event_type: str = "message.received", **overrides: Any) -> Json:
    channel, payload = VALID[event_type]
    event: Json = {
        "schema": SCHEMA,
        "event_id": f"evt-{event_type}",
        "occurred_at": "2026-11-27T10:00:00Z",
        "channel": channel,
        "type": event_type,
        "customer": {"email": "Alice@Example.com", "phone": "+1 415 555 0123", "name": " Alice "},
        "thread": {"ref": "thread-1", "in_reply_to": ["<m0@example.com>"]},
        "payload": copy.deepcopy(payload),
    }
    event.update(overrides)
    return event


def raw(event: Any) -> bytes:
    return json.dumps(event).encode()


def parse(event: Any) -> ContactEvent:
    return parse_contact_event(raw(event), now=NOW)


# --------------------------------------------------------------------------- valid events


def test_every_event_type_has_a_valid_example() -> None:
    assert set(VALID) == EVENT_TYPES


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_a_valid_event_of_each_type_parses(event_type: str) -> None:
    event = parse(event_dict(event_type))

    assert event.type == event_type
    assert event.channel == VALID[event_type][0]
    assert event.event_id == f"evt-{event_type}"
    assert event.occurred_at == datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
    assert event.customer == CustomerRef(
        email="alice@example.com", phone="+14155550123", name="Alice"
    )
    assert event.thread == ThreadRef(ref="thread-1", in_reply_to=("<m0@example.com>",))
    assert event.payload == VALID[event_type][1]
    assert event.schema == SCHEMA


@pytest.mark.parametrize("channel", sorted(CHANNELS))
def test_every_channel_is_accepted(channel: str) -> None:
    assert parse(event_dict(channel=channel)).channel == channel


def test_the_sms_sample_as_a_contact_event() -> None:
    # /work/shared/samples/twilio/sms-incoming.form, as the Twilio adapter turns it.
    event = parse(
        {
            "schema": SCHEMA,
            "event_id": "twilio:SM1f0e2d3c4b5a69788796a5b4c3d2e1f0",
            "occurred_at": "2026-11-27T10:00:00Z",
            "channel": "sms",
            "type": "message.received",
            "customer": {"phone": "+14155550123"},
            "payload": {
                "text": "Hi, my order 4412 has not arrived yet",
                "message_id": "SM1f0e2d3c4b5a69788796a5b4c3d2e1f0",
            },
        }
    )
    assert event.key == "phone:+14155550123"
    assert event.thread == ThreadRef()


def test_the_whatsapp_sample_as_a_contact_event() -> None:
    # /work/shared/samples/meta/whatsapp-text.json: wa_id 14155550123, no '+'.
    event = parse(
        {
            "event_id": "meta:wamid.HBgLMTQxNTU1NTAxMjMVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=",
            "occurred_at": "2026-11-27T08:00:00+00:00",
            "channel": "whatsapp",
            "type": "message.received",
            "customer": {
                "phone": "whatsapp:14155550123",
                "social": {"network": "WhatsApp", "id": "14155550123"},
                "name": "Sheena Nelson",
            },
            "payload": {"text": "Does it come in another color?"},
        }
    )
    assert event.customer.phone == "+14155550123"
    assert event.customer.social == Social(network="whatsapp", id="14155550123")
    assert event.identity_keys() == ["phone:+14155550123", "whatsapp:14155550123"]


def test_a_timestamp_with_an_offset_is_stored_in_utc() -> None:
    event = parse(event_dict(occurred_at="2026-11-27T12:30:00+02:00"))
    assert event.occurred_at == datetime(2026, 11, 27, 10, 30, tzinfo=UTC)
    assert event.occurred_at.utcoffset() == timedelta(0)


def test_a_timestamp_up_to_a_day_ahead_is_tolerated() -> None:
    ahead = (NOW + timedelta(hours=23)).isoformat()
    assert parse(event_dict(occurred_at=ahead)).occurred_at == NOW + timedelta(hours=23)


def test_unknown_fields_are_ignored_and_payload_extras_kept() -> None:
    event = event_dict(extra="ignored")
    event["payload"]["spam_score"] = 0.1
    event["customer"]["social"] = {"network": "instagram", "id": "1789", "handle": "al"}
    parsed = parse(event)
    assert parsed.payload["spam_score"] == 0.1
    assert parsed.customer.social == Social(network="instagram", id="1789")


def test_a_blank_name_is_no_name() -> None:
    event = event_dict(customer={"visitor": "v-1", "name": "   "})
    assert parse(event).customer == CustomerRef(visitor="v-1")


def test_the_callback_number_is_normalised() -> None:
    event = event_dict("callback.requested")
    event["payload"]["number"] = "+1 (415) 555-0199"
    assert parse(event).payload["number"] == "+14155550199"


def test_a_message_needs_only_one_of_text_subject_or_attachments() -> None:
    for payload in ({"text": "x"}, {"subject": "x"}, {"attachments": [{"name": "a"}]}):
        assert parse(event_dict(payload=payload)).payload == payload


def test_a_record_of_exactly_one_mib_is_accepted() -> None:
    event = event_dict(payload={"text": ""})
    event["payload"]["text"] = "x" * (MAX_RECORD_BYTES - len(raw(event)))
    record = raw(event)
    assert len(record) == MAX_RECORD_BYTES
    assert len(parse_contact_event(record, now=NOW).payload["text"]) > 1000


@pytest.mark.parametrize(
    ("channel", "customer", "keys"),
    [
        (
            "email",
            {"phone": "+14155550123", "email": "a@example.com", "visitor": "v1"},
            ["email:a@example.com", "phone:+14155550123", "visitor:v1"],
        ),
        (
            "chat",
            {"email": "a@example.com", "visitor": "v1"},
            ["visitor:v1", "email:a@example.com"],
        ),
        (
            "sms",
            {"email": "a@example.com", "phone": "+14155550123"},
            ["phone:+14155550123", "email:a@example.com"],
        ),
        ("voice", {"phone": "+14155550123"}, ["phone:+14155550123"]),
        (
            "whatsapp",
            {"social": {"network": "whatsapp", "id": "1"}, "phone": "+14155550123"},
            ["phone:+14155550123", "whatsapp:1"],
        ),
        (
            "messenger",
            {"social": {"network": "messenger", "id": "77"}, "email": "a@example.com"},
            ["messenger:77", "email:a@example.com"],
        ),
        ("instagram", {"social": {"network": "instagram", "id": "9"}}, ["instagram:9"]),
    ],
)
def test_identity_keys_put_the_channels_own_identity_first(
    channel: str, customer: Json, keys: list[str]
) -> None:
    event = parse(event_dict(channel=channel, customer=customer))
    assert event.identity_keys() == keys
    assert event.key == keys[0]


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_encode_then_parse_gives_the_same_event(event_type: str) -> None:
    event = parse(event_dict(event_type))
    assert parse_contact_event(encode_contact_event(event), now=NOW) == event


def test_an_event_built_by_an_adapter_is_encoded_with_its_schema() -> None:
    event = ContactEvent(
        event_id="chat:1",
        occurred_at=NOW,
        channel="chat",
        type="chat.started",
        customer=CustomerRef(visitor="v-1"),
    )
    encoded = json.loads(encode_contact_event(event))
    assert encoded["schema"] == SCHEMA


# --------------------------------------------------------------------------- invalid events

Mutation = Callable[[Json], Any]


def _set(path: str, value: Any) -> Mutation:
    def mutate(event: Json) -> Json:
        *parents, last = path.split(".")
        target = event
        for part in parents:
            target = target[part]
        target[last] = value
        return event

    return mutate


def _drop(path: str) -> Mutation:
    def mutate(event: Json) -> Json:
        *parents, last = path.split(".")
        target = event
        for part in parents:
            target = target[part]
        del target[last]
        return event

    return mutate


INVALID: list[tuple[str, str, Mutation, str]] = [
    # (id, type, mutation, reason the error must name)
    ("json-array", "message.received", lambda e: [e], "Expected `object`, got `array`"),
    ("json-string", "message.received", lambda e: "event", "Expected `object`"),
    (
        "unknown-schema",
        "message.received",
        _set("schema", "contact-event/2"),
        "unknown schema 'contact-event/2'",
    ),
    ("schema-not-text", "message.received", _set("schema", 1), "schema"),
    ("no-event-id", "message.received", _drop("event_id"), "event_id"),
    ("blank-event-id", "message.received", _set("event_id", "  "), "event_id must be 1-512"),
    ("long-event-id", "message.received", _set("event_id", "e" * 513), "event_id must be 1-512"),
    (
        "unknown-channel",
        "message.received",
        _set("channel", "fax"),
        "Invalid enum value 'fax' - at `\\$.channel`",
    ),
    (
        "unknown-type",
        "message.received",
        _set("type", "call.transferred"),
        "Invalid enum value 'call.transferred' - at `\\$.type`",
    ),
    ("no-customer", "message.received", _drop("customer"), "missing required field `customer`"),
    (
        "no-identity",
        "message.received",
        _set("customer", {"name": "Alice"}),
        "customer has no identity",
    ),
    (
        "bad-email",
        "message.received",
        _set("customer.email", "alice@"),
        "customer: not an email address",
    ),
    ("email-not-text", "message.received", _set("customer.email", 42), "\\$.customer.email"),
    (
        "bad-phone",
        "message.received",
        _set("customer.phone", "call me"),
        "customer: not a phone number",
    ),
    (
        "short-phone",
        "message.received",
        _set("customer.phone", "+1 415"),
        "customer: not a possible phone number",
    ),
    (
        "bad-visitor",
        "message.received",
        _set("customer.visitor", "two words"),
        "customer: visitor must be",
    ),
    (
        "bad-network",
        "message.received",
        _set("customer.social", {"network": "myspace", "id": "1"}),
        "customer: unknown social network 'myspace'",
    ),
    (
        "bad-social-id",
        "message.received",
        _set("customer.social", {"network": "whatsapp", "id": ""}),
        "customer: social id must be",
    ),
    (
        "naive-time",
        "message.received",
        _set("occurred_at", "2026-11-27T10:00:00"),
        "occurred_at has no time zone",
    ),
    (
        "future-time",
        "message.received",
        _set("occurred_at", "2026-11-29T12:00:01Z"),
        "occurred_at 2026-11-29T12:00:01\\+00:00 is out of range",
    ),
    (
        "ancient-time",
        "message.received",
        _set("occurred_at", "1999-12-31T23:59:59Z"),
        "occurred_at 1999-12-31T23:59:59\\+00:00 is out of range",
    ),
    (
        "garbage-time",
        "message.received",
        _set("occurred_at", "yesterday"),
        "datetime - at `\\$.occurred_at`",
    ),
    ("payload-not-object", "message.received", _set("payload", ["hi"]), "\\$.payload"),
    (
        "empty-message",
        "message.received",
        _set("payload", {"text": ""}),
        "a message needs text, a subject or attachments",
    ),
    ("text-not-text", "message.received", _set("payload.text", 7), "payload.text must be a string"),
    (
        "attachments-not-list",
        "message.received",
        _set("payload.attachments", "a.pdf"),
        "payload.attachments must be a list",
    ),
    *[
        (f"{t}-no-call-sid", t, _drop("payload.call_sid"), "payload.call_sid is missing or not str")
        for t in CALL_TYPES
    ],
    (
        "call-sid-not-text",
        "call.ended",
        _set("payload.call_sid", 123),
        "payload.call_sid is missing or not str",
    ),
    (
        "negative-talk",
        "call.ended",
        _set("payload.talk_seconds", -1),
        "payload.talk_seconds must be a number from 0 to 31622400",
    ),
    (
        "bool-hold",
        "call.ended",
        _set("payload.hold_seconds", True),
        "payload.hold_seconds must be a number from 0 to 31622400",
    ),
    (
        "text-queue-seconds",
        "call.abandoned",
        _set("payload.queue_seconds", "41"),
        "payload.queue_seconds must be a number from 0 to 31622400",
    ),
    (
        "a-century-of-talk",
        "call.ended",
        _set("payload.talk_seconds", 10**13),
        "payload.talk_seconds must be a number from 0 to 31622400",
    ),
    (
        "priority-text",
        "call.queued",
        _set("payload.priority", "high"),
        "payload.priority must be an integer from 0 to 9",
    ),
    (
        "priority-huge",
        "call.queued",
        _set("payload.priority", 10**19),
        "payload.priority must be an integer from 0 to 9",
    ),
    (
        "queue-not-text",
        "call.queued",
        _set("payload.queue", ["sales"]),
        "payload.queue must be a string",
    ),
    (
        "agent-not-text",
        "call.answered",
        _set("payload.agent", 7),
        "payload.agent must be a string",
    ),
    (
        "attachment-not-object",
        "message.received",
        _set("payload.attachments", ["x.pdf"]),
        "payload.attachments must hold objects",
    ),
    (
        "attachment-size-text",
        "message.received",
        _set("payload.attachments", [{"name": "x.pdf", "size": "12"}]),
        "payload.attachments\\[\\].size must be a whole number",
    ),
    (
        "nul-in-text",
        "message.received",
        _set("payload.text", "a\x00b"),
        "a NUL character",
    ),
    (
        "nul-in-event-id",
        "message.received",
        _set("event_id", "e\x00"),
        "a NUL character",
    ),
    (
        "nul-deep",
        "call.ended",
        _set("payload.extra", {"k": ["\x00"]}),
        "a NUL character",
    ),
    (
        "callback-no-number",
        "callback.requested",
        _drop("payload.number"),
        "payload.number is missing or not str",
    ),
    (
        "callback-bad-number",
        "callback.requested",
        _set("payload.number", "555"),
        "payload.number: not a",
    ),
    (
        "csat-0",
        "csat.submitted",
        _set("payload.score", 0),
        "payload.score must be an integer from 1 to 5",
    ),
    (
        "csat-6",
        "csat.submitted",
        _set("payload.score", 6),
        "payload.score must be an integer from 1 to 5",
    ),
    (
        "csat-true",
        "csat.submitted",
        _set("payload.score", True),
        "payload.score must be an integer from 1 to 5",
    ),
    (
        "csat-float",
        "csat.submitted",
        _set("payload.score", 4.5),
        "payload.score must be an integer from 1 to 5",
    ),
    (
        "csat-text",
        "csat.submitted",
        _set("payload.score", "5"),
        "payload.score must be an integer from 1 to 5",
    ),
    (
        "csat-missing",
        "csat.submitted",
        _drop("payload.score"),
        "payload.score must be an integer from 1 to 5",
    ),
    (
        "delivery-unknown",
        "delivery.status",
        _set("payload.status", "bounced"),
        "payload.status must be one of delivered, failed, read, sent",
    ),
    (
        "delivery-status-a-list",  # unhashable: found by the fuzz test below
        "delivery.status",
        _set("payload.status", []),
        "payload.status must be one of",
    ),
    (
        "delivery-no-status",
        "delivery.status",
        _drop("payload.status"),
        "payload.status must be one of",
    ),
    (
        "delivery-no-message-id",
        "delivery.status",
        _drop("payload.message_id"),
        "payload.message_id is missing or not str",
    ),
]


@pytest.mark.parametrize(
    ("event_type", "mutation", "reason"),
    [pytest.param(t, m, r, id=i) for i, t, m, r in INVALID],
)
def test_an_invalid_event_is_refused_with_its_reason(
    event_type: str, mutation: Mutation, reason: str
) -> None:
    with pytest.raises(InvalidContactEvent, match=reason):
        parse(mutation(event_dict(event_type)))


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (None, "empty record"),
        (b"", "not JSON"),
        (b"{not json", "not JSON"),
        (b'{"event_id": "e",', "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        (b"null", "invalid contact event: Expected `object`, got `null`"),
    ],
)
def test_a_record_that_is_not_a_json_object_is_refused(record: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidContactEvent, match=reason):
        parse_contact_event(record, now=NOW)


def test_a_record_over_one_mib_is_refused_before_decoding() -> None:
    event = event_dict(payload={"text": "x" * MAX_RECORD_BYTES})
    with pytest.raises(InvalidContactEvent, match=r"record of \d+ bytes is over the 1 MiB limit"):
        parse(event)
    # Not even JSON is looked at.
    with pytest.raises(InvalidContactEvent, match="over the 1 MiB limit"):
        parse_contact_event(b"{" * (MAX_RECORD_BYTES + 1), now=NOW)


def _nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (2**64, "Integer exceeds 64-bit range"),
        (-(2**63) - 1, "Integer exceeds 64-bit range"),
        (_nested(300), "Recursion limit reached"),
    ],
)
def test_valid_json_the_event_store_cannot_hold_is_refused(extra: Any, reason: str) -> None:
    record = json.dumps(event_dict(payload={"text": "hi", "extra": extra})).encode()
    with pytest.raises(InvalidContactEvent, match=f"payload cannot be stored: {reason}"):
        parse_contact_event(record, now=NOW)
    fine = json.dumps(event_dict(payload={"text": "hi", "extra": [2**63 - 1, _nested(200)]}))
    assert parse_contact_event(fine.encode(), now=NOW).payload["extra"][0] == 2**63 - 1


def test_a_callback_answered_days_after_its_request_passes() -> None:
    # (the dialer's queue_seconds counts from the request: a holiday closure is days)
    event = event_dict(
        type="call.answered",
        channel="voice",
        payload={"call_sid": "CA1", "queue": "sales", "queue_seconds": 10 * 86_400},
    )
    assert parse(event).payload["queue_seconds"] == 10 * 86_400


def test_holds_nul_walks_any_depth_without_recursion() -> None:
    deep: Any = "x\x00"
    for _ in range(5000):
        deep = {"k": [deep]}
    assert holds_nul(deep)
    assert not holds_nul({"a": ["b", {"c": None, "d": 1}]})


def test_a_record_nested_past_what_the_decoder_reads_is_refused() -> None:
    deep = '{"d":' * 3000 + "1" + "}" * 3000
    record = json.dumps(event_dict(payload={"text": "hi"}))[:-1] + ', "x": ' + deep + "}"
    with pytest.raises(InvalidContactEvent, match="nested too deep"):
        parse_contact_event(record.encode(), now=NOW)


def test_validate_refuses_a_naive_struct_built_in_python() -> None:
    event = ContactEvent(
        event_id="e",
        occurred_at=datetime(2026, 11, 27, 10, 0),  # naive on purpose
        channel="chat",
        type="chat.started",
        customer=CustomerRef(visitor="v-1"),
    )
    with pytest.raises(InvalidContactEvent, match="no time zone"):
        validate(event, now=NOW)


@pytest.mark.parametrize("at", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_timestamp_at_the_edge_of_the_calendar_is_refused(at: str) -> None:
    with pytest.raises(InvalidContactEvent, match="occurred_at"):
        parse(event_dict(occurred_at=at))


# --------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**63 - 1, 2**64, -(2**63) - 1])  # at and past what orjson holds
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _either(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the valid value, sometimes any JSON at all."""
    return st.integers(0, 7).flatmap(lambda n: json_values if n == 7 else valid)


_offsets = st.builds(lambda m: timezone(timedelta(minutes=m)), st.integers(-18 * 60, 18 * 60))
_plausible_times = st.builds(
    lambda naive, zone: naive.replace(tzinfo=UTC).astimezone(zone).isoformat(),
    st.datetimes(min_value=datetime(2000, 1, 2), max_value=datetime(2026, 11, 27)),
    st.just(UTC) | _offsets,
)
# Timestamps of every shape except the calendar's two ends, where the known OverflowError
# lives (test_a_timestamp_at_the_edge_of_the_calendar_is_refused).
_wild_times = st.one_of(
    st.builds(
        lambda naive, zone: naive.replace(tzinfo=zone).isoformat(),
        st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1)),
        st.one_of(st.none(), st.just(UTC), _offsets, st.timezones()),
    ),
    st.text(max_size=30),
)
_timestamps = st.integers(0, 3).flatmap(lambda n: _wild_times if n == 3 else _plausible_times)

_customers = st.fixed_dictionaries(
    {"email": _either(st.sampled_from(["a@example.com", "A@B.CO", " x@y.org ", "bad@"]))},
    optional={
        "phone": _either(st.sampled_from(["+14155550123", "14155550123", "+1 415", "+"])),
        "visitor": _either(st.sampled_from(["v-1", "", "a b"])),
        "social": _either(
            st.fixed_dictionaries(
                {
                    "network": _either(st.sampled_from(["whatsapp", "Messenger", "x"])),
                    "id": _either(st.sampled_from(["1", "", "a b"])),
                }
            )
        ),
        "name": _either(st.text(max_size=10)),
    },
)


@st.composite
def near_valid_events(draw: st.DrawFn) -> Any:
    """Events whose every field is valid, arbitrary JSON or missing."""
    event_type = draw(st.sampled_from(sorted(EVENT_TYPES)))
    channel, payload = VALID[event_type]
    fields = {
        "schema": _either(st.just(SCHEMA)),
        "event_id": _either(st.text(min_size=1, max_size=10)),
        "occurred_at": _either(_timestamps),
        "channel": _either(st.sampled_from(sorted(CHANNELS)) | st.just(channel)),
        "type": _either(st.just(event_type) | st.sampled_from(sorted(EVENT_TYPES))),
        "customer": _either(_customers),
        "thread": _either(
            st.fixed_dictionaries(
                {},
                optional={"ref": _either(st.text()), "in_reply_to": _either(st.lists(st.text()))},
            )
        ),
        "payload": _either(
            st.dictionaries(
                st.sampled_from(sorted({k for _, p in VALID.values() for k in p})),
                json_values,
                max_size=4,
            ).map(lambda extra: {**payload, **extra})
        ),
    }
    event: Json = {}
    for name, strategy in fields.items():
        if draw(st.integers(0, 19)) < 19:
            event[name] = draw(strategy)
    return event


def _only_invalid_contact_event(record: bytes) -> None:
    try:
        event = parse_contact_event(record, now=NOW)
    except InvalidContactEvent as exc:
        reason = str(exc)
    else:
        # What passes the gate is normalised, can go through it again unchanged, and can be
        # stored (the event store writes its fields with orjson).
        assert parse_contact_event(encode_contact_event(event), now=NOW) == event
        orjson.dumps(msgspec.to_builtins(event))
        return
    assert reason
    # the dead-letter counter's label names the part that was wrong, from a fixed set
    assert reason_label(reason) != "other", reason


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_parsed_or_refused_with_a_reason(record: bytes) -> None:
    _only_invalid_contact_event(record)


@FUZZ
@given(json_values)
def test_arbitrary_json_is_parsed_or_refused_with_a_reason(value: Any) -> None:
    _only_invalid_contact_event(json.dumps(value).encode())


@FUZZ
@given(near_valid_events())
def test_nearly_valid_events_are_parsed_or_refused_with_a_reason(value: Any) -> None:
    _only_invalid_contact_event(json.dumps(value).encode())


# Valid events built from their parts.

_ascii_lower = "abcdefghijklmnopqrstuvwxyz0123456789"
_id_text = st.text(alphabet=_ascii_lower + "ABC._:@+-", min_size=1, max_size=30)
_emails = st.builds(
    lambda local, domain, tld: f"{local}@{domain}.{tld}",
    st.text(alphabet=_ascii_lower + "._+-", min_size=1, max_size=20),
    st.text(alphabet=_ascii_lower + "-", min_size=1, max_size=20),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=6),
)
_phones = st.builds(lambda n: f"+1415555{n:04d}", st.integers(0, 9999)) | st.builds(
    lambda n: f"+4477009{n:05d}", st.integers(0, 99999)
)
_socials = st.builds(
    Social, network=st.sampled_from(["whatsapp", "messenger", "instagram"]), id=_id_text
)
_seconds = st.none() | st.integers(0, 31622400) | st.floats(0, 31622400, allow_nan=False)
# Text a valid event may hold: anything but NUL (which PostgreSQL's text cannot hold)
_text = partial(
    st.text, alphabet=st.characters(exclude_characters="\x00", exclude_categories=["Cs"])
)


@st.composite
def valid_customers(draw: st.DrawFn) -> CustomerRef:
    fields = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "email": _emails,
                "phone": _phones,
                "visitor": _id_text,
                "social": _socials,
                "name": _text(min_size=1, max_size=40).map(str.strip).filter(bool),
            },
        ).filter(lambda f: bool(set(f) - {"name"}))
    )
    return CustomerRef(**cast(dict[str, Any], fields))


def _payload_for(event_type: str) -> st.SearchStrategy[Json]:
    call = {"call_sid": _id_text}
    by_type: dict[str, st.SearchStrategy[Json]] = {
        "message.received": st.fixed_dictionaries(
            {"text": _text(min_size=1)},
            optional={
                "subject": _text(),
                "html": _text(),
                "message_id": _id_text,
                "attachments": st.lists(
                    st.fixed_dictionaries(
                        {
                            "name": _text(),
                            "type": _text(),
                            "size": st.integers(0, 2**63 - 1),
                            "ref": _id_text,
                        }
                    ),
                    max_size=3,
                ),
            },
        ),
        "call.started": st.fixed_dictionaries({**call, "to": _phones}),
        "ivr.selected": st.fixed_dictionaries(
            {**call, "node": _text(), "choice": _text(), "path": st.lists(_text())}
        ),
        "call.queued": st.fixed_dictionaries({**call, "queue": _text()}),
        "call.answered": st.fixed_dictionaries({**call, "queue": _text(), "agent": _text()}),
        "call.ended": st.fixed_dictionaries(
            {**call, "talk_seconds": _seconds, "hold_seconds": _seconds, "wrap_seconds": _seconds}
        ),
        "call.abandoned": st.fixed_dictionaries(
            {**call, "queue": _text(), "queue_seconds": _seconds}
        ),
        "callback.requested": st.fixed_dictionaries({**call, "queue": _text(), "number": _phones}),
        "chat.started": st.just({}),
        "chat.ended": st.just({}),
        "csat.submitted": st.fixed_dictionaries(
            {"score": st.integers(1, 5)}, optional={"comment": _text()}
        ),
        "delivery.status": st.fixed_dictionaries(
            {"message_id": _id_text, "status": st.sampled_from(sorted(DELIVERY_STATUSES))},
            optional={"error": st.none() | _text()},
        ),
    }
    return by_type[event_type]


@st.composite
def valid_events(draw: st.DrawFn) -> ContactEvent:
    event_type = draw(st.sampled_from(get_args(EventType)))
    return ContactEvent(
        event_id=draw(_text(min_size=1, max_size=60).filter(str.strip)),
        occurred_at=draw(
            st.datetimes(
                min_value=datetime(2000, 1, 1),
                max_value=NOW.replace(tzinfo=None),
                timezones=st.just(UTC),
            )
        ),
        channel=draw(st.sampled_from(get_args(Channel))),
        type=event_type,
        customer=draw(valid_customers()),
        thread=draw(
            st.builds(ThreadRef, ref=st.none() | _text(), in_reply_to=st.lists(_text()).map(tuple))
        ),
        payload=draw(_payload_for(event_type)),
    )


@FUZZ
@given(valid_events())
def test_generated_valid_events_survive_encode_and_parse(event: ContactEvent) -> None:
    assert validate(event, now=NOW) == event  # already normalised: the gate changes nothing
    assert parse_contact_event(encode_contact_event(event), now=NOW) == event


@FUZZ
@given(valid_events(), st.timezones())
def test_parsing_is_a_fixed_point_whatever_the_offset(event: ContactEvent, zone: Any) -> None:
    shifted = msgspec.structs.replace(event, occurred_at=event.occurred_at.astimezone(zone))
    once = parse_contact_event(encode_contact_event(shifted), now=NOW)
    assert once.occurred_at == event.occurred_at
    assert once.occurred_at.utcoffset() == timedelta(0)
    assert parse_contact_event(encode_contact_event(once), now=NOW) == once


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("occurred_at 2031-01-01T00:00:00+00:00 is out of range", "occurred_at"),
        ("record of 1048577 bytes is over the 1 MiB limit", "too_large"),
        ("unknown schema 'x', expected 'contact-event/1'", "schema"),
        ("customer: unknown social network 'x'", "customer"),
        ("a message needs text, a subject or attachments", "payload"),
        ("something new", "other"),
    ],
)
def test_dead_letter_labels_are_a_fixed_few(reason: str, label: str) -> None:
    assert reason_label(reason) == label
    assert label in DEAD_LETTER_REASONS
