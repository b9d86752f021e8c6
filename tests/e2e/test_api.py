"""The whole `inbox dev` stack in one process (embedded broker from the session, HTTP on a real
port, worker, projections) driven over real sockets."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from tests.e2e.conftest import Stack, listed
from tests.support import T0, contact_event, produce


async def test_a_contact_event_from_any_kafka_client_shows_up_in_the_inbox(stack: Stack) -> None:
    assert stack.settings.kafka_bootstrap is not None
    await produce(
        stack.settings.kafka_bootstrap,
        stack.settings.contact_events_topic,
        [
            contact_event("SMa", customer={"phone": "+14155550123", "name": "Ann"}),
            contact_event(
                "<b1@example.org>",
                channel="email",
                customer={"email": "Bob@Example.org"},
                payload={"text": "my invoice", "subject": "Invoice"},
                seconds=5,
            ),
        ],
    )
    items = await listed(stack, 2)
    by_channel = {item["channels"][0]: item for item in items}
    assert by_channel["sms"]["customer"]["name"] == "Ann"
    assert by_channel["sms"]["last_message"]["text"] == "hello"
    assert by_channel["email"]["customer"]["identities"] == ["email:bob@example.org"]
    assert by_channel["email"]["status"] == "open"

    only_email = (await stack.get("/api/v1/conversations", channel="email")).json()["items"]
    assert [i["id"] for i in only_email] == [by_channel["email"]["id"]]
    by_key = (await stack.get("/api/v1/conversations", customer="email:BOB@example.org")).json()
    assert [i["id"] for i in by_key["items"]] == [by_channel["email"]["id"]]

    detail = (await stack.get(f"/api/v1/conversations/{by_channel['sms']['id']}")).json()
    messages = [e for e in detail["timeline"] if e["kind"] == "message"]
    assert [(m["direction"], m["text"], m["source_event_id"]) for m in messages] == [
        ("in", "hello", "SMa")
    ]
    assert detail["previous"] == []

    history = (await stack.get(f"/api/v1/conversations/{by_channel['sms']['id']}/events")).json()
    types = [e["type"] for e in history["items"]]
    # routing (in the stack, as in `inbox dev`) puts it in the default queue, maybe already
    assert types[:2] == ["Opened", "MessageReceived"]
    assert types[2:] in ([], ["Queued"])
    source = history["items"][1]["source"]
    assert source["event_id"] == "SMa"
    assert source["kafka"]["topic"] == stack.settings.contact_events_topic


async def test_bad_requests_get_clear_errors(stack: Stack) -> None:
    client = stack.client
    no_token = await client.get("/api/v1/conversations", headers={"Authorization": ""})
    assert no_token.status_code == 401
    assert no_token.json()["error"]["code"] == "unauthenticated"
    wrong = await client.get("/api/v1/conversations", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    lists, metrics = "/api/v1/conversations", "/api/v1/metrics"
    for path, params, needle in [
        (lists, {"status": "closed"}, "status"),
        (lists, {"channel": "fax"}, "channel"),
        (lists, {"limit": "501"}, "limit"),
        (lists, {"limit": "0"}, "limit"),
        (lists, {"limit": "²"}, "limit"),  # a digit to str.isdigit, not to int()
        (lists, {"queue": "sales\x00"}, "NUL"),
        (lists, {"customer": "phone:12"}, "customer"),
        (lists, {"cursor": "not-a-cursor"}, "cursor"),
        (metrics, {"to": "0001-01-01T00:00:00Z"}, "to"),
        (metrics, {"to": "0001-01-01T00:00:00+14:00"}, "to"),
        (metrics, {"from": "yesterday"}, "from"),
        (metrics, {"agent": "\x00"}, "NUL"),
    ]:
        response = await stack.get(path, **params)
        assert response.status_code == 422, (path, params)
        assert needle in response.json()["error"]["message"], (path, params)
    nul = await stack.post(
        "/api/v1/conversations/0b0c7a52-3b0e-4c8e-9a55-0c4f6f7d2b10/notes", {"text": "a\x00b"}
    )
    assert nul.status_code == 422
    assert "NUL" in nul.json()["error"]["message"]
    missing = await stack.get("/api/v1/conversations/0b0c7a52-3b0e-4c8e-9a55-0c4f6f7d2b10")
    assert missing.status_code == 404
    assert (await stack.get("/api/v1/conversations/not-a-uuid")).status_code == 404
    assert (await stack.get("/api/v1/conversations/not-a-uuid/events")).status_code == 404


async def test_health_and_prometheus_metrics(stack: Stack) -> None:
    assert (await stack.get("/healthz")).json() == {"status": "ok"}
    assert stack.settings.kafka_bootstrap is not None
    await produce(
        stack.settings.kafka_bootstrap,
        stack.settings.contact_events_topic,
        [contact_event("m1"), b"not json at all"],
    )
    await listed(stack, 1)

    async def scraped() -> str | None:
        text = (await stack.get("/metrics")).text
        return text if 'inbox_projection_position{projection="inbox"}' in text else None

    text = await wait_until_async(scraped)
    for name in (
        "inbox_contact_events_consumed_total",
        "inbox_contact_events_stored_total",
        "inbox_contact_events_dead_lettered_total",
        "inbox_event_store_position",
        'inbox_projection_position{projection="timeline"}',
        "inbox_consumer_lag",
    ):
        assert name in text, name


async def wait_until_async(probe: Any, timeout: float = 30) -> Any:  # noqa: ASYNC109
    deadline = asyncio.get_running_loop().time() + timeout
    while (value := await probe()) is None:
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)
    return value


async def test_metrics_follow_the_traffic(stack: Stack) -> None:
    assert stack.settings.kafka_bootstrap is not None
    await produce(
        stack.settings.kafka_bootstrap,
        stack.settings.contact_events_topic,
        [
            contact_event("k1", customer={"phone": "+14155550181"}),
            contact_event("k2", customer={"phone": "+14155550182"}, seconds=5),
            contact_event("k3", channel="email", customer={"email": "k@example.com"}, seconds=9),
        ],
    )
    window = {
        "from": (T0 - timedelta(hours=1)).isoformat(),
        "to": (T0 + timedelta(hours=1)).isoformat(),
        "bucket": "hour",
    }
    for _ in range(400):
        answer = (await stack.get("/api/v1/metrics", **window)).json()
        if answer["total"]["volume"]["sms"] == 2 and answer["total"]["volume"]["email"] == 1:
            break
        await asyncio.sleep(0.05)
    assert answer["total"]["volume"]["sms"] == 2
    assert answer["total"]["volume"]["email"] == 1
    assert len(answer["buckets"]) == 2
    bad = await stack.get("/api/v1/metrics", bucket="fortnight")
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "bad_query"
