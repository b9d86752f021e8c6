"""Replay benchmark: rebuild the inbox view (and the timeline) from 1,000,000 stored events,
beside the raw rate of reading and decoding the same notification log in the same run.

    python -m bench.replay [--events 1000000] [--customers 20000] [--database-url URL]

The history is written through the domain aggregates themselves (customers, identity claims,
conversations with messages in and out, notes, assignments, resolutions and reopens), in
large batches, so it takes a minute rather than going through Kafka.
"""

from __future__ import annotations

import argparse
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from bench import fresh_settings
from inbox.domain.conversation import OPEN, RESOLVED, Conversation
from inbox.domain.customer import Customer, IdentityClaim
from inbox.domain.time import iso
from infra.store import EventStore, open_event_store
from projections.db import open_read_models
from projections.replay import rebuild
from projections.runner import read_log

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def write_history(store: EventStore, events: int, customers: int, seed: int = 11) -> int:
    rng = random.Random(seed)
    per_customer = max(5, events // customers)
    pending: list[Any] = []
    written = 0

    def flush() -> None:
        nonlocal written, pending
        store.record(pending)
        written += len(pending)
        pending = []

    for c in range(customers):
        if written + len(pending) >= events:
            break
        at = T0 + timedelta(minutes=c)
        keys = [f"phone:+1415{c:07d}", f"email:customer{c}@example.org"]
        customer = Customer(identities=keys, name=f"Customer {c}", at=iso(at))
        claims = [IdentityClaim(key=k, customer_id=str(customer.id), at=iso(at)) for k in keys]
        conversation = Conversation(
            customer_id=str(customer.id),
            channel="sms",
            queue="support",
            previous=None,
            source_event_id=f"open-{c}",
            at=iso(at),
        )
        customer.start_conversation(conversation.id, iso(at))
        budget = per_customer - 5
        n = 0
        while budget > 0:
            n += 1
            at += timedelta(minutes=rng.randrange(1, 90))
            roll = rng.random()
            channel = rng.choice(("sms", "whatsapp", "email", "chat"))
            if roll < 0.55 or conversation.status == RESOLVED:
                conversation.receive_message(
                    channel=channel,
                    via=None,
                    message_id=f"m-{c}-{n}",
                    text=f"message {n} from {c}",
                    subject=None,
                    html=None,
                    attachments=[],
                    thread_ref=None,
                    in_reply_to=[],
                    automatic=False,
                    source_event_id=f"ev-{c}-{n}",
                    at=iso(at),
                )
            elif roll < 0.85:
                conversation.queue_reply(
                    f"r-{c}-{n}", channel, "on it", actor="agent-1", at=iso(at)
                )
            elif roll < 0.9:
                conversation.add_note("checked the order", actor="agent-1", at=iso(at))
            elif roll < 0.95 and conversation.status == OPEN:
                conversation.resolve(actor="agent-1", at=iso(at))
            else:
                agent = f"agent-{rng.randrange(50)}"
                if agent != conversation.assignee:
                    conversation.assign(agent, actor="router", at=iso(at))
            budget = per_customer - 5 - (conversation.version - 1)
        for aggregate in (customer, *claims, conversation):
            pending.extend(aggregate.collect_events())
        if len(pending) >= 20_000:
            flush()
    if pending:
        flush()
    return written


def raw_read_rate(store: EventStore) -> float:
    start = time.perf_counter()
    position, count = 0, 0
    while records := read_log(store, position, 20_000):
        for record in records:
            orjson.loads(record[4])
        count += len(records)
        position = records[-1][0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    settings = fresh_settings("replay", args.database_url)
    store = open_event_store(settings)
    read_models = open_read_models(settings)
    started = time.perf_counter()
    written = write_history(store, args.events, args.customers)
    setup = time.perf_counter() - started
    raw = raw_read_rate(store)
    results = {
        name: rebuild(store, read_models, name, from_start=True) for name in ("inbox", "timeline")
    }
    print(
        f"replay benchmark: {written:,} stored events, {args.customers:,} customers, "
        f"{args.database_url or 'SQLite'} (history written in {setup:.0f} s)"
    )
    print(f"  raw limit: read + decode the log     {raw:>10,.0f} events/s")
    for name, result in results.items():
        rate = result.events / result.seconds
        print(
            f"  rebuild {name:<28} {rate:>10,.0f} events/s ({result.seconds:.1f} s, "
            f"{rate / raw:.0%} of the raw limit)"
        )
    read_models.close()
    store.close()


if __name__ == "__main__":
    main()
