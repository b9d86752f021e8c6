"""Ingest benchmark: 100,000 contact events for 10,000 customers across channels, from the
first consumed record to the last one visible in the inbox view, beside the raw limit measured
in the same run (consume the same topic, decode the JSON, append raw rows to SQLite in
batches).

    python -m bench.ingest [--events 100000] [--customers 10000] [--database-url URL]

The pipeline runs as it is deployed: `inbox worker` and `inbox serve` (projections) as two
processes, against the embedded broker (or INBOX_KAFKA_BOOTSTRAP).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

from bench import app_env, kafka
from infra.kafka import ensure_topics, make_consumer, make_producer
from infra.settings import load_settings
from infra.store import open_event_store
from projections.db import open_read_models
from projections.tracking import positions

T0 = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


def generate(events: int, customers: int, seed: int = 7) -> list[tuple[bytes, bytes]]:
    """(key, value) records: each customer has a phone, an email and a chat visitor id, and
    some events carry two identities, so the worker unifies customers across channels."""
    rng = random.Random(seed)
    records: list[tuple[bytes, bytes]] = []
    for n in range(events):
        c = rng.randrange(customers)
        who: dict[str, Any]
        phone, email, visitor = f"+1415{c:07d}", f"customer{c}@example.org", f"v{c:06d}"
        roll = rng.random()
        payload: dict[str, Any] = {"text": f"message {n} about order {rng.randrange(10_000)}"}
        kind = "message.received"
        if roll < 0.25:
            channel, who, key = "sms", {"phone": phone}, f"phone:{phone}"
        elif roll < 0.45:
            channel, who, key = "whatsapp", {"phone": phone}, f"phone:{phone}"
        elif roll < 0.70:
            channel, key = "email", f"email:{email}"
            who = {"email": email, "phone": phone} if rng.random() < 0.2 else {"email": email}
            payload["subject"] = "Order question"
        elif roll < 0.85:
            channel, key = "chat", f"visitor:{visitor}"
            who = (
                {"visitor": visitor, "email": email} if rng.random() < 0.3 else {"visitor": visitor}
            )
        elif roll < 0.95:
            channel, who, key, kind = "voice", {"phone": phone}, f"phone:{phone}", "call.started"
            payload = {"call_sid": f"CA{n:032d}", "to": "+15005550006"}
        else:
            channel, who, key = (
                "messenger",
                {"social": {"network": "messenger", "id": f"{c}"}},
                f"messenger:{c}",
            )
        event = {
            "schema": "contact-event/1",
            "event_id": f"bench-{n}",
            "occurred_at": (T0 + timedelta(seconds=n)).isoformat(),
            "channel": channel,
            "type": kind,
            "customer": who,
            "thread": {},
            "payload": payload,
        }
        records.append((key.encode(), orjson.dumps(event)))
    return records


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> float:
    producer = make_producer(bootstrap, idempotence=False)
    await producer.start()
    start = time.perf_counter()
    try:
        futures = [await producer.send(topic, value=v, key=k) for k, v in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(records) / (time.perf_counter() - start)


async def raw_limit(bootstrap: str, topic: str, total: int, db_path: Path) -> float:
    """Consume + JSON decode + batched SQLite append: the ceiling of any ingest here."""
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE raw (id TEXT PRIMARY KEY, key TEXT, state BLOB)")
    consumer: AIOKafkaConsumer = make_consumer(bootstrap, f"raw-{uuid.uuid4().hex}", topic)
    seen = 0
    start: float | None = None
    async with consumer:
        while seen < total:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            if start is None and batches:
                start = time.perf_counter()
            for records in batches.values():
                rows = []
                for r in records:
                    event = orjson.loads(r.value)
                    rows.append((event["event_id"], r.key.decode(), r.value))
                db.execute("BEGIN")
                db.executemany("INSERT INTO raw VALUES (?,?,?)", rows)
                db.execute("COMMIT")
                seen += len(rows)
    assert start is not None
    rate = total / (time.perf_counter() - start)
    db.close()
    return rate


def _assigned_at(log: Path) -> float | None:
    """When the worker got its partitions: its first fetch follows at once."""
    match = re.search(r"^(\S+ \S+) inbox\.worker assigned", log.read_text(), re.M)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU time a process has used so far."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pipeline(
    bootstrap: str,
    topic: str,
    total: int,
    workdir: Path,
    database_url: str | None,
    broker_pid: int | None,
) -> dict[str, float]:
    env = app_env(
        workdir, bootstrap, topic, **({"INBOX_DATABASE_URL": database_url} if database_url else {})
    )
    settings = load_settings(env)
    store = open_event_store(settings)
    read_models = open_read_models(settings)
    log = workdir / "worker.log"
    python = [sys.executable, "-m", "inbox.cli"]
    with log.open("ab") as out:
        serve = subprocess.Popen([*python, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=out)
        time.sleep(1.0)  # projections idle and waiting before the first event arrives
        worker = subprocess.Popen(
            [*python, "--log-level", "INFO", "worker"],
            env=env,
            stdout=out,
            stderr=out,
        )
    broker_cpu = _cpu_seconds(broker_pid)
    try:
        while (started := _assigned_at(log)) is None:
            if worker.poll() is not None:
                raise RuntimeError(log.read_text())
            time.sleep(0.01)
        while store.ingest.count_contact_events() < total:
            time.sleep(0.01)
        stored = time.time()
        head = store.max_notification_id()
        while positions(read_models).get("inbox", 0) < head:
            time.sleep(0.005)
        finished = time.time()
        rss = _peak_rss_mb(worker.pid)
        cpu = {
            "worker_cpu": _cpu_seconds(worker.pid),
            "serve_cpu": _cpu_seconds(serve.pid),
            "broker_cpu": _cpu_seconds(broker_pid) - broker_cpu,
        }
    finally:
        for process in (worker, serve):
            process.send_signal(signal.SIGTERM)
        for process in (worker, serve):
            process.wait(30)
    elapsed = finished - started
    return {
        "rate": total / elapsed,
        "seconds": elapsed,
        "stored_rate": total / (stored - started),
        "projection_lag": finished - stored,
        "domain_events": float(head),
        "worker_rss_mb": rss,
        **cpu,
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    bootstrap, broker = kafka(workdir)
    try:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        await ensure_topics(bootstrap, {topic: args.partitions, f"{topic}.dlq": 1})
        records = generate(args.events, args.customers)
        produced = await produce(bootstrap, topic, records)
        raw = await raw_limit(bootstrap, topic, args.events, workdir / "raw.db")
        result = await asyncio.to_thread(
            pipeline,
            bootstrap,
            topic,
            args.events,
            workdir,
            args.database_url,
            None if broker is None else broker.pid,
        )
    finally:
        if broker is not None:
            broker.stop()
    store = args.database_url or "SQLite"
    print(
        f"ingest benchmark: {args.events:,} contact events, {args.customers:,} customers, "
        f"{args.partitions} partitions, {store}, {os.cpu_count()} cores"
    )
    print(f"  producer (setup)                     {produced:>10,.0f} events/s")
    print(f"  raw limit: consume+decode+append     {raw:>10,.0f} events/s")
    print(
        f"  pipeline: first consumed -> in inbox {result['rate']:>10,.0f} events/s "
        f"({result['seconds']:.1f} s, {result['domain_events']:,.0f} domain events, "
        f"{result['rate'] / raw:.0%} of the raw limit)"
    )
    print(f"  of which the worker alone: all stored {result['stored_rate']:>10,.0f} events/s")
    # When the projections (`inbox serve`, every read model in one runner) are the slower
    # part, the pipeline figure is theirs: this shows by how much they trailed the worker.
    print(f"  inbox view caught up after the last store {result['projection_lag']:>6.1f} s later")
    # Where the two cores went (the serve process idled for a second before the worker began).
    print(
        "  CPU seconds: worker {worker_cpu:.1f}, serve (projections) {serve_cpu:.1f}, "
        "broker {broker_cpu:.1f}".format(**result)
    )
    print(f"  worker peak resident memory          {result['worker_rss_mb']:>10,.0f} MB")
    print(
        "  load average (1, 5, 15 min) at the end: {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())
    )


if __name__ == "__main__":
    asyncio.run(main())
