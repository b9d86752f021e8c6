"""The Meta webhook parsers (adapters/meta.py): one payload item → one contact event, or the
clear refusal MetaPayloadError; fuzzed with hypothesis on arbitrary JSON and mutated samples."""

from __future__ import annotations

import copy
import hashlib
import hmac
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.meta import (
    MetaPayloadError,
    parse_messaging,
    parse_webhook,
    parse_whatsapp_message,
    parse_whatsapp_status,
    signature_ok,
)
from inbox.contact import ContactEvent, encode_contact_event, parse_contact_event

SAMPLES = Path(__file__).parent.parent / "samples" / "meta"
# The samples are dated 2026-11-28 10:00 UTC; the gate refuses events more than a day ahead.
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def sample(name: str) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((SAMPLES / name).read_bytes())
    return data


def events_of(name: str) -> list[ContactEvent]:
    return parse_webhook(sample(name), now=NOW)


def wa_value(name: str) -> dict[str, Any]:
    value: dict[str, Any] = sample(name)["entry"][0]["changes"][0]["value"]
    return value


# --------------------------------------------------------------------------- WhatsApp


def test_whatsapp_text() -> None:
    (event,) = events_of("whatsapp-text.json")
    wamid = "wamid.HBgLMTQxNTU1NTAxMjMVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA="
    assert event.event_id == wamid
    assert event.channel == "whatsapp"
    assert event.type == "message.received"
    assert event.customer.phone == "+14155550123"
    assert event.customer.name == "Sheena Nelson"
    assert event.key == "phone:+14155550123"
    assert event.occurred_at == datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    assert event.payload == {
        "message_id": wamid,
        "via": "106540352242922",
        "kind": "text",
        "text": "Does it come in another color?",
    }


def test_whatsapp_media_become_attachments_with_the_caption_as_text() -> None:
    image, audio, document, sticker, video = events_of("whatsapp-media.json")
    assert image.payload["text"] == "The stain on the sleeve"
    assert image.payload["attachments"] == [
        {
            "name": "image-1003383421387256",
            "type": "image/jpeg",
            "size": None,
            "ref": "meta-media:1003383421387256",
        }
    ]
    assert audio.payload["text"] == ""
    assert audio.payload["attachments"][0]["type"] == "audio/ogg; codecs=opus"
    assert document.payload["text"] == "My receipt"
    assert document.payload["attachments"][0]["name"] == "receipt-4411.pdf"
    assert document.payload["attachments"][0]["ref"] == "meta-media:1003383421387258"
    assert sticker.payload["attachments"][0]["type"] == "image/webp"
    assert video.payload["kind"] == "video"
    assert len({e.event_id for e in (image, audio, document, sticker, video)}) == 5


def test_whatsapp_location_and_shared_contacts() -> None:
    location, contacts = events_of("whatsapp-location-contacts.json")
    assert location.payload["location"] == {
        "latitude": 37.7793,
        "longitude": -122.4193,
        "name": "Civic Center",
        "address": "1 Dr Carlton B Goodlett Pl, San Francisco, CA",
    }
    assert "Civic Center" in location.payload["text"]
    assert contacts.payload["contacts"] == [
        {
            "name": "Barbara Johnson",
            "phones": ["+1 (415) 555-0199"],
            "emails": ["bjohnson@example.com"],
        }
    ]
    assert contacts.payload["text"] == "Shared contact: Barbara Johnson +1 (415) 555-0199"


def test_whatsapp_button_list_template_replies_and_reactions() -> None:
    button, listed, template, reaction = events_of("whatsapp-interactive.json")
    ours = "wamid.HBgLMTQxNTU1NTAxMjMVAgARGBI0RkI2QjA5ODc2NTQzMjEwAA=="
    assert button.payload["text"] == "Where is my order?"
    assert button.payload["reply"] == {
        "kind": "button_reply",
        "id": "order-status",
        "title": "Where is my order?",
    }
    assert button.thread.in_reply_to == (ours,)
    assert listed.payload["reply"]["description"] == "Chest 96-101 cm"
    assert listed.payload["text"] == "Medium"
    assert template.payload["reply"] == {
        "kind": "button",
        "id": "STOP_PROMOTIONS",
        "title": "Stop promotions",
    }
    assert reaction.payload["text"] == "\U0001f44d"
    assert reaction.payload["reaction"] == {"message_id": ours, "emoji": "\U0001f44d"}
    assert reaction.thread.in_reply_to == (ours,)


def test_whatsapp_removed_reaction_and_system_messages_are_not_contacts() -> None:
    value = wa_value("whatsapp-interactive.json")
    removed = copy.deepcopy(value["messages"][3])
    del removed["reaction"]["emoji"]
    assert parse_whatsapp_message(removed, value, now=NOW) is None
    system = {"from": "14155550123", "id": "wamid.X", "timestamp": "1795860000", "type": "system"}
    assert parse_whatsapp_message(system, value, now=NOW) is None
    future = dict(system, type="hologram")
    assert parse_whatsapp_message(future, value, now=NOW) is None


def test_whatsapp_unsupported_message_still_tells_the_agent() -> None:
    value = wa_value("whatsapp-text.json")
    message = {
        "from": "14155550123",
        "id": "wamid.UNSUPPORTED",
        "timestamp": "1795860000",
        "type": "unsupported",
        "errors": [{"code": 131051, "title": "Message type unknown"}],
    }
    event = parse_whatsapp_message(message, value, now=NOW)
    assert event is not None
    assert event.payload["unsupported"] is True
    assert event.payload["text"]


def test_whatsapp_status_delivered_and_failed() -> None:
    (delivered,) = events_of("whatsapp-status.json")
    wamid = "wamid.HBgLMTQxNTU1NTAxMjMVAgARGBI0RkI2QjA5ODc2NTQzMjEwAA=="
    assert delivered.type == "delivery.status"
    assert delivered.event_id == f"status:{wamid}:delivered"
    assert delivered.customer.phone == "+14155550123"
    assert delivered.payload == {
        "message_id": wamid,
        "status": "delivered",
        "error": None,
        "via": "106540352242922",
    }
    (failed,) = events_of("whatsapp-status-failed.json")
    assert failed.payload["status"] == "failed"
    assert failed.payload["error"].startswith("131047 Re-engagement message: Message failed")


def test_whatsapp_status_outside_the_contract_is_skipped() -> None:
    value = wa_value("whatsapp-status.json")
    status = dict(value["statuses"][0], status="deleted")
    assert parse_whatsapp_status(status, value, now=NOW) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: m.pop("id"), "message.id"),
        (lambda m: m.update(timestamp="yesterday"), "timestamp"),
        (lambda m: m.update(timestamp="99999999999"), "occurred_at"),
        (lambda m: m.update({"from": "not-a-number"}), "phone"),
        (lambda m: m.update(text={"body": ""}), "body"),
        (lambda m: m.update(text="plain"), "message.text must be an object"),
    ],
)
def test_whatsapp_malformed_message_is_refused(change: Any, reason: str) -> None:
    value = wa_value("whatsapp-text.json")
    message = copy.deepcopy(value["messages"][0])
    change(message)
    with pytest.raises(MetaPayloadError, match=reason):
        parse_whatsapp_message(message, value, now=NOW)


def test_whatsapp_media_without_an_id_and_bad_locations_are_refused() -> None:
    value = wa_value("whatsapp-media.json")
    image = copy.deepcopy(value["messages"][0])
    del image["image"]["id"]
    with pytest.raises(MetaPayloadError, match=r"image\.id"):
        parse_whatsapp_message(image, value, now=NOW)
    value = wa_value("whatsapp-location-contacts.json")
    location = copy.deepcopy(value["messages"][0])
    location["location"]["latitude"] = 123.0
    with pytest.raises(MetaPayloadError, match="latitude is out of range"):
        parse_whatsapp_message(location, value, now=NOW)


# --------------------------------------------------------------------------- Messenger, Instagram


def test_messenger_text() -> None:
    (event,) = events_of("messenger-text.json")
    assert event.event_id == "m_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
    assert event.channel == "messenger"
    assert event.key == "messenger:6543210987654321"
    assert event.customer.social is not None
    assert event.customer.social.network == "messenger"
    # Messenger timestamps are milliseconds
    assert event.occurred_at == datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    assert event.payload["text"] == "Hello, is the shop open on Sunday?"
    assert event.payload["via"] == "112233445566778"


def test_messenger_postback_quick_reply_and_attachment() -> None:
    postback, quick, picture = events_of("messenger-postback-quick-reply.json")
    assert postback.event_id == "m_PoStBaCk0123456789abcdefghijklmnop"
    assert postback.payload["text"] == "Talk to a person"
    assert postback.payload["reply"] == {
        "kind": "postback",
        "id": "HUMAN_AGENT",
        "title": "Talk to a person",
    }
    assert quick.payload["reply"] == {
        "kind": "quick_reply",
        "id": "TOPIC_RETURNS",
        "title": "Returns",
    }
    assert picture.payload["text"] == ""
    assert picture.payload["attachments"] == [
        {
            "name": "image",
            "type": "image",
            "size": None,
            "ref": "https://scontent.xx.fbcdn.net/v/t1.15752-9/photo.jpg?_nc_cat=1&oh=abc",
        }
    ]


def test_postback_without_mid_gets_a_stable_id() -> None:
    item = copy.deepcopy(sample("messenger-postback-quick-reply.json")["entry"][0]["messaging"][0])
    del item["postback"]["mid"]
    first = parse_messaging(item, network="messenger", now=NOW)
    again = parse_messaging(copy.deepcopy(item), network="messenger", now=NOW)
    assert first is not None
    assert again is not None
    assert first.event_id == again.event_id == "postback:6543210987654321:1795860040000"


def test_echoes_deliveries_and_reads_are_not_published() -> None:
    assert events_of("messenger-echo.json") == []


def test_instagram_text_and_attachment_reply() -> None:
    (text,) = events_of("instagram-text.json")
    assert text.channel == "instagram"
    assert text.key == "instagram:987654321098765"
    assert text.payload["via"] == "17841400000000000"
    (attachment,) = events_of("instagram-attachment.json")
    assert attachment.payload["text"] == "This one, in blue"
    assert attachment.payload["attachments"][0]["ref"].startswith("https://lookaside.fbsbx.com/")
    assert attachment.thread.in_reply_to == (text.event_id,)


def test_messenger_location_attachment() -> None:
    item = copy.deepcopy(sample("messenger-text.json")["entry"][0]["messaging"][0])
    item["message"] = {
        "mid": "m_location",
        "attachments": [
            {"type": "location", "payload": {"coordinates": {"lat": 52.52, "long": 13.405}}}
        ],
    }
    event = parse_messaging(item, network="messenger", now=NOW)
    assert event is not None
    assert event.payload["location"] == {"latitude": 52.52, "longitude": 13.405}
    assert event.payload["text"] == "Location: (52.52, 13.405)"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda i: i["message"].pop("mid"), "message.mid"),
        (lambda i: i["message"].pop("text"), "no text and no attachments"),
        (lambda i: i.pop("sender"), "messaging.sender"),
        (lambda i: i.update(timestamp="soon"), "timestamp"),
        (lambda i: i["sender"].update(id="has spaces"), "social id"),
    ],
)
def test_messenger_malformed_item_is_refused(change: Any, reason: str) -> None:
    item = copy.deepcopy(sample("messenger-text.json")["entry"][0]["messaging"][0])
    change(item)
    with pytest.raises(MetaPayloadError, match=reason):
        parse_messaging(item, network="messenger", now=NOW)


# --------------------------------------------------------------------------- envelope


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([], "must be an object"),
        ({"entry": []}, "notification.object"),
        ({"object": "page"}, "entry"),
        ({"object": "page", "entry": [{"messaging": "x"}]}, "messaging must be a list"),
    ],
)
def test_malformed_envelopes_are_refused(body: Any, reason: str) -> None:
    with pytest.raises(MetaPayloadError, match=reason):
        parse_webhook(body, now=NOW)


def test_one_bad_item_refuses_the_whole_notification() -> None:
    body = sample("whatsapp-media.json")
    del body["entry"][0]["changes"][0]["value"]["messages"][2]["id"]
    with pytest.raises(MetaPayloadError):
        parse_webhook(body, now=NOW)


def test_other_objects_and_fields_are_acknowledged_without_events() -> None:
    assert parse_webhook({"object": "user", "entry": [{"changes": []}]}, now=NOW) == []
    body = sample("whatsapp-text.json")
    body["entry"][0]["changes"][0]["field"] = "account_update"
    assert parse_webhook(body, now=NOW) == []


def test_signature() -> None:
    body = b'{"object":"page"}'
    good = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert signature_ok("s3cret", body, good)
    assert signature_ok("s3cret", body, good.upper().replace("SHA256=", "sha256="))
    assert not signature_ok("s3cret", body + b" ", good)
    assert not signature_ok("other", body, good)
    assert not signature_ok("s3cret", body, None)
    assert not signature_ok("s3cret", body, good[7:])
    assert not signature_ok("s3cret", body, "sha256=\u00e9\u00e9")


# --------------------------------------------------------------------------- fuzzing

SAMPLE_NAMES = sorted(p.name for p in SAMPLES.glob("*.json"))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["text", "image", "page", "instagram", "whatsapp_business_account"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["object", "entry", "changes", "value", "messages", "statuses", "messaging", "id"]
            )
            | st.text(max_size=8),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)


def _check(body: Any) -> None:
    try:
        events = parse_webhook(body, now=NOW)
    except MetaPayloadError as exc:
        reason = str(exc)
        assert reason, "a refusal says why"
        return
    for event in events:
        # every event passes the same gate the ingest worker applies
        assert parse_contact_event(encode_contact_event(event), now=NOW) == event


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_arbitrary_json_gives_events_or_a_refusal(body: Any) -> None:
    _check(body)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(node, dict):
        for key, child in node.items():
            found += _paths(child, (*path, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += _paths(child, (*path, index))
    return found


@st.composite
def mutated_samples(draw: st.DrawFn) -> Any:
    body: Any = copy.deepcopy(sample(draw(st.sampled_from(SAMPLE_NAMES))))
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(body)
        path = draw(st.sampled_from(paths))
        if not path:
            body = draw(json_values)
            continue
        parent = body
        for step in path[:-1]:
            parent = parent[step]
        if draw(st.booleans()):
            parent[path[-1]] = draw(json_values)
        elif isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    return body


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_samples())
def test_mutated_samples_give_events_or_a_refusal(body: Any) -> None:
    _check(body)
