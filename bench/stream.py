"""Live stream fan-out benchmark: how long until a stored change reached all of 1,000 connected
stream clients, beside the raw limit (the same fan-out of a pre-serialised frame to 1,000
sockets of the same server, without the hub).

    python -m bench.stream [--clients 1000] [--rounds 50] [--deflate] [--no-server-deflate]
                           [--gc-freeze]

The server runs in its own process (uvicorn on uvloop, the websocket implementation `inbox
serve` gets), with a `StreamHub` on a SQLite event store; every client is a supervisor, so all
1,000 get every frame. The clients are this process: minimal websocket clients on asyncio
protocols on uvloop (a handshake, then frames parsed by hand), so they cost little CPU.
Each round measures from just before the change is stored until the last client got its frame:

- nudged: the server stores one event (as an API command does, in a thread) and nudges the hub;
  the request to do so is in the figure;
- polled: this process stores the event in the same SQLite file; the hub finds it by polling
  (every 20 ms), as it finds what another process (the ingest worker) stored;
- raw limit, send loop: the server sends one pre-serialised frame to 1,000 plain websocket
  sockets in a loop of `await websocket.send_text(...)` (Starlette, then uvicorn's protocol);
- raw limit, direct writes: the same, with the frame built once and written to each socket's
  transport (what the hub does on uvicorn's websockets-sansio protocol): the floor.

The server also reports its garbage collections during the measured rounds (count per
generation and the longest pause), and how long its own part of each raw round took.

`--deflate`: the clients ask for permessage-deflate, as browsers and the `websockets` library do;
uvicorn then compresses what goes through its protocol once per socket (the send loop, hello;
the hub's live frames and the direct raw limit go uncompressed, which the extension allows).
`--no-server-deflate`: the server runs with uvicorn's `ws_per_message_deflate=False`.
`--gc-freeze`: the server calls `gc.freeze()` once the clients are connected, so the collector
no longer walks the objects of the startup and of the connections.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import orjson
import uvloop

from inbox.domain.conversation import Conversation
from infra.broker import free_port

AT = "2026-11-27T09:00:00.000000Z"
PATH = "/api/v1/stream?token=sue"


# --------------------------------------------------------------------------- server process


def serve(port: int, data_dir: str, server_deflate: bool) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route, WebSocketRoute
    from starlette.types import Receive, Scope, Send
    from starlette.websockets import WebSocket, WebSocketDisconnect

    from inbox.access import Principal
    from inbox.stream import StreamHub, protocol_of, text_frame
    from infra.settings import load_settings
    from infra.store import open_event_store

    store = open_event_store(load_settings({"INBOX_DATA_DIR": data_dir}))

    async def authenticate(token: str) -> Principal | None:
        return Principal(token, "supervisor", frozenset())

    hub = StreamHub(
        store, authenticate=authenticate, queue_skill=lambda q: None, lookup=lambda c: None
    )
    raw_sockets: dict[WebSocket, Any] = {}  # socket -> uvicorn's protocol (None: another)
    pauses = GcPauses()
    gc.callbacks.append(pauses.callback)

    async def emit(request: Request) -> Response:
        n = int(request.query_params["n"])
        ids = await asyncio.to_thread(store.save, conversation(n))
        hub.nudge()
        return JSONResponse({"cursor": ids[-1]})

    class RawSocket:  # an ASGI app, so it gets uvicorn's own `receive` (as the hub does)
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            websocket = WebSocket(scope, receive=receive, send=send)
            await websocket.accept()
            raw_sockets[websocket] = protocol_of(receive)
            try:
                while (await websocket.receive())["type"] != "websocket.disconnect":
                    pass
            finally:
                raw_sockets.pop(websocket, None)

    async def raw_send(request: Request) -> Response:
        payload = orjson.dumps(
            {"cursor": -int(request.query_params["n"]), "type": "message", "data": {}}
        )
        started = time.perf_counter()
        if request.query_params.get("direct"):
            wire = text_frame(payload)
            for protocol in list(raw_sockets.values()):
                protocol.transport.write(wire)  # uncompressed even with deflate, as the hub
        else:
            frame = payload.decode()
            for websocket in list(raw_sockets):
                with contextlib.suppress(WebSocketDisconnect):
                    await websocket.send_text(frame)
        return JSONResponse({"sent": len(raw_sockets), "took": time.perf_counter() - started})

    async def gc_control(request: Request) -> Response:
        action = request.query_params["do"]
        if action == "freeze":
            gc.collect()
            gc.freeze()
        elif action == "start":
            pauses.reset()
        return JSONResponse(pauses.report())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(hub.run(stop))
        yield
        stop.set()
        await task
        store.close()

    routes = [
        *hub.routes(),
        Route("/emit", emit, methods=["POST"]),
        Route("/raw", raw_send, methods=["POST"]),
        Route("/gc", gc_control, methods=["POST"]),
        WebSocketRoute("/raw", RawSocket()),
    ]
    uvicorn.run(
        Starlette(routes=routes, lifespan=lifespan),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        backlog=4096,
        ws_per_message_deflate=server_deflate,
    )


class GcPauses:
    """The server's garbage collections: how many per generation, and the longest pause."""

    def __init__(self) -> None:
        self.started = 0.0
        self.reset()

    def reset(self) -> None:
        self.counts = [0, 0, 0]
        self.longest = 0.0

    def callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        self.counts[info["generation"]] += 1
        self.longest = max(self.longest, time.perf_counter() - self.started)

    def report(self) -> dict[str, Any]:
        return {"collections": self.counts, "longest": self.longest}


def conversation(n: int) -> Conversation:
    return Conversation(
        customer_id=f"customer-{n}",
        channel="chat",
        queue="general",
        previous=None,
        source_event_id=f"bench-{n}-{time.time_ns()}",
        at=AT,
    )


# --------------------------------------------------------------------------- clients


class Client(asyncio.Protocol):
    """A websocket client that does only what the benchmark needs: the handshake, text frames
    in (each handed to `on_frame`), pongs out."""

    def __init__(self, request: bytes, on_frame: Callable[[bytes], None], deflate: bool) -> None:
        self.request = request
        self.on_frame = on_frame
        self.buffer = bytearray()
        self.open = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.inflate = zlib.decompressobj(-15) if deflate else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.open.done():
            self.open.set_exception(ConnectionError("closed during the handshake"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.open.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            if not head.startswith(b"HTTP/1.1 101"):
                self.open.set_exception(ConnectionError(head.split(b"\r\n")[0].decode()))
                return
            self.open.set_result(None)
        self._frames()

    def _frames(self) -> None:
        buffer = self.buffer
        while len(buffer) >= 2:
            first, length = buffer[0], buffer[1] & 0x7F
            start = 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length, start = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length, start = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < start + length:
                return
            payload = bytes(buffer[start : start + length])
            del buffer[: start + length]
            opcode = first & 0x0F
            if opcode == 1:
                if first & 0x40 and self.inflate is not None:  # RSV1: compressed
                    payload = self.inflate.decompress(payload + b"\x00\x00\xff\xff")
                self.on_frame(payload)
            elif opcode == 9 and self.transport is not None:  # ping: answer with a pong
                mask = os.urandom(4)
                masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + mask + masked)


def handshake(path: str, port: int, deflate: bool) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    extensions = "Sec-WebSocket-Extensions: permessage-deflate\r\n" if deflate else ""
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"{extensions}\r\n"
    ).encode()


class Round:
    """Counts the clients that got the frame with the awaited cursor."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.cursor: int | None = None
        self.got = 0
        self.done = asyncio.Event()
        self.last = 0.0

    def expect(self, cursor: int | None) -> None:
        self.cursor, self.got = cursor, 0
        self.done.clear()

    def on_frame(self, payload: bytes) -> None:
        cursor = orjson.loads(payload).get("cursor")
        if cursor is not None and cursor == self.cursor:
            self.got += 1
            if self.got == self.clients:
                self.last = time.monotonic()
                self.done.set()


async def connect_all(
    port: int, path: str, count: int, on_frame: Callable[[bytes], None], deflate: bool
) -> list[Client]:
    loop = asyncio.get_running_loop()
    clients: list[Client] = []
    for start in range(0, count, 100):  # a hundred handshakes at a time
        batch = []
        for _ in range(start, min(count, start + 100)):
            request = handshake(path, port, deflate)

            def factory(request: bytes = request) -> Client:
                return Client(request, on_frame, deflate)

            _, client = await loop.create_connection(factory, "127.0.0.1", port)
            batch.append(client)
        await asyncio.gather(*(c.open for c in batch))
        clients.extend(batch)
    return clients


async def post(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        return await reader.readexactly(length)
    finally:
        writer.close()
        await writer.wait_closed()


# --------------------------------------------------------------------------- the rounds


async def rounds(
    count: int, measure: Callable[[int], Awaitable[float]], round_: Round
) -> list[float]:
    times: list[float] = []
    for n in range(count):
        started = await measure(n)
        async with asyncio.timeout(10):
            await round_.done.wait()
        times.append(round_.last - started)
        await asyncio.sleep(0.02)  # let the clients' last frames settle between rounds
    return times


def summary(name: str, times: list[float]) -> str:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"{name:<44} p50 {statistics.median(ordered) * 1000:6.1f} ms   "
        f"p99 {p99 * 1000:6.1f} ms   max {ordered[-1] * 1000:6.1f} ms"
    )


async def wait_listening(port: int, proc: asyncio.subprocess.Process) -> None:
    for _ in range(300):
        if proc.returncode is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RuntimeError("the server did not start listening")


async def wait_ready(port: int) -> None:
    """The stream answers 503 until the hub has read the head of the log."""
    for _ in range(300):
        try:
            (client,) = await connect_all(port, PATH, 1, lambda payload: None, False)
        except ConnectionError:
            await asyncio.sleep(0.05)
            continue
        if client.transport is not None:
            client.transport.close()
        return
    raise RuntimeError("the stream did not get ready")


async def bench(args: argparse.Namespace) -> None:
    from infra.settings import load_settings
    from infra.store import open_event_store

    data_dir = tempfile.mkdtemp(prefix="bench-stream-")
    store = open_event_store(load_settings({"INBOX_DATA_DIR": data_dir}))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bench.stream", "serve", str(port), data_dir),
        "deflate" if args.server_deflate else "no-deflate",
        start_new_session=True,
    )
    load_before = os.getloadavg()
    try:
        await wait_listening(port, proc)
        await wait_ready(port)
        hub_round, raw_round = Round(args.clients), Round(args.clients)
        hub_clients = await connect_all(port, PATH, args.clients, hub_round.on_frame, args.deflate)
        raw_clients = await connect_all(
            port, "/raw", args.clients, raw_round.on_frame, args.deflate
        )

        async def nudged(n: int) -> float:
            started = time.monotonic()
            # the cursor is known only from the answer: count frames with any cursor > head
            hub_round.expect(store.max_notification_id() + 1)
            await post(port, f"/emit?n={n}")
            return started

        async def polled(n: int) -> float:
            hub_round.expect(store.max_notification_id() + 1)
            started = time.monotonic()
            await asyncio.to_thread(store.save, conversation(n))
            return started

        server_loop: dict[str, list[float]] = {"send": [], "direct": []}

        def raw(mode: str) -> Callable[[int], Awaitable[float]]:
            async def measure(n: int) -> float:
                raw_round.expect(-n - 1)
                started = time.monotonic()
                answer = await post(port, f"/raw?n={n + 1}" + ("&direct=1" * (mode == "direct")))
                server_loop[mode].append(orjson.loads(answer)["took"])
                return started

            return measure

        warm = 5
        await rounds(warm, raw("send"), raw_round)
        await rounds(warm, nudged, hub_round)
        if args.gc_freeze:
            await post(port, "/gc?do=freeze")
        await post(port, "/gc?do=start")
        raw_times = await rounds(args.rounds, raw("send"), raw_round)
        direct_times = await rounds(args.rounds, raw("direct"), raw_round)
        nudged_times = await rounds(args.rounds, nudged, hub_round)
        polled_times = await rounds(args.rounds, polled, hub_round)
        collected = orjson.loads(await post(port, "/gc?do=report"))
        for client in hub_clients + raw_clients:
            if client.transport is not None:
                client.transport.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
        store.close()
    load_after = os.getloadavg()
    compression = "permessage-deflate" if deflated(args) else "no compression"
    print(
        f"{args.clients:,} stream clients (supervisors), {args.rounds} rounds, one uvicorn "
        f"worker on uvloop, {compression}{', gc.freeze()' * args.gc_freeze}, "
        f"{os.cpu_count()} CPUs; time until the last client got the frame"
    )
    print(
        f"load average (1, 5, 15 min): before {fmt_load(load_before)}, after {fmt_load(load_after)}"
    )
    print(summary("raw limit, send loop (send_text per socket)", raw_times))
    print(summary("raw limit, direct writes (one frame, written)", direct_times))
    print(summary("stored in the server + nudge", nudged_times))
    print(summary("stored by another process (hub polls)", polled_times))
    for mode, label in (("send", "send loop"), ("direct", "direct writes")):
        took = sorted(server_loop[mode][-args.rounds :])
        print(
            f"  the server's own loop, {label}: p50 {statistics.median(took) * 1000:.1f} ms, "
            f"max {took[-1] * 1000:.1f} ms"
        )
    counts = collected["collections"]
    print(
        f"  server GC during the measured rounds: {counts[0]} / {counts[1]} / {counts[2]} "
        f"collections (gen 0 / 1 / 2), longest pause {collected['longest'] * 1000:.1f} ms"
    )
    print("target: every client within 200 ms")


def deflated(args: argparse.Namespace) -> bool:
    return bool(args.deflate and args.server_deflate)


def fmt_load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def raise_open_files_limit() -> None:
    """Two thousand sockets a side are more than the usual soft limit of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 8192:
        wanted = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    raise_open_files_limit()
    if argv[:1] == ["serve"]:
        serve(int(argv[1]), argv[2], argv[3] == "deflate")
        return
    parser = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument(
        "--deflate", action="store_true", help="the clients ask for permessage-deflate"
    )
    parser.add_argument(
        "--no-server-deflate",
        dest="server_deflate",
        action="store_false",
        help="serve with uvicorn's ws_per_message_deflate=False (the clients' ask is declined)",
    )
    parser.add_argument(
        "--gc-freeze", action="store_true", help="gc.freeze() in the server once connected"
    )
    args = parser.parse_args(argv)
    uvloop.run(bench(args))  # as the server: the clients' own cost stays small


if __name__ == "__main__":
    main()
