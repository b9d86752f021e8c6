"""Twilio messaging over real sockets: the webhook routes served by uvicorn, publishing to the
session broker, and `TwilioSender` against a local stand-in for Twilio's REST API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from twilio.request_validator import RequestValidator

from adapters.kafka import KafkaPublisher
from adapters.outbound import OutboundMessage, PermanentFailure, SendResult, TemporaryFailure
from adapters.twilio_messaging import EMPTY_TWIML, twilio_messaging_routes
from adapters.twilio_out import TwilioSender
from infra.broker import free_port
from infra.kafka import ensure_topics, make_consumer
from tests.conftest import TopicFactory
from tests.support import serving
from tests.unit.test_twilio_parse import load_form

TOKEN = "0123456789abcdef0123456789abcdef"
ACCOUNT = "AC0123456789abcdef0123456789abcdef"
NOW = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- servers


@dataclass
class Webhooks:
    url: str
    topic: str
    bootstrap: str
    client: httpx.AsyncClient

    async def post(
        self,
        path: str,
        form: Mapping[str, str],
        *,
        token: str | None = TOKEN,
        signature: str | None = None,
    ) -> httpx.Response:
        """Posts `form` signed exactly as Twilio signs it (or with the given signature)."""
        url = self.url + path
        headers = {}
        if signature is None and token is not None:
            signature = RequestValidator(token).compute_signature(url, dict(form))
        if signature is not None:
            headers["X-Twilio-Signature"] = signature
        return await self.client.post(url, data=dict(form), headers=headers)

    async def published(self, count: int) -> list[tuple[str, dict[str, Any]]]:
        """The first `count` records of the topic as (key, event); waits for them."""
        consumer = make_consumer(self.bootstrap, None, self.topic)
        await consumer.start()
        records: list[tuple[str, dict[str, Any]]] = []
        try:
            async with asyncio.timeout(30):
                while len(records) < count:
                    batches = await consumer.getmany(timeout_ms=200)
                    for batch in batches.values():
                        records.extend((r.key.decode(), orjson.loads(r.value)) for r in batch)
        finally:
            await consumer.stop()
        return records


@contextlib.asynccontextmanager
async def _webhooks(
    bootstrap: str,
    topic: str,
    *,
    auth_token: str | None = TOKEN,
    publisher_bootstrap: str | None = None,
) -> AsyncIterator[Webhooks]:
    await ensure_topics(bootstrap, {topic: 1})
    publisher = KafkaPublisher(
        publisher_bootstrap or bootstrap, idempotence=False, topic=topic, timeout=3.0
    )
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    routes = twilio_messaging_routes(
        publisher, auth_token=auth_token, public_url=public_url, clock=lambda: NOW
    )
    try:
        async with serving(routes, port) as url, httpx.AsyncClient(timeout=20) as client:
            yield Webhooks(url, topic, bootstrap, client)
    finally:
        await publisher.close()


@pytest.fixture
async def hooks(kafka_bootstrap: str, fresh_topic: TopicFactory) -> AsyncIterator[Webhooks]:
    async with _webhooks(kafka_bootstrap, fresh_topic("twilio")) as webhooks:
        yield webhooks


# --------------------------------------------------------------------------- inbound


async def test_sms_in_is_published_before_the_empty_twiml_answer(hooks: Webhooks) -> None:
    response = await hooks.post("/twilio/messaging", load_form("sms-incoming.form"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/xml")
    assert response.text == EMPTY_TWIML
    [(key, event)] = await hooks.published(1)
    assert key == "phone:+14155550123"
    assert event["event_id"] == "SM1f0e2d3c4b5a69788796a5b4c3d2e1f0"
    assert event["channel"] == "sms"
    assert event["type"] == "message.received"
    assert event["customer"] == {"phone": "+14155550123"}
    assert event["payload"]["text"] == "Hi, my order 4412 has not arrived yet"
    assert event["payload"]["via"] == "+15005550006"
    assert event["occurred_at"] == "2026-11-27T10:00:00Z"


async def test_a_nul_in_an_sms_is_dropped_and_the_message_kept(hooks: Webhooks) -> None:
    """(The gate refuses NUL, which PostgreSQL's text cannot hold; the adapter takes it out
    rather than lose the customer's message.)"""
    form = {**load_form("sms-incoming.form"), "Body": "my order\x00 4412"}
    response = await hooks.post("/twilio/messaging", form)
    assert response.status_code == 200, response.text
    [(_, event)] = await hooks.published(1)
    assert event["payload"]["text"] == "my order 4412"


async def test_whatsapp_in_with_media_has_the_same_identity_key(hooks: Webhooks) -> None:
    assert (
        await hooks.post("/twilio/messaging", load_form("sms-incoming.form"))
    ).status_code == 200
    whatsapp = load_form("whatsapp-incoming-media.form")
    assert (await hooks.post("/twilio/messaging", whatsapp)).status_code == 200
    (sms_key, _), (key, event) = await hooks.published(2)
    assert key == sms_key == "phone:+14155550123"
    assert event["channel"] == "whatsapp"
    assert event["customer"] == {"phone": "+14155550123", "name": "Alice Example"}
    assert [a["type"] for a in event["payload"]["attachments"]] == [
        "image/jpeg",
        "application/pdf",
    ]
    assert event["payload"]["attachments"][0]["ref"] == whatsapp["MediaUrl0"]
    assert event["payload"]["attachments"][0]["size"] is None


async def test_the_same_request_twice_is_the_same_event(hooks: Webhooks) -> None:
    form = load_form("sms-incoming.form")
    assert (await hooks.post("/twilio/messaging", form)).status_code == 200
    assert (await hooks.post("/twilio/messaging", form)).status_code == 200
    (key1, first), (key2, second) = await hooks.published(2)
    assert first["event_id"] == second["event_id"] == form["MessageSid"]
    assert key1 == key2


async def test_status_callbacks(hooks: Webhooks) -> None:
    path = "/twilio/messaging/status"
    for name in (
        "message-status-queued.form",  # acknowledged, not published
        "message-status-delivered.form",
        "message-status-undelivered.form",
        "whatsapp-status-read.form",
    ):
        response = await hooks.post(path, load_form(name))
        assert response.status_code == 200, (name, response.text)
    records = await hooks.published(3)
    assert [(e["event_id"], e["channel"], e["payload"]["status"]) for _, e in records] == [
        ("status:SMaf0e1d2c3b4a59687766a5b4c3d2e1f0:delivered", "sms", "delivered"),
        ("status:SMbf0e1d2c3b4a59687766a5b4c3d2e1f1:undelivered", "sms", "failed"),
        ("status:SMcf0e1d2c3b4a59687766a5b4c3d2e1f2:read", "whatsapp", "read"),
    ]
    assert all(e["type"] == "delivery.status" for _, e in records)
    assert {key for key, _ in records} == {"phone:+14155550123"}
    assert records[1][1]["payload"]["error"] == "30003: Unreachable destination handset"


async def _only_the_marker_follows(hooks: Webhooks) -> None:
    """Proves nothing was published before: the next record on the topic is the marker."""
    marker = load_form("sms-incoming.form") | {"MessageSid": "SM" + "e" * 32}
    assert (await hooks.post("/twilio/messaging", marker)).status_code == 200
    [(_, event)] = await hooks.published(1)
    assert event["event_id"] == marker["MessageSid"]


async def test_bad_or_missing_signature_is_403_and_nothing_is_published(hooks: Webhooks) -> None:
    form = load_form("sms-incoming.form")
    missing = await hooks.post("/twilio/messaging", form, token=None)
    assert missing.status_code == 403
    assert "missing" in missing.text
    wrong_token = await hooks.post("/twilio/messaging", form, token="not-the-token")
    assert wrong_token.status_code == 403
    # Signed for other parameters than the ones sent.
    signature = RequestValidator(TOKEN).compute_signature(
        hooks.url + "/twilio/messaging", form | {"Body": "something else"}
    )
    tampered = await hooks.post("/twilio/messaging", form, signature=signature)
    assert tampered.status_code == 403
    status = await hooks.post(
        "/twilio/messaging/status", load_form("message-status-delivered.form"), token="x"
    )
    assert status.status_code == 403
    await _only_the_marker_follows(hooks)


async def test_malformed_is_400_with_the_reason_and_nothing_is_published(
    hooks: Webhooks,
) -> None:
    form = load_form("sms-incoming.form")
    no_from = {k: v for k, v in form.items() if k != "From"}
    response = await hooks.post("/twilio/messaging", no_from)
    assert response.status_code == 400
    assert "From is missing" in response.text
    bad_phone = await hooks.post("/twilio/messaging", form | {"From": "+1"})
    assert bad_phone.status_code == 400
    no_sid = {k: v for k, v in form.items() if k != "MessageSid"}
    assert (await hooks.post("/twilio/messaging", no_sid)).status_code == 400
    status = load_form("message-status-delivered.form")
    no_to = {k: v for k, v in status.items() if k != "To"}
    assert (await hooks.post("/twilio/messaging/status", no_to)).status_code == 400
    await _only_the_marker_follows(hooks)


async def test_unconfigured_twilio_answers_503(
    kafka_bootstrap: str, fresh_topic: TopicFactory
) -> None:
    async with _webhooks(kafka_bootstrap, fresh_topic("twilio"), auth_token=None) as hooks:
        for path in ("/twilio/messaging", "/twilio/messaging/status"):
            response = await hooks.post(path, load_form("sms-incoming.form"))
            assert response.status_code == 503
            assert "TWILIO_AUTH_TOKEN" in response.text


async def test_kafka_down_is_503_and_the_retry_is_published_once(
    kafka_bootstrap: str, fresh_topic: TopicFactory
) -> None:
    topic = fresh_topic("twilio")
    form = load_form("sms-incoming.form")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    async with _webhooks(kafka_bootstrap, topic, publisher_bootstrap=dead) as down:
        response = await down.post("/twilio/messaging", form)
        assert response.status_code == 503
        assert "try again" in response.text
        status = await down.post(
            "/twilio/messaging/status", load_form("message-status-delivered.form")
        )
        assert status.status_code == 503
    # Twilio tries again once Kafka is back: one event, the first on the topic.
    async with _webhooks(kafka_bootstrap, topic) as up:
        assert (await up.post("/twilio/messaging", form)).status_code == 200
        [(_, event)] = await up.published(1)
        assert event["event_id"] == form["MessageSid"]


async def test_the_signature_covers_the_query_string(hooks: Webhooks) -> None:
    form = load_form("sms-incoming.form")
    signed = await hooks.post("/twilio/messaging?tenant=a", form)
    assert signed.status_code == 200
    signature = RequestValidator(TOKEN).compute_signature(hooks.url + "/twilio/messaging", form)
    moved = await hooks.post("/twilio/messaging?tenant=b", form, signature=signature)
    assert moved.status_code == 403


# --------------------------------------------------------------------------- outbound


@dataclass
class TwilioStandIn:
    """Twilio's Messages API on a loopback port: records requests, answers what it is told."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    answers: list[tuple[int, dict[str, Any] | str]] = field(default_factory=list)

    async def create(self, request: Request) -> Response:
        form = await request.form()
        self.requests.append(
            {
                "account": request.path_params["sid"],
                "authorization": request.headers.get("authorization"),
                "content_type": request.headers.get("content-type"),
                "form": {k: v for k, v in form.multi_items() if isinstance(v, str)},
            }
        )
        status, body = self.answers.pop(0) if self.answers else (201, {})
        if isinstance(body, str):
            return PlainTextResponse(body, status_code=status)
        if status == 201:
            body = {"sid": f"SM{len(self.requests):032x}", "status": "queued", **body}
        return JSONResponse(body, status_code=status)


@pytest.fixture
async def twilio_api() -> AsyncIterator[TwilioStandIn]:
    stand_in = TwilioStandIn()
    routes: list[BaseRoute] = [
        Route("/2010-04-01/Accounts/{sid}/Messages.json", stand_in.create, methods=["POST"])
    ]
    async with serving(routes, free_port()) as url:
        stand_in.url = url
        yield stand_in


@pytest.fixture
async def sender(twilio_api: TwilioStandIn) -> AsyncIterator[TwilioSender]:
    sender = TwilioSender(
        ACCOUNT,
        TOKEN,
        public_url="https://inbox.example.com/",
        api_base=twilio_api.url,
        sms_from="+15005550006",
        whatsapp_from="+14155238886",
        clock=lambda: NOW,
    )
    try:
        yield sender
    finally:
        await sender.close()


def reply(channel: str = "sms", **overrides: Any) -> OutboundMessage:
    values: dict[str, Any] = {
        "message_id": "m-1",
        "conversation_id": "c-1",
        "channel": channel,
        "text": "Your order ships today",
        "to": "+14155550123",
    }
    values.update(overrides)
    return OutboundMessage(**values)


async def test_sms_out_is_one_messages_create(
    sender: TwilioSender, twilio_api: TwilioStandIn
) -> None:
    result = await sender.send(reply())
    assert result == SendResult(provider_id="SM" + f"{1:032x}")
    [request] = twilio_api.requests
    assert request["account"] == ACCOUNT
    assert request["content_type"].startswith("application/x-www-form-urlencoded")
    expected_auth = "Basic " + base64.b64encode(f"{ACCOUNT}:{TOKEN}".encode()).decode()
    assert request["authorization"] == expected_auth
    assert request["form"] == {
        "To": "+14155550123",
        "From": "+15005550006",
        "Body": "Your order ships today",
        "StatusCallback": "https://inbox.example.com/twilio/messaging/status",
    }


async def test_the_reply_goes_out_from_the_number_the_customer_wrote_to(
    sender: TwilioSender, twilio_api: TwilioStandIn
) -> None:
    await sender.send(reply(via="+15005550009"))
    at = (NOW - timedelta(hours=2)).isoformat()
    await sender.send(reply("whatsapp", via="whatsapp:+14155238899", last_inbound_at=at))
    assert [(r["form"]["From"], r["form"]["To"]) for r in twilio_api.requests] == [
        ("+15005550009", "+14155550123"),
        ("whatsapp:+14155238899", "whatsapp:+14155550123"),
    ]


async def test_whatsapp_inside_the_24_hour_window(
    sender: TwilioSender, twilio_api: TwilioStandIn
) -> None:
    at = (NOW - timedelta(hours=23, minutes=59)).isoformat()
    result = await sender.send(reply("whatsapp", last_inbound_at=at))
    assert result.provider_id
    [request] = twilio_api.requests
    assert request["form"]["To"] == "whatsapp:+14155550123"
    assert request["form"]["From"] == "whatsapp:+14155238886"


@pytest.mark.parametrize(
    "last_inbound_at",
    [
        None,
        "",
        "yesterday",
        "2026-11-26T09:59:00",
        (NOW - timedelta(hours=24, seconds=1)).isoformat(),
    ],
)
async def test_whatsapp_outside_the_window_needs_a_template(
    sender: TwilioSender, twilio_api: TwilioStandIn, last_inbound_at: str | None
) -> None:
    with pytest.raises(PermanentFailure, match="template"):
        await sender.send(reply("whatsapp", last_inbound_at=last_inbound_at))
    assert twilio_api.requests == []


async def test_twilio_4xx_is_permanent_with_twilios_message(
    sender: TwilioSender, twilio_api: TwilioStandIn
) -> None:
    twilio_api.answers.append(
        (
            400,
            {
                "code": 21211,
                "message": "The 'To' number +14155550123 is not a valid phone number.",
                "more_info": "https://www.twilio.com/docs/errors/21211",
                "status": 400,
            },
        )
    )
    with pytest.raises(PermanentFailure, match=r"Twilio 21211: The 'To' number .* is not a valid"):
        await sender.send(reply())


@pytest.mark.parametrize(
    "answer",
    [
        (500, {"code": 20500, "message": "Internal Server Error", "status": 500}),
        (503, "<html>Service Unavailable</html>"),
        (429, {"code": 20429, "message": "Too Many Requests", "status": 429}),
    ],
)
async def test_twilio_5xx_and_429_are_temporary(
    sender: TwilioSender, twilio_api: TwilioStandIn, answer: tuple[int, dict[str, Any] | str]
) -> None:
    twilio_api.answers.append(answer)
    with pytest.raises(TemporaryFailure):
        await sender.send(reply())
    # The delivery process retries; the next attempt goes through.
    assert (await sender.send(reply(attempt=2))).provider_id
    assert len(twilio_api.requests) == 2


async def test_twilio_unreachable_is_temporary() -> None:
    sender = TwilioSender(
        ACCOUNT,
        TOKEN,
        public_url="https://inbox.example.com",
        api_base=f"http://127.0.0.1:{free_port()}",
        sms_from="+15005550006",
        clock=lambda: NOW,
    )
    try:
        with pytest.raises(TemporaryFailure, match="unreachable"):
            await sender.send(reply())
    finally:
        await sender.close()


async def test_refusals_before_calling_twilio(
    sender: TwilioSender, twilio_api: TwilioStandIn
) -> None:
    with pytest.raises(PermanentFailure, match="email"):
        await sender.send(reply("email"))
    with pytest.raises(PermanentFailure, match=r"not a phone number|not a possible"):
        await sender.send(reply(to="alice@example.com"))
    no_numbers = TwilioSender(
        ACCOUNT, TOKEN, public_url="https://inbox.example.com", api_base=twilio_api.url
    )
    with pytest.raises(PermanentFailure, match="no Twilio number"):
        await no_numbers.send(reply())
    await no_numbers.close()
    assert twilio_api.requests == []
