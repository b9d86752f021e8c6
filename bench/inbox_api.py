"""Inbox API benchmark: `GET /api/v1/conversations` latency with 100,000 open conversations and
200 concurrent keep-alive clients, beside the raw limits measured in the same run: the same
clients against `GET /healthz` on the same server (the HTTP floor) and the list query called
in-process, one at a time (the SQL and JSON-shaping floor).

    python -m bench.inbox_api [--conversations 100000] [--clients 200] [--seconds 20]
                              [--think 1.0] [--profile]

Two kinds of load, each printed under its own heading:
- paced (the target's load: 200 agents and supervisors working): each client waits a random
  think time (exponential, mean `--think` seconds) between its requests, so 200 clients offer
  about 200 / think requests a second and the latency is service time plus whatever queueing
  that rate causes;
- closed loop (saturation): each client sends its next request the moment the answer
  arrives, so throughput is the server's capacity and latency is queueing behind 199 others.

The inbox view is filled the fast way: contact events (one per distinct customer,
email:cN@example.com) through `Ingestor.apply_batch` in large batches, a quarter of the
conversations put in the "default" queue and a tenth assigned, then the inbox projection caught
up. The app is the real one (`build_http_app`, admin token from the settings) under one uvicorn
worker in its own process; the load generator is this process: keep-alive HTTP/1.1 connections
on raw asyncio streams, each with at most one request in flight, so it costs far less CPU than
the server it measures (the machine has two cores). Mixed queries: the default list,
status=open, queue=default, customer=email:..., and a following page by `next` cursor; then
the default list with agents' tokens (an agent's list is scoped), each client its own agent
(agent-0 .. agent-N: the first 50 have conversations assigned; all see the unassigned ones of
the "default" queue). In the closed loop, with N clients each keeping one request in flight,
mean latency = N / throughput (Little's law): at 200 clients, 20 ms needs 10,000 answers a
second from one process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import os
import pstats
import random
import signal
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Tracking

from inbox.agents import Directory, agent_profile
from inbox.contact import ContactEvent, CustomerRef, validate
from inbox.domain.time import iso
from inbox.ingest import Ingestor
from infra.broker import free_port
from infra.settings import Settings, load_settings
from infra.store import ContactEventRow, EventStore, open_event_store
from projections.db import ReadModelDB, open_read_models
from projections.inbox_view import InboxView, list_conversations
from projections.runner import ProjectionRunner
from projections.tracking import active_table

T0 = datetime(2026, 10, 1, 8, 0, tzinfo=UTC)
BATCH = 5_000
KINDS = ("default", "status=open", "queue=default", "customer", "next page")
WEIGHTS = (40, 20, 15, 15, 10)
# In-process only: a channel no conversation is in (the filter must not test every open row).
RARE_CHANNEL = "channel=messenger"


def _env(workdir: Path, token: str) -> dict[str, str]:
    return {"INBOX_DATA_DIR": str(workdir), "INBOX_ADMIN_TOKEN": token}


# --------------------------------------------------------------------------- the data


def ingest(store: EventStore, conversations: int) -> None:
    """One message each from `conversations` distinct customers, a second apart."""
    ingestor = Ingestor(store)
    now = T0 + timedelta(seconds=conversations + 60)
    for start in range(0, conversations, BATCH):
        batch = []
        for n in range(start, min(start + BATCH, conversations)):
            event = ContactEvent(
                event_id=f"bench-{n}",
                occurred_at=T0 + timedelta(seconds=n),
                channel="email",
                type="message.received",
                customer=CustomerRef(email=f"c{n}@example.com", name=f"Customer {n}"),
                payload={"text": f"Where is my order {n}?", "subject": "Order"},
            )
            row = ContactEventRow(event.event_id, "contact-events", 0, n)
            batch.append((validate(event, now=now), row))
        ingestor.apply_batch(batch, Tracking("contact-events:0", start + len(batch)))


def route_some(store: EventStore, db: ReadModelDB, conversations: int) -> int:
    """Puts every 4th conversation in the "default" queue and assigns every 10th (as routing
    would), so `queue=` and an agent's scope have something to tell apart."""
    with db.read() as tx:
        table = active_table(tx, "inbox", "inbox_conversations")
        assert table is not None
        tx.execute(f"SELECT id FROM {table} ORDER BY opened_at, id")
        ids = [row[0] for row in tx.fetchall()]
    at = T0 + timedelta(seconds=conversations + 1)
    changed = []
    for n, conv_id in enumerate(ids):
        if n % 4 and n % 10:
            continue
        conversation = store.get(UUID(conv_id))
        when = iso(at + timedelta(milliseconds=n))
        if n % 4 == 0:
            conversation.enter_queue("default", 0, reason="bench", actor="router", at=when)
        if n % 10 == 0:
            conversation.assign(f"agent-{n % 50}", actor="router", at=when)
        changed.append(conversation)
        if len(changed) >= 2_000:
            store.save(*changed)
            changed = []
    if changed:
        store.save(*changed)
    return len(ids)


def build(settings: Settings, conversations: int, agents: int) -> list[str]:
    """Fills the store and the inbox view; returns the tokens of `agents` agents."""
    store = open_event_store(settings)
    db = open_read_models(settings)
    try:
        started = time.perf_counter()
        ingest(store, conversations)
        ingested = time.perf_counter() - started
        runner = ProjectionRunner(store, db, [InboxView()])
        runner.run_until_caught_up()
        projected = time.perf_counter() - started - ingested
        rows = route_some(store, db, conversations)
        ProjectionRunner(store, db, [InboxView()]).run_until_caught_up()
        total = time.perf_counter() - started
        directory = Directory(store, admin_token=settings.admin_token)
        tokens = [
            directory.register(f"agent-{n}", agent_profile({"name": f"Agent {n}"}), actor="admin")
            for n in range(agents)
        ]
        print(
            f"  setup: {rows:,} conversations ingested in {ingested:.0f} s, projected in "
            f"{projected:.0f} s, queued/assigned and caught up again: {total:.0f} s in all"
        )
        return tokens
    finally:
        db.close()
        store.close()


# --------------------------------------------------------------------------- the queries


@dataclass
class Queries:
    conversations: int
    cursors: list[str]
    rng: random.Random = field(default_factory=lambda: random.Random(5))

    def params(self, kind: str) -> dict[str, str]:
        if kind == "default":
            return {"limit": "50"}
        if kind == "status=open":
            return {"status": "open", "limit": "50"}
        if kind == "queue=default":
            return {"queue": "default", "limit": "50"}
        if kind == RARE_CHANNEL:
            return {"channel": "messenger", "limit": "50"}
        if kind == "customer":
            return {"customer": f"email:c{self.rng.randrange(self.conversations)}@example.com"}
        return {"limit": "50", "cursor": self.rng.choice(self.cursors)}

    def pick(self) -> str:
        return self.rng.choices(KINDS, WEIGHTS)[0]


def cursors(db: ReadModelDB, pages: int = 20) -> list[str]:
    """The `next` cursors of the first pages of the default list."""
    found: list[str] = []
    cursor: str | None = None
    for _ in range(pages):
        page = list_conversations(db, limit=50, cursor=cursor)
        cursor = page["next"]
        if cursor is None:
            break
        found.append(cursor)
    return found


def in_process(
    db: ReadModelDB, queries: Queries, rounds: int, budget: float = 5.0
) -> dict[str, list[float]]:
    """Each query kind called directly, one at a time (`rounds` times, or fewer when they take
    longer than `budget` seconds): sorted seconds per kind."""
    times: dict[str, list[float]] = {}
    for kind in (*KINDS, RARE_CHANNEL):
        samples: list[float] = []
        until = time.perf_counter() + budget
        while len(samples) < rounds and (len(samples) < 10 or time.perf_counter() < until):
            params: dict[str, Any] = dict(queries.params(kind))
            if "limit" in params:
                params["limit"] = int(params["limit"])
            started = time.perf_counter()
            list_conversations(db, **params)
            samples.append(time.perf_counter() - started)
        times[kind] = sorted(samples)
    return times


# --------------------------------------------------------------------------- server process


def serve(port: int, workdir: str, token: str, profile_path: str) -> None:
    import uvicorn

    from infra.composition import build_http_app, build_parts, freeze_after_start

    parts = build_parts(load_settings(_env(Path(workdir), token)))
    app = build_http_app(parts)
    freeze_after_start()  # as `inbox serve` does once it has started
    profiler = cProfile.Profile() if profile_path else None
    if profiler is not None:
        # The event loop's thread only: the queries run in worker threads (timed in-process).
        profiler.enable()
    try:
        uvicorn.run(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            timeout_keep_alive=60,  # as `inbox serve` (infra/composition.py)
        )
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_path)
        parts.close()


# --------------------------------------------------------------------------- load generator


class Failed(RuntimeError):
    pass


@dataclass
class Run:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    reopened: int = 0  # connections the server closed while idle, opened again


def _request(path: str, params: dict[str, str], token: str | None, port: int) -> bytes:
    target = path + ("?" + urllib.parse.urlencode(params) if params else "")
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\r\n".encode()


Requests = Callable[[], tuple[str, bytes]]


class _Connection:
    """One keep-alive connection that, like a browser's, opens again when the server closed
    it while idle (uvicorn closes a connection idle for 5 s; paced clients pause that long)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.opened = 0

    async def ask(self, payload: bytes) -> bytes:
        """Sends one request; returns the response head (the body is read and dropped)."""
        for attempt in range(2):
            if self.streams is None or self.streams[0].at_eof():
                await self.close()
                self.streams = await asyncio.open_connection("127.0.0.1", self.port)
                self.opened += 1
            reader, writer = self.streams
            writer.write(payload)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial or attempt:
                    raise
                await self.close()  # closed by the server as we sent: once more, anew
                continue
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            return head
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self.streams is not None:
            writer = self.streams[1]
            self.streams = None
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _client(
    port: int,
    next_request: Requests,
    measure_from: float,
    until: float,
    run: Run,
    think: float | None,
    rng: random.Random,
) -> None:
    connection = _Connection(port)
    try:
        await connection.ask(_request("/healthz", {}, None, port))  # connected before the clock
        if think is not None:  # paced clients start spread out, not all at once
            await asyncio.sleep(rng.uniform(0, think))
        while (started := time.perf_counter()) < until:
            kind, payload = next_request()
            head = await connection.ask(payload)
            if started >= measure_from:
                run.latencies.setdefault(kind, []).append(time.perf_counter() - started)
                status = int(head[9:12])
                run.statuses[status] = run.statuses.get(status, 0) + 1
            if think is not None:
                pause = rng.expovariate(1 / think)
                await asyncio.sleep(min(pause, max(0.0, until - time.perf_counter())))
    finally:
        run.reopened += max(0, connection.opened - 1)
        await connection.close()


async def load(
    port: int,
    requests: Callable[[int], Requests],
    clients: int,
    warmup: float,
    seconds: float,
    think: float | None = None,
) -> Run:
    """`clients` keep-alive connections, client i asking `requests(i)()` each time; closed
    loop when `think` is None, else an exponential pause of mean `think` s between requests.
    Counted: the requests sent in the `seconds` after `warmup`, per second of that window."""
    run = Run(seconds=seconds)
    start = time.perf_counter()
    measure_from = start + warmup
    rng = random.Random(7)
    await asyncio.gather(
        *(
            _client(port, requests(i), measure_from, measure_from + seconds, run, think, rng)
            for i in range(clients)
        )
    )
    if set(run.statuses) != {200}:
        raise Failed(f"answers other than 200: {run.statuses}")
    for samples in run.latencies.values():
        samples.sort()
    return run


def _pct(latencies: Sequence[float], p: float) -> float:
    return latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000


def line(name: str, latencies: Sequence[float], seconds: float | None) -> str:
    rate = f"{len(latencies) / seconds:>7,.0f} req/s" if seconds else " " * 13
    return (
        f"    {name:<26} {len(latencies):>7,}  {rate}   p50 {_pct(latencies, 0.50):6.1f}   "
        f"p95 {_pct(latencies, 0.95):6.1f}   p99 {_pct(latencies, 0.99):6.1f}   "
        f"max {latencies[-1] * 1000:6.1f} ms"
    )


def report(title: str, run: Run, clients: int, *, closed: bool = True) -> None:
    everything = sorted(x for samples in run.latencies.values() for x in samples)
    rate = len(everything) / run.seconds
    why = (
        f"Little's law: mean latency {clients / rate * 1000:.1f} ms at this rate"
        if closed
        else "the rate is what the clients asked for, not the capacity"
    )
    print(f"  {title}: {clients} clients, {run.seconds:.0f} s, {rate:,.0f} req/s ({why})")
    if run.reopened:
        print(f"    ({run.reopened} connections closed by the server after 5 s idle, opened again)")
    if len(run.latencies) > 1:
        for kind in KINDS:
            if kind in run.latencies:
                print(line(kind, run.latencies[kind], run.seconds))
    print(line("all", everything, run.seconds))


async def _wait_listening(port: int, proc: asyncio.subprocess.Process) -> None:
    for _ in range(600):
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


def _load_average() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


async def bench(
    args: argparse.Namespace, workdir: Path, token: str, agents: list[str], queries: Queries
) -> None:
    port = free_port()
    profile_path = str(workdir / "server.prof") if args.profile else ""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.inbox_api", "serve", str(port), str(workdir), token,
        profile_path,
    )  # fmt: skip
    try:
        await _wait_listening(port, proc)
        health = _request("/healthz", {}, None, port)
        path = "/api/v1/conversations"
        agent_lists = [_request(path, {"limit": "50"}, agent, port) for agent in agents]

        def healthz(_: int) -> Requests:
            return lambda: ("healthz", health)

        def mixed(_: int) -> Requests:
            def next_request() -> tuple[str, bytes]:
                kind = queries.pick()
                return kind, _request(path, queries.params(kind), token, port)

            return next_request

        def agent(i: int) -> Requests:
            payload = agent_lists[i % len(agent_lists)]
            return lambda: ("default (agent token)", payload)

        clients, seconds, think = args.clients, args.seconds, args.think
        print(
            f"\n  PACED: {clients} clients working, each pausing a random think time "
            f"(exponential, mean {think:g} s) between requests: about {clients / think:,.0f} "
            f"req/s offered ({_load_average()})"
        )
        floor = await load(port, healthz, clients, 2, seconds / 2, think)
        report("paced, raw limit: GET /healthz", floor, clients, closed=False)
        run = await load(port, mixed, clients, 2, seconds, think)
        report("paced, GET /api/v1/conversations, admin token, mixed", run, clients, closed=False)
        scoped = await load(port, agent, clients, 2, seconds, think)
        report("paced, GET /api/v1/conversations, agent tokens", scoped, clients, closed=False)
        print(
            f"\n  CLOSED LOOP (saturation): {clients} clients, each sending its next request "
            f"the moment the answer arrives ({_load_average()})"
        )
        floor = await load(port, healthz, clients, 2, seconds / 2)
        report("closed loop, raw limit: GET /healthz", floor, clients)
        run = await load(port, mixed, clients, 3, seconds)
        report("closed loop, GET /api/v1/conversations, admin token, mixed", run, clients)
        scoped = await load(port, agent, clients, 2, seconds / 2)
        report("closed loop, GET /api/v1/conversations, agent tokens", scoped, clients)
        few = await load(port, mixed, args.few, 1, seconds / 4)
        report("closed loop, mixed, few clients (service time)", few, args.few)
        print(f"  ({_load_average()})")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            await proc.wait()
    if args.profile:
        out = io.StringIO()
        stats = pstats.Stats(profile_path, stream=out)
        stats.sort_stats("tottime").print_stats(25)
        print("  server event-loop thread, top 25 by own time:")
        print(out.getvalue())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        serve(int(argv[1]), argv[2], argv[3], argv[4])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.inbox_api", description=__doc__)
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--few", type=int, default=4, help="clients of the service-time run")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument(
        "--think", type=float, default=1.0, help="paced clients: mean seconds between requests"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the server's loop")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-inbox-api-"))
    token = "bench-admin-" + os.urandom(8).hex()
    settings = load_settings(_env(workdir, token))
    print(f"inbox API benchmark: {args.conversations:,} open conversations, SQLite in {workdir}")
    agents = build(settings, args.conversations, args.clients)
    db = open_read_models(settings)
    try:
        queries = Queries(args.conversations, cursors(db))
        direct = in_process(db, queries, 300)
    finally:
        db.close()
    print("  raw limit: list_conversations called in-process, one at a time (ms)")
    for kind in direct:
        print(line(kind, direct[kind], None))
    asyncio.run(bench(args, workdir, token, agents, queries))


if __name__ == "__main__":
    main()
