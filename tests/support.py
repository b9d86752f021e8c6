"""Helpers shared by integration and end-to-end tests (not fixtures: plain functions)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import uvicorn
from aiokafka import AIOKafkaProducer
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from inbox.worker import IngestWorker, WorkerConfig
from infra.kafka import ensure_topics, make_producer
from infra.store import EventStore

T0 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


def contact_event(
    event_id: str | None = None,
    *,
    channel: str = "sms",
    type: str = "message.received",
    customer: dict[str, Any] | None = None,
    payload: dict[str, Any] | None = None,
    at: datetime | None = None,
    seconds: float = 0,
) -> dict[str, Any]:
    return {
        "schema": "contact-event/1",
        "event_id": event_id or uuid.uuid4().hex,
        "occurred_at": ((at or T0) + timedelta(seconds=seconds)).isoformat(),
        "channel": channel,
        "type": type,
        "customer": customer or {"phone": "+14155550123"},
        "thread": {},
        "payload": {"text": "hello"} if payload is None else payload,
    }


def key_of(event: dict[str, Any]) -> bytes:
    customer = event["customer"]
    if event["channel"] == "email" and "email" in customer:
        return f"email:{customer['email'].lower()}".encode()
    if "phone" in customer:
        return f"phone:{customer['phone']}".encode()
    if "visitor" in customer:
        return f"visitor:{customer['visitor']}".encode()
    return f"email:{customer.get('email', '')}".encode()


async def produce(
    bootstrap: str,
    topic: str,
    events: Sequence[dict[str, Any] | bytes],
    *,
    key: bytes | None = None,
) -> None:
    producer: AIOKafkaProducer = make_producer(bootstrap, idempotence=False)
    await producer.start()
    try:
        futures = []
        for event in events:
            if isinstance(event, bytes):
                futures.append(await producer.send(topic, value=event, key=key or b"raw"))
            else:
                futures.append(
                    await producer.send(topic, value=orjson.dumps(event), key=key or key_of(event))
                )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def worker_config(bootstrap: str, topic: str, **overrides: Any) -> WorkerConfig:
    config = WorkerConfig(
        bootstrap=bootstrap,
        group_id=f"group-{topic}",
        topic=topic,
        dead_letter_topic=f"{topic}.dlq",
        retry_delay=0.2,
    )
    config.consumer_overrides = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 200}
    return replace(config, **overrides)


async def make_topics(bootstrap: str, topic: str, partitions: int = 4) -> None:
    await ensure_topics(bootstrap, {topic: partitions, f"{topic}.dlq": 1})


@contextlib.asynccontextmanager
async def running_worker(config: WorkerConfig, store: EventStore) -> AsyncIterator[IngestWorker]:
    worker = IngestWorker(config, store)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float = 30.0,  # noqa: ASYNC109 - a polling deadline, not a cancel scope
    interval: float = 0.05,
    what: str = "",
) -> Any:
    """Polls `predicate` (run in a thread) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def serving(app: list[BaseRoute] | Starlette, port: int) -> AsyncIterator[str]:
    """uvicorn serving an app (or bare routes) on 127.0.0.1:port in this event loop: stand-ins
    for outside services (Twilio's REST API, Meta's Graph API) and parts of our API."""
    if isinstance(app, list):
        app = Starlette(routes=app)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped while starting")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
