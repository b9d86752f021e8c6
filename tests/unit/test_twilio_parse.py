"""Twilio messaging: the webhook parsers and the signature check, without I/O."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.datastructures import FormData
from twilio.request_validator import RequestValidator

from adapters.twilio_messaging import (
    MalformedTwilioRequest,
    parse_inbound_message,
    parse_status_callback,
)
from adapters.twilio_signature import TwilioWebhookAuth, TwilioWebhookRefused, parse_form
from inbox.contact import ContactEvent

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "twilio"
NOW = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
TOKEN = "12345678901234567890123456789012"


def load_form(name: str) -> dict[str, str]:
    """A sample webhook body: one `key=value` a line, values as Twilio sends them (decoded)."""
    fields: dict[str, str] = {}
    for line in (SAMPLES / name).read_text().splitlines():
        if line.strip():
            key, _, value = line.partition("=")
            fields[key] = value
    return fields


# --------------------------------------------------------------------------- inbound


def test_sms_becomes_a_message_from_the_phone() -> None:
    event = parse_inbound_message(load_form("sms-incoming.form"), now=NOW)
    assert event.event_id == "SM1f0e2d3c4b5a69788796a5b4c3d2e1f0"
    assert event.channel == "sms"
    assert event.type == "message.received"
    assert event.occurred_at == NOW
    assert event.customer.phone == "+14155550123"
    assert event.customer.name is None
    assert event.key == "phone:+14155550123"
    assert event.payload == {
        "text": "Hi, my order 4412 has not arrived yet",
        "attachments": [],
        "message_id": "SM1f0e2d3c4b5a69788796a5b4c3d2e1f0",
        "via": "+15005550006",
    }


def test_whatsapp_with_media_is_the_same_customer_as_sms() -> None:
    event = parse_inbound_message(load_form("whatsapp-incoming-media.form"), now=NOW)
    sms = parse_inbound_message(load_form("sms-incoming.form"), now=NOW)
    assert event.channel == "whatsapp"
    assert event.key == sms.key == "phone:+14155550123"
    assert event.customer.name == "Alice Example"
    assert event.payload["via"] == "whatsapp:+14155238886"
    assert event.payload["text"] == "Here is the damaged box"
    base = (
        "https://api.twilio.com/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef"
        "/Messages/MM2a3b4c5d6e7f80918273645a5b6c7d8e/Media/"
    )
    assert event.payload["attachments"] == [
        {
            "name": "ME00aa11bb22cc33dd44ee55ff66778899.jpg",
            "type": "image/jpeg",
            "size": None,
            "ref": base + "ME00aa11bb22cc33dd44ee55ff66778899",
        },
        {
            "name": "ME99887766ff55ee44dd33cc22bb11aa00.pdf",
            "type": "application/pdf",
            "size": None,
            "ref": base + "ME99887766ff55ee44dd33cc22bb11aa00",
        },
    ]


def test_media_without_text_is_a_message() -> None:
    form = load_form("whatsapp-incoming-media.form") | {"Body": ""}
    event = parse_inbound_message(form, now=NOW)
    assert event.payload["text"] == ""
    assert len(event.payload["attachments"]) == 2


def test_a_quoted_whatsapp_message_is_threaded() -> None:
    quoted = "SMaf0e1d2c3b4a59687766a5b4c3d2e1f0"
    form = load_form("whatsapp-incoming-media.form") | {"OriginalRepliedMessageSid": quoted}
    assert parse_inbound_message(form, now=NOW).thread.in_reply_to == (quoted,)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"From": None}, "From is missing"),
        ({"From": "  "}, "From is missing"),
        ({"MessageSid": None}, "MessageSid is missing"),
        ({"MessageSid": "not-a-sid"}, "not a Twilio message SID"),
        ({"From": "+1"}, "From:"),
        ({"From": "whatsapp:hello"}, "From:"),
        ({"From": "messenger:123456"}, "not an SMS or WhatsApp address"),
        ({"NumMedia": "x"}, "NumMedia"),
        ({"NumMedia": "11"}, "NumMedia"),
        ({"NumMedia": "1"}, "MediaUrl0 is missing"),
        ({"NumMedia": "1", "MediaUrl0": "file:///etc/passwd"}, "not an http(s) URL"),
        ({"Body": "", "NumMedia": "0"}, "needs text"),
        ({"Body": None}, "needs text"),
    ],
)
def test_malformed_messages_are_refused_with_the_reason(
    change: dict[str, str | None], reason: str
) -> None:
    form = load_form("sms-incoming.form")
    for key, value in change.items():
        if value is None:
            form.pop(key, None)
        else:
            form[key] = value
    with pytest.raises(
        MalformedTwilioRequest, match=reason.replace("(", r"\(").replace(")", r"\)")
    ):
        parse_inbound_message(form, now=NOW)


# --------------------------------------------------------------------------- status


def test_delivered_status_is_a_delivery_event_for_the_recipient() -> None:
    event = parse_status_callback(load_form("message-status-delivered.form"), now=NOW)
    assert event is not None
    assert event.type == "delivery.status"
    assert event.channel == "sms"
    assert event.event_id == "status:SMaf0e1d2c3b4a59687766a5b4c3d2e1f0:delivered"
    assert event.key == "phone:+14155550123"
    assert event.payload == {
        "message_id": "SMaf0e1d2c3b4a59687766a5b4c3d2e1f0",
        "status": "delivered",
        "error": None,
    }


def test_undelivered_is_failed_with_twilios_error() -> None:
    event = parse_status_callback(load_form("message-status-undelivered.form"), now=NOW)
    assert event is not None
    assert event.event_id == "status:SMbf0e1d2c3b4a59687766a5b4c3d2e1f1:undelivered"
    assert event.payload["status"] == "failed"
    assert event.payload["error"] == "30003: Unreachable destination handset"


def test_whatsapp_read_receipt() -> None:
    event = parse_status_callback(load_form("whatsapp-status-read.form"), now=NOW)
    assert event is not None
    assert event.channel == "whatsapp"
    assert event.payload["status"] == "read"
    assert event.key == "phone:+14155550123"


@pytest.mark.parametrize(
    "status", ["queued", "accepted", "sending", "scheduled", "canceled", "receiving", "new-one"]
)
def test_intermediate_statuses_are_not_published(status: str) -> None:
    form = load_form("message-status-queued.form") | {"MessageStatus": status}
    assert parse_status_callback(form, now=NOW) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"MessageStatus": None, "SmsStatus": None}, "MessageStatus is missing"),
        ({"MessageSid": None}, "MessageSid is missing"),
        ({"To": None}, "To is missing"),
        ({"To": "12"}, "To:"),
    ],
)
def test_malformed_status_callbacks_are_refused(change: dict[str, str | None], reason: str) -> None:
    form = load_form("message-status-delivered.form")
    for key, value in change.items():
        if value is None:
            form.pop(key, None)
        else:
            form[key] = value
    with pytest.raises(MalformedTwilioRequest, match=reason):
        parse_status_callback(form, now=NOW)


# --------------------------------------------------------------------------- signature


def test_signature_checks_url_and_every_parameter() -> None:
    auth = TwilioWebhookAuth(TOKEN, "https://inbox.example.com")
    params = load_form("sms-incoming.form")
    url = "https://inbox.example.com/twilio/messaging?x=1"
    signature = RequestValidator(TOKEN).compute_signature(url, params)
    assert auth.is_valid(url, FormData(list(params.items())), signature)
    # Twilio has signed with the default port spelled out; both are accepted.
    with_port = RequestValidator(TOKEN).compute_signature(
        "https://inbox.example.com:443/twilio/messaging?x=1", params
    )
    assert auth.is_valid(url, FormData(list(params.items())), with_port)
    tampered = params | {"Body": "send me a refund"}
    assert not auth.is_valid(url, FormData(list(tampered.items())), signature)
    assert not auth.is_valid(url + "&y=2", FormData(list(params.items())), signature)
    other = TwilioWebhookAuth("another-token", "https://inbox.example.com")
    assert not other.is_valid(url, FormData(list(params.items())), signature)
    assert not TwilioWebhookAuth(None, "https://x").is_valid(url, FormData(), signature)


def test_form_parser_refuses_what_is_not_a_form() -> None:
    assert parse_form(b"A=1&B=%2B1415&A=2").getlist("A") == ["1", "2"]
    assert parse_form(b"B=%2B1415")["B"] == "+1415"
    with pytest.raises(TwilioWebhookRefused) as refused:
        parse_form(b"\xff\xfe")
    assert refused.value.status_code == 400
    with pytest.raises(TwilioWebhookRefused):
        parse_form(b"A=%ff")


# --------------------------------------------------------------------------- fuzz

_FIELDS = [
    "From",
    "To",
    "MessageSid",
    "Body",
    "NumMedia",
    "MediaUrl0",
    "MediaContentType0",
    "ProfileName",
    "MessageStatus",
    "ErrorCode",
    "ErrorMessage",
    "OriginalRepliedMessageSid",
]
_values = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        [
            "",
            "+14155550123",
            "whatsapp:+14155550123",
            "whatsapp:",
            "messenger:1",
            "SMaf0e1d2c3b4a59687766a5b4c3d2e1f0",
            "1",
            "10",
            "-1",
            "https://api.twilio.com/x/ME1",
            "delivered",
            "undelivered",
            "queued",
            "\x00",
        ]
    ),
)
_forms = st.dictionaries(st.one_of(st.sampled_from(_FIELDS), st.text(max_size=12)), _values)


Parser = Callable[..., ContactEvent | None]


def _outcome(parse: Parser, form: dict[str, str]) -> None:
    reason = ""
    result: ContactEvent | None = None
    try:
        result = parse(form, now=NOW)
    except MalformedTwilioRequest as exc:
        reason = str(exc)
    if reason:
        return
    assert result is None or isinstance(result, ContactEvent)
    if result is not None:
        assert result.key.startswith("phone:+")
        assert form["MessageSid"].strip() in result.event_id


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(form=_forms)
def test_inbound_parser_gives_an_event_or_a_refusal(form: dict[str, str]) -> None:
    _outcome(parse_inbound_message, form)


@settings(max_examples=200, deadline=None)
@given(
    overrides=_forms, sample=st.sampled_from(["sms-incoming.form", "whatsapp-incoming-media.form"])
)
def test_inbound_parser_on_mutated_samples(overrides: dict[str, str], sample: str) -> None:
    _outcome(parse_inbound_message, load_form(sample) | overrides)


@settings(max_examples=200, deadline=None)
@given(overrides=_forms)
def test_status_parser_gives_an_event_none_or_a_refusal(overrides: dict[str, str]) -> None:
    _outcome(parse_status_callback, load_form("message-status-undelivered.form") | overrides)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=200))
def test_form_parser_gives_a_form_or_a_400(body: bytes) -> None:
    status = 200
    try:
        parse_form(body)
    except TwilioWebhookRefused as refused:
        status = refused.status_code
    assert status in (200, 400)
