"""Metrics benchmark: rebuild the metrics read model from 1,000,000 stored events of mixed
contact-center traffic over 90 days, beside the raw rate of reading and decoding the same
notification log; then the KPI query for 90 days by hour, p50/p99 of 200 calls in-process.

    python -m bench.metrics [--events 1000000] [--agents 50] [--database-url URL]

The history is written through the domain aggregates (conversations with calls, messages,
replies, assignments, resolutions, reopens and CSAT; agents changing presence; callbacks),
in large batches, as bench/replay.py does.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from bench import fresh_settings
from inbox.domain.agent import Agent
from inbox.domain.callback import Callback
from inbox.domain.conversation import OPEN, RESOLVED, Conversation
from inbox.domain.errors import DomainError
from inbox.domain.queue import Queue
from inbox.domain.time import iso
from infra.store import EventStore, open_event_store
from projections.db import open_read_models
from projections.metrics import NAME, Metrics
from projections.metrics_query import metrics
from projections.replay import PROJECTIONS, rebuild
from projections.runner import decode, read_log

T0 = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday; 90 days later is past Europe's DST change
DAYS = 90
QUEUES = ("support", "billing", "sales", "tech")
DIGITAL = ("email", "sms", "whatsapp", "chat", "messenger", "instagram")
SLA = {
    "timezone": "Europe/Berlin",
    "hours": {d: ["08:00-18:00"] for d in ("mon", "tue", "wed", "thu", "fri")},
    "targets": {"0": {"first_response": "4h"}},
}


class _Writer:
    def __init__(self, store: EventStore, limit: int) -> None:
        self.store, self.limit = store, limit
        self.pending: list[Any] = []
        self.written = 0

    def add(self, *aggregates: Any) -> None:
        for aggregate in aggregates:
            self.pending.extend(aggregate.collect_events())
        if len(self.pending) >= 20_000:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.store.record(self.pending)
            self.written += len(self.pending)
            self.pending = []

    @property
    def full(self) -> bool:
        return self.written + len(self.pending) >= self.limit


def write_history(store: EventStore, events: int, agents: int, seed: int = 7) -> int:
    rng = random.Random(seed)
    out = _Writer(store, events)
    out.add(
        *(
            Queue(
                name=q,
                spec={"name": q, "sla": SLA if q == "billing" else None},
                actor="a",
                at=iso(T0),
            )
            for q in QUEUES
        )
    )
    team = [
        Agent.register(
            agent_id=f"agent-{i}",
            name=f"Agent {i}",
            role="agent",
            skills=[],
            languages=[],
            capacity={"voice": 1, "chat": 3, "email": 5},
            voice_to=None,
            token_hash="x",
            actor="admin",
            at=iso(T0),
        )
        for i in range(agents)
    ]
    out.add(*team)
    # conversations per day, so that the events fill the 90 days
    per_day = max(1, events // (DAYS * 9))
    n = 0
    for day in range(DAYS):
        base = T0 + timedelta(days=day)
        for agent in team:  # a shift: available, a break, offline
            start = base + timedelta(hours=8, minutes=rng.randrange(0, 60))
            agent.set_presence("available", reason="shift", actor="a", at=iso(start))
            agent.set_presence(
                "away", reason="break", actor="a", at=iso(start + timedelta(hours=4))
            )
            agent.set_presence(
                "available",
                reason="back",
                actor="a",
                at=iso(start + timedelta(hours=4, minutes=30)),
            )
            agent.set_presence(
                "offline", reason="done", actor="a", at=iso(start + timedelta(hours=8, minutes=30))
            )
        out.add(*team)
        for _ in range(per_day):
            if out.full:
                break
            n += 1
            opened = base + timedelta(seconds=rng.randrange(7 * 3600, 19 * 3600))
            conversation(out, rng, n, opened, [a.agent_id for a in team])
    out.flush()
    return out.written


def conversation(out: _Writer, rng: random.Random, n: int, now: datetime, team: list[str]) -> None:
    clock = [now]

    def step(low: int, high: int) -> str:
        clock[0] += timedelta(seconds=rng.randrange(low, high))
        return iso(clock[0])

    voice = rng.random() < 0.3
    channel = "voice" if voice else rng.choice(DIGITAL)
    queue = rng.choice(QUEUES)
    agent = rng.choice(team)
    conv = Conversation(
        customer_id=f"c{n}", channel=channel, queue=None, previous=None,
        source_event_id=f"o{n}", at=iso(now),
    )  # fmt: skip
    extra: list[Any] = []

    def activity(kind: str, at: str, **data: Any) -> None:
        conv.record_activity(kind, at=at, channel=channel, data=data, source_event_id=f"{n}{kind}")

    def message(at: str) -> None:
        conv.receive_message(
            automatic=False, at=at, channel=channel, via=None, message_id=None, text="hi",
            subject=None, html=None, attachments=[], thread_ref=None, in_reply_to=[],
            source_event_id=f"m{n}-{conv.version}",
        )  # fmt: skip

    if voice:
        sid = f"CA{n}"
        activity("call.started", iso(now), call_sid=sid)
        activity("ivr.selected", step(5, 30), call_sid=sid, choice="1")
        if rng.random() < 0.08:
            activity("call.ended", step(1, 20), call_sid=sid, ended_in="ivr")
            out.add(conv)
            return
        activity("call.queued", step(1, 3), call_sid=sid, queue=queue)
        conv.enter_queue(queue, 0, reason="ivr", actor="router", at=iso(clock[0]))
        roll = rng.random()
        if roll < 0.8:
            answered = step(1, 120)
            activity("call.answered", answered, call_sid=sid, queue=queue, agent=agent)
            conv.assign(agent, actor="router", at=answered)
            activity(
                "call.ended", step(60, 900), call_sid=sid, talk_seconds=rng.randrange(60, 600),
                hold_seconds=rng.randrange(0, 60), wrap_seconds=rng.randrange(0, 120),
            )  # fmt: skip
        elif roll < 0.92:
            activity("call.abandoned", step(10, 300), call_sid=sid, queue=queue)
            activity("call.ended", iso(clock[0]), call_sid=sid)
        else:
            at = step(30, 200)
            activity("callback.requested", at, call_sid=sid, queue=queue, number="+1")
            activity("call.abandoned", step(1, 3), call_sid=sid, queue=queue)
            callback = Callback.request(
                source_event_id=f"cb{n}", conversation_id=str(conv.id), call_sid=sid,
                number="+14155550100", queue=queue, requested_at=at, at=at,
            )  # fmt: skip
            callback.start_dialing(agent, max_attempts=1, at=step(300, 3600))
            callback.dialed(1, f"CB{n}", at=step(1, 5))
            if rng.random() < 0.8:
                callback.complete(1, f"CB{n}", at=step(5, 30))
            else:
                callback.attempt_failed(1, "busy", retry_at=None, at=step(5, 30))
                callback.give_up("busy", at=step(1, 5))
            extra.append(callback)
    else:
        if channel == "chat":
            activity("chat.started", iso(now))
        message(iso(now))
        conv.enter_queue(queue, 0, reason="rule", actor="router", at=step(0, 2))
        conv.assign(agent, actor="router", at=step(10, 1800))
        conv.queue_reply(f"r{n}", channel, "on it", actor=agent, at=step(30, 3600))
    for _ in range(rng.randrange(2, 6)):
        roll = rng.random()
        try:
            if roll < 0.35 and not voice:
                message(step(60, 7200))
            elif roll < 0.6 and not voice:
                conv.queue_reply(
                    f"r{n}-{conv.version}", channel, "ok", actor=agent, at=step(60, 3600)
                )
            elif roll < 0.65:
                conv.escalate("upset", actor=agent, at=step(10, 600))
            elif conv.status == OPEN:
                conv.resolve(actor=agent, at=step(60, 7200))
            elif conv.status == RESOLVED and roll < 0.8:
                conv.record_csat(
                    channel=channel, score=rng.randrange(1, 6), comment=None,
                    source_event_id=f"s{n}-{conv.version}", at=step(60, 600),
                )  # fmt: skip
        except DomainError:
            pass
    if conv.status != RESOLVED:
        conv.resolve(actor=agent, at=step(60, 7200))
    out.add(conv, *extra)


def raw_rates(store: EventStore) -> tuple[float, float]:
    """(read + JSON-decode every record, read + the runner's decode of what metrics handles)."""
    rates = []
    for mode in ("all", "handled"):
        start = time.perf_counter()
        position, count = 0, 0
        while records := read_log(store, position, 20_000):
            if mode == "all":
                for record in records:
                    orjson.loads(record[4])
            else:
                decode(records, Metrics.handles)
            count += len(records)
            position = records[-1][0]
        rates.append(count / (time.perf_counter() - start))
    return rates[0], rates[1]


def _children_cpu() -> float:
    """CPU seconds of the child processes that have ended (the rebuild's writer)."""
    times = os.times()
    return times.children_user + times.children_system


def load() -> str:
    """The 1-minute load average: the machine is shared, so every figure carries it."""
    return f"load {os.getloadavg()[0]:.2f}"


def query_latency(db: Any, runs: int, **filters: Any) -> tuple[float, float, float]:
    """p50 and p99 of `metrics()` for 90 days by hour (ms), and the JSON size (kB)."""
    times = []
    result: dict[str, Any] = {}
    for _ in range(runs):
        start = time.perf_counter()
        result = metrics(db, start=T0, end=T0 + timedelta(days=DAYS), bucket="hour", **filters)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    p99 = times[min(len(times) - 1, round(len(times) * 0.99) - 1)]
    return statistics.median(times), p99, len(orjson.dumps(result)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    settings = fresh_settings("metrics", args.database_url)
    store = open_event_store(settings)
    db = open_read_models(settings)
    started = time.perf_counter()
    written = write_history(store, args.events, args.agents)
    setup = time.perf_counter() - started
    raw_all, raw_handled = raw_rates(store)
    PROJECTIONS.setdefault(NAME, Metrics)
    cpu, children = time.process_time(), _children_cpu()
    result = rebuild(store, db, NAME, from_start=True)
    cpu, children = time.process_time() - cpu, _children_cpu() - children
    rate = result.events / result.seconds
    print(
        f"metrics benchmark: {written:,} stored events over {DAYS} days, {args.agents} agents, "
        f"{args.database_url or 'SQLite'} (history written in {setup:.0f} s)"
    )
    print(f"  raw limit: read + JSON-decode every event  {raw_all:>10,.0f} events/s")
    print(f"  raw limit: read + decode what metrics reads {raw_handled:>9,.0f} events/s")
    print(
        f"  rebuild metrics                            {rate:>10,.0f} events/s "
        f"({result.seconds:.1f} s, {rate / raw_handled:.0%} of the raw limit; "
        f"{cpu:.1f} s of CPU here and {children:.1f} s in "
        f"{'the writer process' if result.pipelined else 'no writer process'}; {load()})"
    )
    counted = []
    with db.read() as tx:
        for name in ("metrics_counts", "metrics_agents", "metrics_hourly", "metrics_agent_hours"):
            row = tx.execute(f"SELECT COUNT(*) FROM {name}_g{result.generation}").fetchone()
            counted.append(int(row[0]) if row else 0)
    print(
        f"  counter rows (all agents + by agent)       {sum(counted[:2]):>10,} "
        f"({counted[0]:,} + {counted[1]:,}; by hour {counted[2]:,} + {counted[3]:,})"
    )
    for label, filters in (
        ("all traffic, UTC", {}),
        ("all traffic, Europe/Berlin (DST inside)", {"tz": "Europe/Berlin"}),
        ("one channel", {"channel": "voice"}),
        ("one queue", {"queue": "billing"}),
        ("one agent", {"agent": "agent-7"}),
        ("one queue and one agent", {"queue": "billing", "agent": "agent-7"}),
    ):
        p50, p99, size = query_latency(db, args.queries, **filters)
        print(
            f"  metrics() 90 days by hour, {label:<40} p50 {p50:6.1f} ms  p99 {p99:6.1f} ms"
            f"  ({size:,.0f} kB of JSON; {load()})"
        )
    payload = metrics(db, start=T0, end=T0 + timedelta(days=DAYS), bucket="hour")
    start = time.perf_counter()
    for _ in range(20):
        orjson.dumps(payload)
    encoding = (time.perf_counter() - start) / 20 * 1000
    print(f"  + orjson encoding of that answer           {encoding:6.1f} ms")
    db.close()
    store.close()
    shutil.rmtree(settings.data_dir, ignore_errors=True)  # ~0.5 GB of store and read models


if __name__ == "__main__":
    main()
