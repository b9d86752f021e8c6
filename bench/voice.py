"""IVR benchmark: TwiML answer latency with many calls in progress at once, through uvicorn
serving `voice_routes` with a real KafkaPublisher on the embedded broker, and the wait estimate
(ivr.estimate.estimate_wait over 50 recent handle times) computed on every wait loop.

    python -m bench.voice [--calls 200] [--waits 5] [--think 1.0] [--bootstrap HOST:PORT]

Each simulated call makes the steps Twilio makes: the incoming call, the language choice, the
main menu choice (which enqueues it), `--waits` wait loops (position and estimate), the queue
result (hung up while queued) and the status callback; every request signed as Twilio signs.
All calls run at once on their own keep-alive connection. Two runs are printed:
"paced" waits a random 0..2x`--think` seconds between a call's steps (still far more requests
per call than a real caller makes: Twilio asks again every 20-60 s while a caller waits), and
"back to back" sends each call's next step as soon as the answer arrives (the saturation
limit). Beside them, the raw limit: the same server answering a fixed TwiML without signature,
flow or Kafka. The server runs in its own process (one uvicorn worker, as `inbox serve` does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlencode, urlsplit

from twilio.request_validator import RequestValidator

from bench.webhooks import Failed, _pct, _wait_listening
from infra.broker import EmbeddedBroker, free_port
from infra.kafka import ensure_topics

TOKEN = "bench-twilio-auth-token-0123456789"


def serve(port: int, bootstrap: str, topic: str) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from adapters.kafka import KafkaPublisher
    from ivr.estimate import estimate_wait
    from ivr.flow import QueueInfo
    from ivr.menu import load_bundled_example
    from ivr.voice import voice_routes

    publisher = KafkaPublisher(bootstrap, idempotence=False, topic=topic)
    handle_times = [180.0 + 7 * n % 240 for n in range(50)]
    positions: dict[str, int] = {}

    async def queue_info(call_sid: str, queue: str) -> QueueInfo:
        position = positions.setdefault(call_sid, len(positions) % 40 + 1)
        estimate = estimate_wait(
            position=position, free_agents=0, busy_agents=8, handle_times=handle_times
        )
        return QueueInfo(position, estimate, 0)

    async def raw(request: Request) -> Response:
        await request.body()
        return Response('<?xml version="1.0" encoding="UTF-8"?><Response />', media_type="text/xml")

    routes = [
        *voice_routes(
            publisher,
            menu=load_bundled_example(),
            auth_token=TOKEN,
            public_url=f"http://127.0.0.1:{port}",
            queue_info=queue_info,
        ),
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


def _request(port: int, url: str, params: dict[str, str], *, signed: bool = True) -> bytes:
    body = urlencode(params).encode()
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    signature = RequestValidator(TOKEN).compute_signature(url, params) if signed else "-"
    head = (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n"
        f"X-Twilio-Signature: {signature}\r\n\r\n"
    )
    return head.encode() + body


def _steps(port: int, n: int, waits: int, raw: bool) -> list[bytes]:
    base = f"http://127.0.0.1:{port}"
    sid = f"CA{n:032x}"
    common = {"CallSid": sid, "From": f"+1415555{n % 10000:04d}", "To": "+15005550006"}
    if raw:
        return [_request(port, base + "/raw", common, signed=False) for _ in range(waits + 5)]
    wait = base + "/twilio/voice/wait?lang=en&queue=billing&path=1.h.1"
    steps = [
        (base + "/twilio/voice", {"CallStatus": "ringing"}),
        (base + "/twilio/voice/gather?lang=en&node=welcome&attempt=0", {"Digits": "1"}),
        (base + "/twilio/voice/gather?lang=en&node=main&attempt=0&path=1.h", {"Digits": "1"}),
        *[(wait, {"QueuePosition": "3", "QueueTime": str(30 * i)}) for i in range(waits)],
        (
            base + "/twilio/voice/queue-result?lang=en&queue=billing&path=1.h.1",
            {"QueueResult": "hangup", "QueueTime": "150"},
        ),
        (base + "/twilio/voice/status", {"CallStatus": "completed", "CallDuration": "170"}),
    ]
    return [_request(port, url, common | extra) for url, extra in steps]


async def _call(
    port: int, steps: list[bytes], think: float, latencies: list[float], statuses: dict[int, int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for payload in steps:
            if think:
                await asyncio.sleep(random.uniform(0, 2 * think))
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


async def run(
    port: int, calls: list[list[bytes]], think: float
) -> tuple[float, list[float], dict[int, int]]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    started = time.perf_counter()
    await asyncio.gather(*(_call(port, steps, think, latencies, statuses) for steps in calls))
    return time.perf_counter() - started, sorted(latencies), statuses


def report(name: str, elapsed: float, latencies: list[float]) -> str:
    return (
        f"{name:<44} {len(latencies) / elapsed:>7,.0f} req/s   p50 {_pct(latencies, 0.5):6.1f} ms"
        f"   p99 {_pct(latencies, 0.99):6.1f} ms   max {latencies[-1] * 1000:6.1f} ms"
    )


async def bench(args: argparse.Namespace, bootstrap: str) -> None:
    topic = f"bench-voice-{uuid.uuid4().hex[:8]}"
    await ensure_topics(bootstrap, {topic: 8})
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "bench.voice", "serve", str(port), bootstrap, topic),
        start_new_session=True,
    )
    rows = []
    try:
        await _wait_listening(port, proc)
        n = args.calls
        await run(port, [_steps(port, 10**6 + i, 2, False) for i in range(50)], 0)  # warm up
        for name, think, raw, offset in (
            ("raw limit (fixed TwiML), back to back", 0.0, True, 0),
            (f"IVR steps, paced (think 0..{2 * args.think:g} s)", args.think, False, 0),
            ("IVR steps, back to back", 0.0, False, n),
        ):
            calls = [_steps(port, offset + i, args.waits, raw) for i in range(n)]
            elapsed, latencies, statuses = await run(port, calls, think)
            if set(statuses) != {200}:
                raise Failed(f"answers other than 200: {statuses}")
            rows.append(report(name, elapsed, latencies))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
    steps = args.waits + 5
    print(
        f"{args.calls} calls in progress at once, {steps} signed steps each "
        f"({args.waits} wait loops with the estimate), one uvicorn worker, "
        f"{os.cpu_count()} CPUs, Kafka acked before each answer"
    )
    for row in rows:
        print(row)
    print("target: TwiML answers p99 < 25 ms with 200 calls in progress")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        serve(int(argv[1]), argv[2], argv[3])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.voice", description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--waits", type=int, default=5)
    parser.add_argument("--think", type=float, default=1.0)
    parser.add_argument("--bootstrap", help="a Kafka cluster instead of the embedded broker")
    args = parser.parse_args(argv)
    if args.bootstrap:
        asyncio.run(bench(args, args.bootstrap))
        return
    with EmbeddedBroker() as broker:
        asyncio.run(bench(args, broker.bootstrap))


if __name__ == "__main__":
    main()
