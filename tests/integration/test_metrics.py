"""The metrics read model against real SQLite and PostgreSQL: fed one event at a time it equals
the one rebuilt from the first event, row for row; the roll-ups add up; the query's buckets
follow the time zone (DST days of 23 and 25 hours, a +05:45 zone) and its edges."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from inbox.domain.callback import Callback
from inbox.domain.conversation import Conversation
from inbox.domain.errors import DomainError
from inbox.domain.queue import Queue
from inbox.domain.time import iso
from projections.base import table
from projections.db import ReadModelDB
from projections.inbox_view import QueryError
from projections.metrics import (
    AGENT_HOURS,
    ALL,
    CHANNELS,
    COLUMNS,
    COUNTS,
    HOURLY,
    NAME,
    STATE,
    Metrics,
)
from projections.metrics import AGENTS as AGENT_ROWS
from projections.metrics_query import counters, kpis, metrics
from projections.replay import PROJECTIONS, rebuild
from projections.runner import ProjectionRunner
from projections.tracking import active_generation
from tests.integration.test_metrics_day import Day

T0 = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)  # Berlin moves its clocks on the 29th
BERLIN_SLA = {
    "timezone": "Europe/Berlin",
    "hours": {d: ["08:00-18:00"] for d in ("mon", "tue", "wed", "thu", "fri", "sat")},
    "targets": {"0": {"first_response": "2h"}},
}
AGENTS = ("ann", "bob", "cyd")
QUEUES = ("support", "billing")  # every agent row has one of them here


def traffic(day: Day, seed: int, conversations: int = 40) -> None:
    """Random but valid traffic over two days: every channel, calls with every outcome,
    callbacks, presence changes, assignments, transfers, escalations, reopens, CSAT."""
    rng = random.Random(seed)
    day.save(
        Queue(name="support", spec={"name": "support"}, actor="admin", at=iso(T0)),
        Queue(
            name="billing", spec={"name": "billing", "sla": BERLIN_SLA}, actor="admin", at=iso(T0)
        ),
    )
    agents = {a: day.agent(a, iso(T0)) for a in AGENTS}
    for n in range(conversations):
        now = T0 + timedelta(minutes=rng.randrange(0, 2 * 24 * 60))

        def step(low: int = 5, high: int = 900) -> str:
            nonlocal now
            now += timedelta(seconds=rng.randrange(low, high))
            return iso(now)

        agent = agents[rng.choice(AGENTS)]
        if rng.random() < 0.5:
            day.presence(agent, rng.choice(("available", "away", "offline")), iso(now))
        channel = rng.choice(CHANNELS)
        conv = day.open(f"x{n}", channel, iso(now))
        queue = rng.choice(("support", "billing"))
        pieces: list[Any] = [conv]
        if channel == "voice":
            pieces += call(day, rng, conv, n, queue, step)
        else:
            if channel == "chat":
                day.activity(conv, "chat.started", iso(now))
            day.message(conv, channel, iso(now))
            conv.enter_queue(queue, 0, reason="rule", actor="router", at=step(0, 3))
        for _ in range(rng.randrange(0, 8)):
            act(day, rng, conv, channel, step)
        day.save(*pieces)


def call(
    day: Day, rng: random.Random, conv: Conversation, n: int, queue: str, step: Any
) -> list[Any]:
    sid = f"CA{n}"
    day.activity(conv, "call.started", step(), call_sid=sid)
    if rng.random() < 0.15:
        day.activity(conv, "call.ended", step(), call_sid=sid, ended_in="ivr")
        return []
    day.activity(conv, "call.queued", step(), call_sid=sid, queue=queue)
    conv.enter_queue(queue, 0, reason="ivr", actor="router", at=step(0, 2))
    roll = rng.random()
    if roll < 0.5:
        agent = rng.choice(AGENTS)
        data: dict[str, Any] = {"queue": queue, "agent": agent}
        if rng.random() < 0.5:
            data["queue_seconds"] = rng.randrange(0, 120)
        when = step(1, 90)
        day.activity(conv, "call.answered", when, call_sid=sid, **data)
        conv.assign(agent, actor="router", at=when)
        day.activity(
            conv, "call.ended", step(30, 900), call_sid=sid, talk_seconds=rng.randrange(30, 600),
            hold_seconds=rng.randrange(0, 60), wrap_seconds=rng.randrange(0, 90),
        )  # fmt: skip
        return []
    if roll < 0.75:
        day.activity(conv, "call.abandoned", step(1, 300), call_sid=sid, queue=queue)
        return []
    requested = step(1, 300)
    day.activity(conv, "callback.requested", requested, call_sid=sid, queue=queue, number="+1")
    day.activity(conv, "call.abandoned", step(1, 5), call_sid=sid, queue=queue)
    callback = Callback.request(
        source_event_id=f"cb-{n}",
        conversation_id=str(conv.id),
        call_sid=sid,
        number="+14155550100",
        queue=queue,
        requested_at=requested,
        at=requested,
    )
    outcome = rng.random()
    if outcome < 0.7:
        callback.start_dialing(rng.choice(AGENTS), max_attempts=2, at=step(60, 3600))
        callback.dialed(1, f"CB{n}", at=step(1, 10))
        if outcome < 0.5:
            callback.complete(1, f"CB{n}", at=step(5, 30))
        else:
            callback.attempt_failed(1, "busy", retry_at=None, at=step(5, 30))
            callback.give_up("busy", at=step(1, 5))
    return [callback]


def act(day: Day, rng: random.Random, conv: Conversation, channel: str, step: Any) -> None:
    roll = rng.random()
    try:
        if roll < 0.3:
            day.reply(conv, rng.choice(AGENTS), step())
        elif roll < 0.45:
            day.message(conv, channel if channel != "voice" else "sms", step())
        elif roll < 0.55:
            conv.assign(rng.choice(AGENTS), actor="router", at=step())
        elif roll < 0.62:
            conv.transfer(rng.choice(("support", "billing")), actor="sue", at=step())
        elif roll < 0.7:
            conv.escalate("why not", actor="sue", at=step())
        elif roll < 0.75:
            conv.mark_pending(actor="sue", at=step())
        elif roll < 0.88:
            conv.resolve(actor="sue", at=step())
        elif roll < 0.94:
            conv.reopen(actor="sue", at=step())
        else:
            day.csat(conv, rng.randrange(1, 6), step())
    except DomainError:
        pass  # not allowed in the conversation's state: the script just moves on


Tables = dict[str, Any]


def rows(db: ReadModelDB) -> tuple[int, dict[tuple[Any, ...], tuple[int, ...]], Tables]:
    """(generation, counter rows by (channel, queue, agent, slot) from both counter tables,
    everything else the generation holds)."""
    names = ", ".join(COLUMNS)
    with db.read() as tx:
        state = active_generation(tx, NAME)
        assert state is not None
        g = state.generation
        everyone = tx.execute(
            f"SELECT channel, queue, '{ALL}', slot, {names} FROM {table(COUNTS, g)}"
        ).fetchall()
        agents = tx.execute(
            f"SELECT channel, queue, agent, slot, {names} FROM {table(AGENT_ROWS, g)}"
        ).fetchall()
        kept = tx.execute(f"SELECT kind, id, data FROM {table(STATE, g)}").fetchall()
        hourly = tx.execute(
            f"SELECT channel, queue, hour, {names} FROM {table(HOURLY, g)}"
        ).fetchall()
        agent_hours = tx.execute(
            f"SELECT agent, hour, {names} FROM {table(AGENT_HOURS, g)}"
        ).fetchall()
    assert all(r[2] != ALL for r in agents)
    return (
        g,
        {tuple(r[:4]): tuple(int(v) for v in r[4:]) for r in [*everyone, *agents]},
        {
            "state": {(kind, row_id): orjson.loads(data) for kind, row_id, data in kept},
            "hourly": {(r[0], r[1], int(r[2])): tuple(int(v) for v in r[3:]) for r in hourly},
            "agent_hours": {(r[0], int(r[1])): tuple(int(v) for v in r[2:]) for r in agent_hours},
        },
    )


@pytest.mark.parametrize("seed", [1, 2])
def test_live_one_event_at_a_time_equals_the_rebuild(
    day: Day, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    traffic(day, seed)
    projection = Metrics()
    runner = ProjectionRunner(day.store, day.db, [projection])
    batches = 0
    while runner.run_once(limit=1):
        batches += 1
        if batches % 2:
            projection.forget()  # every other batch starts from the tables, not memory
    live_generation, live_counts, live_tables = rows(day.db)
    assert batches == day.store.max_notification_id()
    assert sum(v[COLUMNS.index("opened")] for k, v in live_counts.items() if k[:3] == (ALL,) * 3)

    monkeypatch.setitem(PROJECTIONS, NAME, Metrics)
    result = rebuild(day.store, day.db, NAME, from_start=True, batch_size=10_000)
    rebuilt_generation, rebuilt_counts, rebuilt_tables = rows(day.db)
    assert (result.previous_generation, rebuilt_generation) == (live_generation, 2)
    assert rebuilt_counts == live_counts
    assert rebuilt_tables == live_tables


def add(*rows: Sequence[int]) -> list[int]:
    return [sum(column) for column in zip(*rows, strict=True)] if rows else [0] * len(COLUMNS)


def test_roll_ups_add_up_across_every_dimension(day: Day) -> None:
    traffic(day, 3, conversations=60)
    ProjectionRunner(day.store, day.db, [Metrics()]).run_until_caught_up()
    _, counts, tables = rows(day.db)
    agents_time = [COLUMNS.index("busy_us"), COLUMNS.index("staffed_us")]

    def without_agents_time(values: Sequence[int]) -> list[int]:
        return [0 if i in agents_time else v for i, v in enumerate(values)]

    slots = {slot for (_, _, _, slot) in counts}
    assert slots
    for slot in slots:
        everything = counts[(ALL, ALL, ALL, slot)]
        by_channel = {c: v for (c, q, a, s), v in counts.items() if s == slot and q == a == ALL}
        by_queue = {q: v for (c, q, a, s), v in counts.items() if s == slot and c == a == ALL}
        pairs = {
            (c, q): v
            for (c, q, a, s), v in counts.items()
            if s == slot and a == ALL and ALL not in (c, q)
        }
        # each channel's row, each queue's row, sum to all traffic (an agent's time is kept
        # under all channels and queues only)
        agents = add(*(v for (c, q, a, s), v in counts.items() if s == slot and c == ALL != a))
        assert add(*(v for c, v in by_channel.items() if c != ALL), agents) == list(everything)
        assert add(*(v for q, v in by_queue.items() if q != ALL), agents) == list(everything)
        # and the (channel, queue) rows to each channel's and each queue's
        for channel, values in by_channel.items():
            if channel != ALL:
                parts = [v for (c, _), v in pairs.items() if c == channel]
                assert add(*parts) == list(values)
        for queue, values in by_queue.items():
            if queue != ALL:
                parts = [v for (_, q), v in pairs.items() if q == queue]
                assert add(*parts) == list(values)
        # and an agent's rows under a channel never exceed that (channel, queue)
        for (c, q, a, s), values in counts.items():
            if s == slot and ALL not in (c, q, a):
                assert all(part <= whole for part, whole in zip(values, pairs[(c, q)], strict=True))
    # an agent's row under no channel or queue is their time only
    agents_only = [v for (c, q, a, _), v in counts.items() if a != ALL and ALL in (c, q)]
    assert agents_only
    assert all(c == q == ALL for (c, q, a, _) in counts if a != ALL and ALL in (c, q))
    assert all(not v for row in agents_only for i, v in enumerate(row) if i not in agents_time)
    # each hour of a row without an agent holds the sum of its four slots, and an agent's
    # hour the sum of all the agent's rows in them (every channel and queue, and their time)
    hours: dict[tuple[str, str, int], list[int]] = {}
    agent_hours: dict[tuple[str, int], list[int]] = {}
    for (c, q, a, slot), values in counts.items():
        if a == ALL:
            hours[(c, q, slot // 4)] = add(hours.get((c, q, slot // 4), [0] * len(COLUMNS)), values)
        else:
            agent_hours[(a, slot // 4)] = add(
                agent_hours.get((a, slot // 4), [0] * len(COLUMNS)), values
            )
    assert {h: list(v) for h, v in tables["hourly"].items()} == hours
    assert {h: list(v) for h, v in tables["agent_hours"].items()} == agent_hours
    assert any(c != ALL for c, _, _ in hours)
    assert agent_hours


def test_every_way_of_reading_gives_the_same_sums(day: Day) -> None:
    traffic(day, 4, conversations=60)
    ProjectionRunner(day.store, day.db, [Metrics()]).run_until_caught_up()
    start, end = T0 - timedelta(hours=2), T0 + timedelta(days=4)

    def sums(bucket: str, **filters: Any) -> list[list[int]]:
        _, found = counters(day.db, start=start, end=end, bucket=bucket, **filters)
        return [[0] * len(COLUMNS) if row is None else row for row in found]

    # hours of all traffic (read from the hourly table) are their four quarters (the slots)
    quarters = sums("15m")
    assert sums("hour") == [add(*quarters[i : i + 4]) for i in range(0, len(quarters), 4)]
    berlin_days = sums("day", tz="Europe/Berlin")  # whole hours, a DST change inside
    nepal_days = sums("day", tz="Asia/Kathmandu")  # quarter hours: read from the slots
    assert add(*berlin_days) == add(*nepal_days) == add(*quarters)
    assert add(*quarters)[COLUMNS.index("opened")] > 0
    # an agent's sums are their sums per channel, plus their time (under no channel)
    agents_time = [COLUMNS.index("busy_us"), COLUMNS.index("staffed_us")]
    for agent in AGENTS:
        whole = sums("day", agent=agent)
        per_channel = [sums("day", agent=agent, channel=c) for c in CHANNELS]
        assert any(any(row) for row in whole)
        for i, row in enumerate(whole):
            summed = add(*(days[i] for days in per_channel))
            assert [v for c, v in enumerate(row) if c not in agents_time] == [
                v for c, v in enumerate(summed) if c not in agents_time
            ]
            assert all(summed[c] == 0 for c in agents_time)
        # and per queue within a channel
        for channel in ("voice", "email"):
            by_queue = [sums("day", agent=agent, channel=channel, queue=q) for q in QUEUES]
            assert add(*(add(*d) for d in by_queue)) == add(
                *sums("day", agent=agent, channel=channel)
            )


FILTERS: list[dict[str, Any]] = [
    {},
    *({"channel": c} for c in CHANNELS),
    *({"queue": q} for q in QUEUES),
    {"channel": "voice", "queue": "billing"},
    *({"agent": a} for a in AGENTS),
    {"agent": "ann", "channel": "voice"},
    {"agent": "bob", "queue": "support"},
    {"agent": "cyd", "channel": "email", "queue": "billing"},
]


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_hourly_tables_answer_as_the_slots_do_under_every_filter(day: Day, seed: int) -> None:
    # given random traffic (40 conversations over two days)
    traffic(day, seed)
    run(day)
    start = T0.replace(hour=0)  # whole UTC days: the 15-minute buckets tile the days'
    end = start + timedelta(days=3)
    counted = 0
    for filters in FILTERS:
        # when hours and days are read (from the hourly tables, where the filter has them)
        texts, quarters = counters(day.db, start=start, end=end, bucket="15m", **filters)
        _, hours = counters(day.db, start=start, end=end, bucket="hour", **filters)
        _, days = counters(day.db, start=start, end=end, bucket="day", **filters)
        # then each is the sum of its 15-minute slots, read from the slot tables
        rows = [[0] * len(COLUMNS) if row is None else row for row in quarters]
        assert len(rows) % 96 == 0
        assert texts[0].endswith("T00:00:00+00:00")
        by_hour = [add(*rows[i : i + 4]) for i in range(0, len(rows), 4)]
        by_day = [add(*rows[i : i + 96]) for i in range(0, len(rows), 96)]
        assert [row or add() for row in hours] == by_hour, filters
        assert [row or add() for row in days] == by_day, filters
        # and so is every KPI of the answer
        answer = metrics(day.db, start=start, end=end, bucket="hour", **filters)
        assert [b["kpis"] for b in answer["buckets"]] == [kpis(row) for row in by_hour]
        assert answer["total"] == kpis(add(*by_hour))
        counted += any(any(row) for row in rows)
    assert counted > len(FILTERS) // 2  # the filters find traffic


def message_at(day: Day, name: str, when: datetime) -> None:
    conv = day.open(name, "email", iso(when))
    day.message(conv, "email", iso(when))
    day.save(conv)


def run(day: Day) -> None:
    ProjectionRunner(day.store, day.db, [Metrics()]).run_until_caught_up()


def volumes(result: dict[str, Any]) -> list[tuple[str, str, int]]:
    return [(b["start"], b["end"], b["kpis"]["volume"]["email"]) for b in result["buckets"]]


def test_day_buckets_follow_dst_23_and_25_hours(day: Day) -> None:
    message_at(day, "a", datetime(2026, 3, 28, 23, 30, tzinfo=UTC))  # 29th 00:30 +01:00
    message_at(day, "b", datetime(2026, 3, 29, 21, 59, tzinfo=UTC))  # 29th 23:59 +02:00
    message_at(day, "c", datetime(2026, 3, 29, 22, 0, tzinfo=UTC))  # 30th 00:00 +02:00
    message_at(day, "d", datetime(2026, 10, 25, 22, 59, tzinfo=UTC))  # 25th 23:59 +01:00
    run(day)
    spring = metrics(
        day.db,
        start=datetime(2026, 3, 28, 23, 0, tzinfo=UTC),
        end=datetime(2026, 3, 30, 22, 0, tzinfo=UTC),
        bucket="day",
        tz="Europe/Berlin",
    )
    assert volumes(spring) == [
        ("2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00", 2),  # 23 hours
        ("2026-03-30T00:00:00+02:00", "2026-03-31T00:00:00+02:00", 1),
    ]
    autumn = metrics(
        day.db,
        start=datetime(2026, 10, 25, 12, 0, tzinfo=UTC),
        end=datetime(2026, 10, 25, 13, 0, tzinfo=UTC),
        bucket="day",
        tz="Europe/Berlin",
    )
    assert volumes(autumn) == [("2026-10-25T00:00:00+02:00", "2026-10-26T00:00:00+01:00", 1)]
    hours = metrics(
        day.db,
        start=datetime(2026, 10, 24, 22, 0, tzinfo=UTC),
        end=datetime(2026, 10, 25, 23, 0, tzinfo=UTC),
        bucket="hour",
        tz="Europe/Berlin",
    )
    starts = [b["start"] for b in hours["buckets"]]
    assert len(starts) == 25  # the repeated hour is two buckets
    assert starts[1:5] == [
        "2026-10-25T01:00:00+02:00",
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]
    assert hours["buckets"][-1]["kpis"]["volume"]["email"] == 1
    assert hours["total"]["volume"]["email"] == 1
    spring_hours = metrics(
        day.db,
        start=datetime(2026, 3, 28, 23, 0, tzinfo=UTC),
        end=datetime(2026, 3, 29, 22, 0, tzinfo=UTC),
        bucket="hour",
        tz="Europe/Berlin",
    )
    assert len(spring_hours["buckets"]) == 23
    assert spring_hours["buckets"][1]["start"] == "2026-03-29T01:00:00+01:00"
    assert spring_hours["buckets"][2]["start"] == "2026-03-29T03:00:00+02:00"


def test_bucket_edges_and_widening(day: Day) -> None:
    message_at(day, "a", datetime(2026, 3, 2, 9, 59, 59, 999999, tzinfo=UTC))
    message_at(day, "b", datetime(2026, 3, 2, 10, 0, tzinfo=UTC))
    message_at(day, "c", datetime(2026, 3, 2, 10, 14, 59, tzinfo=UTC))
    message_at(day, "d", datetime(2026, 3, 2, 10, 15, tzinfo=UTC))
    run(day)
    by_hour = metrics(
        day.db,
        start=datetime(2026, 3, 2, 9, 30, tzinfo=UTC),
        end=datetime(2026, 3, 2, 10, 30, tzinfo=UTC),
        bucket="hour",
    )
    assert volumes(by_hour) == [
        ("2026-03-02T09:00:00+00:00", "2026-03-02T10:00:00+00:00", 1),
        ("2026-03-02T10:00:00+00:00", "2026-03-02T11:00:00+00:00", 3),
    ]
    quarter = metrics(
        day.db,
        start=datetime(2026, 3, 2, 10, 0, tzinfo=UTC),
        end=datetime(2026, 3, 2, 10, 15, tzinfo=UTC),
        bucket="15m",
    )
    assert volumes(quarter) == [("2026-03-02T10:00:00+00:00", "2026-03-02T10:15:00+00:00", 2)]
    # Kathmandu is UTC+05:45: its hours start at a quarter past the UTC hour.
    nepal = metrics(
        day.db,
        start=datetime(2026, 3, 2, 9, 15, tzinfo=UTC),
        end=datetime(2026, 3, 2, 10, 15, tzinfo=UTC),
        bucket="hour",
        tz="Asia/Kathmandu",
    )
    assert volumes(nepal) == [("2026-03-02T15:00:00+05:45", "2026-03-02T16:00:00+05:45", 3)]


def test_empty_range_and_no_model_yet(day: Day) -> None:
    start = datetime(2026, 3, 2, tzinfo=UTC)
    before_any_run = metrics(day.db, start=start, end=start + timedelta(hours=2), bucket="hour")
    run(day)
    empty = metrics(day.db, start=start, end=start + timedelta(hours=2), bucket="hour")
    assert before_any_run == empty
    assert len(empty["buckets"]) == 2
    total = empty["total"]
    assert total["volume"] == dict.fromkeys(CHANNELS, 0)
    assert total["callbacks"]["requested"] == 0
    assert total["first_response_time"] is None
    assert total["agent_utilization"] is None


def test_a_callbacks_own_call_counts_in_handle_time_not_as_a_second_answer(day: Day) -> None:
    def at(minutes: int) -> str:
        return iso(datetime(2026, 3, 2, 9, tzinfo=UTC) + timedelta(minutes=minutes))

    conv = day.open("caller", "voice", at(0))
    day.activity(conv, "call.started", at(0), call_sid="CA1")
    day.activity(conv, "call.queued", at(1), call_sid="CA1", queue="support")
    day.activity(conv, "callback.requested", at(2), call_sid="CA1", queue="support", number="+1")
    day.activity(conv, "call.abandoned", at(2), call_sid="CA1", queue="support")
    leg = {"direction": "outbound", "callback_id": "cb-1", "requested_call_sid": "CA1"}
    day.activity(
        conv, "call.answered", at(11), call_sid="CB1", queue="support", agent="ann",
        queue_seconds=540, **leg,
    )  # fmt: skip
    day.activity(
        conv, "call.ended", at(13), call_sid="CB1", queue="support", agent="ann",
        talk_seconds=95, hold_seconds=0, wrap_seconds=0, ended_in="agent", **leg,
    )  # fmt: skip
    day.save(conv)
    run(day)

    start = datetime(2026, 3, 2, tzinfo=UTC)
    total = metrics(day.db, start=start, end=start + timedelta(days=1), bucket="day")["total"]

    assert total["asa"] is None  # no call was answered from the queue
    assert total["abandonment_rate"] == 0.0  # asking for a callback is not an abandon
    assert total["service_level"] == 0.0  # the one queued call ended in a callback request
    assert total["aht"] == 95.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bucket": "week"},
        {"tz": "Mars/Olympus"},
        {"service_level_seconds": 25},
        {"service_level_seconds": 20.5},
        {"end": datetime(2026, 3, 1, tzinfo=UTC)},
        {"start": datetime(2026, 3, 2)},
        {"end": datetime(2030, 1, 1, tzinfo=UTC), "bucket": "15m"},
    ],
)
def test_bad_queries_are_refused(day: Day, kwargs: dict[str, Any]) -> None:
    query: dict[str, Any] = {
        "start": datetime(2026, 3, 2, tzinfo=UTC),
        "end": datetime(2026, 3, 3, tzinfo=UTC),
        "bucket": "hour",
        **kwargs,
    }
    with pytest.raises(QueryError):
        metrics(day.db, **query)
