"""The metrics read model: additive counters per 15-minute UTC slot, channel, queue and agent,
from which every KPI of CONTRACT.md is a ratio of sums (docs/metrics.md has the definitions).

Tables (generation N):
- `metrics_counts_gN`: the counters in `COLUMNS` of all agents, per (channel, queue, slot),
  channel and queue each as itself or `*` = all: an event's counters go to the 4 roll-ups of
  its key, so a query without an agent reads one row per slot. Whole numbers (durations in
  microseconds, so sums are exact in any order and a rebuild equals the live model bit for
  bit). `''` stands for "no queue" / "no agent".
- `metrics_agents_gN`: the same counters per (agent, slot, channel, queue) for keys with an
  agent, so a query naming an agent sums that agent's rows of the range (at most one per
  channel and queue it worked in per slot); an agent's time under channel and queue `*`.
- `metrics_hourly_gN`: the rows of `metrics_counts_gN` summed per UTC hour (4 slots), and
- `metrics_agent_hours_gN`: all of an agent's counters (every channel and queue, and their
  time) per UTC hour: hour and day buckets in zones whose offsets are whole hours read a
  quarter of the rows (one per hour) when they filter by channel and/or queue, or by agent
  alone.
- `metrics_state_gN`: what later events need to know, as JSON per (kind, id): conversations
  (`c`), calls by CallSid (`k`), agents (`a`, by agent id), agent aggregate ids (`u`),
  callbacks (`b`) and queues with their SLA calendar (`q`).

A batch is applied in memory: state rows are loaded once (or kept from earlier batches while
nobody else wrote the generation), counter deltas are summed per key (`Metrics.prepare`),
rolled up, and each changed row is written once (one upsert that adds: `write_changes`). The
two halves run in one transaction live, and in two processes in a long rebuild
(`projections/pipeline.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import pairwise
from operator import add
from typing import Any, get_args

import orjson

from inbox.contact import Channel
from inbox.domain.business_hours import BusinessHours
from inbox.domain.sla import SlaPolicy, SlaPolicyError
from projections.base import Event, Kept, table
from projections.db import Tx

NAME = "metrics"
COUNTS = "metrics_counts"
AGENTS = "metrics_agents"
HOURLY = "metrics_hourly"
AGENT_HOURS = "metrics_agent_hours"
STATE = "metrics_state"

# In the contract's order: the order of the volume columns.
CHANNELS: tuple[str, ...] = get_args(Channel)
ALL = "*"
NONE = ""
# "Answered within T" is kept for these T (seconds): a query's service level picks one.
SL_EDGES = (5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600)
SLOT_SECONDS = 900
US = 1_000_000
SLOT_US = SLOT_SECONDS * US
SLOTS_PER_HOUR = 4
DAY_US = 86_400 * US
FCR_WINDOW_US = 7 * DAY_US
RESOLVED_WITHIN_US = DAY_US

COLUMNS: tuple[str, ...] = (
    *(f"v_{c}" for c in CHANNELS),
    "v_other",
    "frt_n",  # first responses measured
    "frt_us",
    "frt_bh_us",  # the same in business time (the queue's SLA calendar; none = 24/7)
    "res_n",  # resolutions
    "res_us",
    "res_bh_us",
    "res_24h",  # resolutions within 24 h
    "fcr",  # resolutions with one inbound contact, never reopened (taken back on a reopen)
    "fcr_n",  # resolved conversations: each counted once, at its first resolution
    "opened",  # conversations opened (under their opening channel and first queue)
    "escalated",  # of those, escalated (counted once, at the opening key)
    "ans",  # calls answered (a queue outcome)
    "wait_us",  # their queue waits
    *(f"w{t}" for t in SL_EDGES),  # answered with a wait <= t seconds
    "abandoned",  # hung up while queued (a queue outcome)
    "cb_queued",  # asked for a callback while queued (a queue outcome)
    "aht_n",  # handled calls (answered, then ended)
    "aht_us",  # their talk + hold + wrap
    "csat_n",
    "csat_good",  # scored 4 or 5
    "cb_req",
    "cb_done",
    "cb_failed",
    "cb_us",  # completed callbacks: completed - requested
    "cb_bh_us",
    "busy_us",  # agent time handling work (not offline)
    "staffed_us",  # agent time available or handling
)
IDX = {name: i for i, name in enumerate(COLUMNS)}
_N = len(COLUMNS)
_VOLUME = {c: IDX[f"v_{c}"] for c in CHANNELS}
_V_OTHER = IDX["v_other"]
_W = [(t * US, IDX[f"w{t}"]) for t in SL_EDGES]
_FRT_N, _FRT_US, _FRT_BH_US = IDX["frt_n"], IDX["frt_us"], IDX["frt_bh_us"]
_RES_N, _RES_US, _RES_BH_US = IDX["res_n"], IDX["res_us"], IDX["res_bh_us"]
_RES_24H, _FCR, _FCR_N = IDX["res_24h"], IDX["fcr"], IDX["fcr_n"]
_ANS, _WAIT_US, _AHT_N, _AHT_US = IDX["ans"], IDX["wait_us"], IDX["aht_n"], IDX["aht_us"]
_CSAT_N, _CSAT_GOOD = IDX["csat_n"], IDX["csat_good"]
_CB_DONE, _CB_US, _CB_BH_US = IDX["cb_done"], IDX["cb_us"], IDX["cb_bh_us"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_KINDS = ("c", "k", "a", "u", "b", "q")
_CHUNK = 500
OPEN, PENDING, RESOLVED = "open", "pending", "resolved"
AVAILABLE, OFFLINE = "available", "offline"

Key = tuple[str, str, str, int]  # (channel, queue, agent, slot): the primary key's order


def to_us(text: str) -> int:
    """An event's ISO timestamp as microseconds since the epoch (exact)."""
    return (datetime.fromisoformat(text) - _EPOCH) // _ONE_US


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def calendar_of(spec: dict[str, Any], name: str) -> BusinessHours | None:
    """The business hours of a queue's SLA policy; None when it has none (24/7)."""
    sla = spec.get("sla")
    if not sla:
        return None
    try:
        return SlaPolicy.from_dict({**sla, "queue": name}).hours
    except (SlaPolicyError, TypeError):  # a policy the queue editor refused never applied
        return None


def roll_ups(key: Key) -> list[Key]:
    """The rows a key's counters go to: under agent `*`, (channel, queue), channel, queue and
    everything; and the key itself when it has an agent (no query asks for "no agent"). An
    agent's time (channel `*`) goes to (`*`, `*`, agent) and everything."""
    channel, queue, agent, slot = key
    if channel == ALL:
        return [(ALL, ALL, agent, slot), (ALL, ALL, ALL, slot)]
    rows = [
        (channel, queue, ALL, slot),
        (channel, ALL, ALL, slot),
        (ALL, queue, ALL, slot),
        (ALL, ALL, ALL, slot),
    ]
    if agent:
        rows.append(key)
    return rows


def _add_counters(tx: Tx, table_name: str, key: str, rows: list[list[Any]]) -> None:
    """Adds each row's counters to the stored row (inserted when there is none)."""
    tx.insert_many(table_name, [*key.split(", "), *COLUMNS], rows, _adding(table_name, key))


@lru_cache(maxsize=64)
def _adding(table_name: str, key: str) -> str:
    sets = ", ".join(f"{c}={table_name}.{c}+excluded.{c}" for c in COLUMNS)
    return f"ON CONFLICT ({key}) DO UPDATE SET {sets}"


@dataclass(frozen=True)
class Changes:
    """What one batch changes: its state rows as (kind, id, JSON) and its counters' deltas."""

    states: list[tuple[str, str, str]]
    deltas: dict[Key, dict[int, int]]


def write_changes(tx: Tx, generation: int, changes: Changes) -> None:
    """Writes a batch's `Changes`: each state row replaced, each counter row's sums added to
    (the rows of every roll-up of the deltas; see `roll_up`)."""
    tx.insert_many(
        table(STATE, generation),
        ("kind", "id", "data"),
        changes.states,
        "ON CONFLICT (kind, id) DO UPDATE SET data=excluded.data",
    )
    cube, hours = roll_up(changes.deltas)
    # In the order the batch first touched them (about time order): sorting them in
    # primary-key order made no difference to SQLite here, and cost a second per million.
    for rows_of, name, key in (
        (cube, COUNTS, "channel, queue, slot"),
        (hours, HOURLY, "channel, queue, hour"),
    ):
        everyone = [[c, q, t, *v] for (c, q, a, t), v in rows_of.items() if a == ALL]
        _add_counters(tx, table(name, generation), key, everyone)
    agents = [[a, slot, c, q, *v] for (c, q, a, slot), v in cube.items() if a != ALL]
    _add_counters(tx, table(AGENTS, generation), "agent, slot, channel, queue", agents)
    agent_hours = [[a, hour, *v] for (_, _, a, hour), v in hours.items() if a != ALL]
    _add_counters(tx, table(AGENT_HOURS, generation), "agent, hour", agent_hours)


class Metrics:
    """The projection (see the module doc)."""

    name = NAME
    handles = frozenset(
        {
            "Conversation.Opened",
            "Conversation.MessageReceived",
            "Conversation.ActivityRecorded",
            "Conversation.ReplyQueued",
            "Conversation.Queued",
            "Conversation.Transferred",
            "Conversation.Assigned",
            "Conversation.Escalated",
            "Conversation.MarkedPending",
            "Conversation.Resolved",
            "Conversation.Reopened",
            "Conversation.CsatSubmitted",
            "Agent.Registered",
            "Agent.PresenceChanged",
            "Queue.Defined",
            "Queue.Changed",
            "Callback.Requested",
            "Callback.Completed",
            "Callback.Failed",
            "Callback.Cancelled",
        }
    )

    def __init__(self, cache_limit: int = 2_000_000) -> None:
        self.kept: Kept[_Cache] = Kept(cache_limit)

    def tables(self, generation: int) -> list[str]:
        return [
            table(COUNTS, generation),
            table(STATE, generation),
            table(AGENTS, generation),
            table(HOURLY, generation),
            table(AGENT_HOURS, generation),
        ]

    def create_tables(self, tx: Tx, generation: int) -> None:
        counts, state, agents, hourly, agent_hours = self.tables(generation)
        clustered = "" if tx.is_postgres else " WITHOUT ROWID"
        columns = ", ".join(f"{c} BIGINT NOT NULL DEFAULT 0" for c in COLUMNS)
        # Key orders: a query fixes channel and queue and reads a range of slots; an agent's
        # query reads a range of that agent's slots (whatever the channel and queue).
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {counts} (channel TEXT NOT NULL, queue TEXT NOT NULL, "
            f"slot BIGINT NOT NULL, {columns}, PRIMARY KEY (channel, queue, slot))" + clustered
        )
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {agents} (agent TEXT NOT NULL, slot BIGINT NOT NULL, "
            f"channel TEXT NOT NULL, queue TEXT NOT NULL, {columns}, "
            "PRIMARY KEY (agent, slot, channel, queue))" + clustered
        )
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {state} (kind TEXT NOT NULL, id TEXT NOT NULL, "
            "data TEXT NOT NULL, PRIMARY KEY (kind, id))" + clustered
        )
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {hourly} (channel TEXT NOT NULL, queue TEXT NOT NULL, "
            f"hour BIGINT NOT NULL, {columns}, PRIMARY KEY (channel, queue, hour))" + clustered
        )
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {agent_hours} (agent TEXT NOT NULL, "
            f"hour BIGINT NOT NULL, {columns}, PRIMARY KEY (agent, hour))" + clustered
        )

    def create_indexes(self, tx: Tx, generation: int) -> None:
        """None: the primary keys are what the writes and the queries use."""

    def apply(self, tx: Tx, generation: int, events: Sequence[Event], *, position: int) -> None:
        write_changes(tx, generation, self.prepare(tx, generation, events, position=position))

    def prepare(
        self, tx: Tx, generation: int, events: Sequence[Event], *, position: int
    ) -> Changes:
        """What `events` change: the state rows and the counters' deltas, decided from the
        state kept since `committed` (else read through `tx`), written by `write`."""
        # Without a kept cache it starts from the tables; at position 0 they are empty, so
        # the cache is complete from the start.
        cache = self.kept.take(
            generation, position, lambda: _Cache(generation, position, complete=position == 0)
        )
        return _Batch(tx, table(STATE, generation), cache).run(events)

    def remembers(self, generation: int, position: int) -> bool:
        """Whether `prepare` at `position` starts from the state kept in memory (rows it does
        not hold were not changed by this process since it read them)."""
        return self.kept.remembers(generation, position)

    # A function of the module, so that a rebuild's writer process gets it by name.
    write = staticmethod(write_changes)

    def committed(self, generation: int, position: int) -> None:
        self.kept.committed(generation, position)

    def forget(self) -> None:
        self.kept.forget()


class _Cache:
    """State rows as of `position` of `generation`; `complete`: every row is here (a missing
    one does not exist), true for a cache that has followed the generation from position 0."""

    def __init__(self, generation: int, position: int, *, complete: bool) -> None:
        self.generation = generation
        self.position = position
        self.complete = complete
        self.rows: dict[str, dict[str, Any]] = {kind: {} for kind in _KINDS}
        self.calendars: dict[str, BusinessHours | None] | None = None

    def size(self) -> int:
        return sum(len(rows) for rows in self.rows.values())


def roll_up(
    deltas: dict[Key, dict[int, int]],
) -> tuple[dict[Key, list[int]], dict[Key, list[int]]]:
    """The counters of every row the batch's deltas go to (see `roll_ups`), and the same per
    UTC hour (`slot // 4` in the key's place), where a key with an agent goes to the agent's
    total instead, (`*`, `*`, agent, hour). In stages, so that each delta is added four times
    at most (to its own row, its agent's hour, its (channel, queue) and that pair's hour); the
    wider roll-ups are sums of those."""
    cube: dict[Key, list[int]] = {}
    hours: dict[Key, list[int]] = {}
    pairs: dict[Key, list[int]] = {}  # (channel, queue, *, slot)
    everything: dict[Key, list[int]] = {}  # (*, *, *, slot)
    hour_pairs: dict[Key, list[int]] = {}  # (channel, queue, *, hour)
    hour_everything: dict[Key, list[int]] = {}  # (*, *, *, hour)
    zeros = [0] * _N
    for key, delta in deltas.items():
        channel, queue, agent, slot = key
        hour = slot // SLOTS_PER_HOUR
        items = delta.items()
        # an agent's time goes to everything directly, other counters via their pair
        if channel == ALL:
            at_slot, at_hour = everything, hour_everything
            slot_key, hour_key = (ALL, ALL, ALL, slot), (ALL, ALL, ALL, hour)
        else:
            at_slot, at_hour = pairs, hour_pairs
            slot_key, hour_key = (channel, queue, ALL, slot), (channel, queue, ALL, hour)
        for into, rolled in ((at_slot, slot_key), (at_hour, hour_key)):
            row = into.get(rolled)
            if row is None:
                row = into[rolled] = list(zeros)
            for column, value in items:
                row[column] += value
        if agent:  # no query asks for "no agent"
            row = cube[key] = list(zeros)
            for column, value in items:
                row[column] = value
            rolled = (ALL, ALL, agent, hour)
            row = hours.get(rolled)
            if row is None:
                row = hours[rolled] = list(zeros)
            for column, value in items:
                row[column] += value
    for by_pair, total, out in ((pairs, everything, cube), (hour_pairs, hour_everything, hours)):
        by_channel: dict[Key, list[int]] = {}
        by_queue: dict[Key, list[int]] = {}
        for (channel, queue, _, time), counters in by_pair.items():
            _sum_into(by_channel, (channel, ALL, ALL, time), counters)
            _sum_into(by_queue, (ALL, queue, ALL, time), counters)
        for (_, _, _, time), counters in by_channel.items():
            _sum_into(total, (ALL, ALL, ALL, time), counters)
        for rolled_up in (by_pair, by_channel, by_queue, total):
            out.update(rolled_up)
    return cube, hours


def _sum_into(rows: dict[Key, list[int]], key: Key, counters: list[int]) -> None:
    total = rows.get(key)
    rows[key] = list(counters) if total is None else list(map(add, total, counters))


class _Batch:
    def __init__(self, tx: Tx, state_table: str, cache: _Cache) -> None:
        self.tx = tx
        self.state_table = state_table
        self.cache = cache
        self.rows = cache.rows
        self.dirty: set[tuple[str, str]] = set()
        self.deltas: dict[Key, dict[int, int]] = {}  # sparse: an event touches few columns

    # -- state rows ---------------------------------------------------------------------

    def run(self, events: Sequence[Event]) -> Changes:
        if not self.cache.complete:
            self._prefetch(events)
        handlers: dict[str, Callable[[Event], None]] = {
            "Conversation.Opened": self.opened,
            "Conversation.MessageReceived": self.message_received,
            "Conversation.ActivityRecorded": self.activity,
            "Conversation.ReplyQueued": self.reply_queued,
            "Conversation.Queued": self.queued,
            "Conversation.Transferred": self.transferred,
            "Conversation.Assigned": self.assigned,
            "Conversation.Escalated": self.escalated,
            "Conversation.MarkedPending": self.marked_pending,
            "Conversation.Resolved": self.resolved,
            "Conversation.Reopened": self.reopened,
            "Conversation.CsatSubmitted": self.csat,
            "Agent.Registered": self.agent_registered,
            "Agent.PresenceChanged": self.presence_changed,
            "Queue.Defined": self.queue_defined,
            "Queue.Changed": self.queue_defined,
            "Callback.Requested": self.callback_requested,
            "Callback.Completed": self.callback_completed,
            "Callback.Failed": self.callback_failed,
            "Callback.Cancelled": self.callback_cancelled,
        }
        for event in events:
            handlers[event.name](event)
        rows = self.rows
        return Changes(
            [(k, i, orjson.dumps(rows[k][i]).decode()) for k, i in sorted(self.dirty)],
            self.deltas,
        )

    def _prefetch(self, events: Sequence[Event]) -> None:
        """The state rows a batch will most likely touch, read in a few queries."""
        wanted: dict[str, set[str]] = {kind: set() for kind in _KINDS}
        for e in events:
            kind = e.name[:3]
            if kind == "Con":
                wanted["c"].add(e.originator_id)
                call_sid = (e.state.get("data") or {}).get("call_sid")
                if call_sid:
                    wanted["k"].add(str(call_sid))
            elif kind == "Cal":
                wanted["b"].add(e.originator_id)
            elif kind == "Age":
                wanted["u"].add(e.originator_id)
        for kind, ids in wanted.items():
            missing = sorted(i for i in ids if i not in self.rows[kind])
            for start in range(0, len(missing), _CHUNK):
                chunk = missing[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                self.tx.execute(
                    f"SELECT id, data FROM {self.state_table} WHERE kind=? AND id IN ({marks})",
                    (kind, *chunk),
                )
                for row_id, data in self.tx.fetchall():
                    self.rows[kind][row_id] = orjson.loads(data)

    def get(self, kind: str, row_id: str) -> dict[str, Any] | None:
        row = self.rows[kind].get(row_id)
        if row is None and not self.cache.complete:
            self.tx.execute(
                f"SELECT data FROM {self.state_table} WHERE kind=? AND id=?", (kind, row_id)
            )
            found = self.tx.fetchone()
            if found is not None:
                row = self.rows[kind][row_id] = orjson.loads(found[0])
        return row

    def put(self, kind: str, row_id: str, row: dict[str, Any]) -> None:
        self.rows[kind][row_id] = row
        self.dirty.add((kind, row_id))

    def touch(self, kind: str, row_id: str) -> None:
        self.dirty.add((kind, row_id))

    # -- counters -----------------------------------------------------------------------

    def add(self, at: int, channel: str, queue: str, agent: str, column: int, value: int) -> None:
        key = (channel, queue, agent, at // SLOT_US)
        delta = self.deltas.get(key)
        if delta is None:
            self.deltas[key] = {column: value}
        else:
            delta[column] = delta.get(column, 0) + value

    def add_all(
        self, at: int, channel: str, queue: str, agent: str, values: Sequence[tuple[int, int]]
    ) -> None:
        """`add` for several (column, value) at one key."""
        key = (channel, queue, agent, at // SLOT_US)
        delta = self.deltas.get(key)
        if delta is None:
            delta = self.deltas[key] = {}
        for column, value in values:
            delta[column] = delta.get(column, 0) + value

    def business_us(self, queue: str, start: int, end: int) -> int:
        """Business microseconds in [start, end) on the queue's SLA calendar (none: all)."""
        if end <= start:
            return 0
        calendar = self.calendars().get(queue)
        if calendar is None:
            return end - start
        return round(calendar.seconds_between(from_us(start), from_us(end)) * US)

    def calendars(self) -> dict[str, BusinessHours | None]:
        if self.cache.calendars is None:
            if not self.cache.complete:
                self.tx.execute(f"SELECT id, data FROM {self.state_table} WHERE kind='q'")
                for row_id, data in self.tx.fetchall():
                    self.rows["q"].setdefault(row_id, orjson.loads(data))
            self.cache.calendars = {
                q["name"]: calendar_of(q["spec"], q["name"]) for q in self.rows["q"].values()
            }
        return self.cache.calendars

    # -- agents: utilization ------------------------------------------------------------

    def agent(self, agent_id: str, at: int) -> dict[str, Any]:
        """An agent's state; one first seen here (not registered) starts offline at `at`."""
        row = self.get("a", agent_id)
        if row is None:
            row = {"p": OFFLINE, "t": at, "o": 0, "c": 0, "w": 0}
            self.put("a", agent_id, row)
        return row

    def advance(self, agent_id: str, at: int) -> dict[str, Any]:
        """Counts the agent's time from their last change up to `at`, as it was: busy when not
        offline and handling (an open conversation assigned, a call, a wrap-up); staffed
        when available or busy. Returns the agent's state, to be changed at `at`."""
        row = self.agent(agent_id, at)
        self.touch("a", agent_id)  # the caller changes it
        start = row["t"]
        if at <= start:
            return row  # a clock that went backwards changes state, not time
        cuts = [start, at]
        if start < row["w"] < at:
            cuts.insert(1, row["w"])
        for a, b in pairwise(cuts):
            busy = row["p"] != OFFLINE and (row["o"] > 0 or row["c"] > 0 or a < row["w"])
            if busy or row["p"] == AVAILABLE:
                self._accrue(agent_id, a, b, busy)
        row["t"] = at
        return row

    def _accrue(self, agent_id: str, start: int, end: int, busy: bool) -> None:
        staffed, handling = IDX["staffed_us"], IDX["busy_us"]
        while start < end:
            cut = min(end, (start // SLOT_US + 1) * SLOT_US)
            # under all channels and queues only: an agent's time belongs to none of them
            spans = (
                ((staffed, cut - start), (handling, cut - start))
                if busy
                else ((staffed, cut - start),)
            )
            self.add_all(start, ALL, ALL, agent_id, spans)
            start = cut

    def hold(self, conv: dict[str, Any], at: int, *, agent: str, status: str) -> None:
        """Changes a conversation's assignee and status, keeping each agent's count of open
        conversations assigned to them (their digital handling) right."""
        before = conv["a"] if conv["st"] == OPEN else NONE
        after = agent if status == OPEN else NONE
        conv["a"], conv["st"] = agent, status
        if before == after:
            return
        if before:
            self.advance(before, at)["o"] -= 1
        if after:
            self.advance(after, at)["o"] += 1

    def agent_registered(self, e: Event) -> None:
        s = e.state
        self.put("u", e.originator_id, {"id": s["agent_id"]})
        self.agent(s["agent_id"], to_us(s["at"]))

    def presence_changed(self, e: Event) -> None:
        known = self.get("u", e.originator_id)
        if known is None:
            return
        row = self.advance(known["id"], to_us(e.state["at"]))
        row["p"] = e.state["status"]

    # -- queues -------------------------------------------------------------------------

    def queue_defined(self, e: Event) -> None:
        s = e.state
        row = self.get("q", e.originator_id)
        name = s.get("name") or (row or {}).get("name")
        if name is None:
            return
        self.put("q", e.originator_id, {"name": name, "spec": s["spec"]})
        self.calendars()[name] = calendar_of(s["spec"], name)

    # -- conversations ------------------------------------------------------------------

    def conv(self, e: Event) -> dict[str, Any] | None:
        row = self.get("c", e.originator_id)
        if row is not None:
            self.touch("c", e.originator_id)
        return row

    def opened(self, e: Event) -> None:
        s = e.state
        at = to_us(s["at"])
        queue = s.get("queue") or NONE
        conv = {
            "ch": s["channel"],  # the channel of the latest inbound contact
            "q": queue,
            "a": NONE,
            "st": OPEN,
            "cs": None,  # first inbound contact of this cycle (or the reopen)
            "fr": False,  # first response of this cycle measured
            "rs": at,  # resolution time counts from here (opened, or the reopen)
            "n": 0,  # inbound contacts
            "re": 0,  # reopens
            "esc": False,
            "ok": [at, s["channel"], queue],  # the opening key (escalation rate)
            "oq": bool(queue),  # the opening key has its queue
            "rk": None,  # the last resolution's key, time, and whether it counted for FCR
            "rat": None,
            "rf": False,
            "chat": False,  # a chat session is open
            "pv": [],  # contacts before the first queue: [at, channel, agent]
        }
        self.put("c", e.originator_id, conv)
        self.add(at, s["channel"], queue, NONE, IDX["opened"], 1)

    def contact(self, conv: dict[str, Any], channel: str, at: int, *, counts: bool) -> None:
        """The customer wrote, called or started a chat; `counts`: a new inbound contact
        (a message inside a chat session is part of the chat's contact)."""
        if counts:
            self.add(at, channel, conv["q"], conv["a"], _VOLUME.get(channel, _V_OTHER), 1)
            if not conv["oq"]:
                conv["pv"].append(
                    [at, channel, conv["a"]]
                )  # moved to the first queue when it has one
            conv["n"] += 1
            if conv["cs"] is None:
                conv["cs"] = at
        conv["ch"] = channel
        if conv["st"] == PENDING:
            self.hold(conv, at, agent=conv["a"], status=OPEN)

    def message_received(self, e: Event) -> None:
        s = e.state
        conv = self.conv(e)
        if conv is not None and not s.get("automatic", False):
            in_chat = s["channel"] == "chat" and conv.get("chat", False)
            self.contact(conv, s["channel"], to_us(s["at"]), counts=not in_chat)

    def respond(self, conv: dict[str, Any], at: int, agent: str) -> None:
        """The first agent reply or answer of the cycle: its first response time."""
        start = conv["cs"]
        if conv["fr"] or start is None:
            return
        conv["fr"] = True
        channel, queue = conv["ch"], conv["q"]
        self.add_all(
            at,
            channel,
            queue,
            agent,
            (
                (_FRT_N, 1),
                (_FRT_US, max(0, at - start)),
                (_FRT_BH_US, self.business_us(queue, start, at)),
            ),
        )

    def reply_queued(self, e: Event) -> None:
        conv = self.conv(e)
        if conv is not None:
            self.respond(conv, to_us(e.state["at"]), e.state.get("actor") or NONE)

    def queued(self, e: Event) -> None:
        conv = self.conv(e)
        if conv is None:
            return
        queue = e.state["queue"]
        conv["q"] = queue
        if not conv["oq"]:
            # Opened without a queue (ingest leaves that to routing): the conversation counts
            # under the first queue it enters, moved there from "no queue" (no agent either:
            # a conversation is assigned after it is queued).
            conv["oq"] = True
            at, channel, _ = conv["ok"]
            conv["ok"] = [at, channel, queue]
            self.add(at, channel, NONE, NONE, IDX["opened"], -1)
            self.add(at, channel, queue, NONE, IDX["opened"], 1)
            if conv["esc"]:
                self.add(at, channel, NONE, NONE, IDX["escalated"], -1)
                self.add(at, channel, queue, NONE, IDX["escalated"], 1)
            # so do its contacts so far (a call starts before the IVR queues it)
            for c_at, c_channel, c_agent in conv["pv"]:
                column = _VOLUME.get(c_channel, _V_OTHER)
                self.add(c_at, c_channel, NONE, c_agent, column, -1)
                self.add(c_at, c_channel, queue, c_agent, column, 1)
            conv["pv"] = []

    def transferred(self, e: Event) -> None:
        self.queued(e)
        conv = self.conv(e)
        if conv is not None:
            self.hold(conv, to_us(e.state["at"]), agent=NONE, status=conv["st"])

    def assigned(self, e: Event) -> None:
        conv = self.conv(e)
        if conv is not None:
            agent = e.state.get("agent") or NONE
            self.hold(conv, to_us(e.state["at"]), agent=agent, status=conv["st"])

    def escalated(self, e: Event) -> None:
        conv = self.conv(e)
        if conv is None or conv["esc"]:
            return  # a conversation counts once, however often it is escalated
        conv["esc"] = True
        at, channel, queue = conv["ok"]
        self.add(at, channel, queue, NONE, IDX["escalated"], 1)

    def marked_pending(self, e: Event) -> None:
        conv = self.conv(e)
        if conv is not None:
            self.hold(conv, to_us(e.state["at"]), agent=conv["a"], status=PENDING)

    def resolved(self, e: Event) -> None:
        conv = self.conv(e)
        if conv is None:
            return
        at = to_us(e.state["at"])
        channel, queue, agent = conv["ch"], conv["q"], conv["a"]
        took = max(0, at - conv["rs"])
        first_contact = conv["n"] == 1 and conv["re"] == 0
        self.add_all(
            at,
            channel,
            queue,
            agent,
            (
                (_RES_N, 1),
                (_RES_US, took),
                (_RES_BH_US, self.business_us(queue, conv["rs"], at)),
                (_RES_24H, int(took <= RESOLVED_WITHIN_US)),
                (_FCR, int(first_contact)),
                (_FCR_N, int(conv["re"] == 0)),  # (a reopen only follows a resolution)
            ),
        )
        # FCR is provisional for 7 days: a reopen in that time takes it back from this key.
        conv["rk"], conv["rat"], conv["rf"] = [at, channel, queue, agent], at, first_contact
        self.hold(conv, at, agent=agent, status=RESOLVED)

    def reopened(self, e: Event) -> None:
        conv = self.conv(e)
        if conv is None:
            return
        at = to_us(e.state["at"])
        if conv["rf"] and at - conv["rat"] <= FCR_WINDOW_US:
            r_at, channel, queue, agent = conv["rk"]
            self.add(r_at, channel, queue, agent, IDX["fcr"], -1)
        conv["rf"] = False
        conv["re"] += 1
        conv["rs"] = conv["cs"] = at
        conv["fr"] = False
        self.hold(conv, at, agent=conv["a"], status=OPEN)

    def csat(self, e: Event) -> None:
        conv = self.conv(e)
        if conv is None:
            return
        at = to_us(e.state["at"])
        good = int(e.state["score"] >= 4)
        self.add_all(at, conv["ch"], conv["q"], conv["a"], ((_CSAT_N, 1), (_CSAT_GOOD, good)))

    # -- calls --------------------------------------------------------------------------

    def activity(self, e: Event) -> None:
        conv = self.conv(e)
        if conv is None:
            return
        s = e.state
        activity = s["activity"]
        at = to_us(s["at"])
        if activity == "call.started":
            self.contact(conv, s["channel"], at, counts=True)
            return
        if activity == "chat.started":
            # a reconnect inside an open session is the same contact
            self.contact(conv, s["channel"], at, counts=not conv.get("chat", False))
            conv["chat"] = True
            return
        if activity == "chat.ended":
            conv["chat"] = False
            return
        data = s.get("data") or {}
        call_sid = data.get("call_sid")
        if not call_sid or not activity.startswith(("call.", "callback.")):
            return
        call_sid = str(call_sid)
        call = self.get("k", call_sid)
        if call is None:
            call = {"q": NONE, "qat": None, "o": None, "ag": NONE, "live": False}
        self.put("k", call_sid, call)
        if data.get("queue"):
            call["q"] = str(data["queue"])
        queue = call["q"] or conv["q"]
        if activity == "call.queued":
            call["qat"] = at
        elif activity == "call.answered":
            self.call_answered(conv, call, data, at, queue)
        elif activity == "call.ended":
            self.call_ended(call, data, at, queue)
        elif activity == "call.abandoned":
            # IVR hang-ups are no abandons; nor is hanging up after asking for a callback
            # (the first outcome of a call is its only one).
            if data.get("ended_in") == "ivr" or call["o"] is not None:
                return
            if call["qat"] is None and not data.get("queue"):
                return  # never queued
            call["o"] = "abandoned"
            self.add(at, "voice", queue, NONE, IDX["abandoned"], 1)
        elif activity == "callback.requested" and call["o"] is None:
            call["o"] = "callback"
            self.add(at, "voice", queue, NONE, IDX["cb_queued"], 1)

    def call_answered(
        self, conv: dict[str, Any], call: dict[str, Any], data: dict[str, Any], at: int, queue: str
    ) -> None:
        agent = str(data.get("agent") or NONE)
        # A callback's own call is not a second queue outcome: the call it answers already
        # counted as "callback requested". Its talk time still counts (AHT, utilisation).
        if data.get("direction") == "outbound" or data.get("callback_id"):
            call["o"] = "callback"
        if call["o"] is None:
            call["o"] = "answered"
            if isinstance(data.get("queue_seconds"), int | float):
                wait = round(data["queue_seconds"] * US)
            else:
                wait = 0 if call["qat"] is None else max(0, at - call["qat"])
            within = [(column, 1) for edge, column in _W if wait <= edge]
            self.add_all(at, "voice", queue, agent, [(_ANS, 1), (_WAIT_US, wait), *within])
        if not call["live"]:
            call["live"], call["ag"] = True, agent
            if agent:
                self.advance(agent, at)["c"] += 1
        self.respond(conv, at, agent)

    def call_ended(self, call: dict[str, Any], data: dict[str, Any], at: int, queue: str) -> None:
        if not call["live"]:
            return  # never answered (an IVR hang-up, an abandon): no handled call
        call["live"] = False
        agent = call["ag"]
        handled = sum(
            round(float(data.get(k) or 0) * US)
            for k in ("talk_seconds", "hold_seconds", "wrap_seconds")
        )
        self.add_all(at, "voice", queue, agent, ((_AHT_N, 1), (_AHT_US, handled)))
        if agent:
            row = self.advance(agent, at)
            row["c"] -= 1
            # wrap-up follows the end of the call
            row["w"] = max(row["w"], at + round(float(data.get("wrap_seconds") or 0) * US))

    # -- callbacks ----------------------------------------------------------------------

    def callback_requested(self, e: Event) -> None:
        s = e.state
        requested = to_us(s.get("requested_at") or s["at"])
        queue = s.get("queue") or NONE
        self.put("b", e.originator_id, {"rq": requested, "q": queue, "done": False})
        self.add(requested, "voice", queue, NONE, IDX["cb_req"], 1)

    def _callback(self, e: Event) -> dict[str, Any] | None:
        row = self.get("b", e.originator_id)
        if row is None or row["done"]:
            return None
        row["done"] = True
        self.touch("b", e.originator_id)
        return row

    def callback_completed(self, e: Event) -> None:
        row = self._callback(e)
        if row is None:
            return
        at = to_us(e.state["at"])
        queue, agent = row["q"], e.state.get("agent") or NONE
        self.add_all(
            at,
            "voice",
            queue,
            agent,
            (
                (_CB_DONE, 1),
                (_CB_US, max(0, at - row["rq"])),
                (_CB_BH_US, self.business_us(queue, row["rq"], at)),
            ),
        )

    def callback_failed(self, e: Event) -> None:
        row = self._callback(e)
        if row is not None:
            self.add(to_us(e.state["at"]), "voice", row["q"], NONE, IDX["cb_failed"], 1)

    def callback_cancelled(self, e: Event) -> None:
        self._callback(e)
