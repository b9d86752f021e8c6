"""Meta webhooks over real sockets (uvicorn serving meta_routes) into the real broker, and the
Graph API sender against a local stand-in for graph.facebook.com that records what it gets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from adapters.kafka import KafkaPublisher
from adapters.meta import meta_routes
from adapters.meta_out import MetaSender
from adapters.outbound import OutboundMessage, PermanentFailure, TemporaryFailure
from infra.broker import free_port
from infra.kafka import ensure_topics, make_consumer
from tests.conftest import TopicFactory
from tests.support import serving

SAMPLES = Path(__file__).parent.parent / "samples" / "meta"
SECRET = "3f1c9a0b7d5e4c2a8b6f0e1d2c3b4a59"
VERIFY = "verify-me-please"
# The samples are dated 2026-11-28 10:00 UTC.
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def clock() -> datetime:
    return NOW


def raw(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def sign(body: bytes, secret: str = SECRET) -> str:
    """Exactly as Meta signs: HMAC-SHA256 of the raw body bytes with the app secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass
class Webhooks:
    client: httpx.AsyncClient
    topic: str
    bootstrap: str

    async def post(
        self, body: bytes, signature: str | None = "sign", **headers: str
    ) -> httpx.Response:
        if signature == "sign":
            signature = sign(body)
        if signature is not None:
            headers["X-Hub-Signature-256"] = signature
        headers.setdefault("Content-Type", "application/json")
        return await self.client.post("/webhooks/meta", content=body, headers=headers)

    async def consume(self, count: int, *, settle: float = 0.0) -> list[dict[str, Any]]:
        """The records of the topic once there are `count`; with `settle`, also waits that
        long for any record beyond `count` (so tests can show nothing more arrived)."""
        consumer = make_consumer(self.bootstrap, None, self.topic)
        await consumer.start()
        records: list[Any] = []
        try:

            async def until(n: int) -> None:
                while len(records) < n:
                    batches = await consumer.getmany(timeout_ms=100)
                    for batch in batches.values():
                        records.extend(batch)

            await asyncio.wait_for(until(count), 20)
            if settle:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(until(count + 1), settle)
        finally:
            await consumer.stop()
        return [{"key": r.key.decode(), **orjson.loads(r.value)} for r in records]


@contextlib.asynccontextmanager
async def webhook_server(
    bootstrap: str,
    topic: str,
    *,
    publisher_bootstrap: str | None = None,
    app_secret: str | None = SECRET,
    verify_token: str | None = VERIFY,
) -> AsyncIterator[Webhooks]:
    publisher = KafkaPublisher(
        publisher_bootstrap or bootstrap, idempotence=False, topic=topic, timeout=3.0
    )
    routes = meta_routes(publisher, app_secret=app_secret, verify_token=verify_token, clock=clock)
    try:
        async with (
            serving(routes, free_port()) as base,
            httpx.AsyncClient(base_url=base, timeout=30) as client,
        ):
            yield Webhooks(client, topic, bootstrap)
    finally:
        await publisher.close()


@pytest.fixture
async def hooks(kafka_bootstrap: str, fresh_topic: TopicFactory) -> AsyncIterator[Webhooks]:
    topic = fresh_topic("meta")
    await ensure_topics(kafka_bootstrap, {topic: 2})
    async with webhook_server(kafka_bootstrap, topic) as webhooks:
        yield webhooks


# --------------------------------------------------------------------------- handshake


async def test_verification_handshake_echoes_the_challenge(hooks: Webhooks) -> None:
    params = {"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "1158201444"}
    response = await hooks.client.get("/webhooks/meta", params=params)
    assert response.status_code == 200
    assert response.text == "1158201444"
    assert response.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize(
    "params",
    [
        {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
        {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY, "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.challenge": "1"},
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY},
    ],
)
async def test_verification_refused(hooks: Webhooks, params: dict[str, str]) -> None:
    response = await hooks.client.get("/webhooks/meta", params=params)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "verification_failed"


@pytest.mark.parametrize(("secret", "token"), [(None, VERIFY), (SECRET, None), (None, None)])
async def test_unconfigured_meta_answers_503(
    kafka_bootstrap: str, fresh_topic: TopicFactory, secret: str | None, token: str | None
) -> None:
    topic = fresh_topic("meta")
    await ensure_topics(kafka_bootstrap, {topic: 1})
    async with webhook_server(
        kafka_bootstrap, topic, app_secret=secret, verify_token=token
    ) as hooks:
        params = {"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "7"}
        response = await hooks.client.get("/webhooks/meta", params=params)
        assert response.status_code == 503
        assert "META_APP_SECRET" in response.json()["error"]["message"]
        posted = await hooks.post(raw("whatsapp-text.json"))
        if secret is None:
            assert posted.status_code == 503
            assert posted.json()["error"]["code"] == "meta_not_configured"
            assert await hooks.consume(0, settle=1.0) == []
        else:  # notifications only need the app secret
            assert posted.status_code == 200


# --------------------------------------------------------------------------- notifications


async def test_whatsapp_text_is_published_after_the_broker_acknowledged(hooks: Webhooks) -> None:
    response = await hooks.post(raw("whatsapp-text.json"))
    assert response.status_code == 200, response.text
    assert response.json() == {"received": 1}
    (record,) = await hooks.consume(1)
    assert record["key"] == "phone:+14155550123"
    assert record["event_id"] == "wamid.HBgLMTQxNTU1NTAxMjMVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA="
    assert record["channel"] == "whatsapp"
    assert record["type"] == "message.received"
    assert record["customer"] == {"phone": "+14155550123", "name": "Sheena Nelson"}
    assert record["occurred_at"] == "2026-11-28T10:00:00Z"
    assert record["payload"]["text"] == "Does it come in another color?"
    assert record["payload"]["via"] == "106540352242922"


async def test_every_message_of_one_notification_is_published(hooks: Webhooks) -> None:
    response = await hooks.post(raw("whatsapp-media.json"))
    assert response.status_code == 200
    assert response.json() == {"received": 5}
    records = await hooks.consume(5, settle=0.5)
    assert len(records) == 5
    kinds = sorted(r["payload"]["kind"] for r in records)
    assert kinds == ["audio", "document", "image", "sticker", "video"]
    refs = {r["payload"]["attachments"][0]["ref"] for r in records}
    assert "meta-media:1003383421387256" in refs


@pytest.mark.parametrize(
    ("sample", "count", "key"),
    [
        ("whatsapp-status.json", 1, "phone:+14155550123"),
        ("whatsapp-interactive.json", 4, "phone:+14155550123"),
        ("whatsapp-location-contacts.json", 2, "phone:+14155550123"),
        ("messenger-text.json", 1, "messenger:6543210987654321"),
        ("messenger-postback-quick-reply.json", 3, "messenger:6543210987654321"),
        ("instagram-text.json", 1, "instagram:987654321098765"),
        ("instagram-attachment.json", 1, "instagram:987654321098765"),
    ],
)
async def test_samples_are_published_keyed_by_the_customer(
    hooks: Webhooks, sample: str, count: int, key: str
) -> None:
    response = await hooks.post(raw(sample))
    assert response.status_code == 200, response.text
    records = await hooks.consume(count, settle=0.3)
    assert len(records) == count
    assert {r["key"] for r in records} == {key}


async def test_status_becomes_delivery_status(hooks: Webhooks) -> None:
    assert (await hooks.post(raw("whatsapp-status-failed.json"))).status_code == 200
    (record,) = await hooks.consume(1)
    wamid = "wamid.HBgLMTQxNTU1NTAxMjMVAgARGBI5OTg4Nzc2NjU1NDQzMzIyAA=="
    assert record["type"] == "delivery.status"
    assert record["event_id"] == f"status:{wamid}:failed"
    assert record["payload"]["message_id"] == wamid
    assert record["payload"]["status"] == "failed"
    assert "24 hours" in record["payload"]["error"]


async def test_echoes_are_acknowledged_and_not_published(hooks: Webhooks) -> None:
    response = await hooks.post(raw("messenger-echo.json"))
    assert response.status_code == 200
    assert response.json() == {"received": 0}
    assert await hooks.consume(0, settle=1.0) == []


async def test_the_same_notification_twice_gives_the_same_event_ids(hooks: Webhooks) -> None:
    body = raw("whatsapp-interactive.json")
    assert (await hooks.post(body)).status_code == 200
    assert (await hooks.post(body)).status_code == 200
    records = await hooks.consume(8)
    ids = [r["event_id"] for r in records]
    assert len(set(ids)) == 4
    assert all(ids.count(i) == 2 for i in ids)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("signature", "why"),
    [
        pytest.param(None, "missing", id="missing"),
        pytest.param("sha256=" + "0" * 64, "wrong digest", id="wrong-digest"),
        pytest.param(
            sign(raw("whatsapp-text.json"), "another-secret"), "another secret", id="other-secret"
        ),
        pytest.param(
            sign(raw("whatsapp-text.json"))[len("sha256=") :], "no sha256= prefix", id="no-prefix"
        ),
        pytest.param(
            "sha1=" + hmac.new(SECRET.encode(), b"", hashlib.sha1).hexdigest(), "sha1", id="sha1"
        ),
    ],
)
async def test_bad_signature_is_refused_and_nothing_published(
    hooks: Webhooks, signature: str | None, why: str
) -> None:
    response = await hooks.post(raw("whatsapp-text.json"), signature=signature)
    assert response.status_code == 403, why
    assert response.json()["error"]["code"] == "bad_signature"
    assert await hooks.consume(0, settle=0.5) == []


async def test_signature_covers_the_exact_bytes(hooks: Webhooks) -> None:
    body = raw("whatsapp-text.json")
    # the same JSON re-serialised (other whitespace) under the original signature
    reformatted = orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2)
    response = await hooks.post(reformatted, signature=sign(body))
    assert response.status_code == 403
    # and correctly signed, the reformatted bytes are fine
    assert (await hooks.post(reformatted)).status_code == 200
    assert len(await hooks.consume(1)) == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b"[1, 2]", "invalid_payload"),
        (
            b'{"object": "page", "entry": [{"messaging": [{"message": {"text": "x"}}]}]}',
            "invalid_payload",
        ),
    ],
)
async def test_malformed_notification_is_400_with_a_reason(
    hooks: Webhooks, body: bytes, code: str
) -> None:
    response = await hooks.post(body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert await hooks.consume(0, settle=0.5) == []


async def test_one_malformed_message_publishes_nothing_of_the_notification(
    hooks: Webhooks,
) -> None:
    body = orjson.loads(raw("whatsapp-media.json"))
    body["entry"][0]["changes"][0]["value"]["messages"][3]["timestamp"] = "not a time"
    response = await hooks.post(orjson.dumps(body))
    assert response.status_code == 400
    assert "timestamp" in response.json()["error"]["message"]
    assert await hooks.consume(0, settle=1.0) == []


async def test_oversized_body_is_413(hooks: Webhooks) -> None:
    body = b'{"object":"page","entry":[],"pad":"' + b"x" * (1024 * 1024) + b'"}'
    response = await hooks.post(body)
    assert response.status_code == 413


async def test_kafka_down_answers_503_so_meta_retries(
    kafka_bootstrap: str, fresh_topic: TopicFactory
) -> None:
    topic = fresh_topic("meta")
    await ensure_topics(kafka_bootstrap, {topic: 1})
    # the publisher points at a port where no broker runs (a stopped broker)
    down = f"127.0.0.1:{free_port()}"
    async with webhook_server(kafka_bootstrap, topic, publisher_bootstrap=down) as hooks:
        response = await hooks.post(raw("whatsapp-media.json"))
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "kafka_unavailable"
        assert "try again" in error["message"]
        assert await hooks.consume(0, settle=0.5) == []


# --------------------------------------------------------------------------- Graph API sender


@dataclass
class GraphStandIn:
    """Records every request; answers with the next queued (status, body), else success."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    answers: list[tuple[int, Any]] = field(default_factory=list)

    def routes(self) -> list[BaseRoute]:
        async def messages(request: Request) -> Response:
            body = await request.body()
            self.requests.append(
                {
                    "path": request.url.path,
                    "authorization": request.headers.get("authorization"),
                    "json": orjson.loads(body),
                }
            )
            if self.answers:
                status, answer = self.answers.pop(0)
                if isinstance(answer, bytes):
                    return Response(answer, status_code=status)
                return JSONResponse(answer, status_code=status)
            if request.path_params["node"] == "me":
                return JSONResponse({"recipient_id": "6543210987654321", "message_id": "m_sent1"})
            return JSONResponse(
                {
                    "messaging_product": "whatsapp",
                    "contacts": [{"input": "14155550123", "wa_id": "14155550123"}],
                    "messages": [{"id": "wamid.SENT.1"}],
                }
            )

        return [Route("/{version}/{node}/messages", messages, methods=["POST"])]


@pytest.fixture
async def graph() -> AsyncIterator[tuple[GraphStandIn, str]]:
    stand_in = GraphStandIn()
    async with serving(stand_in.routes(), free_port()) as base:
        yield stand_in, base


def reply(channel: str = "whatsapp", **overrides: Any) -> OutboundMessage:
    values: dict[str, Any] = {
        "message_id": "reply-1",
        "conversation_id": "c0ffee00-0000-4000-8000-000000000001",
        "channel": channel,
        "text": "Yes, it also comes in navy.",
        "to": "+14155550123" if channel == "whatsapp" else "6543210987654321",
        "last_inbound_at": (NOW - timedelta(hours=2)).isoformat(),
        "via": "106540352242922" if channel == "whatsapp" else "112233445566778",
    }
    values.update(overrides)
    return OutboundMessage(**values)


@pytest.fixture
async def sender(graph: tuple[GraphStandIn, str]) -> AsyncIterator[MetaSender]:
    _, base = graph
    async with MetaSender(
        graph_url=base,
        access_token="EAAG-test-token",
        whatsapp_phone_number_id="999000111222333",
        clock=clock,
    ) as meta:
        yield meta


async def test_whatsapp_reply_goes_to_the_phone_number_the_customer_wrote_to(
    graph: tuple[GraphStandIn, str], sender: MetaSender
) -> None:
    stand_in, _ = graph
    result = await sender.send(reply())
    assert result.provider_id == "wamid.SENT.1"
    assert result.status == "sent"
    (request,) = stand_in.requests
    assert request["path"] == "/v21.0/106540352242922/messages"
    assert request["authorization"] == "Bearer EAAG-test-token"
    assert request["json"] == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "14155550123",
        "type": "text",
        "text": {"preview_url": False, "body": "Yes, it also comes in navy."},
    }


async def test_whatsapp_reply_without_via_uses_the_configured_number(
    graph: tuple[GraphStandIn, str], sender: MetaSender
) -> None:
    stand_in, _ = graph
    await sender.send(reply(via=None))
    assert stand_in.requests[0]["path"] == "/v21.0/999000111222333/messages"


@pytest.mark.parametrize("channel", ["messenger", "instagram"])
async def test_messenger_and_instagram_use_the_send_api(
    graph: tuple[GraphStandIn, str], sender: MetaSender, channel: str
) -> None:
    stand_in, _ = graph
    result = await sender.send(reply(channel, last_inbound_at=None))
    assert result.provider_id == "m_sent1"
    (request,) = stand_in.requests
    assert request["path"] == "/v21.0/me/messages"
    assert request["authorization"] == "Bearer EAAG-test-token"
    assert request["json"] == {
        "recipient": {"id": "6543210987654321"},
        "messaging_type": "RESPONSE",
        "message": {"text": "Yes, it also comes in navy."},
    }


@pytest.mark.parametrize(
    "last_inbound_at",
    [None, (NOW - timedelta(hours=24, seconds=1)).isoformat(), "not a time"],
)
async def test_whatsapp_outside_the_24_hour_window_needs_a_template(
    graph: tuple[GraphStandIn, str], sender: MetaSender, last_inbound_at: str | None
) -> None:
    stand_in, _ = graph
    with pytest.raises(PermanentFailure, match=r"24-hour customer service window.*template"):
        await sender.send(reply(last_inbound_at=last_inbound_at))
    assert stand_in.requests == []


async def test_whatsapp_just_inside_the_window_is_sent(
    graph: tuple[GraphStandIn, str], sender: MetaSender
) -> None:
    stand_in, _ = graph
    inside = (NOW - timedelta(hours=23, minutes=59)).isoformat().replace("+00:00", "Z")
    await sender.send(reply(last_inbound_at=inside))
    assert len(stand_in.requests) == 1


@pytest.mark.parametrize(
    ("status", "answer", "failure", "reason"),
    [
        (500, {"error": {"message": "An unexpected error has occurred."}}, TemporaryFailure, "500"),
        (503, b"<html>busy</html>", TemporaryFailure, "503"),
        (429, {"error": {"message": "Too many calls", "code": 4}}, TemporaryFailure, "429"),
        (
            400,
            {"error": {"message": "Rate limit hit", "code": 130429, "type": "OAuthException"}},
            TemporaryFailure,
            "Rate limit hit",
        ),
        (
            400,
            {"error": {"message": "Service unavailable", "code": 2, "is_transient": True}},
            TemporaryFailure,
            "Service unavailable",
        ),
        (
            400,
            {
                "error": {
                    "message": "(#100) Invalid parameter",
                    "type": "OAuthException",
                    "code": 100,
                    "fbtrace_id": "AbC",
                }
            },
            PermanentFailure,
            r"\(#100\) Invalid parameter",
        ),
        (
            401,
            {"error": {"message": "Error validating access token", "code": 190}},
            PermanentFailure,
            "Error validating access token",
        ),
        (404, b"not json", PermanentFailure, "404"),
    ],
)
async def test_graph_errors_map_to_temporary_or_permanent(
    graph: tuple[GraphStandIn, str],
    sender: MetaSender,
    status: int,
    answer: Any,
    failure: type[Exception],
    reason: str,
) -> None:
    stand_in, _ = graph
    stand_in.answers.append((status, answer))
    with pytest.raises(failure, match=reason):
        await sender.send(reply())
    assert len(stand_in.requests) == 1


async def test_graph_unreachable_is_temporary() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    async with MetaSender(closed, "token", "999000111222333", clock) as sender:
        with pytest.raises(TemporaryFailure, match="unreachable"):
            await sender.send(reply())


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (reply(to="not a phone"), "not a WhatsApp phone number"),
        (reply(text="x" * 4097), "at most 4096"),
        (reply("messenger", text="x" * 2001), "at most 2000"),
        (reply(text="   "), "empty"),
        (reply(channel="email"), "does not send on channel"),
    ],
)
async def test_refused_without_a_request(
    graph: tuple[GraphStandIn, str], sender: MetaSender, message: OutboundMessage, reason: str
) -> None:
    stand_in, _ = graph
    with pytest.raises(PermanentFailure, match=reason):
        await sender.send(message)
    assert stand_in.requests == []


async def test_no_access_token_is_a_clear_refusal(graph: tuple[GraphStandIn, str]) -> None:
    stand_in, base = graph
    async with MetaSender(base, "", "999000111222333", clock) as sender:
        with pytest.raises(PermanentFailure, match="META_ACCESS_TOKEN"):
            await sender.send(reply())
    assert stand_in.requests == []
