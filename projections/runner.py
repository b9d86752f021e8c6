"""The runner: follows the event store's notification log and feeds projections, a batch at a
time, exactly once.

For each projection it reads the position of the active generation, fetches the notifications
after it, decodes the ones the projection handles and, in one transaction, moves the position
(conditionally: `... WHERE position=<what we read>`) and writes the projection's rows. When
another runner moved the position first, the transaction is rolled back and the batch is
dropped; the next round starts from the new position. The position moves over events a
projection ignores too.

eventsourcing's SQLite recorder cannot `subscribe()`, so `run_forever` polls.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol
from uuid import UUID

import orjson
from eventsourcing.persistence import Notification
from eventsourcing.postgres import PostgresProcessRecorder
from eventsourcing.sqlite import SQLiteProcessRecorder
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier

from infra.store import EventStore
from projections.base import Event, Projection
from projections.db import DatabaseError, ReadModelDB
from projections.tracking import (
    PositionConflict,
    advance,
    drop_generation,
    ensure_active,
    ensure_current,
    ensure_state_table,
)

log = logging.getLogger(__name__)

# A notification as read from the log: (id, topic, originator_id, originator_version, state);
# the originator id as 32 hex digits (SQLite's column) or in the canonical UUID form.
Record = tuple[int, str, str, int, bytes]

_names: dict[str, str] = {}


class LogSource(Protocol):
    """What the runner reads of the event store (`EventStore` has it)."""

    def notifications(self, after: int, limit: int) -> Sequence[Notification]: ...

    def max_notification_id(self) -> int: ...


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cycle collector off while a batch is decoded and applied: a batch allocates a
    great many small acyclic objects, and with a projection's rows kept in memory every
    collection would walk them all (this alone is a third of a replay's time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_log(store: LogSource, after: int, limit: int) -> list[Record]:
    """Up to `limit` notifications after `after`, as plain tuples.

    The stored events are read straight from eventsourcing's table (the same statement as
    `select_notifications`, without a Notification and a UUID per row: that doubles the
    replay rate on SQLite); from any other store through `store.notifications`."""
    recorder = getattr(store, "recorder", None)
    if (
        isinstance(recorder, SQLiteProcessRecorder)
        and recorder.datastore.originator_id_type == "uuid"
    ):
        with gc_paused(), recorder.datastore.transaction(commit=False) as c:
            cursor = c.sqlite_cursor
            cursor.row_factory = None
            cursor.execute(
                "SELECT rowid, topic, originator_id, originator_version, state "
                f"FROM {recorder.events_table_name} WHERE rowid>? ORDER BY rowid LIMIT ?",
                (after, limit),
            )
            records: list[Record] = cursor.fetchall()
            return records
    if isinstance(recorder, PostgresProcessRecorder):
        statement = SQL(
            "SELECT notification_id, topic, originator_id::text, originator_version, state "
            "FROM {schema}.{table} WHERE notification_id>%s ORDER BY notification_id LIMIT %s"
        ).format(
            schema=Identifier(recorder.datastore.schema),
            table=Identifier(recorder.events_table_name),
        )
        with (
            gc_paused(),
            recorder.datastore.get_connection() as conn,
            conn.cursor(row_factory=tuple_row) as curs,
        ):
            curs.execute(statement, (after, limit), prepare=True)
            return curs.fetchall()
    with gc_paused():
        return [
            (n.id, n.topic, str(n.originator_id), n.originator_version, n.state)
            for n in store.notifications(after, limit)
        ]


def record_id(record: Record) -> str:
    """What identifies a record of the log: its id, aggregate, version and event type (an
    erasure rewrites only its state)."""
    nid, topic, oid, version, _ = record
    return f"{nid} {UUID(oid)} {version} {topic}"


def diverged(store: LogSource, position: int, last_record: str | None) -> str | None:
    """Why the log is not the history something that followed it to `position`, where it
    saw `last_record`, was built from (a store restored from an older backup, or another
    store); None when nothing says so."""
    if position == 0:
        return None
    head = store.max_notification_id()
    if position > head:
        return f"is at position {position}, past the end of the event store ({head})"
    if last_record is None:
        return None  # written by a version that did not record it: nothing to compare
    found = read_log(store, position - 1, 1)
    if not found or record_id(found[0]) != last_record:
        return f"was built from another history than the event store's at {position}"
    return None


def event_name(topic: str) -> str:
    """`inbox.domain.conversation:Conversation.Opened` -> `Conversation.Opened`."""
    name = _names.get(topic)
    if name is None:
        name = _names[topic] = topic.partition(":")[2]
    return name


def decode(records: Iterable[Record], handles: frozenset[str]) -> list[Event]:
    """The records a projection handles, decoded (the others are skipped undecoded)."""
    names = _names
    loads = orjson.loads
    events: list[Event] = []
    append = events.append
    for nid, topic, oid, version, state in records:
        name = names.get(topic) or event_name(topic)
        if name in handles:
            if len(oid) == 32:
                oid = f"{oid[:8]}-{oid[8:12]}-{oid[12:16]}-{oid[16:20]}-{oid[20:]}"
            append(Event(nid, name, oid, version, loads(state)))
    return events


def apply_batch(
    db: ReadModelDB,
    projection: Projection,
    generation: int,
    position: int,
    records: Sequence[Record],
    *,
    require_active: bool,
    events: Sequence[Event] | None = None,
) -> int:
    """Applies the records read after `position` to a generation, with the new position, in
    one transaction; returns the new position. Raises PositionConflict (nothing written) when
    the generation is no longer at `position`."""
    if not records:
        return position
    if events is None:
        with gc_paused():
            events = decode(records, projection.handles)
    new_position = records[-1][0]
    try:
        with gc_paused(), db.transaction() as tx:
            advance(
                tx,
                projection.name,
                generation,
                position,
                new_position,
                require_active=require_active,
                record=record_id(records[-1]),
            )
            if events:
                projection.apply(tx, generation, events, position=position)
    except BaseException:
        projection.forget()
        raise
    projection.committed(generation, new_position)
    return new_position


class Lead:
    """Lets runners give way to a runner whose read models matter more (the agents' inbox):
    they wait while it is behind the log, and never go past its position. Threads of one
    process share one core (the GIL), so in a burst the reports and the timeline would
    otherwise take two thirds of it; and a conversation's page joins its inbox item with
    its timeline, so the timeline must not be newer than the item (as when one runner
    moved them in step)."""

    def __init__(self, max_wait: float = 2.0) -> None:
        self._caught_up = threading.Event()
        # A follower runs at least one batch per `max_wait`: under sustained overload it
        # trails further but never stops.
        self.max_wait = max_wait
        self.position: int | None = None  # the leading runner's; None: not reported yet

    def report(self, *, behind: bool, position: int | None = None) -> None:
        if position is not None:
            self.position = position
        if behind:
            self._caught_up.clear()
        else:
            self._caught_up.set()

    def give_way(self, stop: threading.Event) -> int | None:
        """Waits until the leading runner has caught up, `stop` is set, or `max_wait`;
        returns how far a follower may go (None: nowhere yet)."""
        deadline = time.monotonic() + self.max_wait
        while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            if self._caught_up.wait(min(left, 0.1)):
                break
        return self.position


@dataclass
class RunnerStats:
    processed: dict[str, int] = field(default_factory=dict)
    conflicts: dict[str, int] = field(default_factory=dict)


class ProjectionRunner:
    """Feeds the active generation of each projection from the notification log."""

    def __init__(
        self, store: EventStore | LogSource, db: ReadModelDB, projections: Sequence[Projection]
    ) -> None:
        self.store = store
        self.db = db
        self.projections = list(projections)
        self.stats = RunnerStats(
            processed={p.name: 0 for p in self.projections},
            conflicts={p.name: 0 for p in self.projections},
        )
        self._ready = False
        # Whether the last round read a full batch somewhere (the log has more after it).
        self.behind = False
        self.reached = 0  # every projection's position is at least this after the last round

    def _ensure_ready(self) -> None:
        if not self._ready:
            ensure_state_table(self.db)
            for projection in self.projections:
                state = ensure_current(self.db, projection)
                reason = diverged(self.store, state.position, state.last_record)
                if reason is not None:
                    # Its rows show events the log does not hold, and it would skip the ones
                    # it does: derived data, so it is made again.
                    log.warning(
                        "read model %s: generation %d %s; it is dropped and rebuilt from the "
                        "start of the log",
                        projection.name,
                        state.generation,
                        reason,
                    )
                    drop_generation(self.db, projection, state.generation)
                    ensure_current(self.db, projection)
            self._ready = True

    def positions(self) -> dict[str, tuple[int, int]]:
        """Each projection's active (generation, position)."""
        self._ensure_ready()
        result: dict[str, tuple[int, int]] = {}
        for projection in self.projections:
            state = ensure_active(self.db, projection)
            result[projection.name] = (state.generation, state.position)
        return result

    def run_once(self, limit: int = 1000, *, ceiling: int | None = None) -> int:
        """Processes up to `limit` notifications for each projection, none after `ceiling`
        when given; returns how many notifications were applied, summed over the projections
        (0: all caught up)."""
        self._ensure_ready()
        # Projections at the same position share one read of the log and one decode.
        by_position: dict[int, list[tuple[Projection, int]]] = {}
        for projection, (generation, position) in zip(
            self.projections, self.positions().values(), strict=True
        ):
            by_position.setdefault(position, []).append((projection, generation))
        done = 0
        self.behind = False
        # How far every projection of this runner gets this round (a conflict: at least
        # where it started).
        reached: dict[int, int] = {position: position for position in by_position}
        for position, group in by_position.items():
            # Ids only grow, so no more than `ceiling - position` of them lie up to it (fewer
            # where the log has gaps): a follower reads nothing it may not apply.
            wanted = limit if ceiling is None else min(limit, ceiling - position)
            notifications = read_log(self.store, position, wanted) if wanted > 0 else []
            self.behind = self.behind or len(notifications) == limit
            if ceiling is not None:
                notifications = notifications[: bisect_right(notifications, (ceiling + 1,))]
            if not notifications:
                continue
            handles = frozenset().union(*(p.handles for p, _ in group))
            with gc_paused():
                decoded = decode(notifications, handles) if len(group) > 1 else None
            moved = True
            for projection, generation in group:
                events = (
                    None
                    if decoded is None
                    else [e for e in decoded if e.name in projection.handles]
                )
                try:
                    apply_batch(
                        self.db,
                        projection,
                        generation,
                        position,
                        notifications,
                        require_active=True,
                        events=events,
                    )
                except PositionConflict:
                    # Another runner (or a swap) got there first: nothing of ours was
                    # written; the next round re-reads the position and carries on.
                    self.stats.conflicts[projection.name] += 1
                    log.info("projection %s: position moved by another writer", projection.name)
                    moved = False
                    continue
                self.stats.processed[projection.name] += len(notifications)
                done += len(notifications)
            if moved:
                reached[position] = notifications[-1][0]
        self.reached = min(reached.values(), default=0)
        return done

    def run_until_caught_up(self, limit: int = 1000) -> int:
        """Runs rounds until every projection has reached the head of the log."""
        total = 0
        while True:
            done = self.run_once(limit)
            total += done
            if done == 0:
                positions = self.positions()
                head = self.store.max_notification_id()
                if all(p >= head for _, p in positions.values()):
                    return total

    def run_forever(
        self,
        stop: threading.Event,
        poll_interval: float = 0.05,
        limit: int = 10_000,
        *,
        leads: Lead | None = None,
        follows: Lead | None = None,
    ) -> None:
        """Polls the log until `stop` is set (for a thread of its own). A batch is at most
        `limit` notifications: when behind, large batches write each touched row once instead
        of once per event. `leads`: this runner reports whether it is behind; `follows`: this
        runner gives way while that lead is behind."""
        try:
            self._run_forever(stop, poll_interval, limit, leads, follows)
        finally:
            if leads is not None:
                leads.report(behind=False)  # nobody waits on a runner that has stopped

    def _run_forever(
        self,
        stop: threading.Event,
        poll_interval: float,
        limit: int,
        leads: Lead | None,
        follows: Lead | None,
    ) -> None:
        backoff = poll_interval
        while not stop.is_set():
            ceiling = None
            if follows is not None:
                ceiling = follows.give_way(stop)
                if ceiling is None:
                    continue  # the lead has not started yet
            try:
                done = self.run_once(limit, ceiling=ceiling)
            except DatabaseError as exc:  # e.g. "database is locked", a lost connection
                log.warning("projection runner: %s; retrying in %.1fs", exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception:
                # An event a projection cannot apply (a bug, or a value it does not expect):
                # the thread stays, and says so loudly, rather than end with nobody noticing
                # while the API serves an ever older picture. Nothing of the batch landed.
                log.exception("projection runner: a batch failed; retrying in %.1fs", backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            if leads is not None:
                leads.report(behind=self.behind, position=self.reached)
            backoff = poll_interval
            if done == 0:
                stop.wait(poll_interval)
