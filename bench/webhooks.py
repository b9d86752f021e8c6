"""Meta webhook benchmark: signed WhatsApp notifications per second through uvicorn serving
`meta_routes` with a real KafkaPublisher on the embedded broker, beside the raw limit (the same
requests to a route that reads the body and answers 200, in the same server).

    python -m bench.webhooks [--requests 20000] [--connections 32] [--customers 10000]
                             [--bootstrap HOST:PORT]

The server runs in its own process (one uvicorn worker, as `inbox serve` runs it); the load
generator is this process: keep-alive HTTP/1.1 connections on raw asyncio streams, each with one
request in flight, so the generator costs far less CPU than the server it measures. Every
request is a distinct message (its own wamid and customer) signed with HMAC-SHA256 exactly as
Meta signs; at the end the topic is checked to hold one record per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import orjson

from infra.broker import EmbeddedBroker, free_port
from infra.kafka import ensure_topics, make_consumer

SECRET = "bench-app-secret"
T0 = 1795860000


def notification(n: int, customers: int = 10_000) -> bytes:
    phone = f"1415{n % customers:07d}"
    body = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "102290129340398",
                "changes": [
                    {
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550783881",
                                "phone_number_id": "106540352242922",
                            },
                            "contacts": [{"profile": {"name": f"Customer {n}"}, "wa_id": phone}],
                            "messages": [
                                {
                                    "from": phone,
                                    "id": f"wamid.bench{n:012d}",
                                    "timestamp": str(T0 + n % 3600),
                                    "type": "text",
                                    "text": {"body": f"Where is my order {n}?"},
                                }
                            ],
                        },
                        "field": "messages",
                    }
                ],
            }
        ],
    }
    return orjson.dumps(body)


def request(path: str, body: bytes, port: int) -> bytes:
    signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: facebookexternalua\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"X-Hub-Signature-256: {signature}\r\n\r\n"
    )
    return head.encode() + body


# --------------------------------------------------------------------------- server process


def serve(port: int, bootstrap: str, topic: str) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from adapters.kafka import KafkaPublisher
    from adapters.meta import meta_routes

    publisher = KafkaPublisher(bootstrap, idempotence=False, topic=topic)

    async def raw(request: Request) -> Response:
        await request.body()
        return JSONResponse({"received": 1})

    def clock() -> datetime:
        return datetime.fromtimestamp(T0 + 3600, UTC)

    routes = [
        *meta_routes(publisher, app_secret=SECRET, verify_token="bench", clock=clock),
        Route("/raw", raw, methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await publisher.close()

    uvicorn.run(
        Starlette(routes=routes, lifespan=lifespan),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


# --------------------------------------------------------------------------- load generator


class Failed(RuntimeError):
    pass


async def _one_connection(
    port: int, queue: list[bytes], latencies: list[float], statuses: dict[int, int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while queue:
            payload = queue.pop()
            started = time.perf_counter()
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            status = int(head[9:12])
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()
        await writer.wait_closed()


async def load(port: int, payloads: list[bytes], connections: int) -> tuple[float, list[float]]:
    """(seconds, sorted latencies) for sending all payloads over `connections` connections."""
    queue = list(reversed(payloads))
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    started = time.perf_counter()
    await asyncio.gather(
        *(_one_connection(port, queue, latencies, statuses) for _ in range(connections))
    )
    elapsed = time.perf_counter() - started
    if set(statuses) != {200}:
        raise Failed(f"answers other than 200: {statuses}")
    return elapsed, sorted(latencies)


def _pct(latencies: list[float], p: float) -> float:
    return latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000


def report(name: str, count: int, elapsed: float, latencies: list[float]) -> str:
    return (
        f"{name:<34} {count / elapsed:>9,.0f} req/s   p50 {_pct(latencies, 0.50):6.1f} ms   "
        f"p99 {_pct(latencies, 0.99):6.1f} ms   max {latencies[-1] * 1000:6.1f} ms"
    )


async def _wait_listening(port: int, proc: asyncio.subprocess.Process) -> None:
    for _ in range(300):
        if proc.returncode is not None:
            raise Failed(f"the server exited with code {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise Failed("the server did not start listening")


async def _records(bootstrap: str, topic: str, expected: int) -> int:
    """Distinct event ids in the topic, read back (the embedded broker's end offsets can lag
    behind what it serves, so count what a consumer gets)."""
    consumer = make_consumer(bootstrap, None, topic)
    await consumer.start()
    ids: set[str] = set()
    try:
        idle = 0
        while len(ids) < expected and idle < 10:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            idle = 0 if batches else idle + 1
            for records in batches.values():
                ids.update(orjson.loads(r.value)["event_id"] for r in records)
        return len(ids)
    finally:
        await consumer.stop()


async def bench(args: argparse.Namespace, bootstrap: str) -> None:
    topic = f"bench-meta-{uuid.uuid4().hex[:8]}"
    await ensure_topics(bootstrap, {topic: 8})
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "bench.webhooks", "serve", str(port), bootstrap, topic),
        start_new_session=True,
    )
    try:
        await _wait_listening(port, proc)
        warm = args.warmup
        total = warm + args.requests
        meta = [
            request("/webhooks/meta", notification(n, args.customers), port) for n in range(total)
        ]
        raw = [request("/raw", notification(n, args.customers), port) for n in range(total)]
        # Warm up both routes (the producer connects to Kafka on first use).
        await load(port, meta[:warm], args.connections)
        await load(port, raw[:warm], args.connections)
        raw_time, raw_lat = await load(port, raw[warm:], args.connections)
        meta_time, meta_lat = await load(port, meta[warm:], args.connections)
        stored = await _records(bootstrap, topic, warm + args.requests)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
    print(
        f"{args.requests:,} signed WhatsApp notifications from {args.customers:,} customers, "
        f"{args.connections} keep-alive connections, one uvicorn worker, {os.cpu_count()} CPUs"
    )
    print(report("raw limit (read body, answer 200)", args.requests, raw_time, raw_lat))
    print(report("POST /webhooks/meta (Kafka acked)", args.requests, meta_time, meta_lat))
    print(
        f"distinct events in {topic}: {stored:,} (expected {warm + args.requests:,}); "
        f"target >= 1,500 req/s with p99 < 50 ms"
    )
    if stored != warm + args.requests:
        raise Failed("the topic does not hold one record per request")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        serve(int(argv[1]), argv[2], argv[3])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks", description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--bootstrap", help="a Kafka cluster instead of the embedded broker")
    args = parser.parse_args(argv)
    if args.bootstrap:
        asyncio.run(bench(args, args.bootstrap))
        return
    with EmbeddedBroker() as broker:
        asyncio.run(bench(args, broker.bootstrap))


if __name__ == "__main__":
    main()
