"""Where ingest's CPU goes: each part of the path from a contact event to the inbox view, run
alone in one process on bench.ingest's workload, in CPU microseconds per contact event, beside
the raw limit (append the same records as raw rows to SQLite in the same batches) measured in
the same run.

    python -m bench.ingest_cpu [--events 100000] [--customers 10000]

No Kafka: the sum is less than the pipeline spends. The inbox view is what `bench.ingest`
waits for; the other read models (each run alone over the same log) share its process and its
core in `inbox serve`, so they are listed too, but not summed. Against the sum, the budget of
a target: N events/s on C cores leave at most C / N seconds of CPU per event.
"""

from __future__ import annotations

import argparse
import gc
import os
import sqlite3
import time
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import orjson
from eventsourcing.persistence import Tracking

from bench import fresh_settings
from bench.ingest import generate
from inbox.contact import ContactEvent, parse_contact_event
from inbox.domain.time import system_clock
from inbox.ingest import Ingestor
from inbox.worker import WorkerConfig
from infra.store import ContactEventRow, open_event_store
from projections.db import open_read_models
from projections.inbox_view import InboxView
from projections.replay import PROJECTIONS
from projections.runner import ProjectionRunner

PARTITIONS = 8
POLL = WorkerConfig.max_records  # records per poll, as the worker takes them
PROJECTION_BATCH = 10_000  # as the live runner reads when behind


def cpu(work: Callable[[], object]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def raw_append(records: list[tuple[bytes, bytes]], path: Path) -> None:
    """Decode the JSON and append raw rows, a poll at a time: what any ingest must do."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE raw (id TEXT PRIMARY KEY, key TEXT, state BLOB)")
    for start in range(0, len(records), POLL):
        rows = [
            (orjson.loads(value)["event_id"], key.decode(), value)
            for key, value in records[start : start + POLL]
        ]
        db.execute("BEGIN")
        db.executemany("INSERT INTO raw VALUES (?,?,?)", rows)
        db.execute("COMMIT")
    db.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--target", type=int, default=20_000, help="events/s")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    records = generate(args.events, args.customers)
    settings = fresh_settings("ingest-cpu", None)
    store = open_event_store(settings)
    read_models = open_read_models(settings)

    raw = cpu(lambda: raw_append(records, settings.data_dir / "raw.db"))

    parsed: list[tuple[int, int, ContactEvent]] = []

    def parse() -> None:
        now = system_clock()
        for offset, (key, value) in enumerate(records):
            event = parse_contact_event(value, now=now)
            parsed.append((zlib.crc32(key) % PARTITIONS, offset, event))

    parsing = cpu(parse)

    polls = []
    for start in range(0, len(parsed), POLL):
        parts: dict[int, list[tuple[ContactEvent, ContactEventRow]]] = {}
        for partition, offset, event in parsed[start : start + POLL]:
            row = ContactEventRow(event.event_id, "contact-events", partition, offset)
            parts.setdefault(partition, []).append((event, row))
        polls.append(
            [
                (Tracking(f"contact-events:{p}", rows[-1][1].offset + 1), rows)
                for p, rows in sorted(parts.items())
            ]
        )
    ingestor = Ingestor(store)

    def apply() -> None:
        for poll in polls:
            ingestor.apply_poll(poll)

    thresholds = gc.get_threshold()
    if WorkerConfig.gc_threshold is not None:
        gc.set_threshold(WorkerConfig.gc_threshold, *thresholds[1:])  # as the worker does
    applying = cpu(apply)
    gc.set_threshold(*thresholds)

    runner = ProjectionRunner(store, read_models, [InboxView()])
    projecting = cpu(lambda: runner.run_until_caught_up(PROJECTION_BATCH))
    domain_events = store.max_notification_id()
    others = {
        name: cpu(
            partial(
                ProjectionRunner(store, read_models, [make()]).run_until_caught_up,
                PROJECTION_BATCH,
            )
        )
        for name, make in PROJECTIONS.items()
        if name != InboxView.name
    }

    n = args.events
    budget = args.cores / args.target * 1e6
    parts_us = {
        "parse the contact event": parsing / n * 1e6,
        "worker: decide, map, store (one tx a poll)": applying / n * 1e6,
        "inbox view: read, fold, upsert (batches of 10,000)": projecting / n * 1e6,
    }
    total = sum(parts_us.values())
    print(
        f"ingest CPU: {n:,} contact events, {args.customers:,} customers, "
        f"{domain_events:,} domain events, SQLite, in one process"
    )
    for name, us in parts_us.items():
        print(f"  {name:<52} {us:>7.1f} us/event")
    print(f"  {'sum of the parts':<52} {total:>7.1f} us/event")
    print(
        f"  {'raw limit: decode + append raw rows':<52} {raw / n * 1e6:>7.1f} us/event (same run)"
    )
    print(
        f"  budget for {args.target:,} events/s on {args.cores} cores: {budget:.1f} us/event; "
        f"the parts alone allow at most {args.cores / total * 1e6:,.0f} events/s"
    )
    print("  the other read models of `inbox serve`, each alone (not in the sum):")
    for name, seconds in others.items():
        print(f"    {name:<50} {seconds / n * 1e6:>7.1f} us/event")
    print(f"    {'all of them':<50} {sum(others.values()) / n * 1e6:>7.1f} us/event")
    print(
        "  load average (1, 5, 15 min) at the end: {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())
    )


if __name__ == "__main__":
    main()
