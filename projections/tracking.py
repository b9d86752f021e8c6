"""Generations and tracking positions: the `projection_state` table.

One row per (projection, generation). At most one generation of a projection is `active`
(serving reads and followed by the live runner); a rebuild fills a newer one beside it and
swaps it in when it has caught up. The position is advanced in the same transaction as the
rows, with a conditional update, so two writers of one generation never both apply a batch.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from projections.base import Projection
from projections.db import DatabaseError, IntegrityError, ReadModelDB, Row, Tx

log = logging.getLogger(__name__)

STATE_TABLE = "projection_state"


class PositionConflict(Exception):
    """Another writer moved the position of this generation first; nothing was written."""


@dataclass(frozen=True)
class GenerationState:
    name: str
    generation: int
    position: int
    active: bool
    started_at: str
    finished_at: str | None
    retired_at: str | None
    layout: str | None  # None: made before layouts were recorded
    # What the log holds at `position` (`runner.record_id`): None before the first batch, or
    # when written by a version that did not record it.
    last_record: str | None = None


def now() -> str:
    return datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def ensure_state_table(db: ReadModelDB) -> None:
    with db.transaction() as tx:
        tx.execute(
            f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} ("
            "name TEXT NOT NULL, generation INTEGER NOT NULL, position BIGINT NOT NULL, "
            "active INTEGER NOT NULL, started_at TEXT NOT NULL, finished_at TEXT, "
            "retired_at TEXT, updated_at TEXT, layout TEXT, last_record TEXT, "
            "PRIMARY KEY (name, generation))"
        )
    for column in ("layout", "last_record"):  # a table made before they were recorded
        if not _has_column(db, column):
            try:
                with db.transaction() as tx:
                    tx.execute(f"ALTER TABLE {STATE_TABLE} ADD COLUMN {column} TEXT")
            except DatabaseError:
                if not _has_column(db, column):  # (not another process adding it just now)
                    raise


def _has_column(db: ReadModelDB, column: str) -> bool:
    try:
        with db.read() as tx:
            tx.execute(f"SELECT {column} FROM {STATE_TABLE} WHERE 1=0")
        return True
    except DatabaseError:
        return False


_COLUMNS = (
    "name, generation, position, active, started_at, finished_at, retired_at, layout, last_record"
)


def _state(row: tuple[object, ...]) -> GenerationState:
    return GenerationState(
        name=str(row[0]),
        generation=int(str(row[1])),
        position=int(str(row[2])),
        active=bool(row[3]),
        started_at=str(row[4]),
        finished_at=None if row[5] is None else str(row[5]),
        retired_at=None if row[6] is None else str(row[6]),
        layout=None if row[7] is None else str(row[7]),
        last_record=None if row[8] is None else str(row[8]),
    )


def generations(tx: Tx, name: str) -> list[GenerationState]:
    tx.execute(f"SELECT {_COLUMNS} FROM {STATE_TABLE} WHERE name=? ORDER BY generation", (name,))
    return [_state(row) for row in tx.fetchall()]


def active_generation(tx: Tx, name: str) -> GenerationState | None:
    tx.execute(f"SELECT {_COLUMNS} FROM {STATE_TABLE} WHERE name=? AND active=1", (name,))
    row = tx.fetchone()
    return None if row is None else _state(row)


def generation_state(tx: Tx, name: str, generation: int) -> GenerationState | None:
    tx.execute(
        f"SELECT {_COLUMNS} FROM {STATE_TABLE} WHERE name=? AND generation=?", (name, generation)
    )
    row = tx.fetchone()
    return None if row is None else _state(row)


def active_table(tx: Tx, projection: str, table: str) -> str | None:
    """`table_gN` of the active generation of `projection`, or None before its first run."""
    tx.execute(f"SELECT generation FROM {STATE_TABLE} WHERE name=? AND active=1", (projection,))
    row = tx.fetchone()
    return None if row is None else f"{table}_g{row[0]}"


def new_generation(db: ReadModelDB, projection: Projection, *, active: bool) -> GenerationState:
    """Creates the next generation's row and tables (with indexes when it starts active)."""
    fingerprint = layout(projection, postgres=db.is_postgres)
    for _ in range(5):
        try:
            with db.transaction() as tx:
                tx.execute(
                    f"SELECT COALESCE(MAX(generation), 0) FROM {STATE_TABLE} WHERE name=?",
                    (projection.name,),
                )
                row = tx.fetchone()
                generation = int(row[0]) + 1 if row else 1
                started = now()
                tx.execute(
                    f"INSERT INTO {STATE_TABLE} ({_COLUMNS}, updated_at) "
                    "VALUES (?, ?, 0, ?, ?, ?, NULL, ?, NULL, ?)",
                    (
                        projection.name,
                        generation,
                        int(active),
                        started,
                        started if active else None,
                        fingerprint,
                        started,
                    ),
                )
                projection.create_tables(tx, generation)
                if active:
                    projection.create_indexes(tx, generation)
            return GenerationState(
                projection.name,
                generation,
                0,
                active,
                started,
                started if active else None,
                None,
                fingerprint,
            )
        except IntegrityError:
            continue  # another process took this generation number at the same moment
    raise RuntimeError(f"could not create a generation of {projection.name}")


def ensure_active(db: ReadModelDB, projection: Projection) -> GenerationState:
    """The active generation, created (as generation 1, or the next) on first use."""
    with db.read() as tx:
        state = active_generation(tx, projection.name)
    if state is not None:
        return state
    for _ in range(5):
        created = new_generation(db, projection, active=True)
        with db.transaction() as tx:
            # Two processes may have raced to create the first generation: keep the lowest.
            tx.execute(
                f"SELECT MIN(generation) FROM {STATE_TABLE} WHERE name=? AND active=1",
                (projection.name,),
            )
            row = tx.fetchone()
            winner = int(row[0]) if row and row[0] is not None else created.generation
            if winner != created.generation:
                tx.execute(
                    f"UPDATE {STATE_TABLE} SET active=0, retired_at=? "
                    "WHERE name=? AND generation=?",
                    (now(), projection.name, created.generation),
                )
            current = active_generation(tx, projection.name)
        if winner != created.generation:
            drop_generation(db, projection, created.generation)
        if current is not None:
            return current
    raise RuntimeError(f"no active generation of {projection.name}")


class _DDL:
    """Takes the statements `create_tables` would run, to fingerprint them."""

    rowcount = 0

    def __init__(self, postgres: bool) -> None:
        self.is_postgres = postgres
        self.statements: list[str] = []

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _DDL:
        self.statements.append(sql)
        return self

    def executemany(self, sql: str, params_seq: Sequence[Sequence[Any]]) -> None:
        self.statements.append(sql)

    def insert_many(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], tail: str = ""
    ) -> None:
        self.statements.append(f"INSERT INTO {table} ({', '.join(columns)}) {tail}")

    def fetchone(self) -> Row | None:
        return None

    def fetchall(self) -> list[Row]:
        return []


def layout(projection: Projection, *, postgres: bool) -> str:
    """A fingerprint of the projection's tables: what its `create_tables` runs."""
    ddl = _DDL(postgres)
    projection.create_tables(ddl, 0)
    return hashlib.sha256("\n".join(ddl.statements).encode()).hexdigest()[:16]


def ensure_current(db: ReadModelDB, projection: Projection) -> GenerationState:
    """The active generation, as `ensure_active`, once its tables are the ones this code
    reads and writes: one of another layout is dropped and the projection starts again from
    the beginning of the log, where it would otherwise fail on every batch and every query
    (one made before layouts were recorded is kept when its tables' columns are this code's).
    Indexes added since the generation was made are created. For a runner's start, not
    every round."""
    state = ensure_active(db, projection)
    current = layout(projection, postgres=db.is_postgres)
    if state.layout is None and _same_tables(db, projection, state.generation):
        with db.transaction() as tx:
            tx.execute(
                f"UPDATE {STATE_TABLE} SET layout=? WHERE name=? AND generation=?",
                (current, projection.name, state.generation),
            )
        state = ensure_active(db, projection)
    if state.layout != current:
        log.warning(
            "read model %s: generation %d has other tables than this version writes; "
            "it is dropped and rebuilt from the start of the log",
            projection.name,
            state.generation,
        )
        drop_generation(db, projection, state.generation)
        state = ensure_active(db, projection)
    with db.transaction() as tx:
        projection.create_indexes(tx, state.generation)
    return state


class _Scratch(Exception):
    """Rolls back the tables made only to be compared."""


# Generation 0 is never a real one (they count from 1): its tables are made to be compared.
_SCRATCH = 0


def _same_tables(db: ReadModelDB, projection: Projection, generation: int) -> bool:
    """Whether the generation's tables have the columns (names, types, NOT NULL, primary
    key) that this code's `create_tables` makes: for a generation made before layouts were
    recorded. The code's tables are made in a transaction that is rolled back."""
    same = False
    try:
        with db.transaction() as tx:
            projection.create_tables(tx, _SCRATCH)
            same = all(
                _columns(tx, mine) == _columns(tx, theirs)
                for mine, theirs in zip(
                    projection.tables(_SCRATCH), projection.tables(generation), strict=True
                )
            )
            raise _Scratch
    except _Scratch:
        pass
    return same


def _columns(tx: Tx, name: str) -> list[tuple[Any, ...]]:
    if tx.is_postgres:
        tx.execute(
            "SELECT c.column_name, c.data_type, c.is_nullable, "
            "  c.column_name IN (SELECT k.column_name FROM information_schema.key_column_usage k"
            "    JOIN information_schema.table_constraints t"
            "      ON t.constraint_name = k.constraint_name AND t.table_name = k.table_name"
            "    WHERE t.table_name = ? AND t.constraint_type = 'PRIMARY KEY') "
            "FROM information_schema.columns c WHERE c.table_name = ? "
            "AND c.table_schema = current_schema() ORDER BY c.ordinal_position",
            (name, name),
        )
    else:
        tx.execute('SELECT name, type, "notnull", pk FROM pragma_table_info(?)', (name,))
    return [tuple(row) for row in tx.fetchall()]


def advance(
    tx: Tx,
    name: str,
    generation: int,
    expected: int,
    position: int,
    *,
    require_active: bool,
    record: str,
) -> None:
    """Moves the position from `expected` to `position` (where the log holds `record`), or
    raises PositionConflict."""
    sql = (
        f"UPDATE {STATE_TABLE} SET position=?, last_record=?, updated_at=? "
        "WHERE name=? AND generation=? AND position=?"
    )
    if require_active:
        sql += " AND active=1"
    tx.execute(sql, (position, record, now(), name, generation, expected))
    if tx.rowcount != 1:
        raise PositionConflict(f"{name} generation {generation} is no longer at {expected}")


def drop_generation(db: ReadModelDB, projection: Projection, generation: int) -> None:
    with db.transaction() as tx:
        for name in projection.tables(generation):
            tx.execute(f"DROP TABLE IF EXISTS {name}")
        tx.execute(
            f"UPDATE {STATE_TABLE} SET active=0, retired_at=COALESCE(retired_at, ?) "
            "WHERE name=? AND generation=?",
            (now(), projection.name, generation),
        )


def positions(db: ReadModelDB) -> dict[str, int]:
    """The position of each projection's active generation (for `inbox_projection_position`).
    Only reads: a scrape must not queue behind a projection's batch for the write lock."""
    if not db.table_exists(STATE_TABLE):
        return {}
    with db.read() as tx:
        return active_positions(tx)


def active_positions(tx: Tx) -> dict[str, int]:
    tx.execute(f"SELECT name, position FROM {STATE_TABLE} WHERE active=1")
    return {str(name): int(position) for name, position in tx.fetchall()}
