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

Each run prints the client's latencies (all steps; wait loops, which publish nothing; the steps
whose events Kafka acknowledges), the latencies measured inside the server, its CPU time per
request and its garbage collections, and the load average at the start and the end.
`--phases paced` makes only the target's run; `--gc` and `--linger-ms` measure those levers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from twilio.request_validator import RequestValidator

from bench.webhooks import Failed, _pct, _wait_listening
from infra.broker import EmbeddedBroker, free_port
from infra.kafka import ensure_topics

TOKEN = "bench-twilio-auth-token-0123456789"


GC_MODES = ("default", "freeze", "off")


def serve(
    port: int, bootstrap: str, topic: str, gc_mode: str = "default", linger_ms: str = ""
) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    import adapters.kafka
    from adapters.kafka import KafkaPublisher
    from infra.composition import freeze_after_start
    from infra.kafka import make_producer
    from ivr.estimate import estimate_wait
    from ivr.flow import QueueInfo
    from ivr.menu import load_bundled_example
    from ivr.voice import voice_routes

    if linger_ms:  # to measure what infra.kafka's linger costs; patched in this process only
        linger = functools.partial(make_producer, linger_ms=int(linger_ms))
        setattr(adapters.kafka, "make_producer", linger)  # noqa: B010
    publisher = KafkaPublisher(bootstrap, idempotence=False, topic=topic)
    handle_times = [180.0 + 7 * n % 240 for n in range(50)]
    positions: dict[str, int] = {}
    stats = ServerStats()
    gc.callbacks.append(stats.gc_callback)

    async def queue_info(call_sid: str, queue: str) -> QueueInfo:
        position = positions.setdefault(call_sid, len(positions) % 40 + 1)
        estimate = estimate_wait(
            position=position, free_agents=0, busy_agents=8, handle_times=handle_times
        )
        return QueueInfo(position, estimate, 0)

    async def raw(request: Request) -> Response:
        await request.body()
        return Response('<?xml version="1.0" encoding="UTF-8"?><Response />', media_type="text/xml")

    async def stats_route(request: Request) -> Response:
        report = stats.report()
        if request.query_params.get("reset"):
            stats.reset()
        return JSONResponse(report)

    routes = [
        *voice_routes(
            publisher,
            menu=load_bundled_example(),
            auth_token=TOKEN,
            public_url=f"http://127.0.0.1:{port}",
            queue_info=queue_info,
        ),
        Route("/raw", raw, methods=["POST"]),
        Route("/stats", stats_route, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if gc_mode == "freeze":
            freeze_after_start()
        elif gc_mode == "off":
            gc.disable()
        yield
        await publisher.close()

    uvicorn.run(
        stats.timed(Starlette(routes=routes, lifespan=lifespan)),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


class ServerStats:
    """Measured inside the server: each request's time from the ASGI call to the last byte of
    its answer (no client loop, no socket), the collector's pauses, and the CPU time used."""

    def __init__(self) -> None:
        self._gc_started = 0.0
        self.reset()

    def reset(self) -> None:
        self.latencies: list[float] = []
        self.collections = [0, 0, 0]
        self.gc_seconds = 0.0
        self.gc_longest = 0.0
        self.cpu_started = time.process_time()

    def gc_callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_started
        self.collections[info["generation"]] += 1
        self.gc_seconds += took
        self.gc_longest = max(self.gc_longest, took)

    def timed(self, app: ASGIApp) -> ASGIApp:
        async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["path"] == "/stats":
                await app(scope, receive, send)
                return
            started = time.perf_counter()

            async def timed_send(message: Message) -> None:
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    self.latencies.append(time.perf_counter() - started)

            await app(scope, receive, timed_send)

        return wrapper

    def report(self) -> dict[str, Any]:
        return {
            "latencies": self.latencies,
            "collections": self.collections,
            "gc_seconds": self.gc_seconds,
            "gc_longest": self.gc_longest,
            "cpu_seconds": time.process_time() - self.cpu_started,
        }


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


WAIT_LOOP = "wait loops (estimate, nothing to Kafka)"
PUBLISHING = "other steps (events acked by Kafka)"
Steps = list[tuple[str, bytes]]


def _steps(port: int, n: int, waits: int, raw: bool) -> Steps:
    base = f"http://127.0.0.1:{port}"
    sid = f"CA{n:032x}"
    common = {"CallSid": sid, "From": f"+1415555{n % 10000:04d}", "To": "+15005550006"}
    if raw:
        return [("raw", _request(port, base + "/raw", common, signed=False))] * (waits + 5)
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
    return [
        (WAIT_LOOP if url == wait else PUBLISHING, _request(port, url, common | extra))
        for url, extra in steps
    ]


Latencies = dict[str, list[float]]


async def _call(
    port: int, steps: Steps, think: float, latencies: Latencies, statuses: dict[int, int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for label, payload in steps:
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
            latencies.setdefault(label, []).append(time.perf_counter() - started)
            status = int(head[9:12])
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()
        await writer.wait_closed()


async def run(
    port: int, calls: list[Steps], think: float
) -> tuple[float, Latencies, dict[int, int]]:
    latencies: Latencies = {}
    statuses: dict[int, int] = {}
    started = time.perf_counter()
    await asyncio.gather(*(_call(port, steps, think, latencies, statuses) for steps in calls))
    return time.perf_counter() - started, latencies, statuses


async def server_stats(port: int, *, reset: bool) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        target = "/stats?reset=1" if reset else "/stats"
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    stats: dict[str, Any] = json.loads(answer.partition(b"\r\n\r\n")[2])
    return stats


def row(name: str, latencies: list[float], elapsed: float | None = None) -> str:
    ordered = sorted(latencies)
    rate = f"{len(ordered) / elapsed:>7,.0f} req/s" if elapsed else f"{len(ordered):>7,} req  "
    return (
        f"  {name:<42} {rate}   p50 {_pct(ordered, 0.5):6.1f} ms"
        f"   p99 {_pct(ordered, 0.99):6.1f} ms   max {ordered[-1] * 1000:6.1f} ms"
    )


def phase_report(
    name: str, elapsed: float, latencies: Latencies, server: dict[str, Any]
) -> list[str]:
    everything = [t for times in latencies.values() for t in times]
    lines = [row(name, everything, elapsed)]
    if len(latencies) > 1:
        lines += [row("  " + label, times) for label, times in sorted(latencies.items())]
    lines.append(row("  measured inside the server", server["latencies"]))
    gen0, gen1, gen2 = server["collections"]
    lines.append(
        f"    server: {server['cpu_seconds'] * 1000 / len(everything):.2f} ms CPU per request; "
        f"GC {gen0}/{gen1}/{gen2} collections (gen 0/1/2), "
        f"{server['gc_seconds'] * 1000:.0f} ms in all, longest {server['gc_longest'] * 1000:.1f} ms"
    )
    return lines


def load_average() -> str:
    return "load average " + ", ".join(f"{n:.2f}" for n in os.getloadavg())


PHASES = ("raw", "paced", "saturated")


async def bench(args: argparse.Namespace, bootstrap: str) -> None:
    topic = f"bench-voice-{uuid.uuid4().hex[:8]}"
    await ensure_topics(bootstrap, {topic: 8})
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "bench.voice", "serve", str(port), bootstrap, topic, args.gc, args.linger_ms),
        start_new_session=True,
    )
    lines = [f"at the start: {load_average()}"]
    try:
        await _wait_listening(port, proc)
        n = args.calls
        await run(port, [_steps(port, 10**6 + i, 2, False) for i in range(50)], 0)  # warm up
        phases = {
            "raw": ("raw limit (fixed TwiML), back to back", 0.0, True, 0),
            "paced": (f"IVR steps, paced (think 0..{2 * args.think:g} s)", args.think, False, 0),
            "saturated": ("IVR steps, back to back", 0.0, False, n),
        }
        for phase in args.phases:
            name, think, raw, offset = phases[phase]
            calls = [_steps(port, offset + i, args.waits, raw) for i in range(n)]
            await server_stats(port, reset=True)
            elapsed, latencies, statuses = await run(port, calls, think)
            if set(statuses) != {200}:
                raise Failed(f"answers other than 200: {statuses}")
            server = await server_stats(port, reset=True)
            lines += phase_report(name, elapsed, latencies, server)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
    lines.append(f"at the end: {load_average()}")
    steps = args.waits + 5
    print(
        f"{args.calls} calls in progress at once, {steps} signed steps each "
        f"({args.waits} wait loops with the estimate), one uvicorn worker, "
        f"{os.cpu_count()} CPUs, Kafka acked before each answer, server GC: {args.gc}"
        + (f", producer linger_ms={args.linger_ms}" if args.linger_ms else "")
    )
    for line in lines:
        print(line)
    print("target: TwiML answers p99 < 25 ms with 200 calls in progress")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        serve(int(argv[1]), argv[2], argv[3], *argv[4:6])
        return
    parser = argparse.ArgumentParser(
        prog="python -m bench.voice",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--waits", type=int, default=5)
    parser.add_argument("--think", type=float, default=1.0)
    parser.add_argument(
        "--phases",
        nargs="+",
        choices=PHASES,
        default=list(PHASES),
        help="which runs to make (all by default)",
    )
    parser.add_argument(
        "--gc",
        choices=GC_MODES,
        default="freeze",
        help="the server's collector: freeze (gc.freeze() after start, as inbox serve should), "
        "default (untouched), off (disabled: a lower bound for GC's share)",
    )
    parser.add_argument(
        "--linger-ms",
        default="",
        help="the producer's linger_ms in the server instead of infra.kafka's (to measure it)",
    )
    parser.add_argument("--bootstrap", help="a Kafka cluster instead of the embedded broker")
    args = parser.parse_args(argv)
    if args.bootstrap:
        asyncio.run(bench(args, args.bootstrap))
        return
    with EmbeddedBroker() as broker:
        asyncio.run(bench(args, broker.bootstrap))


if __name__ == "__main__":
    main()
