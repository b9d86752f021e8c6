"""How soon a contact event that any Kafka client produces shows up in `GET
/api/v1/conversations` (README: "within a second"), with `inbox dev` running as users start it,
beside the raw limit measured in the same run: the same produce, seen by a plain consumer.

    python -m bench.visible [--events 200]

Events are produced one at a time, each for a new customer, a random 20-100 ms apart, by a
plain aiokafka producer (acks=all, no linger). The clock runs from just before the send until
the conversation is listed (`?customer=email:...`, polled every 5 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
from aiokafka import AIOKafkaProducer

from bench import app_env, kafka
from inbox.worker import WorkerConfig
from infra.broker import free_port
from infra.kafka import make_consumer

POLL = 0.005


def contact_event(email: str) -> bytes:
    return orjson.dumps(
        {
            "schema": "contact-event/1",
            "event_id": f"visible-{uuid.uuid4().hex}",
            "occurred_at": datetime.now(UTC).isoformat(),
            "channel": "email",
            "type": "message.received",
            "customer": {"email": email},
            "thread": {},
            "payload": {"subject": "Order", "text": "Where is my order?"},
        }
    )


def summary(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return f"p50 {statistics.median(ms):7.1f} ms  p99 {p99:7.1f} ms  max {ms[-1]:7.1f} ms"


async def listed(client: httpx.AsyncClient, email: str) -> None:
    while True:
        answer = await client.get(
            "/api/v1/conversations", params={"customer": f"email:{email}", "status": "all"}
        )
        if answer.status_code == 200 and answer.json()["items"]:
            return
        await asyncio.sleep(POLL)


async def raw_limit(bootstrap: str, topic: str, producer: AIOKafkaProducer, n: int) -> list[float]:
    """Produce -> received by a consumer already positioned at the end of the topic, waiting
    for records as the worker does."""
    wait = WorkerConfig(bootstrap).consumer_overrides["fetch_max_wait_ms"]  # the worker's
    consumer = make_consumer(
        bootstrap,
        f"raw-{uuid.uuid4().hex}",
        topic,
        auto_offset_reset="latest",
        fetch_max_wait_ms=wait,
    )
    times: list[float] = []
    async with consumer:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
        for tp in consumer.assignment():
            await consumer.position(tp)  # the end, resolved before anything is sent
        for _ in range(n):
            email = f"raw-{uuid.uuid4().hex[:12]}@example.org"
            started = time.perf_counter()
            key = f"email:{email}".encode()
            await producer.send_and_wait(topic, contact_event(email), key=key)
            while (await consumer.getone()).key != key:
                pass  # (a record from before it was positioned)
            times.append(time.perf_counter() - started)
            await asyncio.sleep(random.uniform(0.02, 0.1))
    return times


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-visible-"))
    bootstrap, broker = kafka(workdir)
    topic = f"visible-{uuid.uuid4().hex[:8]}"
    env = app_env(workdir, bootstrap, topic, INBOX_SMTP_PORT=str(free_port()))
    port = int(env["INBOX_HTTP_PORT"])
    log = (workdir / "dev.log").open("wb")
    dev = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "inbox.cli", "dev", env=env, stdout=log, stderr=log
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    visible: list[float] = []
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": "Bearer bench"},
            timeout=10,
        ) as client:
            while True:
                if dev.returncode is not None:
                    raise RuntimeError((workdir / "dev.log").read_text())
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            await producer.start()
            # The first one waits for the worker to join its group: not timed.
            first = "warm-up@example.org"
            await producer.send_and_wait(topic, contact_event(first), key=f"email:{first}".encode())
            await asyncio.wait_for(listed(client, first), 120)
            raw = await raw_limit(bootstrap, topic, producer, args.events)
            for _ in range(args.events):
                email = f"c-{uuid.uuid4().hex[:12]}@example.org"
                started = time.perf_counter()
                await producer.send_and_wait(
                    topic, contact_event(email), key=f"email:{email}".encode()
                )
                await asyncio.wait_for(listed(client, email), 30)
                visible.append(time.perf_counter() - started)
                await asyncio.sleep(random.uniform(0.02, 0.1))
    finally:
        await producer.stop()
        dev.terminate()
        await asyncio.wait_for(dev.wait(), 30)
        log.close()
        if broker is not None:
            broker.stop()
    print(
        f"visible benchmark: {args.events} contact events produced one at a time, `inbox dev` "
        f"(SQLite), {os.cpu_count()} cores"
    )
    print(f"  produce -> listed in GET /api/v1/conversations   {summary(visible)}")
    print(f"  raw limit: produce -> a plain consumer           {summary(raw)}")
    print("  target: within 1 s")
    print(
        "  load average (1, 5, 15 min) at the end: {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())
    )


if __name__ == "__main__":
    asyncio.run(main())
