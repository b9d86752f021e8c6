"""Inbox API benchmark: `GET /api/v1/conversations` latency with 100,000 open conversations and
200 concurrent keep-alive clients, beside the raw limits measured in the same run: the same
clients against `GET /healthz` on the same server (the HTTP floor) and the list query called
in-process, one at a time (the SQL and JSON-shaping floor).

    python -m bench.inbox_api [--conversations 100000] [--clients 200] [--seconds 20]
                              [--profile]

The inbox view is filled the fast way: contact events (one per distinct customer,
email:cN@example.com) through `Ingestor.apply_batch` in large batches, a quarter of the
conversations put in the "default" queue and a tenth assigned, then the inbox projection caught
up. The app is the real one (`build_http_app`, admin token from the settings) under one uvicorn
worker in its own process; the load generator is this process: keep-alive HTTP/1.1 connections
on raw asyncio streams, each with one request in flight, so it costs far less CPU than the
server it measures (the machine has two cores). Mixed queries: the default list, status=open,
queue=default, customer=email:..., and a following page by `next` cursor; then a short run of
the default list with an agent's token (an agent's list is scoped). With N clients each
keeping one request in flight, mean latency = N / throughput (Little's law): at 200 clients,
20 ms needs 10,000 answers a second from one process.
"""

from __future__ import annotations

import argparse
import asyncio
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


def build(settings: Settings, conversations: int) -> str:
    """Fills the store and the inbox view; returns an agent's token."""
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
        token = Directory(store, admin_token=settings.admin_token).register(
            "bench-agent", agent_profile({"name": "Bench Agent"}), actor="admin"
        )
        print(
            f"  setup: {rows:,} conversations ingested in {ingested:.0f} s, projected in "
            f"{projected:.0f} s, queued/assigned and caught up again: {total:.0f} s in all"
        )
        return token
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
    for kind in KINDS:
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

    from infra.composition import build_http_app, build_parts

    parts = build_parts(load_settings(_env(Path(workdir), token)))
    app = build_http_app(parts)
    profiler = cProfile.Profile() if profile_path else None
    if profiler is not None:
        # The event loop's thread only: the queries run in worker threads (timed in-process).
        profiler.enable()
    try:
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
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


def _request(path: str, params: dict[str, str], token: str | None, port: int) -> bytes:
    target = path + ("?" + urllib.parse.urlencode(params) if params else "")
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\r\n".encode()


async def _client(
    port: int,
    next_request: Callable[[], tuple[str, bytes]],
    measure_from: float,
    until: float,
    run: Run,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while (started := time.perf_counter()) < until:
            kind, payload = next_request()
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if started >= measure_from:
                run.latencies.setdefault(kind, []).append(time.perf_counter() - started)
                status = int(head[9:12])
                run.statuses[status] = run.statuses.get(status, 0) + 1
    finally:
        writer.close()
        await writer.wait_closed()


async def load(
    port: int,
    next_request: Callable[[], tuple[str, bytes]],
    clients: int,
    warmup: float,
    seconds: float,
) -> Run:
    run = Run()
    start = time.perf_counter()
    measure_from = start + warmup
    await asyncio.gather(
        *(
            _client(port, next_request, measure_from, measure_from + seconds, run)
            for _ in range(clients)
        )
    )
    run.seconds = time.perf_counter() - measure_from
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


def report(title: str, run: Run, clients: int) -> None:
    everything = sorted(x for samples in run.latencies.values() for x in samples)
    rate = len(everything) / run.seconds
    print(
        f"  {title}: {clients} clients, {run.seconds:.0f} s, {rate:,.0f} req/s "
        f"(Little's law: mean latency {clients / rate * 1000:.1f} ms at this rate)"
    )
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


async def bench(
    args: argparse.Namespace, workdir: Path, token: str, agent: str, queries: Queries
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

        def healthz() -> tuple[str, bytes]:
            return "healthz", health

        def mixed() -> tuple[str, bytes]:
            kind = queries.pick()
            return kind, _request(path, queries.params(kind), token, port)

        agent_list = _request(path, {"limit": "50"}, agent, port)

        def agents() -> tuple[str, bytes]:
            return "default (agent token)", agent_list

        clients, seconds = args.clients, args.seconds
        floor = await load(port, healthz, clients, 2, seconds / 2)
        report("raw limit: GET /healthz on the same server", floor, clients)
        run = await load(port, mixed, clients, 3, seconds)
        report("GET /api/v1/conversations, admin token, mixed", run, clients)
        scoped = await load(port, agents, clients, 2, seconds / 2)
        report("GET /api/v1/conversations, agent token", scoped, clients)
        few = await load(port, mixed, args.few, 1, seconds / 4)
        report("the mixed queries again (service time, little queueing)", few, args.few)
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
    parser.add_argument("--profile", action="store_true", help="cProfile the server's loop")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-inbox-api-"))
    token = "bench-admin-" + os.urandom(8).hex()
    settings = load_settings(_env(workdir, token))
    print(f"inbox API benchmark: {args.conversations:,} open conversations, SQLite in {workdir}")
    agent = build(settings, args.conversations)
    db = open_read_models(settings)
    try:
        queries = Queries(args.conversations, cursors(db))
        direct = in_process(db, queries, 300)
    finally:
        db.close()
    print("  raw limit: list_conversations called in-process, one at a time (ms)")
    for kind in KINDS:
        print(line(kind, direct[kind], None))
    asyncio.run(bench(args, workdir, token, agent, queries))


if __name__ == "__main__":
    main()
