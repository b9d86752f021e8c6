"""The event store: eventsourcing's SQLite or PostgreSQL process recorder, extended with the
table of contact events already taken in, written in the same transaction as the domain
events and the Kafka position they came from."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, cast
from urllib.parse import unquote, urlparse
from uuid import UUID

import orjson
from eventsourcing.domain import BaseAggregate, CanMutateAggregate, DomainEventProtocol
from eventsourcing.persistence import (
    InterfaceError,
    Mapper,
    Notification,
    OperationalError,
    ProcessRecorder,
    StoredEvent,
    Tracking,
    Transcoder,
)
from eventsourcing.postgres import (
    PostgresAggregateRecorder,
    PostgresDatastore,
    PostgresProcessRecorder,
)
from eventsourcing.sqlite import (
    SQLiteAggregateRecorder,
    SQLiteConnection,
    SQLiteConnectionPool,
    SQLiteCursor,
    SQLiteDatastore,
    SQLiteProcessRecorder,
)
from eventsourcing.utils import get_topic, retry
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier

from infra.settings import Settings
from infra.snapshots import Snapshots

log = logging.getLogger(__name__)

DomainEvent = CanMutateAggregate[UUID]
Aggregate = BaseAggregate[UUID]


class OrjsonTranscoder(Transcoder):
    """Event state as plain JSON. Events hold only JSON types besides their `timestamp`, so
    projections can read the stored state without the domain classes."""

    def encode(self, obj: Any) -> bytes:
        return orjson.dumps(obj)

    def decode(self, data: bytes) -> Any:
        state = orjson.loads(data)
        if isinstance(state, dict) and "timestamp" in state:
            state["timestamp"] = datetime.fromisoformat(state["timestamp"])
        return state


# Per event class: its topic and, when above 1, its class_version (written into the state).
_classes: dict[type, tuple[str, int]] = {}

# A stored_events row: originator id (hex), version, topic, JSON state.
EventRow = tuple[str, int, str, bytes]


def _class_info(cls: type) -> tuple[str, int]:
    info = _classes.get(cls)
    if info is None:
        info = _classes[cls] = (get_topic(cls), getattr(cls, "class_version", 1))
    return info


def _state(domain_event: object) -> tuple[Any, int, str, bytes]:
    topic, class_version = _class_info(type(domain_event))
    # An event's fields are its __dict__ (dataclass or not): copy it once, drop what the
    # row's own columns hold.
    state = dict(vars(domain_event))
    originator_id = state.pop("originator_id")
    originator_version = state.pop("originator_version")
    if class_version > 1:
        state["class_version"] = class_version
    return originator_id, originator_version, topic, orjson.dumps(state)


class OrjsonMapper(Mapper[UUID]):
    """eventsourcing's Mapper without a cipher or compressor, writing JSON in one step (the
    ingest worker maps about two events per contact event)."""

    def __init__(self) -> None:
        super().__init__(OrjsonTranscoder())

    def to_stored_event(self, domain_event: DomainEventProtocol[UUID]) -> StoredEvent:
        return StoredEvent(*_state(domain_event))

    def to_row(self, domain_event: DomainEventProtocol[UUID]) -> EventRow:
        """The SQLite row of an event straight away, without a StoredEvent in between."""
        originator_id, originator_version, topic, state = _state(domain_event)
        return originator_id.hex, originator_version, topic, state


@dataclass(frozen=True)
class ContactEventRow:
    """A contact event taken in: its id and the Kafka position it was read from."""

    event_id: str
    topic: str
    partition: int
    offset: int


class IngestRecorder(Protocol):
    """What the ingest worker needs of a recorder beyond eventsourcing's ProcessRecorder."""

    def seen_event_ids(self, event_ids: Sequence[str]) -> set[str]: ...

    def existing_ids(self, aggregate_ids: Sequence[UUID]) -> set[UUID]: ...

    def contact_event_source(self, event_id: str) -> ContactEventRow | None: ...

    def count_contact_events(self) -> int: ...


class _WalNormalPool(SQLiteConnectionPool):
    """WAL with synchronous=NORMAL: a power cut may lose the last commits, but a batch's
    events and its Kafka position are lost together, so Kafka redelivers them: nothing is
    lost or doubled, and each commit skips an fsync."""

    def _create_connection(self) -> SQLiteConnection:
        connection = super()._create_connection()
        sqlite = connection._sqlite_conn
        sqlite.execute("PRAGMA synchronous=NORMAL")
        # Random aggregate ids spread each batch over many pages: a larger page cache and
        # rarer checkpoints keep a batch's commit from rewriting them every time.
        sqlite.execute("PRAGMA cache_size=-16384")  # per connection: 16 MiB
        sqlite.execute("PRAGMA wal_autocheckpoint=16384")
        return connection


class SQLiteStoreDatastore(SQLiteDatastore):
    def __init__(self, db_name: str, *, lock_timeout: int = 30) -> None:
        super().__init__(db_name, lock_timeout=lock_timeout)
        self.pool = _WalNormalPool(db_name=db_name, lock_timeout=lock_timeout, max_overflow=10)


class SQLiteIngestRecorder(SQLiteProcessRecorder):
    def construct_create_table_statements(self) -> list[str]:
        return [
            *super().construct_create_table_statements(),
            "CREATE TABLE IF NOT EXISTS contact_events ("
            "event_id TEXT PRIMARY KEY, topic TEXT, partition INTEGER, "
            "kafka_offset INTEGER) WITHOUT ROWID",
        ]

    def _insert_events(
        self, c: SQLiteCursor, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        rows: list[EventRow] = [
            (s.originator_id.hex, s.originator_version, s.topic, s.state)
            if isinstance(s.originator_id, UUID)
            else (str(s.originator_id), s.originator_version, s.topic, s.state)
            for s in stored_events
        ]
        return self._insert_rows(c, rows, **kwargs)

    def insert_rows(self, rows: Sequence[EventRow], **kwargs: Any) -> Sequence[int]:
        """`insert_events` for rows the mapper made (`OrjsonMapper.to_row`)."""
        with self.datastore.transaction(commit=True) as c:
            return self._insert_rows(c, rows, **kwargs)

    def _insert_rows(self, c: SQLiteCursor, rows: Sequence[EventRow], **kwargs: Any) -> list[int]:
        # One executemany instead of eventsourcing's row-at-a-time inserts. Inside this write
        # transaction nobody else inserts, so the rowids (notification ids) are consecutive.
        c.executemany(self.insert_events_statement, rows)
        returning: list[int] = []
        if rows:
            c.execute("SELECT last_insert_rowid()")
            last = int(c.fetchone()[0])
            returning = list(range(last - len(rows) + 1, last + 1))
        for tracking in kwargs.get("trackings", ()):
            self._insert_tracking(c, tracking)
        taken_in: Sequence[ContactEventRow] = kwargs.get("contact_events", ())
        if taken_in:
            c.executemany(
                "INSERT INTO contact_events VALUES (?,?,?,?)",
                [(r.event_id, r.topic, r.partition, r.offset) for r in taken_in],
            )
        return returning

    def seen_event_ids(self, event_ids: Sequence[str]) -> set[str]:
        seen: set[str] = set()
        with self.datastore.transaction(commit=False) as c:
            for start in range(0, len(event_ids), 500):
                chunk = event_ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                c.execute(f"SELECT event_id FROM contact_events WHERE event_id IN ({marks})", chunk)
                seen.update(row[0] for row in c.fetchall())
        return seen

    def existing_ids(self, aggregate_ids: Sequence[UUID]) -> set[UUID]:
        found: set[UUID] = set()
        with self.datastore.transaction(commit=False) as c:
            for start in range(0, len(aggregate_ids), 500):
                chunk = [i.hex for i in aggregate_ids[start : start + 500]]
                marks = ",".join("?" * len(chunk))
                c.execute(
                    "SELECT DISTINCT originator_id FROM stored_events "
                    f"WHERE originator_id IN ({marks}) AND originator_version=1",
                    chunk,
                )
                found.update(UUID(row[0]) for row in c.fetchall())
        return found

    def contact_event_source(self, event_id: str) -> ContactEventRow | None:
        with self.datastore.transaction(commit=False) as c:
            c.execute("SELECT * FROM contact_events WHERE event_id=?", (event_id,))
            row = c.fetchone()
        return None if row is None else ContactEventRow(row[0], row[1], row[2], row[3])

    def count_contact_events(self) -> int:
        with self.datastore.transaction(commit=False) as c:
            c.execute("SELECT COUNT(*) FROM contact_events")
            return int(c.fetchone()[0])


class PostgresIngestRecorder(PostgresProcessRecorder):
    contact_events_table = "inbox_contact_events"

    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        # Four arrays instead of eventsourcing's one array of a composite type: psycopg
        # writes composites in Python, a regular expression per field (~65 us per event,
        # most of the worker's time on PostgreSQL). Arrays go in binary (`%b`): in text,
        # psycopg quotes each element with regular expressions too (a quarter of the worker).
        self._insert_columns = SQL(
            "INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state) "
            "SELECT * FROM unnest(%b::uuid[], %b::integer[], %b::text[], %b::bytea[]) "
            "RETURNING notification_id"
        ).format(schema=Identifier(datastore.schema), table=Identifier(self.events_table_name))

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        # One plain transaction: eventsourcing's pipelined one stalled now and then with
        # these large arrays (the server waiting for the rest of the statement, the client
        # for results), and the few statements here gain nothing from a pipeline.
        with self.datastore.transaction(commit=True) as curs:
            self._insert_events(curs, stored_events, **kwargs)
            if not stored_events:
                return []
            # As eventsourcing's: the table lock keeps ids in commit order; NOTIFY wakes
            # the readers that listen.
            self._lock_table(curs)
            self._notify_channel(curs)
            curs.execute(
                self._insert_columns,
                (
                    [e.originator_id for e in stored_events],
                    [e.originator_version for e in stored_events],
                    [e.topic for e in stored_events],
                    [e.state for e in stored_events],
                ),
            )
            return [row["notification_id"] for row in curs.fetchall()]

    def create_table(self) -> None:
        super().create_table()
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(
                f"CREATE TABLE IF NOT EXISTS {self.contact_events_table} ("
                "event_id TEXT PRIMARY KEY, topic TEXT, partition INTEGER, kafka_offset BIGINT)"
            )

    def _insert_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> None:
        super()._insert_events(curs, stored_events, **kwargs)
        for tracking in kwargs.get("trackings", ()):
            self._insert_tracking(curs, tracking)
        rows: Sequence[ContactEventRow] = kwargs.get("contact_events", ())
        if rows:
            curs.execute(
                f"INSERT INTO {self.contact_events_table} SELECT * FROM "
                "unnest(%b::text[], %b::text[], %b::integer[], %b::bigint[])",
                (
                    [r.event_id for r in rows],
                    [r.topic for r in rows],
                    [r.partition for r in rows],
                    [r.offset for r in rows],
                ),
            )

    def seen_event_ids(self, event_ids: Sequence[str]) -> set[str]:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(
                f"SELECT event_id FROM {self.contact_events_table} WHERE event_id = ANY(%b)",
                (list(event_ids),),
            )
            return {row["event_id"] for row in curs.fetchall()}

    def existing_ids(self, aggregate_ids: Sequence[UUID]) -> set[UUID]:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(
                f"SELECT originator_id FROM {self.events_table_name} "
                "WHERE originator_id = ANY(%b) AND originator_version=1",
                (list(aggregate_ids),),
            )
            return {UUID(str(row["originator_id"])) for row in curs.fetchall()}

    def contact_event_source(self, event_id: str) -> ContactEventRow | None:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(
                f"SELECT * FROM {self.contact_events_table} WHERE event_id=%s", (event_id,)
            )
            row = curs.fetchone()
        if row is None:
            return None
        return ContactEventRow(row["event_id"], row["topic"], row["partition"], row["kafka_offset"])

    def count_contact_events(self) -> int:
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(f"SELECT COUNT(*) AS n FROM {self.contact_events_table}")
            row = curs.fetchone()
            assert row is not None
            return int(row["n"])


class EventStore:
    """The system of record. Synchronous (eventsourcing is); call it from a thread in asyncio."""

    def __init__(
        self,
        recorder: ProcessRecorder,
        datastore: SQLiteDatastore | PostgresDatastore,
        snapshots: Snapshots,
    ):
        self.recorder = recorder
        self.datastore = datastore
        self.mapper = OrjsonMapper()
        self.snapshots = snapshots

    @property
    def ingest(self) -> IngestRecorder:
        return cast(IngestRecorder, self.recorder)

    def get(self, aggregate_id: UUID) -> Any:
        """The aggregate rebuilt from its latest snapshot and the events after it, or None
        when it has no events."""
        aggregate: Aggregate | None = self.snapshots.latest(aggregate_id)
        after = None if aggregate is None else aggregate.version
        for stored in self.recorder.select_events(aggregate_id, gt=after):
            event = cast(DomainEvent, self.mapper.to_domain_event(stored))
            aggregate = event.mutate(aggregate)
        return aggregate

    def events_of(self, aggregate_id: UUID) -> list[DomainEvent]:
        return [
            cast(DomainEvent, self.mapper.to_domain_event(s))
            for s in self.recorder.select_events(aggregate_id)
        ]

    def record(
        self,
        events: Iterable[DomainEvent],
        *,
        trackings: Sequence[Tracking] = (),
        contact_events: Sequence[ContactEventRow] = (),
        aggregates: Iterable[Aggregate] = (),
    ) -> Sequence[int]:
        """Writes events, Kafka positions (one per partition) and contact-event ids in one
        transaction. `aggregates`: those the events are of, as the events left them; each
        one the events moved past a multiple of `SNAPSHOT_EVERY` is snapshotted after the
        commit.

        Raises eventsourcing's IntegrityError when another writer got there first (a version
        already taken, a Kafka position already recorded, a contact event already taken in)."""
        events = list(events)
        if isinstance(self.recorder, SQLiteIngestRecorder):
            to_row = self.mapper.to_row
            ids: Sequence[int] | None = self.recorder.insert_rows(
                [to_row(e) for e in events], trackings=trackings, contact_events=contact_events
            )
        else:
            ids = self.recorder.insert_events(
                [self.mapper.to_stored_event(e) for e in events],
                trackings=trackings,
                contact_events=contact_events,
            )
        every = self.snapshots.every
        # Versions are consecutive: a multiple among them is one passed.
        passed = {e.originator_id for e in events if e.originator_version % every == 0}
        if passed:
            for aggregate in aggregates:
                if aggregate.id in passed:
                    self._snapshot(aggregate)
        return ids or []

    def save(self, *aggregates: Aggregate) -> Sequence[int]:
        events: list[DomainEvent] = []
        for aggregate in aggregates:
            events.extend(aggregate.collect_events())
        return self.record(events, aggregates=aggregates)

    def _snapshot(self, aggregate: Aggregate) -> None:
        # The events are committed: a snapshot that cannot be written is only a shortcut
        # missed, never a failed save.
        try:
            self.snapshots.take(aggregate)
        except Exception:
            log.warning("could not snapshot %s", aggregate.id, exc_info=True)

    def notifications(
        self, after: int, limit: int, *, topics: Sequence[str] = ()
    ) -> Sequence[Notification]:
        return self.recorder.select_notifications(
            after, limit, topics=topics, inclusive_of_start=False
        )

    def max_notification_id(self) -> int:
        return self.recorder.max_notification_id() or 0

    def position(self, name: str) -> int | None:
        return self.recorder.max_tracking_id(name)

    def seen_event_ids(self, event_ids: Sequence[str]) -> set[str]:
        return self.ingest.seen_event_ids(event_ids) if event_ids else set()

    def existing_ids(self, aggregate_ids: Sequence[UUID]) -> set[UUID]:
        return self.ingest.existing_ids(aggregate_ids) if aggregate_ids else set()

    def rewrite(self, aggregate_id: UUID, change: Callable[[dict[str, Any]], bool]) -> int:
        """Changes the stored state of an aggregate's events in place, in one transaction;
        `change` edits a decoded state and says whether it changed it. Only for erasing
        personal data (`inbox forget`): events are otherwise never rewritten. The aggregate's
        snapshots, which may hold the same data, are deleted with them. Returns how many
        events changed."""
        table = self.recorder.events_table_name  # type: ignore[attr-defined]
        snapshots = self.snapshots.table
        changed = 0
        if isinstance(self.datastore, PostgresDatastore):
            with self.datastore.transaction(commit=True) as curs:
                curs.execute(
                    f"SELECT originator_version, state FROM {table} WHERE originator_id = %s",
                    (aggregate_id,),
                )
                for row in curs.fetchall():  # dict rows (eventsourcing's row factory)
                    version, decoded = row["originator_version"], orjson.loads(row["state"])
                    if change(decoded):
                        curs.execute(
                            f"UPDATE {table} SET state = %s "
                            "WHERE originator_id = %s AND originator_version = %s",
                            (orjson.dumps(decoded), aggregate_id, version),
                        )
                        changed += 1
                curs.execute(f"DELETE FROM {snapshots} WHERE originator_id = %s", (aggregate_id,))
            return changed
        with self.datastore.transaction(commit=True) as c:
            cursor = c.sqlite_cursor
            oid = aggregate_id.hex
            cursor.execute(
                f"SELECT originator_version, state FROM {table} WHERE originator_id = ?", (oid,)
            )
            for version, state in cursor.fetchall():
                decoded = orjson.loads(state)
                if change(decoded):
                    cursor.execute(
                        f"UPDATE {table} SET state = ? "
                        "WHERE originator_id = ? AND originator_version = ?",
                        (orjson.dumps(decoded), oid, version),
                    )
                    changed += 1
            cursor.execute(f"DELETE FROM {snapshots} WHERE originator_id = ?", (oid,))
        return changed

    def close(self) -> None:
        self.datastore.close()


def open_event_store(settings: Settings) -> EventStore:
    """SQLite in the data directory, or PostgreSQL when INBOX_DATABASE_URL says so."""
    if settings.is_postgres:
        url = urlparse(settings.database_url)
        pg = PostgresDatastore(
            dbname=url.path.lstrip("/"),
            host=url.hostname or "127.0.0.1",
            port=url.port or 5432,
            user=unquote(url.username or "postgres"),
            password=unquote(url.password or ""),
            pool_size=4,
            max_overflow=4,
            lock_timeout=10,
        )
        pg_recorder = PostgresIngestRecorder(
            pg, events_table_name="inbox_events", tracking_table_name="inbox_tracking"
        )
        pg_recorder.create_table()
        pg_snapshots = PostgresAggregateRecorder(pg, events_table_name="inbox_snapshots")
        pg_snapshots.create_table()
        return EventStore(pg_recorder, pg, Snapshots(pg_snapshots))
    path = settings.sqlite_path
    path.parent.mkdir(parents=True, exist_ok=True)
    sqlite = SQLiteStoreDatastore(str(path))
    sqlite_recorder = SQLiteIngestRecorder(sqlite)
    sqlite_recorder.create_table()
    sqlite_snapshots = SQLiteAggregateRecorder(sqlite, events_table_name="snapshots")
    sqlite_snapshots.create_table()
    return EventStore(sqlite_recorder, sqlite, Snapshots(sqlite_snapshots))
