"""Live stream fan-out benchmark: how long until a stored change reached all of 1,000 connected
stream clients, beside the raw limit (the same fan-out of a pre-serialised frame to 1,000
sockets of the same server, without the hub).

    python -m bench.stream [--clients 1000] [--rounds 50] [--deflate]

The server runs in its own process (uvicorn on uvloop, the websocket implementation `inbox
serve` gets), with a `StreamHub` on a SQLite event store; every client is a supervisor, so all
1,000 get every frame. The clients are this process: minimal websocket clients on asyncio
protocols (a handshake, then frames parsed by hand), so they cost far less CPU than the server.
Each round measures from just before the change is stored until the last client got its frame:

- nudged: the server stores one event (as an API command does, in a thread) and nudges the hub;
  the request to do so is in the figure;
- polled: this process stores the event in the same SQLite file; the hub finds it by polling
  (every 20 ms), as it finds what another process (the ingest worker) stored;
- raw limit: the server sends one pre-serialised frame to 1,000 plain websocket sockets in a loop.

`--deflate`: the clients ask for permessage-deflate, as browsers and the `websockets` library do;
uvicorn then compresses every frame once per socket.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson

from inbox.domain.conversation import Conversation
from infra.broker import free_port

AT = "2026-11-27T09:00:00.000000Z"


# --------------------------------------------------------------------------- server process


def serve(port: int, data_dir: str) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    from inbox.access import Principal
    from inbox.stream import StreamHub
    from infra.settings import load_settings
    from infra.store import open_event_store

    store = open_event_store(load_settings({"INBOX_DATA_DIR": data_dir}))

    async def authenticate(token: str) -> Principal | None:
        return Principal(token, "supervisor", frozenset())

    hub = StreamHub(
        store, authenticate=authenticate, queue_skill=lambda q: None, lookup=lambda c: None
    )
    raw_sockets: set[WebSocket] = set()

    async def emit(request: Request) -> Response:
        n = int(request.query_params["n"])
        ids = await asyncio.to_thread(store.save, conversation(n))
        hub.nudge()
        return JSONResponse({"cursor": ids[-1]})

    async def raw_socket(websocket: WebSocket) -> None:
        await websocket.accept()
        raw_sockets.add(websocket)
        try:
            while (await websocket.receive())["type"] != "websocket.disconnect":
                pass
        finally:
            raw_sockets.discard(websocket)

    async def raw_send(request: Request) -> Response:
        frame = orjson.dumps(
            {"cursor": -int(request.query_params["n"]), "type": "message", "data": {}}
        ).decode()
        for websocket in list(raw_sockets):
            with contextlib.suppress(WebSocketDisconnect):
                await websocket.send_text(frame)
        return JSONResponse({"sent": len(raw_sockets)})

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
        WebSocketRoute("/raw", raw_socket),
    ]
    uvicorn.run(
        Starlette(routes=routes, lifespan=lifespan),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        backlog=4096,
    )


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
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

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


async def bench(args: argparse.Namespace) -> None:
    from infra.settings import load_settings
    from infra.store import open_event_store

    data_dir = tempfile.mkdtemp(prefix="bench-stream-")
    store = open_event_store(load_settings({"INBOX_DATA_DIR": data_dir}))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.stream", "serve", str(port), data_dir, start_new_session=True
    )
    try:
        await wait_listening(port, proc)
        hub_round, raw_round = Round(args.clients), Round(args.clients)
        hub_clients = await connect_all(
            port, "/api/v1/stream?token=sue", args.clients, hub_round.on_frame, args.deflate
        )
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

        async def raw(n: int) -> float:
            raw_round.expect(-n - 1)
            started = time.monotonic()
            await post(port, f"/raw?n={n + 1}")
            return started

        warm = 5
        await rounds(warm, raw, raw_round)
        await rounds(warm, nudged, hub_round)
        raw_times = await rounds(args.rounds, raw, raw_round)
        nudged_times = await rounds(args.rounds, nudged, hub_round)
        polled_times = await rounds(args.rounds, polled, hub_round)
        for client in hub_clients + raw_clients:
            if client.transport is not None:
                client.transport.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
        store.close()
    compression = "permessage-deflate" if args.deflate else "no compression"
    print(
        f"{args.clients:,} stream clients (supervisors), {args.rounds} rounds, one uvicorn "
        f"worker on uvloop, {compression}, {os.cpu_count()} CPUs; time until the last client "
        "got the frame"
    )
    print(summary("raw limit (pre-serialised frame, plain loop)", raw_times))
    print(summary("stored in the server + nudge", nudged_times))
    print(summary("stored by another process (hub polls)", polled_times))
    print("target: every client within 200 ms")


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
        serve(int(argv[1]), argv[2])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--deflate", action="store_true")
    args = parser.parse_args(argv)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
